"""Mamba-1 selective scan: the sequential reference (the truth every faster path is tested against).

Plain loops over time, written for clarity, differentiable with autograd and exact in float64. Semantics
follow mamba_ssm's ``selective_scan_fn`` / ``selective_state_update`` (real A only):

    delta <- delta + delta_bias[:, None];  delta <- softplus(delta) if delta_softplus
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        per (batch, channel, state)
    y_t    = sum_n h_t * C_t + D * u_t;   out_t = y_t * silu(z_t) if z is given

B and C are (b, n, l) or grouped (b, g, n, l): channel ``i`` reads group ``i // (d // g)``.
The state is kept in float32 (float64 when any input is float64) whatever the input dtype; the output is
cast back to ``u.dtype``.

The argument checks of the op live here too (``check_scan_args``, ``check_state_update_args``): the fast
path imports them, so both paths accept and refuse exactly the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dt import prepare_dt
from .._states_at import check_positions
from .._validate import require_divisible, require_optional, require_same_device, require_shape, require_tensor
from .._varlen import check_cu_seqlens
from ..errors import KernelInputError

__all__ = [
    "check_packed_state",
    "check_scan_args",
    "check_state_update_args",
    "compute_dtype",
    "selective_scan_ref",
    "selective_state_update_ref",
]


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (fp16/bf16 inputs are computed in fp32)."""
    return (
        torch.float64
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def _require_real(name: str, x) -> None:
    if isinstance(x, torch.Tensor) and x.is_complex():
        raise KernelInputError(
            f"{name} must be a real floating-point tensor, got dtype {x.dtype} "
            "(the complex-valued Mamba variant is not supported)"
        )


def _check_groups(name: str, X: torch.Tensor, d: int) -> int:
    g = X.shape[1]
    require_divisible("d (channels of u)", d, f"the number of groups g of {name}", g)
    return g


def check_packed_state(name: str, state, rows: int, rest: tuple, what: str) -> None:
    """Packed rows: ``state`` (None or a tensor of ``rows`` = N rows, one per sequence of cu_seqlens, then ``rest``)."""
    if state is None:
        return
    require_tensor(name, state, ndim=1 + len(rest))
    if tuple(state.shape) != (rows, *rest):
        raise KernelInputError(
            f"{name} must have shape {what} = {(rows, *rest)} with packed rows: one row per sequence of "
            f"cu_seqlens (N = {rows}), not one per batch row; got {tuple(state.shape)}"
        )


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, cu_seqlens=None):
    """Validate the selective-scan arguments; returns (b, d, l, n). With ``cu_seqlens`` (packed rows) it is
    checked too and ``initial_state`` must have one row per sequence, (N, d, n)."""
    require_tensor("u", u, ndim=3)
    b, d, l = u.shape
    require_tensor("delta", delta, ndim=3)
    require_shape("delta", delta, (b, d, l), what="(b, d, l)")
    _require_real("A", A)
    require_tensor("A", A, ndim=2)
    require_shape("A", A, (d, None), what="(d, n)")
    n = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        _require_real(name, X)
        require_tensor(name, X, ndim=(3, 4))
        if X.dim() == 3:
            require_shape(name, X, (b, n, l), what="(b, n, l)")
        else:
            require_shape(name, X, (b, None, n, l), what="(b, g, n, l)")
            _check_groups(name, X, d)
    require_optional("D", D, (d,), what="(d,)")
    require_optional("z", z, (b, d, l), what="(b, d, l)")
    require_optional("delta_bias", delta_bias, (d,), what="(d,)")
    if cu_seqlens is None:
        require_optional("initial_state", initial_state, (b, d, n), what="(b, d, n)")
    else:
        cu = check_cu_seqlens(cu_seqlens, b, l)
        check_packed_state("initial_state", initial_state, cu.numel() - 1, (d, n), "(N, d, n)")
    require_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    return b, d, l, n


def check_state_update_args(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """Validate the decode-step arguments; returns (b, d, n)."""
    require_tensor("x", x, ndim=2)
    b, d = x.shape
    require_tensor("dt", dt, ndim=2)
    require_shape("dt", dt, (b, d), what="(b, d)")
    _require_real("A", A)
    require_tensor("A", A, ndim=2)
    require_shape("A", A, (d, None), what="(d, n)")
    n = A.shape[1]
    require_tensor("state", state, ndim=3)
    require_shape("state", state, (b, d, n), what="(b, d, n)")
    for name, X in (("B", B), ("C", C)):
        _require_real(name, X)
        require_tensor(name, X, ndim=(2, 3))
        if X.dim() == 2:
            require_shape(name, X, (b, n), what="(b, n)")
        else:
            require_shape(name, X, (b, None, n), what="(b, g, n)")
            _check_groups(name, X, d)
    require_optional("D", D, (d,), what="(d,)")
    require_optional("z", z, (b, d), what="(b, d)")
    require_optional("dt_bias", dt_bias, (d,), what="(d,)")
    require_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    return b, d, n


def _per_channel(X: torch.Tensor, d: int, group_dim: int) -> torch.Tensor:
    """Spread the groups of B/C over channels: channel i reads group i // (d // g)."""
    return X.repeat_interleave(d // X.shape[group_dim], dim=group_dim)


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
    states_at=None,
    cu_seqlens=None,
):
    """Sequential Mamba-1 selective scan. Returns out (b, d, l) in u.dtype, or (out, final_state (b, d, n)).

    ``states_at`` (strictly increasing positions in 1..l): also return the states after those positions,
    (b, k, d, n), as the last item: (out, final_state, states) or (out, states).

    ``cu_seqlens`` (N + 1,) (packed rows, batch 1): the walk restarts the state at every sequence start (from
    zeros or ``initial_state[i]``, (N, d, n)) and keeps the state after every sequence's last position: the
    final state is (N, d, n)."""
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    if cu_seqlens is not None and states_at is not None:
        raise KernelInputError("states_at cannot be combined with cu_seqlens (packed rows)")
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u_ = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A_ = A.to(cdt)
    Bd = _per_channel(B.to(cdt) if B.dim() == 4 else B.to(cdt)[:, None], d, 1)  # (b, d, n, l)
    Cd = _per_channel(C.to(cdt) if C.dim() == 4 else C.to(cdt)[:, None], d, 1)
    h = u_.new_zeros(b, d, n) if initial_state is None or cu_seqlens is not None else initial_state.to(cdt)
    wanted = set() if states_at is None else set(check_positions(states_at, l))
    kept = []
    ys = []
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    if cu_seqlens is not None:
        cu = [int(v) for v in cu_seqlens.tolist()]
        starts = {s: i for i, s in enumerate(cu[:-1])}
        ends = {e - 1: i for i, e in enumerate(cu[1:])}
        finals = [None] * len(starts)
    # unbind (not x[..., t]) so that autograd through the loop stays linear in l
    for t, (dt_t, u_t, B_t, C_t) in enumerate(zip(dt.unbind(-1), u_.unbind(-1), Bd.unbind(-1), Cd.unbind(-1))):
        if t in starts:  # packed rows: sequence i starts here, from its own initial state
            i = starts[t]
            h = u_.new_zeros(b, d, n) if initial_state is None else initial_state[i : i + 1].to(cdt)
        decay = torch.exp(dt_t[:, :, None] * A_)
        h = decay * h + (dt_t * u_t)[:, :, None] * B_t
        ys.append((h * C_t).sum(-1))
        if t + 1 in wanted:
            kept.append(h)
        if t in ends:
            finals[ends[t]] = h
    y = torch.stack(ys, dim=-1) if ys else u_.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(u.dtype)
    final = h if l or initial_state is None else h.clone()
    if cu_seqlens is not None:
        final = torch.cat(finals, dim=0)
    if states_at is not None:
        states = torch.stack(kept, dim=1) if kept else h.new_zeros(b, 0, d, n)
        return (out, final, states) if return_final_state else (out, states)
    if return_final_state:
        return out, final
    return out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One Mamba-1 decode step. Returns (y (b, d) in x.dtype, new_state (b, d, n)); ``state`` is not touched.

    The new state is float32, or float64 when any input (the state included) is float64.
    """
    b, d, n = check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    cdt = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    x_ = x.to(cdt)
    dt_ = prepare_dt(dt, dt_bias, dt_softplus, cdt)
    Bd = _per_channel(B.to(cdt) if B.dim() == 3 else B.to(cdt)[:, None], d, 1)  # (b, d, n)
    Cd = _per_channel(C.to(cdt) if C.dim() == 3 else C.to(cdt)[:, None], d, 1)
    new_state = torch.exp(dt_[:, :, None] * A.to(cdt)) * state.to(cdt) + (dt_ * x_)[:, :, None] * Bd
    y = (new_state * Cd).sum(-1)
    if D is not None:
        y = y + D.to(cdt) * x_
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype), new_state
