"""The causal depthwise conv1d's Triton kernels (device code): forward, backward and the decode step.

``triton_ops.py`` picks the tiles, launches them and wraps them in autograd; its docstring describes them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _load_full(
    x_ptr,
    init_ptr,
    x_base,
    i_base,
    d_idx,
    d_mask,
    pos,
    lo,
    l,
    s_xd,
    s_xl,
    s_id,
    s_il,
    W: tl.constexpr,
    HAS_INIT: tl.constexpr,
    ACC: tl.constexpr,
):
    """[initial_state, x] at x-time ``pos`` of a sequence starting at ``lo`` (0, or per column for packed rows):
    positions before ``lo`` read the state (row ``i_base``), 0 outside, in ACC."""
    in_x = (pos >= lo) & (pos < l) & d_mask
    v = tl.load(x_ptr + x_base + d_idx * s_xd + pos * s_xl, mask=in_x, other=0.0).to(ACC)
    if HAS_INIT:
        in_s = (pos < lo) & (pos >= lo + 1 - W) & d_mask
        v += tl.load(init_ptr + i_base + d_idx * s_id + (pos - lo + (W - 1)) * s_il, mask=in_s, other=0.0).to(ACC)
    return v


@triton.jit
def _pre_act(
    x_ptr,
    init_ptr,
    w_ptr,
    b_ptr,
    x_base,
    i_base,
    d_idx,
    d_mask,
    pos,
    lo,
    l,
    s_xd,
    s_xl,
    s_id,
    s_il,
    s_wd,
    s_wk,
    s_b,
    W: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
):
    """bias + sum_k weight[:, k] * full[pos - (W-1) + k]: the pre-activation at ``pos``."""
    w0 = tl.load(w_ptr + d_idx * s_wd, mask=d_mask, other=0.0).to(ACC)
    acc = w0 * _load_full(
        x_ptr, init_ptr, x_base, i_base, d_idx, d_mask, pos - (W - 1), lo, l, s_xd, s_xl, s_id, s_il, W, HAS_INIT, ACC
    )
    for k in tl.static_range(1, W):
        wk = tl.load(w_ptr + d_idx * s_wd + k * s_wk, mask=d_mask, other=0.0).to(ACC)
        acc += wk * _load_full(
            x_ptr,
            init_ptr,
            x_base,
            i_base,
            d_idx,
            d_mask,
            pos - (W - 1) + k,
            lo,
            l,
            s_xd,
            s_xl,
            s_id,
            s_il,
            W,
            HAS_INIT,
            ACC,
        )
    if HAS_BIAS:
        acc += tl.load(b_ptr + d_idx * s_b, mask=d_mask, other=0.0).to(ACC)
    return acc


@triton.jit
def _grad_pre(
    x_ptr,
    init_ptr,
    w_ptr,
    b_ptr,
    gy_ptr,
    x_base,
    i_base,
    g_base,
    d_idx,
    d_mask,
    pos,
    lo,
    hi,
    l,
    s_xd,
    s_xl,
    s_id,
    s_il,
    s_wd,
    s_wk,
    s_b,
    s_gd,
    s_gl,
    W: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    """dL/d(pre-activation) at ``pos``: gy * silu'(pre), 0 outside the sequence [lo, hi) ([0, l) unpacked)."""
    g = tl.load(gy_ptr + g_base + d_idx * s_gd + pos * s_gl, mask=(pos >= lo) & (pos < hi) & d_mask, other=0.0).to(ACC)
    if SILU:
        p = _pre_act(
            x_ptr,
            init_ptr,
            w_ptr,
            b_ptr,
            x_base,
            i_base,
            d_idx,
            d_mask,
            pos,
            lo,
            l,
            s_xd,
            s_xl,
            s_id,
            s_il,
            s_wd,
            s_wk,
            s_b,
            W,
            HAS_INIT,
            HAS_BIAS,
            ACC,
        )
        s = 1.0 / (1.0 + tl.exp(-p))
        g = g * (s * (1.0 + p * (1.0 - s)))
    return g


@triton.jit
def _grad_full(
    x_ptr,
    init_ptr,
    w_ptr,
    b_ptr,
    gy_ptr,
    gf_ptr,
    x_base,
    i_base,
    g_base,
    f_base,
    d_idx,
    d_mask,
    pos,
    lo,
    hi,
    l,
    s_xd,
    s_xl,
    s_id,
    s_il,
    s_wd,
    s_wk,
    s_b,
    s_gd,
    s_gl,
    s_fd,
    s_fl,
    W: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    HAS_GY: tl.constexpr,
    HAS_GFINAL: tl.constexpr,
    ACC: tl.constexpr,
):
    """dL/d full[pos] (full = [initial_state, x] of the sequence [lo, hi); [0, l) unpacked) through y and
    through the final state (row ``f_base``)."""
    acc = tl.zeros_like(pos + d_idx).to(ACC)
    if HAS_GY:
        for k in tl.static_range(W):
            wk = tl.load(w_ptr + d_idx * s_wd + k * s_wk, mask=d_mask, other=0.0).to(ACC)
            acc += wk * _grad_pre(
                x_ptr,
                init_ptr,
                w_ptr,
                b_ptr,
                gy_ptr,
                x_base,
                i_base,
                g_base,
                d_idx,
                d_mask,
                pos + (W - 1 - k),
                lo,
                hi,
                l,
                s_xd,
                s_xl,
                s_id,
                s_il,
                s_wd,
                s_wk,
                s_b,
                s_gd,
                s_gl,
                W,
                HAS_INIT,
                HAS_BIAS,
                SILU,
                ACC,
            )
    if HAS_GFINAL:
        j = pos - hi + (W - 1)  # index into the final state
        in_f = (j >= 0) & (j < W - 1) & d_mask
        acc += tl.load(gf_ptr + f_base + d_idx * s_fd + j * s_fl, mask=in_f, other=0.0).to(ACC)
    return acc


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    init_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    fs_ptr,
    seq_ptr,
    cu_ptr,
    d,
    l,
    n_tblocks,
    n_seq,
    s_xb,
    s_xd,
    s_xl,
    s_ib,
    s_id,
    s_il,
    s_wd,
    s_wk,
    s_b,
    s_yb,
    s_yd,
    s_yl,
    s_fb,
    s_fd,
    s_fl,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SP: tl.constexpr,
    W: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    WRITE_STATE: tl.constexpr,
    ACC: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d_idx = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    d_mask = d_idx < d
    x_base = pid_b * s_xb
    t = pid_t * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    if VARLEN:
        # packed rows (batch 1): each position's taps stop at its sequence's start lo and read that sequence's
        # row of the initial states before it
        qseq = tl.load(seq_ptr + t, mask=t < l, other=0).to(tl.int64)
        lo = tl.load(cu_ptr + qseq)
        i_base = qseq * s_ib
    else:
        lo = 0
        i_base = pid_b * s_ib
    acc = _pre_act(
        x_ptr,
        init_ptr,
        w_ptr,
        b_ptr,
        x_base,
        i_base,
        d_idx,
        d_mask,
        t,
        lo,
        l,
        s_xd,
        s_xl,
        s_id,
        s_il,
        s_wd,
        s_wk,
        s_b,
        W,
        HAS_INIT,
        HAS_BIAS,
        ACC,
    )
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + pid_b * s_yb + d_idx * s_yd + t * s_yl, acc.to(y_ptr.dtype.element_ty), mask=d_mask & (t < l))
    if WRITE_STATE and VARLEN:
        if pid_t == 0:
            # the final states of all N sequences, column (i, j) = state i's slot j, BLOCK_L columns at a time:
            # full position hi_i - (W-1) + j of sequence i
            for c0 in range(0, n_seq * SP, BLOCK_L):
                col = c0 + tl.arange(0, BLOCK_L)[None, :]
                si = (col // SP).to(tl.int64)
                j = col % SP
                ok = (si < n_seq) & (j < W - 1)
                s_lo = tl.load(cu_ptr + si, mask=ok, other=0)
                s_hi = tl.load(cu_ptr + si + 1, mask=ok, other=0)
                v = _load_full(
                    x_ptr,
                    init_ptr,
                    x_base,
                    si * s_ib,
                    d_idx,
                    d_mask & ok,
                    s_hi - (W - 1) + j,
                    s_lo,
                    l,
                    s_xd,
                    s_xl,
                    s_id,
                    s_il,
                    W,
                    HAS_INIT,
                    ACC,
                )
                tl.store(fs_ptr + si * s_fb + d_idx * s_fd + j * s_fl, v.to(fs_ptr.dtype.element_ty), mask=d_mask & ok)
    if WRITE_STATE and not VARLEN:
        if pid_t == n_tblocks - 1:
            j = tl.arange(0, SP)[None, :]
            v = _load_full(
                x_ptr,
                init_ptr,
                x_base,
                i_base,
                d_idx,
                d_mask,
                l - (W - 1) + j,
                0,
                l,
                s_xd,
                s_xl,
                s_id,
                s_il,
                W,
                HAS_INIT,
                ACC,
            )
            tl.store(
                fs_ptr + pid_b * s_fb + d_idx * s_fd + j * s_fl,
                v.to(fs_ptr.dtype.element_ty),
                mask=d_mask & (j < W - 1),
            )


@triton.jit
def _conv_bwd_kernel(
    x_ptr,
    init_ptr,
    w_ptr,
    b_ptr,
    gy_ptr,
    gf_ptr,
    dx_ptr,
    di_ptr,
    dw_ptr,
    db_ptr,
    seq_ptr,
    cu_ptr,
    batch,
    d,
    l,
    chunk_len,
    n_seq,
    s_xb,
    s_xd,
    s_xl,
    s_ib,
    s_id,
    s_il,
    s_wd,
    s_wk,
    s_b,
    s_gb,
    s_gd,
    s_gl,
    s_fb,
    s_fd,
    s_fl,
    s_dxb,
    s_dxd,
    s_dxl,
    s_dib,
    s_did,
    s_dil,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SP: tl.constexpr,
    WP: tl.constexpr,
    W: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    HAS_GY: tl.constexpr,
    HAS_GFINAL: tl.constexpr,
    WANT_DINIT: tl.constexpr,
    WANT_DW: tl.constexpr,
    WANT_DB: tl.constexpr,
    ACC: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d_idx = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    d_mask = d_idx < d
    x_base = pid_b * s_xb
    g_base = pid_b * s_gb
    k_col = tl.arange(0, WP)[None, :]
    dw_acc = tl.zeros([BLOCK_D, WP], dtype=ACC)
    db_acc = tl.zeros([BLOCK_D], dtype=ACC)
    c_start = pid_c * chunk_len
    c_end = tl.minimum(c_start + chunk_len, l)
    for t0 in range(c_start, c_end, BLOCK_L):
        t = t0 + tl.arange(0, BLOCK_L)[None, :]
        if VARLEN:
            # packed rows: position t belongs to the sequence [lo, hi) (row qseq of the states); only outputs of
            # that sequence feed its gradient, and its taps read that sequence's initial state
            qseq = tl.load(seq_ptr + t, mask=t < l, other=0).to(tl.int64)
            lo = tl.load(cu_ptr + qseq)
            hi = tl.load(cu_ptr + qseq + 1)
            i_base = qseq * s_ib
            f_base = qseq * s_fb
        else:
            lo = 0
            hi = l
            i_base = pid_b * s_ib
            f_base = pid_b * s_fb
        dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=ACC)
        if HAS_GY:
            for k in tl.static_range(W):
                # gp at t + (W-1) - k feeds dx_t through tap k; k = W-1 is gp_t itself (dweight, dbias)
                gp = _grad_pre(
                    x_ptr,
                    init_ptr,
                    w_ptr,
                    b_ptr,
                    gy_ptr,
                    x_base,
                    i_base,
                    g_base,
                    d_idx,
                    d_mask,
                    t + (W - 1 - k),
                    lo,
                    hi,
                    l,
                    s_xd,
                    s_xl,
                    s_id,
                    s_il,
                    s_wd,
                    s_wk,
                    s_b,
                    s_gd,
                    s_gl,
                    W,
                    HAS_INIT,
                    HAS_BIAS,
                    SILU,
                    ACC,
                )
                wk = tl.load(w_ptr + d_idx * s_wd + k * s_wk, mask=d_mask, other=0.0).to(ACC)
                dx += wk * gp
                if k == W - 1:
                    if WANT_DB:
                        db_acc += tl.sum(gp, axis=1)
                    if WANT_DW:
                        for kk in tl.static_range(W):
                            xs = _load_full(
                                x_ptr,
                                init_ptr,
                                x_base,
                                i_base,
                                d_idx,
                                d_mask,
                                t - (W - 1) + kk,
                                lo,
                                l,
                                s_xd,
                                s_xl,
                                s_id,
                                s_il,
                                W,
                                HAS_INIT,
                                ACC,
                            )
                            part = tl.sum(gp * xs, axis=1)
                            dw_acc += tl.where(k_col == kk, part[:, None], 0.0)
        if HAS_GFINAL:
            j = t - hi + (W - 1)
            in_f = (j >= 0) & (j < W - 1) & d_mask
            dx += tl.load(gf_ptr + f_base + d_idx * s_fd + j * s_fl, mask=in_f, other=0.0).to(ACC)
        tl.store(
            dx_ptr + pid_b * s_dxb + d_idx * s_dxd + t * s_dxl, dx.to(dx_ptr.dtype.element_ty), mask=d_mask & (t < l)
        )
    part_row = pid_c.to(tl.int64) * batch + pid_b
    if WANT_DW:
        tl.store(dw_ptr + part_row * (W * d) + k_col * d + d_idx, dw_acc, mask=d_mask & (k_col < W))
    if WANT_DB:
        d_vec = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        tl.store(db_ptr + part_row * d + d_vec, db_acc, mask=d_vec < d)
    if WANT_DINIT and VARLEN:
        if pid_c == 0:
            # every sequence's initial state, column (i, j) = slot j of row i (full position lo_i - (W-1) + j)
            for c0 in range(0, n_seq * SP, BLOCK_L):
                col = c0 + tl.arange(0, BLOCK_L)[None, :]
                si = (col // SP).to(tl.int64)
                jj = col % SP
                ok = (si < n_seq) & (jj < W - 1)
                s_lo = tl.load(cu_ptr + si, mask=ok, other=0)
                s_hi = tl.load(cu_ptr + si + 1, mask=ok, other=0)
                g = _grad_full(
                    x_ptr,
                    init_ptr,
                    w_ptr,
                    b_ptr,
                    gy_ptr,
                    gf_ptr,
                    x_base,
                    si * s_ib,
                    g_base,
                    si * s_fb,
                    d_idx,
                    d_mask & ok,
                    s_lo - (W - 1) + jj,
                    s_lo,
                    s_hi,
                    l,
                    s_xd,
                    s_xl,
                    s_id,
                    s_il,
                    s_wd,
                    s_wk,
                    s_b,
                    s_gd,
                    s_gl,
                    s_fd,
                    s_fl,
                    W,
                    HAS_INIT,
                    HAS_BIAS,
                    SILU,
                    HAS_GY,
                    HAS_GFINAL,
                    ACC,
                )
                tl.store(
                    di_ptr + si * s_dib + d_idx * s_did + jj * s_dil, g.to(di_ptr.dtype.element_ty), mask=d_mask & ok
                )
    if WANT_DINIT and not VARLEN:
        if pid_c == 0:
            jj = tl.arange(0, SP)[None, :]
            g = _grad_full(
                x_ptr,
                init_ptr,
                w_ptr,
                b_ptr,
                gy_ptr,
                gf_ptr,
                x_base,
                pid_b * s_ib,
                g_base,
                pid_b * s_fb,
                d_idx,
                d_mask,
                jj - (W - 1),
                0,
                l,
                l,
                s_xd,
                s_xl,
                s_id,
                s_il,
                s_wd,
                s_wk,
                s_b,
                s_gd,
                s_gl,
                s_fd,
                s_fl,
                W,
                HAS_INIT,
                HAS_BIAS,
                SILU,
                HAS_GY,
                HAS_GFINAL,
                ACC,
            )
            tl.store(
                di_ptr + pid_b * s_dib + d_idx * s_did + jj * s_dil,
                g.to(di_ptr.dtype.element_ty),
                mask=d_mask & (jj < W - 1),
            )


@triton.jit
def _conv_update_kernel(
    x_ptr,
    st_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    ns_ptr,
    d,
    s_xb,
    s_xd,
    s_sb,
    s_sd,
    s_sk,
    s_wd,
    s_wk,
    s_b,
    s_yb,
    s_yd,
    s_nb,
    s_nd,
    s_nk,
    BLOCK_D: tl.constexpr,
    WP: tl.constexpr,
    W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d_vec = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_idx = d_vec[:, None]
    d_mask = d_idx < d
    i = tl.arange(0, WP)[None, :]
    s_base = st_ptr + pid_b * s_sb + d_idx * s_sd
    xv = tl.load(x_ptr + pid_b * s_xb + d_idx * s_xd, mask=d_mask, other=0.0).to(ACC)  # (BLOCK_D, 1)
    # the window [conv_state, x], oldest first: column i < W-1 from the state, column W-1 is x
    sv = tl.load(s_base + i * s_sk, mask=d_mask & (i < W - 1), other=0.0).to(ACC)
    win = tl.where(i == W - 1, xv, sv)
    taps = tl.load(w_ptr + d_idx * s_wd + i * s_wk, mask=d_mask & (i < W), other=0.0).to(ACC)
    acc = tl.sum(win * taps, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d_vec * s_b, mask=d_vec < d, other=0.0).to(ACC)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + pid_b * s_yb + d_vec * s_yd, acc.to(y_ptr.dtype.element_ty), mask=d_vec < d)
    # the new state is the window shifted by one: column j holds window[j + 1]
    nv = tl.load(s_base + (i + 1) * s_sk, mask=d_mask & (i + 1 < W - 1), other=0.0).to(ACC)
    nv = tl.where(i + 1 == W - 1, xv, nv)
    tl.store(ns_ptr + pid_b * s_nb + d_idx * s_nd + i * s_nk, nv.to(ns_ptr.dtype.element_ty), mask=d_mask & (i < W - 1))
