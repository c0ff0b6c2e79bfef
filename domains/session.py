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
replaying the log repeats exactly the calls of the original run. See docs/agent-memory.md.
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
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from seqlab.errors import (ConfigError, CorruptFileError, FormatVersionError, InputError, SessionLockedError, StateError,
                           StateMismatchError)
from seqlab.io import atomic_write_bytes, fsync_dir
from seqlab.safetensors_io import read_tensors, write_tensors
from seqlab.state import RecurrentState, require_fingerprint

from .memory import Event, MemoryStreamAdapter

__all__ = ["Answer", "DEFAULT_KEEP_SNAPSHOTS", "MemorySession", "Score", "SessionLockedError", "replay_state"]

SESSION_FORMAT = "seqlab.memory_session"
SNAPSHOT_FORMAT = "seqlab.memory_session.snapshot"
LOG_FORMAT = "seqlab.memory_session.log"
#: session.json: 2 since the self-verifying log (a seqlab that reads only version 1 logs refuses the session)
SESSION_VERSION = 2
SNAPSHOT_VERSION = 1
#: log files: 1 = records b"SQWL" + length + sha256(payload); 2 = b"SQW2" + length + sha256 + CRC-32 of those
LOG_VERSION = 2
FORMAT_VERSION = SESSION_VERSION  # what info() reports
#: snapshots kept by default besides snapshot 0 (the logs are always kept whole)
DEFAULT_KEEP_SNAPSHOTS = 8
#: ``save`` merges the logs older than every kept snapshot into one file once this many have gathered
MERGE_LOGS_AT = 64

_SESSION_FILE = "session.json"
_LOCK_FILE = "lock"
_ROLLBACK_FILE = "rollback.json"
_REPAIR_LOG = "repair.log"
_SNAPSHOT = re.compile(r"snapshot-(\d{8})\.safetensors")
_LOG = re.compile(r"log-(\d{8})\.wal")
# the temporary files of seqlab.io.atomic_write_bytes for this folder's own files (left by a kill -9)
_TEMP = re.compile(r"\.(session\.json|rollback\.json|snapshot-\d{8}\.safetensors|log-\d{8}\.wal)\..+\.tmp")
_MAGIC_V1 = b"SQWL"
_FRAME_V1 = struct.Struct("<4sI32s")  # magic, payload length, sha256(payload)
_MAGIC = b"SQW2"
_FRAME = struct.Struct("<4sI32sI")  # magic, payload length, sha256(payload), crc32 of the 40 bytes before it
_NEXT_LOGITS = "next_logits"
_REPAIR_API = "repair it with MemorySession.repair(path) (keeps every event before the damage, moves the damaged " \
              "bytes aside)"
_REPAIR_CLI = "repair it with 'seqlab memory repair SESSION' (keeps every event before the damage, moves the " \
              "damaged bytes aside)"


def _snapshot_name(n: int) -> str:
    return f"snapshot-{n:08d}.safetensors"


def _log_name(n: int) -> str:
    return f"log-{n:08d}.wal"


def _advice(cls, message: str, api: str, cli: str, *, code: int | None = None, filename=None) -> Exception:
    """An error whose advice speaks API (``str``) or, via ``cli_message``, command line (seqlab memory ...).
    An ``OSError`` class gets ``code`` (its errno) and ``filename``; its message then does not repeat the path."""
    if issubclass(cls, OSError):
        exc = cls(code, f"{message}; {api}", None if filename is None else os.fspath(filename))
    else:
        exc = cls(f"{message}; {api}")
    exc.cli_message = f"{message}; {cli}"
    return exc


def _damaged(message: str) -> CorruptFileError:
    return _advice(CorruptFileError, f"{message}; nothing was changed", _REPAIR_API, _REPAIR_CLI)


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
    """One log record (format 2): magic, length, sha256(payload), CRC-32 of those 40 bytes, payload (JSON)."""
    data = json.dumps(payload, ensure_ascii=False, allow_nan=False, sort_keys=True).encode("utf-8")
    head = struct.pack("<4sI32s", _MAGIC, len(data), hashlib.sha256(data).digest())
    return head + struct.pack("<I", zlib.crc32(head)) + data


# ------------------------------------------------------------------------------------------------------
# reading logs


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
    return magic == _MAGIC_V1 and end <= len(data) and hashlib.sha256(data[at + _FRAME_V1.size:end]).digest() == digest


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
            if data[offset:offset + min(rest, 4)] == magic[:min(rest, 4)]:
                log.torn = True
            else:
                log.damage = (offset, "the bytes after the last record are not a record (bad magic)")
            break
        fields = frame.unpack_from(data, offset)
        if fields[0] != magic:
            log.damage = (offset, "not a log record (bad magic)")
            break
        if log.version == 2 and zlib.crc32(data[offset:offset + 40]) != fields[3]:
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
        payload = data[offset + frame.size:end]
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
        raise FormatVersionError(f"{path}: written in {LOG_FORMAT} format version {version}; this seqlab reads up "
                                 f"to version {LOG_VERSION} (upgrade seqlab)")
    start = header.get("first_event")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        log.damage, log.torn, log.valid = (0, f"header first_event {start!r} is not an event number"), False, 0
        return log
    number, through = header.get("snapshot"), header.get("through", header.get("snapshot"))
    if type(number) is not int or type(through) is not int or not 0 <= number <= through:
        log.damage, log.torn, log.valid = (0, f"header snapshot {number!r} / through {through!r} are not log "
                                           "numbers"), False, 0
        return log
    log.header, log.start, log.through = header, start, through
    expected = start
    for i, (at, record) in enumerate(records[1:], start=1):
        problem = None
        if isinstance(record, dict) and "lost" in record:
            span = record.get("lost")
            if (not isinstance(span, list) or len(span) != 2 or not all(type(v) is int for v in span)
                    or span[0] != expected or span[1] < span[0]):
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

    @classmethod
    def _bare(cls, path: Path, mode: str) -> "MemorySession":
        self = object.__new__(cls)
        self.path, self.mode = path, mode
        self._lock_fd = None
        self._log_handle = None
        self._closed = False
        return self

    # ------------------------------------------------------------------------------------------------
    # opening
    @classmethod
    def open(cls, path: str | os.PathLike, model, *, create: bool = False, mode: str = "w",
             timeout: float | None = None, model_file: str | os.PathLike | None = None,
             adapter: MemoryStreamAdapter | None = None,
             keep_snapshots: int | None = DEFAULT_KEEP_SNAPSHOTS) -> "MemorySession":
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
        if isinstance(timeout, bool) or (timeout is not None and not (isinstance(timeout, (int, float))
                                                                       and 0 <= timeout < float("inf"))):
            raise ConfigError(f"timeout must be a finite number of seconds >= 0 or None, got {timeout!r}")
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
                raise _advice(FileNotFoundError, "no memory session here", "pass create=True to make one",
                              "give --create and --model FILE to make one", code=errno.ENOENT, filename=path)
            if mode == "r":
                raise ConfigError(f"{path}: cannot create a session read-only (mode='r')")
            cls._create(path, model, adapter, model_file)
        self = cls._bare(path, mode)
        self.model, self.adapter, self.keep_snapshots = model, adapter, keep_snapshots
        try:
            self.meta = cls._read_session_file(path, model, adapter)
            if mode == "w":
                self._require_writable()
                self._acquire_lock(timeout)
                self._clean_temp_files()
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
            raise FileNotFoundError(errno.ENOENT, f"cannot create session {path}: the folder does not exist",
                                    os.fspath(parent))
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"{path}: exists and is not a memory session (no {_SESSION_FILE})")
        record = None
        if model_file is not None:
            model_file = Path(model_file).resolve()
            record = {"path": str(model_file), "sha256": _file_sha256(model_file)}
        meta = {"format": SESSION_FORMAT, "format_version": SESSION_VERSION, "fingerprint": model.fingerprint,
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
    def _read_meta(path: Path) -> dict:
        where = path / _SESSION_FILE
        try:
            meta = json.loads(where.read_bytes())
        except ValueError:
            raise CorruptFileError(f"{where}: not JSON (the file was truncated or altered)") from None
        if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT:
            raise CorruptFileError(f"{where}: not a {SESSION_FORMAT!r} file")
        version = meta.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CorruptFileError(f"{where}: format_version is missing or not an integer")
        if version > SESSION_VERSION:
            raise FormatVersionError(f"{where}: written in {SESSION_FORMAT} format version {version}; this seqlab "
                                     f"reads up to version {SESSION_VERSION} (upgrade seqlab)")
        if meta.get("checksum") != _json_checksum(meta):
            raise CorruptFileError(f"{where}: checksum mismatch, the file was altered or damaged")
        return meta

    @classmethod
    def _read_session_file(cls, path: Path, model, adapter) -> dict:
        where = path / _SESSION_FILE
        meta = cls._read_meta(path)
        require_fingerprint(meta.get("fingerprint"), model, "session", str(where))
        if meta.get("adapter") != adapter.info():
            raise StateMismatchError(f"{where}: session was made with adapter {meta.get('adapter')}, "
                                     f"this one is {adapter.info()}")
        return meta

    def _require_writable(self) -> None:
        """A writer must be able to write the folder (snapshots, logs) before it logs anything: an event logged
        and then reported as failed would be observed twice by a retry."""
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise _advice(PermissionError, "the session folder is not writable, so nothing can be observed or "
                          "saved (nothing was logged)", "open it with mode='r' to read",
                          "ask and info still work (read-only)", code=errno.EACCES, filename=self.path)

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
                    raise _advice(SessionLockedError,
                                  f"{self.path}: another process has this session open for writing{waited}",
                                  "open it with mode='r' to read, or pass timeout= to wait",
                                  "give --timeout SECONDS to wait for it (ask and info read without waiting)"
                                  ) from None
                _time.sleep(0.02)
        self._lock_fd = fd

    def _clean_temp_files(self) -> list[str]:
        """Remove what an atomic write killed midway left in the folder (only the lock holder writes here)."""
        removed = []
        for name in os.listdir(self.path):
            if _TEMP.fullmatch(name):
                try:
                    (self.path / name).unlink()
                    removed.append(name)
                except FileNotFoundError:
                    pass
        return removed

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
            target = record["to"]
            if type(target) is not int or target < 0:
                raise TypeError
            # checksummed since format 2 (a flipped digit must not roll back to another snapshot); a bare
            # {"to": n} is what earlier seqlab wrote
            if set(record) != {"to"} and (set(record) != {"to", "checksum"}
                                          or record["checksum"] != _json_checksum(record)):
                raise ValueError
            return target
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise _damaged(f"{where}: unreadable rollback record") from None

    def _first_event(self) -> int:
        forked = self.meta.get("forked_from")
        return int(forked.get("events", 0)) if isinstance(forked, dict) else 0

    def _load(self) -> None:
        """Newest snapshot + the logs after it replayed. A reader retries when a writer moves files under it."""
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
            target = None
        snaps, logs = self._listing()
        if target is not None:  # a reader sees the rollback as done: log `target` restarts empty
            snaps = [n for n in snaps if n <= target]
            logs = [n for n in logs if n < target]
        if not snaps:
            raise CorruptFileError(f"{self.path}: the session has no snapshot file")
        current = snaps[-1]
        state, logits, events = self._read_snapshot(current)
        top = max([current, *logs])
        # a missing log of the newest snapshot is a crash only while a rollback is under way, or in a session of
        # earlier seqlab (which wrote a snapshot before its log); since format 2 the log is written first
        legacy = target is not None or self.meta.get("format_version", 0) < 2
        chain, leftovers = self._check_chain(logs, top, current, events, legacy)
        replayed = [e for k in sorted(chain) if k >= current for _, batch in chain[k].batches for e in batch]
        self._snapshot, self._snapshot_events, self._top = current, events, top
        if self.mode == "w":
            for k in leftovers:  # logs a merge had copied into a merged log when a crash stopped it
                (self.path / _log_name(k)).unlink(missing_ok=True)
            self._prepare_log(chain.get(top))
        state, new_logits = _advance(self.model, self.adapter, state, replayed)
        self._state = state
        self._logits = new_logits if replayed else logits
        self._events = events + len(replayed)
        self._lost = [list(span) for k in sorted(chain) for span in chain[k].lost]

    def _check_chain(self, logs: list[int], top: int, current: int, snapshot_events: int,
                     legacy: bool) -> tuple[dict[int, _Log], list[int]]:
        """Read and verify every log up to ``top``; they must follow each other event for event (a merged log
        stands for the logs ``snapshot..through``). Raises on damage. Returns ``({number: log}, leftovers)``:
        leftovers are logs inside a merged log's range (a merge a crash interrupted; their events are in it)."""
        chain, leftovers = {}, []
        expected, nxt = self._first_event(), 0
        for k in sorted(logs):
            where = self.path / _log_name(k)
            if k < nxt:
                leftovers.append(k)
                continue
            if k != nxt:
                raise _damaged(f"{self.path / _log_name(nxt)}: missing (the events it held are gone)")
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
                raise _damaged(f"{where}: starts at event {log.start}, but the log before it ends at event "
                               f"{expected} (events are missing or repeated)")
            if k == current and log.start != snapshot_events:
                raise _damaged(f"{where}: starts at event {log.start}, but {_snapshot_name(current)} holds "
                               f"{snapshot_events} events")
            if k >= current and log.lost:
                raise _damaged(f"{where}: a lost-events record after the newest snapshot")
            chain[k] = log
            expected, nxt = log.end, log.through + 1
        if current not in chain:
            if nxt != current or not legacy:
                raise _damaged(f"{self.path / _log_name(nxt)}: missing (the events it held are gone)")
            if expected != snapshot_events:
                raise _damaged(f"{self.path / _snapshot_name(current)}: holds {snapshot_events} events, but the "
                               f"logs before it end at event {expected}")
        return chain, leftovers

    def _prepare_log(self, log: _Log | None) -> None:
        """The writer's log: made when missing, a proven torn tail cut off, a format-1 log rewritten as format 2."""
        where = self.path / _log_name(self._top)
        if log is None:
            atomic_write_bytes(where, _frame(_log_header(self._top, self._snapshot_events, self.meta)))
        elif log.version < LOG_VERSION:
            self._upgrade_meta()
            header = {**log.header, "format_version": LOG_VERSION}
            atomic_write_bytes(where, b"".join(_frame(r) for r in [header, *_log_records(log)]))
        elif log.torn:
            with open(where, "r+b") as handle:  # drop the torn, never-acknowledged last record
                handle.truncate(log.valid)
                handle.flush()
                os.fsync(handle.fileno())
        self._log_handle = open(where, "ab")

    def _upgrade_meta(self) -> None:
        if self.meta.get("format_version", 0) >= SESSION_VERSION:
            return
        meta = {**{k: v for k, v in self.meta.items() if k != "checksum"}, "format_version": SESSION_VERSION}
        meta["checksum"] = _json_checksum(meta)
        atomic_write_bytes(self.path / _SESSION_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
        self.meta = meta

    def _snapshot_meta(self, n: int) -> dict:
        """The metadata of snapshot ``n``, verified against session.json (no model needed)."""
        where = self.path / _snapshot_name(n)
        _, meta = read_tensors(where, kind=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION)
        if meta.get("meta_checksum") != _json_checksum(_snapshot_meta_body(meta)):
            raise CorruptFileError(f"{where}: metadata checksum mismatch, the file was altered or damaged")
        if meta.get("fingerprint") != self.meta.get("fingerprint") or meta.get("adapter") != self.meta.get("adapter"):
            raise StateMismatchError(f"{where}: made by another model or adapter than {self.path / _SESSION_FILE}")
        if type(meta.get("events")) is not int or meta["events"] < 0:
            raise CorruptFileError(f"{where}: events {meta.get('events')!r} is not an event count")
        return meta

    def _read_snapshot(self, n: int):
        where = self.path / _snapshot_name(n)
        tensors, meta = read_tensors(where, kind=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION)
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
            min_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
            allow_specials: bool = False) -> Answer:
        """Generate the next event of ``role`` on a copy of the state; the session does not change.

        ``prompt``: text (an event of ``prompt_role`` at ``time``), an Event or events read first, or None.
        ``time``: the time of the prompt and reply events (None: now). Sampling options as ``model.generate``;
        ``temperature=0`` is greedy. The reply is generated from what the adapter decodes as content (the event
        framing bytes are never sampled unless ``allow_specials=True``) and stops at the end-of-event byte.
        Observe the prompt and ``answer.event`` to make them part of the memory.
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
                                  stop=self.adapter.stop_tokens, state=self._state.clone(),
                                  **self.adapter.generation_options(allow_specials=bool(allow_specials)))
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
        """Write the current state as the next numbered snapshot (atomically, with checksums) and start its log;
        then keep only the newest ``keep_snapshots`` snapshots (and snapshot 0). Returns the snapshot number;
        when nothing was observed since the last snapshot, that one's number."""
        self._require_writer("save")
        if self._events == self._snapshot_events:
            return self._snapshot
        n = self._top + 1
        # the new log first: until its snapshot exists, the state is the older snapshot with the logs replayed
        atomic_write_bytes(self.path / _log_name(n), _frame(_log_header(n, self._events, self.meta)))
        self._log_handle.close()
        self._log_handle = open(self.path / _log_name(n), "ab")
        self._top = n
        _write_snapshot(self.path / _snapshot_name(n), self._state, self._logits, self._events, self.meta)
        self._snapshot, self._snapshot_events = n, self._events
        if self.keep_snapshots is not None:
            self._prune(self.keep_snapshots)
        self._merge_logs(MERGE_LOGS_AT)
        return n

    def _prune(self, keep: int) -> list[int]:
        snaps = self._listing()[0]
        kept = {0, self._snapshot, *snaps[-keep:]}
        removed = [n for n in snaps if n not in kept]
        for n in removed:
            (self.path / _snapshot_name(n)).unlink(missing_ok=True)
        if removed:
            fsync_dir(self.path)
        return removed

    def _merge_logs(self, least: int, everything: bool = False) -> list[list[int]]:
        """Merge runs of logs older than every kept snapshot but 0 into one log each (its header says
        ``through``); returns the merged ``[first, last]`` log-number ranges. ``save`` merges the single logs
        once ``least`` have gathered (a listing tells them: a merged log k is followed by its through + 1, a
        single one by k + 1); ``everything`` (``compact``) merges all of them, merged ones too, into one.

        Every event stays: the merged log is written (atomically, the verified records copied) before the logs
        it replaces are removed; a crash in between leaves them as leftovers that readers skip and writers
        delete."""
        snaps, logs = self._listing()
        floor = min([n for n in snaps if n > 0] + [self._snapshot])
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
            log = _parse_log(self.path / _log_name(k))
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
            atomic_write_bytes(self.path / _log_name(first[0]), b"".join(_frame(r) for r in [header, *records]))
            for k, _ in run[1:]:
                (self.path / _log_name(k)).unlink(missing_ok=True)
            merged.append([first[0], last[1].through])
        if merged:
            fsync_dir(self.path)
        return merged

    def compact(self, keep: int | None = None) -> dict[str, Any]:
        """Delete all snapshots but snapshot 0 and the newest ``keep`` (default: this session's
        ``keep_snapshots``, else 8), and the temporary files of writes a crash interrupted. The logs are kept
        whole, so no event is lost: a pruned snapshot only means ``rollback`` cannot return to it."""
        self._require_writer("compact")
        keep = _check_keep(keep, "keep")
        if keep is None:
            keep = self.keep_snapshots if self.keep_snapshots is not None else DEFAULT_KEEP_SNAPSHOTS
        sizes = {n: (self.path / _snapshot_name(n)).stat().st_size for n in self._listing()[0]}
        removed = self._prune(keep)
        merged = self._merge_logs(2, everything=True)
        temp = self._clean_temp_files()
        return {"removed_snapshots": removed, "kept_snapshots": self._listing()[0], "merged_logs": merged,
                "removed_temp_files": temp, "bytes_freed": sum(sizes[n] for n in removed)}

    def snapshots(self) -> list[dict]:
        """Each snapshot: ``{"number", "events", "position", "bytes"}`` (oldest first)."""
        self._require_open()
        out = []
        target = self._pending_rollback()
        for n in self._listing()[0]:
            if target is not None and n > target:
                continue
            where = self.path / _snapshot_name(n)
            _, meta = read_tensors(where, kind=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION)
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
        intent = {"to": n}
        intent["checksum"] = _json_checksum(intent)
        atomic_write_bytes(self.path / _ROLLBACK_FILE, json.dumps(intent).encode())
        self._log_handle.close()
        self._log_handle = None
        self._finish_rollback(n)
        self._load()

    def _finish_rollback(self, n: int) -> None:
        events = self._snapshot_meta(n)["events"]  # refuse a damaged or missing target before deleting anything
        snaps, logs = self._listing()
        for m in sorted(set(logs) | set(snaps), reverse=True):
            if m >= n and m in logs:
                (self.path / _log_name(m)).unlink(missing_ok=True)
            if m > n and m in snaps:
                (self.path / _snapshot_name(m)).unlink(missing_ok=True)
        fsync_dir(self.path)
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
                "format_version": SESSION_VERSION,
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
        return MemorySession.open(path, self.model, adapter=self.adapter, keep_snapshots=self.keep_snapshots)

    def events(self) -> list[Event]:
        """Every event in this session's logs, oldest first. Events before a fork's start are not here
        (``info()["forked_from"]``), nor events a ``repair`` recorded as lost (``info()["lost_events"]``)."""
        self._require_open()
        out: list[Event] = []
        nxt = 0
        for n in self._listing()[1]:
            if n < nxt or n > self._top:  # inside a merged log's range, or not part of this view
                continue
            log = _parse_log(self.path / _log_name(n))
            if log.problem():
                raise _damaged(log.problem())
            out.extend(e for first, batch in log.batches for i, e in enumerate(batch, first) if i < self._events)
            nxt = log.through + 1
        return out

    def info(self) -> dict[str, Any]:
        """Position, event counts, snapshot, model and sizes on disk (bytes)."""
        self._require_open()
        files = {name: (self.path / name).stat().st_size for name in os.listdir(self.path)
                 if (self.path / name).is_file()}
        return {
            "path": str(self.path), "mode": self.mode, "position": self._state.position, "events": self._events,
            "unsaved_events": self._events - self._snapshot_events, "snapshot": self._snapshot,
            "snapshots": len(self._listing()[0]), "keep_snapshots": self.keep_snapshots, "log": self._top,
            "lost_events": self._lost,
            "model": {"fingerprint": self.meta["fingerprint"], "file": self.meta.get("model_file"),
                      "config": self.meta.get("config")},
            "adapter": self.meta.get("adapter"), "format_version": self.meta.get("format_version"),
            "forked_from": self.meta.get("forked_from"),
            "sizes": {"state_bytes": self._state.nbytes(),
                      "snapshot_file_bytes": files.get(_snapshot_name(self._snapshot), 0),
                      "log_bytes": sum(v for k, v in files.items() if _LOG.fullmatch(k)),
                      "snapshots_bytes": sum(v for k, v in files.items() if _SNAPSHOT.fullmatch(k)),
                      "total_bytes": sum(files.values())},
        }

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
        if isinstance(timeout, bool) or (timeout is not None and not (isinstance(timeout, (int, float))
                                                                       and 0 <= timeout < float("inf"))):
            raise ConfigError(f"timeout must be a finite number of seconds >= 0 or None, got {timeout!r}")
        path = Path(path)
        if not (path / _SESSION_FILE).exists():
            raise FileNotFoundError(errno.ENOENT, "no memory session here", os.fspath(path))
        self = cls._bare(path, "w")
        try:
            self.meta = cls._read_meta(path)
            self._require_writable()
            self._acquire_lock(timeout)
            return self._repair()
        finally:
            self.close()

    def _repair(self) -> dict[str, Any]:
        changes: dict[str, bytes | None] = {}  # file name -> its new bytes, or None: set aside (removed)
        notes: list[str] = []
        lost: list[list[int]] = []
        if (self.path / _ROLLBACK_FILE).exists():
            try:
                target = self._pending_rollback()
                self._finish_rollback(target)
                notes.append(f"finished the rollback to snapshot {target} that was under way")
            except (CorruptFileError, FileNotFoundError) as exc:
                changes[_ROLLBACK_FILE] = None
                notes.append(f"{_ROLLBACK_FILE}: {exc}; set aside, no rollback was done")
        snaps, logs = self._listing()
        snap_events = {}
        for n in snaps:
            try:
                snap_events[n] = self._snapshot_meta(n)["events"]
            except (CorruptFileError, StateMismatchError) as exc:
                changes[_snapshot_name(n)] = None
                notes.append(f"{_snapshot_name(n)}: {' '.join(str(exc).split())}; set aside")
        if not snap_events:
            raise CorruptFileError(f"{self.path}: no snapshot verifies, so the session cannot be repaired "
                                   "(nothing was changed)")
        current = max(snap_events)
        top = max([current, *logs])
        parsed = {k: _parse_log(self.path / _log_name(k)) for k in logs}

        def start_of(j: int) -> int | None:  # where log j must start, as far as anything verified says
            if j in snap_events:
                return snap_events[j]
            log = parsed.get(j)
            return log.start if log is not None and log.start is not None else None

        def rebuilt(k: int, log: _Log | None, first: int, limit: int | None, allow_lost: bool,
                    through: int | None = None) -> tuple[bytes, int]:
            records, end = [], first
            for record in (_log_records(log) if log is not None and log.start is not None else []):
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
            return b"".join(_frame(r) for r in [_log_header(k, first, self.meta, through), *records]), end

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
        expected = self._first_event()
        for i, (k, through, log) in enumerate(units):
            name = _log_name(k)
            following = next(s for j in [u[0] for u in units[i + 1:]] + [current] if (s := start_of(j)) is not None)
            if following < expected:
                raise CorruptFileError(f"{self.path / name}: the logs claim overlapping events ({expected} and "
                                       f"{following}); cannot repair this automatically (nothing was changed)")
            if (log is not None and log.problem() is None and not log.torn and log.start == expected
                    and log.end == following and log.header.get("snapshot") == k and log.through == through):
                expected = following
                continue
            changes[name], end = rebuilt(k, log, expected, following, True, through)
            notes.append(f"{name}: {why(log)}; kept {_span(expected, end)}"
                         + (f", recorded {_span(end, following)} as lost" if following > end else ""))
            expected = following
        # the state's own chain: snapshot `current`, its log and the logs after it, one log per number
        expected = snap_events[current]
        for k in range(current, top + 1):
            name, log = _log_name(k), parsed.get(k)
            if log is None:
                if k == current:
                    changes[name] = _frame(_log_header(k, expected, self.meta))
                    notes.append(f"{name}: missing; started it empty (any events logged after snapshot {k} are "
                                 "gone)")
                later = [j for j in logs if j > k]
                for j in later:
                    changes[_log_name(j)] = None
                    notes.append(f"{_log_name(j)}: follows the missing {name}; set aside")
                break
            if (log.problem() is None and not log.torn and log.start == expected and not log.lost
                    and log.header.get("snapshot") == k and log.through == k):
                expected = log.end
                continue
            changes[name], end = rebuilt(k, log, expected, None, False)
            notes.append(f"{name}: {why(log)}; kept {_span(expected, end)} of it, set the rest aside")
            for j in (j for j in logs if j > k):
                changes[_log_name(j)] = None
                notes.append(f"{_log_name(j)}: follows the damage in {name}; set aside")
            expected = end
            break
        report: dict[str, Any] = {"session": str(self.path), "repaired": bool(changes), "events": expected,
                                  "snapshot": current, "lost_events": lost, "notes": notes,
                                  "rewritten": sorted(n for n, d in changes.items() if d is not None),
                                  "set_aside": sorted(n for n, d in changes.items() if d is None), "aside": None,
                                  "time": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime())}
        if not changes:
            return report
        # 1. every original byte goes aside first (a folder renamed into place whole), 2. then the session changes
        stamp = _time.strftime("%Y%m%dT%H%M%SZ", _time.gmtime())
        aside, i = f"damaged-{stamp}", 1
        while (self.path / aside).exists():
            i += 1
            aside = f"damaged-{stamp}-{i}"
        report["aside"] = aside
        tmp = Path(tempfile.mkdtemp(prefix=".damaged-", suffix=".new", dir=self.path))
        for name in changes:
            if (self.path / name).exists():
                _write_durable(tmp / name, (self.path / name).read_bytes())
        _write_durable(tmp / "report.json", json.dumps(report, indent=1).encode())
        fsync_dir(tmp)
        os.rename(tmp, self.path / aside)
        fsync_dir(self.path)
        for name in sorted((n for n, d in changes.items() if d is None), reverse=True):
            (self.path / name).unlink(missing_ok=True)
        fsync_dir(self.path)
        for name in sorted(n for n, d in changes.items() if d is not None):
            atomic_write_bytes(self.path / name, changes[name])
        with open(self.path / _REPAIR_LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(report, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return report

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
def _span(a: int, b: int) -> str:
    return "no events" if b <= a else f"event {a}" if b == a + 1 else f"events {a}..{b - 1}"


def _check_keep(keep, what: str) -> int | None:
    if keep is not None and (type(keep) is not int or keep < 1):
        raise ConfigError(f"{what} must be an integer >= 1 or None, got {keep!r}")
    return keep


def _write_durable(where: Path, data: bytes) -> None:
    with open(where, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _log_header(snapshot: int, first_event: int, meta: dict, through: int | None = None) -> dict:
    header = {"format": LOG_FORMAT, "format_version": LOG_VERSION, "snapshot": snapshot, "first_event": first_event,
              "fingerprint": meta["fingerprint"]}
    if through is not None and through != snapshot:
        header["through"] = through  # a merged log: it holds the events of logs snapshot..through
    return header


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
    write_tensors(where, tensors, kind=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION, meta=meta)


def model_for_session(path: str | os.PathLike, model_file: str | os.PathLike | None = None, device=None):
    """``(model, adapter)`` for the session at ``path``: from ``model_file`` when given, else from the model file
    recorded at creation (its sha256 must still match, so a changed file is refused, naming it)."""
    from .base import model_from_checkpoint

    where = Path(path) / _SESSION_FILE
    if model_file is None:
        try:
            meta = json.loads(where.read_bytes())
        except FileNotFoundError:
            raise _advice(FileNotFoundError, "no memory session here",
                          "create it with MemorySession.open(path, model, create=True)",
                          "create it with 'seqlab memory observe SESSION --create --model FILE ...'",
                          code=errno.ENOENT, filename=path) from None
        except ValueError:
            raise CorruptFileError(f"{where}: not JSON (the file was truncated or altered)") from None
        record = meta.get("model_file") if isinstance(meta, dict) else None
        if not record or not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise _advice(ConfigError, f"{where}: this session records no model file", "give model_file=",
                          "give the model with --model FILE")
        model_file = Path(record["path"])
        if not model_file.exists():
            raise _advice(FileNotFoundError, f"the model file recorded in {where} is gone", "give model_file=",
                          "give the model with --model FILE", code=errno.ENOENT, filename=model_file)
        if _file_sha256(model_file) != record.get("sha256"):
            raise _advice(StateMismatchError, f"{model_file}: the model file changed since session {path} was "
                          "created (sha256 differs)", "give the right one with model_file=",
                          "give the right one with --model FILE")
    return model_from_checkpoint(model_file, device=device)
