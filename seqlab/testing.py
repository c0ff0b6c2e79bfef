"""Comparison helpers for checking a fast path against its reference twin (used by seqlab's own tests)."""

from __future__ import annotations

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64 (the absolute error when ``want`` is all zeros)."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    if want.numel() == 0:
        return 0.0
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    """Fail with the measured error when ``rel_err(got, want) > tol`` (NaN or inf in ``got`` always fails)."""
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
