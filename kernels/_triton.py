"""When seqlab's Triton kernels can run, and the checks every Triton entry point shares.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set
before ``triton`` is first imported), which is how the test suite checks them on machines without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from .errors import KernelBackendError

__all__ = ["interpreting", "require_triton_device", "triton_available", "triton_import_error"]


@functools.cache
def triton_import_error() -> str | None:
    """None when ``import triton`` works, else the reason it does not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreting() -> bool:
    """True when Triton's interpreter is on (kernels then run on CPU tensors, slowly, for testing)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """True when Triton imports and there is a device its kernels can run on (a CUDA GPU, or the interpreter)."""
    if triton_import_error() is not None:
        return False
    return interpreting() or torch.cuda.is_available()


def require_triton_device(op: str, *tensors) -> None:
    """Refuse tensors the Triton kernels cannot run on, naming the op and the device."""
    if not triton_available():
        reason = triton_import_error() or "no CUDA device is visible and TRITON_INTERPRET is not set"
        raise KernelBackendError(
            f"{op}: the Triton backend is not available here ({reason}); use backend='chunked' or backend='auto'"
        )
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise KernelBackendError(
            f"{op}: the Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"got a tensor on {t.device}; move the inputs with .cuda() or use backend='chunked'"
        )
