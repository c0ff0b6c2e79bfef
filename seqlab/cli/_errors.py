"""The command line's front door for errors: which exceptions are a user's mistake (one line on stderr, exit code
2) and how each kind is worded; everything else is a bug of seqlab, whose traceback shows."""

from __future__ import annotations

import errno
import os

from seqlab._deps import missing_extra

#: what torch says when an allocation fails (CPU: RuntimeError from DefaultCPUAllocator; CUDA: OutOfMemoryError,
#: a RuntimeError subclass)
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Cannot allocate memory")


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user (or the machine) caused, None for a bug."""
    from seqlab.errors import SeqlabError, is_user_os_error

    if isinstance(exc, SeqlabError):
        return str(exc)
    if isinstance(exc, OSError):  # FileNotFoundError, PermissionError, IsADirectoryError, ENOSPC ...
        return _os_message(exc) if is_user_os_error(exc) else None
    if isinstance(exc, UnicodeError):  # undecodable input text, or a command-line argument that is not valid text
        return _decode_message(exc)
    if isinstance(exc, ValueError):  # a path with a NUL character (from --config: TOML strings may hold one)
        if "embedded null" not in str(exc):
            return None
        return f"a path holds a NUL character ({exc}): {_path_in_traceback(exc) or 'check the paths given'}"
    if isinstance(exc, MemoryError):  # numpy's "Unable to allocate ..." is one
        return _memory_message(exc)
    if isinstance(exc, RuntimeError):  # torch's failed allocations; any other RuntimeError is a bug
        return _memory_message(exc) if any(marker in str(exc) for marker in _OUT_OF_MEMORY) else None
    if isinstance(exc, ModuleNotFoundError):
        return missing_extra(exc)
    return None


def _os_message(exc: OSError) -> str:
    """``PATH: what went wrong`` (both paths of a rename or link)."""
    if exc.errno is None:  # raised by our code with its own message
        return str(exc)
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason += " (free space, then run the command again)"
    where = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if p is not None]
    if not where:  # a read or write on an open file: the file our code had in hand
        where = [p for p in [_path_in_traceback(exc)] if p]
    return f"{' -> '.join(where)}: {reason}" if where else f"{reason} ({exc})"


def _decode_message(exc: UnicodeError) -> str:
    """Undecodable (or unencodable) text, naming the file being read when our code had one in hand."""
    kind = "decode" if isinstance(exc, UnicodeDecodeError) else "encode"
    position = getattr(exc, "start", None)
    encoding, reason = getattr(exc, "encoding", "utf-8"), getattr(exc, "reason", str(exc))
    text = f"cannot {kind} text as {encoding}: {reason}" + (f" at position {position}" if position is not None else "")
    path = _path_in_traceback(exc)
    return f"{path}: {text}" if path else f"{text} (input text must be {encoding})"


def _path_in_traceback(exc: BaseException) -> str | None:
    """The innermost file path (a local ``path``/``filename``/``file`` naming an existing file) of the frames
    ``exc`` went through, if any."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        for name in ("path", "filename", "file", "source"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
                try:
                    if os.path.isfile(value):
                        found = os.fspath(value)
                        break
                except (OSError, ValueError, TypeError):
                    pass
        tb = tb.tb_next
    return found


def _memory_message(exc: BaseException) -> str:
    detail = " ".join(str(exc).split())
    detail = detail.split(" (Triggered internally", 1)[0][:300]
    return (
        "out of memory"
        + (f": {detail}" if detail else "")
        + "; use a smaller model, batch, window or length (or more memory)"
    )
