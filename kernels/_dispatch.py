"""The dispatcher behind ``seqlab.kernels``: each public op picks its backend here (see the package docstring)."""

from __future__ import annotations

from typing import Callable

import torch

from ._triton import triton_available
from .errors import KernelBackendError, KernelInputError
from . import selective_scan as _selective_scan_pkg  # noqa: F401 (loaded first, so the package re-exports the function, not the subpackage, under this name)

BACKENDS = ("auto", "ref", "torch", "triton")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn ``backend`` (one of BACKENDS) into the concrete backend for these tensors."""
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        from ._triton import triton_import_error

        reason = triton_import_error() or "no CUDA device is visible and TRITON_INTERPRET is not set"
        raise KernelBackendError(
            f"backend='triton' was asked for, but seqlab's Triton kernels cannot run here ({reason}); "
            "use backend='torch' (vectorised PyTorch, any device) or backend='auto'"
        )
    return backend


def _pick(op: str, backend: str, tensors, table: dict[str, Callable]) -> Callable:
    chosen = resolve_backend(backend, *tensors)
    if chosen == "triton":
        # imported only when asked for, so CPU users never pay for (or depend on) importing triton
        import importlib

        module = importlib.import_module(f".{op_module(op)}.triton", __package__)
        return getattr(module, f"{op}_triton")
    try:
        return table[chosen]
    except KeyError:  # pragma: no cover - every op registers every backend it has
        raise KernelBackendError(f"{op} has no {chosen!r} implementation") from None


_OP_MODULES = {
    "selective_scan": "selective_scan", "selective_state_update": "selective_scan",
    "ssd_scan": "ssd", "ssd_state_update": "ssd",
    "causal_conv1d": "conv1d", "causal_conv1d_update": "conv1d",
}


def op_module(op: str) -> str:
    """The kernels subpackage that holds ``op``."""
    return _OP_MODULES[op]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, *, backend="auto"):
    """Mamba-1 selective scan. Returns y (b, d, l), or (y, final_state) with ``return_final_state``."""
    from .selective_scan import ref, torch as fast

    fn = _pick("selective_scan", backend, (u,), {"ref": ref.selective_scan_ref, "torch": fast.selective_scan_torch})
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              initial_state=initial_state, return_final_state=return_final_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                           backend="auto"):
    """One Mamba-1 decode step: state (b, d, n), x/dt/z (b, d), B/C (b, n) or (b, g, n) -> (y, new_state)."""
    from .selective_scan import ref, torch as fast

    fn = _pick("selective_state_update", backend, (x,),
               {"ref": ref.selective_state_update_ref, "torch": fast.selective_state_update_torch})
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
             initial_state=None, return_final_state=False, *, backend="auto"):
    """Mamba-2 SSD scan. Returns y (b, l, h, p), or (y, final_state) with ``return_final_state``."""
    from .ssd import ref, torch as fast

    fn = _pick("ssd_scan", backend, (x,), {"ref": ref.ssd_scan_ref, "torch": fast.ssd_scan_torch})
    return fn(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
              initial_state=initial_state, return_final_state=return_final_state)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                     backend="auto"):
    """One Mamba-2 decode step: state (b, h, p, n), x/z (b, h, p), dt (b, h), B/C (b, g, n) -> (y, new_state)."""
    from .ssd import ref, torch as fast

    fn = _pick("ssd_state_update", backend, (x,),
               {"ref": ref.ssd_state_update_ref, "torch": fast.ssd_state_update_torch})
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False, *,
                  backend="auto"):
    """Causal depthwise conv1d over (b, d, l). Returns y, or (y, final_state (b, d, w - 1))."""
    from .conv1d import ref, torch as fast

    fn = _pick("causal_conv1d", backend, (x,), {"ref": ref.causal_conv1d_ref, "torch": fast.causal_conv1d_torch})
    return fn(x, weight, bias=bias, activation=activation, initial_state=initial_state,
              return_final_state=return_final_state)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, backend="auto"):
    """One conv step: x (b, d), conv_state (b, d, w - 1) -> (y (b, d), new_state)."""
    from .conv1d import ref, torch as fast

    fn = _pick("causal_conv1d_update", backend, (x,),
               {"ref": ref.causal_conv1d_update_ref, "torch": fast.causal_conv1d_update_torch})
    return fn(x, conv_state, weight, bias=bias, activation=activation)
