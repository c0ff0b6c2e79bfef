/* Mamba-2 SSD scan on the CPU: a sequential walk per (sequence, head), forward, backward and one decode step.
 *
 * Per head hh (reading group hh / (h / g) of B and C), with u_t = softplus?(dt_t + dt_bias) and a_t = exp(u_t A):
 *
 *     S_t (p, n) = a_t S_{t-1} + u_t outer(x_t, B_t)
 *     y_t (p)    = (S_t C_t + D x_t) * silu(z_t)        (the gate only when z is given)
 *
 * Why sequential and not chunked: per step and head the work is 2 p n FMAs on a p x n state (8 KiB in float32 at
 * p = 32, n = 64) that stays in L1, with a single scalar exp; the chunked form does several times the arithmetic
 * (its (q, q) matrices) and streams its intermediates through memory. The walk is bound by the FMA rate.
 *
 * Layouts. The forward keeps the state transposed, (n, p): the update of row nn is a vector over p, and y_t is
 * accumulated as sum_nn C_t[nn] S[nn, :] in vector registers, with no horizontal sum per output element. The
 * backward keeps the state and its adjoint as (p, n): the gradients of B_t and C_t (length n) then accumulate
 * as vectors over the p rows, and only dx needs one horizontal sum per row (p of them, against 2 n in (n, p)).
 *
 * Backward memory: the forward (when a gradient is wanted) stores the state entering every block of K steps
 * ("checkpoints", (n, p) layout); the backward walks the blocks newest first, recomputes the K + 1 states of a
 * block into a per-thread buffer sized to stay in L2, and runs the adjoint recurrence backward through them:
 *
 *     G_t  = a_{t+1} G_{t+1} + outer(gy'_t, C_t)        (G: dLoss/dS_t, seeded with the final state's gradient)
 *     dx_t = D gy'_t + u_t G_t B_t        dB_t = u_t G_t^T x_t        dC_t = S_t^T gy'_t
 *     du_t = x_t . G_t B_t + A a_t <G_t, S_{t-1}>        dA += u_t a_t <G_t, S_{t-1}>
 *
 * (gy' the gradient of the pre-gate output); the initial state's gradient is a_1 G_1. The vector path computes
 * dC_t during the recompute, while S_t is in registers, so that the adjoint streams only S_{t-1}; the walk goes
 * backward through memory, so it prefetches the rows it is about to read.
 *
 * Work is split over (segment, head) tasks with OpenMP. A segment is one sequence: a batch row, or one packed
 * sequence of a cu_seqlens row; the table seg[4 * s + ...] = (row, start, end, first checkpoint index). Heads of
 * one group share B and C, so their dB/dC contributions go to R separate buffers (R = heads per group, indexed
 * by the head, or R = threads, indexed by the thread), summed by the caller: no two threads ever add to the same
 * element.
 *
 * Element strides of the strided inputs, st[15]: x (b, l, h), dt (b, l, h), B (b, l, g), C (b, l, g),
 * z (b, l, h); the last dim of x, B, C, z is contiguous. Outputs and saved tensors are contiguous.
 *
 * The template part of this file is compiled twice (float and double) by including the file itself (by name, not
 * __FILE__, so that a build from any directory finds it).
 */
#ifndef SSD_TEMPLATE

#include <stdlib.h>

#include "seqlab_native.h"

/* The vector width of the fast paths: a wider type than the hardware's is lowered through memory (slow). */
#ifdef __AVX512F__
#define SSD_VBYTES 64
#else
#define SSD_VBYTES 32
#endif

SL_EXPORT int ssd_abi(void) { return SEQLAB_NATIVE_ABI; }

static void *ssd_alloc(size_t bytes) {
    /* 64-byte aligned so that rows of the state start on a cache line (and a full AVX-512 vector) */
    size_t rounded = (bytes + 63) & ~(size_t)63;
    return aligned_alloc(64, rounded ? rounded : 64);
}

#define SSD_TEMPLATE
#define real float
#define SFX(name) name##_f
#define EXP expf
#define SOFTPLUS sl_softplus_f
#define SIGMOID sl_sigmoid_f
#include "ssd.c" /* this file again: the template part below, for this type */
#undef real
#undef SFX
#undef EXP
#undef SOFTPLUS
#undef SIGMOID
#undef VL
#undef SSD_FWD_VEC
#undef SSD_NB

#define real double
#define SFX(name) name##_d
#define EXP exp
#define SOFTPLUS sl_softplus_d
#define SIGMOID sl_sigmoid_d
#include "ssd.c" /* this file again: the template part below, for this type */
#undef real
#undef SFX
#undef EXP
#undef SOFTPLUS
#undef SIGMOID

#else /* SSD_TEMPLATE: the float/double body */

/* Fast paths written with GCC/clang vector extensions, one hardware register per vector: 64 bytes with
 * AVX-512, else 32 (AVX2; SSE splits them in two). With the vector count a compile-time constant the accumulators
 * stay in registers; the plain loops keep them in memory, where each add waits for a store to be forwarded
 * (several times slower). Unaligned loads (inputs) go through a type with the element's alignment. */
typedef real SFX(vec) __attribute__((vector_size(SSD_VBYTES)));
typedef real SFX(uvec) __attribute__((vector_size(SSD_VBYTES), aligned(sizeof(real))));
#define VL ((int64_t)(SSD_VBYTES / sizeof(real)))

/* a . b summed in an order fixed by n alone. A vectorised reduction (omp simd reduction) may peel elements until
 * a pointer is aligned, and then sums in an order that depends on the address: the same numbers passed at another
 * offset (a view into a projection, or a copy) would round differently, and decoding with and without a hook
 * that copies its input would not give identical logits. */
static inline real SFX(dot)(const real *restrict a, const real *restrict b, int64_t n) {
    SFX(vec) acc = {0};
    int64_t j = 0;
    for (; j + VL <= n; j += VL) acc += *(const SFX(uvec) *)(a + j) * *(const SFX(uvec) *)(b + j);
    real s = 0;
    for (int64_t e = 0; e < VL; e++) s += acc[e];
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* Forward walk of one segment and head when p = PV * VL: S is (n, p), rows aligned. */
static inline __attribute__((always_inline)) void SFX(fwd_walk_vec)(
    const int PV, int64_t p, int64_t n, int64_t row, int64_t t0, int64_t t1, int64_t hh, int64_t grp, int64_t h,
    int64_t l, const real *restrict x, const real *restrict dt, real Ah, const real *restrict B,
    const real *restrict C, const real *restrict Dh, const real *restrict z, real bias, int softplus,
    const int64_t *restrict st, real *restrict S, real *restrict y, real *restrict yraw, real *restrict ckpt,
    int64_t K) {
    for (int64_t t = t0; t < t1; t++) {
        if (ckpt && (t - t0) % K == 0) memcpy(ckpt + ((t - t0) / K) * h * n * p, S, sizeof(real) * n * p);
        real u = dt[row * st[3] + t * st[4] + hh * st[5]] + bias;
        if (softplus) u = SOFTPLUS(u);
        const real a = EXP(u * Ah);
        const real *restrict xt = x + row * st[0] + t * st[1] + hh * st[2];
        const real *restrict Bt = B + row * st[6] + t * st[7] + grp * st[8];
        const real *restrict Ct = C + row * st[9] + t * st[10] + grp * st[11];
        SFX(vec) xu[PV], acc[PV];
        for (int v = 0; v < PV; v++) {
            xu[v] = u * *(const SFX(uvec) *)(xt + v * VL);
            acc[v] = (SFX(vec)){0};
        }
        for (int64_t j = 0; j < n; j++) {
            const real bj = Bt[j], cj = Ct[j];
            SFX(vec) *restrict s = (SFX(vec) *)(S + j * p);
            for (int v = 0; v < PV; v++) {
                const SFX(vec) val = a * s[v] + bj * xu[v];
                s[v] = val;
                acc[v] += cj * val;
            }
        }
        real *restrict yt = y + ((row * l + t) * h + hh) * p;
        /* whole-vector stores: as scalar stores into the fresh output, this loop was a third of the walk */
        if (Dh)
            for (int v = 0; v < PV; v++)
                acc[v] += *(const SFX(uvec) *)(Dh + v * VL) * *(const SFX(uvec) *)(xt + v * VL);
        if (yraw)
            for (int v = 0; v < PV; v++) *(SFX(uvec) *)(yraw + ((row * l + t) * h + hh) * p + v * VL) = acc[v];
        if (z) {
            const real *restrict zt = z + row * st[12] + t * st[13] + hh * st[14];
            real *restrict accs = (real *)acc;
            for (int64_t i = 0; i < p; i++) accs[i] *= zt[i] * SIGMOID(zt[i]);
        }
        for (int v = 0; v < PV; v++) *(SFX(uvec) *)(yt + v * VL) = acc[v];
    }
}


/* One segment of one head, forward. S: (n, p) scratch. Generic in p and n; the always_inline lets the callers
 * below hand in constant p and n so that the inner loops compile to a fixed number of vector registers. */
static inline __attribute__((always_inline)) void SFX(fwd_walk)(
    const int64_t p, const int64_t n, int64_t row, int64_t t0, int64_t t1, int64_t hh, int64_t grp, int64_t h,
    int64_t l, const real *restrict x, const real *restrict dt, real Ah, const real *restrict B,
    const real *restrict C, const real *restrict Dh, const real *restrict z, real bias, int softplus,
    const int64_t *restrict st, real *restrict S, real *restrict y, real *restrict yraw, real *restrict ckpt,
    int64_t K) {
    real xu[p] __attribute__((aligned(64)));
    real acc[p] __attribute__((aligned(64)));
    for (int64_t t = t0; t < t1; t++) {
        if (ckpt && (t - t0) % K == 0) memcpy(ckpt + ((t - t0) / K) * h * n * p, S, sizeof(real) * n * p);
        real u = dt[row * st[3] + t * st[4] + hh * st[5]] + bias;
        if (softplus) u = SOFTPLUS(u);
        const real a = EXP(u * Ah);
        const real *restrict xt = x + row * st[0] + t * st[1] + hh * st[2];
        const real *restrict Bt = B + row * st[6] + t * st[7] + grp * st[8];
        const real *restrict Ct = C + row * st[9] + t * st[10] + grp * st[11];
#pragma omp simd
        for (int64_t i = 0; i < p; i++) {
            xu[i] = u * xt[i];
            acc[i] = 0;
        }
        for (int64_t j = 0; j < n; j++) {
            const real bj = Bt[j], cj = Ct[j];
            real *restrict s = S + j * p;
#pragma omp simd
            for (int64_t i = 0; i < p; i++) {
                const real v = a * s[i] + bj * xu[i];
                s[i] = v;
                acc[i] += cj * v;
            }
        }
        real *restrict yt = y + ((row * l + t) * h + hh) * p;
        real *restrict rt = yraw ? yraw + ((row * l + t) * h + hh) * p : NULL;
        const real *restrict zt = z ? z + row * st[12] + t * st[13] + hh * st[14] : NULL;
        for (int64_t i = 0; i < p; i++) {
            real v = acc[i] + (Dh ? Dh[i] * xt[i] : (real)0);
            if (rt) rt[i] = v;
            if (zt) v *= zt[i] * SIGMOID(zt[i]);
            yt[i] = v;
        }
    }
}

/* Forward over all (segment, head) tasks. init/final (nseg, h, p, n); y (and yraw, the pre-gate output, when
 * not NULL) contiguous (b, l, h, p); ckpt (when not NULL) (chunks, h, n, p): the state entering every block of
 * K steps of every segment. */
SL_EXPORT void SFX(ssd_fwd)(int64_t nseg, const int64_t *seg, int64_t l, int64_t h, int64_t p, int64_t g, int64_t n,
                            const real *x, const real *dt, const real *A, const real *B, const real *C,
                            const real *D, const real *z, const real *dt_bias, int softplus, const int64_t *st,
                            const real *init, real *y, real *yraw, real *final, real *ckpt, int64_t K,
                            int nthreads) {
    const int64_t hg = h / g, ntasks = nseg * h;
#pragma omp parallel num_threads(nthreads)
    {
        real *S = ssd_alloc(sizeof(real) * p * n);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntasks; task++) {
            const int64_t s = task / h, hh = task % h, grp = hh / hg;
            const int64_t row = seg[4 * s], t0 = seg[4 * s + 1], t1 = seg[4 * s + 2], c0 = seg[4 * s + 3];
            const real *h0 = init ? init + (s * h + hh) * p * n : NULL;
            for (int64_t i = 0; i < p; i++)
                for (int64_t j = 0; j < n; j++) S[j * p + i] = h0 ? h0[i * n + j] : (real)0;
            real *ck = ckpt ? ckpt + (c0 * h + hh) * n * p : NULL;
            const real *Dh = D ? D + hh * p : NULL;
            const real bias = dt_bias ? dt_bias[hh] : (real)0;
#define SSD_FWD_VEC(PV)                                                                                      \
    SFX(fwd_walk_vec)(PV, p, n, row, t0, t1, hh, grp, h, l, x, dt, A[hh], B, C, Dh, z, bias, softplus, st, S, y, \
                      yraw, ck, K)
            if (p == VL)
                SSD_FWD_VEC(1);
            else if (p == 2 * VL)
                SSD_FWD_VEC(2);
            else if (p == 4 * VL)
                SSD_FWD_VEC(4);
            else if (p == 8 * VL)
                SSD_FWD_VEC(8);
            else
                SFX(fwd_walk)(p, n, row, t0, t1, hh, grp, h, l, x, dt, A[hh], B, C, Dh, z, bias, softplus, st, S,
                              y, yraw, ck, K);
            real *hf = final + (s * h + hh) * p * n;
            for (int64_t i = 0; i < p; i++)
                for (int64_t j = 0; j < n; j++) hf[i * n + j] = S[j * p + i];
        }
        free(S);
    }
}

/* One block of the backward for one head: buf holds the m + 1 states S_{t0 - 1} .. S_{t0 + m - 1} in (p, n)
 * layout, G the adjoint (p, n) of the state after the block on entry and before it on exit. */
static inline __attribute__((always_inline)) void SFX(bwd_block)(
    const int64_t p, const int64_t n, int64_t row, int64_t t0, int64_t m, int64_t hh, int64_t grp, int64_t h,
    int64_t g, int64_t l, const real *restrict x, const real *restrict dt, real Ah, const real *restrict B,
    const real *restrict C, const real *restrict Dh, const real *restrict z, real bias, int softplus,
    const int64_t *restrict st, const real *restrict yraw, const real *restrict gy, real *restrict buf,
    real *restrict G, real *restrict uu, real *restrict aa, real *restrict gx, real *restrict gdt,
    real *restrict gz, real *restrict gB, real *restrict gC, real *restrict gA, real *restrict gDh,
    real *restrict gbias) {
    real gyr[p] __attribute__((aligned(64)));
    real gBa[n] __attribute__((aligned(64)));
    real gCa[n] __attribute__((aligned(64)));
    real dgs[n] __attribute__((aligned(64)));
    /* recompute the block's states */
    for (int64_t k = 0; k < m; k++) {
        const int64_t t = t0 + k;
        real u = dt[row * st[3] + t * st[4] + hh * st[5]] + bias;
        if (softplus) u = SOFTPLUS(u);
        const real a = EXP(u * Ah);
        uu[k] = u;
        aa[k] = a;
        const real *restrict xt = x + row * st[0] + t * st[1] + hh * st[2];
        const real *restrict Bt = B + row * st[6] + t * st[7] + grp * st[8];
        const real *restrict prev = buf + k * p * n;
        real *restrict next = buf + (k + 1) * p * n;
        for (int64_t i = 0; i < p; i++) {
            const real xi = u * xt[i];
#pragma omp simd
            for (int64_t j = 0; j < n; j++) next[i * n + j] = a * prev[i * n + j] + xi * Bt[j];
        }
    }
    /* the adjoint, newest step first */
    for (int64_t k = m - 1; k >= 0; k--) {
        const int64_t t = t0 + k;
        const real u = uu[k], a = aa[k];
        const real *restrict xt = x + row * st[0] + t * st[1] + hh * st[2];
        const real *restrict Bt = B + row * st[6] + t * st[7] + grp * st[8];
        const real *restrict Ct = C + row * st[9] + t * st[10] + grp * st[11];
        const real *restrict gyt = gy + ((row * l + t) * h + hh) * p;
        real *restrict gxt = gx + ((row * l + t) * h + hh) * p;
        if (z) {
            const real *restrict zt = z + row * st[12] + t * st[13] + hh * st[14];
            const real *restrict rt = yraw + ((row * l + t) * h + hh) * p;
            real *restrict gzt = gz + ((row * l + t) * h + hh) * p;
            for (int64_t i = 0; i < p; i++) {
                const real sg = SIGMOID(zt[i]);
                gzt[i] = gyt[i] * rt[i] * sg * (1 + zt[i] * (1 - sg));
                gyr[i] = gyt[i] * zt[i] * sg;
            }
        } else {
            for (int64_t i = 0; i < p; i++) gyr[i] = gyt[i];
        }
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            gBa[j] = 0;
            gCa[j] = 0;
            dgs[j] = 0;
        }
        const real *restrict Snow = buf + (k + 1) * p * n;
        const real *restrict Sprev = buf + k * p * n;
        real xgb = 0;
        for (int64_t i = 0; i < p; i++) {
            const real xi = xt[i], gi = gyr[i];
            real *restrict Gi = G + i * n;
            const real *restrict Si = Snow + i * n;
            const real *restrict Qi = Sprev + i * n;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) {
                const real gv = Gi[j] + gi * Ct[j];
                gBa[j] += xi * gv;
                gCa[j] += gi * Si[j];
                dgs[j] += gv * Qi[j];
                Gi[j] = gv;
            }
            const real r = SFX(dot)(Gi, Bt, n);
#pragma omp simd
            for (int64_t j = 0; j < n; j++) Gi[j] *= a;
            gxt[i] = (Dh ? Dh[i] * gi : (real)0) + u * r;
            xgb += xi * r;
            if (gDh) gDh[i] += gi * xi;
        }
        real *restrict gBt = gB + ((row * l + t) * g + grp) * n;
        real *restrict gCt = gC + ((row * l + t) * g + grp) * n;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            gBt[j] += u * gBa[j];
            gCt[j] += gCa[j];
        }
        real sgs = 0;
        for (int64_t j = 0; j < n; j++) sgs += dgs[j]; /* in order: not vectorised without reassociation */
        const real gu = xgb + Ah * a * sgs;
        *gA += u * a * sgs;
        real graw = gu;
        if (softplus) graw *= SIGMOID(dt[row * st[3] + t * st[4] + hh * st[5]] + bias);
        gdt[(row * l + t) * h + hh] = graw;
        *gbias += graw;
    }
}

/* Prefetch the cache lines of count elements from ptr (rw 1: about to be written). */
static inline void SFX(prefetch)(const real *ptr, int64_t count, int rw) {
    const char *c = (const char *)ptr;
    for (int64_t off = 0; off < count * (int64_t)sizeof(real); off += 64) {
        if (rw)
            __builtin_prefetch(c + off, 1, 3);
        else
            __builtin_prefetch(c + off, 0, 3);
    }
}

/* bwd_block when n is a multiple of SSD_NB vectors: the adjoint runs over column slabs of SSD_NB vectors, so
 * that the slab's dB, dC and <G, S_prev> accumulators, and B and C, stay in registers (16 of them with AVX2)
 * across the p rows. Each row's G_t . B_t is kept as a vector in rvec (p vectors) and summed across once. */
#define SSD_NB 2
static inline __attribute__((always_inline)) void SFX(bwd_block_vec)(
    int64_t p, int64_t n, int64_t row, int64_t t0, int64_t m, int64_t hh, int64_t grp, int64_t h, int64_t g,
    int64_t l, const real *restrict x, const real *restrict dt, real Ah, const real *restrict B,
    const real *restrict C, const real *restrict Dh, const real *restrict z, real bias, int softplus,
    const int64_t *restrict st, const real *restrict yraw, const real *restrict gy, real *restrict buf,
    real *restrict G, real *restrict uu, real *restrict aa, real *restrict gx, real *restrict gdt,
    real *restrict gz, real *restrict gB, real *restrict gC, real *restrict gA, real *restrict gDh,
    real *restrict gbias, SFX(vec) *restrict rvec, real *restrict gyr, int64_t ts, int64_t K) {
    for (int64_t k = 0; k < m; k++) {
        const int64_t t = t0 + k;
        real u = dt[row * st[3] + t * st[4] + hh * st[5]] + bias;
        if (softplus) u = SOFTPLUS(u);
        const real a = EXP(u * Ah);
        uu[k] = u;
        aa[k] = a;
        const real *restrict xt = x + row * st[0] + t * st[1] + hh * st[2];
        const real *restrict Bt = B + row * st[6] + t * st[7] + grp * st[8];
        /* The walk runs backward through memory, block by block, and its misses on the streamed rows were a
         * third of the time: ask now for what the adjoint of this step (C, gy, the dB/dC rows) and the
         * recompute of the block before (x, B) will read. */
        SFX(prefetch)(C + row * st[9] + t * st[10] + grp * st[11], n, 0);
        SFX(prefetch)(gy + ((row * l + t) * h + hh) * p, p, 0);
        SFX(prefetch)(gB + ((row * l + t) * g + grp) * n, n, 1);
        SFX(prefetch)(gC + ((row * l + t) * g + grp) * n, n, 1);
        if (t - K >= ts) {
            SFX(prefetch)(x + row * st[0] + (t - K) * st[1] + hh * st[2], p, 0);
            SFX(prefetch)(B + row * st[6] + (t - K) * st[7] + grp * st[8], n, 0);
        }
        /* the gradient of the pre-gate output of this step (and z's), kept for the adjoint below */
        const real *restrict gyt = gy + ((row * l + t) * h + hh) * p;
        real *restrict gyk = gyr + k * p;
        if (z) {
            const real *restrict zt = z + row * st[12] + t * st[13] + hh * st[14];
            const real *restrict rt = yraw + ((row * l + t) * h + hh) * p;
            real *restrict gzt = gz + ((row * l + t) * h + hh) * p;
            for (int64_t i = 0; i < p; i++) {
                const real sg = SIGMOID(zt[i]);
                gzt[i] = gyt[i] * rt[i] * sg * (1 + zt[i] * (1 - sg));
                gyk[i] = gyt[i] * zt[i] * sg;
            }
        } else {
            memcpy(gyk, gyt, sizeof(real) * p);
        }
        /* S_t from S_{t-1}, and dC_t = S_t^T gy'_t while S_t is in registers (the adjoint then reads only
         * S_{t-1}), over column slabs of SSD_NB vectors so that the slab's dC accumulators stay in registers */
        const real *restrict prev = buf + k * p * n;
        real *restrict next = buf + (k + 1) * p * n;
        real *restrict gCt = gC + ((row * l + t) * g + grp) * n;
        for (int64_t j0 = 0; j0 < n; j0 += SSD_NB * VL) {
            SFX(vec) Bv[SSD_NB], gCa[SSD_NB];
            for (int v = 0; v < SSD_NB; v++) {
                Bv[v] = *(const SFX(uvec) *)(Bt + j0 + v * VL);
                gCa[v] = (SFX(vec)){0};
            }
            for (int64_t i = 0; i < p; i++) {
                const real xi = u * xt[i], gi = gyk[i];
                const SFX(vec) *restrict pi = (const SFX(vec) *)(prev + i * n + j0);
                SFX(vec) *restrict ni = (SFX(vec) *)(next + i * n + j0);
                for (int v = 0; v < SSD_NB; v++) {
                    const SFX(vec) sv = a * pi[v] + xi * Bv[v];
                    ni[v] = sv;
                    gCa[v] += gi * sv;
                }
            }
            for (int v = 0; v < SSD_NB; v++) *(SFX(uvec) *)(gCt + j0 + v * VL) += gCa[v];
        }
    }
    for (int64_t k = m - 1; k >= 0; k--) {
        const int64_t t = t0 + k;
        const real u = uu[k], a = aa[k];
        const real *restrict xt = x + row * st[0] + t * st[1] + hh * st[2];
        const real *restrict Bt = B + row * st[6] + t * st[7] + grp * st[8];
        const real *restrict Ct = C + row * st[9] + t * st[10] + grp * st[11];
        const real *restrict gyk = gyr + k * p;
        const real *restrict Sprev = buf + k * p * n;
        real *restrict gBt = gB + ((row * l + t) * g + grp) * n;
        SFX(vec) dgs_all = {0};
        for (int64_t i = 0; i < p; i++) rvec[i] = (SFX(vec)){0};
        for (int64_t j0 = 0; j0 < n; j0 += SSD_NB * VL) {
            SFX(vec) gBa[SSD_NB], dg[SSD_NB], Bv[SSD_NB], Cv[SSD_NB];
            for (int v = 0; v < SSD_NB; v++) {
                gBa[v] = dg[v] = (SFX(vec)){0};
                Bv[v] = *(const SFX(uvec) *)(Bt + j0 + v * VL);
                Cv[v] = *(const SFX(uvec) *)(Ct + j0 + v * VL);
            }
            for (int64_t i = 0; i < p; i++) {
                const real xi = xt[i], gi = gyk[i];
                SFX(vec) *restrict Gi = (SFX(vec) *)(G + i * n + j0);
                const SFX(vec) *restrict Qi = (const SFX(vec) *)(Sprev + i * n + j0);
                SFX(vec) rv = {0};
                for (int v = 0; v < SSD_NB; v++) {
                    const SFX(vec) gv = Gi[v] + gi * Cv[v];
                    gBa[v] += xi * gv;
                    dg[v] += gv * Qi[v];
                    rv += gv * Bv[v];
                    Gi[v] = a * gv;
                }
                rvec[i] += rv;
            }
            for (int v = 0; v < SSD_NB; v++) {
                *(SFX(uvec) *)(gBt + j0 + v * VL) += u * gBa[v];
                dgs_all += dg[v];
            }
        }
        real xgb = 0, sgs = 0;
        for (int64_t i = 0; i < p; i++) {
            real r = 0;
            for (int64_t e = 0; e < VL; e++) r += rvec[i][e];
            const real gi = gyk[i], xi = xt[i];
            gx[((row * l + t) * h + hh) * p + i] = (Dh ? Dh[i] * gi : (real)0) + u * r;
            xgb += xi * r;
            if (gDh) gDh[i] += gi * xi;
        }
        for (int64_t e = 0; e < VL; e++) sgs += dgs_all[e];
        const real gu = xgb + Ah * a * sgs;
        *gA += u * a * sgs;
        real graw = gu;
        if (softplus) graw *= SIGMOID(dt[row * st[3] + t * st[4] + hh * st[5]] + bias);
        gdt[(row * l + t) * h + hh] = graw;
        *gbias += graw;
    }
}

/* Backward over all (segment, head) tasks, from the forward's checkpoints (K steps apart). Outputs: gx, gz
 * (contiguous (b, l, h, p); gz only with z), gdt (b, l, h), gB/gC: R zeroed buffers (R, b, l, g, n) indexed by
 * the thread (by_thread) or by the head within its group, gA/gbias partial sums (nseg, h), gD (nseg, h, p) (when
 * D is given), ginit (nseg, h, p, n). gfinal (nseg, h, p, n) may be NULL (no gradient reached the final state). */
SL_EXPORT void SFX(ssd_bwd)(int64_t nseg, const int64_t *seg, int64_t l, int64_t h, int64_t p, int64_t g, int64_t n,
                            int64_t b, const real *x, const real *dt, const real *A, const real *B, const real *C,
                            const real *D, const real *z, const real *dt_bias, int softplus, const int64_t *st,
                            const real *yraw, const real *gy, const real *gfinal, const real *ckpt, int64_t K,
                            real *gx, real *gdt, real *gz, real *gB, real *gC, int by_thread, real *gA, real *gD,
                            real *gbias, real *ginit, int nthreads) {
    const int64_t hg = h / g, ntasks = nseg * h, plane = b * l * g * n;
#pragma omp parallel num_threads(nthreads)
    {
        real *buf = ssd_alloc(sizeof(real) * (K + 1) * p * n);
        real *G = ssd_alloc(sizeof(real) * p * n);
        real *uu = ssd_alloc(sizeof(real) * K);
        real *aa = ssd_alloc(sizeof(real) * K);
        SFX(vec) *rvec = ssd_alloc(sizeof(SFX(vec)) * p);
        real *gyr = ssd_alloc(sizeof(real) * K * p); /* the gy' rows of one block */
        const int tid = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntasks; task++) {
            const int64_t s = task / h, hh = task % h, grp = hh / hg;
            const int64_t row = seg[4 * s], t0 = seg[4 * s + 1], t1 = seg[4 * s + 2], c0 = seg[4 * s + 3];
            const int64_t r = by_thread ? tid : hh % hg;
            real *gBr = gB + r * plane, *gCr = gC + r * plane;
            if (gfinal)
                memcpy(G, gfinal + (s * h + hh) * p * n, sizeof(real) * p * n);
            else
                memset(G, 0, sizeof(real) * p * n);
            const real *Dh = D ? D + hh * p : NULL;
            real *gDh = D ? gD + (s * h + hh) * p : NULL;
            if (gDh) memset(gDh, 0, sizeof(real) * p);
            const real bias = dt_bias ? dt_bias[hh] : (real)0;
            real gA_acc = 0, gbias_acc = 0;
            const int64_t nblocks = (t1 - t0 + K - 1) / K;
            for (int64_t c = nblocks - 1; c >= 0; c--) {
                const int64_t b0 = t0 + c * K, m = (t1 - b0 < K) ? t1 - b0 : K;
                const real *ck = ckpt + ((c0 + c) * h + hh) * n * p; /* (n, p) -> buf[0] as (p, n) */
                for (int64_t i = 0; i < p; i++)
                    for (int64_t j = 0; j < n; j++) buf[i * n + j] = ck[j * p + i];
                if (n % (SSD_NB * VL) == 0)
                    SFX(bwd_block_vec)(p, n, row, b0, m, hh, grp, h, g, l, x, dt, A[hh], B, C, Dh, z, bias, softplus,
                                       st, yraw, gy, buf, G, uu, aa, gx, gdt, gz, gBr, gCr, &gA_acc, gDh, &gbias_acc,
                                       rvec, gyr, t0, K);
                else
                    SFX(bwd_block)(p, n, row, b0, m, hh, grp, h, g, l, x, dt, A[hh], B, C, Dh, z, bias, softplus, st,
                                   yraw, gy, buf, G, uu, aa, gx, gdt, gz, gBr, gCr, &gA_acc, gDh, &gbias_acc);
            }
            gA[s * h + hh] = gA_acc;
            gbias[s * h + hh] = gbias_acc;
            memcpy(ginit + (s * h + hh) * p * n, G, sizeof(real) * p * n);
        }
        free(buf);
        free(G);
        free(uu);
        free(aa);
        free(rvec);
        free(gyr);
    }
}

/* One decode step for every (batch row, head): state/new_state contiguous (b, h, p, n) (new_state may not alias
 * state), y contiguous (b, h, p). Strides st[10]: x (b, h), dt (b, h), B (b, g), C (b, g), z (b, h). */
SL_EXPORT void SFX(ssd_step)(int64_t b, int64_t h, int64_t p, int64_t g, int64_t n, const real *state,
                             const real *x, const real *dt, const real *A, const real *B, const real *C,
                             const real *D, const real *z, const real *dt_bias, int softplus, const int64_t *st,
                             real *y, real *new_state, int nthreads) {
    const int64_t hg = h / g, ntasks = b * h;
    /* a step is small (b h p n FMAs): threads only pay off for wide batches */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (ntasks * p * n >= (1 << 18))
    for (int64_t task = 0; task < ntasks; task++) {
        const int64_t bi = task / h, hh = task % h, grp = hh / hg;
        real u = dt[bi * st[2] + hh * st[3]] + (dt_bias ? dt_bias[hh] : (real)0);
        if (softplus) u = SOFTPLUS(u);
        const real a = EXP(u * A[hh]);
        const real *restrict xt = x + bi * st[0] + hh * st[1];
        const real *restrict Bt = B + bi * st[4] + grp * st[5];
        const real *restrict Ct = C + bi * st[6] + grp * st[7];
        const real *restrict s0 = state + task * p * n;
        real *restrict s1 = new_state + task * p * n;
        real *restrict yt = y + task * p;
        for (int64_t i = 0; i < p; i++) {
            const real xi = u * xt[i];
#pragma omp simd
            for (int64_t j = 0; j < n; j++) s1[i * n + j] = a * s0[i * n + j] + xi * Bt[j];
            real v = SFX(dot)(s1 + i * n, Ct, n) + (D ? D[hh * p + i] * xt[i] : (real)0);
            if (z) {
                const real zi = z[bi * st[8] + hh * st[9] + i];
                v *= zi * SIGMOID(zi);
            }
            yt[i] = v;
        }
    }
}

#endif /* SSD_TEMPLATE */
