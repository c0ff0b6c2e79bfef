"""The Mamba-1 selective scan's Triton kernels (device code): two forwards (the sequential walk, the default,
and the older chunk-tile scan, kept to time them side by side on a GPU), the backward and the decode step.

``triton_ops.py`` plans the tiles, launches them and wraps them in autograd; its docstring describes the
algorithm and the memory traffic.
"""

from __future__ import annotations

import triton
import triton.language as tl

# the combine tl.sum reduces floats with; the walk calls tl.reduce with it directly: the same code on a GPU, but
# the interpreter runs it as one numpy sum, where tl.sum is a device-function call costing milliseconds per use
from triton.language.standard import _sum_combine

#: softplus(x) = x above this (torch's and mamba_ssm's threshold)
SOFTPLUS_THRESHOLD = 20.0
# jit code may read module globals only as constexprs
LOG2E = tl.constexpr(1.4426950408889634)


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
def _packed_flags(seq_ptr, t, mask_t, l):
    """Packed rows: the sequence number of each position of the chunk (-1 past the end), and whether the
    position starts / ends its sequence (the numbers of its neighbours differ)."""
    sq = tl.load(seq_ptr + t, mask=mask_t, other=-1)
    sq_prev = tl.load(seq_ptr + t - 1, mask=mask_t & (t > 0), other=-1)
    sq_next = tl.load(seq_ptr + t + 1, mask=(t + 1) < l, other=-1)
    return sq.to(tl.int64), mask_t & (sq != sq_prev), mask_t & (sq != sq_next)


@triton.jit
def _ss_fwd_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    h_ptr,
    st_ptr,
    seq_ptr,
    h0p_ptr,
    fin_ptr,
    s_ub,
    s_ud,
    s_ul,
    s_db,
    s_dd,
    s_dl,
    s_Ad,
    s_An,
    s_Bb,
    s_Bg,
    s_Bn,
    s_Bl,
    s_Cb,
    s_Cg,
    s_Cn,
    s_Cl,
    s_D,
    s_zb,
    s_zd,
    s_zl,
    s_bias,
    s_ob,
    s_od,
    s_ol,
    d,
    n,
    l,
    dG,
    ppg,
    rB,
    rC,
    nchunks,
    BLOCK_D: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SUB: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    STORE_STATES: tl.constexpr,
    CDT: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
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
            if VARLEN:
                # packed rows: at a sequence start s the decay becomes 0 and the drive gains a_s h0_i
                sq, is_start, is_end = _packed_flags(seq_ptr, t, mask_t, l)
                st3 = is_start[None, None, :] & dn_mask[:, :, None]
                cell = ch[:, None, None] * n + offs_n[None, :, None]
                if HAS_H0:
                    h0v = tl.load(h0p_ptr + sq[None, None, :] * (d * n) + cell, mask=st3, other=0.0).to(CDT)
                    drive = drive + dA * h0v
                a_cum, h_loc = tl.associative_scan(
                    (tl.where(is_start[None, None, :], 0.0, dA), drive), 2, _recurrence_combine
                )
            else:
                a_cum, h_loc = tl.associative_scan((dA, drive), 2, _recurrence_combine)
            hh = h_loc + a_cum * h[:, :, None]
            if VARLEN:
                # each sequence's final state: the state after its last position
                tl.store(
                    fin_ptr + sq[None, None, :] * (d * n) + cell, hh, mask=is_end[None, None, :] & dn_mask[:, :, None]
                )
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
def _ss_fwd_walk_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    h_ptr,
    st_ptr,
    seq_ptr,
    h0p_ptr,
    fin_ptr,
    s_ub,
    s_ud,
    s_ul,
    s_db,
    s_dd,
    s_dl,
    s_Ad,
    s_An,
    s_Bb,
    s_Bg,
    s_Bn,
    s_Bl,
    s_Cb,
    s_Cg,
    s_Cn,
    s_Cl,
    s_D,
    s_zb,
    s_zd,
    s_zl,
    s_bias,
    s_ob,
    s_od,
    s_ol,
    d,
    n,
    l,
    dG,
    nblk,
    rB,
    rC,
    nwalks,
    BLOCK_D: tl.constexpr,
    NP: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    STORE_STATES: tl.constexpr,
    CDT: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
):
    """The forward as a sequential walk: one program owns BLOCK_D channels of one group and walks every position
    in order with its (BLOCK_D, NP) state in registers (``triton_ops`` module docstring: why, and the cost).

    The positions are unrolled CHUNK at a time (``tl.static_range``): the loads of a chunk do not depend on the
    state, so the compiler can issue them ahead of the recurrence. With STORE_STATES the state before every
    BLOCK_L-th position is written for the backward (the same (b, ceil(l / BLOCK_L), d, n) contract as the tile
    kernel; CHUNK is a multiple of BLOCK_L, so which positions store is decided at compile time)."""
    pid = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    gi = pid // nblk
    j = pid % nblk
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < n
    ch_loc = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch_loc < dG
    ch = gi * dG + ch_loc
    dn_mask = mask_d[:, None] & mask_n[None, :]
    dn_offs = ch[:, None] * n + offs_n[None, :]
    # exp(delta A) = 2^(delta A log2 e): scaling A once saves the multiply a GPU's exp does per element
    A2 = tl.load(A_ptr + ch[:, None] * s_Ad + offs_n[None, :] * s_An, mask=dn_mask, other=0.0).to(CDT) * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch * s_bias, mask=mask_d, other=0.0).to(CDT)
    if HAS_D:
        Dv = tl.load(D_ptr + ch * s_D, mask=mask_d, other=0.0).to(CDT)
    # pointers at the current position, advanced by one stride per position (no position x stride products)
    u_p = u_ptr + bi * s_ub + ch * s_ud
    dl_p = dl_ptr + bi * s_db + ch * s_dd
    z_p = z_ptr + bi * s_zb + ch * s_zd
    o_p = out_ptr + bi * s_ob + ch * s_od
    B_p = B_ptr + bi * s_Bb + (gi // rB) * s_Bg + offs_n * s_Bn
    C_p = C_ptr + bi * s_Cb + (gi // rC) * s_Cg + offs_n * s_Cn
    h_ptrs = h_ptr + bi * d * n + dn_offs
    # the next chunk state's cells, advanced by one (d, n) slab per store (pointer arithmetic is 64-bit; a chunk
    # index times d n could pass 2^31 on long rows)
    st_p = st_ptr + bi * ((l + BLOCK_L - 1) // BLOCK_L) * d * n + dn_offs
    h = tl.load(h_ptrs, mask=dn_mask, other=0.0).to(CDT)
    for c in range(nwalks):
        t0 = c * CHUNK
        for k in tl.static_range(CHUNK):
            t = t0 + k
            live = t < l
            if STORE_STATES:
                if k % BLOCK_L == 0:
                    tl.store(st_p, h, mask=dn_mask & live)
                    st_p += d * n
            m = mask_d & live
            m_n = mask_n & live
            x = tl.load(dl_p, mask=m, other=0.0).to(CDT)
            uu = tl.load(u_p, mask=m, other=0.0).to(CDT)
            Bt = tl.load(B_p, mask=m_n, other=0.0).to(CDT)
            Ct = tl.load(C_p, mask=m_n, other=0.0).to(CDT)
            if HAS_BIAS:
                x += bias
            if SOFTPLUS:
                # _softplus written inline (a device-function call costs milliseconds per position under the
                # interpreter; on a GPU it is inlined either way)
                e = tl.exp(tl.minimum(x, 20.0))
                v = 1.0 + e
                x = tl.where(x > 20.0, x, tl.log(v) - ((v - 1.0) - e) / v)
            dt = tl.where(m, x, 0.0)  # past the end: decay 1, drive 0 -> the state passes through unchanged
            dA = tl.exp2(dt[:, None] * A2)
            drive = (dt * uu)[:, None] * Bt[None, :]
            if VARLEN:
                # packed rows: a sequence start replaces the carried state by its initial state (or zeros), an
                # end stores the state as that sequence's final state
                sq = tl.load(seq_ptr + t, mask=live, other=-1)
                sq_prev = tl.load(seq_ptr + t - 1, mask=live & (t > 0), other=-1)
                sq_next = tl.load(seq_ptr + t + 1, mask=(t + 1) < l, other=-1)
                cell = sq.to(tl.int64) * (d * n) + dn_offs
                if HAS_H0:
                    h_start = tl.load(h0p_ptr + cell, mask=dn_mask & live & (sq != sq_prev), other=0.0).to(CDT)
                else:
                    h_start = tl.zeros([BLOCK_D, NP], CDT)
                h = tl.where(live & (sq != sq_prev), h_start, h)
                h = dA * h + drive
                tl.store(fin_ptr + cell, h, mask=dn_mask & live & (sq != sq_next))
            else:
                h = dA * h + drive
            y = tl.reduce(h * Ct[None, :], 1, _sum_combine)
            if HAS_D:
                y += Dv * uu
            if HAS_Z:
                zz = tl.load(z_p, mask=m, other=0.0).to(CDT)
                y *= zz / (1.0 + tl.exp(-zz))
            tl.store(o_p, y.to(out_ptr.dtype.element_ty), mask=m)
            dl_p += s_dl
            u_p += s_ul
            B_p += s_Bl
            C_p += s_Cl
            o_p += s_ol
            if HAS_Z:
                z_p += s_zl
    tl.store(h_ptrs, h, mask=dn_mask)


@triton.jit
def _ss_bwd_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    g_ptr,
    st_ptr,
    k_ptr,
    seq_ptr,
    h0p_ptr,
    gfp_ptr,
    dh0_ptr,
    du_ptr,
    ddl_ptr,
    dz_ptr,
    dBp_ptr,
    dCp_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    s_ub,
    s_ud,
    s_ul,
    s_db,
    s_dd,
    s_dl,
    s_Ad,
    s_An,
    s_Bb,
    s_Bg,
    s_Bn,
    s_Bl,
    s_Cb,
    s_Cg,
    s_Cn,
    s_Cl,
    s_D,
    s_zb,
    s_zd,
    s_zl,
    s_bias,
    s_gb,
    s_gd,
    s_gl,
    s_dub,
    s_dud,
    s_dul,
    s_ddb,
    s_ddd,
    s_ddl,
    s_dzb,
    s_dzd,
    s_dzl,
    d,
    n,
    l,
    dG,
    ppg,
    rB,
    rC,
    nchunks,
    nprog,
    BLOCK_D: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SUB: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    CDT: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_GF: tl.constexpr,
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
            if VARLEN:
                # packed rows, as in the forward: decays masked at the starts (dA_m), a_s h0_i injected
                sq, is_start, is_end = _packed_flags(seq_ptr, t, mask_t, l)
                st3 = is_start[None, None, :] & dn_mask[:, :, None]
                cell = ch[:, None, None] * n + offs_n[None, :, None]
                dA_m = tl.where(is_start[None, None, :], 0.0, dA)
                drive_in = drive
                if HAS_H0:
                    h0v = tl.load(h0p_ptr + sq[None, None, :] * (d * n) + cell, mask=st3, other=0.0).to(CDT)
                    drive_in = drive + dA * h0v
                a_cum, h_loc = tl.associative_scan((dA_m, drive_in), 2, _recurrence_combine)
            else:
                dA_m = dA
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
                tl.store(
                    dz_base + ch[:, None] * s_dzd + t[None, :] * s_dzl, gz.to(dz_ptr.dtype.element_ty), mask=dl_mask
                )
                gy = gy * zz * sz
            # adjoint mu_t = C_t gy_t + a_{t+1} mu_{t+1}, plus the adjoint K carried in from the next chunk
            c_in = Ct[None, :, :] * gy[:, None, :]
            if VARLEN:
                if HAS_GF:  # each sequence's final-state gradient enters at its last position
                    en3 = is_end[None, None, :] & dn_mask[:, :, None]
                    c_in += tl.load(gfp_ptr + sq[None, None, :] * (d * n) + cell, mask=en3, other=0.0).to(CDT)
            _, p_ex, s_loc = tl.associative_scan((dA_m, ones, c_in), 2, _adjoint_combine, reverse=True)
            mu = s_loc + p_ex * K[:, :, None]
            if VARLEN:
                # dL/dh0_i = mu_s a_s at the start s of sequence i (a_s unmasked)
                tl.store(dh0_ptr + sq[None, None, :] * (d * n) + cell, mu * dA, mask=st3)
            dC_acc += tl.sum(hh * gy[:, None, :], axis=0)
            dB_acc += tl.sum(mu * dtu[:, None, :], axis=0)
            g_dtu = tl.sum(mu * Bt[None, :, :], axis=1)
            X = mu * (hh - drive)  # mu_t a_t h_{t-1} (packed: mu_s a_s h0_i at a start)
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
            tl.store(du_base + ch[:, None] * s_dud + t[None, :] * s_dul, g_u.to(du_ptr.dtype.element_ty), mask=dl_mask)
            tl.store(
                ddl_base + ch[:, None] * s_ddd + t[None, :] * s_ddl, g_x.to(ddl_ptr.dtype.element_ty), mask=dl_mask
            )
            tl.store(dA_base + dn_offs, dA_old + dA_c, mask=dn_mask)
            # dL/d(state before the chunk) = a_0 mu_0
            K_new = tl.sum(tl.where(offs_l[None, None, :] == 0, dA_m * mu, 0.0), axis=2)
            tl.store(k_base + dn_offs, K_new, mask=dn_mask)
        tl.store(dBp_ptr + part_base + bc_offs, dB_acc, mask=bc_mask)
        tl.store(dCp_ptr + part_base + bc_offs, dC_acc, mask=bc_mask)
        tl.debug_barrier()


@triton.jit
def _ss_step_kernel(
    st_ptr,
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    y_ptr,
    new_ptr,
    s_sb,
    s_sd,
    s_sn,
    s_xb,
    s_xd,
    s_tb,
    s_td,
    s_Ad,
    s_An,
    s_Bb,
    s_Bg,
    s_Bn,
    s_Cb,
    s_Cg,
    s_Cn,
    s_D,
    s_zb,
    s_zd,
    s_bias,
    s_yb,
    s_yd,
    d,
    n,
    dgB,
    dgC,
    BLOCK_D: tl.constexpr,
    NP: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
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
    Bv = tl.load(B_ptr + bi * s_Bb + (ch // dgB)[:, None] * s_Bg + offs_n[None, :] * s_Bn, mask=mask, other=0.0).to(CDT)
    Cv = tl.load(C_ptr + bi * s_Cb + (ch // dgC)[:, None] * s_Cg + offs_n[None, :] * s_Cn, mask=mask, other=0.0).to(CDT)
    h = tl.exp(dt[:, None] * A) * h + (dt * xv)[:, None] * Bv
    tl.store(new_ptr + bi * d * n + ch[:, None] * n + offs_n[None, :], h, mask=mask)
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + ch * s_D, mask=mask_d, other=0.0).to(CDT) * xv
    if HAS_Z:
        zz = tl.load(z_ptr + bi * s_zb + ch * s_zd, mask=mask_d, other=0.0).to(CDT)
        y *= zz / (1.0 + tl.exp(-zz))
    tl.store(y_ptr + bi * s_yb + ch * s_yd, y.to(y_ptr.dtype.element_ty), mask=mask_d)
