"""Forward Triton kernels of the chunked SSD scan (used by ``triton_ops.py``; the backward re-runs the first four).

Internal buffers (all float32, contiguous, written by these kernels; ``Lp = nc * Q`` is the length padded to
whole chunks, the padded steps have dt = 0 so they neither decay nor add anything):

- ``dtp`` (b, h, Lp): dt after bias and softplus; ``cs``, ``csl`` (b, h, Lp): the running sum of dt * A inside
  each chunk, taken in float64 and kept as float32 hi + lo (segment sums are (hi_t - hi_s) + (lo_t - lo_s));
- ``CB`` (b, nc, g, Q, Q): C_t . B_s per chunk and group (only the tiles on or below the diagonal are written,
  every reader masks s <= t before it loads);
- ``S`` (b, nc + 1, h, p, n): S[:, c] the state entering chunk c, S[:, nc] the final state.

Notation in the comments: t a row (output step), s a column (source step) of a chunk, T = cs of the chunk's last
step, Qv the number of real steps in the chunk (Q except in the tail chunk).
"""

from __future__ import annotations

import triton
import triton.language as tl

# exp(_NEG) == 0 exactly; used instead of -inf so that no inf - inf can appear in masked lanes
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def softplus_fwd(v):
    """softplus with mamba_ssm's threshold (v > 20 -> v), and an accurate log1p for small exp(v):
    log1p(e) = log(u) * e / (u - 1) with u = 1 + e rounded (exact to a few ulps; plain log(1 + e) would lose
    all digits for v < -15)."""
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    exact = u == 1.0
    lp = tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, lp)


@triton.jit
def _cumsum_fwd_kernel(
    dt_ptr,
    bias_ptr,
    A_ptr,
    jump_ptr,
    dtp_ptr,
    cs_ptr,
    csl_ptr,
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
    HAS_JUMP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """grid (b * nc, cdiv(h, BLOCK_H)): one chunk of BLOCK_H heads. dt (+ bias, softplus) and its in-chunk
    running sum of dt * A, both stored (b, h, Lp); steps past the end of the sequence get dt = 0.

    Packed rows (HAS_JUMP): ``jump`` (l,) float32 holds a large J at every sequence start; it is subtracted from
    the log decay there (not from dtp), so every decay that reaches across a start is exp(-J + ...) = 0: the
    intra-chunk pairs, the chunk-state weights, the state passing and the state-output term all stop at
    sequence boundaries without any other kernel knowing about them (forward and backward: J is a constant)."""
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // nc
    ci = pid % nc
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.arange(0, BLOCK_Q)
    pos = ci * Q + t
    hmask = hh < h
    valid = (t < Q) & (pos < l)
    m2 = hmask[:, None] & valid[None, :]
    d = tl.load(dt_ptr + bi * s_dt_b + pos[None, :] * s_dt_l + hh[:, None] * s_dt_h, mask=m2, other=0.0)
    d = d.to(tl.float32)
    if HAS_BIAS:
        d += tl.load(bias_ptr + hh * s_bias, mask=hmask, other=0.0).to(tl.float32)[:, None]
    if SOFTPLUS:
        d = softplus_fwd(d)
    d = tl.where(m2, d, 0.0)
    a = tl.load(A_ptr + hh * s_A, mask=hmask, other=0.0).to(tl.float32)
    # the running sum in float64, stored as float32 hi + lo: a segment sum (hi_t - hi_s) + (lo_t - lo_s) is then
    # accurate relative to the segment, not to |cs| (hundreds under strong decay)
    a64 = d.to(tl.float64) * a.to(tl.float64)[:, None]
    if HAS_JUMP:
        a64 -= tl.load(jump_ptr + pos, mask=valid, other=0.0).to(tl.float64)[None, :]
    cs64 = tl.cumsum(a64, axis=1)
    cs = cs64.to(tl.float32)
    csl = (cs64 - cs.to(tl.float64)).to(tl.float32)
    out = (bi * h + hh[:, None]) * Lp + pos[None, :]
    smask = hmask[:, None] & (t < Q)[None, :]
    tl.store(dtp_ptr + out, d, mask=smask)
    tl.store(cs_ptr + out, cs, mask=smask)
    tl.store(csl_ptr + out, csl, mask=smask)


@triton.jit
def _bmm_cb_kernel(
    C_ptr,
    B_ptr,
    CB_ptr,
    l,
    Q,
    nc,
    g,
    n,
    s_c_b,
    s_c_l,
    s_c_g,
    s_c_n,
    s_b_b,
    s_b_l,
    s_b_g,
    s_b_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """grid (b * nc * g, cdiv(Q, BLOCK_M), cdiv(Q, BLOCK_M)): one (BLOCK_M, BLOCK_M) tile of C_chunk @ B_chunk^T,
    K = n in BLOCK_N steps. Tiles strictly above the diagonal are skipped (never read)."""
    pid = tl.program_id(0).to(tl.int64)
    pi = tl.program_id(1)
    pj = tl.program_id(2)
    if pj <= pi:
        gi = pid % g
        bc = pid // g
        ci = bc % nc
        bi = bc // nc
        rows = pi * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pj * BLOCK_M + tl.arange(0, BLOCK_M)
        prow = ci * Q + rows
        pcol = ci * Q + cols
        rmask = (rows < Q) & (prow < l)
        cmask = (cols < Q) & (pcol < l)
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, n, BLOCK_N):
            kk = k0 + tl.arange(0, BLOCK_N)
            kmask = kk < n
            c = tl.load(
                C_ptr + bi * s_c_b + prow[:, None] * s_c_l + gi * s_c_g + kk[None, :] * s_c_n,
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            )
            bt = tl.load(
                B_ptr + bi * s_b_b + pcol[None, :] * s_b_l + gi * s_b_g + kk[:, None] * s_b_n,
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            )
            acc += tl.dot(c.to(DOT), bt.to(DOT), input_precision=PREC)
        base = ((bi * nc + ci) * g + gi) * Q * Q
        tl.store(CB_ptr + base + rows[:, None] * Q + cols[None, :], acc, mask=(rows < Q)[:, None] & (cols < Q)[None, :])


@triton.jit
def _chunk_state_kernel(
    X_ptr,
    Y_ptr,
    dtp_ptr,
    cs_ptr,
    csl_ptr,
    out_ptr,
    l,
    h,
    p,
    n,
    Q,
    nc,
    Lp,
    hpg,
    nc_out,
    OUT_SHIFT,
    s_x_b,
    s_x_l,
    s_x_h,
    s_x_p,
    s_y_b,
    s_y_l,
    s_y_g,
    s_y_n,
    BACKWARD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """grid (b * nc * h, cdiv(p, BLOCK_P), cdiv(n, BLOCK_N)): out[b, c + OUT_SHIFT, h] (p, n) =
    sum_t X_t^T w_t Y_t over the chunk, K = the chunk's steps in BLOCK_K steps.

    forward  (BACKWARD=False): X = x, Y = B, w_t = exp(T - cs_t) dt_t   -> the chunk's own state contribution;
    backward (BACKWARD=True):  X = dy, Y = C, w_t = exp(cs_t)           -> d(loss)/d(state entering the chunk)
                                                                           through this chunk's outputs."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    bc = pid // h
    ci = bc % nc
    bi = bc // nc
    gi = hi // hpg
    pp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = pp < p
    nmask = nn < n
    qv = tl.minimum(Q, l - ci * Q)
    cs_row = cs_ptr + (bi * h + hi) * Lp + ci * Q
    csl_row = csl_ptr + (bi * h + hi) * Lp + ci * Q
    dt_row = dtp_ptr + (bi * h + hi) * Lp + ci * Q
    total = tl.load(cs_row + Q - 1)
    total_l = tl.load(csl_row + Q - 1)
    x_base = X_ptr + bi * s_x_b + (ci * Q) * s_x_l + hi * s_x_h + pp[:, None] * s_x_p
    y_base = Y_ptr + bi * s_y_b + (ci * Q) * s_y_l + gi * s_y_g + nn[None, :] * s_y_n
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, qv, BLOCK_K):
        t = k0 + tl.arange(0, BLOCK_K)
        tmask = t < qv
        xt = tl.load(x_base + t[None, :] * s_x_l, mask=pmask[:, None] & tmask[None, :], other=0.0)
        y = tl.load(y_base + t[:, None] * s_y_l, mask=tmask[:, None] & nmask[None, :], other=0.0)
        cs_t = tl.load(cs_row + t, mask=tmask, other=0.0)
        if BACKWARD:
            w = tl.exp(cs_t)
        else:
            seg = (total - cs_t) + (total_l - tl.load(csl_row + t, mask=tmask, other=0.0))
            w = tl.exp(seg) * tl.load(dt_row + t, mask=tmask, other=0.0)  # 0 past the end (dt = 0)
        acc += tl.dot(xt.to(DOT), (y * w[:, None]).to(DOT), input_precision=PREC)
    out = out_ptr + ((bi * nc_out + ci + OUT_SHIFT) * h + hi) * p * n
    tl.store(out + pp[:, None] * n + nn[None, :], acc, mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _state_pass_fwd_kernel(
    S_ptr,
    init_ptr,
    cs_ptr,
    h,
    p,
    n,
    Q,
    nc,
    Lp,
    s_i_b,
    s_i_h,
    s_i_p,
    s_i_n,
    HAS_INIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grid (b * h, cdiv(p * n, BLOCK)): the sequential recurrence over chunks, in place in S:
    S[c + 1] = exp(T_c) S[c] + (chunk c's own contribution, which S[c + 1] holds on entry); S[0] = initial."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    bi = pid // h
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = idx < p * n
    if HAS_INIT:
        s = tl.load(init_ptr + bi * s_i_b + hi * s_i_h + (idx // n) * s_i_p + (idx % n) * s_i_n, mask=m, other=0.0).to(
            tl.float32
        )
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    pn = p * n
    step = h * pn
    ptr = S_ptr + (bi * (nc + 1) * h + hi) * pn + idx
    tl.store(ptr, s, mask=m)
    cs_last = cs_ptr + (bi * h + hi) * Lp + Q - 1
    for ci in range(0, nc):
        decay = tl.exp(tl.load(cs_last + ci * Q))
        ptr += step
        s = decay * s + tl.load(ptr, mask=m, other=0.0)
        tl.store(ptr, s, mask=m)


@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr,
    C_ptr,
    z_ptr,
    D_ptr,
    CB_ptr,
    S_ptr,
    dtp_ptr,
    cs_ptr,
    csl_ptr,
    out_ptr,
    pre_ptr,
    y0_ptr,
    l,
    h,
    p,
    n,
    Q,
    nc,
    Lp,
    g,
    hpg,
    s_x_b,
    s_x_l,
    s_x_h,
    s_x_p,
    s_c_b,
    s_c_l,
    s_c_g,
    s_c_n,
    s_z_b,
    s_z_l,
    s_z_h,
    s_z_p,
    s_d_h,
    s_d_p,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    STORE_PRE: tl.constexpr,
    HAS_Y0: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """grid (b * nc * h, cdiv(Q, BLOCK_M), cdiv(p, BLOCK_P)): one (BLOCK_M steps, BLOCK_P) tile of y:

        y_t = exp(cs_t) C_t . S[c]  +  sum_{s <= t} CB[t, s] exp(cs_t - cs_s) dt_s x_s  +  D x_t

    then ``pre`` = y (stored when the backward needs it for dz) and out = y * silu(z_t). HAS_Y0 (packed rows
    with initial states): y += y0 (float32 (b, l, h, p), ``_init_term_fwd_kernel``) before D x. The causal loop visits
    only the column tiles up to the diagonal; the decay is the exp of a difference of running sums (<= 0 for
    A <= 0), masked to exp(-1e30) = 0 above the diagonal, so nothing overflows."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    bc = pid // h
    ci = bc % nc
    bi = bc // nc
    gi = hi // hpg
    pm = tl.program_id(1)
    t = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    pp = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pp < p
    qv = tl.minimum(Q, l - ci * Q)
    tmask = t < qv
    cs_row = cs_ptr + (bi * h + hi) * Lp + ci * Q
    csl_row = csl_ptr + (bi * h + hi) * Lp + ci * Q
    dt_row = dtp_ptr + (bi * h + hi) * Lp + ci * Q
    cs_t = tl.load(cs_row + t, mask=tmask, other=0.0)
    csl_t = tl.load(csl_row + t, mask=tmask, other=0.0)
    x_base = x_ptr + bi * s_x_b + (ci * Q) * s_x_l + hi * s_x_h + pp[None, :] * s_x_p  # (1, BLOCK_P)

    # state entering the chunk: (BLOCK_M, n) @ (n, BLOCK_P), K = n in BLOCK_N steps
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    c_base = C_ptr + bi * s_c_b + (ci * Q + t[:, None]) * s_c_l + gi * s_c_g
    s_base = S_ptr + ((bi * (nc + 1) + ci) * h + hi) * p * n + pp[None, :] * n
    for k0 in range(0, n, BLOCK_N):
        nn = k0 + tl.arange(0, BLOCK_N)
        nmask = nn < n
        c = tl.load(c_base + nn[None, :] * s_c_n, mask=tmask[:, None] & nmask[None, :], other=0.0)
        st = tl.load(s_base + nn[:, None], mask=nmask[:, None] & pmask[None, :], other=0.0)
        acc += tl.dot(c.to(DOT), st.to(DOT), input_precision=PREC)
    acc = acc * tl.exp(cs_t)[:, None]

    # intra-chunk, causal: column tiles up to the diagonal
    cb_rows = CB_ptr + ((bi * nc + ci) * g + gi) * Q * Q + t[:, None] * Q
    for k0 in range(0, tl.minimum((pm + 1) * BLOCK_M, qv), BLOCK_K):
        s = k0 + tl.arange(0, BLOCK_K)
        smask = s < qv
        causal = (s[None, :] <= t[:, None]) & (smask[None, :] & tmask[:, None])
        cb = tl.load(cb_rows + s[None, :], mask=causal, other=0.0)
        cs_s = tl.load(cs_row + s, mask=smask, other=0.0)
        csl_s = tl.load(csl_row + s, mask=smask, other=0.0)
        dt_s = tl.load(dt_row + s, mask=smask, other=0.0)
        seg = (cs_t[:, None] - cs_s[None, :]) + (csl_t[:, None] - csl_s[None, :])
        decay = tl.exp(tl.where(causal, seg, _NEG))
        xs = tl.load(x_base + s[:, None] * s_x_l, mask=smask[:, None] & pmask[None, :], other=0.0)
        acc += tl.dot((cb * decay * dt_s[None, :]).to(DOT), xs.to(DOT), input_precision=PREC)

    m2 = tmask[:, None] & pmask[None, :]
    out_off = ((bi * l + ci * Q + t[:, None]) * h + hi) * p + pp[None, :]
    if HAS_Y0:
        acc += tl.load(y0_ptr + out_off, mask=m2, other=0.0)
    if HAS_D:
        xt = tl.load(x_base + t[:, None] * s_x_l, mask=m2, other=0.0).to(tl.float32)
        dv = tl.load(D_ptr + hi * s_d_h + pp * s_d_p, mask=pmask, other=0.0).to(tl.float32)
        acc += xt * dv[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + out_off, acc, mask=m2)
    if HAS_Z:
        zt = tl.load(
            z_ptr + bi * s_z_b + (ci * Q + t[:, None]) * s_z_l + hi * s_z_h + pp[None, :] * s_z_p, mask=m2, other=0.0
        ).to(tl.float32)
        acc = acc * zt * tl.sigmoid(zt)
    tl.store(out_ptr + out_off, acc, mask=m2)


@triton.jit
def _state_update_kernel(
    state_ptr,
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
    h,
    p,
    n,
    hpg,
    s_s_b,
    s_s_h,
    s_s_p,
    s_s_n,
    s_x_b,
    s_x_h,
    s_x_p,
    s_dt_b,
    s_dt_h,
    s_A,
    s_b_b,
    s_b_g,
    s_b_n,
    s_c_b,
    s_c_g,
    s_c_n,
    s_d_h,
    s_d_p,
    s_z_b,
    s_z_h,
    s_z_p,
    s_bias,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """grid (b * h, cdiv(p, BLOCK_P)): one decode step for a (BLOCK_P, n) slice of one head's state:
    new = exp(dt A) state + dt x B^T, y = new C + D x, y *= silu(z). new is written to a fresh (b, h, p, n)
    float32 tensor; the state passed in is only read."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    bi = pid // h
    gi = hi // hpg
    pp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pmask = pp < p
    nmask = nn < n
    m2 = pmask[:, None] & nmask[None, :]
    d = tl.load(dt_ptr + bi * s_dt_b + hi * s_dt_h).to(tl.float32)
    if HAS_BIAS:
        d += tl.load(bias_ptr + hi * s_bias).to(tl.float32)
    if SOFTPLUS:
        d = softplus_fwd(d)
    decay = tl.exp(d * tl.load(A_ptr + hi * s_A).to(tl.float32))
    st = tl.load(
        state_ptr + bi * s_s_b + hi * s_s_h + pp[:, None] * s_s_p + nn[None, :] * s_s_n, mask=m2, other=0.0
    ).to(tl.float32)
    xv = tl.load(x_ptr + bi * s_x_b + hi * s_x_h + pp * s_x_p, mask=pmask, other=0.0).to(tl.float32)
    bv = tl.load(B_ptr + bi * s_b_b + gi * s_b_g + nn * s_b_n, mask=nmask, other=0.0).to(tl.float32)
    cv = tl.load(C_ptr + bi * s_c_b + gi * s_c_g + nn * s_c_n, mask=nmask, other=0.0).to(tl.float32)
    new = st * decay + (d * xv)[:, None] * bv[None, :]
    tl.store(new_ptr + (pid * p + pp[:, None]) * n + nn[None, :], new, mask=m2)
    y = tl.sum(new * cv[None, :], axis=1)
    if HAS_D:
        y += xv * tl.load(D_ptr + hi * s_d_h + pp * s_d_p, mask=pmask, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + bi * s_z_b + hi * s_z_h + pp * s_z_p, mask=pmask, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + pid * p + pp, y, mask=pmask)


@triton.jit
def _final_states_fwd_kernel(
    x_ptr,
    B_ptr,
    dtp_ptr,
    cs_ptr,
    csl_ptr,
    S_ptr,
    cu_ptr,
    out_ptr,
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
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Packed rows (batch 1), grid (N * h, cdiv(p, BLOCK_P), cdiv(n, BLOCK_N)): the state after the last step e of
    sequence i, from the state entering e's chunk c and the chunk's steps up to e (mamba_ssm's varlen states):

        final_i = exp(cs_e) S[c] + sum_{lo <= s <= e} exp(cs_e - cs_s) dt_s x_s B_s^T,   lo = max(start_i, cQ)

    (chunk-local steps). Sequence starts are jumps of the log decay (``_cumsum_fwd_kernel``), so exp(cs_e) is 0
    when sequence i starts inside chunk c (S[c] then belongs to an earlier sequence) and nothing reaches before
    its start; the initial-state term is added on the host."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    si = pid // h
    gi = hi // hpg
    pp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = pp < p
    nmask = nn < n
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
    x_base = x_ptr + (ci * Q) * s_x_l + hi * s_x_h + pp[:, None] * s_x_p
    y_base = B_ptr + (ci * Q) * s_b_l + gi * s_b_g + nn[None, :] * s_b_n
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(lo, qv, BLOCK_K):
        t = k0 + tl.arange(0, BLOCK_K)
        tmask = t < qv
        xt = tl.load(x_base + t[None, :] * s_x_l, mask=pmask[:, None] & tmask[None, :], other=0.0)
        y = tl.load(y_base + t[:, None] * s_b_l, mask=tmask[:, None] & nmask[None, :], other=0.0)
        seg = (total - tl.load(cs_row + t, mask=tmask, other=0.0)) + (
            total_l - tl.load(csl_row + t, mask=tmask, other=0.0)
        )
        w = tl.where(tmask, tl.exp(seg) * tl.load(dt_row + t, mask=tmask, other=0.0), 0.0)
        acc += tl.dot(xt.to(DOT), (y * w[:, None]).to(DOT), input_precision=PREC)
    m2 = pmask[:, None] & nmask[None, :]
    s_in = tl.load(S_ptr + (ci * h + hi) * p * n + pp[:, None] * n + nn[None, :], mask=m2, other=0.0)
    acc += tl.exp(total + total_l) * s_in
    tl.store(out_ptr + (si * h + hi) * p * n + pp[:, None] * n + nn[None, :], acc, mask=m2)


@triton.jit
def _init_term_fwd_kernel(
    C_ptr,
    h0_ptr,
    E_ptr,
    cu_ptr,
    send_ptr,
    y0_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Packed rows with initial states (batch 1), grid (N * h, cdiv(Q, BLOCK_M), cdiv(p, BLOCK_P)): the initial
    state's part of y in the first chunk of sequence i, steps start_i <= t < send_i (send_i = the sequence's end or
    its first chunk's end, whichever comes first):

        y0_t = E_t C_t . h0_i,     E_t = exp(decay from start_i through t)    (E from the host, (h, Lp))

    written to a zero-initialised (l, h, p) buffer that ``_chunk_scan_fwd_kernel`` adds before D and the gate.
    Past its first chunk, h0_i reaches the outputs through the chunk states (the host adds E h0_i to the state
    leaving that chunk before the state passing)."""
    pid = tl.program_id(0).to(tl.int64)
    hi = pid % h
    si = pid // h
    gi = hi // hpg
    t0 = tl.load(cu_ptr + si).to(tl.int64)
    send = tl.load(send_ptr + si).to(tl.int64)
    r = t0 + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < send
    pp = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pp < p
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    h_base = h0_ptr + si * s_h_i + hi * s_h_h + pp[None, :] * s_h_p
    for k0 in range(0, n, BLOCK_N):
        nn = k0 + tl.arange(0, BLOCK_N)
        nmask = nn < n
        c = tl.load(
            C_ptr + r[:, None] * s_c_l + gi * s_c_g + nn[None, :] * s_c_n,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        )
        ht = tl.load(h_base + nn[:, None] * s_h_n, mask=nmask[:, None] & pmask[None, :], other=0.0)
        acc += tl.dot(c.to(DOT), ht.to(DOT), input_precision=PREC)
    acc = acc * tl.load(E_ptr + hi * Lp + r, mask=rmask, other=0.0)[:, None]
    tl.store(y0_ptr + (r[:, None] * h + hi) * p + pp[None, :], acc, mask=rmask[:, None] & pmask[None, :])
