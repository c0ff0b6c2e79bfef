"""Mamba-2 SSD (state space duality) scan: the sequential reference, the truth every fast path is tested against.

Per head (head i reads group i // (h / g) of B and C), with dt = softplus?(dt + dt_bias):

    state_t (p, n) = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)
    y_t (p,)       = state_t @ C_t + D * x_t,        then y_t *= silu(z_t) when z is given

The math runs in float64 when any input is float64 and in float32 otherwise (fp16/bf16 included); y is cast back
to x.dtype, the state stays in the compute dtype. The argument checks here are shared with the chunked path.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._dt import prepare_dt  # noqa: F401  (re-exported for the chunked path)
from .._states_at import check_positions
from .._validate import require_divisible, require_optional, require_same_device, require_shape, require_tensor
from .._varlen import check_cu_seqlens
from ..errors import KernelInputError

__all__ = ["ssd_scan_ref", "ssd_state_update_ref"]


@dataclass(frozen=True)
class ScanDims:
    b: int
    l: int
    h: int
    p: int
    g: int
    n: int
    compute_dtype: torch.dtype


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any tensor is float64, else float32: states are never accumulated below float32."""
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32


def _check_d(D, h: int, p: int) -> None:
    if D is None:
        return
    require_tensor("D", D, ndim=(1, 2))
    if D.dim() == 1:
        require_shape("D", D, (h,), what="(h,)")
    else:
        require_shape("D", D, (h, p), what="(h, p)")


def check_scan_args(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_state=None) -> ScanDims:
    """Validate ssd_scan arguments; every failure is a KernelInputError naming the argument."""
    require_tensor("x", x, ndim=4)
    b, l, h, p = x.shape
    require_tensor("dt", dt, ndim=3)
    require_shape("dt", dt, (b, l, h), what="(b, l, h)")
    require_tensor("A", A, ndim=1)
    require_shape("A", A, (h,), what="(h,)")
    require_tensor("B", B, ndim=4)
    require_shape("B", B, (b, l, None, None), what="(b, l, g, n)")
    g, n = B.shape[2], B.shape[3]
    require_tensor("C", C, ndim=4)
    require_shape("C", C, (b, l, g, n), what="(b, l, g, n)")
    require_divisible("x.shape[2] (heads h)", h, "B.shape[2] (groups g)", g)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise KernelInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_d(D, h, p)
    require_optional("z", z, (b, l, h, p), what="(b, l, h, p)")
    require_optional("dt_bias", dt_bias, (h,), what="(h,)")
    require_optional("initial_state", initial_state, (b, h, p, n), what="(b, h, p, n)")
    require_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    cd = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    return ScanDims(b, l, h, p, g, n, cd)


def check_packed_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, states_at, cu_seqlens):
    """Validate a packed call (``cu_seqlens``: batch 1, sequences end to end; see kernels/_varlen.py).

    Returns (dims, cu_seqlens as int64 on x's device, number of sequences N); ``initial_state`` must have N rows
    (N, h, p, n), one per sequence, and ``states_at`` is refused."""
    dims = check_scan_args(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias)
    if states_at is not None:
        raise KernelInputError("states_at cannot be combined with cu_seqlens/seq_idx (packed rows)")
    cu = check_cu_seqlens(cu_seqlens, dims.b, dims.l)
    N = cu.numel() - 1
    require_optional(
        "initial_state",
        initial_state,
        (N, dims.h, dims.p, dims.n),
        what=f"(N, h, p, n), one row per packed sequence (N = {N} from cu_seqlens)",
    )
    require_same_device(x=x, initial_state=initial_state)
    cd = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    dims = ScanDims(dims.b, dims.l, dims.h, dims.p, dims.g, dims.n, cd)
    return dims, cu.to(device=x.device, dtype=torch.int64), N


def check_step_args(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> ScanDims:
    """Validate ssd_state_update arguments (one element: l == 1 in the returned dims)."""
    require_tensor("state", state, ndim=4)
    b, h, p, n = state.shape
    require_tensor("x", x, ndim=3)
    require_shape("x", x, (b, h, p), what="(b, h, p)")
    require_tensor("dt", dt, ndim=2)
    require_shape("dt", dt, (b, h), what="(b, h)")
    require_tensor("A", A, ndim=1)
    require_shape("A", A, (h,), what="(h,)")
    require_tensor("B", B, ndim=3)
    require_shape("B", B, (b, None, n), what="(b, g, n)")
    g = B.shape[1]
    require_tensor("C", C, ndim=3)
    require_shape("C", C, (b, g, n), what="(b, g, n)")
    require_divisible("state.shape[1] (heads h)", h, "B.shape[1] (groups g)", g)
    _check_d(D, h, p)
    require_optional("z", z, (b, h, p), what="(b, h, p)")
    require_optional("dt_bias", dt_bias, (h,), what="(h,)")
    require_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    cd = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    return ScanDims(b, 1, h, p, g, n, cd)


def d_as_hp(D, cd: torch.dtype):
    """D as (h, p) or (h, 1), so that it broadcasts against (..., h, p)."""
    if D is None:
        return None
    D = D.to(cd)
    return D if D.dim() == 2 else D[:, None]


def _step(state, x, dt, A, B, C):
    """One recurrence step in the compute dtype: state (b, h, p, n), x (b, h, p), dt (b, h), B/C (b, h, n)."""
    decay = torch.exp(dt * A)  # (b, h)
    state = state * decay[:, :, None, None] + (dt[:, :, None] * x)[:, :, :, None] * B[:, :, None, :]
    y = (state * C[:, :, None, :]).sum(-1)
    return y, state


def ssd_scan_ref(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
    states_at=None,
    cu_seqlens=None,
):
    """Sequential SSD scan, one time step at a time. ``chunk_size`` is validated and otherwise unused.

    ``states_at`` (strictly increasing positions in 1..l): also return the states after those positions,
    (b, k, h, p, n), as the last item: (y, final_state, states) or (y, states).

    ``cu_seqlens`` (packed rows, batch 1, kernels/_varlen.py): the walk restarts the state at every sequence start
    (from zeros or ``initial_state[i]``, (N, h, p, n)); the final state is (N, h, p, n), one per sequence."""
    if cu_seqlens is not None:
        args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, states_at, cu_seqlens)
        return _scan_ref_packed(*args, dt_softplus, return_final_state)
    dims = check_scan_args(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    cd = dims.compute_dtype
    heads_per_group = dims.h // dims.g
    xc = x.to(cd)
    dtc = prepare_dt(dt, dt_bias, dt_softplus, cd)
    Ac = A.to(cd)
    Bh = B.to(cd).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n): head i reads group i // hg
    Ch = C.to(cd).repeat_interleave(heads_per_group, dim=2)
    if initial_state is None:
        state = torch.zeros(dims.b, dims.h, dims.p, dims.n, dtype=cd, device=x.device)
    else:
        state = initial_state.to(cd)
    wanted = set() if states_at is None else set(check_positions(states_at, dims.l))
    ys, kept = [], []
    for t in range(dims.l):
        y_t, state = _step(state, xc[:, t], dtc[:, t], Ac, Bh[:, t], Ch[:, t])
        ys.append(y_t)
        if t + 1 in wanted:
            kept.append(state)
    if ys:
        y = torch.stack(ys, dim=1)
    else:
        y = xc.new_zeros(dims.b, 0, dims.h, dims.p)
    Dc = d_as_hp(D, cd)
    if Dc is not None:
        y = y + xc * Dc
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    if initial_state is not None and dims.l == 0:
        state = state.clone()  # never hand back the caller's tensor itself
    if states_at is not None:
        states = torch.stack(kept, dim=1) if kept else state.new_zeros(dims.b, 0, dims.h, dims.p, dims.n)
        return (y, state, states) if return_final_state else (y, states)
    return (y, state) if return_final_state else y


def _scan_ref_packed(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, states_at, cu_seqlens, softplus, final):
    """The packed walk: one row of N sequences, the state reset at each start and kept at each end."""
    dims, cu, N = check_packed_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, states_at, cu_seqlens)
    cd = dims.compute_dtype
    heads_per_group = dims.h // dims.g
    xc = x.to(cd)
    dtc = prepare_dt(dt, dt_bias, softplus, cd)
    Ac = A.to(cd)
    Bh = B.to(cd).repeat_interleave(heads_per_group, dim=2)
    Ch = C.to(cd).repeat_interleave(heads_per_group, dim=2)
    bounds = [int(v) for v in cu.cpu()]
    zeros = torch.zeros(1, dims.h, dims.p, dims.n, dtype=cd, device=x.device)
    ys, finals = [], []
    for i in range(N):
        state = zeros if initial_state is None else initial_state[i : i + 1].to(cd)
        for t in range(bounds[i], bounds[i + 1]):
            y_t, state = _step(state, xc[:, t], dtc[:, t], Ac, Bh[:, t], Ch[:, t])
            ys.append(y_t)
        finals.append(state)
    y = torch.stack(ys, dim=1)
    Dc = d_as_hp(D, cd)
    if Dc is not None:
        y = y + xc * Dc
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    return (y, torch.cat(finals, dim=0)) if final else y


def ssd_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step: returns (y (b, h, p), new_state (b, h, p, n)); the state passed in is not modified."""
    dims = check_step_args(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias)
    cd = dims.compute_dtype
    heads_per_group = dims.h // dims.g
    xc = x.to(cd)
    dtc = prepare_dt(dt, dt_bias, dt_softplus, cd)
    Bh = B.to(cd).repeat_interleave(heads_per_group, dim=1)
    Ch = C.to(cd).repeat_interleave(heads_per_group, dim=1)
    y, new_state = _step(state.to(cd), xc, dtc, A.to(cd), Bh, Ch)
    Dc = d_as_hp(D, cd)
    if Dc is not None:
        y = y + xc * Dc
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype), new_state
