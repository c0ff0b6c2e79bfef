/* Mamba-1 selective scan on the CPU: forward, backward and the one-step state update (kernels/scan/native_ops.py).
 *
 *   dt_t = softplus(delta_t + bias)  (or delta_t + bias)
 *   h_t  = exp(dt_t A) h_{t-1} + dt_t u_t B_t          per (batch, channel, state)
 *   y_t  = (sum_n C_t h_t + D u_t) silu(z_t)
 *
 * One pass over the sequence. A task owns a slice of consecutive channel blocks of one (batch row, group of B / C);
 * a block is VL consecutive channels, one machine vector (8 floats / 4 doubles with AVX2, 16 / 8 with AVX-512,
 * GCC vector extensions). The task walks the positions and at each position steps every block of its slice: per
 * state one vector exp (sl_vexp_f in float, libm exp lane by lane in double), three FMAs and the state, which
 * stays in L1 (n vectors per block). B_t and C_t are scalars shared by all the channels of a group, read once per
 * position. Inputs come as raw pointers with element strides, so the layout a Mamba mixer passes (the transpose
 * of a contiguous (b, l, d): stride 1 along channels, each position one contiguous run) and the standard
 * contiguous (b, d, l) are read in place. Tasks run in parallel (OpenMP) on torch's thread pool.
 *
 * Packed rows (cu_seqlens): the walk over a row is a walk over its sequences, the state reset to the sequence's
 * initial state at each start and stored at each end; the unpacked case is one sequence per row.
 *
 * Backward: the forward stores the state before every K-th position (ckpt, (b, d, nck, n)); the backward walks
 * the K-position chunks newest first and, in each, every block of its slice: recompute the chunk's decays and
 * states into (K, n) buffers from the checkpoint, then run the adjoint recurrence mu_{t-1} = a_t (mu_t + C_t gy_t)
 * backwards through the chunk. B / C gradients are sums over the channels of a group: lane partials per chunk,
 * summed once per chunk into the task's own slice of a (P, b, g, n, l) buffer (summed over P in Python), so no
 * two threads write the same element.
 *
 * The body is written once and instantiated for float and double by including this file twice (SL_REAL).
 */
#ifndef SL_SCAN_INSTANCE
#include <stdlib.h>

#include "seqlab_native.h"

/* Everything a call needs, one struct for both dtypes and both directions (mirrored by ctypes in
 * native_ops.py: keep the field order in sync). Strides are in elements. */
typedef struct {
    int64_t b, d, l, n, g, K, nseq, softplus, P;
    int64_t su[3], sdt[3], sz[3], sy[3], sgy[3], sgu[3], sgdt[3], sgz[3], sA[2], sB[4], sC[4];
    const void *u, *dt, *A, *B, *C, *D, *dbias, *z, *h0;
    void *y, *hT, *ckpt;
    const int64_t *cu;
    const void *gy, *ghT;
    void *gu, *gdt, *gA, *gB, *gC, *gD, *gdbias, *gz, *gh0;
} sl_scan_args;

typedef struct {
    int64_t b, d, n, g;
    int64_t sstate[3], sx[2], sdt[2], sz[2], sA[2], sB[3], sC[3], sy[2], snew[3];
    const void *state, *x, *dt, *A, *B, *C, *D, *dbias, *z;
    void *y, *new_state;
    int64_t softplus;
} sl_step_args;

SL_EXPORT int sl_scan_abi(void) { return SEQLAB_NATIVE_ABI; }

#define SL_CAT_(a, b) a##b
#define SL_CAT(a, b) SL_CAT_(a, b)

/* the vector helpers of the double instance: lane by lane through libm (the float64 build is the exact twin
 * of the reference, not the fast path) */
typedef double sl_vd __attribute__((vector_size(SL_VBYTES)));
static inline sl_vd sl_vexp_d(sl_vd x) {
    for (int c = 0; c < SL_VBYTES / 8; c++) x[c] = exp(x[c]);
    return x;
}
static inline sl_vd sl_vsoftplus_d(sl_vd x) {
    for (int c = 0; c < SL_VBYTES / 8; c++) x[c] = sl_softplus_d(x[c]);
    return x;
}
static inline sl_vd sl_vsigmoid_d(sl_vd x) {
    for (int c = 0; c < SL_VBYTES / 8; c++) x[c] = sl_sigmoid_d(x[c]);
    return x;
}

#define SL_SCAN_INSTANCE
#define SL_REAL float
#define SL_VEC sl_vf
#define SL_VEXP sl_vexp_f
#define SL_VSOFTPLUS sl_vsoftplus_f
#define SL_VSIGMOID sl_vsigmoid_f
#define SL_SFX _f
#define SL_VL (SL_VBYTES / 4)
#define SL_EXP(x) sl_exp_f(x)
#define SL_SOFTPLUS(x) sl_fast_softplus_f(x)
#define SL_SIGMOID(x) sl_fast_sigmoid_f(x)
#include "scan.c"
#undef SL_REAL
#undef SL_SFX
#undef SL_VL
#undef SL_EXP
#undef SL_SOFTPLUS
#undef SL_SIGMOID
#undef SL_VEC
#undef SL_VEXP
#undef SL_VSOFTPLUS
#undef SL_VSIGMOID

#define SL_REAL double
#define SL_VEC sl_vd
#define SL_VEXP sl_vexp_d
#define SL_VSOFTPLUS sl_vsoftplus_d
#define SL_VSIGMOID sl_vsigmoid_d
#define SL_SFX _d
#define SL_VL (SL_VBYTES / 8)
#define SL_EXP(x) exp(x)
#define SL_SOFTPLUS(x) sl_softplus_d(x)
#define SL_SIGMOID(x) sl_sigmoid_d(x)
#include "scan.c"

#else /* the body, once per dtype ---------------------------------------------------------------------------- */

typedef SL_REAL SL_CAT(sl_real, SL_SFX);
#define R SL_REAL
#define VL SL_VL
#define FN(name) SL_CAT(name, SL_SFX)

/* channel blocks: group gi holds channels [gi * dg, (gi + 1) * dg); block cb of it starts at gi * dg + cb * VL */
static void FN(load_block)(const sl_scan_args *a, int64_t c0, int nl, R *restrict Av, R *restrict Dv,
                           R *restrict bv) {
    const R *A = (const R *)a->A;
    for (int64_t s = 0; s < a->n; s++)
        for (int c = 0; c < VL; c++) Av[s * VL + c] = c < nl ? A[(c0 + c) * a->sA[0] + s * a->sA[1]] : (R)0;
    for (int c = 0; c < VL; c++) {
        Dv[c] = (a->D && c < nl) ? ((const R *)a->D)[c0 + c] : (R)0;
        bv[c] = (a->dbias && c < nl) ? ((const R *)a->dbias)[c0 + c] : (R)0;
    }
}

/* the sequences of row bi: [lo, hi) of sequence q; unpacked rows are one sequence */
static inline void FN(seq_bounds)(const sl_scan_args *a, int64_t q, int64_t *lo, int64_t *hi) {
    if (a->cu) {
        *lo = a->cu[q];
        *hi = a->cu[q + 1];
    } else {
        *lo = 0;
        *hi = a->l;
    }
}

/* lanes of a (b, d, l) tensor at (bi, c0 .. c0 + nl, t) as a vector (0 beyond nl); a plain vector load when the
 * channels are consecutive in memory (the mixer's layout) and the block is full */
SL_DEFINE_LANE_IO(FN(vload), FN(vstore))

SL_EXPORT void FN(sl_scan_fwd)(const sl_scan_args *a, int nthreads) {
    const int64_t d = a->d, n = a->n, g = a->g, dg = d / g, nb = (dg + VL - 1) / VL;
    const int64_t nseq = a->cu ? a->nseq : 1, nck = (a->l + a->K - 1) / a->K;
    /* A task owns a slice of consecutive channel blocks of one (batch row, group) and walks the positions, at
     * each position stepping all its blocks: the slice's states (a few KiB) stay in L1, each position reads one
     * contiguous run of u / delta / z (in the mixer's layout) and B_t / C_t once for all blocks. (Walking one
     * block through all positions instead reads one cache line per position a row apart: a TLB and cache miss
     * per access that no prefetcher hides, measured 2x slower.) Two slices per thread balance the load. */
    int64_t P = (2 * nthreads + a->b * g - 1) / (a->b * g);
    P = P < 1 ? 1 : (P > nb ? nb : P);
    const int64_t ntask = a->b * g * P;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t maxb = (nb + P - 1) / P;
        SL_VEC *Av = aligned_alloc(64, (size_t)(maxb * n) * sizeof(SL_VEC));
        SL_VEC *h = aligned_alloc(64, (size_t)(maxb * n) * sizeof(SL_VEC));
        SL_VEC *Dv = aligned_alloc(64, (size_t)maxb * sizeof(SL_VEC));
        SL_VEC *bv = aligned_alloc(64, (size_t)maxb * sizeof(SL_VEC));
        R *BC = aligned_alloc(64, (size_t)2 * n * sizeof(R) + 64);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntask; task++) {
            const int64_t bi = task / (g * P), gi = (task / P) % g, p = task % P;
            const int64_t cb_lo = nb * p / P, cb_hi = nb * (p + 1) / P, nbk = cb_hi - cb_lo;
            if (nbk == 0) continue;
            const int64_t c_lo = gi * dg + cb_lo * VL;
            for (int64_t k = 0; k < nbk; k++) {
                const int64_t c0 = c_lo + k * VL, rem = gi * dg + dg - c0;
                const int nl = (int)(rem < VL ? rem : VL);
                R Dt[VL], bt[VL];
                FN(load_block)(a, c0, nl, (R *)(Av + k * n), Dt, bt);
                memcpy(Dv + k, Dt, sizeof(SL_VEC));
                memcpy(bv + k, bt, sizeof(SL_VEC));
            }
            const R *Bp = (const R *)a->B + bi * a->sB[0] + gi * a->sB[1];
            const R *Cp = (const R *)a->C + bi * a->sC[0] + gi * a->sC[1];
            const R *up = (const R *)a->u + bi * a->su[0] + c_lo * a->su[1];
            const R *dp = (const R *)a->dt + bi * a->sdt[0] + c_lo * a->sdt[1];
            const R *zp = a->z ? (const R *)a->z + bi * a->sz[0] + c_lo * a->sz[1] : NULL;
            R *yp = (R *)a->y + bi * a->sy[0] + c_lo * a->sy[1];
            for (int64_t q = 0; q < nseq; q++) {
                int64_t lo, hi;
                FN(seq_bounds)(a, q, &lo, &hi);
                const int64_t row = a->cu ? q : bi; /* the initial / final state row */
                for (int64_t k = 0; k < nbk; k++) {
                    const int64_t c0 = c_lo + k * VL, rem = gi * dg + dg - c0;
                    const int nl = (int)(rem < VL ? rem : VL);
                    for (int64_t s = 0; s < n; s++)
                        for (int c = 0; c < VL; c++)
                            h[k * n + s][c] =
                                (a->h0 && c < nl) ? ((const R *)a->h0)[(row * d + c0 + c) * n + s] : (R)0;
                }
                for (int64_t t = lo; t < hi; t++) {
                    if (a->ckpt && t % a->K == 0) {
                        for (int64_t k = 0; k < nbk; k++) {
                            const int64_t c0 = c_lo + k * VL, rem = gi * dg + dg - c0;
                            const int nl = (int)(rem < VL ? rem : VL);
                            R *ck = (R *)a->ckpt + ((bi * d + c0) * nck + t / a->K) * n;
                            for (int c = 0; c < nl; c++)
                                for (int64_t s = 0; s < n; s++) ck[c * nck * n + s] = h[k * n + s][c];
                        }
                    }
                    for (int64_t s = 0; s < n; s++) {
                        BC[s] = Bp[s * a->sB[2] + t * a->sB[3]];
                        BC[n + s] = Cp[s * a->sC[2] + t * a->sC[3]];
                    }
                    for (int64_t k = 0; k < nbk; k++) {
                        const int64_t off = k * VL, rem = gi * dg + dg - (c_lo + off);
                        const int nl = (int)(rem < VL ? rem : VL);
                        SL_VEC uv = FN(vload)(up + off * a->su[1] + t * a->su[2], a->su[1], nl);
                        SL_VEC dtv = FN(vload)(dp + off * a->sdt[1] + t * a->sdt[2], a->sdt[1], nl) + bv[k];
                        if (a->softplus) dtv = SL_VSOFTPLUS(dtv);
                        const SL_VEC duv = dtv * uv;
                        SL_VEC *restrict hk = h + k * n;
                        const SL_VEC *restrict Ak = Av + k * n;
                        /* two accumulators: the y sum is the only chain that crosses states */
                        SL_VEC y0 = Dv[k] * uv, y1 = (SL_VEC){};
                        int64_t s = 0;
                        for (; s + 1 < n; s += 2) {
                            SL_VEC h0 = SL_VEXP(dtv * Ak[s]) * hk[s] + duv * BC[s];
                            SL_VEC h1 = SL_VEXP(dtv * Ak[s + 1]) * hk[s + 1] + duv * BC[s + 1];
                            hk[s] = h0;
                            hk[s + 1] = h1;
                            y0 += h0 * BC[n + s];
                            y1 += h1 * BC[n + s + 1];
                        }
                        for (; s < n; s++) {
                            SL_VEC h0 = SL_VEXP(dtv * Ak[s]) * hk[s] + duv * BC[s];
                            hk[s] = h0;
                            y0 += h0 * BC[n + s];
                        }
                        SL_VEC yv = y0 + y1;
                        if (zp) {
                            SL_VEC zv = FN(vload)(zp + off * a->sz[1] + t * a->sz[2], a->sz[1], nl);
                            yv *= zv * SL_VSIGMOID(zv);
                        }
                        FN(vstore)(yp + off * a->sy[1] + t * a->sy[2], a->sy[1], nl, yv);
                    }
                }
                if (a->hT) {
                    for (int64_t k = 0; k < nbk; k++) {
                        const int64_t c0 = c_lo + k * VL, rem = gi * dg + dg - c0;
                        const int nl = (int)(rem < VL ? rem : VL);
                        R *hT = (R *)a->hT + (row * d + c0) * n;
                        for (int c = 0; c < nl; c++)
                            for (int64_t s = 0; s < n; s++) hT[c * n + s] = h[k * n + s][c];
                    }
                }
            }
        }
        free(Av);
        free(h);
        free(Dv);
        free(bv);
        free(BC);
    }
}

static inline R FN(hsum)(SL_VEC v) {
    R s = 0;
    for (int c = 0; c < VL; c++) s += v[c];
    return s;
}

SL_EXPORT void FN(sl_scan_bwd)(const sl_scan_args *a, int nthreads) {
    const int64_t d = a->d, n = a->n, g = a->g, l = a->l, K = a->K, dg = d / g, nb = (dg + VL - 1) / VL;
    const int64_t nseq = a->cu ? a->nseq : 1, nck = (l + K - 1) / K, P = a->P < nb ? a->P : nb;
    const int64_t ntask = a->b * g * P;
    /* Tasks and memory order as in the forward: a task owns a slice of channel blocks of one (batch row,
     * group); it walks the K-position chunks newest first and, inside a chunk, its blocks one by one (the
     * chunk's rows of u / delta / z / dy are reused from cache by every block). */
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t maxb = (nb + P - 1) / P;
        SL_VEC *Av = aligned_alloc(64, (size_t)(maxb * n) * sizeof(SL_VEC));
        SL_VEC *mu = aligned_alloc(64, (size_t)(maxb * n) * sizeof(SL_VEC)); /* dL/dh after the position */
        SL_VEC *gAv = aligned_alloc(64, (size_t)(maxb * n) * sizeof(SL_VEC));
        SL_VEC *per = aligned_alloc(64, (size_t)(maxb * 4) * sizeof(SL_VEC)); /* D, bias, gD, gbias */
        SL_VEC *H = aligned_alloc(64, (size_t)((K + 1) * n) * sizeof(SL_VEC)); /* start state, then states */
        SL_VEC *AT = aligned_alloc(64, (size_t)(K * n) * sizeof(SL_VEC));      /* decays */
        SL_VEC *gBv = aligned_alloc(64, (size_t)(2 * K * n) * sizeof(SL_VEC)); /* lane partials of gB, gC */
        R *BC = aligned_alloc(64, (size_t)(2 * K * n) * sizeof(R) + 64);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntask; task++) {
            const int64_t bi = task / (g * P), gi = (task / P) % g, p = task % P;
            const int64_t cb_lo = nb * p / P, cb_hi = nb * (p + 1) / P, nbk = cb_hi - cb_lo;
            if (nbk == 0) continue;
            const int64_t c_lo = gi * dg + cb_lo * VL;
            const R *Bp = (const R *)a->B + bi * a->sB[0] + gi * a->sB[1];
            const R *Cp = (const R *)a->C + bi * a->sC[0] + gi * a->sC[1];
            R *gBp = (R *)a->gB + ((p * a->b + bi) * g + gi) * n * l;
            R *gCp = (R *)a->gC + ((p * a->b + bi) * g + gi) * n * l;
            SL_VEC *gCv = gBv + K * n;
            for (int64_t kb = 0; kb < nbk; kb++) {
                const int64_t c0 = c_lo + kb * VL, rem = gi * dg + dg - c0;
                const int nl = (int)(rem < VL ? rem : VL);
                R Dt[VL], bt[VL];
                FN(load_block)(a, c0, nl, (R *)(Av + kb * n), Dt, bt);
                memcpy(per + 4 * kb, Dt, sizeof(SL_VEC));
                memcpy(per + 4 * kb + 1, bt, sizeof(SL_VEC));
                per[4 * kb + 2] = per[4 * kb + 3] = (SL_VEC){};
                for (int64_t s = 0; s < n; s++) gAv[kb * n + s] = (SL_VEC){};
            }
            for (int64_t q = nseq - 1; q >= 0; q--) {
                int64_t lo, hi;
                FN(seq_bounds)(a, q, &lo, &hi);
                const int64_t row = a->cu ? q : bi;
                for (int64_t kb = 0; kb < nbk; kb++) {
                    const int64_t c0 = c_lo + kb * VL, rem = gi * dg + dg - c0;
                    const int nl = (int)(rem < VL ? rem : VL);
                    for (int64_t s = 0; s < n; s++)
                        for (int c = 0; c < VL; c++)
                            mu[kb * n + s][c] =
                                (a->ghT && c < nl) ? ((const R *)a->ghT)[(row * d + c0 + c) * n + s] : (R)0;
                }
                for (int64_t k = hi > lo ? (hi - 1) / K : 0; hi > lo && k >= lo / K; k--) {
                    const int64_t t0 = k * K > lo ? k * K : lo, t1 = (k + 1) * K < hi ? (k + 1) * K : hi;
                    for (int64_t t = t0; t < t1; t++)
                        for (int64_t s = 0; s < n; s++) {
                            BC[(t - t0) * n + s] = Bp[s * a->sB[2] + t * a->sB[3]];
                            BC[(K + t - t0) * n + s] = Cp[s * a->sC[2] + t * a->sC[3]];
                        }
                    for (int64_t i = 0; i < 2 * K * n; i++) gBv[i] = (SL_VEC){};
                    for (int64_t kb = 0; kb < nbk; kb++) {
                        const int64_t off = kb * VL, c0 = c_lo + off, rem = gi * dg + dg - c0;
                        const int nl = (int)(rem < VL ? rem : VL);
                        const SL_VEC *Ak = Av + kb * n;
                        SL_VEC *mk = mu + kb * n, *gAk = gAv + kb * n;
                        const SL_VEC Dv = per[4 * kb], bv = per[4 * kb + 1];
                        SL_VEC gD = per[4 * kb + 2], gbias = per[4 * kb + 3];
                        /* the state before t0: the sequence's initial state, or the checkpoint */
                        for (int64_t s = 0; s < n; s++)
                            for (int c = 0; c < VL; c++) {
                                R v = 0;
                                if (c < nl) {
                                    if (t0 == lo)
                                        v = a->h0 ? ((const R *)a->h0)[(row * d + c0 + c) * n + s] : (R)0;
                                    else
                                        v = ((const R *)a->ckpt)[((bi * d + c0 + c) * nck + k) * n + s];
                                }
                                H[s][c] = v;
                            }
                        /* recompute the chunk's decays and states: H[(t - t0 + 1) * n + s] = h_t */
                        for (int64_t t = t0; t < t1; t++) {
                            const int64_t i = t - t0;
                            SL_VEC uv = FN(vload)((const R *)a->u + bi * a->su[0] + c0 * a->su[1] + t * a->su[2],
                                                  a->su[1], nl);
                            SL_VEC dtv = FN(vload)((const R *)a->dt + bi * a->sdt[0] + c0 * a->sdt[1] +
                                                       t * a->sdt[2],
                                                   a->sdt[1], nl) +
                                         bv;
                            if (a->softplus) dtv = SL_VSOFTPLUS(dtv);
                            const SL_VEC duv = dtv * uv;
                            const SL_VEC *hp = H + i * n;
                            SL_VEC *hc = H + (i + 1) * n, *at = AT + i * n;
                            const R *Bt = BC + i * n;
                            for (int64_t s = 0; s < n; s++) {
                                at[s] = SL_VEXP(dtv * Ak[s]);
                                hc[s] = at[s] * hp[s] + duv * Bt[s];
                            }
                        }
                        /* the adjoint, newest position first */
                        for (int64_t t = t1 - 1; t >= t0; t--) {
                            const int64_t i = t - t0;
                            SL_VEC uv = FN(vload)((const R *)a->u + bi * a->su[0] + c0 * a->su[1] + t * a->su[2],
                                                  a->su[1], nl);
                            SL_VEC raw = FN(vload)((const R *)a->dt + bi * a->sdt[0] + c0 * a->sdt[1] +
                                                       t * a->sdt[2],
                                                   a->sdt[1], nl) +
                                         bv;
                            SL_VEC dtv = a->softplus ? SL_VSOFTPLUS(raw) : raw;
                            SL_VEC gys = (SL_VEC){};
                            if (a->gy)
                                gys = FN(vload)((const R *)a->gy + bi * a->sgy[0] + c0 * a->sgy[1] + t * a->sgy[2],
                                                a->sgy[1], nl);
                            const SL_VEC *hc = H + (i + 1) * n, *hp = H + i * n, *at = AT + i * n;
                            const R *Bt = BC + i * n, *Ct = BC + (K + i) * n;
                            if (a->z) {
                                /* out = (ysc + D u) silu(z): recompute ysc for dL/dz */
                                SL_VEC zv = FN(vload)(
                                    (const R *)a->z + bi * a->sz[0] + c0 * a->sz[1] + t * a->sz[2], a->sz[1], nl);
                                SL_VEC ysc = Dv * uv;
                                for (int64_t s = 0; s < n; s++) ysc += hc[s] * Ct[s];
                                SL_VEC sg = SL_VSIGMOID(zv);
                                SL_VEC gz = gys * ysc * sg * (1 + zv * (1 - sg));
                                gys *= zv * sg;
                                if (a->gz)
                                    FN(vstore)((R *)a->gz + bi * a->sgz[0] + c0 * a->sgz[1] + t * a->sgz[2],
                                               a->sgz[1], nl, gz);
                            }
                            gD += gys * uv;
                            const SL_VEC duv = dtv * uv;
                            SL_VEC gdu = (SL_VEC){}, gdt = (SL_VEC){};
                            SL_VEC *gBt = gBv + i * n, *gCt = gCv + i * n;
                            for (int64_t s = 0; s < n; s++) {
                                SL_VEC m = mk[s] + Ct[s] * gys;
                                gCt[s] += gys * hc[s];
                                SL_VEC X = m * at[s] * hp[s];
                                gdt += X * Ak[s];
                                gAk[s] += X * dtv;
                                gBt[s] += m * duv;
                                gdu += m * Bt[s];
                                mk[s] = m * at[s];
                            }
                            gdt += gdu * uv;
                            if (a->softplus) {
                                SL_VEC sg = SL_VSIGMOID(raw);
                                for (int c = 0; c < VL; c++) gdt[c] = raw[c] > 20 ? gdt[c] : gdt[c] * sg[c];
                            }
                            gbias += gdt;
                            FN(vstore)((R *)a->gu + bi * a->sgu[0] + c0 * a->sgu[1] + t * a->sgu[2], a->sgu[1], nl,
                                       gdu * dtv + gys * Dv);
                            FN(vstore)((R *)a->gdt + bi * a->sgdt[0] + c0 * a->sgdt[1] + t * a->sgdt[2],
                                       a->sgdt[1], nl, gdt);
                        }
                        per[4 * kb + 2] = gD;
                        per[4 * kb + 3] = gbias;
                    }
                    for (int64_t t = t0; t < t1; t++)
                        for (int64_t s = 0; s < n; s++) {
                            gBp[s * l + t] += FN(hsum)(gBv[(t - t0) * n + s]);
                            gCp[s * l + t] += FN(hsum)(gCv[(t - t0) * n + s]);
                        }
                }
                if (a->gh0) {
                    for (int64_t kb = 0; kb < nbk; kb++) {
                        const int64_t c0 = c_lo + kb * VL, rem = gi * dg + dg - c0;
                        const int nl = (int)(rem < VL ? rem : VL);
                        R *gh0 = (R *)a->gh0 + (row * d + c0) * n;
                        for (int c = 0; c < nl; c++)
                            for (int64_t s = 0; s < n; s++) gh0[c * n + s] = mu[kb * n + s][c];
                    }
                }
            }
            /* per-row partials (b, d, n) / (b, d): summed over the batch in Python */
            for (int64_t kb = 0; kb < nbk; kb++) {
                const int64_t c0 = c_lo + kb * VL, rem = gi * dg + dg - c0;
                const int nl = (int)(rem < VL ? rem : VL);
                R *gA = (R *)a->gA + (bi * d + c0) * n;
                for (int c = 0; c < nl; c++) {
                    for (int64_t s = 0; s < n; s++) gA[c * n + s] = gAv[kb * n + s][c];
                    if (a->gD) ((R *)a->gD)[bi * d + c0 + c] = per[4 * kb + 2][c];
                    if (a->gdbias) ((R *)a->gdbias)[bi * d + c0 + c] = per[4 * kb + 3][c];
                }
            }
        }
        free(Av);
        free(mu);
        free(gAv);
        free(per);
        free(H);
        free(AT);
        free(gBv);
        free(BC);
    }
}

/* One decode step for every (batch row, channel): no temporaries, one call. Threads only when the step is big
 * enough to pay for waking them. */
SL_EXPORT void FN(sl_scan_step)(const sl_step_args *a, int nthreads) {
    const int64_t b = a->b, d = a->d, n = a->n, dg = d / a->g;
    const int nt = b * d * n >= (1 << 16) ? nthreads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < b * d; i++) {
        const int64_t bi = i / d, c = i % d, gi = c / dg;
        const R *st = (const R *)a->state + bi * a->sstate[0] + c * a->sstate[1];
        const R *Bp = (const R *)a->B + bi * a->sB[0] + gi * a->sB[1];
        const R *Cp = (const R *)a->C + bi * a->sC[0] + gi * a->sC[1];
        const R *A = (const R *)a->A + c * a->sA[0];
        R *ns = (R *)a->new_state + bi * a->snew[0] + c * a->snew[1];
        R xv = ((const R *)a->x)[bi * a->sx[0] + c * a->sx[1]];
        R dt = ((const R *)a->dt)[bi * a->sdt[0] + c * a->sdt[1]];
        if (a->dbias) dt += ((const R *)a->dbias)[c];
        if (a->softplus) dt = SL_SOFTPLUS(dt);
        const R du = dt * xv;
        R y = 0;
#pragma omp simd reduction(+ : y)
        for (int64_t s = 0; s < n; s++) {
            R hv = SL_EXP(dt * A[s * a->sA[1]]) * st[s * a->sstate[2]] + du * Bp[s * a->sB[2]];
            ns[s * a->snew[2]] = hv;
            y += hv * Cp[s * a->sC[2]];
        }
        if (a->D) y += ((const R *)a->D)[c] * xv;
        if (a->z) {
            R zv = ((const R *)a->z)[bi * a->sz[0] + c * a->sz[1]];
            y *= zv * SL_SIGMOID(zv);
        }
        ((R *)a->y)[bi * a->sy[0] + c * a->sy[1]] = y;
    }
}

#undef R
#undef VL
#undef FN
#endif
