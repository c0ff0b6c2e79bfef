"""What every mixer provides, and the dt/A initialisation both Mamba mixers share."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import InputError

LayerState = dict[str, torch.Tensor]


class Mixer(nn.Module):
    """Base class: (b, l, d_model) -> (b, l, d_model) with a carried per-layer state."""

    backend: str = "auto"
    # A perturbation hook, ``perturb(site, tensor) -> tensor``, called at this mixer's named sites (DRµGS,
    # seqlab.decoding.drugs, installs it for a while). None, the default, costs one attribute test per call.
    _perturb: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def init_state(self, batch_size: int, device=None) -> LayerState:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self,
        hidden: torch.Tensor,
        state: LayerState | None = None,
        return_state: bool = True,
        states_at=None,
        cu_seqlens: torch.Tensor | None = None,
    ):
        """(out, new_state); ``states_at``: also the states after those positions; ``cu_seqlens`` (checked int64,
        hidden of batch 1): packed rows, ``state`` and the new state with one row per sequence (docs/packing.md).
        A mixer without packed support raises TypeError on ``cu_seqlens``; ``generate.prefill`` then falls back
        to one prompt at a time."""
        raise NotImplementedError  # pragma: no cover - abstract

    def step(self, hidden: torch.Tensor, state: LayerState):  # pragma: no cover - abstract
        raise NotImplementedError


def check_states_at(states_at, length: int) -> tuple[int, ...]:
    """``states_at`` as a tuple of ints, strictly increasing, each in ``1..length`` (the state after the first p
    elements of a call of ``length``); InputError naming the offending value otherwise."""
    if isinstance(states_at, (str, bytes, torch.Tensor)) or not hasattr(states_at, "__iter__"):
        raise InputError(f"states_at must be a list of int positions, got {type(states_at).__name__}")
    positions: list[int] = []
    for i, p in enumerate(states_at):
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise InputError(f"states_at[{i}] = {p!r} is not an int position")
        p = int(p)
        if not 1 <= p <= length:
            raise InputError(f"states_at[{i}] = {p} is outside 1..{length} (the number of elements in this call)")
        if positions and p <= positions[-1]:
            raise InputError(
                f"states_at[{i}] = {p} does not come after states_at[{i - 1}] = {positions[-1]}: positions must be "
                "strictly increasing (sorted, no repeats)"
            )
        positions.append(p)
    return tuple(positions)


def init_dt_bias(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (the Mamba initialisation)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def project_rows(linear: nn.Linear, hidden: torch.Tensor, sizes) -> list[torch.Tensor]:
    """``torch.split(linear(hidden), sizes, -1)``, computed as one GEMM per row slice of the weight.

    The numbers are those of the fused projection, but each part comes out contiguous: on CPU, elementwise
    ops on strided slices of the fused output (SiLU(z), the conv taps, the scan's inputs) ran up to 3x slower,
    and the whole Mamba-2 model gained about 10% (A/B in one process).
    """
    if not isinstance(linear, nn.Linear):  # a quantized layer (seqlab.quant.AQLMLinear): one call, then split
        return [part.contiguous() for part in torch.split(linear(hidden), list(sizes), dim=-1)]
    weight, bias = linear.weight, linear.bias
    parts, start = [], 0
    for size in sizes:
        stop = start + size
        parts.append(F.linear(hidden, weight[start:stop], None if bias is None else bias[start:stop]))
        start = stop
    return parts


def project_no_bias(linear: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden @ W.T`` without the layer's bias (Mamba-1's dt_proj: its bias goes into the scan as ``delta_bias``).
    An ``nn.Linear`` is computed on its weight; any other layer (seqlab.quant.AQLMLinear) by its ``matmul``."""
    if isinstance(linear, nn.Linear):
        return F.linear(hidden, linear.weight)
    return linear.matmul(hidden)  # type: ignore[operator]
