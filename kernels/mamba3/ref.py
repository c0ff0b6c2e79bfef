"""Mamba-3 scan: the sequential reference, the truth every fast path is tested against.

A walk over positions, one ``_step`` per position (the decode step ``mamba3_state_update_ref`` is that same
step), written from the equations in this package's docstring (``kernels/mamba3/__init__.py``). The math runs in
float64 when any input is float64 and in float32 otherwise; y is cast back to x.dtype, the state stays in the
compute dtype. The argument checks and the small helpers here (rotary, angle increments, head expansion) are
shared with the chunked path.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validate import require_divisible, require_optional, require_same_device, require_shape, require_tensor
from .._varlen import check_cu_seqlens
from ..errors import KernelInputError

__all__ = ["mamba3_scan_ref", "mamba3_state_update_ref"]

TWO_PI = 2.0 * math.pi


@dataclass(frozen=True)
class Mamba3Dims:
    b: int  # batch rows
    l: int  # length (1 for a step)
    h: int  # heads
    p: int  # head dim (value)
    r: int  # MIMO rank (1: SISO)
    g: int  # B/C groups
    n: int  # state size
    a: int  # rotary angles (pairs)
    rows: int  # rows of the state: N sequences when packed, else b
    compute_dtype: torch.dtype

    @property
    def mimo(self) -> bool:
        return self.r > 1


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any tensor is float64, else float32: states are never accumulated below float32."""
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32


def _flat(state) -> list:
    if state is None:
        return []
    return [t for t in state if isinstance(t, torch.Tensor)]


def check_state(name: str, state, rows: int, h: int, a: int, p: int, r: int, n: int) -> None:
    """``state`` must be the tuple (angle (rows, h, a), ssm (rows, h, p, n), k (rows, r, h, n), v (rows, h, p))."""
    if not isinstance(state, (tuple, list)) or len(state) != 4:
        raise KernelInputError(
            f"{name} must be a tuple (angle, ssm, k, v) of 4 tensors, got "
            f"{type(state).__name__}{'' if not isinstance(state, (tuple, list)) else f' of {len(state)}'}"
        )
    angle, ssm, k, v = state
    require_optional(f"{name}[0] (angle)", angle, (rows, h, a), what="(rows, h, a)")
    require_optional(f"{name}[1] (ssm)", ssm, (rows, h, p, n), what="(rows, h, p, n)")
    require_optional(f"{name}[2] (k)", k, (rows, r, h, n), what="(rows, r, h, n)")
    require_optional(f"{name}[3] (v)", v, (rows, h, p), what="(rows, h, p)")
    for i, part in enumerate(state):
        if part is None:
            raise KernelInputError(f"{name}[{i}] must be a tensor, got None")


def _check_common(l_shape, x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o):
    """Checks shared by the scan (``l_shape`` = (b, l)) and the step (``l_shape`` = (b,)): returns h, p, r, g, n, a."""
    lead = tuple(l_shape)
    nl = len(lead)
    lay = "(b, l" if nl == 2 else "(b"
    require_tensor("x", x, ndim=nl + 2)
    h, p = x.shape[nl], x.shape[nl + 1]
    require_tensor("dt", dt, ndim=nl + 1)
    require_shape("dt", dt, (*lead, h), what=f"{lay}, h)")
    require_tensor("A", A, ndim=nl + 1)
    require_shape("A", A, (*lead, h), what=f"{lay}, h)")
    require_tensor("B", B, ndim=nl + 3)
    require_shape("B", B, (*lead, None, None, None), what=f"{lay}, r, g, n)")
    r, g, n = B.shape[nl], B.shape[nl + 1], B.shape[nl + 2]
    require_tensor("C", C, ndim=nl + 3)
    require_shape("C", C, (*lead, r, g, n), what=f"{lay}, r, g, n)")
    if r < 1 or g < 1 or n < 1:
        raise KernelInputError(f"B must have r, g, n >= 1, got shape {tuple(B.shape)}")
    require_divisible("x.shape[-2] (heads h)", h, "B.shape[-2] (groups g)", g)
    require_tensor("trap", trap, ndim=nl + 1)
    require_shape("trap", trap, (*lead, h), what=f"{lay}, h)")
    require_tensor("angles", angles, ndim=nl + 1)
    require_shape("angles", angles, (*lead, None), what=f"{lay}, a)")
    a = angles.shape[-1]
    if r > 1 and n % 2 != 0:
        raise KernelInputError(f"MIMO (r = {r} > 1) pairs state dims i and i + n/2: n must be even, got n = {n}")
    if 2 * a > n:
        raise KernelInputError(f"angles has a = {a} rotary pairs, more than n/2 = {n / 2} (n = {n}, from B)")
    require_tensor("B_bias", B_bias, ndim=3)
    require_shape("B_bias", B_bias, (h, r, n), what="(h, r, n)")
    require_tensor("C_bias", C_bias, ndim=3)
    require_shape("C_bias", C_bias, (h, r, n), what="(h, r, n)")
    require_optional("D", D, (h,), what="(h,)")
    require_optional("z", z, (*lead, h, p), what=f"{lay}, h, p)")
    if r == 1:
        for name, w in (("mimo_x", mimo_x), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
            if w is not None:
                raise KernelInputError(f"{name} is for MIMO (r > 1); B has r = 1 (SISO): pass {name}=None")
    else:
        if mimo_x is None:
            raise KernelInputError(f"mimo_x (h, r, p) is required for MIMO (B has r = {r} > 1)")
        require_optional("mimo_x", mimo_x, (h, r, p), what="(h, r, p)")
        require_optional("mimo_z", mimo_z, (h, r, p), what="(h, r, p)")
        require_optional("mimo_o", mimo_o, (h, r, p), what="(h, r, p)")
        if z is not None and mimo_z is None:
            raise KernelInputError(f"z with MIMO (r = {r}) needs mimo_z (h, r, p)")
        if z is not None and mimo_o is None:
            raise KernelInputError(
                "z with mimo_o=None: the per-rank output (mimo_o=None) is ungated (the caller applies its gated "
                "norm and mimo_o); pass z=None, or pass mimo_o"
            )
    return h, p, r, g, n, a


def check_scan_args(
    x,
    dt,
    A,
    B,
    C,
    trap,
    angles,
    B_bias,
    C_bias,
    chunk_size,
    D=None,
    z=None,
    mimo_x=None,
    mimo_z=None,
    mimo_o=None,
    initial_state=None,
    cu_seqlens=None,
):
    """Validate mamba3_scan arguments; every failure is a KernelInputError naming the argument.
    Returns (dims, cu_seqlens as int64 or None)."""
    require_tensor("x", x, ndim=4)
    b, l = x.shape[0], x.shape[1]
    h, p, r, g, n, a = _check_common((b, l), x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise KernelInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    rows = b
    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(cu_seqlens, b, l)
        rows = cu_seqlens.numel() - 1
    if initial_state is not None:
        check_state("initial_state", initial_state, rows, h, a, p, r, n)
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, trap=trap, angles=angles, B_bias=B_bias, C_bias=C_bias, D=D, z=z)
    tensors.update(mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o)
    for i, part in enumerate(_flat(initial_state)):
        tensors[f"initial_state[{i}]"] = part
    require_same_device(**tensors)
    cd = compute_dtype(*tensors.values())
    return Mamba3Dims(b, l, h, p, r, g, n, a, rows, cd), cu_seqlens


def check_step_args(state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D=None, z=None, mimo_x=None, mimo_z=None,
                    mimo_o=None):  # fmt: skip
    """Validate mamba3_state_update arguments (one position: l == 1 in the returned dims)."""
    require_tensor("x", x, ndim=3)
    b = x.shape[0]
    h, p, r, g, n, a = _check_common((b,), x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o)
    check_state("state", state, b, h, a, p, r, n)
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, trap=trap, angles=angles, B_bias=B_bias, C_bias=C_bias, D=D, z=z)
    tensors.update(mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o)
    for i, part in enumerate(state):
        tensors[f"state[{i}]"] = part
    require_same_device(**tensors)
    cd = compute_dtype(*tensors.values())
    return Mamba3Dims(b, 1, h, p, r, g, n, a, b, cd)


# ------------------------------------------------------------------------------------------ shared small helpers


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """angle mod 2 pi, in [0, 2 pi) (floor has no gradient: d/dangle = 1)."""
    return angle - TWO_PI * torch.floor(angle / TWO_PI)


def angle_increment(angles: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """tanh(angles) * pi * dt per head: angles (..., a), dt (..., h) -> (..., h, a)."""
    return torch.tanh(angles).unsqueeze(-2) * math.pi * dt.unsqueeze(-1)


def rotate(t: torch.Tensor, angle: torch.Tensor, mimo: bool) -> torch.Tensor:
    """Rotate the rotary pairs of ``t`` (..., n) by ``angle`` (..., a) (broadcast against t's leading dims).

    SISO: pairs (2i, 2i + 1) for i < a (interleaved); MIMO: pairs (i, i + n/2) for i < a (halves). In a pair
    (u, w): u' = u cos - w sin, w' = u sin + w cos. The other dims pass unrotated."""
    a = angle.shape[-1]
    if a == 0:
        return t
    n = t.shape[-1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    if not mimo:
        rot = t[..., : 2 * a].unflatten(-1, (a, 2))
        u, w = rot[..., 0], rot[..., 1]
        out = torch.stack((u * cos - w * sin, u * sin + w * cos), dim=-1).flatten(-2)
        return torch.cat((out, t[..., 2 * a :]), dim=-1)
    half = n // 2
    u, w = t[..., :a], t[..., half : half + a]
    return torch.cat((u * cos - w * sin, t[..., a:half], u * sin + w * cos, t[..., half + a :]), dim=-1)


def expand_groups(t: torch.Tensor, h: int) -> torch.Tensor:
    """(..., r, g, n) -> (..., r, h, n): head i reads group i // (h / g)."""
    g = t.shape[-2]
    return t.repeat_interleave(h // g, dim=-2) if g != h else t


def zero_state(rows: int, dims: Mamba3Dims, device) -> tuple:
    cd = dims.compute_dtype
    return (
        torch.zeros(rows, dims.h, dims.a, dtype=cd, device=device),
        torch.zeros(rows, dims.h, dims.p, dims.n, dtype=cd, device=device),
        torch.zeros(rows, dims.r, dims.h, dims.n, dtype=cd, device=device),
        torch.zeros(rows, dims.h, dims.p, dtype=cd, device=device),
    )


def _ranked(x: torch.Tensor, w) -> torch.Tensor:
    """x (b, h, p) -> per rank (b, r, h, p): x * w[:, r] (MIMO), or x itself as rank 0 (SISO, w None)."""
    if w is None:
        return x.unsqueeze(1)
    return x.unsqueeze(1) * w.transpose(0, 1).unsqueeze(0)


def _step(state, x, dt, A, Bh, Ch, trap, inc, Bb, Cb, D, z, mx, mz, mo, mimo):
    """One position in the compute dtype. state (angle (b,h,a), ssm (b,h,p,n), k (b,r,h,n), v (b,h,p));
    x (b,h,p); dt, A, trap (b,h); Bh, Ch (b,r,h,n) (groups expanded); inc (b,h,a) the angle increment;
    Bb, Cb (r,h,n); D (h,); z (b,h,p); mx/mz/mo (h,r,p) or None. Returns (y, new_state): y (b,h,p), or
    (b,r,h,p) for MIMO without mo."""
    angle, ssm, k_prev, v_prev = state
    angle = wrap_angle(angle + inc)
    k = rotate(Bh + Bb, angle.unsqueeze(1), mimo)  # (b, r, h, n)
    q = rotate(Ch + Cb, angle.unsqueeze(1), mimo)
    lam = torch.sigmoid(trap)
    alpha = torch.exp(A * dt)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    v = _ranked(x, mx)  # (b, r, h, p)
    kv_prev = torch.einsum("brhp,brhn->bhpn", _ranked(v_prev, mx), k_prev)
    kv = torch.einsum("brhp,brhn->bhpn", v, k)
    ssm = alpha[..., None, None] * ssm + beta[..., None, None] * kv_prev + gamma[..., None, None] * kv
    y = torch.einsum("bhpn,brhn->brhp", ssm, q)
    if D is not None:
        y = y + D[:, None] * v
    if z is not None:
        y = y * F.silu(_ranked(z, mz))
    if not mimo:
        y = y[:, 0]
    elif mo is not None:
        y = torch.einsum("brhp,hrp->bhp", y, mo)
    return y, (angle, ssm, k, x)


def _prepared(dims, B_bias, C_bias, D, mimo_x, mimo_z, mimo_o):
    cd = dims.compute_dtype

    def c(t):
        return None if t is None else t.to(cd)

    return (
        B_bias.to(cd).transpose(0, 1),  # (r, h, n)
        C_bias.to(cd).transpose(0, 1),
        c(D),
        c(mimo_x),
        c(mimo_z),
        c(mimo_o),
    )


def mamba3_scan_ref(
    x,
    dt,
    A,
    B,
    C,
    trap,
    angles,
    B_bias,
    C_bias,
    chunk_size=64,
    D=None,
    z=None,
    mimo_x=None,
    mimo_z=None,
    mimo_o=None,
    initial_state=None,
    return_final_state=False,
    cu_seqlens=None,
):
    """Sequential Mamba-3 scan, one position at a time (``chunk_size`` is validated and otherwise unused).

    Returns y (b, l, h, p) (MIMO with mimo_o=None: per rank (b, l, r, h, p)), or (y, final_state) with
    ``return_final_state``; packed rows (``cu_seqlens``, batch 1): the state restarts at every sequence start
    (from ``initial_state[i]`` or zeros) and the final state has one row per sequence."""
    dims, cu = check_scan_args(
        x, dt, A, B, C, trap, angles, B_bias, C_bias, chunk_size, D, z, mimo_x, mimo_z, mimo_o, initial_state,
        cu_seqlens,
    )  # fmt: skip
    cd = dims.compute_dtype
    Bb, Cb, Dc, mx, mz, mo = _prepared(dims, B_bias, C_bias, D, mimo_x, mimo_z, mimo_o)
    xc, dtc, Ac, trc = x.to(cd), dt.to(cd), A.to(cd), trap.to(cd)
    Bh = expand_groups(B.to(cd), dims.h)  # (b, l, r, h, n)
    Ch = expand_groups(C.to(cd), dims.h)
    inc = angle_increment(angles.to(cd), dtc)  # (b, l, h, a)
    zc = None if z is None else z.to(cd)
    if initial_state is None:
        init = zero_state(dims.rows, dims, x.device)
    else:
        init = tuple(t.to(cd) for t in initial_state)
    if cu is None:
        starts, ends = {}, {}
        state = init
    else:
        bounds = [int(v) for v in cu.tolist()]
        starts = {s: i for i, s in enumerate(bounds[:-1])}
        ends = {e - 1: i for i, e in enumerate(bounds[1:])}
        state = None
    finals = [None] * dims.rows
    ys = []
    for t in range(dims.l):
        if t in starts:
            i = starts[t]
            state = tuple(part[i : i + 1] for part in init)
        zt = None if zc is None else zc[:, t]
        y_t, state = _step(
            state, xc[:, t], dtc[:, t], Ac[:, t], Bh[:, t], Ch[:, t], trc[:, t], inc[:, t], Bb, Cb, Dc, zt, mx, mz,
            mo, dims.mimo,
        )  # fmt: skip
        ys.append(y_t)
        if t in ends:
            finals[ends[t]] = state
    if ys:
        y = torch.stack(ys, dim=1)
    else:
        shape = (dims.b, 0, dims.r, dims.h, dims.p) if dims.mimo and mimo_o is None else (dims.b, 0, dims.h, dims.p)
        y = xc.new_zeros(shape)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    if cu is None:
        final = tuple(part.clone() if part is init_part else part for part, init_part in zip(state, init))
    else:
        final = tuple(torch.cat([f[j] for f in finals], dim=0) for j in range(4))
    return y, final


def mamba3_state_update_ref(
    state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D=None, z=None, mimo_x=None, mimo_z=None, mimo_o=None
):
    """One decode step: the inputs of ``mamba3_scan_ref`` without the length dim -> (y, new_state); the state
    passed in is not modified."""
    dims = check_step_args(state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o)
    cd = dims.compute_dtype
    Bb, Cb, Dc, mx, mz, mo = _prepared(dims, B_bias, C_bias, D, mimo_x, mimo_z, mimo_o)
    dtc = dt.to(cd)
    y, new_state = _step(
        tuple(t.to(cd) for t in state), x.to(cd), dtc, A.to(cd), expand_groups(B.to(cd), dims.h),
        expand_groups(C.to(cd), dims.h), trap.to(cd), angle_increment(angles.to(cd), dtc), Bb, Cb, Dc,
        None if z is None else z.to(cd), mx, mz, mo, dims.mimo,
    )  # fmt: skip
    return y.to(x.dtype), new_state
