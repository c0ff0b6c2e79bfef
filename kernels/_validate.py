"""Argument checks shared by every kernel, so each error names the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import KernelInputError


def require_tensor(name: str, x, *, ndim: int | Sequence[int] | None = None, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise KernelInputError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise KernelInputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def require_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], *, what: str = "") -> None:
    """``expected`` may hold ``None`` for a free dimension. ``what`` spells the layout, e.g. "(b, d, l)"."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        want = tuple("*" if e is None else e for e in expected)
        layout = f" {what}" if what else ""
        raise KernelInputError(f"{name} must have shape{layout} {want}, got {shape}")


def require_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise KernelInputError(f"all tensors must be on one device, got {listed}")


def require_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if by <= 0 or value % by != 0:
        raise KernelInputError(f"{name} ({value}) must be divisible by {by_name} ({by})")


def require_optional(name: str, x, expected: Sequence[int | None], *, what: str = "") -> None:
    """Nothing when ``x`` is None; otherwise a floating tensor of exactly this shape (None = free dimension)."""
    if x is None:
        return
    require_tensor(name, x, ndim=len(expected))
    require_shape(name, x, expected, what=what)


def records_grad(*tensors) -> bool:
    """True when autograd is on and any of ``tensors`` (None entries allowed) requires grad: the op must then
    take its differentiable path."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
