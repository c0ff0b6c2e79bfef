"""Memory layouts of (b, d, l) tensors shared by the fast paths.

A Mamba mixer hands the kernels the transpose of a contiguous (b, l, d) projection output ("position-major");
the fast paths work in that layout directly and give their outputs the same layout, so no transpose is paid.
"""

from __future__ import annotations

import torch


def channels_last(x: torch.Tensor) -> bool:
    """True for a (b, d, l) tensor stored position-major, e.g. the transpose of a contiguous (b, l, d)."""
    return x.shape[1] > 1 and x.stride(1) == 1 and x.stride(2) >= x.shape[1]


def empty_like_layout(x: torch.Tensor, dtype) -> torch.Tensor:
    """A fresh dense (b, d, l) tensor, position-major when ``x`` is."""
    b, d, l = x.shape
    if channels_last(x):
        return torch.empty(b, l, d, dtype=dtype, device=x.device).transpose(1, 2)
    return torch.empty(b, d, l, dtype=dtype, device=x.device)
