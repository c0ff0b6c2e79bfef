"""Decoding an encoded memory stream fed in pieces cut anywhere (``StreamDecoder``)."""

from __future__ import annotations

import json
import math
import re

from seqlab.errors import ConfigError, InputError

from .events import _MARKER, _ORDER, END, EVENT, Event, _marker_name

__all__ = ["StreamDecoder"]

_TIME_TEXT = re.compile(rb"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


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
        return InputError(
            f"{self.where}: event {self.events} (starting at byte {self.offset}), byte offset "
            f"{self.offset + position}: {message}"
        )

    def _outside(self, buffer: bytearray, start: int) -> InputError:
        return self._error(
            0, f"byte 0x{buffer[start]:02X} outside an event (an event starts with {_marker_name(EVENT)})"
        )

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
                raise self._error(
                    position - start,
                    f"found {_marker_name(byte)} where {_marker_name(expected)} "
                    "was expected" + (" (the event was never closed)" if byte == EVENT else ""),
                )
            self._markers.append(position)
            self._scan = position + 1
            if byte == END:
                done.append(self._parse(bytes(buffer[start : position + 1]), [p - start for p in self._markers]))
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
        time_text = data[t + 1 : m]
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
            raise self._error(
                len(self._buffer),
                f"the stream ends inside an event ({len(self._buffer)} bytes, "
                f"waiting for {_marker_name(expected)}); "
                "decode with partial='drop' to keep the complete events",
            )
