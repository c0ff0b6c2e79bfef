"""A memory session's folder: its file names, ``session.json``, the JSON checksums, the one writer's lock, the
rollback intent, the errors that speak API or command line, and the model file a session records
(``model_for_session``). ``seqlab.domains.session`` ties them together; docs/agent-memory.md describes the
folder."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import time as _time
from pathlib import Path

from seqlab.errors import ConfigError, CorruptFileError, FormatVersionError, SessionLockedError, StateMismatchError
from seqlab.io import atomic_write_bytes
from seqlab.state import require_fingerprint

SESSION_FORMAT = "seqlab.memory_session"
#: session.json: 2 since the self-verifying log (a seqlab that reads only version 1 logs refuses the session)
SESSION_VERSION = 2
FORMAT_VERSION = SESSION_VERSION  # what info() reports

_SESSION_FILE = "session.json"
_LOCK_FILE = "lock"
_ROLLBACK_FILE = "rollback.json"
_REPAIR_LOG = "repair.log"
_SNAPSHOT = re.compile(r"snapshot-(\d{8})\.safetensors")
_LOG = re.compile(r"log-(\d{8})\.wal")
# the temporary files of seqlab.io.atomic_write_bytes for this folder's own files (left by a kill -9)
_TEMP = re.compile(r"\.(session\.json|rollback\.json|snapshot-\d{8}\.safetensors|log-\d{8}\.wal)\..+\.tmp")
_REPAIR_API = (
    "repair it with MemorySession.repair(path) (keeps every event before the damage, moves the damaged bytes aside)"
)
_REPAIR_CLI = (
    "repair it with 'seqlab memory repair SESSION' (keeps every event before the damage, moves the damaged bytes aside)"
)


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


def _span(a: int, b: int) -> str:
    return "no events" if b <= a else f"event {a}" if b == a + 1 else f"events {a}..{b - 1}"


def _check_keep(keep, what: str) -> int | None:
    if keep is not None and (type(keep) is not int or keep < 1):
        raise ConfigError(f"{what} must be an integer >= 1 or None, got {keep!r}")
    return keep


def _check_timeout(timeout) -> None:
    if isinstance(timeout, bool) or (
        timeout is not None and not (isinstance(timeout, (int, float)) and 0 <= timeout < float("inf"))
    ):
        raise ConfigError(f"timeout must be a finite number of seconds >= 0 or None, got {timeout!r}")


def _write_durable(where: Path, data: bytes) -> None:
    with open(where, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _listing(path: Path) -> tuple[list[int], list[int]]:
    """The numbers of the snapshot files and of the log files in the folder, each sorted."""
    names = os.listdir(path)
    snaps = sorted(int(m.group(1)) for n in names if (m := _SNAPSHOT.fullmatch(n)))
    logs = sorted(int(m.group(1)) for n in names if (m := _LOG.fullmatch(n)))
    return snaps, logs


# ------------------------------------------------------------------------------------------------------
# session.json


def _write_session_file(path: Path, meta: dict) -> None:
    atomic_write_bytes(path / _SESSION_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())


def _read_meta(path: Path) -> dict:
    """session.json of the session at ``path``, verified (format, version, checksum)."""
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
        raise FormatVersionError(
            f"{where}: written in {SESSION_FORMAT} format version {version}; this seqlab "
            f"reads up to version {SESSION_VERSION} (upgrade seqlab)"
        )
    if meta.get("checksum") != _json_checksum(meta):
        raise CorruptFileError(f"{where}: checksum mismatch, the file was altered or damaged")
    return meta


def _read_session_meta(path: Path, model, adapter) -> dict:
    """session.json verified (``_read_meta``) and checked to belong to ``model`` and ``adapter``."""
    where = path / _SESSION_FILE
    meta = _read_meta(path)
    require_fingerprint(meta.get("fingerprint"), model, "session", str(where))
    if meta.get("adapter") != adapter.info():
        raise StateMismatchError(
            f"{where}: session was made with adapter {meta.get('adapter')}, this one is {adapter.info()}"
        )
    return meta


def _upgrade_meta(path: Path, meta: dict) -> dict:
    """session.json rewritten at the current format version (when it is older); returns the metadata."""
    if meta.get("format_version", 0) >= SESSION_VERSION:
        return meta
    meta = {**{k: v for k, v in meta.items() if k != "checksum"}, "format_version": SESSION_VERSION}
    meta["checksum"] = _json_checksum(meta)
    _write_session_file(path, meta)
    return meta


def _first_event(meta: dict) -> int:
    """The number of the session's first logged event (a fork starts at its parent's event count)."""
    forked = meta.get("forked_from")
    return int(forked.get("events", 0)) if isinstance(forked, dict) else 0


def _pending_rollback(path: Path) -> int | None:
    """The snapshot a rollback under way returns to (``rollback.json``), or None."""
    where = path / _ROLLBACK_FILE
    try:
        record = json.loads(where.read_bytes())
        target = record["to"]
        if type(target) is not int or target < 0:
            raise TypeError
        # checksummed since format 2 (a flipped digit must not roll back to another snapshot); a bare
        # {"to": n} is what earlier seqlab wrote
        if set(record) != {"to"} and (
            set(record) != {"to", "checksum"} or record["checksum"] != _json_checksum(record)
        ):
            raise ValueError
        return target
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise _damaged(f"{where}: unreadable rollback record") from None


def _write_rollback_intent(path: Path, n: int) -> None:
    intent = {"to": n}
    intent["checksum"] = _json_checksum(intent)
    atomic_write_bytes(path / _ROLLBACK_FILE, json.dumps(intent).encode())


# ------------------------------------------------------------------------------------------------------
# the one writer


def _require_writable(path: Path) -> None:
    """A writer must be able to write the folder (snapshots, logs) before it logs anything: an event logged
    and then reported as failed would be observed twice by a retry."""
    if not os.access(path, os.W_OK | os.X_OK):
        raise _advice(
            PermissionError,
            "the session folder is not writable, so nothing can be observed or saved (nothing was logged)",
            "open it with mode='r' to read",
            "ask and info still work (read-only)",
            code=errno.EACCES,
            filename=path,
        )


def _acquire_lock(path: Path, timeout: float | None) -> int:
    """Take the writer's lock (fcntl.flock on ``lock``; the OS drops it when the writer dies); returns its fd."""
    fd = os.open(path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = None if timeout is None else _time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if deadline is None or _time.monotonic() >= deadline:
                os.close(fd)
                waited = "" if deadline is None else f" (waited {timeout} s)"
                raise _advice(
                    SessionLockedError,
                    f"{path}: another process has this session open for writing{waited}",
                    "open it with mode='r' to read, or pass timeout= to wait",
                    "give --timeout SECONDS to wait for it (ask and info read without waiting)",
                ) from None
            _time.sleep(0.02)


def _release_lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _clean_temp_files(path: Path) -> list[str]:
    """Remove what an atomic write killed midway left in the folder (only the lock holder writes here)."""
    removed = []
    for name in os.listdir(path):
        if _TEMP.fullmatch(name):
            try:
                (path / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def model_for_session(path: str | os.PathLike, model_file: str | os.PathLike | None = None, device=None):
    """``(model, adapter)`` for the session at ``path``: from ``model_file`` when given, else from the model file
    recorded at creation (its sha256 must still match, so a changed file is refused, naming it)."""
    from .base import model_from_checkpoint

    where = Path(path) / _SESSION_FILE
    if model_file is None:
        try:
            meta = json.loads(where.read_bytes())
        except FileNotFoundError:
            raise _advice(
                FileNotFoundError,
                "no memory session here",
                "create it with MemorySession.open(path, model, create=True)",
                "create it with 'seqlab memory observe SESSION --create --model FILE ...'",
                code=errno.ENOENT,
                filename=path,
            ) from None
        except ValueError:
            raise CorruptFileError(f"{where}: not JSON (the file was truncated or altered)") from None
        record = meta.get("model_file") if isinstance(meta, dict) else None
        if not record or not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise _advice(
                ConfigError,
                f"{where}: this session records no model file",
                "give model_file=",
                "give the model with --model FILE",
            )
        model_file = Path(record["path"])
        if not model_file.exists():
            raise _advice(
                FileNotFoundError,
                f"the model file recorded in {where} is gone",
                "give model_file=",
                "give the model with --model FILE",
                code=errno.ENOENT,
                filename=model_file,
            )
        if _file_sha256(model_file) != record.get("sha256"):
            raise _advice(
                StateMismatchError,
                f"{model_file}: the model file changed since session {path} was created (sha256 differs)",
                "give the right one with model_file=",
                "give the right one with --model FILE",
            )
    return model_from_checkpoint(model_file, device=device)
