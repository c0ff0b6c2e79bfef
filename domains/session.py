"""Persistent agent memory sessions: a model's recurrent state over a memory stream, kept on disk crash-safely.

A session directory holds::

    <dir>/session.json                   model fingerprint + config, adapter settings, model file (path, sha256)
    <dir>/snapshot-00000003.safetensors  numbered snapshots: state tensors + next-byte logits, JSON metadata
    <dir>/log-00000003.wal               write-ahead log of the events observed after snapshot 3
    <dir>/lock                           fcntl.flock'ed by the one writer (the OS drops it when the writer dies)
    <dir>/rollback.json                  only while a rollback is under way (finished by the next writer)
    <dir>/repair.log, damaged-<time>/    only after a repair: what it did, and the original bytes it replaced

The logs are the truth and the snapshots a cache: the current state is the newest snapshot with every later log
replayed in order, and the logs (all of them, never pruned) hold every event. ``observe`` appends the events to
the log (one self-verifying record: magic, length, sha256 of the payload, CRC-32 of that header; fsynced)
*before* it advances the state, so every event ``observe`` has returned for survives a crash. Only a final record
whose verified header declares more bytes than the file holds (or a partial header at the very end) is a torn
write; it was never acknowledged, and only a writer drops it. Any other damage (a checksum that fails, a record
missing from the chain) makes ``open`` raise ``CorruptFileError`` naming the file and byte, for readers and
writers alike, and changes nothing; ``MemorySession.repair`` keeps every verifiable event and moves the damaged
bytes aside. Events are fed to the model one event per forward call on the running state, whatever the
grouping of ``observe`` calls, so observing A then B gives bit for bit the state of observing A + B at once, and
replaying the log repeats exactly the calls of the original run (the replay is ``seqlab.streaming.stream_pieces``
with one event per piece). See docs/agent-memory.md.

The jobs are split by file: ``session_files`` (the folder: names, session.json, the lock, the rollback intent, the
recorded model file), ``session_log`` (the write-ahead log format and the chain of logs), ``session_snapshots``
(snapshots, pruning, log merging, rollback, new folders), ``session_replay`` (the state from the files),
``session_queries`` (``ask``, ``score``) and ``session_repair``; this module holds ``MemorySession`` and keeps the
public names (``from seqlab.domains.session import MemorySession, replay_state, ...``).
"""

from __future__ import annotations

import errno
import os
import time as _time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seqlab.errors import ConfigError, CorruptFileError, InputError, SessionLockedError, StateError
from seqlab.state import RecurrentState

from .memory import Event, MemoryStreamAdapter
from .session_files import (  # noqa: F401
    _LOG,
    _SESSION_FILE,
    _SNAPSHOT,
    FORMAT_VERSION,
    SESSION_FORMAT,
    SESSION_VERSION,
    _acquire_lock,
    _advice,
    _check_keep,
    _check_timeout,
    _clean_temp_files,
    _json_checksum,
    _listing,
    _pending_rollback,
    _read_meta,
    _read_session_meta,
    _release_lock,
    _require_writable,
    _snapshot_name,
    _write_rollback_intent,
    model_for_session,
)
from .session_log import LOG_FORMAT, LOG_VERSION, _append, _frame, _open_writer_log, _read_events  # noqa: F401
from .session_queries import Answer, Score, _reply, _score
from .session_repair import _repair
from .session_replay import _advance, _load_view, replay_state

# save() reads MERGE_LOGS_AT and _write_snapshot from this module (tests set them here)
from .session_snapshots import (  # noqa: F401
    MERGE_LOGS_AT,
    SNAPSHOT_FORMAT,
    SNAPSHOT_VERSION,
    _create_session,
    _finish_rollback,
    _list_snapshots,
    _merge_logs,
    _place_new_session,
    _prune,
    _read_snapshot,
    _write_snapshot,
)

__all__ = ["Answer", "DEFAULT_KEEP_SNAPSHOTS", "MemorySession", "Score", "SessionLockedError", "replay_state"]

#: snapshots kept by default besides snapshot 0 (the logs are always kept whole)
DEFAULT_KEEP_SNAPSHOTS = 8


class MemorySession:
    """An agent's memory: a model state that has read every observed event, persisted in a directory.

    Open with ``MemorySession.open(path, model, create=True)`` (a writer, holding the session's lock) or
    ``mode="r"`` (a reader: a consistent view of the last acknowledged events, no lock, no writes).
    """

    def __init__(self) -> None:  # use MemorySession.open
        raise TypeError("use MemorySession.open(path, model, ...)")

    @classmethod
    def _bare(cls, path: Path, mode: str) -> MemorySession:
        self = object.__new__(cls)
        self.path, self.mode = path, mode
        self._lock_fd = None
        self._log_handle = None
        self._closed = False
        return self

    # ------------------------------------------------------------------------------------------------
    # opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model,
        *,
        create: bool = False,
        mode: str = "w",
        timeout: float | None = None,
        model_file: str | os.PathLike | None = None,
        adapter: MemoryStreamAdapter | None = None,
        keep_snapshots: int | None = DEFAULT_KEEP_SNAPSHOTS,
    ) -> MemorySession:
        """Open (or with ``create=True`` make) the session at ``path`` for ``model``.

        ``mode="w"``: the one writer; a second writer gets ``SessionLockedError`` at once, or after waiting up to
        ``timeout`` seconds. ``mode="r"``: read-only (``ask``, ``score``, ``info``, ``fork``). ``model_file``: the
        model's ``save_model`` file, recorded with its sha256 at creation so that the CLI can find the model.
        ``keep_snapshots``: how many of the newest snapshots ``save`` keeps (besides snapshot 0; None: all).
        A session of another model raises ``StateMismatchError``; a newer format ``FormatVersionError``; a
        damaged file ``CorruptFileError`` naming the file and byte (nothing on disk is changed then; see
        ``repair``); a folder a writer cannot write ``PermissionError`` before anything is logged.
        """
        if mode not in ("r", "w"):
            raise ConfigError(f"mode must be 'r' or 'w', got {mode!r}")
        _check_timeout(timeout)
        _check_keep(keep_snapshots, "keep_snapshots")
        path = Path(path)
        adapter = adapter or MemoryStreamAdapter()
        if not isinstance(adapter, MemoryStreamAdapter):
            raise ConfigError(f"adapter must be a MemoryStreamAdapter, got {type(adapter).__name__}")
        if getattr(model.config, "bidirectional", False):
            raise StateError("a bidirectional model has no running state: a memory session needs a causal model")
        if not (path / _SESSION_FILE).exists():
            if not create:
                if path.exists() and not path.is_dir():
                    raise CorruptFileError(f"{path}: not a session directory")
                raise _advice(
                    FileNotFoundError,
                    "no memory session here",
                    "pass create=True to make one",
                    "give --create and --model FILE to make one",
                    code=errno.ENOENT,
                    filename=path,
                )
            if mode == "r":
                raise ConfigError(f"{path}: cannot create a session read-only (mode='r')")
            _create_session(path, model, adapter, model_file)
        self = cls._bare(path, mode)
        self.model, self.adapter, self.keep_snapshots = model, adapter, keep_snapshots
        try:
            self.meta = _read_session_meta(path, model, adapter)
            if mode == "w":
                _require_writable(path)
                self._lock_fd = _acquire_lock(path, timeout)
                _clean_temp_files(path)
            self._load()
        except BaseException:
            self.close()
            raise
        return self

    # ------------------------------------------------------------------------------------------------
    # loading and recovery
    def _load(self) -> None:
        """Newest snapshot + the logs after it replayed (``session_replay``); a writer also opens its log."""
        view = _load_view(self.path, self.meta, self.model, self.adapter, writer=self.mode == "w")
        if view.log_handle is not None:
            self._log_handle, self.meta = view.log_handle, view.meta
        self._state, self._logits, self._events, self._lost = view.state, view.logits, view.events, view.lost
        self._snapshot, self._snapshot_events, self._top = view.snapshot, view.snapshot_events, view.top

    # ------------------------------------------------------------------------------------------------
    # the memory
    def _require_writer(self, what: str) -> None:
        self._require_open()
        if self.mode != "w":
            raise StateError(f"{self.path}: {what} needs a session opened for writing (this one is read-only)")

    def _require_open(self) -> None:
        if self._closed:
            raise StateError(f"{self.path}: the session is closed")

    @property
    def state(self) -> RecurrentState:
        """A copy of the current state (the session's own is never handed out)."""
        self._require_open()
        return self._state.clone()

    @property
    def position(self) -> int:
        return self._state.position

    @property
    def event_count(self) -> int:
        return self._events

    def observe(self, events: Event | Iterable[Event]) -> int:
        """Log ``events`` (fsynced) and advance the state over them; returns the number of events observed so
        far. Once this returns, the events survive a crash."""
        self._require_writer("observe")
        events = [events] if isinstance(events, Event) else list(events)
        for i, event in enumerate(events):
            if not isinstance(event, Event):
                raise InputError(f"events[{i}] is a {type(event).__name__}, expected an Event")
            self.adapter.encode(event)  # refuse a bad event before anything is logged
        if not events:
            return self._events
        try:
            _append(self._log_handle, self._events, events)
        except BaseException:
            self._recover()
            raise
        try:
            state, logits = _advance(self.model, self.adapter, self._state, events)
        except BaseException:
            self._recover()  # the log is ahead of the state: replay it
            raise
        self._state, self._logits = state, logits
        self._events += len(events)
        return self._events

    def _recover(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        self._load()

    def ask(
        self,
        prompt: str | Event | Sequence[Event] | None = None,
        max_new_tokens: int = 256,
        *,
        role: str = "assistant",
        prompt_role: str = "user",
        time=None,
        metadata: dict | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        allow_specials: bool = False,
    ) -> Answer:
        """Generate the next event of ``role`` on a copy of the state; the session does not change.

        ``prompt``: text (an event of ``prompt_role`` at ``time``), an Event or events read first, or None.
        ``time``: the time of the prompt and reply events (None: now). Sampling options as ``model.generate``;
        ``temperature=0`` is greedy. The reply is generated from what the adapter decodes as content (the event
        framing bytes are never sampled unless ``allow_specials=True``) and stops at the end-of-event byte.
        Observe the prompt and ``answer.event`` to make them part of the memory.
        """
        self._require_open()
        return _reply(
            self.model,
            self.adapter,
            self._state.clone(),
            prompt,
            max_new_tokens,
            role=role,
            prompt_role=prompt_role,
            time=time,
            metadata=metadata,
            allow_specials=allow_specials,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )

    def score(self, text: str | bytes | Event | Sequence[Event]) -> Score:
        """Bits the model needs for ``text`` (raw UTF-8 / bytes, or encoded events) right after the memory.

        Works on a copy of the state. The first byte is predicted from the last observed event; in a session
        that has observed nothing yet, the first byte has no prediction and is not scored.
        """
        self._require_open()
        return _score(self.model, self.adapter, self._state.clone(), self._logits, text)

    # ------------------------------------------------------------------------------------------------
    # snapshots
    def save(self) -> int:
        """Write the current state as the next numbered snapshot (atomically, with checksums) and start its log;
        then keep only the newest ``keep_snapshots`` snapshots (and snapshot 0). Returns the snapshot number;
        when nothing was observed since the last snapshot, that one's number."""
        self._require_writer("save")
        if self._events == self._snapshot_events:
            return self._snapshot
        n = self._top + 1
        # the new log first: until its snapshot exists, the state is the older snapshot with the logs replayed
        handle, _ = _open_writer_log(self.path, n, None, self._events, self.meta)
        self._log_handle.close()
        self._log_handle = handle
        self._top = n
        _write_snapshot(self.path / _snapshot_name(n), self._state, self._logits, self._events, self.meta)
        self._snapshot, self._snapshot_events = n, self._events
        if self.keep_snapshots is not None:
            _prune(self.path, self._snapshot, self.keep_snapshots)
        _merge_logs(self.path, self._snapshot, MERGE_LOGS_AT)
        return n

    def compact(self, keep: int | None = None) -> dict[str, Any]:
        """Delete all snapshots but snapshot 0 and the newest ``keep`` (default: this session's
        ``keep_snapshots``, else 8), and the temporary files of writes a crash interrupted. The logs are kept
        whole, so no event is lost: a pruned snapshot only means ``rollback`` cannot return to it."""
        self._require_writer("compact")
        keep = _check_keep(keep, "keep")
        if keep is None:
            keep = self.keep_snapshots if self.keep_snapshots is not None else DEFAULT_KEEP_SNAPSHOTS
        sizes = {n: (self.path / _snapshot_name(n)).stat().st_size for n in _listing(self.path)[0]}
        removed = _prune(self.path, self._snapshot, keep)
        merged = _merge_logs(self.path, self._snapshot, 2, everything=True)
        temp = _clean_temp_files(self.path)
        return {
            "removed_snapshots": removed,
            "kept_snapshots": _listing(self.path)[0],
            "merged_logs": merged,
            "removed_temp_files": temp,
            "bytes_freed": sum(sizes[n] for n in removed),
        }

    def snapshots(self) -> list[dict]:
        """Each snapshot: ``{"number", "events", "position", "bytes"}`` (oldest first)."""
        self._require_open()
        return _list_snapshots(self.path, _pending_rollback(self.path))

    def rollback(self, n: int) -> None:
        """Return to snapshot ``n``: later snapshots and every event observed after snapshot ``n`` are dropped.

        Crash-safe: the intent is written first (``rollback.json``) and the next writer finishes it."""
        self._require_writer("rollback")
        if isinstance(n, bool) or not isinstance(n, int):
            raise InputError(f"snapshot number must be an int, got {n!r}")
        snaps = _listing(self.path)[0]
        if n not in snaps:
            raise InputError(f"{self.path}: no snapshot {n} (there are {snaps})")
        _read_snapshot(self.path, n, self.model, self.adapter)  # refuse a damaged target before touching anything
        _write_rollback_intent(self.path, n)
        self._log_handle.close()
        self._log_handle = None
        _finish_rollback(self.path, n, self.meta)
        self._load()

    def fork(self, path: str | os.PathLike) -> MemorySession:
        """A new session at ``path`` starting from this one's current state (its snapshot 0); opened for writing."""
        self._require_open()
        path = Path(path)
        if (path / _SESSION_FILE).exists() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
            raise ConfigError(f"{path}: already exists; fork into a new folder")
        meta = {
            **{k: v for k, v in self.meta.items() if k != "checksum"},
            "created": _time.time(),
            "format_version": SESSION_VERSION,
            "forked_from": {"path": str(self.path.resolve()), "events": self._events},
        }
        meta["checksum"] = _json_checksum(meta)
        _place_new_session(path, meta, self._state, self._logits, self._events)
        return MemorySession.open(path, self.model, adapter=self.adapter, keep_snapshots=self.keep_snapshots)

    def events(self) -> list[Event]:
        """Every event in this session's logs, oldest first. Events before a fork's start are not here
        (``info()["forked_from"]``), nor events a ``repair`` recorded as lost (``info()["lost_events"]``)."""
        self._require_open()
        return _read_events(self.path, _listing(self.path)[1], self._top, self._events)

    def info(self) -> dict[str, Any]:
        """Position, event counts, snapshot, model and sizes on disk (bytes)."""
        self._require_open()
        files = {
            name: (self.path / name).stat().st_size for name in os.listdir(self.path) if (self.path / name).is_file()
        }
        return {
            "path": str(self.path),
            "mode": self.mode,
            "position": self._state.position,
            "events": self._events,
            "unsaved_events": self._events - self._snapshot_events,
            "snapshot": self._snapshot,
            "snapshots": len(_listing(self.path)[0]),
            "keep_snapshots": self.keep_snapshots,
            "log": self._top,
            "lost_events": self._lost,
            "model": {
                "fingerprint": self.meta["fingerprint"],
                "file": self.meta.get("model_file"),
                "config": self.meta.get("config"),
            },
            "adapter": self.meta.get("adapter"),
            "format_version": self.meta.get("format_version"),
            "forked_from": self.meta.get("forked_from"),
            "sizes": {
                "state_bytes": self._state.nbytes(),
                "snapshot_file_bytes": files.get(_snapshot_name(self._snapshot), 0),
                "log_bytes": sum(v for k, v in files.items() if _LOG.fullmatch(k)),
                "snapshots_bytes": sum(v for k, v in files.items() if _SNAPSHOT.fullmatch(k)),
                "total_bytes": sum(files.values()),
            },
        }

    # ------------------------------------------------------------------------------------------------
    # repair

    # ------------------------------------------------------------------------------------------------
    # repair
    @classmethod
    def repair(cls, path: str | os.PathLike, *, timeout: float | None = None) -> dict[str, Any]:
        """Make a damaged session usable again, keeping every event that verifies; never deletes a byte.

        Takes the writer's lock (``timeout`` as in ``open``). Snapshots that do not verify are set aside (the
        state is then replayed from an older one). In the logs after the newest good snapshot (the state's own
        chain), everything from the first record that does not verify on is set aside: the session keeps the
        events before it. In older logs (history the state no longer needs) a damaged stretch is replaced by a
        lost-events record, so the later events and the state stay. The original bytes of every file changed or
        removed go to ``damaged-<UTC time>/`` in the session folder with a ``report.json``; a line is appended
        to ``repair.log``. No model is needed. Returns the report (``{"repaired": False, ...}`` when the session
        was sound). A session.json that does not verify, or no snapshot that does, cannot be repaired here.
        """
        _check_timeout(timeout)
        path = Path(path)
        if not (path / _SESSION_FILE).exists():
            raise FileNotFoundError(errno.ENOENT, "no memory session here", os.fspath(path))
        self = cls._bare(path, "w")
        try:
            self.meta = _read_meta(path)
            _require_writable(path)
            self._lock_fd = _acquire_lock(path, timeout)
            return _repair(path, self.meta)
        finally:
            self.close()

    # ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the lock and the log (unsaved events stay in the log and are replayed by the next open)."""
        if getattr(self, "_log_handle", None) is not None:
            self._log_handle.close()
            self._log_handle = None
        if getattr(self, "_lock_fd", None) is not None:
            _release_lock(self._lock_fd)
            self._lock_fd = None
        self._closed = True

    def __enter__(self) -> MemorySession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MemorySession({str(self.path)!r}, mode={self.mode!r}, events={self._events}, "
            f"position={self._state.position}, snapshot={self._snapshot})"
        )
