"""Causal depthwise conv1d: the sequential reference (the truth every faster path is tested against).

Semantics follow mamba_ssm's ``causal_conv1d_fn`` / ``causal_conv1d_update``:

    y_t = bias + sum_{k=0}^{w-1} weight[:, k] * x_{t - (w-1) + k}        x (b, d, l), weight (d, w)

Inputs before position 0 come from ``initial_state`` (b, d, w - 1), the previous w - 1 inputs in time order
(zeros when None). ``final_state`` is the last w - 1 inputs of ``[initial_state, x]``, so it is right even when
l < w - 1. ``activation`` is None or "silu" (alias "swish"). Arithmetic is float32 (float64 when any input is
float64); ``y`` comes back in ``x.dtype``. The state holds raw inputs and keeps the dtype of the state passed in
(``x.dtype`` when none is).

The argument checks of the op live here (``check_conv_args``, ``check_conv_update_args``) and the fast path
imports them, so both paths accept and refuse exactly the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import require_optional, require_same_device, require_shape, require_tensor
from .._varlen import check_cu_seqlens
from ..errors import KernelInputError

__all__ = [
    "ACTIVATIONS",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "check_activation",
    "check_conv_args",
    "check_conv_update_args",
    "compute_dtype",
]

ACTIVATIONS = (None, "silu", "swish")


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (fp16/bf16 inputs are computed in fp32)."""
    return (
        torch.float64
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def check_activation(activation) -> bool:
    """Validate ``activation``; returns True when silu is to be applied."""
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _check_weight_bias(weight, bias, d):
    require_tensor("weight", weight, ndim=2)
    require_shape("weight", weight, (d, None), what="(d, w)")
    w = weight.shape[1]
    if w < 1:
        raise KernelInputError(
            f"weight must have at least one tap: shape (d, w) with w >= 1, got {tuple(weight.shape)}"
        )
    require_optional("bias", bias, (d,), what="(d,)")
    return w


def check_conv_args(x, weight, bias=None, activation=None, initial_state=None, cu_seqlens=None):
    """Validate the causal-conv arguments; returns (b, d, l, w, apply_silu). With ``cu_seqlens`` (packed rows)
    it is checked too and ``initial_state`` must have one row per sequence, (N, d, w - 1)."""
    require_tensor("x", x, ndim=3)
    b, d, l = x.shape
    w = _check_weight_bias(weight, bias, d)
    silu = check_activation(activation)
    if cu_seqlens is None:
        require_optional("initial_state", initial_state, (b, d, w - 1), what="(b, d, w - 1)")
    else:
        from ..scan.ref import check_packed_state

        cu = check_cu_seqlens(cu_seqlens, b, l)
        check_packed_state("initial_state", initial_state, cu.numel() - 1, (d, w - 1), "(N, d, w - 1)")
    require_same_device(x=x, weight=weight, bias=bias, initial_state=initial_state)
    return b, d, l, w, silu


def check_conv_update_args(x, conv_state, weight, bias=None, activation=None):
    """Validate the conv decode-step arguments; returns (b, d, w, apply_silu)."""
    require_tensor("x", x, ndim=2)
    b, d = x.shape
    w = _check_weight_bias(weight, bias, d)
    silu = check_activation(activation)
    require_tensor("conv_state", conv_state, ndim=3)
    require_shape("conv_state", conv_state, (b, d, w - 1), what="(b, d, w - 1)")
    require_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias)
    return b, d, w, silu


def causal_conv1d_ref(
    x, weight, bias=None, activation=None, initial_state=None, return_final_state=False, *, cu_seqlens=None
):
    """Sequential causal depthwise conv1d. Returns y (b, d, l) in x.dtype, or (y, final_state (b, d, w - 1)).

    ``cu_seqlens`` (N + 1,) (packed rows, batch 1): each sequence is convolved on its own (the reference is
    written as that loop), starting from ``initial_state[i]`` ((N, d, w - 1)) or zeros; the final state is
    (N, d, w - 1), one per sequence."""
    b, d, l, w, silu = check_conv_args(x, weight, bias, activation, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        cu = [int(v) for v in cu_seqlens.tolist()]
        outs = [
            causal_conv1d_ref(
                x[:, :, s:e],
                weight,
                bias,
                activation,
                None if initial_state is None else initial_state[i : i + 1],
                return_final_state=True,
            )
            for i, (s, e) in enumerate(zip(cu[:-1], cu[1:]))
        ]
        y = torch.cat([o[0] for o in outs], dim=-1)
        return (y, torch.cat([o[1] for o in outs], dim=0)) if return_final_state else y
    cdt = compute_dtype(x, weight, bias, initial_state)
    wt = weight.to(cdt)
    prev = x.new_zeros(b, d, w - 1, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    full = torch.cat([prev, x.to(cdt)], dim=-1)  # (b, d, w - 1 + l); position t of x is column t + w - 1
    ys = []
    # window t holds positions t - (w-1) .. t; unbind keeps autograd through the loop linear in l
    for window in full.unfold(-1, w, 1).unbind(2) if l else ():
        acc = (window * wt).sum(-1)
        if bias is not None:
            acc = acc + bias.to(cdt)
        ys.append(acc)
    y = torch.stack(ys, dim=-1) if ys else full.new_zeros(b, d, 0)
    if silu:
        y = F.silu(y)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    state_dtype = initial_state.dtype if initial_state is not None else x.dtype
    return y, full[:, :, l:].to(state_dtype).clone()


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One conv step: x (b, d), conv_state (b, d, w - 1) -> (y (b, d) in x.dtype, new_state); the state passed
    in is not touched and the new state keeps its dtype."""
    b, d, w, silu = check_conv_update_args(x, conv_state, weight, bias, activation)
    cdt = compute_dtype(x, conv_state, weight, bias)
    window = torch.cat([conv_state.to(cdt), x.to(cdt)[:, :, None]], dim=-1)  # (b, d, w)
    y = (window * weight.to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), window[:, :, 1:].to(conv_state.dtype).clone()
