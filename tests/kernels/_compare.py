"""Comparison helpers for the selective-scan and causal-conv1d kernel tests."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64; 0 for empty tensors)."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    if expected.numel() == 0:
        return 0.0
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert torch.isfinite(a).all(), "non-finite values in the result"
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def as_f64(x):
    return None if x is None else x.detach().to(torch.float64)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same (b, d, l) values stored position-major: the transpose of a contiguous (b, l, d)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view with gaps (every other element of a larger tensor)."""
    big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    view = big[..., ::2]
    view.copy_(x)
    return view
