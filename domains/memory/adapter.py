"""Agent memory streams: events (role, content, time, metadata) as one byte stream a byte-level model reads.

Each event is encoded as

    0xF5 role 0xF6 time 0xF7 metadata 0xF8 content 0xF9

where role and content are UTF-8 text, time is the decimal ``repr`` of a float (seconds since the Unix epoch,
UTC), and metadata is a compact JSON object or nothing at all (``None``). The five markers 0xF5..0xF9 are bytes
that never occur in valid UTF-8, so content can be any text with no escaping, and the stream is unambiguous:
an event is complete exactly when its 0xF9 has arrived. Events are encoded independently, so encoding them one
by one and concatenating equals encoding the list at once: a running model state can be fed each new event as
it happens. The vocabulary is the 256 byte values, the same as ``ByteAdapter``, so a byte model can be
fine-tuned on memory streams. The metric is bits per byte (uniform baseline 8).

On disk a memory stream is JSON Lines (one event object per line, ``.jsonl``, the default) or the encoded bytes
themselves (``format="stream"``, the default for ``.mem`` files). See docs/domains/memory.md.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
import time as _time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.io import atomic_write_bytes

from .base import InputSpec, TokenAdapter, register_adapter
from .bytes import BYTE_VOCAB, _check_window, bytes_to_ids, ids_to_bytes, open_input

__all__ = ["CONTENT", "END", "EVENT", "META", "TIME", "Event", "MemoryStreamAdapter", "StreamDecoder",
           "encode_event"]

EVENT, TIME, META, CONTENT, END = 0xF5, 0xF6, 0xF7, 0xF8, 0xF9
_ORDER = (EVENT, TIME, META, CONTENT, END)  # the markers of one event, in order
_MARKER_NAMES = {EVENT: "event start", TIME: "time", META: "metadata", CONTENT: "content", END: "end of event"}
_MARKER = re.compile(rb"[\xf5-\xff]")  # 0xFA..0xFF are reserved: never valid inside a stream
_TIME_TEXT = re.compile(rb"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_READ_CHUNK = 1 << 16
_EVENT_KEYS = {"role", "content", "time", "metadata"}


def _marker_name(byte: int) -> str:
    return f"0x{byte:02X} ({_MARKER_NAMES.get(byte, 'reserved')})"


# ------------------------------------------------------------------------------------------------------
# the event record


def _check_text(value, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"Event.{field} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"Event.{field}: character {exc.start} ({value[exc.start]!r}) has no UTF-8 form "
                         f"({exc.reason})") from None
    return value


def _check_json(value, where: str) -> None:
    """Metadata must come back from JSON exactly as it went in: no tuples, no int keys, no NaN."""
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, str):
            _check_text(value, where)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"Event.{where} is {value}: JSON has no NaN or infinity")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError(f"Event.{where} has key {key!r} of type {type(key).__name__}: JSON keys are str")
            _check_text(key, f"{where} key")
            _check_json(item, f"{where}[{key!r}]")
        return
    raise InputError(f"Event.{where} is a {type(value).__name__}: metadata holds only JSON values "
                     "(dict with str keys, list, str, int, float, bool, None)")


def _as_timestamp(value) -> float:
    if isinstance(value, bool):
        raise InputError(f"Event.time must be a number of seconds or a datetime, got {value!r}")
    if isinstance(value, (int, float)):
        value = float(value)
    elif isinstance(value, _dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InputError(f"Event.time {value.isoformat()} has no time zone: give an aware datetime "
                             "(e.g. tzinfo=datetime.timezone.utc)")
        value = value.timestamp()
    elif isinstance(value, str):
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        try:
            parsed = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise InputError(f"Event.time {value!r} is not an ISO-8601 date-time") from None
        return _as_timestamp(parsed)
    else:
        raise InputError(f"Event.time must be seconds since the Unix epoch (float), an aware datetime or an "
                         f"ISO-8601 string, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InputError(f"Event.time must be finite, got {value}")
    return value


@dataclass
class Event:
    """One record of an agent's memory.

    ``role``: who speaks or acts ("user", "assistant", "tool", ...), non-empty text. ``content``: any text
    (empty, control characters, emoji). ``time``: seconds since the Unix epoch (UTC) as a float; an aware
    ``datetime`` or an ISO-8601 string with a zone ("2024-05-01T12:00:00Z") is converted to that on creation.
    ``metadata``: ``None`` or a JSON object (dict with str keys of JSON values); ``None`` and ``{}`` differ.
    """

    role: str
    content: str
    time: float
    metadata: dict | None = None

    def __post_init__(self) -> None:
        _check_text(self.role, "role")
        if not self.role:
            raise InputError("Event.role must not be empty")
        _check_text(self.content, "content")
        self.time = _as_timestamp(self.time)
        if self.metadata is not None:
            if not isinstance(self.metadata, dict):
                raise InputError(f"Event.metadata must be a dict or None, got {type(self.metadata).__name__}")
            _check_json(self.metadata, "metadata")

    @property
    def datetime(self) -> _dt.datetime:
        """``time`` as an aware UTC datetime."""
        return _dt.datetime.fromtimestamp(self.time, tz=_dt.timezone.utc)

    def to_json(self) -> dict[str, Any]:
        """The JSON Lines record: ``{"role", "content", "time", "metadata"}``."""
        return {"role": self.role, "content": self.content, "time": self.time, "metadata": self.metadata}

    @classmethod
    def from_json(cls, record: dict) -> Event:
        if not isinstance(record, dict):
            raise InputError(f"an event record must be a JSON object, got {type(record).__name__}")
        missing = sorted({"role", "content", "time"} - set(record))
        unknown = sorted(set(record) - _EVENT_KEYS)
        if missing or unknown:
            raise InputError(f"event record has missing keys {missing} / unknown keys {unknown}; the keys are "
                             "role, content, time and optionally metadata")
        return cls(record["role"], record["content"], record["time"], record.get("metadata"))


def _metadata_bytes(metadata: dict | None) -> bytes:
    if metadata is None:
        return b""
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _header(role: str, time: float, metadata: dict | None) -> bytes:
    return b"".join((bytes((EVENT,)), role.encode("utf-8"), bytes((TIME,)), repr(time).encode("ascii"),
                     bytes((META,)), _metadata_bytes(metadata), bytes((CONTENT,))))


def encode_event(event: Event) -> bytes:
    """One event's bytes: ``0xF5 role 0xF6 time 0xF7 metadata 0xF8 content 0xF9``."""
    if not isinstance(event, Event):
        raise InputError(f"expected an Event, got {type(event).__name__}")
    event.__post_init__()  # a dataclass field may have been reassigned since creation
    return _header(event.role, event.time, event.metadata) + event.content.encode("utf-8") + bytes((END,))


# ------------------------------------------------------------------------------------------------------
# decoding


class StreamDecoder:
    """Parses an encoded memory stream fed in pieces cut anywhere; ``feed`` returns the events it completed.

    Malformed bytes raise ``InputError`` as soon as they are seen, naming ``where``, the event index and the
    byte offset from the start of the stream. ``finish(partial=...)`` says what to do with an event that has
    begun but not ended: ``"raise"`` (an ``InputError`` naming where it starts) or ``"drop"``. ``pending`` holds
    its bytes (e.g. a reply being generated).
    """

    def __init__(self, where: str = "memory stream") -> None:
        self.where = where
        self.offset = 0  # stream offset of the first byte of the buffer
        self.events = 0  # events completed so far
        self._buffer = bytearray()
        self._markers: list[int] = []  # buffer positions of the markers of the event being read
        self._scan = 0  # buffer position up to which markers have been looked for

    @property
    def pending(self) -> bytes:
        """The bytes of the event begun but not yet ended (empty between events)."""
        return bytes(self._buffer)

    def _error(self, position: int, message: str) -> InputError:
        """``position``: counted from the start of the event being read."""
        return InputError(f"{self.where}: event {self.events} (starting at byte {self.offset}), byte offset "
                          f"{self.offset + position}: {message}")

    def _outside(self, buffer: bytearray, start: int) -> InputError:
        return self._error(0, f"byte 0x{buffer[start]:02X} outside an event (an event starts with "
                              f"{_marker_name(EVENT)})")

    def feed(self, data) -> list[Event]:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"{self.where}: StreamDecoder.feed takes bytes, got {type(data).__name__}")
        buffer = self._buffer
        buffer += data
        done: list[Event] = []
        start = 0  # buffer position of the first byte of the event being read
        while True:
            found = _MARKER.search(buffer, self._scan)
            if found is None:
                self._scan = len(buffer)
                if not self._markers and len(buffer) > start:
                    raise self._outside(buffer, start)
                break
            position, byte = found.start(), buffer[found.start()]
            if not self._markers and position != start:
                raise self._outside(buffer, start)
            expected = _ORDER[len(self._markers)]
            if byte != expected:
                raise self._error(position - start, f"found {_marker_name(byte)} where {_marker_name(expected)} "
                                  "was expected" + (" (the event was never closed)" if byte == EVENT else ""))
            self._markers.append(position)
            self._scan = position + 1
            if byte == END:
                done.append(self._parse(bytes(buffer[start:position + 1]), [p - start for p in self._markers]))
                self.events += 1
                self.offset += position + 1 - start
                start, self._markers = position + 1, []
        # drop the finished events once per feed (not once per event: a big feed stays linear)
        del buffer[:start]
        self._scan -= start
        self._markers = [p - start for p in self._markers]
        return done

    def _field(self, data: bytes, start: int, stop: int, name: str) -> str:
        try:
            return data[start:stop].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._error(start + exc.start, f"invalid UTF-8 in the {name} ({exc.reason})") from None

    def _parse(self, data: bytes, marks: list[int]) -> Event:
        _, t, m, c, e = marks
        role = self._field(data, 1, t, "role")
        if not role:
            raise self._error(1, "the role is empty")
        time_text = data[t + 1:m]
        if not _TIME_TEXT.fullmatch(time_text):
            raise self._error(t + 1, f"the time {time_text[:40]!r} is not a decimal number of seconds")
        meta_text = self._field(data, m + 1, c, "metadata")
        metadata = None
        if meta_text:
            def no_constant(name):
                raise ValueError(f"{name} is not JSON")

            try:
                metadata = json.loads(meta_text, parse_constant=no_constant)
            except ValueError as exc:
                raise self._error(m + 1, f"the metadata is not valid JSON ({exc})") from None
            if not isinstance(metadata, dict):
                raise self._error(m + 1, f"the metadata must be a JSON object, got {type(metadata).__name__}")
        seconds = float(time_text)
        if not math.isfinite(seconds):
            raise self._error(t + 1, f"the time {time_text[:40]!r} is not a finite number of seconds")
        content = self._field(data, c + 1, e, "content")
        try:
            return Event(role, content, seconds, metadata)
        except InputError as exc:  # what JSON parsing lets through: a number too large for a float (1e999)
            raise self._error(m + 1, str(exc)) from None

    def finish(self, partial: str = "raise") -> None:
        """The stream ended. ``partial="raise"``: an unfinished last event is an error; ``"drop"``: ignore it."""
        if partial not in ("raise", "drop"):
            raise ConfigError(f"partial must be 'raise' or 'drop', got {partial!r}")
        if self._buffer and partial == "raise":
            expected = _ORDER[len(self._markers)]
            raise self._error(len(self._buffer), f"the stream ends inside an event ({len(self._buffer)} bytes, "
                                                 f"waiting for {_marker_name(expected)}); "
                                                 "decode with partial='drop' to keep the complete events")


# ------------------------------------------------------------------------------------------------------
# files


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
                raise InputError(f"{where}: invalid UTF-8 at byte offset {start + exc.start} ({exc.reason})") \
                    from None
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


# ------------------------------------------------------------------------------------------------------
# the adapter


@register_adapter
class MemoryStreamAdapter(TokenAdapter):
    """Agent memory events <-> byte ids (vocabulary 256, shared with ``ByteAdapter``); metric bits per byte."""

    name = "memory"
    metric_name = "bits_per_byte"
    stop_tokens = (END,)  # ``model.generate(..., stop=adapter.stop_tokens)`` ends a reply with its event
    # a reply is the content of one event: the framing markers and the reserved bytes 0xFA..0xFF are never
    # sampled (they would end the content early or make the stream undecodable), and 0xF9 ends the reply
    special_ids = tuple(range(EVENT, 0x100))
    eos_id = END

    def settings(self) -> dict[str, Any]:
        return {}

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=BYTE_VOCAB)

    def uniform_baseline(self) -> float:
        return math.log2(BYTE_VOCAB)

    # -- events <-> ids ------------------------------------------------------------------------------------
    def encode_bytes(self, raw: Event | Iterable[Event]) -> bytes:
        """One event or an iterable of events -> their concatenated encoded bytes."""
        if isinstance(raw, Event):
            return encode_event(raw)
        if isinstance(raw, (str, bytes, bytearray, dict)) or not isinstance(raw, Iterable):
            raise InputError(f"encode takes an Event or an iterable of Events, got {type(raw).__name__}")
        parts = []
        for i, event in enumerate(raw):
            try:
                parts.append(encode_event(event))
            except InputError as exc:
                raise InputError(f"event {i}: {exc}") from None
        return b"".join(parts)

    def encode(self, raw: Event | Iterable[Event]) -> torch.Tensor:
        """One event or an iterable of events -> 1-D int64 byte ids. ``encode(a) ++ encode(b) == encode([a, b])``."""
        return bytes_to_ids(self.encode_bytes(raw))

    def decode(self, tensor, partial: str = "raise") -> list[Event]:
        """Byte ids (tensor, numpy array, list of ints or bytes) -> the events. A stream that ends inside an event
        raises (``partial="raise"``) or keeps only the complete events (``partial="drop"``); malformed bytes raise
        ``InputError`` naming the byte offset."""
        decoder = StreamDecoder("decode")
        events = decoder.feed(ids_to_bytes(tensor, "decode"))
        decoder.finish(partial)
        return events

    # -- generation ----------------------------------------------------------------------------------------
    def prompt_for(self, role: str, time=None, metadata: dict | None = None) -> torch.Tensor:
        """The ids that open a new event of ``role`` up to its content: feed them, then generate the content
        with ``stop=adapter.stop_tokens``. ``time=None`` is now."""
        header = Event(role, "", _time.time() if time is None else time, metadata)
        return bytes_to_ids(_header(header.role, header.time, header.metadata))

    def reply_event(self, prompt, generated) -> Event:
        """The event a generated reply completes: ``prompt`` is what ``prompt_for`` gave, ``generated`` the ids
        the model produced after it. The content is the generated bytes up to the first marker byte (normally
        the end-of-event 0xF9), as UTF-8 with bad bytes replaced by U+FFFD; the event re-encodes to exactly the
        bytes the model consumed when the reply was valid UTF-8 and ended with 0xF9."""
        header = ids_to_bytes(prompt, "prompt")
        events = self.decode(header + bytes((END,)))
        if len(events) != 1 or events[0].content:
            raise InputError("prompt: expected the ids of one event header (from prompt_for)")
        text = ids_to_bytes(generated, "generated")
        cut = _MARKER.search(text)
        content = text[:cut.start() if cut else len(text)].decode("utf-8", errors="replace")
        return dataclasses.replace(events[0], content=content)

    # -- files ---------------------------------------------------------------------------------------------
    def read(self, path: str | os.PathLike, format: str | None = None, **options) -> list[Event]:
        """All events of a JSON Lines file (or of an encoded ``.mem`` stream, ``format="stream"``)."""
        path = os.fspath(path)
        if _format_of(path, format) == "jsonl":
            return list(_iter_jsonl(path))
        return [event for _, events in _iter_stream(path, _READ_CHUNK) for event in events]

    def iter_events(self, path: str | os.PathLike, format: str | None = None) -> Iterator[Event]:
        """The file's events one by one (one line or one read chunk in memory at a time)."""
        path = os.fspath(path)
        if _format_of(path, format) == "jsonl":
            return _iter_jsonl(path)
        return (event for _, events in _iter_stream(path, _READ_CHUNK) for event in events)

    def iter_windows(self, path: str | os.PathLike, window: int, format: str | None = None,
                     **options) -> Iterator[torch.Tensor]:
        """The encoded stream of the file's events, ``window`` byte ids at a time (the last may be shorter)."""
        window = _check_window(window)
        path = os.fspath(path)
        if _format_of(path, format) == "jsonl":
            return self._windows((encode_event(e) for e in _iter_jsonl(path)), window)
        return self._windows((data for data, _ in _iter_stream(path, window)), window)

    @staticmethod
    def _windows(pieces: Iterable[bytes], window: int) -> Iterator[torch.Tensor]:
        buffer = bytearray()
        for piece in pieces:
            buffer += piece
            if len(buffer) >= window:
                full = len(buffer) - len(buffer) % window
                for start in range(0, full, window):
                    yield bytes_to_ids(bytes(buffer[start:start + window]))
                del buffer[:full]
        if buffer:
            yield bytes_to_ids(bytes(buffer))

    def write(self, path: str | os.PathLike, raw: Event | Iterable[Event], format: str | None = None) -> None:
        """Write events atomically as JSON Lines (or as the encoded stream, ``format="stream"`` / ``.mem``)."""
        path = os.fspath(path)
        events = [raw] if isinstance(raw, Event) else raw
        if _format_of(path, format) == "stream":
            data = self.encode_bytes(events)
        else:
            lines = []
            for i, event in enumerate(events):
                try:
                    encode_event(event)  # the same checks as the stream format
                except InputError as exc:
                    raise InputError(f"{path}: event {i}: {exc}") from None
                lines.append(json.dumps(event.to_json(), ensure_ascii=False, allow_nan=False) + "\n")
            data = "".join(lines).encode("utf-8")
        if not data:
            raise InputError(f"{path}: no events to write (an empty memory file could not be read back)")
        atomic_write_bytes(path, data)

    # -- training ------------------------------------------------------------------------------------------
    def source(self, data, batch_size: int, window: int, format: str | None = None):
        """A ``seqlab.train.SequenceSource`` over the encoded stream of ``data``: encoded byte ids (a 1-D tensor
        or array, checked to decode as whole events), events, or a path (a ``.mem`` stream file is memory-mapped
        after a streaming check; a JSON Lines file is encoded in memory)."""
        from seqlab.train import SequenceSource

        if isinstance(data, (torch.Tensor, np.ndarray)):
            where = "source ids"
            raw = ids_to_bytes(data, where)
            decoder = StreamDecoder(where)
            decoder.feed(raw)
            decoder.finish("raise")
            array = np.frombuffer(raw, dtype=np.uint8)
        elif isinstance(data, (str, os.PathLike)):
            where = os.fspath(data)
            if _format_of(where, format) == "stream":
                for _ in _iter_stream(where, _READ_CHUNK):
                    pass
                array = np.memmap(where, dtype=np.uint8, mode="r")
            else:
                array = np.frombuffer(b"".join(encode_event(e) for e in _iter_jsonl(where)), dtype=np.uint8)
        else:
            where = "source events"
            array = np.frombuffer(self.encode_bytes(data), dtype=np.uint8)
        try:
            return SequenceSource(array, batch_size, window)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None

