"""Repairing a damaged memory session (``MemorySession.repair``): keep every event that verifies, set the damaged
bytes aside in ``damaged-<UTC time>/`` with a report, and leave a session that opens (docs/agent-memory.md,
docs/reliability.md)."""

from __future__ import annotations

import json
import os
import tempfile
import time as _time
from pathlib import Path
from typing import Any

from seqlab.errors import CorruptFileError, StateMismatchError
from seqlab.io import atomic_write_bytes, fsync_dir

from .session_files import (
    _REPAIR_LOG,
    _ROLLBACK_FILE,
    _first_event,
    _listing,
    _log_name,
    _pending_rollback,
    _snapshot_name,
    _span,
    _write_durable,
)
from .session_log import _frame, _Log, _log_header, _log_records, _parse_log
from .session_snapshots import _finish_rollback, _snapshot_meta


def _repair(path: Path, meta: dict) -> dict[str, Any]:
    """Repair the session at ``path`` (its verified session.json ``meta``; the caller holds the writer's lock).
    Returns the report (``{"repaired": False, ...}`` when the session was sound)."""
    changes: dict[str, bytes | None] = {}  # file name -> its new bytes, or None: set aside (removed)
    notes: list[str] = []
    lost: list[list[int]] = []
    if (path / _ROLLBACK_FILE).exists():
        try:
            target = _pending_rollback(path)
            _finish_rollback(path, target, meta)
            notes.append(f"finished the rollback to snapshot {target} that was under way")
        except (CorruptFileError, FileNotFoundError) as exc:
            changes[_ROLLBACK_FILE] = None
            notes.append(f"{_ROLLBACK_FILE}: {exc}; set aside, no rollback was done")
    snaps, logs = _listing(path)
    snap_events = {}
    for n in snaps:
        try:
            snap_events[n] = _snapshot_meta(path, n, meta)["events"]
        except (CorruptFileError, StateMismatchError) as exc:
            changes[_snapshot_name(n)] = None
            notes.append(f"{_snapshot_name(n)}: {' '.join(str(exc).split())}; set aside")
    if not snap_events:
        raise CorruptFileError(f"{path}: no snapshot verifies, so the session cannot be repaired (nothing was changed)")
    current = max(snap_events)
    top = max([current, *logs])
    parsed = {k: _parse_log(path / _log_name(k)) for k in logs}

    def start_of(j: int) -> int | None:  # where log j must start, as far as anything verified says
        if j in snap_events:
            return snap_events[j]
        log = parsed.get(j)
        return log.start if log is not None and log.start is not None else None

    def rebuilt(
        k: int, log: _Log | None, first: int, limit: int | None, allow_lost: bool, through: int | None = None
    ) -> tuple[bytes, int]:
        records, end = [], first
        for record in _log_records(log) if log is not None and log.start is not None else []:
            if "lost" in record:
                a, b = record["lost"]
                if not allow_lost or a != end or (limit is not None and b > limit):
                    break
                end = b
            else:
                a, b = record["first"], record["first"] + len(record["events"])
                if a != end or (limit is not None and b > limit):
                    break
                end = b
            records.append(record)
        if limit is not None and limit > end:
            records.append({"lost": [end, limit]})
            lost.append([end, limit])
        return b"".join(_frame(r) for r in [_log_header(k, first, meta, through), *records]), end

    def why(log: _Log | None) -> str:
        if log is None:
            return "missing"
        if log.problem():
            return f"byte {log.damage[0]}: {log.damage[1]}"
        if log.torn:
            return f"byte {log.valid}: a record is cut short"
        return "does not follow the log before it"

    # history (logs before the newest good snapshot; the state does not depend on them): units of one log
    # each (a merged log stands for its range); a missing range becomes a log of its own with a lost record
    units, nxt = [], 0
    for k in (k for k in logs if k < current):
        log = parsed[k]
        if k < nxt:
            changes[_log_name(k)] = None
            notes.append(f"{_log_name(k)}: inside a merged log's range (its events are there); set aside")
            continue
        if k > nxt:
            units.append((nxt, k - 1, None))
        through = log.through if log.through is not None and log.start is not None else k
        units.append((k, min(max(through, k), current - 1), log))
        nxt = units[-1][1] + 1
    if nxt < current:
        units.append((nxt, current - 1, None))
    expected = _first_event(meta)
    for i, (k, through, log) in enumerate(units):
        name = _log_name(k)
        following = next(s for j in [u[0] for u in units[i + 1 :]] + [current] if (s := start_of(j)) is not None)
        if following < expected:
            raise CorruptFileError(
                f"{path / name}: the logs claim overlapping events ({expected} and "
                f"{following}); cannot repair this automatically (nothing was changed)"
            )
        if (
            log is not None
            and log.problem() is None
            and not log.torn
            and log.start == expected
            and log.end == following
            and log.header.get("snapshot") == k
            and log.through == through
        ):
            expected = following
            continue
        changes[name], end = rebuilt(k, log, expected, following, True, through)
        notes.append(
            f"{name}: {why(log)}; kept {_span(expected, end)}"
            + (f", recorded {_span(end, following)} as lost" if following > end else "")
        )
        expected = following
    # the state's own chain: snapshot `current`, its log and the logs after it, one log per number
    expected = snap_events[current]
    for k in range(current, top + 1):
        name, log = _log_name(k), parsed.get(k)
        if log is None:
            if k == current:
                changes[name] = _frame(_log_header(k, expected, meta))
                notes.append(f"{name}: missing; started it empty (any events logged after snapshot {k} are gone)")
            later = [j for j in logs if j > k]
            for j in later:
                changes[_log_name(j)] = None
                notes.append(f"{_log_name(j)}: follows the missing {name}; set aside")
            break
        if (
            log.problem() is None
            and not log.torn
            and log.start == expected
            and not log.lost
            and log.header.get("snapshot") == k
            and log.through == k
        ):
            expected = log.end
            continue
        changes[name], end = rebuilt(k, log, expected, None, False)
        notes.append(f"{name}: {why(log)}; kept {_span(expected, end)} of it, set the rest aside")
        for j in (j for j in logs if j > k):
            changes[_log_name(j)] = None
            notes.append(f"{_log_name(j)}: follows the damage in {name}; set aside")
        expected = end
        break
    report: dict[str, Any] = {
        "session": str(path),
        "repaired": bool(changes),
        "events": expected,
        "snapshot": current,
        "lost_events": lost,
        "notes": notes,
        "rewritten": sorted(n for n, d in changes.items() if d is not None),
        "set_aside": sorted(n for n, d in changes.items() if d is None),
        "aside": None,
        "time": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime()),
    }
    if not changes:
        return report
    # 1. every original byte goes aside first (a folder renamed into place whole), 2. then the session changes
    stamp = _time.strftime("%Y%m%dT%H%M%SZ", _time.gmtime())
    aside, i = f"damaged-{stamp}", 1
    while (path / aside).exists():
        i += 1
        aside = f"damaged-{stamp}-{i}"
    report["aside"] = aside
    tmp = Path(tempfile.mkdtemp(prefix=".damaged-", suffix=".new", dir=path))
    for name in changes:
        if (path / name).exists():
            _write_durable(tmp / name, (path / name).read_bytes())
    _write_durable(tmp / "report.json", json.dumps(report, indent=1).encode())
    fsync_dir(tmp)
    os.rename(tmp, path / aside)
    fsync_dir(path)
    for name in sorted((n for n, d in changes.items() if d is None), reverse=True):
        (path / name).unlink(missing_ok=True)
    fsync_dir(path)
    for name in sorted(n for n, d in changes.items() if d is not None):
        atomic_write_bytes(path / name, changes[name])
    with open(path / _REPAIR_LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(report, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return report
