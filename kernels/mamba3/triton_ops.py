"""Mamba-3 scan (SISO and MIMO): Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Same signature and semantics as ``ref.py`` / ``chunked.py`` (see ``kernels/mamba3/`` for the equations). Per
sequence, head h and position t (s = sigmoid(trap), a = A dt, alpha = exp(a), beta~ = (1 - s) dt, gamma = s dt)::

    theta_t = (theta_{t-1} + pi tanh(angles_t) dt_t) mod 2 pi              (per head, a rotary pairs)
    k_t = rot(theta_t) (B_t + B_bias),  q_t = rot(theta_t) (C_t + C_bias)     (interleaved pairs; the rest as is)
    H_t = alpha_t (H_{t-1} + beta~_t v_{t-1} k_{t-1}') + gamma_t v_t k_t'      ((p, n); v = x)
    y_t = (H_t q_t + D v_t) * silu(z_t)

and the state (theta, H, k, v) carries theta_t, H_t, k_t (rotated) and v_t. MIMO (rank r > 1): per rank
v_r = x mimo_x[r], keys / queries from B[r] / C[r] (+ their biases) rotated in the pairs (i, i + n/2), the update
adds sum_r v_r k_r' (and the previous position's), y_r = (H q_r + D v_r) * silu(z mimo_z[r]), and the output is
sum_r mimo_o[r] y_r, or y per rank (b, l, r, h, p) with mimo_o=None. float16 / bfloat16 / float32 inputs
run with float32 states; float64 inputs entirely in float64 (a constexpr compute dtype), so every backend agrees
on what float64 means. The state returned is float32 (float64 for float64 inputs).

Kernels (``triton_kernels.py``)
-------------------------------
One program per (sequence, head, block of BLOCK_P value channels) walks the sequence's positions one after the
other with its (BLOCK_P, n) state in registers: no chunking, no associative-scan shuffles, consecutive positions
in one thread's registers. Packed rows are native: with ``cu_seqlens`` the program of sequence i reads
[cu[i], cu[i+1]) of the single row and its own initial / final state row; no Python loop over sequences.

``_m3_fwd_kernel`` (MODE 0): the forward; writes y and the final state. It is also the decode step (l = 1).

Backward, with no stored states at all (the only saved tensors are the inputs):

1. ``_m3_fwd_kernel`` (MODE 1) re-walks forward from the initial state. Per position: the gradient of the rotated
   query dq_t = H_t' gy_t (this program's channels' part; gy = dL/dy before the gate) rotated back into dC, and
   its share of the angle's gradient; the scalar gy_t . y~_t (y~ = H q); dz; theta_t. At the end
   <dL/dH_final, H_final>.
2. ``_m3_bwd_kernel`` walks backward carrying the adjoint G = alpha_{t+1} dL/dH_{t+1}: dH_t = G + gy_t q_t',
   dk_t = (gamma_t dH_t + beta~_{t+1} G)' v_t, dv_t = (gamma_t dH_t + beta~_{t+1} G) k_t + D gy_t. The decay's
   adjoint da_t = <dH_t, alpha_t (H_{t-1} + beta~_t v_{t-1} k_{t-1}')> needs H, which the backward never has:
   with S_t = <dH_t, H_t> = R_t + gy_t . y~_t and R_{t-1} = <alpha_t dH_t, H_{t-1}> = da_t - beta~_t E_t,
   da_t = S_t - gamma_t f_t (f_t = v_t' dH_t k_t, E_t = alpha_t v_{t-1}' dH_t k_{t-1} = dL/dbeta~_t), a scalar
   recurrence that starts from <dL/dH_final, H_final>. Then the rotary adjoints give dB, dC and dtheta_t, whose
   reverse running sum (reset per sequence, started from the final angle's gradient) gives dangles and dt's
   share. Nothing divides by a decay.

Reductions. dB, dC (fp32, (b, l, r, g, n)), dangles ((b, l, a)) and the queries' angle share ((b, l, h, a)) are
summed over the programs that share a row (the heads of a B/C group, the channel blocks) with ``tl.atomic_add``,
so the backward's scratch is the size of B / C and a few per-(position, head) scalars, never per (position,
head, n): with several heads per group or several channel blocks the fp32 summation order (so the last bits)
may vary from run to run on a GPU; under the interpreter, or one head per group and one block, it is fixed.
Sums over positions (the B/C biases, D, the initial state's k and angle, the MIMO weights) are accumulated in
registers and written once per program; the scalars' gradients (dt, A, trap) per channel block, then summed by
torch.

MIMO runs the same kernels with a rank axis of RP = next_pow2(r) lanes on the key / query / value tiles; the
forward re-walk also accumulates dmimo_o and dmimo_z, the reverse walk dmimo_x (the initial v's share included).

Memory traffic: forward reads the inputs once and writes y and the state; the backward reads the inputs twice
(plus the previous position's B and x again, from cache), writes theta (a floats per position and head) and 2 + 3
scalars per position, head and channel block, adds into dB / dC / dangles, and writes the gradients.

Register use on sm_90 (``ptxas -v`` on the kernels compiled here for an H100 target, n = 128, fp32, 4 warps):
SISO BLOCK_P = 16: forward 151, re-walk 185, reverse walk 255 registers; MIMO r = 4, BLOCK_P = 4: 123 / 168 /
223; spills of at most 32 bytes. Not yet timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import interpreting, require_triton_device
from .._validate import records_grad
from .ref import check_scan_args, check_step_args
from .triton_kernels import _m3_bwd_kernel, _m3_fwd_kernel

__all__ = ["mamba3_scan_triton", "mamba3_state_update_triton"]


# ----------------------------------------------------------------------------------------------- checks


def _tl_dtype(cdt: torch.dtype):
    return tl.float64 if cdt == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------- launches


class _Geo:
    def __init__(self, x, B, angles, cu_seqlens, block_p, mimo_o, cdt, num_warps=None):
        self.b, self.l, self.h, self.p = x.shape
        self.r, self.g, self.n = B.shape[2], B.shape[3], B.shape[4]
        self.RP = triton.next_power_of_2(self.r)
        self.halves = self.r > 1  # MIMO pairs i with i + n / 2, SISO interleaves
        self.per_rank = self.r > 1 and mimo_o is None
        self.a = angles.shape[2]
        self.packed = cu_seqlens is not None
        self.ns = cu_seqlens.numel() - 1 if self.packed else self.b
        self.NH = triton.next_power_of_2((self.n + 1) // 2)  # rotary pairs (an odd n: a lone last element)
        if block_p is None:
            if interpreting():
                block_p = self.p  # the interpreter's cost is per op: one block per head
            else:
                # (RP, BLOCK_P, n) tiles of <= 2048 fp32 (1024 fp64) elements: registers, no spills at n = 128
                budget = 1024 if cdt == torch.float64 else 2048
                block_p = max(1, min(self.p, budget // (2 * self.NH * self.RP)))
        self.BLOCK_P = triton.next_power_of_2(block_p)
        self.num_warps = 4 if num_warps is None else num_warps  # untuned: no GPU timings yet
        self.npb = triton.cdiv(self.p, self.BLOCK_P)

    def grid(self):
        return (self.ns, self.h, self.npb)

    def out_shape(self):
        return (self.b, self.l, self.r, self.h, self.p) if self.per_rank else (self.b, self.l, self.h, self.p)


def _strides(t, k):
    return tuple(t.stride()) if t is not None else (0,) * k


def _common_strides(x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z):
    return (
        *x.stride(),
        *dt.stride(),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        *trap.stride(),
        *angles.stride(),
        *B_bias.stride(),
        *C_bias.stride(),
        D.stride(0) if D is not None else 0,
        *_strides(z, 4),
    )


def _flags(geo: _Geo, init, D, z, mimo):
    mx, mz, mo = mimo
    return dict(
        RP=geo.RP,
        BLOCK_P=geo.BLOCK_P,
        NH=geo.NH,
        HALVES=geo.halves,
        PACKED=geo.packed,
        HAS_INIT=init is not None,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_MX=mx is not None,
        HAS_MZ=mz is not None and z is not None,
        HAS_MO=mo is not None,  # SISO: the rank-0 output, (b, l, 1, h, p) is (b, l, h, p)
    )


def _sizes(geo: _Geo):
    return (geo.l, geo.h, geo.p, geo.n, geo.a, geo.h // geo.g, geo.npb, geo.r)


def _forward(inputs, mimo, init, cu, geo: _Geo, cdt, mode, gout=None, gfinal_h=None):
    """mode 0: (y, final state); mode 1 (the backward's re-walk): (dz, dq partials, gy.y partials, angles,
    <gH, H> partials, dmimo_o and dmimo_z per sequence)."""
    x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z = inputs
    mx, mz, mo = mimo
    dev = x.device
    b, l, h, p, n, a, r, ns, npb = geo.b, geo.l, geo.h, geo.p, geo.n, geo.a, geo.r, geo.ns, geo.npb
    dummy = x
    th0, h0, k0, v0 = init if init is not None else (dummy, dummy, dummy, dummy)
    f = dict(dtype=cdt, device=dev)
    if mode == 0:
        out = torch.empty(geo.out_shape(), dtype=x.dtype, device=dev)
        thf = torch.zeros(ns, h, a, **f)
        hf = torch.empty(ns, h, p, n, **f)
        kf = torch.empty(ns, r, h, n, **f)
        vf = torch.empty(ns, h, p, **f)
        dz = dC = dthq = dCb = gyy = thbuf = r0 = dmo = dmz = dummy
        gout = gfinal_h = dummy
    else:
        out = thf = hf = kf = vf = dummy
        dz = torch.empty(b, l, h, p, dtype=z.dtype, device=dev) if z is not None else dummy
        dC = torch.zeros(b, l, r, geo.g, n, **f)  # atomically summed over the group's heads and the blocks
        dthq = torch.zeros(b, l, h, a, **f)  # atomically summed over the blocks
        dCb = torch.empty(ns, h, npb, r, n, **f)
        gyy = torch.empty(b, l, h, npb, **f)
        thbuf = torch.empty(b, l, h, a, **f)
        r0 = torch.empty(ns, h, npb, **f)
        dmo = torch.empty(ns, h, r, p, **f) if mo is not None else dummy
        dmz = torch.empty(ns, h, r, p, **f) if mz is not None and z is not None else dummy
    _m3_fwd_kernel[geo.grid()](
        x,
        dt,
        A,
        B,
        C,
        trap,
        angles,
        B_bias,
        C_bias,
        D if D is not None else dummy,
        z if z is not None else dummy,
        mx if mx is not None else dummy,
        mz if mz is not None else dummy,
        mo if mo is not None else dummy,
        cu if cu is not None else dummy,
        th0,
        h0,
        k0,
        v0,
        out,
        thf,
        hf,
        kf,
        vf,
        gout,
        gfinal_h,
        dz,
        dC,
        dthq,
        dCb,
        gyy,
        thbuf,
        r0,
        dmo,
        dmz,
        *_common_strides(x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z),
        *_strides(th0 if init is not None else None, 3),
        *_strides(h0 if init is not None else None, 4),
        *_strides(k0 if init is not None else None, 4),
        *_strides(v0 if init is not None else None, 3),
        *_sizes(geo),
        MODE=mode,
        CDT=_tl_dtype(cdt),
        num_warps=geo.num_warps,
        **_flags(geo, init, D, z, mimo),
    )
    if mode == 0:
        return out, (thf, hf, kf, vf)
    return (
        dz if z is not None else None,
        dC,
        dthq,
        dCb.sum((0, 2)),
        gyy,
        thbuf,
        r0,
        dmo.sum(0) if mo is not None else None,
        dmz.sum(0) if mz is not None and z is not None else None,
    )


def _backward(inputs, mimo, init, cu, geo: _Geo, cdt, gout, gfinal):
    x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z = inputs
    mx, mz, mo = mimo
    dev = x.device
    b, l, h, p, n, a, g, r, ns, npb = geo.b, geo.l, geo.h, geo.p, geo.n, geo.a, geo.g, geo.r, geo.ns, geo.npb
    f = dict(dtype=cdt, device=dev)
    gout = torch.zeros(geo.out_shape(), dtype=x.dtype, device=dev) if gout is None else gout.contiguous()
    shapes = ((ns, h, a), (ns, h, p, n), (ns, r, h, n), (ns, h, p))
    gth, gh, gk, gv = (
        torch.zeros(s, **f) if gt is None else gt.reshape(s).to(cdt).contiguous()
        for gt, s in zip(gfinal if gfinal is not None else (None,) * 4, shapes)
    )
    dz, dC, dthq, dCb, gyy, thbuf, r0, dmo, dmz = _forward(inputs, mimo, init, cu, geo, cdt, 1, gout=gout, gfinal_h=gh)

    dummy = x
    th0, h0, k0, v0 = init if init is not None else (dummy, dummy, dummy, dummy)
    dx = torch.empty(b, l, h, p, dtype=x.dtype, device=dev)
    dB = torch.zeros(b, l, r, g, n, **f)  # atomically summed over the group's heads and the blocks
    dBb = torch.empty(ns, h, npb, r, n, **f)
    dang = torch.zeros(b, l, a, **f)  # atomically summed over heads and blocks
    dscal = torch.empty(b, l, h, npb, 3, **f)
    dDp = torch.empty(ns, h, npb, **f)
    dmx = torch.empty(ns, h, r, p, **f) if mx is not None else dummy
    dth0 = torch.empty(ns, h, npb, a, **f)
    dh0 = torch.empty(ns, h, p, n, **f)
    dk0 = torch.empty(ns, h, npb, r, n, **f)
    dv0 = torch.empty(ns, h, p, **f)
    _m3_bwd_kernel[geo.grid()](
        x,
        dt,
        A,
        B,
        C,
        trap,
        angles,
        B_bias,
        C_bias,
        D if D is not None else dummy,
        z if z is not None else dummy,
        mx if mx is not None else dummy,
        mz if mz is not None else dummy,
        mo if mo is not None else dummy,
        cu if cu is not None else dummy,
        k0,
        v0,
        gout,
        gth,
        gh,
        gk,
        gv,
        dthq,
        gyy,
        thbuf,
        r0,
        dx,
        dB,
        dBb,
        dang,
        dscal,
        dDp,
        dmx,
        dth0,
        dh0,
        dk0,
        dv0,
        *_common_strides(x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z),
        *_strides(k0 if init is not None else None, 4),
        *_strides(v0 if init is not None else None, 3),
        *_sizes(geo),
        CDT=_tl_dtype(cdt),
        num_warps=geo.num_warps,
        **_flags(geo, init, D, z, mimo),
    )
    dBb = dBb.sum((0, 2))  # (h, r, n)
    ds = dscal.sum(3)
    dD = dDp.sum((0, 2)) if D is not None else None
    grads = (dx, ds[..., 0], ds[..., 1], dB, dC, ds[..., 2], dang, dBb, dCb, dD, dz)
    dmimo = (dmx.sum(0) if mx is not None else None, dmz, dmo)
    dinit = (dth0.sum(2), dh0, dk0.sum(2).transpose(1, 2), dv0)
    return grads, dmimo, dinit


class _Mamba3ScanFn(torch.autograd.Function):
    """(x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o, theta0, H0, k0, v0) ->
    (y, theta, H, k, v)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mx, mz, mo, th0, h0, k0, v0, cu, geo, cdt):
        ctx.set_materialize_grads(False)
        inputs = (x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z)
        mimo = tuple(None if w is None else w.contiguous() for w in (mx, mz, mo))
        init = None if h0 is None else (th0, h0, k0, v0)
        y, final = _forward(inputs, mimo, init, cu, geo, cdt, 0)
        ctx.save_for_backward(*inputs, *mimo, *(init if init is not None else (None,) * 4), cu)
        ctx.meta = (geo, cdt)
        return (y, *final)

    @staticmethod
    def backward(ctx, gy, gth, gh, gk, gv):
        saved = ctx.saved_tensors
        inputs, mimo, init, cu = saved[:11], saved[11:14], saved[14:18], saved[18]
        init = None if init[1] is None else init
        geo, cdt = ctx.meta
        gfinal = None if all(t is None for t in (gth, gh, gk, gv)) else (gth, gh, gk, gv)
        grads, dmimo, dinit = _backward(inputs, mimo, init, cu, geo, cdt, gy, gfinal)

        def cast(gr, like):
            return None if gr is None or like is None else gr.to(like.dtype)

        out = [cast(gr, t) for gr, t in zip(grads, inputs)]
        out += [cast(gr, t) for gr, t in zip(dmimo, mimo)]
        if init is None:
            out += [None] * 4
        else:
            out += [cast(gr, t) for gr, t in zip(dinit, init)]
        return (*out, None, None, None)


def _as_cdt(t, cdt):
    return t if t.dtype == cdt else t.to(cdt)


def mamba3_scan_triton(
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
    *,
    cu_seqlens=None,
    block_p=None,
    num_warps=None,
):
    """Fused Triton Mamba-3 scan (SISO or MIMO; see the module docstring). Returns y (b, l, h, p) in x.dtype
    ((b, l, r, h, p) for MIMO with mimo_o=None), or
    (y, (angle, ssm, k, v)) with ``return_final_state`` (float32 states; float64 for float64 inputs). Packed rows:
    ``cu_seqlens`` (N + 1,) with batch 1, ``initial_state`` and the final state then have N rows. ``chunk_size``
    is accepted for the common signature and unused (the kernels walk positions; nothing is chunked).
    ``block_p`` / ``num_warps`` override the value channels per program and the warps per program (tests,
    tuning). Differentiable in every tensor."""
    dims, cu_seqlens = check_scan_args(
        x, dt, A, B, C, trap, angles, B_bias, C_bias, chunk_size, D, z, mimo_x, mimo_z, mimo_o, initial_state,
        cu_seqlens,
    )  # fmt: skip
    l, h, p, n, a, r, ns, cdt = dims.l, dims.h, dims.p, dims.n, dims.a, dims.r, dims.rows, dims.compute_dtype
    init = tuple(initial_state) if initial_state is not None else None
    mimo = (mimo_x, mimo_z, mimo_o)
    require_triton_device("mamba3_scan", x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, *mimo, *(init or ()))
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=x.device, dtype=torch.int64).contiguous()
    geo = _Geo(x, B, angles, cu_seqlens, block_p, mimo_o, cdt, num_warps)
    if l == 0:
        y = x.new_empty(geo.out_shape())
        if init is not None:
            final = tuple(_as_cdt(t, cdt).clone() for t in init)
        else:
            final = (
                torch.zeros(ns, h, a, dtype=cdt, device=x.device),
                torch.zeros(ns, h, p, n, dtype=cdt, device=x.device),
                torch.zeros(ns, r, h, n, dtype=cdt, device=x.device),
                torch.zeros(ns, h, p, dtype=cdt, device=x.device),
            )
        return (y, final) if return_final_state else y
    th0, h0, k0, v0 = init if init is not None else (None,) * 4
    tensors = (x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, *mimo, th0, h0, k0, v0)
    if records_grad(*tensors):
        y, *final = _Mamba3ScanFn.apply(*tensors, cu_seqlens, geo, cdt)
        final = tuple(final)
    else:
        mimo_c = tuple(None if w is None else w.contiguous() for w in mimo)
        y, final = _forward(tensors[:11], mimo_c, init, cu_seqlens, geo, cdt, 0)
    return (y, final) if return_final_state else y


# ----------------------------------------------------------------------------------------------- decode step


def mamba3_state_update_triton(
    state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D=None, z=None, mimo_x=None, mimo_z=None, mimo_o=None
):
    """One Mamba-3 decode step: x (b, h, p), dt / A / trap (b, h), B / C (b, r, g, n), angles (b, a), z (b, h, p);
    returns (y (b, h, p), new_state); ``state`` (angle, ssm, k, v) is never written. The step is the forward
    kernel over one position (one program per (row, head, block of channels)); differentiable through the
    same kernels' backward."""
    check_step_args(state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D, z, mimo_x, mimo_z, mimo_o)

    def one(t):
        return None if t is None else t.unsqueeze(1)

    y, new_state = mamba3_scan_triton(
        one(x),
        one(dt),
        one(A),
        one(B),
        one(C),
        one(trap),
        one(angles),
        B_bias,
        C_bias,
        D=D,
        z=one(z),
        mimo_x=mimo_x,
        mimo_z=mimo_z,
        mimo_o=mimo_o,
        initial_state=state,
        return_final_state=True,
    )
    return y[:, 0], new_state
