"""Comparison helpers for the selective-scan and causal-conv1d kernel tests."""

from __future__ import annotations

import torch

from seqlab.testing import assert_rel, rel_err  # noqa: F401  (re-exported for the kernel tests)


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
