"""The step-size preprocessing every Mamba op shares: dt + dt_bias, then softplus, in the compute dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_dt(dt: torch.Tensor, dt_bias, dt_softplus: bool, cd: torch.dtype) -> torch.Tensor:
    """dt in the compute dtype, with the bias (over the last dim) added and softplus applied (threshold 20,
    as mamba_ssm)."""
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt
