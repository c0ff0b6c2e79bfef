"""Persistent agent memory sessions: a model's recurrent state over a memory stream, kept on disk crash-safely.

A session directory holds::

    <dir>/session.json                 model fingerprint + config, adapter settings, model file (path, sha256)
    <dir>/snapshot-00000003.safetensors  numbered snapshots: state tensors + next-byte logits, JSON metadata
    <dir>/log-00000003.wal             write-ahead log of the events observed after snapshot 3
    <dir>/lock                         fcntl.flock'ed by the one writer (the OS drops it when the writer dies)
    <dir>/rollback.json                only while a rollback is under way (finished by the next writer)

The current state is the newest snapshot plus its log replayed. ``observe`` appends the events to the log
(length-framed, sha256 per record, fsynced) *before* it advances the state, so every event ``observe`` has
returned for survives a crash; a torn last record (the writer died mid-append) was never acknowledged and is
dropped. Events are fed to the model one event per forward call on the running state, whatever the grouping of
``observe`` calls, so observing A then B gives bit for bit the state of observing A + B at once, and replaying
the log repeats exactly the calls of the original run. See docs/agent-memory.md.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from seqlab.errors import (ConfigError, CorruptFileError, FormatVersionError, InputError, SessionLockedError, StateError,
                           StateMismatchError)
from seqlab.io import atomic_write_bytes, fsync_dir
from seqlab.safetensors_io import read_tensors, write_tensors
from seqlab.state import RecurrentState, require_fingerprint

from .memory import Event, MemoryStreamAdapter

__all__ = ["Answer", "MemorySession", "Score", "SessionLockedError", "replay_state"]

SESSION_FORMAT = "seqlab.memory_session"
SNAPSHOT_FORMAT = "seqlab.memory_session.snapshot"
LOG_FORMAT = "seqlab.memory_session.log"
FORMAT_VERSION = 1

_SESSION_FILE = "session.json"
_LOCK_FILE = "lock"
_ROLLBACK_FILE = "rollback.json"
_SNAPSHOT = re.compile(r"snapshot-(\d{8})\.safetensors")
_LOG = re.compile(r"log-(\d{8})\.wal")
_MAGIC = b"SQWL"
_FRAME = struct.Struct("<4sI32s")  # magic, payload length, sha256(payload)
_NEXT_LOGITS = "next_logits"


def _snapshot_name(n: int) -> str:
    return f"snapshot-{n:08d}.safetensors"


def _log_name(n: int) -> str:
    return f"log-{n:08d}.wal"


def _json_checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _frame(payload: dict) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, allow_nan=False, sort_keys=True).encode("utf-8")
    return _FRAME.pack(_MAGIC, len(data), hashlib.sha256(data).digest()) + data


def _read_log(path: Path) -> tuple[dict, list[tuple[int, list[Event]]], int]:
    """(header, [(first event index, events)], length of the valid prefix). A torn last record is dropped."""
    data = path.read_bytes()
    records, offset = [], 0
    while offset < len(data):
        if len(data) - offset < _FRAME.size:
            break  # torn frame header at the tail
        magic, length, digest = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if magic != _MAGIC:
            raise CorruptFileError(f"{path}: byte {offset}: not a log record (bad magic); the log was altered")
        if end > len(data):
            break  # torn payload at the tail: never acknowledged
        payload = data[offset + _FRAME.size:end]
        if hashlib.sha256(payload).digest() != digest:
            if end == len(data):
                break  # the last record was being written when the writer died
            raise CorruptFileError(f"{path}: record at byte {offset}: checksum mismatch, the log was altered")
        try:
            records.append(json.loads(payload))
        except ValueError:
            raise CorruptFileError(f"{path}: record at byte {offset} is not JSON") from None
        offset = end
    if not records:
        raise CorruptFileError(f"{path}: log has no readable header record ({len(data)} bytes)")
    header = records[0]
    if not isinstance(header, dict) or header.get("format") != LOG_FORMAT:
        raise CorruptFileError(f"{path}: not a {LOG_FORMAT!r} file")
    version = header.get("format_version")
    if not isinstance(version, int):
        raise CorruptFileError(f"{path}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise FormatVersionError(f"{path}: written in {LOG_FORMAT} format version {version}; this seqlab reads up "
                                 f"to version {FORMAT_VERSION} (upgrade seqlab)")
    batches = []
    expected = header.get("first_event")
    for i, record in enumerate(records[1:], start=1):
        try:
            first = int(record["first"])
            events = [Event.from_json(e) for e in record["events"]]
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise CorruptFileError(f"{path}: record {i} is not an event batch ({exc})") from None
        if first != expected:
            raise CorruptFileError(f"{path}: record {i} starts at event {first}, expected event {expected}")
        expected = first + len(events)
        batches.append((first, events))
    return header, batches, offset


@torch.no_grad()
def _advance(model, adapter, state: RecurrentState | None, events: Sequence[Event]):
    """Feed ``events`` one event per forward call (the canonical chunking; see the module docstring)."""
    logits = None
    for event in events:
        out = model(adapter.encode(event)[None].to(_device(model)), state)
        state, logits = out.state, out.logits[:, -1].float()
    return state, logits


def _device(model) -> torch.device:
    return next(model.parameters()).device


def replay_state(model, events: Iterable[Event], adapter: MemoryStreamAdapter | None = None) -> RecurrentState:
    """The state a fresh session reaches after observing ``events`` (bit for bit, on the same machine)."""
    adapter = adapter or MemoryStreamAdapter()
    state = model.init_state(1)
    state, _ = _advance(model, adapter, state, list(events))
    return state


@dataclass
class Answer:
    """What ``ask`` generated: the reply ``event``, its raw ``tokens`` and ``stop_reason`` ("stop" or "length")."""

    event: Event
    tokens: list[int]
    stop_reason: str

    @property
    def text(self) -> str:
        return self.event.content


@dataclass
class Score:
    """``bits``: -log2 p of the scored bytes given the memory; ``bytes``: how many were scored."""

    bits: float
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes if self.bytes else float("nan")


class MemorySession:
    """An agent's memory: a model state that has read every observed event, persisted in a directory.

    Open with ``MemorySession.open(path, model, create=True)`` (a writer, holding the session's lock) or
    ``mode="r"`` (a reader: a consistent view of the last acknowledged events, no lock, no writes).
    """

    def __init__(self) -> None:  # use MemorySession.open
        raise TypeError("use MemorySession.open(path, model, ...)")

    # ------------------------------------------------------------------------------------------------
    # opening
    @classmethod
    def open(cls, path: str | os.PathLike, model, *, create: bool = False, mode: str = "w",
             timeout: float | None = None, model_file: str | os.PathLike | None = None,
             adapter: MemoryStreamAdapter | None = None) -> "MemorySession":
        """Open (or with ``create=True`` make) the session at ``path`` for ``model``.

        ``mode="w"``: the one writer; a second writer gets ``SessionLockedError`` at once, or after waiting up to
        ``timeout`` seconds. ``mode="r"``: read-only (``ask``, ``score``, ``info``, ``fork``). ``model_file``: the
        model's ``save_model`` file, recorded with its sha256 at creation so that the CLI can find the model.
        A session of another model raises ``StateMismatchError``; a newer format ``FormatVersionError``; a
        damaged file ``CorruptFileError`` (nothing on disk is changed then).
        """
        if mode not in ("r", "w"):
            raise ConfigError(f"mode must be 'r' or 'w', got {mode!r}")
        if timeout is not None and not timeout >= 0:
            raise ConfigError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
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
                raise FileNotFoundError(f"{path}: no memory session here (pass create=True to make one)")
            if mode == "r":
                raise ConfigError(f"{path}: cannot create a session read-only (mode='r')")
            cls._create(path, model, adapter, model_file)
        self = object.__new__(cls)
        self.path, self.model, self.adapter, self.mode = path, model, adapter, mode
        self._lock_fd = None
        self._log_handle = None
        self._closed = False
        try:
            self.meta = cls._read_session_file(path, model, adapter)
            if mode == "w":
                self._acquire_lock(timeout)
            self._load()
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _create(path: Path, model, adapter: MemoryStreamAdapter, model_file) -> None:
        """Build the new session in a temporary folder and rename it into place (atomic: a crash or a racing
        creator never leaves a half-made session)."""
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(f"cannot create session {path}: folder {parent} does not exist")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"{path}: exists and is not a memory session (no {_SESSION_FILE})")
        record = None
        if model_file is not None:
            model_file = Path(model_file).resolve()
            record = {"path": str(model_file), "sha256": _file_sha256(model_file)}
        meta = {"format": SESSION_FORMAT, "format_version": FORMAT_VERSION, "fingerprint": model.fingerprint,
                "config": model.config.to_dict(), "adapter": adapter.info(), "model_file": record,
                "created": _time.time()}
        meta["checksum"] = _json_checksum(meta)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".new", dir=parent))
        try:
            state = model.init_state(1)
            _write_snapshot(tmp / _snapshot_name(0), state, None, 0, meta)
            atomic_write_bytes(tmp / _log_name(0), _frame(_log_header(0, 0, meta)))
            (tmp / _LOCK_FILE).touch()
            atomic_write_bytes(tmp / _SESSION_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
            try:
                if path.exists():
                    path.rmdir()  # an empty folder the user made for it
                os.rename(tmp, path)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # another process created it first: fall through and open theirs
            fsync_dir(parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _read_session_file(path: Path, model, adapter) -> dict:
        where = path / _SESSION_FILE
        try:
            meta = json.loads(where.read_bytes())
        except ValueError:
            raise CorruptFileError(f"{where}: not JSON (the file was truncated or altered)") from None
        if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT:
            raise CorruptFileError(f"{where}: not a {SESSION_FORMAT!r} file")
        version = meta.get("format_version")
        if not isinstance(version, int):
            raise CorruptFileError(f"{where}: format_version is missing or not an integer")
        if version > FORMAT_VERSION:
            raise FormatVersionError(f"{where}: written in {SESSION_FORMAT} format version {version}; this seqlab "
                                     f"reads up to version {FORMAT_VERSION} (upgrade seqlab)")
        if meta.get("checksum") != _json_checksum(meta):
            raise CorruptFileError(f"{where}: checksum mismatch, the file was altered or damaged")
        require_fingerprint(meta.get("fingerprint"), model, "session", str(where))
        if meta.get("adapter") != adapter.info():
            raise StateMismatchError(f"{where}: session was made with adapter {meta.get('adapter')}, "
                                     f"this one is {adapter.info()}")
        return meta

    def _acquire_lock(self, timeout: float | None) -> None:
        fd = os.open(self.path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout is None else _time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is None or _time.monotonic() >= deadline:
                    os.close(fd)
                    waited = "" if deadline is None else f" (waited {timeout} s)"
                    raise SessionLockedError(
                        f"{self.path}: another process has this session open for writing{waited}; open it with "
                        "mode='r' to read, or pass timeout= to wait") from None
                _time.sleep(0.02)
        self._lock_fd = fd

    # ------------------------------------------------------------------------------------------------
    # loading and recovery
    def _listing(self) -> tuple[list[int], list[int]]:
        names = os.listdir(self.path)
        snaps = sorted(int(m.group(1)) for n in names if (m := _SNAPSHOT.fullmatch(n)))
        logs = sorted(int(m.group(1)) for n in names if (m := _LOG.fullmatch(n)))
        return snaps, logs

    def _pending_rollback(self) -> int | None:
        where = self.path / _ROLLBACK_FILE
        try:
            record = json.loads(where.read_bytes())
            return int(record["to"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise CorruptFileError(f"{where}: unreadable rollback record") from None

    def _load(self) -> None:
        """Newest snapshot + its log replayed. A reader retries when a writer moves files under it."""
        for attempt in range(20):
            try:
                self._load_once()
                return
            except FileNotFoundError:
                if self.mode == "w" or attempt == 19:
                    raise
                _time.sleep(0.01)

    def _load_once(self) -> None:
        target = self._pending_rollback()
        if target is not None and self.mode == "w":
            self._finish_rollback(target)
        snaps, logs = self._listing()
        if target is not None:  # a reader sees the rollback as done
            snaps = [n for n in snaps if n <= target]
        if not snaps:
            raise CorruptFileError(f"{self.path}: the session has no snapshot file")
        current = snaps[-1]
        state, logits, events = self._read_snapshot(current)
        log_path = self.path / _log_name(current)
        batches, valid = [], None
        if target is None or target != current:
            if log_path.exists():
                header, batches, valid = _read_log(log_path)
                if header.get("snapshot") != current or header.get("first_event") != events:
                    raise CorruptFileError(f"{log_path}: log header {header} does not follow snapshot {current} "
                                           f"({events} events)")
        if self.mode == "w":
            if valid is None:
                atomic_write_bytes(log_path, _frame(_log_header(current, events, self.meta)))
            elif valid < log_path.stat().st_size:
                with open(log_path, "r+b") as handle:  # drop the torn, never-acknowledged last record
                    handle.truncate(valid)
                    handle.flush()
                    os.fsync(handle.fileno())
            self._log_handle = open(log_path, "ab")
        replayed = [e for _, batch in batches for e in batch]
        state, new_logits = _advance(self.model, self.adapter, state, replayed)
        self._state = state
        self._logits = new_logits if replayed else logits
        self._snapshot = current
        self._snapshot_events = events
        self._events = events + len(replayed)

    def _read_snapshot(self, n: int):
        where = self.path / _snapshot_name(n)
        tensors, meta = read_tensors(where, kind=SNAPSHOT_FORMAT, version=FORMAT_VERSION)
        if meta.get("meta_checksum") != _json_checksum(_snapshot_meta_body(meta)):
            raise CorruptFileError(f"{where}: metadata checksum mismatch, the file was altered or damaged")
        require_fingerprint(meta.get("fingerprint"), self.model, "snapshot", str(where))
        if meta.get("adapter") != self.adapter.info():
            raise StateMismatchError(f"{where}: snapshot was made with adapter {meta.get('adapter')}, "
                                     f"this session uses {self.adapter.info()}")
        try:
            layers = [{name: tensors[f"layers.{i}.{name}"] for name in names} for i, names in enumerate(meta["layers"])]
            position, events = int(meta["position"]), int(meta["events"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{where}: snapshot metadata does not match its tensors ({exc})") from None
        expected = self.model.init_state(1, device="meta")
        if len(layers) != len(expected.layers):
            raise CorruptFileError(f"{where}: {len(layers)} layers stored, the model has {len(expected.layers)}")
        for i, (have, want) in enumerate(zip(layers, expected.layers)):
            for name, tensor in want.items():
                if name not in have or have[name].shape != tensor.shape:
                    raise CorruptFileError(f"{where}: layers.{i}.{name} has the wrong shape or is missing")
        device = _device(self.model)
        state = RecurrentState(layers, position, meta["fingerprint"]).to(device)
        logits = tensors.get(_NEXT_LOGITS)
        return state, None if logits is None else logits.to(device), events

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
        record = _frame({"first": self._events, "events": [e.to_json() for e in events]})
        try:
            self._log_handle.write(record)
            self._log_handle.flush()
            os.fsync(self._log_handle.fileno())
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

    def ask(self, prompt: str | Event | Sequence[Event] | None = None, max_new_tokens: int = 256, *,
            role: str = "assistant", prompt_role: str = "user", time=None, metadata: dict | None = None,
            temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            min_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None) -> Answer:
        """Generate the next event of ``role`` on a copy of the state; the session does not change.

        ``prompt``: text (an event of ``prompt_role`` at ``time``), an Event or events read first, or None.
        ``time``: the time of the prompt and reply events (None: now). Sampling options as ``model.generate``;
        ``temperature=0`` is greedy. Observe the prompt and ``answer.event`` to make them part of the memory.
        """
        self._require_open()
        stamp = _time.time() if time is None else time
        if prompt is None:
            context: list[Event] = []
        elif isinstance(prompt, str):
            context = [Event(prompt_role, prompt, stamp)]
        elif isinstance(prompt, Event):
            context = [prompt]
        else:
            context = list(prompt)
        header = self.adapter.prompt_for(role, time=stamp, metadata=metadata)
        ids = torch.cat([self.adapter.encode(context), header]) if context else header
        out = self.model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                  stop=self.adapter.stop_tokens, state=self._state.clone())
        tokens = out.tokens[0]
        return Answer(self.adapter.reply_event(header, tokens), tokens, out.stop_reasons[0])

    @torch.no_grad()
    def score(self, text: str | bytes | Event | Sequence[Event]) -> Score:
        """Bits the model needs for ``text`` (raw UTF-8 / bytes, or encoded events) right after the memory.

        Works on a copy of the state. The first byte is predicted from the last observed event; in a session
        that has observed nothing yet, the first byte has no prediction and is not scored.
        """
        self._require_open()
        if isinstance(text, str):
            ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        elif isinstance(text, (bytes, bytearray)):
            ids = torch.tensor(list(text), dtype=torch.long)
        else:
            ids = self.adapter.encode(text)
        if ids.numel() == 0:
            return Score(0.0, 0)
        ids = ids.to(_device(self.model))
        out = self.model(ids[None], self._state.clone())
        logits = out.logits[0, :-1].float()
        targets = ids[1:]
        if self._logits is not None:
            logits = torch.cat([self._logits.reshape(1, -1), logits])
            targets = ids
        if targets.numel() == 0:
            return Score(0.0, 0)
        nats = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        return Score(float(nats) / float(torch.log(torch.tensor(2.0))), int(targets.numel()))

    # ------------------------------------------------------------------------------------------------
    # snapshots
    def save(self) -> int:
        """Write the current state as the next numbered snapshot (atomically, with checksums) and start its log.
        Returns the snapshot number; when nothing was observed since the last snapshot, that one's number."""
        self._require_writer("save")
        if self._events == self._snapshot_events:
            return self._snapshot
        n = self._snapshot + 1
        _write_snapshot(self.path / _snapshot_name(n), self._state, self._logits, self._events, self.meta)
        atomic_write_bytes(self.path / _log_name(n), _frame(_log_header(n, self._events, self.meta)))
        self._log_handle.close()
        self._log_handle = open(self.path / _log_name(n), "ab")
        self._snapshot, self._snapshot_events = n, self._events
        return n

    def snapshots(self) -> list[dict]:
        """Each snapshot: ``{"number", "events", "position", "bytes"}`` (oldest first)."""
        self._require_open()
        out = []
        target = self._pending_rollback()
        for n in self._listing()[0]:
            if target is not None and n > target:
                continue
            where = self.path / _snapshot_name(n)
            _, meta = read_tensors(where, kind=SNAPSHOT_FORMAT, version=FORMAT_VERSION)
            out.append({"number": n, "events": meta.get("events"), "position": meta.get("position"),
                        "bytes": where.stat().st_size})
        return out

    def rollback(self, n: int) -> None:
        """Return to snapshot ``n``: later snapshots and every event observed after snapshot ``n`` are dropped.

        Crash-safe: the intent is written first (``rollback.json``) and the next writer finishes it."""
        self._require_writer("rollback")
        if isinstance(n, bool) or not isinstance(n, int):
            raise InputError(f"snapshot number must be an int, got {n!r}")
        snaps = self._listing()[0]
        if n not in snaps:
            raise InputError(f"{self.path}: no snapshot {n} (there are {snaps})")
        self._read_snapshot(n)  # refuse a damaged target before touching anything
        atomic_write_bytes(self.path / _ROLLBACK_FILE, json.dumps({"to": n}).encode())
        self._log_handle.close()
        self._log_handle = None
        self._finish_rollback(n)
        self._load()

    def _finish_rollback(self, n: int) -> None:
        snaps, logs = self._listing()
        for m in sorted(set(logs) | set(snaps), reverse=True):
            if m >= n and m in logs:
                (self.path / _log_name(m)).unlink(missing_ok=True)
            if m > n and m in snaps:
                (self.path / _snapshot_name(m)).unlink(missing_ok=True)
        fsync_dir(self.path)
        events = int(read_tensors(self.path / _snapshot_name(n), kind=SNAPSHOT_FORMAT,
                                  version=FORMAT_VERSION)[1]["events"])
        atomic_write_bytes(self.path / _log_name(n), _frame(_log_header(n, events, self.meta)))
        (self.path / _ROLLBACK_FILE).unlink(missing_ok=True)
        fsync_dir(self.path)

    def fork(self, path: str | os.PathLike) -> "MemorySession":
        """A new session at ``path`` starting from this one's current state (its snapshot 0); opened for writing."""
        self._require_open()
        path = Path(path)
        if (path / _SESSION_FILE).exists() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
            raise ConfigError(f"{path}: already exists; fork into a new folder")
        parent = path.parent if str(path.parent) else Path(".")
        meta = {**{k: v for k, v in self.meta.items() if k != "checksum"}, "created": _time.time(),
                "forked_from": {"path": str(self.path.resolve()), "events": self._events}}
        meta["checksum"] = _json_checksum(meta)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".new", dir=parent))
        try:
            _write_snapshot(tmp / _snapshot_name(0), self._state, self._logits, self._events, meta)
            atomic_write_bytes(tmp / _log_name(0), _frame(_log_header(0, self._events, meta)))
            (tmp / _LOCK_FILE).touch()
            atomic_write_bytes(tmp / _SESSION_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
            if path.exists():
                path.rmdir()
            os.rename(tmp, path)
            fsync_dir(parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return MemorySession.open(path, self.model, adapter=self.adapter)

    def events(self) -> list[Event]:
        """Every event still in this session's logs, oldest first (events before a fork's start are not here;
        ``info()["first_logged_event"]`` says where they start)."""
        self._require_open()
        out: list[Event] = []
        for n in self._listing()[1]:
            if n > self._snapshot:
                continue
            _, batches, _ = _read_log(self.path / _log_name(n))
            out.extend(e for _, batch in batches for e in batch)
        return out[:self._events]

    def info(self) -> dict[str, Any]:
        """Position, event counts, snapshot, model and sizes on disk (bytes)."""
        self._require_open()
        files = {name: (self.path / name).stat().st_size for name in os.listdir(self.path)
                 if (self.path / name).is_file()}
        return {
            "path": str(self.path), "mode": self.mode, "position": self._state.position, "events": self._events,
            "unsaved_events": self._events - self._snapshot_events, "snapshot": self._snapshot,
            "snapshots": len(self._listing()[0]),
            "model": {"fingerprint": self.meta["fingerprint"], "file": self.meta.get("model_file"),
                      "config": self.meta.get("config")},
            "adapter": self.meta.get("adapter"), "format_version": FORMAT_VERSION,
            "forked_from": self.meta.get("forked_from"),
            "sizes": {"state_bytes": self._state.nbytes(),
                      "snapshot_file_bytes": files.get(_snapshot_name(self._snapshot), 0),
                      "log_bytes": sum(v for k, v in files.items() if _LOG.fullmatch(k)),
                      "snapshots_bytes": sum(v for k, v in files.items() if _SNAPSHOT.fullmatch(k)),
                      "total_bytes": sum(files.values())},
        }

    # ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the lock and the log (unsaved events stay in the log and are replayed by the next open)."""
        if getattr(self, "_log_handle", None) is not None:
            self._log_handle.close()
            self._log_handle = None
        if getattr(self, "_lock_fd", None) is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        self._closed = True

    def __enter__(self) -> "MemorySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"MemorySession({str(self.path)!r}, mode={self.mode!r}, events={self._events}, "
                f"position={self._state.position}, snapshot={self._snapshot})")


# ------------------------------------------------------------------------------------------------------
def _log_header(snapshot: int, first_event: int, meta: dict) -> dict:
    return {"format": LOG_FORMAT, "format_version": FORMAT_VERSION, "snapshot": snapshot, "first_event": first_event,
            "fingerprint": meta["fingerprint"]}


def _snapshot_meta_body(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("fingerprint", "adapter", "position", "events", "layers", "model_file")}


def _write_snapshot(where: Path, state: RecurrentState, logits, events: int, session_meta: dict) -> None:
    tensors = dict(state.tensors())
    if logits is not None:
        tensors[_NEXT_LOGITS] = logits
    meta = {"fingerprint": state.fingerprint, "adapter": session_meta["adapter"], "position": int(state.position),
            "events": int(events), "layers": [sorted(layer) for layer in state.layers],
            "model_file": session_meta.get("model_file")}
    meta["meta_checksum"] = _json_checksum(_snapshot_meta_body(meta))
    write_tensors(where, tensors, kind=SNAPSHOT_FORMAT, version=FORMAT_VERSION, meta=meta)



def model_for_session(path: str | os.PathLike, model_file: str | os.PathLike | None = None, device=None):
    """``(model, adapter)`` for the session at ``path``: from ``model_file`` when given, else from the model file
    recorded at creation (its sha256 must still match, so a changed file is refused, naming it)."""
    from .base import model_from_checkpoint

    where = Path(path) / _SESSION_FILE
    if model_file is None:
        try:
            meta = json.loads(where.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no memory session here") from None
        except ValueError:
            raise CorruptFileError(f"{where}: not JSON (the file was truncated or altered)") from None
        record = meta.get("model_file") if isinstance(meta, dict) else None
        if not record:
            raise ConfigError(f"{where}: this session records no model file; give the model (--model FILE)")
        model_file = Path(record["path"])
        if not model_file.exists():
            raise FileNotFoundError(f"{where}: the session's model file {model_file} is gone; give --model FILE")
        if _file_sha256(model_file) != record.get("sha256"):
            raise StateMismatchError(f"{model_file}: the model file changed since session {path} was created "
                                     "(sha256 differs); give the right one with --model FILE")
    return model_from_checkpoint(model_file, device=device)
