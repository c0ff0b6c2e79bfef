"""The Mamba-3 scan's Triton kernels (device code): the forward walk (also the decode step), the backward's
forward re-walk, and the backward's reverse walk; SISO and MIMO (a rank axis of ``RP`` lanes).

``triton_ops.py`` launches them and wraps them in autograd; its docstring derives the backward. One program owns
one (sequence, head, block of ``BLOCK_P`` value channels) and walks the sequence's positions in order with its
(BLOCK_P, n) state in registers, kept as two (BLOCK_P, n / 2) halves: the first and the second element of every
rotary pair (interleaved pairs (2j, 2j + 1) for SISO, or (j, j + n / 2) with ``HALVES`` for MIMO), so the
rotation is elementwise. Keys and queries are (RP, n / 2) tiles (one row per MIMO rank), per-rank values and
outputs (RP, BLOCK_P).
"""

from __future__ import annotations

import triton
import triton.language as tl

# jit code may read module globals only as constexprs
PI = tl.constexpr(3.141592653589793)
TWO_PI = tl.constexpr(6.283185307179586)


# ----------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _pair_offsets(offs_j, N, HALVES: tl.constexpr):
    """Offsets and masks of the first / second element of pair j (an odd SISO n has a lone last element)."""
    if HALVES:
        half = N // 2
        return offs_j, offs_j + half, offs_j < half, offs_j < half
    else:
        return 2 * offs_j, 2 * offs_j + 1, 2 * offs_j < N, 2 * offs_j + 1 < N


@triton.jit
def _load_pairs(ptr, idx_e, idx_o, mask_e, mask_o, CDT: tl.constexpr):
    e = tl.load(ptr + idx_e, mask=mask_e, other=0.0).to(CDT)
    o = tl.load(ptr + idx_o, mask=mask_o, other=0.0).to(CDT)
    return e, o


# ----------------------------------------------------------------------------------------------- forward walk


@triton.jit
def _m3_fwd_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    trap_ptr,
    ang_ptr,
    Bb_ptr,
    Cb_ptr,
    D_ptr,
    z_ptr,
    mx_ptr,
    mz_ptr,
    mo_ptr,
    cu_ptr,
    # initial state (read when HAS_INIT)
    th0_ptr,
    h0_ptr,
    k0_ptr,
    v0_ptr,
    # forward outputs (MODE 0); out is (b, l, h, p) with mo, else (b, l, r, h, p); states contiguous
    out_ptr,
    thf_ptr,
    hf_ptr,
    kf_ptr,
    vf_ptr,
    # backward re-walk (MODE 1): inputs gout (contiguous, out's layout), gfinal_ssm; outputs dz, dq partials,
    # gy.y partials, angles, <gH, H>, the mimo_o / mimo_z gradients per sequence
    gout_ptr,
    gh_ptr,
    dz_ptr,
    dC_ptr,
    dthq_ptr,
    dCb_ptr,
    gyy_ptr,
    thbuf_ptr,
    r0_ptr,
    dmo_ptr,
    dmz_ptr,
    # strides
    sx_b,
    sx_l,
    sx_h,
    sx_p,
    sdt_b,
    sdt_l,
    sdt_h,
    sA_b,
    sA_l,
    sA_h,
    sB_b,
    sB_l,
    sB_r,
    sB_g,
    sB_n,
    sC_b,
    sC_l,
    sC_r,
    sC_g,
    sC_n,
    str_b,
    str_l,
    str_h,
    sang_b,
    sang_l,
    sang_a,
    sBb_h,
    sBb_r,
    sBb_n,
    sCb_h,
    sCb_r,
    sCb_n,
    sD_h,
    sz_b,
    sz_l,
    sz_h,
    sz_p,
    sth0_s,
    sth0_h,
    sth0_a,
    sh0_s,
    sh0_h,
    sh0_p,
    sh0_n,
    sk0_s,
    sk0_r,
    sk0_h,
    sk0_n,
    sv0_s,
    sv0_h,
    sv0_p,
    # sizes
    L,
    H,
    P,
    N,
    NANG,
    HPG,
    NPB,
    R,
    RP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NH: tl.constexpr,
    HALVES: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_MX: tl.constexpr,
    HAS_MZ: tl.constexpr,
    HAS_MO: tl.constexpr,
    MODE: tl.constexpr,
    CDT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_pb = tl.program_id(2)
    seq = pid_s.to(tl.int64)
    zero64 = seq * 0
    if PACKED:
        row64 = seq * 0
        start = tl.load(cu_ptr + pid_s).to(tl.int32)
        end = tl.load(cu_ptr + pid_s + 1).to(tl.int32)
    else:
        row64 = seq
        start = 0
        end = L
    g = pid_h // HPG
    offs_p = pid_pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_j = tl.arange(0, NH)
    mask_a = offs_j < NANG
    idx_e, idx_o, mask_e, mask_o = _pair_offsets(offs_j, N, HALVES)
    mask_pe = mask_p[:, None] & mask_e[None, :]
    mask_po = mask_p[:, None] & mask_o[None, :]
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    mask_re = mask_r[:, None] & mask_e[None, :]
    mask_ro = mask_r[:, None] & mask_o[None, :]
    mask_rp = mask_r[:, None] & mask_p[None, :]
    w_off = (pid_h * R + offs_r)[:, None] * P + offs_p[None, :]  # (h, r, p) weights, contiguous

    x_base = x_ptr + row64 * sx_b + pid_h * sx_h
    dt_base = dt_ptr + row64 * sdt_b + pid_h * sdt_h
    A_base = A_ptr + row64 * sA_b + pid_h * sA_h
    tr_base = trap_ptr + row64 * str_b + pid_h * str_h
    ang_base = ang_ptr + row64 * sang_b

    Bb_r = Bb_ptr + pid_h * sBb_h + offs_r[:, None] * sBb_r
    Cb_r = Cb_ptr + pid_h * sCb_h + offs_r[:, None] * sCb_r
    bb_e, bb_o = _load_pairs(Bb_r, idx_e[None, :] * sBb_n, idx_o[None, :] * sBb_n, mask_re, mask_ro, CDT)
    cb_e, cb_o = _load_pairs(Cb_r, idx_e[None, :] * sCb_n, idx_o[None, :] * sCb_n, mask_re, mask_ro, CDT)
    if HAS_D:
        Dh = tl.load(D_ptr + pid_h * sD_h).to(CDT)
    if HAS_MX:
        mx = tl.load(mx_ptr + w_off, mask=mask_rp, other=0.0).to(CDT)
    else:
        mx = tl.where(mask_rp, 1.0, 0.0).to(CDT)
    if HAS_MZ:
        mz = tl.load(mz_ptr + w_off, mask=mask_rp, other=0.0).to(CDT)
    if HAS_MO:
        mo = tl.load(mo_ptr + w_off, mask=mask_rp, other=0.0).to(CDT)

    if HAS_INIT:
        theta = tl.load(th0_ptr + seq * sth0_s + pid_h * sth0_h + offs_j * sth0_a, mask=mask_a, other=0.0).to(CDT)
        h0_base = h0_ptr + seq * sh0_s + pid_h * sh0_h + offs_p[:, None] * sh0_p
        he = tl.load(h0_base + idx_e[None, :] * sh0_n, mask=mask_pe, other=0.0).to(CDT)
        ho = tl.load(h0_base + idx_o[None, :] * sh0_n, mask=mask_po, other=0.0).to(CDT)
        k0_r = k0_ptr + seq * sk0_s + pid_h * sk0_h + offs_r[:, None] * sk0_r
        kp_e, kp_o = _load_pairs(k0_r, idx_e[None, :] * sk0_n, idx_o[None, :] * sk0_n, mask_re, mask_ro, CDT)
        xp = tl.load(v0_ptr + seq * sv0_s + pid_h * sv0_h + offs_p * sv0_p, mask=mask_p, other=0.0).to(CDT)
    else:
        theta = tl.zeros([NH], CDT)
        he = tl.zeros([BLOCK_P, NH], CDT)
        ho = tl.zeros([BLOCK_P, NH], CDT)
        kp_e = tl.zeros([RP, NH], CDT)
        kp_o = tl.zeros([RP, NH], CDT)
        xp = tl.zeros([BLOCK_P], CDT)
    if MODE == 1:
        dmo_acc = tl.zeros([RP, BLOCK_P], CDT)
        dmz_acc = tl.zeros([RP, BLOCK_P], CDT)
        dcb_e = tl.zeros([RP, NH], CDT)
        dcb_o = tl.zeros([RP, NH], CDT)
        # dB / dC rows (b, l, r, g, n): heads of a group and channel blocks add into the same row
        bc_off = (row64 * L * R + offs_r[:, None]) * (H // HPG) * N + g * N  # + t R G N

    # per-position pointers (the loop adds t times the length stride); the loop bodies inline their helpers: the
    # interpreter re-patches triton.language on every device-function call
    B_pe = B_ptr + row64 * sB_b + g * sB_g + offs_r[:, None] * sB_r + idx_e[None, :] * sB_n
    B_po = B_ptr + row64 * sB_b + g * sB_g + offs_r[:, None] * sB_r + idx_o[None, :] * sB_n
    C_pe = C_ptr + row64 * sC_b + g * sC_g + offs_r[:, None] * sC_r + idx_e[None, :] * sC_n
    C_po = C_ptr + row64 * sC_b + g * sC_g + offs_r[:, None] * sC_r + idx_o[None, :] * sC_n
    x_pp = x_base + offs_p * sx_p
    ang_pa = ang_base + offs_j * sang_a
    z_pp = z_ptr + row64 * sz_b + pid_h * sz_h + offs_p * sz_p
    for t in range(start, end):
        t64 = zero64 + t  # (the interpreter runs the loop on Python ints)
        dt = tl.load(dt_base + t64 * sdt_l).to(CDT)
        a_t = tl.load(A_base + t64 * sA_l).to(CDT)
        sg = 1.0 / (1.0 + tl.exp(-tl.load(tr_base + t64 * str_l).to(CDT)))
        raw = tl.load(ang_pa + t64 * sang_l, mask=mask_a, other=0.0).to(CDT)
        ex = tl.exp(-2.0 * tl.abs(raw))
        th = (1.0 - ex) / (1.0 + ex)
        theta = theta + tl.where(raw < 0, -th, th) * (PI * dt)
        theta = theta - TWO_PI * tl.floor(theta / TWO_PI)
        cs = tl.cos(theta)[None, :]
        sn = tl.sin(theta)[None, :]
        kb_e = tl.load(B_pe + t64 * sB_l, mask=mask_re, other=0.0).to(CDT) + bb_e
        kb_o = tl.load(B_po + t64 * sB_l, mask=mask_ro, other=0.0).to(CDT) + bb_o
        qb_e = tl.load(C_pe + t64 * sC_l, mask=mask_re, other=0.0).to(CDT) + cb_e
        qb_o = tl.load(C_po + t64 * sC_l, mask=mask_ro, other=0.0).to(CDT) + cb_o
        k_e = kb_e * cs - kb_o * sn
        k_o = kb_e * sn + kb_o * cs
        q_e = qb_e * cs - qb_o * sn
        q_o = qb_e * sn + qb_o * cs
        xv = tl.load(x_pp + t64 * sx_l, mask=mask_p, other=0.0).to(CDT)
        alpha = tl.exp(a_t * dt)
        # per-rank values (RP, BLOCK_P), already scaled by beta / gamma
        bv = (((1.0 - sg) * dt * alpha) * xp)[None, :] * mx
        gv = ((sg * dt) * xv)[None, :] * mx
        he = alpha * he + tl.sum(bv[:, :, None] * kp_e[:, None, :] + gv[:, :, None] * k_e[:, None, :], axis=0)
        ho = alpha * ho + tl.sum(bv[:, :, None] * kp_o[:, None, :] + gv[:, :, None] * k_o[:, None, :], axis=0)
        yt = tl.sum(he[None, :, :] * q_e[:, None, :] + ho[None, :, :] * q_o[:, None, :], axis=2)  # (RP, BLOCK_P)
        y = yt
        if HAS_D:
            y = y + Dh * (xv[None, :] * mx)
        if HAS_Z:
            zv = tl.load(z_pp + t64 * sz_l, mask=mask_p, other=0.0).to(CDT)[None, :]
            if HAS_MZ:
                zr = zv * mz
            else:
                zr = zv
            sz = 1.0 / (1.0 + tl.exp(-zr))
            o = y * zr * sz
        else:
            o = y
        if HAS_MO:
            o_off = ((row64 * L + t64) * H + pid_h) * P + offs_p
        else:
            o_off = (((row64 * L + t64) * R + offs_r[:, None]) * H + pid_h) * P + offs_p[None, :]
        if MODE == 0:
            if HAS_MO:
                tl.store(out_ptr + o_off, tl.sum(o * mo, axis=0).to(out_ptr.dtype.element_ty), mask=mask_p)
            else:
                tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=mask_rp)
        else:
            if HAS_MO:
                go = tl.load(gout_ptr + o_off, mask=mask_p, other=0.0).to(CDT)[None, :]
                dmo_acc += go * o
                gor = go * mo
            else:
                gor = tl.load(gout_ptr + o_off, mask=mask_rp, other=0.0).to(CDT)
            if HAS_Z:
                gy = gor * zr * sz
                dzr = gor * y * sz * (1.0 + zr * (1.0 - sz))
                if HAS_MZ:
                    dmz_acc += dzr * zv
                    dz = tl.sum(dzr * mz, axis=0)
                else:
                    dz = tl.sum(dzr, axis=0)
                z_off = ((row64 * L + t64) * H + pid_h) * P + offs_p
                tl.store(dz_ptr + z_off, dz.to(dz_ptr.dtype.element_ty), mask=mask_p)
            else:
                gy = gor
            pos_h = (row64 * L + t64) * H + pid_h
            pos = pos_h * NPB + pid_pb
            # the rotated queries' gradient dq = H' gy (this block's part): back through the rotation into dC and
            # the C bias, and its share of the angle's gradient
            dq_e = tl.sum(he[None, :, :] * gy[:, :, None], axis=1)
            dq_o = tl.sum(ho[None, :, :] * gy[:, :, None], axis=1)
            dqb_e = dq_e * cs + dq_o * sn
            dqb_o = dq_o * cs - dq_e * sn
            dcb_e += dqb_e
            dcb_o += dqb_o
            c_off = bc_off + t64 * (R * (H // HPG) * N)
            tl.atomic_add(dC_ptr + c_off + idx_e[None, :], dqb_e, mask=mask_re)
            tl.atomic_add(dC_ptr + c_off + idx_o[None, :], dqb_o, mask=mask_ro)
            tl.atomic_add(dthq_ptr + pos_h * NANG + offs_j, tl.sum(dq_o * q_e - dq_e * q_o, axis=0), mask=mask_a)
            tl.store(gyy_ptr + pos, tl.sum(tl.sum(gy * yt, axis=1), axis=0))
            if pid_pb == 0:
                tl.store(thbuf_ptr + pos_h * NANG + offs_j, theta, mask=mask_a)
        kp_e = k_e
        kp_o = k_o
        xp = xv

    st_hp = (seq * H + pid_h) * P + offs_p
    if MODE == 0:
        tl.store(hf_ptr + st_hp[:, None] * N + idx_e[None, :], he, mask=mask_pe)
        tl.store(hf_ptr + st_hp[:, None] * N + idx_o[None, :], ho, mask=mask_po)
        tl.store(vf_ptr + st_hp, xp, mask=mask_p)
        if pid_pb == 0:
            tl.store(thf_ptr + (seq * H + pid_h) * NANG + offs_j, theta, mask=mask_a)
            k_off = ((seq * R + offs_r[:, None]) * H + pid_h) * N  # (rows, r, h, n)
            tl.store(kf_ptr + k_off + idx_e[None, :], kp_e, mask=mask_re)
            tl.store(kf_ptr + k_off + idx_o[None, :], kp_o, mask=mask_ro)
    else:
        # <dL/dH_final, H_final> over this block: where the reverse walk's decay-adjoint recurrence starts
        gh_e = tl.load(gh_ptr + st_hp[:, None] * N + idx_e[None, :], mask=mask_pe, other=0.0).to(CDT)
        gh_o = tl.load(gh_ptr + st_hp[:, None] * N + idx_o[None, :], mask=mask_po, other=0.0).to(CDT)
        r0 = tl.sum(tl.sum(gh_e * he + gh_o * ho, axis=1), axis=0)
        tl.store(r0_ptr + (seq * H + pid_h) * NPB + pid_pb, r0)
        sw_off = ((seq * H + pid_h) * R + offs_r[:, None]) * P + offs_p[None, :]  # (rows, h, r, p)
        if HAS_MO:
            tl.store(dmo_ptr + sw_off, dmo_acc, mask=mask_rp)
        if HAS_MZ:
            tl.store(dmz_ptr + sw_off, dmz_acc, mask=mask_rp)
        b_off = (((seq * H + pid_h) * NPB + pid_pb) * R + offs_r[:, None]) * N  # (rows, h, blocks, r, n)
        tl.store(dCb_ptr + b_off + idx_e[None, :], dcb_e, mask=mask_re)
        tl.store(dCb_ptr + b_off + idx_o[None, :], dcb_o, mask=mask_ro)


# ----------------------------------------------------------------------------------------------- reverse walk


@triton.jit
def _m3_bwd_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    trap_ptr,
    ang_ptr,
    Bb_ptr,
    Cb_ptr,
    D_ptr,
    z_ptr,
    mx_ptr,
    mz_ptr,
    mo_ptr,
    cu_ptr,
    k0_ptr,
    v0_ptr,
    gout_ptr,
    # gradients of the final state (contiguous; zeros when absent)
    gth_ptr,
    gh_ptr,
    gk_ptr,
    gv_ptr,
    # from the re-walk
    dthq_ptr,
    gyy_ptr,
    thbuf_ptr,
    r0_ptr,
    # outputs
    dx_ptr,
    dB_ptr,
    dBb_ptr,
    dang_ptr,
    dscal_ptr,
    dDp_ptr,
    dmx_ptr,
    dth0_ptr,
    dh0_ptr,
    dk0_ptr,
    dv0_ptr,
    # strides
    sx_b,
    sx_l,
    sx_h,
    sx_p,
    sdt_b,
    sdt_l,
    sdt_h,
    sA_b,
    sA_l,
    sA_h,
    sB_b,
    sB_l,
    sB_r,
    sB_g,
    sB_n,
    sC_b,
    sC_l,
    sC_r,
    sC_g,
    sC_n,
    str_b,
    str_l,
    str_h,
    sang_b,
    sang_l,
    sang_a,
    sBb_h,
    sBb_r,
    sBb_n,
    sCb_h,
    sCb_r,
    sCb_n,
    sD_h,
    sz_b,
    sz_l,
    sz_h,
    sz_p,
    sk0_s,
    sk0_r,
    sk0_h,
    sk0_n,
    sv0_s,
    sv0_h,
    sv0_p,
    # sizes
    L,
    H,
    P,
    N,
    NANG,
    HPG,
    NPB,
    R,
    RP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NH: tl.constexpr,
    HALVES: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_MX: tl.constexpr,
    HAS_MZ: tl.constexpr,
    HAS_MO: tl.constexpr,
    CDT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_pb = tl.program_id(2)
    seq = pid_s.to(tl.int64)
    zero64 = seq * 0
    if PACKED:
        row64 = seq * 0
        start = tl.load(cu_ptr + pid_s).to(tl.int32)
        end = tl.load(cu_ptr + pid_s + 1).to(tl.int32)
    else:
        row64 = seq
        start = 0
        end = L
    g = pid_h // HPG
    offs_p = pid_pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_j = tl.arange(0, NH)
    mask_a = offs_j < NANG
    idx_e, idx_o, mask_e, mask_o = _pair_offsets(offs_j, N, HALVES)
    mask_pe = mask_p[:, None] & mask_e[None, :]
    mask_po = mask_p[:, None] & mask_o[None, :]
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    mask_re = mask_r[:, None] & mask_e[None, :]
    mask_ro = mask_r[:, None] & mask_o[None, :]
    mask_rp = mask_r[:, None] & mask_p[None, :]
    w_off = (pid_h * R + offs_r)[:, None] * P + offs_p[None, :]
    first_block = pid_pb == 0

    x_base = x_ptr + row64 * sx_b + pid_h * sx_h
    dt_base = dt_ptr + row64 * sdt_b + pid_h * sdt_h
    A_base = A_ptr + row64 * sA_b + pid_h * sA_h
    tr_base = trap_ptr + row64 * str_b + pid_h * str_h
    ang_base = ang_ptr + row64 * sang_b

    Bb_r = Bb_ptr + pid_h * sBb_h + offs_r[:, None] * sBb_r
    Cb_r = Cb_ptr + pid_h * sCb_h + offs_r[:, None] * sCb_r
    bb_e, bb_o = _load_pairs(Bb_r, idx_e[None, :] * sBb_n, idx_o[None, :] * sBb_n, mask_re, mask_ro, CDT)
    cb_e, cb_o = _load_pairs(Cb_r, idx_e[None, :] * sCb_n, idx_o[None, :] * sCb_n, mask_re, mask_ro, CDT)
    if HAS_D:
        Dh = tl.load(D_ptr + pid_h * sD_h).to(CDT)
    if HAS_MX:
        mx = tl.load(mx_ptr + w_off, mask=mask_rp, other=0.0).to(CDT)
    else:
        mx = tl.where(mask_rp, 1.0, 0.0).to(CDT)
    if HAS_MZ:
        mz = tl.load(mz_ptr + w_off, mask=mask_rp, other=0.0).to(CDT)
    if HAS_MO:
        mo = tl.load(mo_ptr + w_off, mask=mask_rp, other=0.0).to(CDT)
    if HAS_INIT:
        k0_r = k0_ptr + seq * sk0_s + pid_h * sk0_h + offs_r[:, None] * sk0_r
        k0_e, k0_o = _load_pairs(k0_r, idx_e[None, :] * sk0_n, idx_o[None, :] * sk0_n, mask_re, mask_ro, CDT)
        x0 = tl.load(v0_ptr + seq * sv0_s + pid_h * sv0_h + offs_p * sv0_p, mask=mask_p, other=0.0).to(CDT)
    else:
        k0_e = tl.zeros([RP, NH], CDT)
        k0_o = tl.zeros([RP, NH], CDT)
        x0 = tl.zeros([BLOCK_P], CDT)

    # carried from position t + 1 to t: G = dL/dH_t without y_t's term (alpha_{t+1} dL/dH_{t+1}; the final state's
    # gradient at the end), R = <G, H_t> (this block's part), the angle adjoint, beta~_{t+1} = (1 - s) dt (0 at
    # the end)
    st_hp = (seq * H + pid_h) * P + offs_p
    G_e = tl.load(gh_ptr + st_hp[:, None] * N + idx_e[None, :], mask=mask_pe, other=0.0).to(CDT)
    G_o = tl.load(gh_ptr + st_hp[:, None] * N + idx_o[None, :], mask=mask_po, other=0.0).to(CDT)
    Rs = tl.load(r0_ptr + (seq * H + pid_h) * NPB + pid_pb).to(CDT)
    Gth = tl.load(gth_ptr + (seq * H + pid_h) * NANG + offs_j, mask=mask_a & first_block, other=0.0).to(CDT)
    gk_off = ((seq * R + offs_r[:, None]) * H + pid_h) * N  # (rows, r, h, n), contiguous
    gk_e, gk_o = _load_pairs(
        gk_ptr + gk_off, idx_e[None, :], idx_o[None, :], mask_re & first_block, mask_ro & first_block, CDT
    )
    gv = tl.load(gv_ptr + st_hp, mask=mask_p, other=0.0).to(CDT)
    nbt = tl.zeros((), CDT)
    dD_acc = tl.zeros((), CDT)
    dmx_acc = tl.zeros([RP, BLOCK_P], CDT)
    dbb_e = tl.zeros([RP, NH], CDT)
    dbb_o = tl.zeros([RP, NH], CDT)
    bc_off = (row64 * L * R + offs_r[:, None]) * (H // HPG) * N + g * N  # + t R G N, as the re-walk's dC

    # per-position pointers; the loop bodies inline their helpers (see the forward)
    B_pe = B_ptr + row64 * sB_b + g * sB_g + offs_r[:, None] * sB_r + idx_e[None, :] * sB_n
    B_po = B_ptr + row64 * sB_b + g * sB_g + offs_r[:, None] * sB_r + idx_o[None, :] * sB_n
    C_pe = C_ptr + row64 * sC_b + g * sC_g + offs_r[:, None] * sC_r + idx_e[None, :] * sC_n
    C_po = C_ptr + row64 * sC_b + g * sC_g + offs_r[:, None] * sC_r + idx_o[None, :] * sC_n
    x_pp = x_base + offs_p * sx_p
    ang_pa = ang_base + offs_j * sang_a
    z_pp = z_ptr + row64 * sz_b + pid_h * sz_h + offs_p * sz_p
    th_pa = thbuf_ptr + (row64 * L * H + pid_h) * NANG + offs_j  # + t H NANG
    # the last position's rotated keys and value; later positions' are the previous step's "previous" ones
    t64 = zero64 + end - 1
    theta = tl.load(th_pa + t64 * (H * NANG), mask=mask_a, other=0.0).to(CDT)
    cs = tl.cos(theta)[None, :]
    sn = tl.sin(theta)[None, :]
    kb_e = tl.load(B_pe + t64 * sB_l, mask=mask_re, other=0.0).to(CDT) + bb_e
    kb_o = tl.load(B_po + t64 * sB_l, mask=mask_ro, other=0.0).to(CDT) + bb_o
    k_e = kb_e * cs - kb_o * sn
    k_o = kb_e * sn + kb_o * cs
    xv = tl.load(x_pp + t64 * sx_l, mask=mask_p, other=0.0).to(CDT)

    for i in range(0, end - start):
        t64 = zero64 + (end - 1 - i)  # (the interpreter runs the loop on Python ints)
        last = (zero64 + i == 0).to(CDT)
        has_prev = t64 > start
        dt = tl.load(dt_base + t64 * sdt_l).to(CDT)
        a_t = tl.load(A_base + t64 * sA_l).to(CDT)
        sg = 1.0 / (1.0 + tl.exp(-tl.load(tr_base + t64 * str_l).to(CDT)))
        alpha = tl.exp(a_t * dt)
        gamma = sg * dt
        pos_h = (row64 * L + t64) * H + pid_h
        qb_e = tl.load(C_pe + t64 * sC_l, mask=mask_re, other=0.0).to(CDT) + cb_e
        qb_o = tl.load(C_po + t64 * sC_l, mask=mask_ro, other=0.0).to(CDT) + cb_o
        q_e = qb_e * cs - qb_o * sn
        q_o = qb_e * sn + qb_o * cs
        # the previous position's rotated keys and value (the initial state's at the sequence start)
        tp64 = t64 - 1
        theta_p = tl.load(th_pa + tp64 * (H * NANG), mask=mask_a & has_prev, other=0.0).to(CDT)
        cs_p = tl.cos(theta_p)[None, :]
        sn_p = tl.sin(theta_p)[None, :]
        pb_e = tl.load(B_pe + tp64 * sB_l, mask=mask_re & has_prev, other=0.0).to(CDT) + bb_e
        pb_o = tl.load(B_po + tp64 * sB_l, mask=mask_ro & has_prev, other=0.0).to(CDT) + bb_o
        kp_e = tl.where(has_prev, pb_e * cs_p - pb_o * sn_p, k0_e)
        kp_o = tl.where(has_prev, pb_e * sn_p + pb_o * cs_p, k0_o)
        xp = tl.where(has_prev, tl.load(x_pp + tp64 * sx_l, mask=mask_p & has_prev, other=0.0).to(CDT), x0)
        vr = xv[None, :] * mx  # (RP, BLOCK_P)
        vpr = xp[None, :] * mx

        # dL/dy per rank before the gate
        if HAS_MO:
            go = tl.load(gout_ptr + pos_h * P + offs_p, mask=mask_p, other=0.0).to(CDT)[None, :] * mo
        else:
            go_off = (((row64 * L + t64) * R + offs_r[:, None]) * H + pid_h) * P + offs_p[None, :]
            go = tl.load(gout_ptr + go_off, mask=mask_rp, other=0.0).to(CDT)
        if HAS_Z:
            zr = tl.load(z_pp + t64 * sz_l, mask=mask_p, other=0.0).to(CDT)[None, :]
            if HAS_MZ:
                zr = zr * mz
            gy = go * zr / (1.0 + tl.exp(-zr))
        else:
            gy = go

        # dL/dH_t, and the matrix whose products with v_t / k_t give k_t's / v_t's gradients (through gamma_t and
        # through beta_{t+1} at the next position)
        dH_e = G_e + tl.sum(gy[:, :, None] * q_e[:, None, :], axis=0)
        dH_o = G_o + tl.sum(gy[:, :, None] * q_o[:, None, :], axis=0)
        M_e = gamma * dH_e + nbt * G_e
        M_o = gamma * dH_o + nbt * G_o
        dk_e = tl.sum(M_e[None, :, :] * vr[:, :, None], axis=1) + last * gk_e  # (RP, NH)
        dk_o = tl.sum(M_o[None, :, :] * vr[:, :, None], axis=1) + last * gk_o
        dvr = tl.sum(M_e[None, :, :] * k_e[:, None, :] + M_o[None, :, :] * k_o[:, None, :], axis=2)  # (RP, BLOCK_P)
        if HAS_D:
            dvr = dvr + Dh * gy
        dmx_acc += dvr * xv[None, :]
        dD_acc += tl.sum(tl.sum(gy * vr, axis=1), axis=0)
        dx = tl.sum(dvr * mx, axis=0) + last * gv
        tl.store(dx_ptr + pos_h * P + offs_p, dx.to(dx_ptr.dtype.element_ty), mask=mask_p)

        # the scalars: f = sum_r v_r' dH_t k_r, E = alpha_t sum_r v'_r' dH_t k'_r (previous position), and the
        # decay's adjoint da_t = <dH_t, alpha_t (H_{t-1} + beta~_t sum_r k'_r v'_r')> = S_t - gamma_t f_t, where
        # S_t = <dH_t, H_t> = R + gy_t . y~_t
        f = tl.sum(tl.sum(vr * tl.sum(dH_e[None, :, :] * k_e[:, None, :] + dH_o[None, :, :] * k_o[:, None, :], 2), 1))
        E = tl.sum(
            tl.sum(vpr * tl.sum(dH_e[None, :, :] * kp_e[:, None, :] + dH_o[None, :, :] * kp_o[:, None, :], 2), 1)
        )
        E = alpha * E
        pos = pos_h * NPB + pid_pb
        gyy = tl.load(gyy_ptr + pos).to(CDT)
        # (beta = beta~ alpha: alpha's share through beta is inside da, E is dL/dbeta~)
        da = Rs + gyy - gamma * f
        btil = (1.0 - sg) * dt
        ddt = a_t * da + (1.0 - sg) * E + sg * f
        dA = dt * da
        dtrap = dt * (f - E) * sg * (1.0 - sg)

        # rotary: back to the unrotated keys (into dB, summed over the group's heads and the channel blocks) and
        # the angle's adjoint (the queries' share, summed over blocks by the re-walk, is added by block 0)
        dkb_e = dk_e * cs + dk_o * sn
        dkb_o = dk_o * cs - dk_e * sn
        dbb_e += dkb_e
        dbb_o += dkb_o
        b_off = bc_off + t64 * (R * (H // HPG) * N)
        tl.atomic_add(dB_ptr + b_off + idx_e[None, :], dkb_e, mask=mask_re)
        tl.atomic_add(dB_ptr + b_off + idx_o[None, :], dkb_o, mask=mask_ro)
        dthq = tl.load(dthq_ptr + pos_h * NANG + offs_j, mask=mask_a & first_block, other=0.0).to(CDT)
        dth = tl.sum(dk_o * k_e - dk_e * k_o, axis=0) + dthq
        Gth = Gth + tl.where(mask_a, dth, 0.0)
        raw = tl.load(ang_pa + t64 * sang_l, mask=mask_a, other=0.0).to(CDT)
        ex = tl.exp(-2.0 * tl.abs(raw))
        th = (1.0 - ex) / (1.0 + ex)
        th = tl.where(raw < 0, -th, th)
        ang_off = (row64 * L + t64) * NANG + offs_j  # dangles (b, l, a): summed over heads and blocks
        tl.atomic_add(dang_ptr + ang_off, Gth * (PI * dt) * (1.0 - th * th), mask=mask_a)
        ddt += PI * tl.sum(Gth * th, axis=0)
        tl.store(dscal_ptr + pos * 3, ddt)
        tl.store(dscal_ptr + pos * 3 + 1, dA)
        tl.store(dscal_ptr + pos * 3 + 2, dtrap)

        # R_{t-1} = <alpha_t dH_t, H_{t-1}> = <dH_t, H_t - gamma_t k_t v_t' - alpha_t beta~_t k_{t-1} v_{t-1}'>
        G_e = alpha * dH_e
        G_o = alpha * dH_o
        Rs = da - btil * E
        nbt = btil
        k_e = kp_e
        k_o = kp_o
        xv = xp
        cs = cs_p
        sn = sn_p

    # the initial state's gradients: dH_init = G, and k_init / v_init entered through beta~ at the first position
    tl.store(dh0_ptr + st_hp[:, None] * N + idx_e[None, :], G_e, mask=mask_pe)
    tl.store(dh0_ptr + st_hp[:, None] * N + idx_o[None, :], G_o, mask=mask_po)
    v0r = x0[None, :] * mx
    Gk0 = nbt * tl.sum(G_e[None, :, :] * k0_e[:, None, :] + G_o[None, :, :] * k0_o[:, None, :], axis=2)  # (RP, BP)
    tl.store(dv0_ptr + st_hp, tl.sum(Gk0 * mx, axis=0), mask=mask_p)
    dmx_acc += Gk0 * x0[None, :]
    spb = (seq * H + pid_h) * NPB + pid_pb
    k_off = (spb * R + offs_r[:, None]) * N  # (rows, h, blocks, r, n)
    tl.store(dk0_ptr + k_off + idx_e[None, :], nbt * tl.sum(G_e[None, :, :] * v0r[:, :, None], axis=1), mask=mask_re)
    tl.store(dk0_ptr + k_off + idx_o[None, :], nbt * tl.sum(G_o[None, :, :] * v0r[:, :, None], axis=1), mask=mask_ro)
    tl.store(dth0_ptr + spb * NANG + offs_j, Gth, mask=mask_a)
    tl.store(dBb_ptr + k_off + idx_e[None, :], dbb_e, mask=mask_re)
    tl.store(dBb_ptr + k_off + idx_o[None, :], dbb_o, mask=mask_ro)
    tl.store(dDp_ptr + spb, dD_acc)
    if HAS_MX:
        sw_off = ((seq * H + pid_h) * R + offs_r[:, None]) * P + offs_p[None, :]  # (rows, h, r, p)
        tl.store(dmx_ptr + sw_off, dmx_acc, mask=mask_rp)
