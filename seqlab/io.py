"""Crash-safe file writes and content checksums shared by states, checkpoints and sessions."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: a temp file whose writer pid is gone is removed at once; one with no pid in its name (older seqlab) or whose
#: pid lives on (perhaps reused) only once it is this old
STALE_AFTER_S = 24 * 3600.0
OLD_STYLE_STALE_AFTER_S = 60.0


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # pragma: no cover - no /proc: the classic read-and-restore
    os.umask(old)
    return old


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep
    return True


def _temp_pattern(name: str) -> re.Pattern:
    """Temp files of target ``name``: ``.{name}.{pid}.{8 chars}.tmp`` (and ``.{name}.{8 chars}.tmp`` of older
    seqlab versions). No other target's temp files match: the middle holds exactly one dot or none."""
    return re.compile(re.escape(f".{name}.") + r"(?:(\d+)\.)?([A-Za-z0-9_]{8})\.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temp files left by interrupted ``atomic_write_bytes`` calls for ``path`` (a killed writer).

    Only temp files of this very target are touched, and only those no live writer holds: the writer's pid
    (part of the name) is dead, or the file is older than ``STALE_AFTER_S``. Returns what was removed."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    pattern = _temp_pattern(path.name)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if not entry.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        pid = match.group(1)
        if pid is None:
            stale = age > OLD_STYLE_STALE_AFTER_S
        else:
            stale = age > STALE_AFTER_S or (int(pid) != os.getpid() and not _pid_alive(int(pid)))
        if stale:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass  # removed by another writer meanwhile, or not ours to remove
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that needs a file name (a library's own writer);
    when the block ends normally the file is fsynced, given the mode a plain ``open(path, "wb")`` would give it
    (an existing file's mode, else ``0o666 & ~umask``) and renamed over ``path``, and the folder is fsynced; on
    any failure the temporary file is removed and the old file is untouched. Temp files ``.{name}.{pid}.{random}
    .tmp`` of earlier writers that were killed are removed first."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    remove_stale_temps(path)
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves either the old file whole or the new one whole.

    The bytes go to a temporary file ``.{name}.{pid}.{random}.tmp`` in the same folder (same filesystem, so
    the rename is atomic), are fsynced, then renamed over ``path``; the folder is fsynced so the rename itself
    survives a power cut. On any failure the temporary file is removed and the old file is untouched; temp
    files of earlier writers that were killed (kill -9, power cut) are removed by the next write to ``path``.
    The file gets the mode a plain ``open(path, "wb")`` would give it: an existing file's mode, else
    ``0o666 & ~umask`` (:func:`atomic_output`).
    """
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(path)


def fsync_dir(folder: str | os.PathLike) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def tensors_checksum(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in the order given (callers sort the names)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def atomic_write_files(folder: Path, files: list[tuple[str, Callable]], remove: Iterable[str] = ()) -> None:
    """Write every ``(name, writer)`` to a temporary file in ``folder`` first (fsynced), then remove the names in
    ``remove`` and rename the temporaries into place in order. An exception while writing removes the
    temporaries and leaves the folder as it was; every file that ends up in the folder is whole. ``writer(handle)``
    writes one file to a binary handle (a sharded checkpoint's shards and index: seqlab.interop.hf)."""
    mode = 0o666 & ~_umask()
    temps: list[tuple[str, str]] = []
    try:
        for name, writer in files:
            remove_stale_temps(folder / name)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=folder)
            temps.append((tmp, name))
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)
                writer(handle)
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for name in remove:
        try:
            os.unlink(folder / name)
        except FileNotFoundError:
            pass
    for tmp, name in temps:
        os.replace(tmp, folder / name)
    fsync_dir(folder)
