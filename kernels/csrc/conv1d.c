/* Causal depthwise conv1d on the CPU: forward, backward and the one-step update (kernels/conv1d/native_ops.py).
 *
 *   full = [initial_state (w - 1 positions, or zeros), x]      per (batch, channel)
 *   y_t  = act(bias + sum_k weight[k] full[t + k])              act: identity or silu
 *
 * A task owns a slice of consecutive channel blocks (VL channels, one machine vector) of one batch row and walks
 * the positions, at each position every block of the slice: in the layout a Mamba mixer passes (the transpose of
 * a contiguous (b, l, d), stride 1 along channels) each position reads one contiguous run, and the w - 1 previous
 * positions it needs are still in L1. Inputs come with element strides, so the standard (b, d, l) layout is read
 * in place too.
 *
 * Backward, with g = dL/dy * act'(pre) (pre recomputed):
 *   dL/dfull[q] = sum_k weight[k] g[q - k] (+ dL/dfinal[q - l] for the last w - 1 positions, the final state),
 *   dL/dweight[k] = sum_t g[t] full[t + k],  dL/dbias = sum_t g[t];
 * walked over q = 0 .. l + w - 2 with the last w values of g in a ring per block. dL/dfull splits into the
 * gradients of initial_state (q < w - 1) and x. Weight / bias gradients are per batch row (summed in Python).
 *
 * The body is written once and instantiated for float and double by including this file twice.
 */
#ifndef SL_CONV_INSTANCE
#include <stdlib.h>

#include "seqlab_native.h"

/* mirrored by ctypes in native_ops.py (same order); strides in elements */
typedef struct {
    int64_t b, d, l, w, silu;
    int64_t sx[3], sy[3], sgy[3], sgx[3], sinit[3];
    const void *x, *weight, *bias, *init;
    void *y;
    const void *gy, *gfinal; /* gfinal: (b, d, w - 1) contiguous or NULL */
    void *gx, *gw, *gb, *ginit; /* gw (b, d, w), gb (b, d), ginit (b, d, w - 1): contiguous */
} sl_conv_args;

typedef struct {
    int64_t b, d, w, silu;
    int64_t sx[2], sstate[3], sy[2], snew[3];
    const void *x, *state, *weight, *bias;
    void *y, *new_state;
} sl_conv_step_args;

typedef double sl_vd __attribute__((vector_size(SL_VBYTES)));
static inline sl_vd sl_vsigmoid_d(sl_vd x) {
    for (int c = 0; c < SL_VBYTES / 8; c++) x[c] = sl_sigmoid_d(x[c]);
    return x;
}

#define SL_CAT_(a, b) a##b
#define SL_CAT(a, b) SL_CAT_(a, b)

#define SL_CONV_INSTANCE
#define SL_REAL float
#define SL_SFX _f
#define SL_VL (SL_VBYTES / 4)
#define SL_VEC sl_vf
#define SL_VSIGMOID sl_vsigmoid_f
#define SL_SIGMOID(x) sl_fast_sigmoid_f(x)
#include "conv1d.c"
#undef SL_REAL
#undef SL_SFX
#undef SL_VL
#undef SL_VEC
#undef SL_VSIGMOID
#undef SL_SIGMOID

#define SL_REAL double
#define SL_SIGMOID(x) sl_sigmoid_d(x)
#define SL_SFX _d
#define SL_VL (SL_VBYTES / 8)
#define SL_VEC sl_vd
#define SL_VSIGMOID sl_vsigmoid_d
#include "conv1d.c"

#else /* the body, once per dtype ---------------------------------------------------------------------------- */

#define R SL_REAL
#define VL SL_VL
#define FN(name) SL_CAT(name, SL_SFX)

SL_DEFINE_LANE_IO(FN(cv_load), FN(cv_store))

/* full[q] for the lanes of the block at channel c0: the initial state (or 0) for q < w - 1, else x */
static inline SL_VEC FN(cv_full)(const sl_conv_args *a, int64_t bi, int64_t c0, int nl, int64_t q) {
    const int64_t h = a->w - 1;
    if (q >= h) {
        const R *x = (const R *)a->x + bi * a->sx[0] + c0 * a->sx[1] + (q - h) * a->sx[2];
        return FN(cv_load)(x, a->sx[1], nl);
    }
    if (!a->init) return (SL_VEC){};
    const R *s = (const R *)a->init + bi * a->sinit[0] + c0 * a->sinit[1] + q * a->sinit[2];
    return FN(cv_load)(s, a->sinit[1], nl);
}

/* the block's taps and bias as vectors */
static void FN(cv_taps)(const sl_conv_args *a, int64_t c0, int nl, SL_VEC *W, SL_VEC *bv) {
    const R *wt = (const R *)a->weight;
    for (int64_t k = 0; k < a->w; k++) {
        R tmp[VL];
        for (int c = 0; c < VL; c++) tmp[c] = c < nl ? wt[(c0 + c) * a->w + k] : (R)0;
        memcpy(W + k, tmp, sizeof(SL_VEC));
    }
    R tmp[VL];
    for (int c = 0; c < VL; c++) tmp[c] = (a->bias && c < nl) ? ((const R *)a->bias)[c0 + c] : (R)0;
    memcpy(bv, tmp, sizeof(SL_VEC));
}

static inline void FN(cv_plan)(const sl_conv_args *a, int nthreads, int64_t *nb, int64_t *P) {
    *nb = (a->d + VL - 1) / VL;
    int64_t p = (2 * nthreads + a->b - 1) / a->b;
    *P = p < 1 ? 1 : (p > *nb ? *nb : p);
}

/* Positions contiguous (the standard (b, d, l) layout): one channel at a time, the loop over positions
 * vectorised by the compiler. Reading across channels there would gather every lane from another page. */
static void FN(conv_fwd_rows)(const sl_conv_args *a, int nthreads) {
    const int64_t d = a->d, l = a->l, w = a->w, h = w - 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < a->b * d; i++) {
        const int64_t bi = i / d, c = i % d;
        const R *restrict x = (const R *)a->x + bi * a->sx[0] + c * a->sx[1];
        R *restrict y = (R *)a->y + bi * a->sy[0] + c * a->sy[1];
        const R *wt = (const R *)a->weight + c * w;
        const R bias = a->bias ? ((const R *)a->bias)[c] : (R)0;
        R wk[64];
        for (int64_t j = 0; j < w; j++) wk[j] = wt[j];
        const int64_t head = h < l ? h : l;
        for (int64_t t = 0; t < head; t++) { /* taps reaching back into the initial state */
            R acc = bias;
            for (int64_t j = 0; j < w; j++) {
                const int64_t q = t + j; /* index into [initial_state, x] */
                R v = q >= h ? x[q - h] : (a->init ? ((const R *)a->init)[bi * a->sinit[0] + c * a->sinit[1] +
                                                                          q * a->sinit[2]]
                                                   : (R)0);
                acc += wk[j] * v;
            }
            y[t] = a->silu ? acc * SL_SIGMOID(acc) : acc;
        }
        /* taps outer, positions inner (a vector loop for any width), in L1-sized pieces */
        for (int64_t t0 = head; t0 < l; t0 += 512) {
            const int64_t m = l - t0 < 512 ? l - t0 : 512;
            R acc[512];
            for (int64_t t = 0; t < m; t++) acc[t] = bias;
            for (int64_t j = 0; j < w; j++) {
                const R wj = wk[j], *restrict xs = x + t0 + j - h;
#pragma omp simd
                for (int64_t t = 0; t < m; t++) acc[t] += wj * xs[t];
            }
            if (a->silu) {
#pragma omp simd
                for (int64_t t = 0; t < m; t++) y[t0 + t] = acc[t] * SL_SIGMOID(acc[t]);
            } else {
                for (int64_t t = 0; t < m; t++) y[t0 + t] = acc[t];
            }
        }
    }
}

SL_EXPORT void FN(sl_conv_fwd)(const sl_conv_args *a, int nthreads) {
    if (a->sx[2] == 1 && a->sy[2] == 1 && a->d > 1) {
        FN(conv_fwd_rows)(a, nthreads);
        return;
    }
    int64_t nb, P;
    FN(cv_plan)(a, nthreads, &nb, &P);
    const int64_t w = a->w, ntask = a->b * P;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t maxb = (nb + P - 1) / P;
        SL_VEC *W = aligned_alloc(64, (size_t)(maxb * (2 * w + 1)) * sizeof(SL_VEC)); /* taps + bias, window */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntask; task++) {
            const int64_t bi = task / P, p = task % P;
            const int64_t cb_lo = nb * p / P, cb_hi = nb * (p + 1) / P;
            for (int64_t k = cb_lo; k < cb_hi; k++) {
                const int64_t c0 = k * VL;
                const int nl = (int)(a->d - c0 < VL ? a->d - c0 : VL);
                FN(cv_taps)(a, c0, nl, W + (k - cb_lo) * (w + 1), W + (k - cb_lo) * (w + 1) + w);
            }
            /* the last w - 1 inputs of every block (its window), carried from position to position */
            SL_VEC *win = W + maxb * (w + 1);
            for (int64_t k = cb_lo; k < cb_hi; k++) {
                const int64_t c0 = k * VL;
                const int nl = (int)(a->d - c0 < VL ? a->d - c0 : VL);
                for (int64_t j = 0; j < w - 1; j++) win[(k - cb_lo) * w + j] = FN(cv_full)(a, bi, c0, nl, j);
            }
            const R *xb = (const R *)a->x + bi * a->sx[0];
            R *yb = (R *)a->y + bi * a->sy[0];
            for (int64_t t = 0; t < a->l; t++) {
                for (int64_t k = cb_lo; k < cb_hi; k++) {
                    const int64_t c0 = k * VL;
                    const int nl = (int)(a->d - c0 < VL ? a->d - c0 : VL);
                    const SL_VEC *Wk = W + (k - cb_lo) * (w + 1);
                    SL_VEC *wn = win + (k - cb_lo) * w;
                    wn[w - 1] = FN(cv_load)(xb + c0 * a->sx[1] + t * a->sx[2], a->sx[1], nl);
                    SL_VEC acc = Wk[w];
                    for (int64_t j = 0; j < w; j++) acc += Wk[j] * wn[j];
                    for (int64_t j = 0; j + 1 < w; j++) wn[j] = wn[j + 1];
                    if (a->silu) acc *= SL_VSIGMOID(acc);
                    FN(cv_store)(yb + c0 * a->sy[1] + t * a->sy[2], a->sy[1], nl, acc);
                }
            }
        }
        free(W);
    }
}

SL_EXPORT void FN(sl_conv_bwd)(const sl_conv_args *a, int nthreads) {
    int64_t nb, P;
    FN(cv_plan)(a, nthreads, &nb, &P);
    const int64_t w = a->w, h = w - 1, l = a->l, d = a->d, ntask = a->b * P;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t maxb = (nb + P - 1) / P;
        SL_VEC *W = aligned_alloc(64, (size_t)(maxb * (w + 1)) * sizeof(SL_VEC));
        SL_VEC *ring = aligned_alloc(64, (size_t)(maxb * w) * sizeof(SL_VEC));  /* g[q - w + 1 .. q] */
        SL_VEC *gw = aligned_alloc(64, (size_t)(maxb * (w + 1)) * sizeof(SL_VEC)); /* taps, then bias */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntask; task++) {
            const int64_t bi = task / P, p = task % P;
            const int64_t cb_lo = nb * p / P, cb_hi = nb * (p + 1) / P, nbk = cb_hi - cb_lo;
            for (int64_t k = cb_lo; k < cb_hi; k++) {
                const int64_t c0 = k * VL;
                const int nl = (int)(d - c0 < VL ? d - c0 : VL);
                FN(cv_taps)(a, c0, nl, W + (k - cb_lo) * (w + 1), W + (k - cb_lo) * (w + 1) + w);
            }
            for (int64_t i = 0; i < nbk * w; i++) ring[i] = (SL_VEC){};
            for (int64_t i = 0; i < nbk * (w + 1); i++) gw[i] = (SL_VEC){};
            for (int64_t q = 0; q < l + h; q++) {
                for (int64_t k = cb_lo; k < cb_hi; k++) {
                    const int64_t c0 = k * VL;
                    const int nl = (int)(d - c0 < VL ? d - c0 : VL);
                    const SL_VEC *Wk = W + (k - cb_lo) * (w + 1);
                    SL_VEC *rk = ring + (k - cb_lo) * w, *gk = gw + (k - cb_lo) * (w + 1);
                    SL_VEC gt = (SL_VEC){};
                    if (q < l) { /* g at position q, and its weight / bias terms */
                        SL_VEC win[64];
                        SL_VEC pre = Wk[w];
                        for (int64_t j = 0; j < w; j++) {
                            win[j] = FN(cv_full)(a, bi, c0, nl, q + j);
                            pre += Wk[j] * win[j];
                        }
                        if (a->gy)
                            gt = FN(cv_load)((const R *)a->gy + bi * a->sgy[0] + c0 * a->sgy[1] + q * a->sgy[2],
                                             a->sgy[1], nl);
                        if (a->silu) {
                            SL_VEC sg = SL_VSIGMOID(pre);
                            gt *= sg * (1 + pre * (1 - sg));
                        }
                        for (int64_t j = 0; j < w; j++) gk[j] += gt * win[j];
                        gk[w] += gt;
                    }
                    /* shift the ring: rk[j] = g[q - j] */
                    for (int64_t j = w - 1; j > 0; j--) rk[j] = rk[j - 1];
                    rk[0] = gt;
                    SL_VEC gf = (SL_VEC){};
                    for (int64_t j = 0; j < w; j++)
                        if (q - j >= 0 && q - j < l) gf += Wk[j] * rk[j];
                    if (q >= l && a->gfinal) {
                        R tmp[VL];
                        for (int c = 0; c < VL; c++)
                            tmp[c] = c < nl ? ((const R *)a->gfinal)[(bi * d + c0 + c) * h + (q - l)] : (R)0;
                        SL_VEC v;
                        memcpy(&v, tmp, sizeof v);
                        gf += v;
                    }
                    if (q < h) {
                        if (a->ginit)
                            for (int c = 0; c < nl; c++) ((R *)a->ginit)[(bi * d + c0 + c) * h + q] = gf[c];
                    } else {
                        R *gx = (R *)a->gx + bi * a->sgx[0] + c0 * a->sgx[1] + (q - h) * a->sgx[2];
                        FN(cv_store)(gx, a->sgx[1], nl, gf);
                    }
                }
            }
            for (int64_t k = cb_lo; k < cb_hi; k++) {
                const int64_t c0 = k * VL;
                const int nl = (int)(d - c0 < VL ? d - c0 : VL);
                const SL_VEC *gk = gw + (k - cb_lo) * (w + 1);
                for (int c = 0; c < nl; c++) {
                    for (int64_t j = 0; j < w; j++) ((R *)a->gw)[(bi * d + c0 + c) * w + j] = gk[j][c];
                    ((R *)a->gb)[bi * d + c0 + c] = gk[w][c];
                }
            }
        }
        free(W);
        free(ring);
        free(gw);
    }
}

/* One decode step for every (batch row, channel); threads only for large steps. */
SL_EXPORT void FN(sl_conv_step)(const sl_conv_step_args *a, int nthreads) {
    const int64_t b = a->b, d = a->d, w = a->w;
    const int nt = b * d * w >= (1 << 16) ? nthreads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < b * d; i++) {
        const int64_t bi = i / d, c = i % d;
        const R *st = (const R *)a->state + bi * a->sstate[0] + c * a->sstate[1];
        const R *wt = (const R *)a->weight + c * w;
        R *ns = (R *)a->new_state + bi * a->snew[0] + c * a->snew[1];
        const R xv = ((const R *)a->x)[bi * a->sx[0] + c * a->sx[1]];
        R acc = a->bias ? ((const R *)a->bias)[c] : (R)0;
        for (int64_t k = 0; k < w - 1; k++) acc += wt[k] * st[k * a->sstate[2]];
        acc += wt[w - 1] * xv;
        for (int64_t k = 0; k + 1 < w - 1; k++) ns[k * a->snew[2]] = st[(k + 1) * a->sstate[2]];
        if (w > 1) ns[(w - 2) * a->snew[2]] = xv;
        if (a->silu) acc = acc / (1 + exp(-(double)acc));
        ((R *)a->y)[bi * a->sy[0] + c * a->sy[1]] = acc;
    }
}

#undef R
#undef VL
#undef FN
#endif
