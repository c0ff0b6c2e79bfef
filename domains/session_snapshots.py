"""A memory session's snapshots (``snapshot-<n>.safetensors``: the state, the next-byte logits and checksummed
JSON metadata) and what keeps the folder small and consistent: pruning old snapshots, merging old logs
(compaction), finishing a rollback, and placing a new session folder (create, fork)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time as _time
from pathlib import Path

import torch

from seqlab.errors import ConfigError, CorruptFileError, StateMismatchError
from seqlab.io import atomic_write_bytes, fsync_dir
from seqlab.safetensors_io import read_tensors, write_tensors
from seqlab.state import RecurrentState, require_fingerprint

from .session_files import (
    _LOCK_FILE,
    _ROLLBACK_FILE,
    _SESSION_FILE,
    SESSION_FORMAT,
    SESSION_VERSION,
    _damaged,
    _file_sha256,
    _json_checksum,
    _listing,
    _log_name,
    _snapshot_name,
    _write_session_file,
)
from .session_log import LOG_VERSION, _frame, _log_header, _log_records, _parse_log

SNAPSHOT_FORMAT = "seqlab.memory_session.snapshot"
SNAPSHOT_VERSION = 1
#: ``save`` merges the logs older than every kept snapshot into one file once this many have gathered
MERGE_LOGS_AT = 64
_NEXT_LOGITS = "next_logits"


def _snapshot_meta_body(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("fingerprint", "adapter", "position", "events", "layers", "model_file")}


def _write_snapshot(where: Path, state: RecurrentState, logits, events: int, session_meta: dict) -> None:
    tensors = dict(state.tensors())
    if logits is not None:
        tensors[_NEXT_LOGITS] = logits
    meta = {
        "fingerprint": state.fingerprint,
        "adapter": session_meta["adapter"],
        "position": int(state.position),
        "events": int(events),
        "layers": [sorted(layer) for layer in state.layers],
        "model_file": session_meta.get("model_file"),
    }
    meta["meta_checksum"] = _json_checksum(_snapshot_meta_body(meta))
    write_tensors(where, tensors, kind=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION, meta=meta)


def _snapshot_meta(path: Path, n: int, session_meta: dict) -> dict:
    """The metadata of snapshot ``n``, verified against session.json (no model needed)."""
    where = path / _snapshot_name(n)
    _, meta = read_tensors(where, kind=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION)
    if meta.get("meta_checksum") != _json_checksum(_snapshot_meta_body(meta)):
        raise CorruptFileError(f"{where}: metadata checksum mismatch, the file was altered or damaged")
    if meta.get("fingerprint") != session_meta.get("fingerprint") or meta.get("adapter") != session_meta.get("adapter"):
        raise StateMismatchError(f"{where}: made by another model or adapter than {path / _SESSION_FILE}")
    if type(meta.get("events")) is not int or meta["events"] < 0:
        raise CorruptFileError(f"{where}: events {meta.get('events')!r} is not an event count")
    return meta


def _read_snapshot(path: Path, n: int, model, adapter):
    """Snapshot ``n`` as ``(state, next-byte logits or None, events)`` on the model's device, checked against
    ``model`` (fingerprint, layers and shapes) and ``adapter``."""
    where = path / _snapshot_name(n)
    tensors, meta = read_tensors(where, kind=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION)
    if meta.get("meta_checksum") != _json_checksum(_snapshot_meta_body(meta)):
        raise CorruptFileError(f"{where}: metadata checksum mismatch, the file was altered or damaged")
    require_fingerprint(meta.get("fingerprint"), model, "snapshot", str(where))
    if meta.get("adapter") != adapter.info():
        raise StateMismatchError(
            f"{where}: snapshot was made with adapter {meta.get('adapter')}, this session uses {adapter.info()}"
        )
    try:
        layers = [{name: tensors[f"layers.{i}.{name}"] for name in names} for i, names in enumerate(meta["layers"])]
        position, events = int(meta["position"]), int(meta["events"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{where}: snapshot metadata does not match its tensors ({exc})") from None
    expected = model.init_state(1, device="meta")
    if len(layers) != len(expected.layers):
        raise CorruptFileError(f"{where}: {len(layers)} layers stored, the model has {len(expected.layers)}")
    for i, (have, want) in enumerate(zip(layers, expected.layers)):
        for name, tensor in want.items():
            if name not in have or have[name].shape != tensor.shape:
                raise CorruptFileError(f"{where}: layers.{i}.{name} has the wrong shape or is missing")
    device = _model_device(model)
    state = RecurrentState(layers, position, meta["fingerprint"]).to(device)
    logits = tensors.get(_NEXT_LOGITS)
    return state, None if logits is None else logits.to(device), events


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _list_snapshots(path: Path, rolled_back_to: int | None) -> list[dict]:
    """Each snapshot: ``{"number", "events", "position", "bytes"}`` (oldest first); those a rollback under way
    to ``rolled_back_to`` drops are left out."""
    out = []
    for n in _listing(path)[0]:
        if rolled_back_to is not None and n > rolled_back_to:
            continue
        where = path / _snapshot_name(n)
        _, meta = read_tensors(where, kind=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION)
        out.append(
            {"number": n, "events": meta.get("events"), "position": meta.get("position"), "bytes": where.stat().st_size}
        )
    return out


def _prune(path: Path, current: int, keep: int) -> list[int]:
    """Delete every snapshot but 0, ``current`` and the newest ``keep``; returns the numbers deleted."""
    snaps = _listing(path)[0]
    kept = {0, current, *snaps[-keep:]}
    removed = [n for n in snaps if n not in kept]
    for n in removed:
        (path / _snapshot_name(n)).unlink(missing_ok=True)
    if removed:
        fsync_dir(path)
    return removed


def _merge_logs(path: Path, current: int, least: int, everything: bool = False) -> list[list[int]]:
    """Merge runs of logs older than every kept snapshot but 0 (and ``current``) into one log each (its header
    says ``through``); returns the merged ``[first, last]`` log-number ranges. ``save`` merges the single logs
    once ``least`` have gathered (a listing tells them: a merged log k is followed by its through + 1, a single
    one by k + 1); ``everything`` (``compact``) merges all of them, merged ones too, into one.

    Every event stays: the merged log is written (atomically, the verified records copied) before the logs it
    replaces are removed; a crash in between leaves them as leftovers that readers skip and writers delete."""
    snaps, logs = _listing(path)
    floor = min([n for n in snaps if n > 0] + [current])
    present = set(logs)
    if everything:
        candidates = [k for k in logs if k < floor]
    else:
        candidates = [k for k in logs if k < floor and k + 1 in present]
        if len(candidates) < least:
            return []
    parsed, nxt = [], 0
    for k in candidates:
        if k < nxt:
            continue  # a leftover (the writer deletes those when it opens)
        log = _parse_log(path / _log_name(k))
        if log.problem() or log.torn:
            raise _damaged(log.problem() or f"{log.path}: byte {log.valid}: a record is cut short")
        parsed.append((k, log))
        nxt = log.through + 1
    runs, run = [], []
    for k, log in parsed:
        if run and (k != run[-1][1].through + 1 or run[-1][1].end != log.start):
            runs.append(run)
            run = []
        run.append((k, log))
    runs.append(run)
    merged = []
    for run in (r for r in runs if len(r) >= 2):
        first, last = run[0], run[-1]
        header = {**first[1].header, "format_version": LOG_VERSION, "through": last[1].through}
        records = [r for _, log in run for r in _log_records(log)]
        atomic_write_bytes(path / _log_name(first[0]), b"".join(_frame(r) for r in [header, *records]))
        for k, _ in run[1:]:
            (path / _log_name(k)).unlink(missing_ok=True)
        merged.append([first[0], last[1].through])
    if merged:
        fsync_dir(path)
    return merged


def _finish_rollback(path: Path, n: int, session_meta: dict) -> None:
    """Complete a rollback to snapshot ``n`` whose intent (``rollback.json``) is written: delete the later
    snapshots and the logs from ``n`` on, start log ``n`` empty, then remove the intent."""
    events = _snapshot_meta(path, n, session_meta)["events"]  # refuse a damaged or missing target first
    snaps, logs = _listing(path)
    for m in sorted(set(logs) | set(snaps), reverse=True):
        if m >= n and m in logs:
            (path / _log_name(m)).unlink(missing_ok=True)
        if m > n and m in snaps:
            (path / _snapshot_name(m)).unlink(missing_ok=True)
    fsync_dir(path)
    atomic_write_bytes(path / _log_name(n), _frame(_log_header(n, events, session_meta)))
    (path / _ROLLBACK_FILE).unlink(missing_ok=True)
    fsync_dir(path)


def _place_new_session(
    path: Path, meta: dict, state: RecurrentState, logits, events: int, *, keep_theirs: bool = False
) -> None:
    """Build a whole session in a temporary folder beside ``path`` (snapshot 0 of ``state`` after ``events``
    events, its empty log, the lock file, session.json last) and rename it into place: atomic, so a crash or a
    racing creator never leaves a half-made session. An empty folder at ``path`` is replaced. ``keep_theirs``:
    when another process created ``path`` first, keep theirs (and return) instead of failing."""
    parent = path.parent if str(path.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".new", dir=parent))
    try:
        _write_snapshot(tmp / _snapshot_name(0), state, logits, events, meta)
        atomic_write_bytes(tmp / _log_name(0), _frame(_log_header(0, events, meta)))
        (tmp / _LOCK_FILE).touch()
        _write_session_file(tmp, meta)
        try:
            if path.exists():
                path.rmdir()  # an empty folder the user made for it
            os.rename(tmp, path)
        except OSError as exc:
            if not keep_theirs or exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # another process created it first: the caller opens theirs
        fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _create_session(path: Path, model, adapter, model_file) -> None:
    """Make a new session for ``model`` and ``adapter`` at ``path`` (a missing or empty folder): snapshot 0 of a
    zero state, placed atomically; ``model_file`` is recorded with its sha256. When a racing creator made it
    first, theirs stays."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"cannot create session {path}: the folder does not exist", os.fspath(parent)
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path}: exists and is not a memory session (no {_SESSION_FILE})")
    record = None
    if model_file is not None:
        model_file = Path(model_file).resolve()
        record = {"path": str(model_file), "sha256": _file_sha256(model_file)}
    meta = {
        "format": SESSION_FORMAT,
        "format_version": SESSION_VERSION,
        "fingerprint": model.fingerprint,
        "config": model.config.to_dict(),
        "adapter": adapter.info(),
        "model_file": record,
        "created": _time.time(),
    }
    meta["checksum"] = _json_checksum(meta)
    _place_new_session(path, meta, model.init_state(1), None, 0, keep_theirs=True)
