"""Raw bytes as tokens (MambaByte): any file, UTF-8 text or binary, is a sequence of 256 byte values.

No tokenizer, no vocabulary file: token id ``i`` is the byte ``i``. The metric is bits per byte (the uniform
baseline is 8). Decoding gives bytes back exactly; ``decode_text`` gives a ``str`` where bytes that are not valid
UTF-8 (a model can emit any byte) become U+FFFD instead of raising. ``ByteAdapter(utf8=True)`` insists that
its inputs are valid UTF-8 text and names the file, line and byte offset of the first bad byte.

Reading streams: ``iter_windows`` reads ``window`` bytes at a time, and ``source`` builds a training source on an
``np.memmap`` of the file, so a file larger than memory is never read whole. See docs/domains/bytes.md.
"""

from __future__ import annotations

import codecs
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.io import atomic_write_bytes

from .base import InputSpec, TokenAdapter, register_adapter

__all__ = ["BYTE_VOCAB", "ByteAdapter", "Utf8Validator", "bytes_to_ids", "ids_to_bytes", "open_input", "to_bytes"]

BYTE_VOCAB = 256
_VALIDATE_CHUNK = 1 << 20  # bytes per step when a utf8 adapter checks a memory-mapped file


def to_bytes(raw, where: str = "input") -> bytes:
    """``str`` (encoded as UTF-8) or a bytes-like object (bytes, bytearray, memoryview) -> ``bytes``."""
    if isinstance(raw, str):
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates have no UTF-8 form
            raise InputError(
                f"{where}: character {exc.start} ({raw[exc.start]!r}) cannot be encoded as UTF-8 ({exc.reason})"
            ) from None
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    if isinstance(raw, memoryview):
        return raw.tobytes()
    raise InputError(f"{where}: expected str or bytes-like (bytes, bytearray, memoryview), got {type(raw).__name__}")


def bytes_to_ids(data: bytes) -> torch.Tensor:
    """Bytes -> a 1-D int64 tensor of their values (what ``LanguageModel`` embeds)."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def ids_to_bytes(ids, where: str = "ids") -> bytes:
    """Token ids (a 1-D integer tensor, numpy array, or sequence of ints; bytes pass through) -> bytes.

    Ids outside [0, 256) raise ``InputError`` naming the first bad position."""
    if isinstance(ids, (bytes, bytearray, memoryview)):
        return to_bytes(ids, where)
    if isinstance(ids, torch.Tensor):
        array = ids.detach().cpu()
        if array.dtype.is_floating_point or array.dtype.is_complex or array.dtype == torch.bool:
            raise InputError(f"{where}: byte ids must be an integer tensor, got dtype {array.dtype}")
        array = array.numpy()
    else:
        array = np.asarray(ids)
        if array.size == 0:
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu":
            raise InputError(f"{where}: byte ids must be integers, got {array.dtype} values")
    if array.ndim != 1:
        raise InputError(f"{where}: byte ids must be 1-D (one sequence), got shape {tuple(array.shape)}")
    bad = (array < 0) | (array >= BYTE_VOCAB)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(f"{where}: id {int(array[first])} at position {first} is outside [0, {BYTE_VOCAB})")
    return array.astype(np.uint8).tobytes()


class Utf8Validator:
    """Checks that bytes fed in pieces (cut anywhere, even inside a character) are valid UTF-8.

    The first bad byte raises ``InputError`` naming ``where``, its byte offset from the start of the stream and
    its line number (1-based).
    """

    def __init__(self, where: str = "input") -> None:
        self.where = where
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._offset = 0  # bytes fed so far
        self._lines = 0  # newlines fed so far (a character cut between pieces never holds one)

    def feed(self, data: bytes, final: bool = False) -> None:
        held = bytes(self._decoder.getstate()[0])  # the start of a character cut at the end of the last piece
        try:
            self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            # exc positions count from the start of held + data
            start = self._offset - len(held) + exc.start
            line = self._lines + 1 + data[: max(0, exc.start - len(held))].count(b"\n")
            bad = (held + data)[exc.start : exc.start + 1]
            what = f"byte 0x{bad[0]:02X}" if bad else "end of data"
            raise InputError(
                f"{self.where}: invalid UTF-8 at byte offset {start} (line {line}): {what} ({exc.reason})"
            ) from None
        self._offset += len(data)
        self._lines += data.count(b"\n")

    def finish(self) -> None:
        """The stream ended: a character cut off at the very end is an error too."""
        self.feed(b"", final=True)


def open_input(path: str, mode: str = "rb"):
    """``open(path, mode)``, with a missing file or a folder reported as ``InputError`` naming the path."""
    try:
        return open(path, mode)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a file") from None


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window must be an int >= 1 (bytes per window), got {window!r}")
    return window


@register_adapter
class ByteAdapter(TokenAdapter):
    """Bytes as tokens 0..255 (MambaByte). ``utf8=True``: inputs must be valid UTF-8 text (checked on encode,
    read, iter_windows, write and source), for text corpora where a stray binary byte is a data error."""

    name = "bytes"
    metric_name = "bits_per_byte"

    def __init__(self, utf8: bool = False) -> None:
        if not isinstance(utf8, bool):
            raise ConfigError(f"ByteAdapter.utf8 must be True or False, got {utf8!r}")
        self.utf8 = utf8

    def settings(self) -> dict[str, Any]:
        return {"utf8": self.utf8}

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=BYTE_VOCAB)

    def uniform_baseline(self) -> float:
        return math.log2(BYTE_VOCAB)  # 8.0

    # -- values <-> ids ------------------------------------------------------------------------------------
    def _checked(self, data: bytes, where: str) -> bytes:
        if self.utf8:
            validator = Utf8Validator(where)
            validator.feed(data)
            validator.finish()
        return data

    def encode(self, raw) -> torch.Tensor:
        """``str`` (UTF-8) or bytes-like -> 1-D int64 ids in [0, 256), one per byte."""
        return bytes_to_ids(self._checked(to_bytes(raw), "encode"))

    def decode(self, tensor) -> bytes:
        """Ids (1-D tensor, numpy array or list of ints) -> the exact bytes. Ids outside [0, 256) raise."""
        return ids_to_bytes(tensor, "decode")

    def decode_text(self, tensor, errors: str = "replace") -> str:
        """Ids -> ``str``: UTF-8 with ``errors`` ("replace": bad bytes become U+FFFD, never an exception;
        "strict": raise ``InputError`` at the first bad byte)."""
        data = ids_to_bytes(tensor, "decode_text")
        if errors == "strict":
            validator = Utf8Validator("decode_text")
            validator.feed(data)
            validator.finish()
        return data.decode("utf-8", errors=errors)

    # -- files ---------------------------------------------------------------------------------------------
    def read(self, path: str | os.PathLike, **options) -> bytes:
        """The whole file's bytes. An empty file raises ``InputError``."""
        path = os.fspath(path)
        with open_input(path) as handle:
            data = handle.read()
        if not data:
            raise InputError(f"{path}: file is empty (0 bytes): nothing to encode")
        return self._checked(data, path)

    def read_text(self, path: str | os.PathLike) -> str:
        """The whole file as text; bytes that are not UTF-8 raise ``InputError`` naming offset and line."""
        path = os.fspath(path)
        data = self.read(path)
        Utf8Validator(path).feed(data, final=True)
        return data.decode("utf-8")

    def iter_windows(self, path: str | os.PathLike, window: int, **options) -> Iterator[torch.Tensor]:
        """Ids of the file ``window`` bytes at a time (the last window may be shorter); one window in memory."""
        window = _check_window(window)
        path = os.fspath(path)
        return self._windows(path, window)

    def _windows(self, path: str, window: int) -> Iterator[torch.Tensor]:
        validator = Utf8Validator(path) if self.utf8 else None
        with open_input(path) as handle:
            first = True
            while True:
                chunk = handle.read(window)
                if not chunk:
                    if first:
                        raise InputError(f"{path}: file is empty (0 bytes): nothing to encode")
                    break
                first = False
                if validator is not None:
                    validator.feed(chunk)
                    if len(chunk) < window:
                        validator.finish()
                yield bytes_to_ids(chunk)
        if validator is not None:
            validator.finish()

    def write(self, path: str | os.PathLike, raw) -> None:
        """Write bytes (or a str as UTF-8, or byte ids) to ``path`` atomically. Empty data raises."""
        path = os.fspath(path)
        if isinstance(raw, (str, bytes, bytearray, memoryview)):
            data = to_bytes(raw, path)
        else:
            data = ids_to_bytes(raw, path)
        if not data:
            raise InputError(f"{path}: refusing to write an empty file (reading it back would fail)")
        atomic_write_bytes(path, self._checked(data, path))

    # -- training ------------------------------------------------------------------------------------------
    def map_file(self, path: str | os.PathLike):
        """The file's bytes (its ids) as a read-only ``np.memmap`` (never read whole; a ``utf8`` adapter checks
        the file first, 1 MiB at a time), or None for an empty file (``iter_windows`` refuses it)."""
        where = os.fspath(path)
        open_input(where).close()
        if os.path.getsize(where) == 0:
            return None
        array = np.memmap(where, dtype=np.uint8, mode="r")
        if self.utf8:
            validator = Utf8Validator(where)
            for i in range(0, array.shape[0], _VALIDATE_CHUNK):
                validator.feed(array[i : i + _VALIDATE_CHUNK].tobytes())
            validator.finish()
        return array

    def split_point(self, data, index: int) -> int:
        """``index``, moved back to the start of a character when ``utf8`` (a held-out part never starts inside
        one)."""
        if self.utf8:
            while 0 < index < data.shape[0] and 0x80 <= int(data[index]) < 0xC0:
                index -= 1
        return index

    def source(self, data, batch_size: int, window: int, *, start: int = 0, stop: int | None = None):
        """A ``seqlab.train.SequenceSource`` of byte ids for ``Trainer``.

        ``data``: a path (``str`` or ``os.PathLike``; the file is memory-mapped, never read whole), bytes-like
        (pass text as ``text.encode()``), or encoded ids (a tensor, or a numpy array such as ``map_file``'s).
        ``start``/``stop``: the byte range to use (e.g. the last 10% as a held-out split). A ``utf8`` adapter
        checks the range of a path or bytes first, 1 MiB at a time (ids were checked where they were encoded).
        """
        from seqlab.windows import SequenceSource

        if isinstance(data, (str, os.PathLike)):
            where = os.fspath(data)
            open_input(where).close()
            if os.path.getsize(where) == 0:
                raise InputError(f"{where}: file is empty (0 bytes): nothing to train on")
            array = np.memmap(where, dtype=np.uint8, mode="r")
        elif isinstance(data, (np.ndarray, torch.Tensor)):
            where, array = "source ids", data
        else:
            where = "source data"
            array = np.frombuffer(to_bytes(data, where), dtype=np.uint8)
        for name, value in (("start", start), ("stop", stop)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an int byte offset, got {value!r}")
        array = array[start:stop]
        if self.utf8 and where != "source ids":
            validator = Utf8Validator(where if not start else f"{where} (from byte {start})")
            for i in range(0, array.shape[0], _VALIDATE_CHUNK):
                validator.feed(array[i : i + _VALIDATE_CHUNK].tobytes())
            validator.finish()
        try:
            return SequenceSource(array, batch_size, window)
        except InputError as exc:
            raise InputError(f"{where} (bytes {start}:{stop}): {exc}") from None
