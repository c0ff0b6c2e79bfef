"""Comparison helpers and shared inputs for the kernel tests (torch and Triton paths alike)."""

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


def scan_inputs(b=2, d=4, n=3, l=37, *, gB=None, gC=None, D=True, z=True, bias=True, init=True,
                dtype=torch.float32, seed=0, delta_scale=0.5, a_range=(-2.0, -0.1), positive_delta=False):
    """Random selective-scan inputs (u, delta, A, B, C, D, z, delta_bias, initial_state) on the CPU; each optional
    input can be switched off, B / C grouped with gB / gC groups."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    lo, hi = a_range
    inputs = {
        "u": r(b, d, l),
        "delta": (r(b, d, l).abs() if positive_delta else r(b, d, l)) * delta_scale,
        "A": lo + (hi - lo) * torch.rand(d, n, generator=gen),
        "B": r(b, n, l) if gB is None else r(b, gB, n, l),
        "C": r(b, n, l) if gC is None else r(b, gC, n, l),
        "D": r(d) if D else None,
        "z": r(b, d, l) if z else None,
        "delta_bias": r(d) * 0.3 if bias else None,
        "initial_state": r(b, d, n) if init else None,
    }
    return {k: (None if v is None else v.to(dtype)) for k, v in inputs.items()}
