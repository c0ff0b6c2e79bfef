"""Mamba-3 scan and decode step on the compiled CPU path (``csrc/mamba3.c``): the ``"native"`` backend.

The scan splits the work by cost. The per-position parts are elementwise, O(l n) per head, and stay torch ops
that autograd differentiates: the angle running sums, the rotations of B and C, the biases, the trapezoid
coefficients, the D term, the gate and the MIMO projections. The recurrence, O(l p n) per head, runs in C, one
walk per (sequence, head) with the state in cache, parallel over (sequences x heads) with OpenMP.

The trapezoid's beta term pairs position t with the previous position's k and v. With c_t = (1 - lam_{t+1})
dt_{t+1} (0 at a sequence's last position) and KV_t = sum_r v_t[r] k_t[r]^T, the shifted state
u_t = h_t + c_t KV_t obeys a recurrence with one rank-r term per position:

    u_t = alpha_t u_{t-1} + (gamma_t + c_t) KV_t,      u_{entry} = h_0 + (1 - lam_first) dt_first KV_init

(the entry state folds the first position's beta term, which reads the initial state's k and v), and

    h_t q_t[R] = u_t q_t[R] - c_t sum_r (k_t[r] . q_t[R]) v_t[r]

so C walks ``u_t = alpha_t u_{t-1} + sum_r V_t[r] Kc_t[r]^T, Y_t[R] = u_t Q_t[R]`` (Kc = (gamma + c) k) and the
wrapper subtracts the rank-r correction. At a sequence's last position c = 0, so the final u is the final h.

Backward (``_Recurrence.backward``, also C): the forward stores the state entering every block of
``CHECKPOINT_EVERY`` positions; the backward re-walks one block from its checkpoint and walks it in reverse
with the adjoint state. No (l, p, n) tensor is ever allocated.

Angles: the running sum of tanh(angles) pi dt per sequence is taken in float64 and wrapped to [0, 2 pi) before
the cast to the compute dtype, so long float32 sequences keep the angle's precision (the reference wraps every
step; the two agree up to rounding).

Packed rows (``cu_seqlens``) run natively: every sequence is its own walk from its own entry state. bf16 / fp16
inputs compute in float32 and y comes back in x.dtype, as on the chunked path. ``l == 0`` and a process where
``csrc/mamba3.c`` does not build delegate to the chunked path. The decode step is one C call without autograd:
when a gradient is needed through it, it delegates to the chunked step (same math, differentiable).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from .._native import native_library, num_threads, ptr
from .chunked import mamba3_scan_chunked, mamba3_state_update_chunked
from .ref import (
    _prepared,
    angle_increment,
    check_scan_args,
    check_step_args,
    expand_groups,
    rotate,
    wrap_angle,
)

__all__ = ["CHECKPOINT_EVERY", "mamba3_scan_native", "mamba3_state_update_native"]

#: positions between the states the forward keeps for the backward: the backward re-walks a block of this many
#: states into a per-thread buffer (32 x p x n: 1 MiB at p = 64, n = 128 in float32, about L2), and the
#: checkpoints cost p n / 32 values per position and head
CHECKPOINT_EVERY = 32

_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_FWD_ARGS = [_I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64] + [_P] * 8 + [_I64, ctypes.c_int]
_BWD_ARGS = [_I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64] + [_P] * 5 + [_I64] + [_P] * 7 + [ctypes.c_int]
_STEP_ARGS = [_I64] * 7 + [_P] * 18 + [ctypes.c_int] + [_P] * 5 + [ctypes.c_int]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _library():
    """The loaded ``csrc/mamba3.c`` with its argument types declared (None where it does not build)."""
    lib = native_library("mamba3.c")
    if lib is not None and not getattr(lib, "_seqlab_typed", False):
        for suf in _SUFFIX.values():
            for name, args, res in (
                (f"mamba3_fwd_{suf}", _FWD_ARGS, None),
                (f"mamba3_bwd_{suf}", _BWD_ARGS, ctypes.c_int),
                (f"mamba3_step_{suf}", _STEP_ARGS, None),
            ):
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = res
        lib._seqlab_typed = True
    return lib


class _Segments:
    """The independent walks: (batch row, start, length) per sequence, and each one's first checkpoint slot."""

    def __init__(self, b: int, l: int, cu: list[int] | None, every: int):
        if cu is None:
            rows, starts, lens = list(range(b)), [0] * b, [l] * b
        else:
            rows, starts, lens = [0] * (len(cu) - 1), cu[:-1], [e - s for s, e in zip(cu[:-1], cu[1:])]
        blocks = [(n + every - 1) // every for n in lens]
        first = [0]
        for k in blocks[:-1]:
            first.append(first[-1] + k)
        self.count = len(rows)
        self.rows = torch.tensor(rows, dtype=torch.int64)
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.lens = torch.tensor(lens, dtype=torch.int64)
        self.first_block = torch.tensor(first, dtype=torch.int64)
        self.blocks = sum(blocks)
        self.every = every

    def args(self):
        return (self.count, ptr(self.rows), ptr(self.starts), ptr(self.lens), ptr(self.first_block))


class _Recurrence(torch.autograd.Function):
    """u_t = alpha_t u_{t-1} + sum_r V_t[r] K_t[r]^T, Y_t[R] = u_t Q_t[R] per (sequence, head), from Hin:
    returns (Y (b, l, r, h, p), the final u per sequence (nseg, h, p, n)). Inputs contiguous, one dtype."""

    @staticmethod
    def forward(ctx, Hin, alpha, V, K, Q, segs: _Segments, keep: bool):
        lib = _library()
        b, l, r, h, p = V.shape
        n = K.shape[-1]
        Y = V.new_empty(V.shape)
        HT = V.new_empty((segs.count, h, p, n))
        ckpt = V.new_empty((segs.blocks, h, p, n)) if keep else None
        getattr(lib, f"mamba3_fwd_{_SUFFIX[V.dtype]}")(
            *segs.args(), l, h, p, n, r, ptr(Hin), ptr(alpha), ptr(V), ptr(K), ptr(Q), ptr(Y), ptr(HT), ptr(ckpt),
            segs.every, num_threads(),
        )  # fmt: skip
        ctx.segs = segs
        ctx.has_hin = Hin is not None
        if keep:
            ctx.save_for_backward(alpha, V, K, Q, ckpt)
        return Y, HT

    @staticmethod
    def backward(ctx, dY, dHT):
        alpha, V, K, Q, ckpt = ctx.saved_tensors
        segs = ctx.segs
        b, l, r, h, p = V.shape
        n = K.shape[-1]
        dY = V.new_zeros(V.shape) if dY is None else dY.contiguous()
        dHT = None if dHT is None else dHT.contiguous()
        dHin = V.new_empty((segs.count, h, p, n)) if ctx.has_hin else None
        dalpha, dV, dK, dQ = torch.empty_like(alpha), torch.empty_like(V), torch.empty_like(K), torch.empty_like(Q)
        rc = getattr(_library(), f"mamba3_bwd_{_SUFFIX[V.dtype]}")(
            *segs.args(), l, h, p, n, r, ptr(alpha), ptr(V), ptr(K), ptr(Q), ptr(ckpt), segs.every, ptr(dY),
            ptr(dHT), ptr(dHin), ptr(dalpha), ptr(dV), ptr(dK), ptr(dQ), num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("mamba3 native backward: could not allocate its per-thread state buffers")
        return dHin, dalpha, dV, dK, dQ, None, None


def _ranked(t: torch.Tensor, w) -> torch.Tensor:
    """t (..., h, p) -> per rank (..., r, h, p): t * w[:, r] (MIMO), or t itself as rank 0 (SISO, w None)."""
    if w is None:
        return t.unsqueeze(-3)
    return t.unsqueeze(-3) * w.transpose(0, 1)


def mamba3_scan_native(
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
    """Mamba-3 scan on the compiled CPU path: the arguments and results of ``mamba3_scan_ref`` (see there);
    ``chunk_size`` is validated and otherwise unused. Packed rows run natively; ``l == 0`` (and a process where
    the C source does not build) delegates to ``mamba3_scan_chunked``."""
    args = (x, dt, A, B, C, trap, angles, B_bias, C_bias, chunk_size)
    kwargs = dict(D=D, z=z, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o, initial_state=initial_state)
    dims, cu = check_scan_args(*args, **kwargs, cu_seqlens=cu_seqlens)
    lib = _library()
    if lib is None or dims.l == 0 or x.device.type != "cpu":
        return mamba3_scan_chunked(*args, **kwargs, return_final_state=return_final_state, cu_seqlens=cu_seqlens)
    cd = dims.compute_dtype
    b, l, h = dims.b, dims.l, dims.h
    mimo = dims.mimo
    Bb, Cb, Dc, mx, mz, mo = _prepared(dims, B_bias, C_bias, D, mimo_x, mimo_z, mimo_o)
    bounds = None if cu is None else [int(v) for v in cu.tolist()]
    segs = _Segments(b, l, bounds, CHECKPOINT_EVERY)

    xc, dtc = x.to(cd), dt.to(cd)
    lam = torch.sigmoid(trap.to(cd))
    alpha = torch.exp(A.to(cd) * dtc)  # (b, l, h)
    gamma = lam * dtc
    beta0 = (1.0 - lam) * dtc  # the beta coefficient without its alpha
    # c_t: the next position's beta0 inside the same sequence, 0 at every sequence's last position
    c = F.pad(beta0[:, 1:], (0, 0, 0, 1))
    if bounds is not None and len(bounds) > 2:
        last = torch.zeros(l, dtype=torch.bool)
        last[torch.tensor(bounds[1:-1]) - 1] = True
        c = c.masked_fill(last[None, :, None], 0.0)

    # angles: per-sequence running sums (float64), on top of each sequence's initial angle, wrapped
    inc = angle_increment(angles.to(cd), dtc).to(torch.float64)  # (b, l, h, a)
    csum = torch.cumsum(inc, dim=1)
    if bounds is None:
        base = None if initial_state is None else initial_state[0].to(torch.float64).unsqueeze(1)
    else:
        # position t of sequence i: csum_t - csum_{start_i - 1} + angle0_i
        seq = torch.repeat_interleave(torch.arange(segs.count), segs.lens)
        before = F.pad(csum, (0, 0, 0, 0, 1, 0))[:, segs.starts]  # (1, nseg, h, a)
        base = -before
        if initial_state is not None:
            base = base + initial_state[0].to(torch.float64).unsqueeze(0)
        base = base[:, seq]
    ang = wrap_angle(csum if base is None else csum + base).to(cd)

    K = rotate(expand_groups(B.to(cd), h) + Bb, ang.unsqueeze(2), mimo)  # (b, l, r, h, n)
    Q = rotate(expand_groups(C.to(cd), h) + Cb, ang.unsqueeze(2), mimo)
    V = _ranked(xc, mx)  # (b, l, r, h, p)
    Kc = K * (gamma + c)[:, :, None, :, None]

    Hin = None
    if initial_state is not None:
        _, h0, k0, v0 = (t.to(cd) for t in initial_state)
        first = beta0[segs.rows, segs.starts]  # (nseg, h)
        Hin = h0 + first[..., None, None] * torch.einsum("srhp,srhn->shpn", _ranked(v0, mx), k0)
        Hin = Hin.contiguous()

    keep = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (Hin, alpha, V, Kc, Q)
    )
    Y, HT = _Recurrence.apply(Hin, alpha.contiguous(), V.contiguous(), Kc.contiguous(), Q.contiguous(), segs, keep)

    # h_t q_t[R] = u_t q_t[R] - c_t sum_r (k_t[r] . q_t[R]) v_t[r]
    kq = torch.einsum("blrhn,blRhn->blrRh", K, Q)
    y = Y - torch.einsum("blrRh,blrhp->blRhp", kq * c[:, :, None, None, :], V)
    if Dc is not None:
        y = y + Dc[:, None] * V
    if z is not None:
        y = y * F.silu(_ranked(z.to(cd), mz))
    if not mimo:
        y = y[:, :, 0]
    elif mo is not None:
        y = torch.einsum("blrhp,hrp->blhp", y, mo)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    rows, ends = segs.rows, segs.starts + segs.lens - 1
    final = (ang[rows, ends], HT, K[rows, ends], xc[rows, ends])
    return y, final


def mamba3_state_update_native(
    state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D=None, z=None, mimo_x=None, mimo_z=None, mimo_o=None
):
    """One decode step on the compiled CPU path (one C call for the whole step): the arguments and results of
    ``mamba3_state_update_ref``; the state passed in is not modified. Without autograd: when a gradient must
    flow through the step (grad mode on and an input that requires it), it delegates to
    ``mamba3_state_update_chunked``, as it does where the C source does not build."""
    args = (state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o)
    dims = check_step_args(*args)
    lib = _library()
    tensors = [t for t in (x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o, *state)]
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    if lib is None or needs_grad or x.device.type != "cpu":
        return mamba3_state_update_chunked(*args)
    cd = dims.compute_dtype
    b, h, p, r, n, a = dims.b, dims.h, dims.p, dims.r, dims.n, dims.a

    def c(t):
        return None if t is None else t.to(cd).contiguous()

    ang_s, ssm_s, k_s, v_s = (c(t) for t in state)
    per_rank = dims.mimo and mimo_o is None
    y = torch.empty((b, r, h, p) if per_rank else (b, h, p), dtype=cd)
    out = (torch.empty_like(ang_s), torch.empty_like(ssm_s), torch.empty_like(k_s), torch.empty_like(v_s))
    inputs = [c(t) for t in (x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o)]
    getattr(lib, f"mamba3_step_{_SUFFIX[cd]}")(
        b, h, p, n, r, dims.g, a, ptr(ang_s), ptr(ssm_s), ptr(k_s), ptr(v_s), *(ptr(t) for t in inputs),
        int(per_rank), ptr(y), *(ptr(t) for t in out), num_threads(),
    )  # fmt: skip
    return y.to(x.dtype), out
