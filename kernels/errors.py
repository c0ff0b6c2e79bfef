"""Errors raised by the kernels room.

The kernels room sits below ``seqlab`` and may not import it, so it carries its own two base classes.
``seqlab.errors`` makes its ``InputError`` and ``BackendUnavailableError`` subclasses of these, so a user
catching the ``seqlab`` hierarchy also catches kernel errors.
"""


class KernelInputError(ValueError):
    """A tensor handed to a kernel has the wrong shape, dtype or device; the message names the argument."""


class KernelBackendError(RuntimeError):
    """The requested backend cannot run here (e.g. Triton on a machine without it)."""
