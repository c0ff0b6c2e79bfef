"""The memory event record (``Event``) and its encoding: ``0xF5 role 0xF6 time 0xF7 metadata 0xF8 content 0xF9``
(see the package docstring)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from seqlab.errors import InputError

__all__ = ["CONTENT", "END", "EVENT", "META", "TIME", "Event", "encode_event"]

EVENT, TIME, META, CONTENT, END = 0xF5, 0xF6, 0xF7, 0xF8, 0xF9
_ORDER = (EVENT, TIME, META, CONTENT, END)  # the markers of one event, in order
_MARKER_NAMES = {EVENT: "event start", TIME: "time", META: "metadata", CONTENT: "content", END: "end of event"}
_MARKER = re.compile(rb"[\xf5-\xff]")  # 0xFA..0xFF are reserved: never valid inside a stream
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
        raise InputError(
            f"Event.{field}: character {exc.start} ({value[exc.start]!r}) has no UTF-8 form ({exc.reason})"
        ) from None
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
    raise InputError(
        f"Event.{where} is a {type(value).__name__}: metadata holds only JSON values "
        "(dict with str keys, list, str, int, float, bool, None)"
    )


def _as_timestamp(value) -> float:
    if isinstance(value, bool):
        raise InputError(f"Event.time must be a number of seconds or a datetime, got {value!r}")
    if isinstance(value, (int, float)):
        value = float(value)
    elif isinstance(value, _dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InputError(
                f"Event.time {value.isoformat()} has no time zone: give an aware datetime "
                "(e.g. tzinfo=datetime.timezone.utc)"
            )
        value = value.timestamp()
    elif isinstance(value, str):
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        try:
            parsed = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise InputError(f"Event.time {value!r} is not an ISO-8601 date-time") from None
        return _as_timestamp(parsed)
    else:
        raise InputError(
            f"Event.time must be seconds since the Unix epoch (float), an aware datetime or an "
            f"ISO-8601 string, got {type(value).__name__}"
        )
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
            raise InputError(
                f"event record has missing keys {missing} / unknown keys {unknown}; the keys are "
                "role, content, time and optionally metadata"
            )
        return cls(record["role"], record["content"], record["time"], record.get("metadata"))


def _metadata_bytes(metadata: dict | None) -> bytes:
    if metadata is None:
        return b""
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _header(role: str, time: float, metadata: dict | None) -> bytes:
    return b"".join(
        (
            bytes((EVENT,)),
            role.encode("utf-8"),
            bytes((TIME,)),
            repr(time).encode("ascii"),
            bytes((META,)),
            _metadata_bytes(metadata),
            bytes((CONTENT,)),
        )
    )


def encode_event(event: Event) -> bytes:
    """One event's bytes: ``0xF5 role 0xF6 time 0xF7 metadata 0xF8 content 0xF9``."""
    if not isinstance(event, Event):
        raise InputError(f"expected an Event, got {type(event).__name__}")
    event.__post_init__()  # a dataclass field may have been reassigned since creation
    return _header(event.role, event.time, event.metadata) + event.content.encode("utf-8") + bytes((END,))
