"""Mamba-3 scan and decode step on the compiled CPU path (``csrc/mamba3.c``): the ``"native"`` backend.

The scan runs as three C kernels, each an ``autograd.Function`` with a C backward, glued by a few torch ops that
autograd differentiates (the trapezoid coefficients, tanh(angles) pi dt, the entry state, the gate and the MIMO
projections, all O(l h) or O(l h p) elementwise):

1. ``_Angles``: the rotary angle after every position, a running sum of tanh(angles) pi dt per sequence and
   head from its initial angle, wrapped to [0, 2 pi) at every step as in the reference (the running value is
   kept in double, so long float32 sequences keep the angle's precision). Backward: reverse running sums.
2. ``_Rotate``: K = rot(B + B_bias), Q = rot(C + C_bias) per head (groups expanded on the fly). Backward: the
   inverse rotation, B and C summed over the heads of each group, the biases over positions (per-thread
   partial sums), and the angle's gradient.
3. ``_Recurrence``: the state walk, one per (sequence, head), parallel over (sequences x heads) with OpenMP,
   vectorised over the state dim, the state (p, n) in cache.

As torch ops, steps 1 and 2 were a dozen passes over memory, more than the recurrence itself costs.

The trapezoid's beta term pairs position t with the previous position's k and v. With c_t = (1 - lam_{t+1})
dt_{t+1} (0 at a sequence's last position) and KV_t = sum_r v_t[r] k_t[r]^T, the shifted state
u_t = h_t + c_t KV_t obeys a recurrence with one rank-r term per position:

    u_t = alpha_t u_{t-1} + (gamma_t + c_t) KV_t,      u_{entry} = h_0 + (1 - lam_first) dt_first KV_init

(the entry state folds the first position's beta term, which reads the initial state's k and v), and

    y_t[R] = h_t q_t[R] + D v_t[R] = u_t q_t[R] - c_t sum_r (k_t[r] . q_t[R]) v_t[r] + D v_t[R]

which is what C computes, the rank-r correction and D included. At a sequence's last position c = 0, so the
final u is the final h. The backward: the forward stores the state entering every block of
``CHECKPOINT_EVERY`` positions; the backward re-walks one block from its checkpoint into a per-thread buffer and
walks it in reverse with the adjoint state (the decay's gradient is <dU_t, u_{t-1}>, a scalar per position).
No (l, p, n) tensor is ever allocated.

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
)

__all__ = ["CHECKPOINT_EVERY", "SERIAL_BELOW", "mamba3_scan_native", "mamba3_state_update_native"]

#: positions between the states the forward keeps for the backward: the backward re-walks a block of this many
#: states into a per-thread buffer (32 x p x n: 1 MiB at p = 64, n = 128 in float32, about L2), and the
#: checkpoints cost p n / 32 values per position and head
CHECKPOINT_EVERY = 32

#: below this many state elements touched per call, a kernel runs on one thread: waking an OpenMP team costs
#: more than it saves on a decode step or a few positions (and on a busy machine a team that waits for a
#: descheduled thread costs a scheduler time slice)
SERIAL_BELOW = 1 << 17

_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_INT = ctypes.c_int
_SEG_ARGS = [_I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64]
_SIGNATURES = {  # name: (argument types, result type)
    "mamba3_fwd": (_SEG_ARGS + [_P] * 11 + [_I64, _INT], _INT),
    "mamba3_bwd": (_SEG_ARGS + [_P] * 8 + [_I64] + [_P] * 10 + [_INT], _INT),
    "mamba3_rot_fwd": ([_I64] * 6 + [_INT] + [_P] * 8 + [_INT], None),
    "mamba3_rot_bwd": ([_I64] * 6 + [_INT] + [_P] * 14 + [_INT], None),
    "mamba3_angle_fwd": ([_I64, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT], None),
    "mamba3_angle_bwd": ([_I64, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT], None),
    "mamba3_step": ([_I64] * 7 + [_P] * 18 + [_INT] + [_P] * 5 + [_INT], None),
}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _library():
    """The loaded ``csrc/mamba3.c`` with its argument types declared (None where it does not build)."""
    lib = native_library("mamba3.c")
    if lib is not None and not getattr(lib, "_seqlab_typed", False):
        for suf in _SUFFIX.values():
            for name, (args, res) in _SIGNATURES.items():
                fn = getattr(lib, f"{name}_{suf}")
                fn.argtypes = args
                fn.restype = res
        lib._seqlab_typed = True
    return lib


def _kernel(name: str, dtype: torch.dtype):
    return getattr(_library(), f"{name}_{_SUFFIX[dtype]}")


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


def _threads(work: int) -> int:
    """The thread count for a kernel call that touches ``work`` elements."""
    return 1 if work < SERIAL_BELOW else num_threads()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"mamba3 native {what}: could not allocate its per-thread buffers")


class _Recurrence(torch.autograd.Function):
    """Per (sequence, head), from Hin (or zeros): u_t = alpha_t u_{t-1} + w_t sum_r V_t[r] K_t[r]^T and
    Y_t[R] = u_t Q_t[R] - c_t sum_r (K_t[r] . Q_t[R]) V_t[r] + D V_t[R] (D (h,) or None). Returns
    (Y (b, l, r, h, p), the final u per sequence (nseg, h, p, n)). Inputs contiguous, one dtype; alpha, w, c
    (b, l, h)."""

    @staticmethod
    def forward(ctx, Hin, alpha, w, c, D, V, K, Q, segs: _Segments, keep: bool):
        b, l, r, h, p = V.shape
        n = K.shape[-1]
        Y = V.new_empty(V.shape)
        HT = V.new_empty((segs.count, h, p, n))
        ckpt = V.new_empty((segs.blocks, h, p, n)) if keep else None
        rc = _kernel("mamba3_fwd", V.dtype)(
            *segs.args(), l, h, p, n, r, ptr(Hin), ptr(alpha), ptr(w), ptr(c), ptr(D), ptr(V), ptr(K), ptr(Q), ptr(Y),
            ptr(HT), ptr(ckpt), segs.every, _threads(V.numel() * n),
        )  # fmt: skip
        _check(rc, "forward")
        ctx.segs = segs
        ctx.has_hin = Hin is not None
        if keep:
            ctx.save_for_backward(alpha, w, c, D, V, K, Q, ckpt)
        return Y, HT

    @staticmethod
    def backward(ctx, dY, dHT):
        alpha, w, c, D, V, K, Q, ckpt = ctx.saved_tensors
        segs = ctx.segs
        b, l, r, h, p = V.shape
        n = K.shape[-1]
        dY = V.new_zeros(V.shape) if dY is None else dY.contiguous()
        dHT = None if dHT is None else dHT.contiguous()
        dHin = V.new_empty((segs.count, h, p, n)) if ctx.has_hin else None
        dalpha, dw, dc = torch.empty_like(alpha), torch.empty_like(w), torch.empty_like(c)
        dV, dK, dQ = torch.empty_like(V), torch.empty_like(K), torch.empty_like(Q)
        dDp = None if D is None else V.new_empty((segs.count, h))  # per sequence: summed below
        rc = _kernel("mamba3_bwd", V.dtype)(
            *segs.args(), l, h, p, n, r, ptr(alpha), ptr(w), ptr(c), ptr(D), ptr(V), ptr(K), ptr(Q), ptr(ckpt),
            segs.every, ptr(dY), ptr(dHT), ptr(dHin), ptr(dalpha), ptr(dw), ptr(dc), ptr(dV), ptr(dK), ptr(dQ),
            ptr(dDp), _threads(V.numel() * n),
        )  # fmt: skip
        _check(rc, "backward")
        return dHin, dalpha, dw, dc, None if dDp is None else dDp.sum(0), dV, dK, dQ, None, None


class _Angles(torch.autograd.Function):
    """The rotary angle after every position: ang_t = (ang_{t-1} + inc_t) mod 2 pi per sequence, from its initial
    angle ang0 (nseg, h, a) or 0; inc (b, l, h, a) contiguous -> ang (b, l, h, a)."""

    @staticmethod
    def forward(ctx, inc, ang0, segs: _Segments):
        b, l, h, a = inc.shape
        ang = torch.empty_like(inc)
        _kernel("mamba3_angle_fwd", inc.dtype)(
            segs.count, ptr(segs.rows), ptr(segs.starts), ptr(segs.lens), l, h, a, ptr(inc), ptr(ang0), ptr(ang),
            _threads(inc.numel()),
        )  # fmt: skip
        ctx.segs = segs
        ctx.has_ang0 = ang0 is not None
        return ang

    @staticmethod
    def backward(ctx, dang):
        segs = ctx.segs
        dang = dang.contiguous()
        b, l, h, a = dang.shape
        dinc = torch.empty_like(dang)
        dang0 = dang.new_empty((segs.count, h, a)) if ctx.has_ang0 else None
        _kernel("mamba3_angle_bwd", dang.dtype)(
            segs.count, ptr(segs.rows), ptr(segs.starts), ptr(segs.lens), l, h, a, ptr(dang), ptr(dinc), ptr(dang0),
            _threads(dang.numel()),
        )  # fmt: skip
        return dinc, dang0, None


class _Rotate(torch.autograd.Function):
    """K = rot(B (groups expanded) + B_bias, angle), Q = rot(C + C_bias, angle): B, C (b, l, r, g, n),
    biases (h, r, n), cos and sin of the angles (b, l, h, a) -> K, Q (b, l, r, h, n). Inputs contiguous, one
    dtype. The gradients of cos and sin go back through torch's cos and sin."""

    @staticmethod
    def forward(ctx, B, C, B_bias, C_bias, cos, sin, h: int, mimo: bool):
        b, l, r, g, n = B.shape
        K = B.new_empty((b, l, r, h, n))
        Q = B.new_empty((b, l, r, h, n))
        _kernel("mamba3_rot_fwd", B.dtype)(
            b * l, r, g, h, n, cos.shape[-1], int(mimo), ptr(B), ptr(C), ptr(B_bias), ptr(C_bias), ptr(cos), ptr(sin),
            ptr(K), ptr(Q), _threads(K.numel()),
        )  # fmt: skip
        ctx.save_for_backward(B, C, B_bias, C_bias, cos, sin)
        ctx.mimo = mimo
        return K, Q

    @staticmethod
    def backward(ctx, dK, dQ):
        B, C, B_bias, C_bias, cos, sin = ctx.saved_tensors
        b, l, r, g, n = B.shape
        h = B_bias.shape[0]
        dK = None if dK is None else dK.contiguous()
        dQ = None if dQ is None else dQ.contiguous()
        threads = _threads(b * l * r * h * n)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dBb = B.new_empty((threads, h, r, n))  # per thread: summed here
        dCb = B.new_empty((threads, h, r, n))
        dcos, dsin = torch.empty_like(cos), torch.empty_like(sin)
        _kernel("mamba3_rot_bwd", B.dtype)(
            b * l, r, g, h, n, cos.shape[-1], int(ctx.mimo), ptr(B), ptr(C), ptr(B_bias), ptr(C_bias), ptr(cos),
            ptr(sin), ptr(dK), ptr(dQ), ptr(dB), ptr(dC), ptr(dBb), ptr(dCb), ptr(dcos), ptr(dsin), threads,
        )  # fmt: skip
        return dB, dC, dBb.sum(0), dCb.sum(0), dcos, dsin, None, None


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
    _, _, Dc, mx, mz, mo = _prepared(dims, B_bias, C_bias, D, mimo_x, mimo_z, mimo_o)
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

    # the angles after every position, each sequence from its initial angle (wrapped at every step in C)
    inc = angle_increment(angles.to(cd), dtc).contiguous()  # (b, l, h, a)
    ang0 = None if initial_state is None else initial_state[0].to(cd).contiguous()
    ang = _Angles.apply(inc, ang0, segs)

    def c_(t):
        return t.to(cd).contiguous()

    K, Q = _Rotate.apply(c_(B), c_(C), c_(B_bias), c_(C_bias), torch.cos(ang), torch.sin(ang), h, mimo)
    V = _ranked(xc, mx)  # (b, l, r, h, p)

    Hin = None
    if initial_state is not None:
        _, h0, k0, v0 = (t.to(cd) for t in initial_state)
        first = beta0[segs.rows, segs.starts]  # (nseg, h)
        Hin = h0 + first[..., None, None] * torch.einsum("srhp,srhn->shpn", _ranked(v0, mx), k0)
        Hin = Hin.contiguous()

    w = gamma + c
    keep = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (Hin, alpha, w, Dc, V, K, Q)
    )
    Dc = None if Dc is None else Dc.contiguous()
    y, HT = _Recurrence.apply(
        Hin, alpha.contiguous(), w.contiguous(), c.contiguous(), Dc, V.contiguous(), K, Q, segs, keep
    )
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

    def c(t):  # skips the no-op calls: a decode step is mostly per-call overhead
        if t is None or (t.dtype == cd and t.is_contiguous()):
            return t
        return t.to(cd).contiguous()

    ang_s, ssm_s, k_s, v_s = (c(t) for t in state)
    per_rank = dims.mimo and mimo_o is None
    y = torch.empty((b, r, h, p) if per_rank else (b, h, p), dtype=cd)
    out = (torch.empty_like(ang_s), torch.empty_like(ssm_s), torch.empty_like(k_s), torch.empty_like(v_s))
    inputs = [c(t) for t in (x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o)]
    getattr(lib, f"mamba3_step_{_SUFFIX[cd]}")(
        b, h, p, n, r, dims.g, a, ptr(ang_s), ptr(ssm_s), ptr(k_s), ptr(v_s), *(ptr(t) for t in inputs),
        int(per_rank), ptr(y), *(ptr(t) for t in out), _threads(ssm_s.numel() * r),
    )  # fmt: skip
    return y.to(x.dtype), out
