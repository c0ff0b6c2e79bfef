"""A memory session's write-ahead logs (``log-<n>.wal``): the record format, reading and verifying a log (torn
tails, damage, format 1), the chain of logs across snapshots, and the writer's log.

A record (format 2) is magic ``SQW2``, the payload length, the SHA-256 of the payload and a CRC-32 of those 40
bytes, then the payload (JSON): the header record first, then event batches ``{"first", "events"}`` and, after a
repair, lost-events records ``{"lost": [a, b]}``. Format 1 (``SQWL``: no header CRC) is still read. Only a final
record whose verified header declares more bytes than the file holds (or a partial header at the very end) is a
torn write; any other damage is reported (``_Log.damage``), never skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from seqlab.errors import FormatVersionError, InputError
from seqlab.io import atomic_write_bytes

from .memory import Event
from .session_files import _damaged, _log_name, _snapshot_name, _upgrade_meta

LOG_FORMAT = "seqlab.memory_session.log"
#: log files: 1 = records b"SQWL" + length + sha256(payload); 2 = b"SQW2" + length + sha256 + CRC-32 of those
LOG_VERSION = 2
_MAGIC_V1 = b"SQWL"
_FRAME_V1 = struct.Struct("<4sI32s")  # magic, payload length, sha256(payload)
_MAGIC = b"SQW2"
_FRAME = struct.Struct("<4sI32sI")  # magic, payload length, sha256(payload), crc32 of the 40 bytes before it


def _frame(payload: dict) -> bytes:
    """One log record (format 2): magic, length, sha256(payload), CRC-32 of those 40 bytes, payload (JSON)."""
    data = json.dumps(payload, ensure_ascii=False, allow_nan=False, sort_keys=True).encode("utf-8")
    head = struct.pack("<4sI32s", _MAGIC, len(data), hashlib.sha256(data).digest())
    return head + struct.pack("<I", zlib.crc32(head)) + data


@dataclass
class _Log:
    """What a log file holds, as far as it verifies. ``damage``: (byte offset, what is wrong) of the first record
    that does not verify, or None; ``torn``: the bytes after ``valid`` are a proven torn final write."""

    path: Path
    size: int = 0
    version: int = LOG_VERSION
    header: dict | None = None
    start: int | None = None  # first event number (from the header)
    through: int | None = None  # the last snapshot number whose events it holds (> its own number once merged)
    end: int | None = None  # event number after the last verified record
    batches: list = field(default_factory=list)  # [(first event number, [Event])]
    lost: list = field(default_factory=list)  # [(first, end)] event ranges a repair recorded as lost
    valid: int = 0
    torn: bool = False
    damage: tuple[int, str] | None = None

    def problem(self) -> str | None:
        if self.damage is not None:
            return f"{self.path}: byte {self.damage[0]}: {self.damage[1]}"
        return None


def _verifies_v1(data: bytes, at: int) -> bool:
    if len(data) - at < _FRAME_V1.size:
        return False
    magic, length, digest = _FRAME_V1.unpack_from(data, at)
    end = at + _FRAME_V1.size + length
    return (
        magic == _MAGIC_V1 and end <= len(data) and hashlib.sha256(data[at + _FRAME_V1.size : end]).digest() == digest
    )


def _parse_log(path: Path) -> _Log:
    """Read and verify a log. Damage is reported in the result, not raised (``_Log.problem``); a log of a newer
    format version raises ``FormatVersionError``."""
    data = path.read_bytes()
    log = _Log(path, size=len(data))
    if data[:4] == _MAGIC_V1:
        log.version, magic, frame = 1, _MAGIC_V1, _FRAME_V1
    elif data[:4] == _MAGIC:
        log.version, magic, frame = 2, _MAGIC, _FRAME
    else:
        log.damage = (0, "not a memory-session log (bad magic)" if data else "empty file (no header record)")
        return log
    records, offset = [], 0
    while offset < len(data):
        rest = len(data) - offset
        if rest < frame.size:  # a partial record header can only be a torn final write if what is there fits
            if data[offset : offset + min(rest, 4)] == magic[: min(rest, 4)]:
                log.torn = True
            else:
                log.damage = (offset, "the bytes after the last record are not a record (bad magic)")
            break
        fields = frame.unpack_from(data, offset)
        if fields[0] != magic:
            log.damage = (offset, "not a log record (bad magic)")
            break
        if log.version == 2 and zlib.crc32(data[offset : offset + 40]) != fields[3]:
            log.damage = (offset, "record header checksum mismatch (its length or checksum field is damaged)")
            break
        end = offset + frame.size + fields[1]
        if end > len(data):
            # version 2: the header checksum proves the length, so the record is torn. Version 1 has no header
            # checksum: it is torn only if no whole record starts inside the span its length claims.
            if log.version == 1 and _v1_record_inside(data, offset + frame.size):
                log.damage = (offset, "record length field is damaged (a whole record follows inside its span)")
            else:
                log.torn = True
            break
        payload = data[offset + frame.size : end]
        if hashlib.sha256(payload).digest() != fields[2]:
            log.damage = (offset, "record checksum mismatch (its contents are damaged)")
            break
        try:
            records.append((offset, json.loads(payload)))
        except ValueError:
            log.damage = (offset, "record is not JSON")
            break
        offset = end
    log.valid = offset
    if not records:
        if log.damage is None:
            log.damage, log.torn = (0, "no complete header record (a log is written whole with its header)"), False
        return log
    header = records[0][1]
    if not isinstance(header, dict) or header.get("format") != LOG_FORMAT:
        log.damage, log.torn, log.valid = (0, f"not a {LOG_FORMAT!r} header record"), False, 0
        return log
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        log.damage, log.torn, log.valid = (0, "format_version is missing or not an integer"), False, 0
        return log
    if version > LOG_VERSION:
        raise FormatVersionError(
            f"{path}: written in {LOG_FORMAT} format version {version}; this seqlab reads up "
            f"to version {LOG_VERSION} (upgrade seqlab)"
        )
    start = header.get("first_event")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        log.damage, log.torn, log.valid = (0, f"header first_event {start!r} is not an event number"), False, 0
        return log
    number, through = header.get("snapshot"), header.get("through", header.get("snapshot"))
    if type(number) is not int or type(through) is not int or not 0 <= number <= through:
        log.damage, log.torn, log.valid = (
            (0, f"header snapshot {number!r} / through {through!r} are not log numbers"),
            False,
            0,
        )
        return log
    log.header, log.start, log.through = header, start, through
    expected = start
    for i, (at, record) in enumerate(records[1:], start=1):
        problem = None
        if isinstance(record, dict) and "lost" in record:
            span = record.get("lost")
            if (
                not isinstance(span, list)
                or len(span) != 2
                or not all(type(v) is int for v in span)
                or span[0] != expected
                or span[1] < span[0]
            ):
                problem = f"record {i} is not a valid lost-events record"
            else:
                log.lost.append((span[0], span[1]))
                expected = span[1]
        else:
            try:
                first = record["first"]
                if type(first) is not int:
                    raise TypeError("'first' is not an integer")
                events = [Event.from_json(e) for e in record["events"]]
            except (KeyError, TypeError, ValueError, InputError) as exc:
                problem = f"record {i} is not an event batch ({exc})"
            else:
                if first != expected:
                    problem = f"record {i} starts at event {first}, expected event {expected}"
                else:
                    log.batches.append((first, events))
                    expected = first + len(events)
        if problem is not None:
            log.damage, log.torn, log.valid = (at, problem), False, at
            break
    log.end = expected
    return log


def _v1_record_inside(data: bytes, since: int) -> bool:
    at = data.find(_MAGIC_V1, since)
    while at >= 0:
        if _verifies_v1(data, at):
            return True
        at = data.find(_MAGIC_V1, at + 1)
    return False


def _log_records(log: _Log) -> list[dict]:
    """The verified records of ``log`` after its header, in format-2 payload form (for rewriting it)."""
    items = [(first, {"first": first, "events": [e.to_json() for e in events]}) for first, events in log.batches]
    items += [(a, {"lost": [a, b]}) for a, b in log.lost]
    return [record for _, record in sorted(items, key=lambda item: (item[0], "lost" in item[1]))]


def _log_header(snapshot: int, first_event: int, meta: dict, through: int | None = None) -> dict:
    header = {
        "format": LOG_FORMAT,
        "format_version": LOG_VERSION,
        "snapshot": snapshot,
        "first_event": first_event,
        "fingerprint": meta["fingerprint"],
    }
    if through is not None and through != snapshot:
        header["through"] = through  # a merged log: it holds the events of logs snapshot..through
    return header


# ------------------------------------------------------------------------------------------------------
# the chain of logs, and the writer's log


def _check_chain(
    path: Path, logs: list[int], top: int, current: int, snapshot_events: int, first_event: int, legacy: bool
) -> tuple[dict[int, _Log], list[int]]:
    """Read and verify every log up to ``top``; they must follow each other event for event (a merged log
    stands for the logs ``snapshot..through``), from ``first_event`` on. Raises on damage. Returns ``({number:
    log}, leftovers)``: leftovers are logs inside a merged log's range (a merge a crash interrupted; their events
    are in it). ``legacy``: a missing log of the newest snapshot ``current`` is a crash, not damage."""
    chain, leftovers = {}, []
    expected, nxt = first_event, 0
    for k in sorted(logs):
        where = path / _log_name(k)
        if k < nxt:
            leftovers.append(k)
            continue
        if k != nxt:
            raise _damaged(f"{path / _log_name(nxt)}: missing (the events it held are gone)")
        log = _parse_log(where)
        if log.problem():
            raise _damaged(log.problem())
        if log.torn and k != top:
            raise _damaged(f"{where}: byte {log.valid}: a record is cut short, but a later log follows")
        if log.header.get("snapshot") != k:
            raise _damaged(f"{where}: its header says log {log.header.get('snapshot')!r}")
        if log.through != k and log.through >= current:
            raise _damaged(f"{where}: a merged log reaching snapshot {current}")
        if log.start != expected:
            raise _damaged(
                f"{where}: starts at event {log.start}, but the log before it ends at event "
                f"{expected} (events are missing or repeated)"
            )
        if k == current and log.start != snapshot_events:
            raise _damaged(
                f"{where}: starts at event {log.start}, but {_snapshot_name(current)} holds {snapshot_events} events"
            )
        if k >= current and log.lost:
            raise _damaged(f"{where}: a lost-events record after the newest snapshot")
        chain[k] = log
        expected, nxt = log.end, log.through + 1
    if current not in chain:
        if nxt != current or not legacy:
            raise _damaged(f"{path / _log_name(nxt)}: missing (the events it held are gone)")
        if expected != snapshot_events:
            raise _damaged(
                f"{path / _snapshot_name(current)}: holds {snapshot_events} events, but the "
                f"logs before it end at event {expected}"
            )
    return chain, leftovers


def _read_events(path: Path, logs: list[int], top: int, count: int) -> list[Event]:
    """The first ``count`` events held by the logs numbered up to ``top`` (each log verified)."""
    out: list[Event] = []
    nxt = 0
    for n in logs:
        if n < nxt or n > top:  # inside a merged log's range, or not part of this view
            continue
        log = _parse_log(path / _log_name(n))
        if log.problem():
            raise _damaged(log.problem())
        out.extend(e for first, batch in log.batches for i, e in enumerate(batch, first) if i < count)
        nxt = log.through + 1
    return out


def _open_writer_log(path: Path, number: int, log: _Log | None, first_event: int, meta: dict):
    """The writer's log ``number``, open for appending: made when missing (starting at ``first_event``), a
    proven torn tail cut off, a format-1 log rewritten as format 2 (session.json upgraded first). Returns
    ``(handle, meta)``: the session metadata, upgraded when it was."""
    where = path / _log_name(number)
    if log is None:
        atomic_write_bytes(where, _frame(_log_header(number, first_event, meta)))
    elif log.version < LOG_VERSION:
        meta = _upgrade_meta(path, meta)
        header = {**log.header, "format_version": LOG_VERSION}
        atomic_write_bytes(where, b"".join(_frame(r) for r in [header, *_log_records(log)]))
    elif log.torn:
        with open(where, "r+b") as handle:  # drop the torn, never-acknowledged last record
            handle.truncate(log.valid)
            handle.flush()
            os.fsync(handle.fileno())
    return open(where, "ab"), meta


def _append(handle, first: int, events: list[Event]) -> None:
    """Append one event batch to the writer's log, flushed and fsynced (after this, the events survive a
    crash)."""
    handle.write(_frame({"first": first, "events": [e.to_json() for e in events]}))
    handle.flush()
    os.fsync(handle.fileno())
