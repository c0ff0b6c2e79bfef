"""Mamba-1 selective scan: Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Same signatures, semantics and argument checks as ``ref.py`` / ``chunked.py`` (mamba_ssm's ``selective_scan_fn`` /
``selective_state_update``, real A only). float16 / bfloat16 / float32 inputs are computed with float32 states;
float64 inputs are computed entirely in float64 (a constexpr compute dtype; slow on GPUs, but exact, so every
backend agrees on what float64 means). The state returned is float32 (float64 for float64 inputs).

Kernels
-------
``_ss_fwd_kernel`` (grid: channel blocks x batch). Fused forward: reads u, delta, B, C, z once; applies
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
forward. The cost is the warp shuffles of the tile scan and of the reductions over N and over the chunk, not
bytes; ``_plan``'s GPU tiling comes from ``bench/tune_selective_scan.py``.
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
from .chunked import _empty_scan  # the l == 0 result, shared with the chunked path
from .ref import check_scan_args, check_state_update_args, compute_dtype

__all__ = ["selective_scan_triton", "selective_state_update_triton"]

#: softplus(x) = x above this (torch's and mamba_ssm's threshold)
SOFTPLUS_THRESHOLD = 20.0


# ----------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _softplus(x):
    # log1p(e) = log(v) - ((v - 1) - e) / v with v = fl(1 + e): the classic correction of the rounding of 1 + e
    # (accurate for tiny e, where log(1 + e) would give 0), without needing a log1p intrinsic
    e = tl.exp(tl.minimum(x, 20.0))
    v = 1.0 + e
    sp = tl.log(v) - ((v - 1.0) - e) / v
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _softplus_grad(x):
    return tl.where(x > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-x)))


@triton.jit
def _recurrence_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier segment: h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adjoint_combine(f_late, p_late, s_late, f_early, p_early, s_early):
    # reverse scan: the first argument is the later segment. A segment [i..j] is (f = a_i, p = a_{i+1}...a_j,
    # s = sum_k (a_{i+1}...a_k) c_k), so that s_t = mu_t from a zero adjoint after the chunk
    q = p_early * f_late
    return f_early, q * p_late, s_early + q * s_late


@triton.jit
def _ss_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, h_ptr, st_ptr,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
    s_D, s_zb, s_zd, s_zl, s_bias, s_ob, s_od, s_ol,
    d, n, l, dG, ppg, rB, rC, nchunks,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, SUB: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_STATES: tl.constexpr, CDT: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    gi = pid // ppg
    j = pid % ppg
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < n
    offs_l = tl.arange(0, BLOCK_L)
    offs_bd = tl.arange(0, BLOCK_D)
    u_base = u_ptr + bi * s_ub
    dl_base = dl_ptr + bi * s_db
    z_base = z_ptr + bi * s_zb
    o_base = out_ptr + bi * s_ob
    B_base = B_ptr + bi * s_Bb + (gi // rB) * s_Bg
    C_base = C_ptr + bi * s_Cb + (gi // rC) * s_Cg
    h_base = h_ptr + bi * d * n
    st_base = st_ptr + bi * nchunks * d * n
    for s in range(SUB):
        ch_loc = (j * SUB + s) * BLOCK_D + offs_bd
        mask_d = ch_loc < dG
        ch = gi * dG + ch_loc
        dn_mask = mask_d[:, None] & mask_n[None, :]
        h_ptrs = h_base + ch[:, None] * n + offs_n[None, :]
        A = tl.load(A_ptr + ch[:, None] * s_Ad + offs_n[None, :] * s_An, mask=dn_mask, other=0.0).to(CDT)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch * s_bias, mask=mask_d, other=0.0).to(CDT)
        if HAS_D:
            Dv = tl.load(D_ptr + ch * s_D, mask=mask_d, other=0.0).to(CDT)
        # the carried state stays in registers across the chunks of this channel block
        h = tl.load(h_ptrs, mask=dn_mask, other=0.0).to(CDT)
        for c in range(nchunks):
            t = c * BLOCK_L + offs_l
            mask_t = t < l
            bc_mask = mask_n[:, None] & mask_t[None, :]
            dl_mask = mask_d[:, None] & mask_t[None, :]
            Bt = tl.load(B_base + offs_n[:, None] * s_Bn + t[None, :] * s_Bl, mask=bc_mask, other=0.0).to(CDT)
            Ct = tl.load(C_base + offs_n[:, None] * s_Cn + t[None, :] * s_Cl, mask=bc_mask, other=0.0).to(CDT)
            uu = tl.load(u_base + ch[:, None] * s_ud + t[None, :] * s_ul, mask=dl_mask, other=0.0).to(CDT)
            x = tl.load(dl_base + ch[:, None] * s_dd + t[None, :] * s_dl, mask=dl_mask, other=0.0).to(CDT)
            if STORE_STATES:
                tl.store(st_base + c * d * n + ch[:, None] * n + offs_n[None, :], h, mask=dn_mask)
            if HAS_BIAS:
                x += bias[:, None]
            if SOFTPLUS:
                x = _softplus(x)
            dt = tl.where(dl_mask, x, 0.0)  # padding: decay 1, drive 0 -> the state passes through unchanged
            dA = tl.exp(dt[:, None, :] * A[:, :, None])
            drive = (dt * uu)[:, None, :] * Bt[None, :, :]
            a_cum, h_loc = tl.associative_scan((dA, drive), 2, _recurrence_combine)
            hh = h_loc + a_cum * h[:, :, None]
            y = tl.sum(hh * Ct[None, :, :], axis=1)
            h = tl.sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hh, 0.0), axis=2)
            if HAS_D:
                y += Dv[:, None] * uu
            if HAS_Z:
                zz = tl.load(z_base + ch[:, None] * s_zd + t[None, :] * s_zl, mask=dl_mask, other=0.0).to(CDT)
                y *= zz / (1.0 + tl.exp(-zz))
            tl.store(o_base + ch[:, None] * s_od + t[None, :] * s_ol, y.to(out_ptr.dtype.element_ty), mask=dl_mask)
        tl.store(h_ptrs, h, mask=dn_mask)


@triton.jit
def _ss_bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, g_ptr, st_ptr, k_ptr,
    du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, dA_ptr, dD_ptr, dbias_ptr,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
    s_D, s_zb, s_zd, s_zl, s_bias, s_gb, s_gd, s_gl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    d, n, l, dG, ppg, rB, rC, nchunks, nprog,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, SUB: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CDT: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    gi = pid // ppg
    j = pid % ppg
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < n
    offs_l = tl.arange(0, BLOCK_L)
    offs_bd = tl.arange(0, BLOCK_D)
    u_base = u_ptr + bi * s_ub
    dl_base = dl_ptr + bi * s_db
    z_base = z_ptr + bi * s_zb
    g_base = g_ptr + bi * s_gb
    du_base = du_ptr + bi * s_dub
    ddl_base = ddl_ptr + bi * s_ddb
    dz_base = dz_ptr + bi * s_dzb
    B_base = B_ptr + bi * s_Bb + (gi // rB) * s_Bg
    C_base = C_ptr + bi * s_Cb + (gi // rC) * s_Cg
    k_base = k_ptr + bi * d * n
    dA_base = dA_ptr + bi * d * n
    st_base = st_ptr + bi * nchunks * d * n
    part_base = (bi * nprog + pid) * n * l
    ones = tl.full([BLOCK_D, NP, BLOCK_L], 1.0, CDT)
    for ci in range(nchunks):
        c = nchunks - 1 - ci
        t = c * BLOCK_L + offs_l
        mask_t = t < l
        bc_mask = mask_n[:, None] & mask_t[None, :]
        bc_offs = offs_n[:, None] * l + t[None, :]
        Bt = tl.load(B_base + offs_n[:, None] * s_Bn + t[None, :] * s_Bl, mask=bc_mask, other=0.0).to(CDT)
        Ct = tl.load(C_base + offs_n[:, None] * s_Cn + t[None, :] * s_Cl, mask=bc_mask, other=0.0).to(CDT)
        dB_acc = tl.zeros([NP, BLOCK_L], CDT)
        dC_acc = tl.zeros([NP, BLOCK_L], CDT)
        for s in range(SUB):
            ch_loc = (j * SUB + s) * BLOCK_D + offs_bd
            mask_d = ch_loc < dG
            ch = gi * dG + ch_loc
            dn_mask = mask_d[:, None] & mask_n[None, :]
            dl_mask = mask_d[:, None] & mask_t[None, :]
            dn_offs = ch[:, None] * n + offs_n[None, :]
            h0 = tl.load(st_base + c * d * n + dn_offs, mask=dn_mask, other=0.0)
            K = tl.load(k_base + dn_offs, mask=dn_mask, other=0.0)
            dA_old = tl.load(dA_base + dn_offs, mask=dn_mask, other=0.0)
            if HAS_D:
                dD_old = tl.load(dD_ptr + bi * d + ch, mask=mask_d, other=0.0)
            if HAS_BIAS:
                dbias_old = tl.load(dbias_ptr + bi * d + ch, mask=mask_d, other=0.0)
            # the carried adjoint and the accumulators are read-modify-written below: every thread holding a
            # (replicated) element must have read it before any writes it
            tl.debug_barrier()
            A = tl.load(A_ptr + ch[:, None] * s_Ad + offs_n[None, :] * s_An, mask=dn_mask, other=0.0).to(CDT)
            uu = tl.load(u_base + ch[:, None] * s_ud + t[None, :] * s_ul, mask=dl_mask, other=0.0).to(CDT)
            x = tl.load(dl_base + ch[:, None] * s_dd + t[None, :] * s_dl, mask=dl_mask, other=0.0).to(CDT)
            if HAS_BIAS:
                x += tl.load(bias_ptr + ch * s_bias, mask=mask_d, other=0.0).to(CDT)[:, None]
            if SOFTPLUS:
                dt = _softplus(x)
            else:
                dt = x
            dt = tl.where(dl_mask, dt, 0.0)
            dtu = dt * uu
            dA = tl.exp(dt[:, None, :] * A[:, :, None])
            drive = dtu[:, None, :] * Bt[None, :, :]
            a_cum, h_loc = tl.associative_scan((dA, drive), 2, _recurrence_combine)
            hh = h_loc + a_cum * h0[:, :, None]
            gy = tl.load(g_base + ch[:, None] * s_gd + t[None, :] * s_gl, mask=dl_mask, other=0.0).to(CDT)
            if HAS_D:
                Dv = tl.load(D_ptr + ch * s_D, mask=mask_d, other=0.0).to(CDT)
            if HAS_Z:
                zz = tl.load(z_base + ch[:, None] * s_zd + t[None, :] * s_zl, mask=dl_mask, other=0.0).to(CDT)
                y_pre = tl.sum(hh * Ct[None, :, :], axis=1)
                if HAS_D:
                    y_pre += Dv[:, None] * uu
                sz = 1.0 / (1.0 + tl.exp(-zz))
                gz = gy * y_pre * sz * (1.0 + zz * (1.0 - sz))
                tl.store(dz_base + ch[:, None] * s_dzd + t[None, :] * s_dzl, gz.to(dz_ptr.dtype.element_ty),
                         mask=dl_mask)
                gy = gy * zz * sz
            # adjoint mu_t = C_t gy_t + a_{t+1} mu_{t+1}, plus the adjoint K carried in from the next chunk
            _, p_ex, s_loc = tl.associative_scan((dA, ones, Ct[None, :, :] * gy[:, None, :]), 2,
                                                 _adjoint_combine, reverse=True)
            mu = s_loc + p_ex * K[:, :, None]
            dC_acc += tl.sum(hh * gy[:, None, :], axis=0)
            dB_acc += tl.sum(mu * dtu[:, None, :], axis=0)
            g_dtu = tl.sum(mu * Bt[None, :, :], axis=1)
            X = mu * (hh - drive)  # mu_t a_t h_{t-1}
            g_dt = tl.sum(X * A[:, :, None], axis=1) + g_dtu * uu
            dA_c = tl.sum(X * dt[:, None, :], axis=2)
            g_u = g_dtu * dt
            if HAS_D:
                g_u += gy * Dv[:, None]
                tl.store(dD_ptr + bi * d + ch, dD_old + tl.sum(gy * uu, axis=1), mask=mask_d)
            if SOFTPLUS:
                g_x = g_dt * _softplus_grad(x)
            else:
                g_x = g_dt
            g_x = tl.where(dl_mask, g_x, 0.0)
            if HAS_BIAS:
                tl.store(dbias_ptr + bi * d + ch, dbias_old + tl.sum(g_x, axis=1), mask=mask_d)
            tl.store(du_base + ch[:, None] * s_dud + t[None, :] * s_dul, g_u.to(du_ptr.dtype.element_ty),
                     mask=dl_mask)
            tl.store(ddl_base + ch[:, None] * s_ddd + t[None, :] * s_ddl, g_x.to(ddl_ptr.dtype.element_ty),
                     mask=dl_mask)
            tl.store(dA_base + dn_offs, dA_old + dA_c, mask=dn_mask)
            # dL/d(state before the chunk) = a_0 mu_0
            K_new = tl.sum(tl.where(offs_l[None, None, :] == 0, dA * mu, 0.0), axis=2)
            tl.store(k_base + dn_offs, K_new, mask=dn_mask)
        tl.store(dBp_ptr + part_base + bc_offs, dB_acc, mask=bc_mask)
        tl.store(dCp_ptr + part_base + bc_offs, dC_acc, mask=bc_mask)
        tl.debug_barrier()


@triton.jit
def _ss_step_kernel(
    st_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, new_ptr,
    s_sb, s_sd, s_sn, s_xb, s_xd, s_tb, s_td, s_Ad, s_An, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    s_D, s_zb, s_zd, s_bias, s_yb, s_yd,
    d, n, dgB, dgC,
    BLOCK_D: tl.constexpr, NP: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CDT: tl.constexpr,
):
    bi = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    mask_d = ch < d
    mask = mask_d[:, None] & (offs_n < n)[None, :]
    h = tl.load(st_ptr + bi * s_sb + ch[:, None] * s_sd + offs_n[None, :] * s_sn, mask=mask, other=0.0).to(CDT)
    xv = tl.load(x_ptr + bi * s_xb + ch * s_xd, mask=mask_d, other=0.0).to(CDT)
    dt = tl.load(dt_ptr + bi * s_tb + ch * s_td, mask=mask_d, other=0.0).to(CDT)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + ch * s_bias, mask=mask_d, other=0.0).to(CDT)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + ch[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask, other=0.0).to(CDT)
    # channel i reads group i // (d / g); neighbouring channels hit the same cached B / C row
    Bv = tl.load(B_ptr + bi * s_Bb + (ch // dgB)[:, None] * s_Bg + offs_n[None, :] * s_Bn, mask=mask,
                 other=0.0).to(CDT)
    Cv = tl.load(C_ptr + bi * s_Cb + (ch // dgC)[:, None] * s_Cg + offs_n[None, :] * s_Cn, mask=mask,
                 other=0.0).to(CDT)
    h = tl.exp(dt[:, None] * A) * h + (dt * xv)[:, None] * Bv
    tl.store(new_ptr + bi * d * n + ch[:, None] * n + offs_n[None, :], h, mask=mask)
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + ch * s_D, mask=mask_d, other=0.0).to(CDT) * xv
    if HAS_Z:
        zz = tl.load(z_ptr + bi * s_zb + ch * s_zd, mask=mask_d, other=0.0).to(CDT)
        y *= zz / (1.0 + tl.exp(-zz))
    tl.store(y_ptr + bi * s_yb + ch * s_yd, y.to(y_ptr.dtype.element_ty), mask=mask_d)


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


def _sub_for(b: int, G: int, nblk: int, max_sub: int, min_programs: int) -> int:
    """Most channel blocks per program (a power of two <= max_sub) that still leaves min_programs programs."""
    sub = _pow2_floor(max(1, min(max_sub, nblk)))
    while sub > 1 and b * G * -(-nblk // sub) < min_programs:
        sub //= 2
    return sub


def _plan(b, n, dG, G, device, block_l=None, block_d=None, sub_blocks=None) -> _Plan:
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
    return _Plan(NP, BLOCK_L, fwd_bd, fwd_sub, warps(fwd_bd), bwd_bd, bwd_sub, warps(bwd_bd))


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


def _scan_forward(u, delta, A, B4, C4, D, z, bias, h0, softplus, cdt, plan: _Plan, geo: _Geometry,
                  store_states: bool):
    b, d, l, n = geo.b, geo.d, geo.l, geo.n
    nchunks = -(-l // plan.BLOCK_L)
    out = empty_like_layout(u, u.dtype)
    h = torch.zeros(b, d, n, dtype=cdt, device=u.device)  # the carried state, per channel block; ends final
    if h0 is not None:
        h.copy_(h0.detach())
    states = (torch.empty(b, nchunks, d, n, dtype=cdt, device=u.device) if store_states
              else torch.empty(0, dtype=cdt, device=u.device))
    nblk = -(-geo.dG // plan.fwd_bd)
    ppg = -(-nblk // plan.fwd_sub)
    grid = (geo.G * ppg, b)
    dummy = u
    _ss_fwd_kernel[grid](
        u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
        bias if bias is not None else dummy, out, h, states,
        *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(),
        D.stride(0) if D is not None else 0, *_strides3(z), bias.stride(0) if bias is not None else 0,
        *out.stride(),
        d, n, l, geo.dG, ppg, geo.rB, geo.rC, nchunks,
        BLOCK_D=plan.fwd_bd, NP=plan.NP, BLOCK_L=plan.BLOCK_L, SUB=plan.fwd_sub,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=bool(softplus),
        STORE_STATES=store_states, CDT=_tl_dtype(cdt), num_warps=plan.fwd_warps,
    )
    return out, h, (states if store_states else None)


def _scan_backward(u, delta, A, B4, C4, D, z, bias, states, gout, gfinal, softplus, cdt, plan: _Plan,
                   geo: _Geometry):
    b, d, l, n = geo.b, geo.d, geo.l, geo.n
    dev = u.device
    nchunks = states.shape[1]
    nblk = -(-geo.dG // plan.bwd_bd)
    ppg = -(-nblk // plan.bwd_sub)
    nprog = geo.G * ppg
    f32 = dict(dtype=cdt, device=dev)
    K = torch.zeros(b, d, n, **f32)  # the carried adjoint, per channel block; ends as dL/dh0
    if gfinal is not None:
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
        u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
        bias if bias is not None else dummy, gout, states, K,
        du, ddelta, dz if dz is not None else du, dBp, dCp, dA, dD if dD is not None else dA,
        dbias if dbias is not None else dA,
        *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(),
        D.stride(0) if D is not None else 0, *_strides3(z), bias.stride(0) if bias is not None else 0,
        *gout.stride(), *du.stride(), *ddelta.stride(), *_strides3(dz),
        d, n, l, geo.dG, ppg, geo.rB, geo.rC, nchunks, nprog,
        BLOCK_D=plan.bwd_bd, NP=plan.NP, BLOCK_L=plan.BLOCK_L, SUB=plan.bwd_sub,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=bool(softplus),
        CDT=_tl_dtype(cdt), num_warps=plan.bwd_warps,
    )
    # partial rows of one B (C) group are consecutive: lcm-group major, then programs
    dB = dBp.view(b, geo.gB, geo.rB * ppg, n, l).sum(2)
    dC = dCp.view(b, geo.gC, geo.rC * ppg, n, l).sum(2)
    return (du, ddelta, dA.sum(0), dB, dC, None if dD is None else dD.sum(0), dz,
            None if dbias is None else dbias.sum(0), K)


class _SelectiveScanFn(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias, h0) -> (out, final_state); the backward is the Triton kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, B4, C4, D, z, bias, h0, softplus, cdt, plan, geo):
        ctx.set_materialize_grads(False)
        out, final, states = _scan_forward(u, delta, A, B4, C4, D, z, bias, h0, softplus, cdt, plan, geo,
                                           store_states=True)
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, bias, states)
        ctx.meta = (softplus, cdt, plan, geo, None if h0 is None else h0.dtype)
        return out, final

    @staticmethod
    def backward(ctx, gout, gfinal):
        u, delta, A, B4, C4, D, z, bias, states = ctx.saved_tensors
        softplus, cdt, plan, geo, h0_dtype = ctx.meta
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _scan_backward(
            u, delta, A, B4, C4, D, z, bias, states, gout, gfinal, softplus, cdt, plan, geo)

        def cast(g, like):
            return None if g is None or like is None else g.to(like.dtype)

        return (du, ddelta, cast(dA, A), cast(dB, B4), cast(dC, C4), cast(dD, D), dz, cast(dbias, bias),
                None if h0_dtype is None else dh0.to(h0_dtype), None, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, return_final_state=False, *, block_l=None, block_d=None,
                          sub_blocks=None):
    """Fused Triton Mamba-1 selective scan (see the module docstring for the kernels).

    Returns out (b, d, l) in u.dtype (laid out position-major when u is), or (out, final_state (b, d, n)) with
    ``return_final_state``; the state is float32 (float64 for float64 inputs, computed in float64).
    Differentiable in every tensor argument. ``block_l`` / ``block_d`` / ``sub_blocks`` override the tiling
    (tests, tuning): positions per chunk, channels per block, channel blocks per program.
    """
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    require_triton_device("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state)
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if l == 0:
        return _empty_scan(u, initial_state, b, d, n, cdt, return_final_state)
    B4, C4 = _bcl(B), _bcl(C)
    geo = _Geometry(u, A, B4, C4)
    plan = _plan(b, n, geo.dG, geo.G, u.device, block_l, block_d, sub_blocks)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = records_grad(*tensors)
    if needs_grad:
        out, final = _SelectiveScanFn.apply(u, delta, A, B4, C4, D, z, delta_bias, initial_state,
                                            bool(delta_softplus), cdt, plan, geo)
    else:
        out, final, _ = _scan_forward(u, delta, A, B4, C4, D, z, delta_bias, initial_state, delta_softplus, cdt,
                                      plan, geo, store_states=False)
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
        state, x, dt, A, B3, C3, D if D is not None else dummy, z if z is not None else dummy,
        bias if bias is not None else dummy, y, new_state,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B3.stride(), *C3.stride(),
        D.stride(0) if D is not None else 0, *(z.stride() if z is not None else (0, 0)),
        bias.stride(0) if bias is not None else 0, *y.stride(),
        d, n, d // B3.shape[1], d // C3.shape[1],
        BLOCK_D=BLOCK_D, NP=NP, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
        SOFTPLUS=bool(softplus), CDT=_tl_dtype(cdt), num_warps=4,
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
            inputs = [None if t is None else t.detach().requires_grad_(needs)
                      for t, needs in zip(saved, ctx.needs_input_grad)]
            y, new_state = selective_state_update_chunked(*inputs[:6], D=inputs[6], z=inputs[7], dt_bias=inputs[8],
                                                        dt_softplus=ctx.softplus)
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
        return _StateUpdateFn.apply(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), cdt,
                                    B3.detach(), C3.detach())
    return _state_update_forward(state, x, dt, A, B3, C3, D, z, dt_bias, dt_softplus, cdt)
