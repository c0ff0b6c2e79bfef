"""Mamba-2 SSD scan and decode step: Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Same signatures, argument checks, semantics and return conventions as ``ref.py`` / ``chunked.py``
(mamba_ssm's ``mamba_chunk_scan_combined`` / ``selective_state_update`` for Mamba-2): y in ``x.dtype``, states
float32. Arithmetic is float32 for fp16 / bf16 / fp32 inputs; float64 inputs are refused with a
KernelInputError (use ``backend='chunked'``, vectorised and exact in float64, or ``backend='ref'``).

The chunked SSD algorithm (Q = chunk size, nc = cdiv(l, Q) chunks, the last one may be short; Q is clamped
to l, which changes no result), kernels in ``triton_fwd.py`` / ``triton_bwd.py``:

Forward (5 launches)
  1. ``_cumsum_fwd_kernel``    grid (b*nc, h/BH): dt + dt_bias, softplus (threshold 20) fused in; dtp and the
     in-chunk running sum cs of dtp * A, (b, h, nc*Q): summed in float64 and kept as float32 hi + lo, so every
     segment sum (hi_t - hi_s) + (lo_t - lo_s) is accurate relative to the segment even when |cs| is in the
     hundreds (strong decay; a float32 running sum loses ~3e-5 there).
  2. ``_bmm_cb_kernel``        grid (b*nc*g, Q/BM, Q/BM), lower tiles only: CB = C B^T per chunk and group
     (shared by the h/g heads of the group).
  3. ``_chunk_state_kernel``   grid (b*nc*h, p/BP, n/BN): each chunk's own state sum_s exp(T - cs_s) dt_s x_s B_s^T,
     one tl.dot per BK steps.
  4. ``_state_pass_fwd_kernel`` grid (b*h, p*n/BLOCK): sequential over chunks, S[c+1] = exp(T_c) S[c] + own_c,
     S[0] = initial_state; gives every chunk's entering state and the final state.
  5. ``_chunk_scan_fwd_kernel`` grid (b*nc*h, Q/BM, p/BP): y = exp(cs_t) C_t S[c] + causal (CB o exp(cs_t - cs_s)
     o dt_s) @ x + D x, times silu(z); decays are exps of differences of running sums (never a quotient), so
     nothing overflows.

Backward (recomputes 1-4, nothing big is saved but the inputs and, with z, y before the gate; 6 more launches)
  ``_gate_bwd_kernel`` (with z) dy = dout silu(z), dz; ``_chunk_state_kernel`` (backward mode) the per-chunk
  gradient of the entering state through the chunk's outputs; ``_state_pass_bwd_kernel`` the reverse recurrence
  (G per chunk, d initial_state, dT partials); ``_chunk_bwd_dx_kernel`` dx, the direct ddt, w (for dA) and dD
  partials; ``_chunk_bwd_dbc_kernel`` per-head dB, dC, r and the intra-chunk d(log decay) in the stable
  "segment" form; ``_cumsum_bwd_kernel`` d(log decay) -> ddt, dA, through softplus and dt_bias. Per-block
  partials (dA, dD, dt_bias, per-head dB/dC over a group, dT, p-block partials) are summed in torch.

Packed rows (``cu_seqlens``, batch 1; initial and final states one per sequence, (N, h, p, n))
  The same launches over the whole row, with a constant J = 1024 subtracted from the log decay at every sequence
  start in ``_cumsum_fwd_kernel`` (not from dt): every decay across a start (intra-chunk pairs, chunk-state
  weights, the state passing's chunk decay, the state-output factor) is exp(-J + ...) = 0, forward and backward,
  and J being a constant, the backward kernels need no change (mamba_ssm's seq_idx masks, folded into the
  running sums; see chunked.py for the precision). Per sequence, grid (N*h, ...):
  ``_init_term_fwd_kernel`` (with initial states) E_t C_t . h0_i on the steps of the sequence's first chunk,
  added by ``_chunk_scan_fwd_kernel`` before D and the gate (HAS_Y0); E h0_i joins the state leaving that chunk
  before the state passing (host, ``_Pack``) when the sequence goes on; ``_final_states_fwd_kernel`` the state
  after its last step from the state entering its last chunk and that chunk's steps (mamba_ssm's
  chunk_state_varlen). Backward: ``_final_states_bwd_kernel`` and ``_init_term_bwd_kernel`` (the gradients of
  those terms over the same one-chunk segments: dx, dB, dC, ddt, d(log decay), dh0), and d final_i joins the
  gradient of the state entering its last chunk before ``_state_pass_bwd_kernel``. E (decays from each start,
  on first-chunk steps) comes from the float64 sum of the running sums' hi + lo on the host.
  The four per-sequence kernels were compiled ahead of time like the others (sm_80, ptxas): bf16 no spills,
  float32 (3xTF32) spills of 0.3-0.9 KiB per thread; run under the interpreter only, not on a GPU yet.

Decode step: ``_state_update_kernel`` grid (b*h, p/BP), one launch; it has no Triton backward: when grad mode
is on and an input requires grad, ``ssd_state_update_triton`` runs the differentiable chunked path
(``ssd_state_update_chunked``, the same numbers), since generation runs under no_grad.

GEMM operands: fp16 inputs (x, B, C all fp16) and bf16 inputs on a GPU feed the tensor cores in their own dtype
(the decay / dt weighted operands and the float32 states are rounded to it, as mamba_ssm does), accumulating in
float32; float32 inputs use 3xTF32 GEMMs (``input_precision="tf32x3"``: about float32 accuracy on the tensor
cores, never plain TF32) and a shallower pipeline (their operand tiles take twice the shared memory). Under the
interpreter every dot runs in plain float32 after the operand cast, and bf16 operands stay float32 there, because
Triton 3.x's interpreter multiplies bf16 dot operands wrongly (it treats their bits as integers). The bf16
operand path was checked under the interpreter by emulation (operands rounded to bf16, then a float32 dot):
y 8e-3, state 4e-3, gradients 1.4e-2 relative to the float64 reference, inside the test tolerances.

Tiles: 64-wide step / p / n tiles (8 warps) for the GEMM kernels, 32-wide rows and columns with full p and n for
the dB/dC kernel; every kernel was compiled ahead of time for sm_80 and sm_90 (ptxas, no GPU): bf16 paths have no
or a few hundred bytes of register spills, float32 (3xTF32) paths spill up to ~1 KiB per thread on sm_80.
Minimum bytes moved (for the benchmark's roofline; s_x, s_z, s_y, s_bc, s_dt element sizes, states float32,
nc*Q ~ l, P = b*l*h*p, N = b*l*g*n, H = b*l*h, St = b*h*p*n*4 one state, Sc = (l/Q)*St the per-chunk states):
  op level     forward  P*(s_x + s_y [+ s_z]) + 2*N*s_bc + H*s_dt [+ St initial] + St final
               backward P*(s_x + s_dout [+ s_z + s_pre] + s_dx [+ s_dz]) + 4*N*s_bc + 2*H*s_dt [+ 2*St]
               decode   2*b*h*p*n*4 (state in, state out) + b*(h*p*(s_x + s_y [+ s_z]) + 2*g*n*s_bc + h*s_dt)
  per kernel   _cumsum_fwd     H*s_dt + 12*H (dt, cs hi/lo out)
               _bmm_cb         2*N*s_bc + 2*b*l*g*Q (the lower half of the (Q, Q) float32 blocks)
               _chunk_state    P*s_x + N*s_bc (once per group, via L2) + 8*H + Sc
               _state_pass_fwd 2*Sc (+ St)
               _chunk_scan_fwd P*(s_x + s_y [+ s_z] [+ s_pre]) + N*s_bc + 2*b*l*g*Q + Sc + 12*H
               backward: _gate_bwd P*(s_dout + s_z + s_pre + s_dy + s_dz); _chunk_state (bwd) P*s_dy + N*s_bc + Sc;
               _state_pass_bwd 3*Sc (+ 2*St); _chunk_bwd_dx P*(s_x + s_dy + s_dx) + N*s_bc + 2*b*l*g*Q + Sc
               + 8*H; _chunk_bwd_dbc P*(s_x + s_dy) + 2*N*s_bc + 2*b*l*g*Q + 2*Sc + 8*b*l*h*n (per-head dB, dC)
               + the (Q/BM) da partials; _cumsum_bwd H*(s_dt + s_ddt) + 24*H.
  The per-chunk states (Sc, about P*4*n/Q bytes: as much as x at n = 128, Q = 256 in bf16) and CB are the
  intermediates of the chunked form; the forward recomputes nothing, the backward recomputes the 4 state launches.
None of these kernels has been run or timed on a GPU yet: block sizes are reasoned, not tuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._triton import interpreting, require_triton_device
from .._validate import records_grad
from ..errors import KernelInputError
from . import triton_bwd as _bwd
from . import triton_fwd as _fwd
from .chunked import _JUMP, packed_jumps, ssd_state_update_chunked
from .ref import check_packed_args, check_scan_args, check_step_args

__all__ = ["ssd_scan_triton", "ssd_state_update_triton"]

#: largest tile edge for steps, p and the n reduction (the tests lower it to exercise multi-tile paths)
_TILE_CAP = 64
#: elements of the (p * n) state handled by one program of the state-passing kernels
_STATE_BLOCK = 1024
#: warps of the GEMM kernels at 64-wide tiles
_GEMM_WARPS = 8
#: row / column tile of the dB / dC kernel (it keeps full p and n tiles live)
_DBC_TILE = 32


def _stages(dot) -> int:
    """Software-pipelining depth: float32 (3xTF32) operands take twice the shared memory of half ones."""
    return 2 if dot[0] == tl.float32 else 3


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(1, int(v)))


def _tiles(Q: int, p: int, n: int) -> dict:
    cap = _TILE_CAP
    bm = max(16, min(cap, _np2(Q)))
    return dict(
        BM=bm,
        BK=bm,
        BP=max(16, min(cap, _np2(p))),
        BN=max(16, min(cap, _np2(n))),
        BPF=max(16, _np2(p)),
        BNF=max(16, _np2(n)),  # full p and n (the dB/dC kernel)
        BQ=_np2(Q),
        NW=_GEMM_WARPS if bm >= 64 else 4,
    )


def _head_block(h: int, bq: int) -> int:
    return max(1, min(_np2(h), max(1, 4096 // bq)))


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_config(*tensors):
    """(dot operand dtype, input_precision) for tl.dot: the inputs' half dtype when they share one, else float32
    operands as 3xTF32 (see the module docstring for the interpreter's bf16 exception)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        (dt,) = dtypes
        if dt == torch.float16 or (dt == torch.bfloat16 and not interpreting()):
            return _TL[dt], "tf32"  # precision is ignored for half operands
    # float32: three TF32 tensor-core products per GEMM (a_hi b_hi + a_hi b_lo + a_lo b_hi), ~float32 accuracy;
    # the interpreter computes every dot in plain float32 anyway
    return tl.float32, "tf32x3"


def _strides_d(D):
    """D as an (h, p) pointer with strides: an (h,) D is read with a zero p stride."""
    if D.dim() == 1:
        return D.stride(0), 0
    return D.stride(0), D.stride(1)


class _Geometry:
    def __init__(self, x, B, chunk_size):
        self.b, self.l, self.h, self.p = x.shape
        self.g, self.n = B.shape[2], B.shape[3]
        self.hpg = self.h // self.g
        self.Q = max(1, min(int(chunk_size), self.l))
        self.nc = triton.cdiv(self.l, self.Q)
        self.Lp = self.nc * self.Q
        self.t = _tiles(self.Q, self.p, self.n)


class _Pack:
    """Packed rows (batch 1) of one call: ``cu`` (N + 1,) int64, the log-decay jumps at the sequence starts
    (``_cumsum_fwd_kernel``), the per-sequence initial states ``h0`` (N, h, p, n) or None, and whether the
    per-sequence final states are wanted. ``init_factors`` adds, once the running sums exist, what the initial
    states need: E (h, Lp) float32 = exp(decay from the sequence's start through t) on the steps t of each
    sequence's first chunk (0 elsewhere), send (N,) the end of those steps, goes_on (N,) whether the sequence
    continues past that chunk, c0 (N,) that chunk and e_x (N, h) = E at send - 1."""

    def __init__(self, cu: torch.Tensor, l: int, h0, want_final: bool):
        self.cu, self.l, self.h0, self.want_final = cu, l, h0, bool(want_final)
        self.jumps = packed_jumps(cu, l, torch.float32)

    def init_factors(self, cs, csl, Q: int, Lp: int) -> None:
        cu, l = self.cu, self.l
        N = cu.numel() - 1
        val = cs[0].to(torch.float64) + csl[0].to(torch.float64)  # (h, Lp): the in-chunk running sums, hi + lo
        t0, end = cu[:-1], cu[1:]
        c0 = t0 // Q
        send = torch.minimum(end, (c0 + 1) * Q)
        # the running sum just before the start (0 at a chunk start), less the start's own jump (none at 0)
        before = torch.where(t0 % Q == 0, 0.0, val[:, (t0 - 1).clamp(min=0)])
        base = before - torch.where(torch.arange(N, device=cu.device) > 0, _JUMP, 0.0)  # (h, N)
        seq = torch.repeat_interleave(torch.arange(N, device=cu.device), end - t0, output_size=l)
        first = torch.arange(l, device=cu.device) < send[seq]
        seg = torch.where(first, val[:, :l] - base[:, seq], 0.0)
        E = torch.zeros_like(cs[0])
        E[:, :l] = torch.where(first, seg.exp(), 0.0).to(torch.float32)
        self.E, self.send, self.c0 = E, send, c0
        self.goes_on = ((end - 1) // Q > c0).to(torch.int32)
        self.e_x = E[:, send - 1].transpose(0, 1).contiguous()  # (N, h)


def _forward_states(geo, x, dt, A, B, C, dt_bias, dt_softplus, initial_state, dot, pack=None):
    """Launches 1-4: dtp, cs (b, h, Lp), CB (b, nc, g, Q, Q) and S (b, nc + 1, h, p, n), all float32.
    ``pack`` (packed rows): the jumps of the log decay (``_cumsum_fwd_kernel``); with initial states, each h0_i
    joins the state leaving its sequence's first chunk (when the sequence goes on) before the state passing."""
    jumps = pack.jumps if pack is not None else None
    b, l, h, p, g, n, Q, nc, Lp, t = geo.b, geo.l, geo.h, geo.p, geo.g, geo.n, geo.Q, geo.nc, geo.Lp, geo.t
    dev = x.device
    f32 = torch.float32
    dtp = torch.empty((b, h, Lp), dtype=f32, device=dev)
    cs = torch.empty((b, h, Lp), dtype=f32, device=dev)
    csl = torch.empty((b, h, Lp), dtype=f32, device=dev)
    bh = _head_block(h, t["BQ"])
    bias = dt_bias if dt_bias is not None else A
    _fwd._cumsum_fwd_kernel[(b * nc, triton.cdiv(h, bh))](
        dt,
        bias,
        A,
        jumps if jumps is not None else dt,
        dtp,
        cs,
        csl,
        l,
        h,
        Q,
        nc,
        Lp,
        dt.stride(0),
        dt.stride(1),
        dt.stride(2),
        bias.stride(0),
        A.stride(0),
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus),
        HAS_JUMP=jumps is not None,
        BLOCK_H=bh,
        BLOCK_Q=t["BQ"],
        num_warps=4,
    )

    CB = torch.empty((b, nc, g, Q, Q), dtype=f32, device=dev)
    nm = triton.cdiv(Q, t["BM"])
    _fwd._bmm_cb_kernel[(b * nc * g, nm, nm)](
        C,
        B,
        CB,
        l,
        Q,
        nc,
        g,
        n,
        *C.stride(),
        *B.stride(),
        BLOCK_M=t["BM"],
        BLOCK_N=t["BN"],
        DOT=dot[0],
        PREC=dot[1],
        num_warps=t["NW"],
        num_stages=_stages(dot),
    )

    S = torch.empty((b, nc + 1, h, p, n), dtype=f32, device=dev)
    _fwd._chunk_state_kernel[(b * nc * h, triton.cdiv(p, t["BP"]), triton.cdiv(n, t["BN"]))](
        x,
        B,
        dtp,
        cs,
        csl,
        S,
        l,
        h,
        p,
        n,
        Q,
        nc,
        Lp,
        geo.hpg,
        nc + 1,
        1,
        *x.stride(),
        *B.stride(),
        BACKWARD=False,
        BLOCK_P=t["BP"],
        BLOCK_N=t["BN"],
        BLOCK_K=t["BK"],
        DOT=dot[0],
        PREC=dot[1],
        num_warps=t["NW"],
        num_stages=_stages(dot),
    )

    if pack is not None and pack.h0 is not None:
        pack.init_factors(cs, csl, Q, Lp)
        scale = (pack.e_x * pack.goes_on[:, None])[..., None, None]
        S[0].index_add_(0, pack.c0 + 1, scale * pack.h0.to(f32))
    init = initial_state if initial_state is not None else S
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0, 0)
    block = min(_STATE_BLOCK, _np2(p * n))
    _fwd._state_pass_fwd_kernel[(b * h, triton.cdiv(p * n, block))](
        S, init, cs, h, p, n, Q, nc, Lp, *init_strides, HAS_INIT=initial_state is not None, BLOCK=block, num_warps=4
    )
    return dtp, (cs, csl), CB, S


def _forward(geo, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, store_pre, pack=None):
    """The whole forward: returns (y, final_state, y before the gate or None). Packed rows (``pack``): the final
    states are each sequence's, (N, h, p, n), or None when not wanted."""
    dot = _dot_config(x, B, C)
    dtp, cs, CB, S = _forward_states(geo, x, dt, A, B, C, dt_bias, dt_softplus, initial_state, dot, pack)
    b, l, h, p, n, Q, nc, Lp, t = geo.b, geo.l, geo.h, geo.p, geo.n, geo.Q, geo.nc, geo.Lp, geo.t
    y0 = None
    if pack is not None and pack.h0 is not None:
        h0 = pack.h0
        N = h0.shape[0]
        y0 = torch.zeros((l, h, p), dtype=torch.float32, device=x.device)
        _fwd._init_term_fwd_kernel[(N * h, triton.cdiv(Q, t["BM"]), triton.cdiv(p, t["BP"]))](
            C,
            h0,
            pack.E,
            pack.cu,
            pack.send,
            y0,
            h,
            p,
            n,
            Q,
            Lp,
            geo.hpg,
            *C.stride()[1:],
            *h0.stride(),
            BLOCK_M=t["BM"],
            BLOCK_P=t["BP"],
            BLOCK_N=t["BN"],
            DOT=dot[0],
            PREC=dot[1],
            num_warps=t["NW"],
        )
    out = torch.empty((b, l, h, p), dtype=x.dtype, device=x.device)
    pre = torch.empty_like(out) if (store_pre and z is not None) else None
    zz = z if z is not None else x
    DD = D if D is not None else A
    d_strides = _strides_d(D) if D is not None else (0, 0)
    _fwd._chunk_scan_fwd_kernel[(b * nc * h, triton.cdiv(Q, t["BM"]), triton.cdiv(p, t["BP"]))](
        x,
        C,
        zz,
        DD,
        CB,
        S,
        dtp,
        *cs,
        out,
        pre if pre is not None else out,
        y0 if y0 is not None else out,
        l,
        h,
        p,
        n,
        Q,
        nc,
        Lp,
        geo.g,
        geo.hpg,
        *x.stride(),
        *C.stride(),
        *zz.stride(),
        *d_strides,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        STORE_PRE=pre is not None,
        HAS_Y0=y0 is not None,
        BLOCK_M=t["BM"],
        BLOCK_K=t["BK"],
        BLOCK_P=t["BP"],
        BLOCK_N=t["BN"],
        DOT=dot[0],
        PREC=dot[1],
        num_warps=t["NW"],
        num_stages=_stages(dot),
    )
    if pack is not None:
        if not pack.want_final:
            return out, None, pre
        cu = pack.cu
        final = torch.empty((cu.numel() - 1, h, p, n), dtype=torch.float32, device=x.device)
        _fwd._final_states_fwd_kernel[(final.shape[0] * h, triton.cdiv(p, t["BP"]), triton.cdiv(n, t["BN"]))](
            x,
            B,
            dtp,
            *cs,
            S,
            cu,
            final,
            h,
            p,
            n,
            Q,
            Lp,
            geo.hpg,
            *x.stride()[1:],
            *B.stride()[1:],
            BLOCK_P=t["BP"],
            BLOCK_N=t["BN"],
            BLOCK_K=t["BK"],
            DOT=dot[0],
            PREC=dot[1],
            num_warps=t["NW"],
            num_stages=_stages(dot),
        )
        if pack.h0 is not None:  # a sequence that ends in its first chunk: h0 reaches its final state directly
            final += (pack.e_x * (1 - pack.goes_on)[:, None])[..., None, None] * pack.h0.to(torch.float32)
        return out, final, pre
    final = S[:, nc].clone()  # not a view: the (nc + 1)-state buffer is freed
    return out, final, pre


def _backward(geo, saved, dt_softplus, dout, dfinal, packed):
    x, dt, A, B, C, D, z, dt_bias, initial_state, pre, cu = saved
    pack = None
    if packed is not None:  # (want_final,): the initial_state slot holds the per-sequence initial states
        pack = _Pack(cu, geo.l, initial_state, packed[0])
        initial_state = None
    # packed rows with per-sequence final states: their gradient enters S[c] here and the steps of each
    # sequence's last chunk in _final_states_bwd_kernel below; S[nc] gets none
    dfinal_seq, dfinal = (dfinal, None) if pack is not None else (None, dfinal)
    b, l, h, p, g, n, Q, nc, Lp, t = geo.b, geo.l, geo.h, geo.p, geo.g, geo.n, geo.Q, geo.nc, geo.Lp, geo.t
    dev = x.device
    f32 = torch.float32
    dot = _dot_config(x, B, C)
    # packed rows: the same jumps, and nothing else changes below (every decay across a start is exactly 0, and
    # J is a constant: the d(log decay) -> ddt, dA chain of _cumsum_bwd_kernel holds as it is)
    dtp, cs, CB, S = _forward_states(geo, x, dt, A, B, C, dt_bias, dt_softplus, initial_state, dot, pack)
    if dout is None:
        dout = torch.zeros((b, l, h, p), dtype=x.dtype, device=dev)

    # gate: dy = dout * silu(z), dz
    dz = None
    if z is not None:
        dy = torch.empty((b, l, h, p), dtype=dout.dtype, device=dev)
        dz = torch.empty((b, l, h, p), dtype=z.dtype, device=dev)
        bhp = min(256, _np2(h * p))
        bl = max(1, min(_np2(l), 2048 // bhp))
        _bwd._gate_bwd_kernel[(b, triton.cdiv(l, bl), triton.cdiv(h * p, bhp))](
            dout, z, pre, dy, dz, l, h, p, *dout.stride(), *z.stride(), BLOCK_L=bl, BLOCK_HP=bhp, num_warps=4
        )
    else:
        dy = dout

    # d(loss)/d(state entering chunk c) through chunk c's outputs, then the reverse recurrence over chunks
    dS = torch.empty((b, nc, h, p, n), dtype=f32, device=dev)
    _fwd._chunk_state_kernel[(b * nc * h, triton.cdiv(p, t["BP"]), triton.cdiv(n, t["BN"]))](
        dy,
        C,
        dtp,
        *cs,
        dS,
        l,
        h,
        p,
        n,
        Q,
        nc,
        Lp,
        geo.hpg,
        nc,
        0,
        *dy.stride(),
        *C.stride(),
        BACKWARD=True,
        BLOCK_P=t["BP"],
        BLOCK_N=t["BN"],
        BLOCK_K=t["BK"],
        DOT=dot[0],
        PREC=dot[1],
        num_warps=t["NW"],
        num_stages=_stages(dot),
    )
    block = min(_STATE_BLOCK, _np2(p * n))
    nblk = triton.cdiv(p * n, block)
    dT = torch.empty((b, h, nc, nblk), dtype=f32, device=dev)
    dinit = torch.empty((b, h, p, n), dtype=f32, device=dev) if initial_state is not None else None
    df = dfinal if dfinal is not None else dS
    if dfinal_seq is not None:  # d final_i / d S[c_i] = exp(cs_e) (0 when sequence i starts inside chunk c_i)
        e = cu[1:] - 1
        exp_e = torch.exp(cs[0][0][:, e] + cs[1][0][:, e]).transpose(0, 1)  # (N, h)
        dS[0].index_add_(0, e // Q, exp_e[..., None, None] * dfinal_seq.to(f32))
    _bwd._state_pass_bwd_kernel[(b * h, nblk)](
        dS,
        S,
        cs[0],
        df,
        dinit if dinit is not None else dS,
        dT,
        h,
        p,
        n,
        Q,
        nc,
        Lp,
        nblk,
        *(dfinal.stride() if dfinal is not None else (0, 0, 0, 0)),
        HAS_DFINAL=dfinal is not None,
        HAS_INIT=dinit is not None,
        BLOCK=block,
        num_warps=4,
    )
    G = dS  # now G[c] = d(loss)/d(state leaving chunk c)

    # dx, direct ddt, w, dD
    nm = triton.cdiv(Q, t["BM"])
    npb = triton.cdiv(p, t["BP"])
    dx = torch.empty((b, l, h, p), dtype=x.dtype, device=dev)
    ddt_acc = torch.empty((npb, b, h, Lp), dtype=f32, device=dev)
    w = torch.empty((npb, b, h, Lp), dtype=f32, device=dev)
    dD_part = torch.empty((b * nc * nm, h, p), dtype=f32, device=dev) if D is not None else None
    DD = D if D is not None else A
    _bwd._chunk_bwd_dx_kernel[(b * nc * h, nm, npb)](
        x,
        B,
        dy,
        DD,
        CB,
        G,
        dtp,
        *cs,
        dx,
        ddt_acc,
        w,
        dD_part if dD_part is not None else w,
        l,
        b,
        h,
        p,
        n,
        Q,
        nc,
        Lp,
        g,
        geo.hpg,
        nm,
        *x.stride(),
        *B.stride(),
        *dy.stride(),
        *(_strides_d(D) if D is not None else (0, 0)),
        HAS_D=D is not None,
        BLOCK_M=t["BM"],
        BLOCK_K=t["BK"],
        BLOCK_P=t["BP"],
        BLOCK_N=t["BN"],
        DOT=dot[0],
        PREC=dot[1],
        num_warps=t["NW"],
        num_stages=_stages(dot),
    )

    # per-head dB, dC, r and the intra-chunk d(log decay)
    dB_h = torch.empty((b, l, h, n), dtype=f32, device=dev)
    dC_h = torch.empty((b, l, h, n), dtype=f32, device=dev)
    r = torch.empty((b, h, Lp), dtype=f32, device=dev)
    # this kernel holds full (rows, p) and (rows, n) tiles: at most 32 rows and columns per step
    bm = min(t["BM"], _DBC_TILE)
    nm_bc = triton.cdiv(Q, bm)
    da = torch.zeros((b, h, nc, nm_bc, Q), dtype=f32, device=dev)
    _bwd._chunk_bwd_dbc_kernel[(b * nc * h, nm_bc)](
        x,
        B,
        C,
        dy,
        CB,
        S,
        G,
        dtp,
        *cs,
        dB_h,
        dC_h,
        r,
        da,
        l,
        h,
        p,
        n,
        Q,
        nc,
        Lp,
        g,
        geo.hpg,
        nm_bc,
        *x.stride(),
        *B.stride(),
        *C.stride(),
        *dy.stride(),
        BLOCK_M=bm,
        BLOCK_K=bm,
        BLOCK_P=t["BPF"],
        BLOCK_N=t["BNF"],
        DOT=dot[0],
        PREC=dot[1],
        num_warps=4 if t["BPF"] * t["BNF"] <= 64 * 64 else 8,
        num_stages=_stages(dot),
    )

    # the per-block partials, summed here; then d(log decay) -> ddt, dA, dt_bias
    da_direct = (da.sum(3) + dT.sum(3)[..., None]).reshape(b, h, Lp)
    ddt_acc = ddt_acc.sum(0) if npb > 1 else ddt_acc[0]
    w = w.sum(0) if npb > 1 else w[0]
    dh0 = None
    if pack is not None and pack.h0 is not None:
        h0 = pack.h0
        N = h0.shape[0]
        dC_f = torch.zeros((l, h, n), dtype=f32, device=dev)
        dh0 = torch.empty((N, h, p, n), dtype=f32, device=dev)
        da_i = torch.zeros((h, Lp), dtype=f32, device=dev)
        df = dfinal_seq if dfinal_seq is not None else dh0
        _bwd._init_term_bwd_kernel[(N * h,)](
            C,
            h0,
            pack.E,
            pack.cu,
            pack.send,
            pack.goes_on,
            dy,
            G,
            df,
            dC_f,
            dh0,
            da_i,
            h,
            p,
            n,
            Q,
            Lp,
            geo.hpg,
            *C.stride()[1:],
            *h0.stride(),
            *dy.stride()[1:],
            *df.stride(),
            HAS_DF=dfinal_seq is not None,
            BLOCK_M=bm,
            BLOCK_P=t["BPF"],
            BLOCK_N=t["BNF"],
            DOT=dot[0],
            PREC=dot[1],
            num_warps=4 if t["BPF"] * t["BNF"] <= 64 * 64 else 8,
        )
        dC_h.add_(dC_f)
        da_direct = da_direct + da_i
        dh0 = dh0.to(h0.dtype)
    if dfinal_seq is not None:
        dx_f = torch.zeros((l, h, p), dtype=f32, device=dev)
        dB_f = torch.zeros((l, h, n), dtype=f32, device=dev)
        ddt_f = torch.zeros((h, Lp), dtype=f32, device=dev)
        da_f = torch.zeros((h, Lp), dtype=f32, device=dev)
        _bwd._final_states_bwd_kernel[(dfinal_seq.shape[0] * h,)](
            x,
            B,
            dtp,
            *cs,
            S,
            cu,
            dfinal_seq,
            dx_f,
            dB_f,
            ddt_f,
            da_f,
            h,
            p,
            n,
            Q,
            Lp,
            geo.hpg,
            *x.stride()[1:],
            *B.stride()[1:],
            *dfinal_seq.stride(),
            BLOCK_M=bm,
            BLOCK_P=t["BPF"],
            BLOCK_N=t["BNF"],
            DOT=dot[0],
            PREC=dot[1],
            num_warps=4 if t["BPF"] * t["BNF"] <= 64 * 64 else 8,
        )
        dx = (dx.to(f32) + dx_f).to(x.dtype) if dx.dtype != f32 else dx.add_(dx_f)
        dB_h.add_(dB_f)
        ddt_acc = ddt_acc + ddt_f
        da_direct = da_direct + da_f
    ddt = torch.empty((b, l, h), dtype=dt.dtype, device=dev)
    dA_part = torch.empty((b * nc, h), dtype=f32, device=dev)
    dbias_part = torch.empty((b * nc, h), dtype=f32, device=dev) if dt_bias is not None else None
    bh = _head_block(h, t["BQ"])
    bias = dt_bias if dt_bias is not None else A
    _bwd._cumsum_bwd_kernel[(b * nc, triton.cdiv(h, bh))](
        dt,
        bias,
        A,
        dtp,
        ddt_acc,
        r,
        w,
        da_direct,
        ddt,
        dA_part,
        dbias_part if dbias_part is not None else dA_part,
        l,
        h,
        Q,
        nc,
        Lp,
        dt.stride(0),
        dt.stride(1),
        dt.stride(2),
        bias.stride(0),
        A.stride(0),
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus),
        BLOCK_H=bh,
        BLOCK_Q=t["BQ"],
        num_warps=4,
    )

    dA = dA_part.sum(0).to(A.dtype)
    dB = dB_h.view(b, l, g, geo.hpg, n).sum(3).to(B.dtype)
    dC = dC_h.view(b, l, g, geo.hpg, n).sum(3).to(C.dtype)
    dD = None
    if D is not None:
        dD = dD_part.sum(0)
        dD = (dD.sum(1) if D.dim() == 1 else dD).to(D.dtype)
    dbias = dbias_part.sum(0).to(dt_bias.dtype) if dt_bias is not None else None
    ds0 = dinit.to(initial_state.dtype) if initial_state is not None else dh0
    return dx, ddt, dA, dB, dC, dD, dz, dbias, ds0


class _SSDScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size, dt_softplus, cu=None, want_final=True):
        """Packed rows: ``cu`` (cu_seqlens), ``initial_state`` then holds the N per-sequence states and the
        second output is the N final states (None unless ``want_final``)."""
        geo = _Geometry(x, B, chunk_size)
        pack = _Pack(cu, geo.l, initial_state, want_final) if cu is not None else None
        init = None if pack is not None else initial_state
        y, final, pre = _forward(geo, x, dt, A, B, C, D, z, dt_bias, dt_softplus, init, store_pre=True, pack=pack)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, pre, cu)
        ctx.packed = (want_final,) if cu is not None else None
        ctx.geo = geo
        ctx.dt_softplus = dt_softplus
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal):
        grads = _backward(ctx.geo, ctx.saved_tensors, ctx.dt_softplus, dout, dfinal, ctx.packed)
        return (*grads, None, None, None, None)


def _refuse_float64(op: str, cd: torch.dtype) -> None:
    if cd == torch.float64:
        raise KernelInputError(
            f"{op}: the Triton kernels compute in float32 and do not take float64 inputs; "
            "use backend='chunked' (vectorised, float64 throughout) or backend='ref'"
        )


def ssd_scan_triton(
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
    cu_seqlens=None,
):
    """Chunked SSD scan in Triton; same arguments, checks and results as ``ssd_scan_ref`` (float64 refused).

    Differentiable in every tensor input (x, dt, A, B, C, D, z, dt_bias, initial_state) through y and the
    final state. ``chunk_size`` (64-256 on a GPU) only changes how the work is blocked.

    ``cu_seqlens`` (packed rows, batch 1; initial and final states (N, h, p, n)): see the module docstring."""
    if cu_seqlens is not None:
        args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, cu_seqlens)
        return _scan_triton_packed(*args, dt_softplus, return_final_state)
    # the shared checks first, so that every backend refuses a bad argument with the same KernelInputError
    dims = check_scan_args(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    require_triton_device("ssd_scan", x, dt, A, B, C, D, z, dt_bias, initial_state)
    _refuse_float64("ssd_scan", dims.compute_dtype)
    b, l, h, p, n = dims.b, dims.l, dims.h, dims.p, dims.n
    if l == 0:
        y = x.new_zeros((b, 0, h, p))
        if initial_state is None:
            s = torch.zeros((b, h, p, n), dtype=torch.float32, device=x.device)
        else:
            s = initial_state.to(torch.float32)
            s = s.clone() if s is initial_state else s
        return (y, s) if return_final_state else y
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    recording = records_grad(*inputs)
    if recording:
        y, s = _SSDScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, int(chunk_size), bool(dt_softplus))
    else:
        geo = _Geometry(x, B, chunk_size)
        y, s, _ = _forward(geo, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, store_pre=False)
    return (y, s) if return_final_state else y


def _scan_triton_packed(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, cu_seqlens, sp, final):
    dims, cu, _ = check_packed_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, None, cu_seqlens)
    require_triton_device("ssd_scan", x, dt, A, B, C, D, z, dt_bias, initial_state)
    _refuse_float64("ssd_scan", dims.compute_dtype)
    if records_grad(x, dt, A, B, C, D, z, dt_bias, initial_state):
        y, s = _SSDScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, int(chunk_size), bool(sp), cu, final)
    else:
        geo = _Geometry(x, B, chunk_size)
        pack = _Pack(cu, dims.l, initial_state, final)
        y, s, _ = _forward(geo, x, dt, A, B, C, D, z, dt_bias, sp, None, store_pre=False, pack=pack)
    return (y, s) if final else y


def ssd_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step in one Triton launch: returns (y (b, h, p) in x.dtype, new_state (b, h, p, n) float32);
    the state passed in is never written. float64 is refused. When a gradient is needed (grad mode on and an
    input requires grad) it runs the differentiable chunked path instead (same results; no Triton backward)."""
    dims = check_step_args(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias)
    require_triton_device("ssd_state_update", state, x, dt, A, B, C, D, z, dt_bias)
    _refuse_float64("ssd_state_update", dims.compute_dtype)
    inputs = (state, x, dt, A, B, C, D, z, dt_bias)
    if records_grad(*inputs):
        return ssd_state_update_chunked(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    b, h, p, n, g = dims.b, dims.h, dims.p, dims.n, dims.g
    y = torch.empty((b, h, p), dtype=x.dtype, device=x.device)
    new = torch.empty((b, h, p, n), dtype=torch.float32, device=x.device)
    bp = max(1, min(_np2(p), max(1, 2048 // _np2(n))))
    DD = D if D is not None else A
    zz = z if z is not None else x
    bias = dt_bias if dt_bias is not None else A
    _fwd._state_update_kernel[(b * h, triton.cdiv(p, bp))](
        state,
        x,
        dt,
        A,
        B,
        C,
        DD,
        zz,
        bias,
        y,
        new,
        h,
        p,
        n,
        h // g,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        A.stride(0),
        *B.stride(),
        *C.stride(),
        *(_strides_d(D) if D is not None else (0, 0)),
        *zz.stride(),
        bias.stride(0),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus),
        BLOCK_P=bp,
        BLOCK_N=_np2(n),
        num_warps=4,
    )
    return y, new
