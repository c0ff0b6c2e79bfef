"""Memory files: JSON Lines (one event object per line) or the encoded stream itself (``.mem``), read one line or
one chunk at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator

from seqlab.errors import ConfigError, InputError

from ..bytes import open_input
from .decoder import StreamDecoder
from .events import Event

_READ_CHUNK = 1 << 16


def _format_of(path: str, format: str | None) -> str:
    if format is None:
        return "stream" if path.endswith(".mem") else "jsonl"
    if format not in ("jsonl", "stream"):
        raise ConfigError(f"format must be 'jsonl' or 'stream' (or None: by suffix), got {format!r}")
    return format


def _iter_jsonl(path: str) -> Iterator[Event]:
    """Events of a JSON Lines file, one line in memory at a time; blank lines are skipped."""
    offset, count = 0, 0
    with open_input(path) as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path}: line {number} (byte {offset})"
            start = offset
            offset += len(line)
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{where}: invalid UTF-8 at byte offset {start + exc.start} ({exc.reason})") from None
            try:
                record = json.loads(text)
            except ValueError as exc:
                raise InputError(f"{where}: not a JSON event record ({exc})") from None
            try:
                yield Event.from_json(record)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            count += 1
    if count == 0:
        raise InputError(f"{path}: no events (the file is empty or blank)")


def _iter_stream(path: str, chunk: int) -> Iterator[tuple[bytes, list[Event]]]:
    """(raw bytes, events they completed) of an encoded stream file, ``chunk`` bytes at a time."""
    decoder = StreamDecoder(path)
    with open_input(path) as handle:
        while data := handle.read(chunk):
            yield data, decoder.feed(data)
    if decoder.offset == 0 and not decoder.pending:
        raise InputError(f"{path}: file is empty (0 bytes): no events")
    decoder.finish("raise")
