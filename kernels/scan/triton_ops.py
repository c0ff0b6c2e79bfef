"""Mamba-1 selective scan: Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Same signatures, semantics and argument checks as ``ref.py`` / ``chunked.py`` (mamba_ssm's ``selective_scan_fn`` /
``selective_state_update``, real A only). float16 / bfloat16 / float32 inputs are computed with float32 states;
float64 inputs are computed entirely in float64 (a constexpr compute dtype; slow on GPUs, but exact, so every
backend agrees on what float64 means). The state returned is float32 (float64 for float64 inputs).

Kernels
-------
``_ss_fwd_walk_kernel`` (the default forward, ``fwd_kernel="walk"``; grid: (groups x channel blocks) x batch). A
program owns ``BLOCK_D`` channels of one group and walks the positions in order with its (BLOCK_D, N) state in
registers: per position it loads u, delta, z (BLOCK_D values each) and one column of B and C (N each), applies
delta_bias and softplus, ``h = exp(delta A) h + delta u B``, ``y = C . h + D u``, gates with ``silu(z)`` and
stores y. The positions are unrolled ``walk_chunk`` at a time (``tl.static_range``): nothing a position loads
depends on the state, so the loads of a step can be issued ahead of its recurrence. With a backward to follow
it also stores the state before every ``BLOCK_L``-th position, the chunk states the backward reads (the same
(b, ceil(l / BLOCK_L), d, n) tensor as the tile kernel; ``walk_chunk`` is a multiple of ``BLOCK_L``, so the
stores are placed at compile time). Packed rows: at a sequence start the carried state is replaced by the
sequence's initial state (or zeros), at an end the state is stored as its final state.

Why a sequential walk (issue 24: the tile scan below costs ~20 warp shuffles per state element; the CUDA kernel
users know scans consecutive positions per thread in registers). Two designs reach "consecutive positions in
registers, cross-thread carry as the only shuffle": (a) this walk, parallel over channels only; (b) a chunk of
positions laid out (lanes, K consecutive positions per lane), a sequential K-walk per lane, one small
associative scan over the lanes for the carry, then a second pass for y. (b) parallelises over positions too,
but in Triton the K-walk needs either a second exp per element (recompute the decays in the second pass) or K
(BLOCK_D, N) decay tiles held in registers, and whether a lane's K positions land in one thread is up to
Triton's layout passes, not the kernel. On an H100 the exp unit (16 per SM per clock) bounds the forward at one
exp per (channel, state, position): at d = 5120, n = 16, l = 8192 that is 0.67 G exps, ~0.19 ms, against
~0.11 ms to move the bf16 bytes (below); a second exp would double the bound. The walk needs exactly one, no
shuffles for the recurrence, and its layout is simple enough to check in the compiled code.

Its costs, per position, for a program of BLOCK_D channels (n = 16, compiled for sm_90 from a (1, 5120, 8192)
bf16 launch's specialisation; the compiler's own layout: each thread holds 4 states of one channel, 8 x 4
threads per warp, so BLOCK_D = 32 is 4 warps):

- bytes: u, delta, z read and y written, 4 e per channel (e = 2 for bf16), plus 2 e n for the B and C columns,
  read by each of the d / BLOCK_D programs of a row (L2 hits after the first). Per row that is the same
  4 e b d l + 2 e b g n l of DRAM traffic as the tile kernel, which is the minimum.
- registers (ptxas, sm_90, BLOCK_D = 32, walk_chunk = 32, 4 warps): 56 per thread for (b, d, l) inputs, 48 for
  the position-major ones a mixer passes; no spills, no local memory. They hold the 4 states and 4 scaled decay
  rates, the channel's D and bias, and the loads in flight. Per position and thread the PTX has 6 ex2 (4 decays,
  softplus, gate), 2 shuffles, 11 global loads for (b, d, l) inputs (B / C columns are strided there) or 5
  (position-major: vector loads), 1 store.
- work: one exp2 per state element (exp(delta A) = 2^(delta A log2 e) with A scaled once per program), one FMA
  for the state, one for y; the sum over n is 3 in-thread adds and 2 shuffles per channel. The per-channel work
  (softplus, gate) is repeated by the 4 threads sharing a channel, and y passes through shared memory once
  (one barrier pair) to reach the store's layout.
- parallelism: b d n / 4 threads (at b = 1, d = 5120: 640 warps, ~5 per H100 SM); hiding the load latency
  rests on the unrolled loads. Larger batches fill the GPU more. At b = 1 the likely limit is instruction issue:
  the PTX has ~130 instructions per position and thread for its 4 states (~32 per state element; the
  per-channel softplus, gate, conversions, masks and pointer steps are repeated by the 4 threads of a channel),
  ~220 for 16 states at one warp per 32 channels (96 registers, ~14 per state element, but a quarter of the
  threads). That is the trade a GPU sweep has to settle: ``block_d`` and the warps the plan derives from it,
  and ``walk_chunk``, are guesses until then; ``bench/gpu_kernels.py`` times the walk and the tile forward side
  by side (``--scan-forwards``, ``--walk-block-d``, ``--walk-chunk``).

``_ss_fwd_kernel`` (``fwd_kernel="tile"``, the forward before the walk, kept for side-by-side GPU timing; grid:
channel blocks x batch). Fused forward: reads u, delta, B, C, z once; applies
delta_bias and softplus (threshold 20, as mamba_ssm) in registers; walks the sequence in chunks of ``BLOCK_L``
positions. For a chunk and a block of ``BLOCK_D`` channels it builds the (BLOCK_D, N, BLOCK_L) decay tile
``exp(delta A)`` and drive tile ``delta u B``, runs ``tl.associative_scan`` with the first-order linear recurrence
combine ``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)`` along time, adds the carried state times the cumulative
decay, contracts with C over N, applies ``D u`` and the ``silu(z)`` gate and writes y in the output dtype. Only
y, the final state and (when a backward will follow) the state at the start of every chunk
((b, nchunks, d, n), fp32) reach memory. Nothing divides by a decay, so decays that underflow are exact zeros
and growing states (raw negative delta) are reproduced, as in the reference.

A program owns ``SUB`` consecutive channel blocks of one group (1 by default) and carries each block's state in
registers from chunk to chunk. Grid axis 0 runs over (lcm of the B and C group counts) x (programs per group),
so a program's channels read one group of B and one group of C, and B / C with different group counts are read
in place (no repeat). In the backward, program-private global scratch (carried adjoint, the dA / dD /
ddelta_bias accumulators) is read-modify-written, and a (BLOCK_D, N) value may be held by several threads, so
every block reads all of it, then ``tl.debug_barrier()``, then writes; another barrier ends each chunk.

``_ss_bwd_kernel`` (same grid). Walks the chunks newest first; per chunk and channel block it recomputes the
states from the stored chunk-start state (the same scan), then the adjoint ``mu_t = dL/dh_t`` with a reverse
``tl.associative_scan`` over the 3-tuple (first decay, decay product excluding the first, sum) that realises
``mu_t = C_t gy_t + exp(delta_{t+1} A) mu_{t+1}`` without a shifted tile, plus the carried adjoint from the
following chunk (kept per channel block in the dinitial_state buffer, which ends holding dL/dh0). From these:
du, ddelta (through softplus and the bias), dz, and per-program partial sums of dB / dC (over the program's
channels, accumulated in registers across its channel blocks; (b, programs, n, l) fp32, summed per group in
torch afterwards), dA (per batch row, summed over b in torch), dD, ddelta_bias. ``dA_t h_{t-1}`` is taken as
``h_t - delta_t u_t B_t`` (no shift needed; exact when the decay is 0).

Packed rows (``cu_seqlens``, batch 1; ``VARLEN``): both kernels read the sequence number of every position
(int32, (l,)); a position whose neighbour before it has another number starts a sequence, one whose neighbour
after it has another number ends one. At a start s of sequence i the decay fed to the scan is 0 and the
drive gains ``a_s h0_i`` (h0_i read from the (N, d, n) initial states), so the state restarts there with no
change to the tile scan; at an end the state is stored as sequence i's final state. The backward masks the
same decays in the reverse adjoint scan, adds sequence i's final-state gradient to ``C_t gy_t`` at its end,
and stores ``dL/dh0_i = mu_s a_s`` at the start (``mu_s a_s h_{s-1}`` is then ``mu_s a_s h0_i``, so dA and
ddelta need no change). A program walks the whole row over its channels, so no loop over sequences.

``_ss_step_kernel`` (grid: batch x channel blocks). The decode step: one fused pass over the (b, d, n) state,
reading it and writing the new state (never in place), y with D and the gate applied.

Gradients of the decode step: generation runs under ``no_grad``; when an input does require grad, the forward
still runs the Triton kernel and the backward recomputes the step with the differentiable chunked path
(``selective_state_update_chunked``) and differentiates that.

Minimum DRAM bytes (e = bytes per activation element, s = bytes per state element: 4, or 8 for float64;
b, d, l, n, g as usual; P = programs per batch row of the backward; BLOCK_L = 32 on GPUs for n <= 16):

- forward: read u, delta, z 3 e b d l; read B, C 2 e b g n l; write y e b d l; read h0 and write the final
  state 2 s b d n; with a backward to follow, also write the chunk-start states s b d n ceil(l / BLOCK_L).
  (B / C are re-read from L2 by each of the d / (BLOCK_D SUB) programs of a row.)
- backward: read u, delta, z, dy 4 e b d l; B, C 2 e b g n l; the chunk states s b d n ceil(l / BLOCK_L);
  write du, ddelta, dz 3 e b d l; dB / dC partials 2 * 4 b P n l written, then read and reduced by torch
  (2 e b g n l written); dh0, dA partials 2 s b d n (+ read g_final s b d n).
- decode step: read the state s b d n and write the new state 4 b d n (fp32; 8 for float64); x, dt, z, y
  4 e b d; B, C 2 e b g n.

Without D / z / delta_bias, their terms drop. Measured on an H100 (docs/benchmarks.md): 4-5% of copy bandwidth
forward with the tile kernel. Its cost is the warp shuffles of the tile scan and of the reductions over N and over
the chunk, not bytes; ``_plan``'s GPU tiling of the tile kernels comes from ``bench/tune_selective_scan.py``. The
walk has not been timed on a GPU yet (issue 24; no GPU was available when it was written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._layout import empty_like_layout
from .._triton import interpreting, require_triton_device
from .._validate import records_grad
from ..errors import KernelInputError
from .chunked import _empty_scan  # the l == 0 result, shared with the chunked path
from .ref import check_scan_args, check_state_update_args, compute_dtype
from .triton_kernels import _ss_bwd_kernel, _ss_fwd_kernel, _ss_fwd_walk_kernel, _ss_step_kernel

__all__ = ["FORWARD_KERNELS", "selective_scan_triton", "selective_state_update_triton"]

#: the forward kernels ``selective_scan_triton(fwd_kernel=...)`` can run: the sequential walk (default) and the
#: chunk-tile associative scan it replaced (kept so a GPU can time both in one process, bench/gpu_kernels.py)
FORWARD_KERNELS = ("walk", "tile")


# ----------------------------------------------------------------------------------------------- host side


def _tl_dtype(cdt: torch.dtype):
    return tl.float64 if cdt == torch.float64 else tl.float32


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@dataclass(frozen=True)
class _Plan:
    """Tiling of one call. BLOCK_L is shared by forward and backward (the stored chunk states are per chunk)."""

    NP: int
    BLOCK_L: int
    fwd_bd: int
    fwd_sub: int
    fwd_warps: int
    bwd_bd: int
    bwd_sub: int
    bwd_warps: int
    fwd_kernel: str = "walk"
    walk_bd: int = 1
    walk_chunk: int = 1
    walk_warps: int = 1


def _sub_for(b: int, G: int, nblk: int, max_sub: int, min_programs: int) -> int:
    """Most channel blocks per program (a power of two <= max_sub) that still leaves min_programs programs."""
    sub = _pow2_floor(max(1, min(max_sub, nblk)))
    while sub > 1 and b * G * -(-nblk // sub) < min_programs:
        sub //= 2
    return sub


def _plan(
    b, n, dG, G, device, block_l=None, block_d=None, sub_blocks=None, fwd_kernel="walk", walk_chunk=None
) -> _Plan:
    NP = triton.next_power_of_2(n)
    interp = interpreting()
    if block_l is None:
        # GPU: 32 positions per chunk for n <= 16 (chosen by bench/tune_selective_scan.py on an H100; the chunk
        # states cost 4 n / BLOCK_L bytes per (b, d, l) element); the interpreter's cost is per tile element,
        # padding included, so short chunks waste less there
        block_l = 16 if interp else (32 if NP <= 16 else 16)
    BLOCK_L = triton.next_power_of_2(block_l)
    dGp = triton.next_power_of_2(dG)

    def bd(tile_elems):
        if block_d is not None:
            return triton.next_power_of_2(block_d)
        return max(1, min(dGp, _pow2_floor(tile_elems // (NP * BLOCK_L))))

    if interp:
        # the interpreter runs a program's tile ops in numpy: fewer, larger tiles are faster there
        fwd_bd, bwd_bd = bd(4096), bd(2048)
    else:
        # GPU (H100 sweep, n = 16, bf16, b = 1, d = 1536 / 5120): one channel per program and few warps are
        # fastest in both directions. The scan's cost is warp shuffles and cross-warp exchanges of the
        # (channel, n, position) tile, which grow with the warps a tile spans; there are d / BLOCK_D programs
        # per batch row, plenty to fill the GPU at Mamba widths.
        fwd_bd, bwd_bd = bd(NP * BLOCK_L), bd(NP * BLOCK_L)

    def warps(block_d):
        return max(1, min(8, _pow2_floor(block_d * NP * BLOCK_L // 256)))  # ~8 tile elements per thread

    sms = _sm_count(device)
    if sub_blocks is not None:
        fwd_sub = bwd_sub = sub_blocks
    else:
        fwd_sub = 1  # the forward carries each channel block's state in registers: sub-blocks would run in turn
        # backward: several channel blocks per program, because the dB / dC partial rows (one per program,
        # (n, l) fp32 each) cost bandwidth; it keeps >= 4 programs per SM
        bwd_sub = _sub_for(b, G, -(-dG // bwd_bd), max(1, 32 // bwd_bd), 4 * sms)
    # the walk: channels per program (its state is BLOCK_D x NP registers spread over the program's threads).
    # GPU: 32 channels, about 4 state elements per thread (4 warps at n = 16): d / 32 programs per batch row,
    # enough to fill an H100 at Mamba widths (d = 5120: 160 programs, 640 warps) while the reduction over n
    # stays mostly in-thread. A guess until a GPU sweep (bench/gpu_kernels.py --walk-block-d). Interpreter:
    # the whole group in one program (its cost is per numpy op, not per element).
    if block_d is not None:
        walk_bd = triton.next_power_of_2(block_d)
    else:
        walk_bd = min(dGp, max(1, 2048 // NP) if interp else 32)
    walk_warps = max(1, min(8, _pow2_floor(walk_bd * NP // 128)))
    # positions unrolled per step of the walk (a multiple of BLOCK_L, so the chunk-state stores are static)
    chunk = walk_chunk if walk_chunk is not None else (BLOCK_L if interp else 32)
    walk_chunk = max(triton.next_power_of_2(chunk), BLOCK_L)
    return _Plan(
        NP,
        BLOCK_L,
        fwd_bd,
        fwd_sub,
        warps(fwd_bd),
        bwd_bd,
        bwd_sub,
        warps(bwd_bd),
        fwd_kernel,
        walk_bd,
        walk_chunk,
        walk_warps,
    )


def _bcl(X: torch.Tensor) -> torch.Tensor:
    """B / C as (b, g, n, l) (a view; (b, n, l) is one group)."""
    return X if X.dim() == 4 else X.unsqueeze(1)


def _strides3(X, *, fallback=(0, 0, 0)):
    return tuple(X.stride()) if X is not None else fallback


class _Geometry:
    def __init__(self, u, A, B4, C4):
        self.b, self.d, self.l = u.shape
        self.n = A.shape[1]
        self.gB, self.gC = B4.shape[1], C4.shape[1]
        self.G = self.gB * self.gC // math.gcd(self.gB, self.gC)
        self.dG = self.d // self.G
        self.rB, self.rC = self.G // self.gB, self.G // self.gC


def _sequence_numbers(cu: torch.Tensor, length: int) -> torch.Tensor:
    """The sequence number of every position (int32, (length,)), on cu's device without a host sync."""
    positions = torch.arange(length, device=cu.device)
    return torch.searchsorted(cu[1:], positions, right=True).to(torch.int32)


class _Packed:
    """Packed rows for the kernels: the sequence number of every position (int32, (l,)), N, and the per-sequence
    initial states (N, d, n) contiguous in the compute dtype (None: zeros)."""

    def __init__(self, cu_seqlens, h0, cdt, device, length):
        self.N = cu_seqlens.numel() - 1
        self.seq = _sequence_numbers(cu_seqlens.to(device, torch.int64), length)
        self.h0 = None if h0 is None else h0.detach().to(device, cdt).contiguous()


def _scan_forward(
    u, delta, A, B4, C4, D, z, bias, h0, softplus, cdt, plan: _Plan, geo: _Geometry, store_states: bool, packed=None
):
    b, d, l, n = geo.b, geo.d, geo.l, geo.n
    nchunks = -(-l // plan.BLOCK_L)
    out = empty_like_layout(u, u.dtype)
    h = torch.zeros(b, d, n, dtype=cdt, device=u.device)  # the carried state, per channel block; ends final
    if h0 is not None and packed is None:
        h.copy_(h0.detach())
    fin = h if packed is None else torch.zeros(packed.N, d, n, dtype=cdt, device=u.device)
    states = (
        torch.empty(b, nchunks, d, n, dtype=cdt, device=u.device)
        if store_states
        else torch.empty(0, dtype=cdt, device=u.device)
    )
    dummy = u
    if plan.fwd_kernel == "walk":
        nblk = -(-geo.dG // plan.walk_bd)
        _ss_fwd_walk_kernel[(geo.G * nblk, b)](
            u,
            delta,
            A,
            B4,
            C4,
            D if D is not None else dummy,
            z if z is not None else dummy,
            bias if bias is not None else dummy,
            out,
            h,
            states,
            packed.seq if packed is not None else h,
            packed.h0 if packed is not None and packed.h0 is not None else h,
            fin,
            *u.stride(),
            *delta.stride(),
            *A.stride(),
            *B4.stride(),
            *C4.stride(),
            D.stride(0) if D is not None else 0,
            *_strides3(z),
            bias.stride(0) if bias is not None else 0,
            *out.stride(),
            d,
            n,
            l,
            geo.dG,
            nblk,
            geo.rB,
            geo.rC,
            -(-l // plan.walk_chunk),
            BLOCK_D=plan.walk_bd,
            NP=plan.NP,
            CHUNK=plan.walk_chunk,
            BLOCK_L=plan.BLOCK_L,
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=bias is not None,
            SOFTPLUS=bool(softplus),
            STORE_STATES=store_states,
            CDT=_tl_dtype(cdt),
            VARLEN=packed is not None,
            HAS_H0=packed is not None and packed.h0 is not None,
            num_warps=plan.walk_warps,
        )
        return out, fin, (states if store_states else None)
    nblk = -(-geo.dG // plan.fwd_bd)
    ppg = -(-nblk // plan.fwd_sub)
    grid = (geo.G * ppg, b)
    _ss_fwd_kernel[grid](
        u,
        delta,
        A,
        B4,
        C4,
        D if D is not None else dummy,
        z if z is not None else dummy,
        bias if bias is not None else dummy,
        out,
        h,
        states,
        packed.seq if packed is not None else h,
        packed.h0 if packed is not None and packed.h0 is not None else h,
        fin,
        *u.stride(),
        *delta.stride(),
        *A.stride(),
        *B4.stride(),
        *C4.stride(),
        D.stride(0) if D is not None else 0,
        *_strides3(z),
        bias.stride(0) if bias is not None else 0,
        *out.stride(),
        d,
        n,
        l,
        geo.dG,
        ppg,
        geo.rB,
        geo.rC,
        nchunks,
        BLOCK_D=plan.fwd_bd,
        NP=plan.NP,
        BLOCK_L=plan.BLOCK_L,
        SUB=plan.fwd_sub,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=bias is not None,
        SOFTPLUS=bool(softplus),
        STORE_STATES=store_states,
        CDT=_tl_dtype(cdt),
        VARLEN=packed is not None,
        HAS_H0=packed is not None and packed.h0 is not None,
        num_warps=plan.fwd_warps,
    )
    return out, fin, (states if store_states else None)


def _scan_backward(
    u, delta, A, B4, C4, D, z, bias, states, gout, gfinal, softplus, cdt, plan: _Plan, geo: _Geometry, packed=None
):
    b, d, l, n = geo.b, geo.d, geo.l, geo.n
    dev = u.device
    nchunks = states.shape[1]
    nblk = -(-geo.dG // plan.bwd_bd)
    ppg = -(-nblk // plan.bwd_sub)
    nprog = geo.G * ppg
    f32 = dict(dtype=cdt, device=dev)
    K = torch.zeros(b, d, n, **f32)  # the carried adjoint, per channel block; ends as dL/dh0
    gfp = dh0 = None
    if packed is not None:  # packed rows: g_final (N, d, n) enters at the sequences' ends; dL/dh0 is (N, d, n)
        dh0 = torch.zeros(packed.N, d, n, **f32)
        if gfinal is not None:
            gfp = gfinal.to(cdt).contiguous()
    elif gfinal is not None:
        K.copy_(gfinal)
    du = empty_like_layout(u, u.dtype)
    ddelta = empty_like_layout(delta, delta.dtype)
    dz = empty_like_layout(z, z.dtype) if z is not None else None
    dBp = torch.empty(b, nprog, n, l, **f32)
    dCp = torch.empty(b, nprog, n, l, **f32)
    dA = torch.zeros(b, d, n, **f32)
    dD = torch.zeros(b, d, **f32) if D is not None else None
    dbias = torch.zeros(b, d, **f32) if bias is not None else None
    if gout is None:
        gout = torch.zeros(b, d, l, dtype=u.dtype, device=dev)
    dummy = u
    _ss_bwd_kernel[(nprog, b)](
        u,
        delta,
        A,
        B4,
        C4,
        D if D is not None else dummy,
        z if z is not None else dummy,
        bias if bias is not None else dummy,
        gout,
        states,
        K,
        packed.seq if packed is not None else K,
        packed.h0 if packed is not None and packed.h0 is not None else K,
        gfp if gfp is not None else K,
        dh0 if dh0 is not None else K,
        du,
        ddelta,
        dz if dz is not None else du,
        dBp,
        dCp,
        dA,
        dD if dD is not None else dA,
        dbias if dbias is not None else dA,
        *u.stride(),
        *delta.stride(),
        *A.stride(),
        *B4.stride(),
        *C4.stride(),
        D.stride(0) if D is not None else 0,
        *_strides3(z),
        bias.stride(0) if bias is not None else 0,
        *gout.stride(),
        *du.stride(),
        *ddelta.stride(),
        *_strides3(dz),
        d,
        n,
        l,
        geo.dG,
        ppg,
        geo.rB,
        geo.rC,
        nchunks,
        nprog,
        BLOCK_D=plan.bwd_bd,
        NP=plan.NP,
        BLOCK_L=plan.BLOCK_L,
        SUB=plan.bwd_sub,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=bias is not None,
        SOFTPLUS=bool(softplus),
        CDT=_tl_dtype(cdt),
        VARLEN=packed is not None,
        HAS_H0=packed is not None and packed.h0 is not None,
        HAS_GF=gfp is not None,
        num_warps=plan.bwd_warps,
    )
    # partial rows of one B (C) group are consecutive: lcm-group major, then programs
    dB = dBp.view(b, geo.gB, geo.rB * ppg, n, l).sum(2)
    dC = dCp.view(b, geo.gC, geo.rC * ppg, n, l).sum(2)
    return (
        du,
        ddelta,
        dA.sum(0),
        dB,
        dC,
        None if dD is None else dD.sum(0),
        dz,
        None if dbias is None else dbias.sum(0),
        K if dh0 is None else dh0,
    )


class _SelectiveScanFn(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias, h0) -> (out, final_state); the backward is the Triton kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, B4, C4, D, z, bias, h0, softplus, cdt, plan, geo, cu_seqlens=None):
        ctx.set_materialize_grads(False)
        packed = None if cu_seqlens is None else _Packed(cu_seqlens, h0, cdt, u.device, u.shape[-1])
        out, final, states = _scan_forward(
            u, delta, A, B4, C4, D, z, bias, h0, softplus, cdt, plan, geo, store_states=True, packed=packed
        )
        ctx.packed = packed
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, bias, states)
        ctx.meta = (softplus, cdt, plan, geo, None if h0 is None else h0.dtype)
        return out, final

    @staticmethod
    def backward(ctx, gout, gfinal):
        u, delta, A, B4, C4, D, z, bias, states = ctx.saved_tensors
        softplus, cdt, plan, geo, h0_dtype = ctx.meta
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _scan_backward(
            u, delta, A, B4, C4, D, z, bias, states, gout, gfinal, softplus, cdt, plan, geo, ctx.packed
        )

        def cast(g, like):
            return None if g is None or like is None else g.to(like.dtype)

        return (
            du,
            ddelta,
            cast(dA, A),
            cast(dB, B4),
            cast(dC, C4),
            cast(dD, D),
            dz,
            cast(dbias, bias),
            None if h0_dtype is None else dh0.to(h0_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def selective_scan_triton(
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
    *,
    block_l=None,
    block_d=None,
    sub_blocks=None,
    cu_seqlens=None,
    fwd_kernel="walk",
    walk_chunk=None,
):
    """Fused Triton Mamba-1 selective scan (see the module docstring for the kernels).

    Returns out (b, d, l) in u.dtype (laid out position-major when u is), or (out, final_state (b, d, n)) with
    ``return_final_state``; the state is float32 (float64 for float64 inputs, computed in float64).
    Differentiable in every tensor argument. ``block_l`` / ``block_d`` / ``sub_blocks`` override the tiling
    (tests, tuning): positions per chunk (of the tile kernels, and of the chunk states the forward stores for the
    backward), channels per block (of every kernel), channel blocks per program (the tile kernels).
    ``fwd_kernel`` picks the forward: ``"walk"`` (default; the sequential walk) or ``"tile"`` (the chunk-tile
    associative scan it replaced, kept for side-by-side GPU timing); both feed the same backward.
    ``walk_chunk``: positions the walk unrolls per step (a power of two, raised to ``block_l`` at least).

    ``cu_seqlens`` (N + 1,) (packed rows, batch 1): the state restarts at every sequence start (from zeros or
    ``initial_state`` (N, d, n)) and the final state is (N, d, n), inside the kernels (module docstring).
    """
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    require_triton_device("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state)
    if fwd_kernel not in FORWARD_KERNELS:
        raise KernelInputError(
            f"selective_scan_triton: fwd_kernel must be one of {FORWARD_KERNELS}, got {fwd_kernel!r}"
        )
    if walk_chunk is not None and (isinstance(walk_chunk, bool) or not isinstance(walk_chunk, int) or walk_chunk < 1):
        raise KernelInputError(f"selective_scan_triton: walk_chunk must be a positive int, got {walk_chunk!r}")
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if l == 0:
        return _empty_scan(u, initial_state, b, d, n, cdt, return_final_state)
    B4, C4 = _bcl(B), _bcl(C)
    geo = _Geometry(u, A, B4, C4)
    plan = _plan(b, n, geo.dG, geo.G, u.device, block_l, block_d, sub_blocks, fwd_kernel, walk_chunk)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = records_grad(*tensors)
    if needs_grad:
        out, final = _SelectiveScanFn.apply(
            u, delta, A, B4, C4, D, z, delta_bias, initial_state, bool(delta_softplus), cdt, plan, geo, cu_seqlens
        )
    else:
        packed = None if cu_seqlens is None else _Packed(cu_seqlens, initial_state, cdt, u.device, l)
        out, final, _ = _scan_forward(
            u,
            delta,
            A,
            B4,
            C4,
            D,
            z,
            delta_bias,
            initial_state,
            delta_softplus,
            cdt,
            plan,
            geo,
            store_states=False,
            packed=packed,
        )
    return (out, final) if return_final_state else out


# ----------------------------------------------------------------------------------------------- decode step


def _state_update_forward(state, x, dt, A, B3, C3, D, z, bias, softplus, cdt):
    b, d = x.shape
    n = A.shape[1]
    NP = triton.next_power_of_2(n)
    BLOCK_D = max(1, min(triton.next_power_of_2(d), 512 // NP))
    y = torch.empty(b, d, dtype=x.dtype, device=x.device)
    new_state = torch.empty(b, d, n, dtype=cdt, device=x.device)
    dummy = x
    _ss_step_kernel[(b, triton.cdiv(d, BLOCK_D))](
        state,
        x,
        dt,
        A,
        B3,
        C3,
        D if D is not None else dummy,
        z if z is not None else dummy,
        bias if bias is not None else dummy,
        y,
        new_state,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *A.stride(),
        *B3.stride(),
        *C3.stride(),
        D.stride(0) if D is not None else 0,
        *(z.stride() if z is not None else (0, 0)),
        bias.stride(0) if bias is not None else 0,
        *y.stride(),
        d,
        n,
        d // B3.shape[1],
        d // C3.shape[1],
        BLOCK_D=BLOCK_D,
        NP=NP,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=bias is not None,
        SOFTPLUS=bool(softplus),
        CDT=_tl_dtype(cdt),
        num_warps=4,
    )
    return y, new_state


class _StateUpdateFn(torch.autograd.Function):
    """Triton forward; the backward differentiates the chunked path (generation normally runs under no_grad)."""

    @staticmethod
    def forward(ctx, state, x, dt, A, B, C, D, z, bias, softplus, cdt, B3, C3):
        ctx.save_for_backward(state, x, dt, A, B, C, D, z, bias)
        ctx.softplus = softplus
        return _state_update_forward(state, x, dt, A, B3, C3, D, z, bias, softplus, cdt)

    @staticmethod
    def backward(ctx, gy, gstate):
        from .chunked import selective_state_update_chunked

        saved = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [
                None if t is None else t.detach().requires_grad_(needs) for t, needs in zip(saved, ctx.needs_input_grad)
            ]
            y, new_state = selective_state_update_chunked(
                *inputs[:6], D=inputs[6], z=inputs[7], dt_bias=inputs[8], dt_softplus=ctx.softplus
            )
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            outs, grads_out = [], []
            for o, g in ((y, gy), (new_state, gstate)):
                if g is not None:
                    outs.append(o)
                    grads_out.append(g)
            grads = torch.autograd.grad(outs, wanted, grads_out, allow_unused=True) if wanted and outs else []
        it = iter(grads)
        result = [next(it) if t is not None and t.requires_grad else None for t in inputs]
        return (*result, None, None, None, None)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One fused Mamba-1 decode step. Returns (y (b, d) in x.dtype, new_state (b, d, n)); ``state`` is never
    written. The new state is float32, or float64 (computed in float64) when any input is float64.

    Differentiable: the forward is the Triton kernel; when an input requires grad, the backward recomputes the
    step with ``selective_state_update_chunked`` and differentiates it.
    """
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    require_triton_device("selective_state_update", state, x, dt, A, B, C, D, z, dt_bias)
    cdt = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    B3 = B if B.dim() == 3 else B.unsqueeze(1)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    tensors = (state, x, dt, A, B, C, D, z, dt_bias)
    if records_grad(*tensors):
        return _StateUpdateFn.apply(
            state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), cdt, B3.detach(), C3.detach()
        )
    return _state_update_forward(state, x, dt, A, B3, C3, D, z, dt_bias, dt_softplus, cdt)
