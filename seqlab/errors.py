"""The one error hierarchy of seqlab. Every message names the argument, file, record or position at fault.

The kernels room raises its own two base classes (it may not import seqlab); the classes here inherit from
them, so ``except seqlab.errors.InputError`` also catches a bad tensor handed straight to a kernel.
"""

from __future__ import annotations

import errno

from seqlab.kernels.errors import KernelBackendError, KernelInputError


class SeqlabError(Exception):
    """Base class of every error seqlab raises on purpose."""


class ConfigError(SeqlabError, ValueError):
    """A configuration value is invalid or inconsistent; the message names the field."""


class InputError(SeqlabError, KernelInputError):
    """An input (tensor, token ids, file contents) is malformed; the message says where."""


class StateError(SeqlabError, ValueError):
    """A recurrent state cannot be used the way it was asked (e.g. streaming a bidirectional model)."""


class StateMismatchError(StateError):
    """A state was made by another model config, for another batch size, or on another device."""


class CorruptFileError(SeqlabError, ValueError):
    """A file is truncated, altered, of an unknown format or of a newer format version; nothing was loaded."""


class FormatVersionError(CorruptFileError):
    """A file was written by a newer seqlab format version than this one reads."""


class SessionLockedError(SeqlabError):
    """Another process holds an agent memory session open for writing."""


class BackendUnavailableError(SeqlabError, KernelBackendError):
    """The requested compute backend cannot run here."""


#: OSError kinds a user or the machine causes (a path of the wrong kind, no permission, a full or read-only disk, a
#: device that fails to read ...): the command line shows one line naming the path, and a Ray job raises them to its
#: caller as themselves. Others (EBADF, EINVAL, a broken pipe ...) point at our code: their traceback shows.
_USER_OS_NAMES = (
    "ENOENT EACCES EPERM EISDIR ENOTDIR ENOSPC EDQUOT EROFS ELOOP ENAMETOOLONG EEXIST ENOTEMPTY EFBIG EMLINK EXDEV "
    "ETXTBSY EBUSY EIO ENXIO ENODEV ESTALE"
)
USER_OS_ERRORS = frozenset(getattr(errno, name) for name in _USER_OS_NAMES.split() if hasattr(errno, name))
#: raised by our own code with a message and no errno (``FileNotFoundError("x: no checkpoint here")``)
USER_OS_CLASSES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_user_os_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError a user or the machine caused (see :data:`USER_OS_ERRORS`)."""
    return isinstance(exc, OSError) and (exc.errno in USER_OS_ERRORS or isinstance(exc, USER_OS_CLASSES))


__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "CorruptFileError",
    "FormatVersionError",
    "InputError",
    "SeqlabError",
    "SessionLockedError",
    "StateError",
    "StateMismatchError",
    "USER_OS_CLASSES",
    "USER_OS_ERRORS",
    "is_user_os_error",
]
