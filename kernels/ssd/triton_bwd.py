"""Backward Triton kernels of the chunked SSD scan (used by ``triton_ops.py``; buffers as in ``triton_fwd.py``).

With dy the gradient of y before the z gate, G[c] = d(loss)/d(state leaving chunk c) and a_k = dt_k A the
per-step log decay (cs its in-chunk running sum, T the chunk total), the gradients are

    dx_s  = dt_s [ exp(T - cs_s) G B_s + sum_{t >= s} CB[t, s] exp(cs_t - cs_s) dy_t ] + D dy_s
    dC_t  = exp(cs_t) dy_t S[c] + sum_{s <= t} dCB[t, s] B_s,    dCB[t, s] = exp(cs_t - cs_s) dt_s dy_t . x_s
    dB_s  = exp(T - cs_s) dt_s G^T x_s + sum_{t >= s} dCB[t, s] C_t          (per head, summed over the group)
    da_k  = sum_{t >= k} r_t + sum_{s < k} w_s + sum_{t >= k > s} M[t, s] + exp(T) <G, S[c]>

with r_t = exp(cs_t) dy_t . (S[c] C_t) (the state-output term), w_s = exp(T - cs_s) dt_s x_s . (G B_s) (the
chunk-state term) and M = CB * dCB (the intra-chunk term). The da form is the "stable" one: each term is the
derivative of its own segment sum, so no large row sums are subtracted from large column sums.
"""

from __future__ import annotations

import triton
import triton.language as tl

_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _gate_bwd_kernel(
    dout_ptr,
    z_ptr,
    pre_ptr,
    dy_ptr,
    dz_ptr,
    l,
    h,
    p,
    s_o_b,
    s_o_l,
    s_o_h,
    s_o_p,
    s_z_b,
    s_z_l,
    s_z_h,
    s_z_p,
    BLOCK_L: tl.constexpr,
    BLOCK_HP: tl.constexpr,
):
    """grid (b, cdiv(l, BLOCK_L), cdiv(h * p, BLOCK_HP)): dy = dout * silu(z), dz = dout * pre * silu'(z)
    (pre = y before the gate, saved by the forward); both written contiguous (b, l, h, p)."""
    bi = tl.program_id(0).to(tl.int64)
    ti = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    idx = tl.program_id(2) * BLOCK_HP + tl.arange(0, BLOCK_HP)
    m = (ti < l)[:, None] & (idx < h * p)[None, :]
    hh = idx // p
    pp = idx - hh * p
    ti = ti[:, None]
    do = tl.load(dout_ptr + bi * s_o_b + ti * s_o_l + (hh * s_o_h + pp * s_o_p)[None, :], mask=m, other=0.0)
    z = tl.load(z_ptr + bi * s_z_b + ti * s_z_l + (hh * s_z_h + pp * s_z_p)[None, :], mask=m, other=0.0)
    off = (bi * l + ti) * (h * p) + idx[None, :]
    pre = tl.load(pre_ptr + off, mask=m, other=0.0).to(tl.float32)
    do = do.to(tl.float32)
    z = z.to(tl.float32)
    sg = tl.sigmoid(z)
    tl.store(dy_ptr + off, do * z * sg, mask=m)
    tl.store(dz_ptr + off, do * pre * sg * (1.0 + z * (1.0 - sg)), mask=m)


@triton.jit
def _state_pass_bwd_kernel(
    dS_ptr,
    S_ptr,
    cs_ptr,
    dfinal_ptr,
    dinit_ptr,
    dT_ptr,
    h,
    p,
    n,
    Q,
    nc,
    Lp,
    nblk,
    s_f_b,
    s_f_h,
    s_f_p,
    s_f_n,
    HAS_DFINAL: tl.constexpr,
    HAS_INIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grid (b * h, cdiv(p * n, BLOCK)): the recurrence S[c + 1] = exp(T_c) S[c] + own_c backwards over chunks.
    On entry dS[c] holds d(loss)/d(S[c]) through chunk c's outputs; on exit it holds G[c] = d(loss)/d(S[c + 1])
    (the gradient of chunk c's own contribution). Also writes d(initial state) and per-block partials of
    dT_c = exp(T_c) <G[c], S[c]> into dT (b, h, nc, nblk)."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    bi = pid // h
    blk = tl.program_id(1)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    m = idx < p * n
    pn = p * n
    if HAS_DFINAL:
        gacc = tl.load(
            dfinal_ptr + bi * s_f_b + hi * s_f_h + (idx // n) * s_f_p + (idx % n) * s_f_n, mask=m, other=0.0
        ).to(tl.float32)
    else:
        gacc = tl.zeros((BLOCK,), dtype=tl.float32)
    cs_last = cs_ptr + (bi * h + hi) * Lp + Q - 1
    for cc in range(0, nc):
        ci = nc - 1 - cc
        decay = tl.exp(tl.load(cs_last + ci * Q))
        s_in = tl.load(S_ptr + ((bi * (nc + 1) + ci) * h + hi) * pn + idx, mask=m, other=0.0)
        tl.store(dT_ptr + ((bi * h + hi) * nc + ci) * nblk + blk, decay * tl.sum(gacc * s_in, axis=0))
        dptr = dS_ptr + ((bi * nc + ci) * h + hi) * pn + idx
        d_out = tl.load(dptr, mask=m, other=0.0)
        tl.store(dptr, gacc, mask=m)
        gacc = d_out + decay * gacc
    if HAS_INIT:
        tl.store(dinit_ptr + (bi * h + hi) * pn + idx, gacc, mask=m)


@triton.jit
def _chunk_bwd_dx_kernel(
    x_ptr,
    B_ptr,
    dy_ptr,
    D_ptr,
    CB_ptr,
    G_ptr,
    dtp_ptr,
    cs_ptr,
    csl_ptr,
    dx_ptr,
    ddt_ptr,
    w_ptr,
    dD_ptr,
    l,
    b,
    h,
    p,
    n,
    Q,
    nc,
    Lp,
    g,
    hpg,
    n_mblk,
    s_x_b,
    s_x_l,
    s_x_h,
    s_x_p,
    s_b_b,
    s_b_l,
    s_b_g,
    s_b_n,
    s_y_b,
    s_y_l,
    s_y_h,
    s_y_p,
    s_d_h,
    s_d_p,
    HAS_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """grid (b * nc * h, cdiv(Q, BLOCK_M), cdiv(p, BLOCK_P)): rows s of one chunk and head.

    v_s = exp(T - cs_s) G B_s  +  sum_{t >= s} CB[t, s] exp(cs_t - cs_s) dy_t       (BLOCK_M, BLOCK_P)
    dx_s = dt_s v_s + D dy_s; partials over this p block of ddt_s = x_s . v_s (the direct dt term) and of
    w_s = dt_s x_s . (first term of v_s) (for da); dD partial sum_s dy_s x_s per (h, p)."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    bc = pid // h
    ci = bc % nc
    bi = bc // nc
    gi = hi // hpg
    pm = tl.program_id(1)
    pb = tl.program_id(2)
    s = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pp < p
    qv = tl.minimum(Q, l - ci * Q)
    smask = s < qv
    cs_row = cs_ptr + (bi * h + hi) * Lp + ci * Q
    csl_row = csl_ptr + (bi * h + hi) * Lp + ci * Q
    dt_row = dtp_ptr + (bi * h + hi) * Lp + ci * Q
    cs_s = tl.load(cs_row + s, mask=smask, other=0.0)
    csl_s = tl.load(csl_row + s, mask=smask, other=0.0)
    dt_s = tl.load(dt_row + s, mask=smask, other=0.0)
    total = tl.load(cs_row + Q - 1)
    total_l = tl.load(csl_row + Q - 1)
    dy_base = dy_ptr + bi * s_y_b + (ci * Q) * s_y_l + hi * s_y_h + pp[None, :] * s_y_p  # (1, BLOCK_P)

    # chunk-state term: B_s (BLOCK_M, n) @ G^T (n, BLOCK_P)
    acc_st = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    b_base = B_ptr + bi * s_b_b + (ci * Q + s[:, None]) * s_b_l + gi * s_b_g
    g_base = G_ptr + ((bi * nc + ci) * h + hi) * p * n + pp[None, :] * n
    for k0 in range(0, n, BLOCK_N):
        nn = k0 + tl.arange(0, BLOCK_N)
        nmask = nn < n
        bs = tl.load(b_base + nn[None, :] * s_b_n, mask=smask[:, None] & nmask[None, :], other=0.0)
        gt = tl.load(g_base + nn[:, None], mask=nmask[:, None] & pmask[None, :], other=0.0)
        acc_st += tl.dot(bs.to(DOT), gt.to(DOT), input_precision=PREC)
    acc_st = acc_st * tl.exp((total - cs_s) + (total_l - csl_s))[:, None]

    # intra-chunk term: rows t >= s, CB^T tile (BLOCK_M, BLOCK_K) @ dy (BLOCK_K, BLOCK_P)
    acc = acc_st
    cb_cols = CB_ptr + ((bi * nc + ci) * g + gi) * Q * Q + s[:, None]
    for k0 in range(pm * BLOCK_M, qv, BLOCK_K):
        t = k0 + tl.arange(0, BLOCK_K)
        tmask = t < qv
        causal = (t[None, :] >= s[:, None]) & (tmask[None, :] & smask[:, None])
        cbt = tl.load(cb_cols + t[None, :] * Q, mask=causal, other=0.0)
        cs_t = tl.load(cs_row + t, mask=tmask, other=0.0)
        csl_t = tl.load(csl_row + t, mask=tmask, other=0.0)
        seg = (cs_t[None, :] - cs_s[:, None]) + (csl_t[None, :] - csl_s[:, None])
        decay = tl.exp(tl.where(causal, seg, _NEG))
        dyt = tl.load(dy_base + t[:, None] * s_y_l, mask=tmask[:, None] & pmask[None, :], other=0.0)
        acc += tl.dot((cbt * decay).to(DOT), dyt.to(DOT), input_precision=PREC)

    m2 = smask[:, None] & pmask[None, :]
    xs = tl.load(
        x_ptr + bi * s_x_b + (ci * Q + s[:, None]) * s_x_l + hi * s_x_h + pp[None, :] * s_x_p, mask=m2, other=0.0
    ).to(tl.float32)
    dx = acc * dt_s[:, None]
    if HAS_D:
        dys = tl.load(dy_base + s[:, None] * s_y_l, mask=m2, other=0.0).to(tl.float32)
        dv = tl.load(D_ptr + hi * s_d_h + pp * s_d_p, mask=pmask, other=0.0).to(tl.float32)
        dx += dys * dv[None, :]
        tl.store(dD_ptr + (((bi * nc + ci) * n_mblk + pm) * h + hi) * p + pp, tl.sum(dys * xs, axis=0), mask=pmask)
    tl.store(dx_ptr + ((bi * l + ci * Q + s[:, None]) * h + hi) * p + pp[None, :], dx, mask=m2)
    part = ((pb * b + bi) * h + hi) * Lp + ci * Q + s
    tl.store(ddt_ptr + part, tl.sum(xs * acc, axis=1), mask=smask)
    tl.store(w_ptr + part, dt_s * tl.sum(xs * acc_st, axis=1), mask=smask)


@triton.jit
def _chunk_bwd_dbc_kernel(
    x_ptr,
    B_ptr,
    C_ptr,
    dy_ptr,
    CB_ptr,
    S_ptr,
    G_ptr,
    dtp_ptr,
    cs_ptr,
    csl_ptr,
    dB_ptr,
    dC_ptr,
    r_ptr,
    da_ptr,
    l,
    h,
    p,
    n,
    Q,
    nc,
    Lp,
    g,
    hpg,
    n_mblk,
    s_x_b,
    s_x_l,
    s_x_h,
    s_x_p,
    s_b_b,
    s_b_l,
    s_b_g,
    s_b_n,
    s_c_b,
    s_c_l,
    s_c_g,
    s_c_n,
    s_y_b,
    s_y_l,
    s_y_h,
    s_y_p,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """grid (b * nc * h, cdiv(Q, BLOCK_M)): per head (summed over the group on the host), a block of rows:

    as rows t: dC_t = exp(cs_t) dy_t S[c] + sum_{s <= t} dCB[t, s] B_s, r_t = C_t . (exp(cs_t) dy_t S[c]), and
               the intra-chunk da partial sum_{t in block, t >= k > s} M[t, s] for every k (cumsum over s with a
               carry across column tiles, then a masked column sum), stored at da[b, h, c, row block, k];
    as rows s: dB_s = exp(T - cs_s) dt_s x_s G + sum_{t >= s} dCB[t, s] C_t.
    BLOCK_P and BLOCK_N cover all of p and n (dCB needs the full dy_t . x_s)."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    bc = pid // h
    ci = bc % nc
    bi = bc // nc
    gi = hi // hpg
    pm = tl.program_id(1)
    r = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    pp = tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pmask = pp < p
    nmask = nn < n
    qv = tl.minimum(Q, l - ci * Q)
    rmask = r < qv
    cs_row = cs_ptr + (bi * h + hi) * Lp + ci * Q
    csl_row = csl_ptr + (bi * h + hi) * Lp + ci * Q
    dt_row = dtp_ptr + (bi * h + hi) * Lp + ci * Q
    cs_r = tl.load(cs_row + r, mask=rmask, other=0.0)
    csl_r = tl.load(csl_row + r, mask=rmask, other=0.0)
    dt_r = tl.load(dt_row + r, mask=rmask, other=0.0)
    total = tl.load(cs_row + Q - 1)
    total_l = tl.load(csl_row + Q - 1)
    pn_mask = pmask[:, None] & nmask[None, :]
    rp_mask = rmask[:, None] & pmask[None, :]
    rn_mask = rmask[:, None] & nmask[None, :]
    x_base = x_ptr + bi * s_x_b + (ci * Q) * s_x_l + hi * s_x_h
    dy_base = dy_ptr + bi * s_y_b + (ci * Q) * s_y_l + hi * s_y_h
    b_base = B_ptr + bi * s_b_b + (ci * Q) * s_b_l + gi * s_b_g + nn[None, :] * s_b_n  # (1, BLOCK_N)
    c_base = C_ptr + bi * s_c_b + (ci * Q) * s_c_l + gi * s_c_g + nn[None, :] * s_c_n  # (1, BLOCK_N)
    state_off = ((bi * nc + ci) * h + hi) * p * n + pp[:, None] * n + nn[None, :]  # (BLOCK_P, BLOCK_N)
    out_off = ((bi * l + ci * Q + r[:, None]) * h + hi) * n + nn[None, :]

    # ---- rows as t: dC
    dy_r = tl.load(dy_base + r[:, None] * s_y_l + pp[None, :] * s_y_p, mask=rp_mask, other=0.0).to(DOT)
    s_in = tl.load(S_ptr + state_off + bi * h * p * n, mask=pn_mask, other=0.0)  # S holds nc + 1 states
    dc = tl.dot(dy_r, s_in.to(DOT), input_precision=PREC) * tl.exp(cs_r)[:, None]
    c_r = tl.load(c_base + r[:, None] * s_c_l, mask=rn_mask, other=0.0).to(tl.float32)
    tl.store(r_ptr + (bi * h + hi) * Lp + ci * Q + r, tl.sum(c_r * dc, axis=1), mask=rmask)
    carry = tl.zeros((BLOCK_M,), dtype=tl.float32)
    da_base = da_ptr + (((bi * h + hi) * nc + ci) * n_mblk + pm) * Q + 1
    cb_rows = CB_ptr + ((bi * nc + ci) * g + gi) * Q * Q + r[:, None] * Q
    xt_base = x_base + pp[:, None] * s_x_p  # (BLOCK_P, 1)
    for k0 in range(0, tl.minimum((pm + 1) * BLOCK_M, qv), BLOCK_K):
        s = k0 + tl.arange(0, BLOCK_K)
        smask = s < qv
        causal = (s[None, :] <= r[:, None]) & (smask[None, :] & rmask[:, None])
        xt = tl.load(xt_base + s[None, :] * s_x_l, mask=pmask[:, None] & smask[None, :], other=0.0)
        prod = tl.dot(dy_r, xt.to(DOT), input_precision=PREC)
        cs_s = tl.load(cs_row + s, mask=smask, other=0.0)
        csl_s = tl.load(csl_row + s, mask=smask, other=0.0)
        dt_s = tl.load(dt_row + s, mask=smask, other=0.0)
        seg = (cs_r[:, None] - cs_s[None, :]) + (csl_r[:, None] - csl_s[None, :])
        decay = tl.exp(tl.where(causal, seg, _NEG))
        dcb = prod * decay * dt_s[None, :]  # exactly 0 outside the causal tile
        bs = tl.load(b_base + s[:, None] * s_b_l, mask=smask[:, None] & nmask[None, :], other=0.0)
        dc += tl.dot(dcb.to(DOT), bs.to(DOT), input_precision=PREC)
        mm = dcb * tl.load(cb_rows + s[None, :], mask=causal, other=0.0)
        prefix = tl.cumsum(mm, axis=1) + carry[:, None]  # sum_{s' <= s} M[t, s'] = the "k = s + 1" partial
        carry += tl.sum(mm, axis=1)
        col = tl.sum(tl.where(r[:, None] > s[None, :], prefix, 0.0), axis=0)
        tl.store(da_base + s, col, mask=(s + 1) < Q)
    tl.store(dC_ptr + out_off, dc, mask=rn_mask)

    # ---- rows as s: dB
    x_r = tl.load(x_base + r[:, None] * s_x_l + pp[None, :] * s_x_p, mask=rp_mask, other=0.0).to(DOT)
    gmat = tl.load(G_ptr + state_off, mask=pn_mask, other=0.0)
    db = tl.dot(x_r, gmat.to(DOT), input_precision=PREC) * (tl.exp((total - cs_r) + (total_l - csl_r)) * dt_r)[:, None]
    dyt_base = dy_base + pp[:, None] * s_y_p  # (BLOCK_P, 1)
    for k0 in range(pm * BLOCK_M, qv, BLOCK_K):
        t = k0 + tl.arange(0, BLOCK_K)
        tmask = t < qv
        causal = (t[None, :] >= r[:, None]) & (tmask[None, :] & rmask[:, None])
        dyt = tl.load(dyt_base + t[None, :] * s_y_l, mask=pmask[:, None] & tmask[None, :], other=0.0)
        prod = tl.dot(x_r, dyt.to(DOT), input_precision=PREC)
        cs_t = tl.load(cs_row + t, mask=tmask, other=0.0)
        csl_t = tl.load(csl_row + t, mask=tmask, other=0.0)
        seg = (cs_t[None, :] - cs_r[:, None]) + (csl_t[None, :] - csl_r[:, None])
        decay = tl.exp(tl.where(causal, seg, _NEG))
        ct = tl.load(c_base + t[:, None] * s_c_l, mask=tmask[:, None] & nmask[None, :], other=0.0)
        db += tl.dot((prod * decay * dt_r[:, None]).to(DOT), ct.to(DOT), input_precision=PREC)
    tl.store(dB_ptr + out_off, db, mask=rn_mask)


@triton.jit
def _cumsum_bwd_kernel(
    dt_ptr,
    bias_ptr,
    A_ptr,
    dtp_ptr,
    ddt_acc_ptr,
    r_ptr,
    w_ptr,
    da_ptr,
    ddt_ptr,
    dA_ptr,
    dbias_ptr,
    l,
    h,
    Q,
    nc,
    Lp,
    s_dt_b,
    s_dt_l,
    s_dt_h,
    s_bias,
    s_A,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """grid (b * nc, cdiv(h, BLOCK_H)): da_k = da_direct_k + sum_{t >= k} r_t + sum_{s < k} w_s over the chunk,
    then ddt = ddt_direct + da A, the dA and dbias partials per (b, chunk), and the chain through softplus
    (sigmoid(dt + bias), 1 above the threshold 20) and the bias; ddt written contiguous (b, l, h)."""
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // nc
    ci = pid % nc
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.arange(0, BLOCK_Q)
    pos = ci * Q + t
    hmask = hh < h
    valid = (t < Q) & (pos < l)
    m2 = hmask[:, None] & valid[None, :]
    off = (bi * h + hh[:, None]) * Lp + pos[None, :]
    r = tl.load(r_ptr + off, mask=m2, other=0.0)
    w = tl.load(w_ptr + off, mask=m2, other=0.0)
    da = tl.load(da_ptr + off, mask=m2, other=0.0)
    da += tl.cumsum(r, axis=1, reverse=True) + (tl.cumsum(w, axis=1) - w)
    a = tl.load(A_ptr + hh * s_A, mask=hmask, other=0.0).to(tl.float32)
    dtp = tl.load(dtp_ptr + off, mask=m2, other=0.0)
    tl.store(dA_ptr + pid * h + hh, tl.sum(tl.where(m2, da * dtp, 0.0), axis=1), mask=hmask)
    ddt = tl.load(ddt_acc_ptr + off, mask=m2, other=0.0) + da * a[:, None]
    if SOFTPLUS:
        raw = tl.load(dt_ptr + bi * s_dt_b + pos[None, :] * s_dt_l + hh[:, None] * s_dt_h, mask=m2, other=0.0)
        raw = raw.to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + hh * s_bias, mask=hmask, other=0.0).to(tl.float32)[:, None]
        ddt = ddt * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
    ddt = tl.where(m2, ddt, 0.0)
    tl.store(ddt_ptr + (bi * l + pos[None, :]) * h + hh[:, None], ddt, mask=m2)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid * h + hh, tl.sum(ddt, axis=1), mask=hmask)


@triton.jit
def _final_states_bwd_kernel(
    x_ptr,
    B_ptr,
    dtp_ptr,
    cs_ptr,
    csl_ptr,
    S_ptr,
    cu_ptr,
    df_ptr,
    dx_ptr,
    dB_ptr,
    ddt_ptr,
    da_ptr,
    h,
    p,
    n,
    Q,
    Lp,
    hpg,
    s_x_l,
    s_x_h,
    s_x_p,
    s_b_l,
    s_b_g,
    s_b_n,
    s_f_i,
    s_f_h,
    s_f_p,
    s_f_n,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Packed rows (batch 1), grid (N * h,): the backward of ``_final_states_fwd_kernel`` for sequence i's steps
    lo <= s <= e of its last chunk (each step belongs to one sequence, so the programs write disjoint rows of
    zero-initialised buffers). With F = d(loss)/d(final_i) and omega_s = exp(cs_e - cs_s):

        dx_s += dt_s omega_s F B_s,   dB_s += dt_s omega_s F^T x_s (per head),   ddt_s += omega_s x_s . (F B_s)
        da_k += sum_{lo <= s < k} dt_s omega_s x_s . (F B_s) + exp(cs_e) <F, S[c]>        (lo <= k <= e)

    The gradient of S[c] (exp(cs_e) F) is added on the host. BLOCK_P and BLOCK_N cover all of p and n."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    si = pid // h
    gi = hi // hpg
    pp = tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pmask = pp < p
    nmask = nn < n
    pn_mask = pmask[:, None] & nmask[None, :]
    start = tl.load(cu_ptr + si).to(tl.int64)
    e = tl.load(cu_ptr + si + 1).to(tl.int64) - 1
    ci = e // Q
    lo = tl.maximum(start - ci * Q, 0)
    qv = e - ci * Q + 1
    cs_row = cs_ptr + hi * Lp + ci * Q
    csl_row = csl_ptr + hi * Lp + ci * Q
    dt_row = dtp_ptr + hi * Lp + ci * Q
    total = tl.load(cs_row + qv - 1)
    total_l = tl.load(csl_row + qv - 1)
    F = tl.load(
        df_ptr + si * s_f_i + hi * s_f_h + pp[:, None] * s_f_p + nn[None, :] * s_f_n, mask=pn_mask, other=0.0
    ).to(tl.float32)
    s_in = tl.load(S_ptr + (ci * h + hi) * p * n + pp[:, None] * n + nn[None, :], mask=pn_mask, other=0.0)
    d_total = tl.exp(total + total_l) * tl.sum(tl.sum(F * s_in, axis=1), axis=0)
    carry = d_total
    for k0 in range(lo, qv, BLOCK_M):
        r = k0 + tl.arange(0, BLOCK_M)
        rmask = r < qv
        pos = ci * Q + r
        xr = tl.load(
            x_ptr + pos[:, None] * s_x_l + hi * s_x_h + pp[None, :] * s_x_p,
            mask=rmask[:, None] & pmask[None, :],
            other=0.0,
        )
        br = tl.load(
            B_ptr + pos[:, None] * s_b_l + gi * s_b_g + nn[None, :] * s_b_n,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        )
        seg = (total - tl.load(cs_row + r, mask=rmask, other=0.0)) + (
            total_l - tl.load(csl_row + r, mask=rmask, other=0.0)
        )
        omega = tl.where(rmask, tl.exp(seg), 0.0)
        dt_r = tl.load(dt_row + r, mask=rmask, other=0.0)
        fb = tl.dot(br.to(DOT), tl.trans(F).to(DOT), input_precision=PREC)  # (BLOCK_M, BLOCK_P): F B_s
        coef = omega * dt_r
        tl.store(
            dx_ptr + (pos[:, None] * h + hi) * p + pp[None, :],
            fb * coef[:, None],
            mask=rmask[:, None] & pmask[None, :],
        )
        fx = tl.dot(xr.to(DOT), F.to(DOT), input_precision=PREC)  # (BLOCK_M, BLOCK_N): F^T x_s
        tl.store(
            dB_ptr + (pos[:, None] * h + hi) * n + nn[None, :],
            fx * coef[:, None],
            mask=rmask[:, None] & nmask[None, :],
        )
        xfb = tl.sum(xr.to(tl.float32) * fb, axis=1) * omega
        tl.store(ddt_ptr + hi * Lp + pos, xfb, mask=rmask)
        wf = xfb * dt_r
        tl.store(da_ptr + hi * Lp + pos, carry + tl.cumsum(wf, axis=0) - wf, mask=rmask)
        carry += tl.sum(wf, axis=0)


@triton.jit
def _init_term_bwd_kernel(
    C_ptr,
    h0_ptr,
    E_ptr,
    cu_ptr,
    send_ptr,
    ext_ptr,
    dy_ptr,
    G_ptr,
    df_ptr,
    dC_ptr,
    dh0_ptr,
    da_ptr,
    h,
    p,
    n,
    Q,
    Lp,
    hpg,
    s_c_l,
    s_c_g,
    s_c_n,
    s_h_i,
    s_h_h,
    s_h_p,
    s_h_n,
    s_y_l,
    s_y_h,
    s_y_p,
    s_f_i,
    s_f_h,
    s_f_p,
    s_f_n,
    HAS_DF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Packed rows with initial states (batch 1), grid (N * h,): the backward of the initial state's terms over the
    steps start_i <= t < send_i of sequence i's first chunk c. h0_i leaves that chunk with the factor E_x (E at
    send_i - 1) either into the state leaving chunk c (the sequence goes on: X = G[c]) or into final_i (it ends
    in chunk c: X = d final_i, or nothing). With dy the gradient of y before the gate:

        dC_t += E_t dy_t h0_i,    dh0_i = E_x X + sum_t E_t dy_t^T C_t,
        da_k += E_x <X, h0_i> + sum_{k <= t < send_i} E_t dy_t . (h0_i C_t)         (start_i <= k < send_i)

    The rows of different sequences are disjoint: dC and da go to zero-initialised buffers. BLOCK_P and BLOCK_N
    cover all of p and n."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    si = pid // h
    gi = hi // hpg
    pp = tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pmask = pp < p
    nmask = nn < n
    pn_mask = pmask[:, None] & nmask[None, :]
    t0 = tl.load(cu_ptr + si).to(tl.int64)
    send = tl.load(send_ptr + si).to(tl.int64)
    ext = tl.load(ext_ptr + si)
    ci = t0 // Q
    H = tl.load(
        h0_ptr + si * s_h_i + hi * s_h_h + pp[:, None] * s_h_p + nn[None, :] * s_h_n, mask=pn_mask, other=0.0
    ).to(tl.float32)
    X = tl.load(G_ptr + (ci * h + hi) * p * n + pp[:, None] * n + nn[None, :], mask=pn_mask & (ext != 0), other=0.0)
    if HAS_DF:
        X += tl.load(
            df_ptr + si * s_f_i + hi * s_f_h + pp[:, None] * s_f_p + nn[None, :] * s_f_n,
            mask=pn_mask & (ext == 0),
            other=0.0,
        ).to(tl.float32)
    e_x = tl.load(E_ptr + hi * Lp + send - 1)
    dh0 = X * e_x
    carry = e_x * tl.sum(tl.sum(X * H, axis=1), axis=0)
    ntiles = tl.cdiv(send - t0, BLOCK_M)
    for j in range(0, ntiles):
        r = t0 + (ntiles - 1 - j) * BLOCK_M + tl.arange(0, BLOCK_M)  # the tiles from the last one back
        rmask = r < send
        dyr = tl.load(
            dy_ptr + r[:, None] * s_y_l + hi * s_y_h + pp[None, :] * s_y_p,
            mask=rmask[:, None] & pmask[None, :],
            other=0.0,
        ).to(tl.float32)
        cr = tl.load(
            C_ptr + r[:, None] * s_c_l + gi * s_c_g + nn[None, :] * s_c_n,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        )
        er = tl.load(E_ptr + hi * Lp + r, mask=rmask, other=0.0)
        dye = dyr * er[:, None]
        dc = tl.dot(dye.to(DOT), H.to(DOT), input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        tl.store(dC_ptr + (r[:, None] * h + hi) * n + nn[None, :], dc, mask=rmask[:, None] & nmask[None, :])
        dh0 += tl.dot(tl.trans(dye).to(DOT), cr.to(DOT), input_precision=PREC)
        rr = tl.sum(dc * cr.to(tl.float32), axis=1)  # E_t dy_t . (h0 C_t)
        tl.store(da_ptr + hi * Lp + r, carry + tl.cumsum(rr, axis=0, reverse=True), mask=rmask)
        carry += tl.sum(rr, axis=0)
    tl.store(dh0_ptr + (si * h + hi) * p * n + pp[:, None] * n + nn[None, :], dh0, mask=pn_mask)
