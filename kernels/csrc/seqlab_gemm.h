/* The "rows GEMM" of seqlab's compiled CPU kernels: Y[b, o] = (R[b, o] +) (W[o] . X[b] + bias[o]) for a weight W
 * (nout, nin) row-major and a few rows X[b] (the fused decode step's projections: one token per batch row).
 *
 * Why hand-written: no BLAS is reachable from our shared libraries. torch's wheel carries MKL / oneDNN, but does
 * not export their symbols to other libraries in the process, and linking a system BLAS would add a build
 * dependency the kernels avoid. A BLAS call would also not fit the decode step's design: the step runs every
 * phase of every block inside ONE OpenMP parallel region (one fork per token), and each projection is a
 * workshared `omp for` that the region's threads enter together; a BLAS call per projection would either run
 * on one thread or fork its own team from inside ours.
 *
 * SL_ROWS_GEMM(T, SUF) defines
 *   static void sl_rows_gemm_SUF(W, bias, X, ldx, Y, R, ldy, nout, nin, batch)
 * and sl_rows_gemm_SUF_bf16, the same on a bfloat16 W (see the end of this file),
 * with X rows at stride ldx, Y and R rows at stride ldy, bias and R optional (NULL). It is called by every thread
 * of a parallel region, shares the output rows out with `omp for schedule(static)` and ends with that loop's
 * implicit barrier (the next phase reads Y). Outside a parallel region it runs on the calling thread alone.
 * Y may be R (an in-place residual add); X must not overlap Y.
 *
 * Row independence, bit for bit: every (o, b) is computed the same way whatever tile it falls in, whatever the
 * batch size, the other rows and the thread count. One 32-byte vector accumulator per (o, b) (8 float lanes, 4
 * double lanes, on every target: the lane structure does not follow the ISA), i stepping by one vector in order,
 * the last partial vector zero padded, then a fixed horizontal sum (fold the upper half of the lanes onto the lower,
 * repeatedly: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)) for 8 lanes), then + bias (0 without one), then R + that.
 * The multiply-adds of a tile, its partial vector included, all run through one non-inlined loop (see
 * sl_gemm_run below), so wherever the compiler contracts acc += w * x to an FMA it does so for every element.
 * Hence a row decoded in a batch gets exactly the bits it gets alone (tests/test_kernels/test_native_gemm.py).
 *
 * Speed (2-core AVX2 + FMA, 16 vector registers): batch >= 4 runs 3 output rows x 4 batch rows per tile, twelve
 * accumulators + three weight vectors + one X vector = 16 registers (4 x 4 would need 16 accumulators and spill),
 * i.e. 12 FMAs per 7 loads (SL_GEMM_PIN), so the FMA units, not the loads, bound it. Batch rows left over
 * (batch % 4) run 3 x 1..3 tiles. Batch 1 is a memory-bound GEMV: 8 output rows in flight (8 x 1 tiles, 8
 * independent FMA chains); batch 2 and 3 run 4 x 2 / 4 x 3 tiles over the same 8-row blocks. Written with GCC
 * vector extensions (gcc and clang, any target: -march=native or not, x86-64 or aarch64), loads through memcpy
 * (unaligned).
 */
#ifndef SEQLAB_GEMM_H
#define SEQLAB_GEMM_H

#include <stdint.h>
#include <string.h>

/* The accumulator: one machine vector register, 32 bytes with AVX, else 16 (SSE2, NEON). A wider generic vector
 * than the registers is kept in memory by gcc (its accumulators never reach registers: ~3x slower). Fixed for a
 * build, so a build's rows are bit-for-bit independent; two builds (AVX or not) may differ in the last bits. */
#if defined(__AVX__)
#define SL_GEMM_VBYTES 32
#else
#define SL_GEMM_VBYTES 16
#endif

/* Keep a loaded vector in a register: an empty asm that "changes" it. gcc otherwise folds every use of a weight
 * or X vector into the FMA as a memory operand, one load per FMA (15 loads per 12 FMAs in a 3 x 4 tile, more than
 * the two vector loads a cycle Zen 3 issues: ~55% of the FMA peak); loaded once each it is 7 loads per 12 FMAs
 * (~85% of the peak at long rows). It changes no value, only where the operands live. x86 only (the "x" register
 * class holds the vector whole); elsewhere a no-op. */
#if defined(__SSE2__) && (defined(__x86_64__) || defined(__i386__))
#define SL_GEMM_PIN(v) __asm__("" : "+x"(v))
#else
#define SL_GEMM_PIN(v) ((void)0)
#endif

/* Registers a multiply-add needs beside its operands: the X vector, and without AVX (2-operand SSE: the product
 * overwrites a copy of an operand) a scratch one. The weight vectors of a tile are pinned too where they fit. */
#if defined(__AVX__)
#define SL_GEMM_TMP 1
#else
#define SL_GEMM_TMP 2
#endif

/* Two-input lane shuffles: __builtin_shufflevector in clang and gcc >= 12, __builtin_shuffle (a mask vector) before. */
#if defined(__clang__) || __GNUC__ >= 12
#define SL_GEMM_SHUF(M, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SL_GEMM_SHUF(M, a, b, ...) __builtin_shuffle(a, b, (M){__VA_ARGS__})
#endif

/* The horizontal sums of four accumulators at once, out[j] = the sum of the lanes of the j-th, each by the fixed
 * tree (halve: lane l += lane l + VL/2, until one lane is left), so each sum is the one a lone accumulator gets:
 * 8 lanes: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)); 4 lanes: (a0+a2) + (a1+a3); 2 lanes: a0 + a1.
 * IT: the integer type of T's size (the shuffle masks). */
#define SL_GEMM_HALVES(T, SUF, IT)                                                                                     \
    typedef T sl_gemm_h_##SUF __attribute__((vector_size(SL_GEMM_VBYTES / 2)));                                        \
    typedef IT sl_gemm_m_##SUF __attribute__((vector_size(SL_GEMM_VBYTES / 2)));                                       \
    /* p[j] = lower half + upper half of the j-th vector */                                                            \
    static inline void sl_gemm_fold4_##SUF(const sl_gemm_v_##SUF *a, const sl_gemm_v_##SUF *b,                         \
                                           const sl_gemm_v_##SUF *c, const sl_gemm_v_##SUF *d, sl_gemm_h_##SUF p[4]) { \
        const sl_gemm_v_##SUF *v[4] = {a, b, c, d};                                                                    \
        for (int j = 0; j < 4; j++) {                                                                                  \
            sl_gemm_h_##SUF lo, hi;                                                                                    \
            memcpy(&lo, v[j], sizeof lo);                                                                              \
            memcpy(&hi, (const char *)v[j] + sizeof lo, sizeof hi);                                                    \
            p[j] = lo + hi;                                                                                            \
        }                                                                                                              \
    }
#define SL_GEMM_HSUM4_L8(T, SUF, IT)                                                                                   \
    SL_GEMM_HALVES(T, SUF, IT)                                                                                         \
    static inline void sl_gemm_hsum4_##SUF(const sl_gemm_v_##SUF *a, const sl_gemm_v_##SUF *b,                         \
                                           const sl_gemm_v_##SUF *c, const sl_gemm_v_##SUF *d, T out[4]) {             \
        sl_gemm_h_##SUF p[4]; /* p[j] lane l: a_l + a_{l+4} */                                                         \
        sl_gemm_fold4_##SUF(a, b, c, d, p);                                                                            \
        sl_gemm_h_##SUF ab = SL_GEMM_SHUF(sl_gemm_m_##SUF, p[0], p[1], 0, 1, 4, 5) +                                   \
                             SL_GEMM_SHUF(sl_gemm_m_##SUF, p[0], p[1], 2, 3, 6, 7);                                    \
        sl_gemm_h_##SUF cd = SL_GEMM_SHUF(sl_gemm_m_##SUF, p[2], p[3], 0, 1, 4, 5) +                                   \
                             SL_GEMM_SHUF(sl_gemm_m_##SUF, p[2], p[3], 2, 3, 6, 7);                                    \
        sl_gemm_h_##SUF r = SL_GEMM_SHUF(sl_gemm_m_##SUF, ab, cd, 0, 2, 4, 6) +                                        \
                            SL_GEMM_SHUF(sl_gemm_m_##SUF, ab, cd, 1, 3, 5, 7);                                         \
        memcpy(out, &r, sizeof r);                                                                                     \
    }
#define SL_GEMM_HSUM4_L4(T, SUF, IT)                                                                                   \
    SL_GEMM_HALVES(T, SUF, IT)                                                                                         \
    static inline void sl_gemm_hsum4_##SUF(const sl_gemm_v_##SUF *a, const sl_gemm_v_##SUF *b,                         \
                                           const sl_gemm_v_##SUF *c, const sl_gemm_v_##SUF *d, T out[4]) {             \
        sl_gemm_h_##SUF p[4]; /* p[j] lane l: a_l + a_{l+2} */                                                         \
        sl_gemm_fold4_##SUF(a, b, c, d, p);                                                                            \
        sl_gemm_h_##SUF ab = SL_GEMM_SHUF(sl_gemm_m_##SUF, p[0], p[1], 0, 2) +                                         \
                             SL_GEMM_SHUF(sl_gemm_m_##SUF, p[0], p[1], 1, 3);                                          \
        sl_gemm_h_##SUF cd = SL_GEMM_SHUF(sl_gemm_m_##SUF, p[2], p[3], 0, 2) +                                         \
                             SL_GEMM_SHUF(sl_gemm_m_##SUF, p[2], p[3], 1, 3);                                          \
        memcpy(out, &ab, sizeof ab);                                                                                   \
        memcpy(out + 2, &cd, sizeof cd);                                                                               \
    }
#define SL_GEMM_HSUM4_L2(T, SUF, IT)                                                                                   \
    static inline void sl_gemm_hsum4_##SUF(const sl_gemm_v_##SUF *a, const sl_gemm_v_##SUF *b,                         \
                                           const sl_gemm_v_##SUF *c, const sl_gemm_v_##SUF *d, T out[4]) {             \
        const sl_gemm_v_##SUF *v[4] = {a, b, c, d};                                                                    \
        for (int j = 0; j < 4; j++) {                                                                                  \
            T l[2];                                                                                                    \
            memcpy(l, v[j], sizeof l);                                                                                 \
            out[j] = l[0] + l[1];                                                                                      \
        }                                                                                                              \
    }
#if SL_GEMM_VBYTES == 32
#define SL_GEMM_HSUM4_f32(T, SUF) SL_GEMM_HSUM4_L8(T, SUF, int32_t)
#define SL_GEMM_HSUM4_f64(T, SUF) SL_GEMM_HSUM4_L4(T, SUF, int64_t)
#else
#define SL_GEMM_HSUM4_f32(T, SUF) SL_GEMM_HSUM4_L4(T, SUF, int32_t)
#define SL_GEMM_HSUM4_f64(T, SUF) SL_GEMM_HSUM4_L2(T, SUF, int64_t)
#endif

/* One MR x NR tile: out[r][c] = W[o0 + r] . X[b0 + c] for r < mv, c < nv (rows past them repeat the last valid
 * row: computed, never stored). MR and NR are literals, so the accumulators live in registers.
 *
 * sl_gemm_run_* is the only place a multiply-add is written: the tile runs it over the whole vectors of its rows,
 * then once more over zero-padded copies of the last partial vector. Not inlined (nor cloned), so both go
 * through the same machine code: inlined, gcc moved the tail's adds away from its multiplies in some tiles and
 * not others, and a row's bits then depended on its tile. */
#if defined(__clang__)
#define SL_GEMM_NOINLINE __attribute__((noinline))
#else
#define SL_GEMM_NOINLINE __attribute__((noinline, noclone))
#endif
#define SL_GEMM_TILE(T, WT, SUF, NAME, LOAD, MR, NR)                                                                   \
    static SL_GEMM_NOINLINE void sl_gemm_run_##NAME##_##MR##x##NR(const WT *const *wp, const T *const *xp,             \
                                                                  int64_t nvec, sl_gemm_v_##SUF *accp) {               \
        enum { VL = SL_GEMM_VBYTES / sizeof(T) };                                                                      \
        const WT *w[MR];                                                                                               \
        const T *x[NR];                                                                                                \
        sl_gemm_v_##SUF acc[MR][NR];                                                                                   \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) w[r] = wp[r];                                             \
        _Pragma("GCC unroll 8") for (int c = 0; c < NR; c++) x[c] = xp[c];                                             \
        memcpy(acc, accp, sizeof acc);                                                                                 \
        for (int64_t i = 0; i < nvec * VL; i += VL) {                                                                  \
            sl_gemm_v_##SUF wv[MR];                                                                                    \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                                                     \
                LOAD(SUF, wv[r], w[r] + i);                                                                            \
                if (MR * NR + MR + SL_GEMM_TMP <= 16) SL_GEMM_PIN(wv[r]);                                              \
            }                                                                                                          \
            _Pragma("GCC unroll 8") for (int c = 0; c < NR; c++) {                                                     \
                sl_gemm_v_##SUF xv;                                                                                    \
                memcpy(&xv, x[c] + i, sizeof xv);                                                                      \
                SL_GEMM_PIN(xv);                                                                                       \
                _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) acc[r][c] += wv[r] * xv;                          \
            }                                                                                                          \
        }                                                                                                              \
        memcpy(accp, acc, sizeof acc);                                                                                 \
    }                                                                                                                  \
    static inline void sl_gemm_tile_##NAME##_##MR##x##NR(const WT *W, int64_t nin, const T *X, int64_t ldx,            \
                                                         int64_t o0, int mv, int64_t b0, int nv, T out[MR][NR]) {      \
        enum { VL = SL_GEMM_VBYTES / sizeof(T) };                                                                      \
        const WT *w[MR];                                                                                               \
        const T *x[NR];                                                                                                \
        sl_gemm_v_##SUF acc[MR * NR];                                                                                  \
        for (int r = 0; r < MR; r++) w[r] = W + (o0 + (r < mv ? r : mv - 1)) * nin;                                    \
        for (int c = 0; c < NR; c++) x[c] = X + (b0 + (c < nv ? c : nv - 1)) * ldx;                                    \
        memset(acc, 0, sizeof acc);                                                                                    \
        const int64_t full = nin / VL;                                                                                 \
        sl_gemm_run_##NAME##_##MR##x##NR(w, x, full, acc);                                                             \
        const int tail = (int)(nin - full * VL);                                                                       \
        if (tail) { /* the last partial vector, zero padded */                                                         \
            WT wt[MR][VL];                                                                                             \
            T xt[NR][VL];                                                                                              \
            const WT *wq[MR];                                                                                          \
            const T *xq[NR];                                                                                           \
            memset(wt, 0, sizeof wt);                                                                                  \
            memset(xt, 0, sizeof xt);                                                                                  \
            for (int r = 0; r < MR; r++) {                                                                             \
                for (int k = 0; k < tail; k++) wt[r][k] = w[r][full * VL + k];                                         \
                wq[r] = wt[r];                                                                                         \
            }                                                                                                          \
            for (int c = 0; c < NR; c++) {                                                                             \
                for (int k = 0; k < tail; k++) xt[c][k] = x[c][full * VL + k];                                         \
                xq[c] = xt[c];                                                                                         \
            }                                                                                                          \
            sl_gemm_run_##NAME##_##MR##x##NR(wq, xq, 1, acc);                                                          \
        }                                                                                                              \
        /* reduced four at a time, the last group padded with the first */                                             \
        for (int k = 0; k < MR * NR; k += 4) {                                                                         \
            T sum[4];                                                                                                  \
            sl_gemm_hsum4_##SUF(&acc[k], &acc[k + 1 < MR * NR ? k + 1 : 0], &acc[k + 2 < MR * NR ? k + 2 : 0],         \
                                &acc[k + 3 < MR * NR ? k + 3 : 0], sum);                                               \
            for (int j = 0; j < 4; j++) {                                                                              \
                if (k + j < MR * NR) out[(k + j) / NR][(k + j) % NR] = sum[j];                                         \
            }                                                                                                          \
        }                                                                                                              \
    }

/* Y[b0 + c, o0 + r] = (R +) (out[r][c] + bias) for the valid part of a tile. */
#define SL_GEMM_STORE(T, MR, NR)                                                                                       \
    for (int r = 0; r < mv; r++) {                                                                                     \
        const T bo = bias ? bias[o0 + r] : (T)0;                                                                       \
        for (int c = 0; c < nv; c++) {                                                                                 \
            const int64_t at = (b0 + c) * ldy + o0 + r;                                                                \
            const T v = out[r][c] + bo;                                                                                \
            Y[at] = R ? R[at] + v : v;                                                                                 \
        }                                                                                                              \
    }

#define SL_GEMM_RUN(T, NAME, MR, NR)                                                                                   \
    do {                                                                                                               \
        T out[MR][NR];                                                                                                 \
        sl_gemm_tile_##NAME##_##MR##x##NR(W, nin, X, ldx, o0, mv, b0, nv, out);                                        \
        SL_GEMM_STORE(T, MR, NR)                                                                                       \
    } while (0)

#define SL_ROWS_GEMM_AS(T, WT, SUF, NAME, LOAD)                                                                        \
    SL_GEMM_TILE(T, WT, SUF, NAME, LOAD, 3, 4)                                                                         \
    SL_GEMM_TILE(T, WT, SUF, NAME, LOAD, 3, 3)                                                                         \
    SL_GEMM_TILE(T, WT, SUF, NAME, LOAD, 3, 2)                                                                         \
    SL_GEMM_TILE(T, WT, SUF, NAME, LOAD, 3, 1)                                                                         \
    SL_GEMM_TILE(T, WT, SUF, NAME, LOAD, 8, 1)                                                                         \
    SL_GEMM_TILE(T, WT, SUF, NAME, LOAD, 4, 2)                                                                         \
    SL_GEMM_TILE(T, WT, SUF, NAME, LOAD, 4, 3)                                                                         \
    static void sl_rows_gemm_##NAME(const WT *restrict W, const T *bias, const T *restrict X, int64_t ldx, T *Y,       \
                                   const T *R, int64_t ldy, int64_t nout, int64_t nin, int64_t batch) {                \
        if (batch >= 4) {                                                                                              \
            const int64_t blocks = (nout + 2) / 3;                                                                     \
            _Pragma("omp for schedule(static)") for (int64_t ob = 0; ob < blocks; ob++) {                              \
                const int64_t o0 = 3 * ob;                                                                             \
                const int mv = nout - o0 < 3 ? (int)(nout - o0) : 3;                                                   \
                int64_t b0 = 0;                                                                                        \
                for (; b0 + 4 <= batch; b0 += 4) {                                                                     \
                    const int nv = 4;                                                                                  \
                    SL_GEMM_RUN(T, NAME, 3, 4);                                                                        \
                }                                                                                                      \
                const int nv = (int)(batch - b0);                                                                      \
                if (nv == 3)                                                                                           \
                    SL_GEMM_RUN(T, NAME, 3, 3);                                                                        \
                else if (nv == 2)                                                                                      \
                    SL_GEMM_RUN(T, NAME, 3, 2);                                                                        \
                else if (nv == 1)                                                                                      \
                    SL_GEMM_RUN(T, NAME, 3, 1);                                                                        \
            }                                                                                                          \
            return;                                                                                                    \
        }                                                                                                              \
        const int64_t blocks = (nout + 7) / 8;                                                                         \
        _Pragma("omp for schedule(static)") for (int64_t ob = 0; ob < blocks; ob++) {                                  \
            const int64_t b0 = 0;                                                                                      \
            const int nv = (int)batch;                                                                                 \
            if (batch == 1) {                                                                                          \
                const int64_t o0 = 8 * ob;                                                                             \
                const int mv = nout - o0 < 8 ? (int)(nout - o0) : 8;                                                   \
                SL_GEMM_RUN(T, NAME, 8, 1);                                                                            \
            } else if (batch > 1) {                                                                                    \
                for (int64_t o0 = 8 * ob; o0 < nout && o0 < 8 * ob + 8; o0 += 4) {                                     \
                    const int mv = nout - o0 < 4 ? (int)(nout - o0) : 4;                                               \
                    if (batch == 2)                                                                                    \
                        SL_GEMM_RUN(T, NAME, 4, 2);                                                                    \
                    else                                                                                               \
                        SL_GEMM_RUN(T, NAME, 4, 3);                                                                    \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }


/* Eight bfloat16 widened to float32 bits in one AVX2 register: one vpmovzxwd and one shift. gcc 12's own
 * lowering of the generic __builtin_convertvector below splits it into two 128-bit halves and an insert (four
 * shuffle-port ops per vector), which made the bfloat16 GEMV slower per weight than the float32 one. */
#if defined(__AVX2__)
#include <immintrin.h>
#define SL_GEMM_WIDEN8 1
static inline void sl_gemm_widen8(const uint16_t *p, void *out) {
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)p)), 16);
    memcpy(out, &w, sizeof w);
}
#else
#define SL_GEMM_WIDEN8 0
static inline void sl_gemm_widen8(const uint16_t *p, void *out) {
    (void)p;
    (void)out;
}
#endif

/* Weights loaded as they are (T) or as bfloat16 (the upper 16 bits of a float32: widened exactly, shifted into
 * place, then converted to T, so a bfloat16 weight multiplies as its float32 value would). */
#define SL_GEMM_LOAD_SAME(SUF, dst, src) memcpy(&(dst), (src), sizeof(dst))
#define SL_GEMM_LOAD_BF16(SUF, dst, src)                                                                               \
    (__builtin_prefetch((const char *)(src) + SL_GEMM_BF16_AHEAD), (dst) = sl_gemm_bf16_##SUF(src))
/* Bytes ahead of each bfloat16 weight stream that the loop prefetches. A bfloat16 row is half as long as a float32
 * one, and without it the bfloat16 GEMV read its weights no faster than the float32 GEMV read twice the bytes
 * (48 (3072, 768) matrices, batch 1, 2 threads, the 2-core Xeon VM: 18.0 ms against 19.1 ms); with 256 to 4096
 * bytes ahead it took 12.2-13.8 ms (2048: 12.2-12.5), the float32 one 17.5-19.0. The float32 loop is left as it
 * was: the same prefetch there changed nothing measurable. */
#define SL_GEMM_BF16_AHEAD 2048

/* SL_ROWS_GEMM(T, SUF): sl_rows_gemm_SUF (weights in T) and sl_rows_gemm_SUF_bf16 (the same GEMM on bfloat16
 * weights, uint16_t bits; X, bias, R and Y in T). The second runs the first's tiles and order with each weight
 * vector widened on load, so its result is, bit for bit, the first's on the weights converted to T: a bfloat16
 * model's projections read half the bytes and give what its float32 copy gives. */
#define SL_ROWS_GEMM(T, SUF)                                                                                           \
    typedef T sl_gemm_v_##SUF __attribute__((vector_size(SL_GEMM_VBYTES)));                                            \
    typedef uint16_t sl_gemm_b_##SUF __attribute__((vector_size(SL_GEMM_VBYTES / sizeof(T) * 2)));                     \
    typedef uint32_t sl_gemm_u_##SUF __attribute__((vector_size(SL_GEMM_VBYTES / sizeof(T) * 4)));                     \
    typedef float sl_gemm_f_##SUF __attribute__((vector_size(SL_GEMM_VBYTES / sizeof(T) * 4)));                        \
    static inline sl_gemm_v_##SUF sl_gemm_bf16_##SUF(const uint16_t *p) {                                              \
        if (SL_GEMM_WIDEN8 && sizeof(T) == 4 && SL_GEMM_VBYTES == 32) {                                                \
            sl_gemm_v_##SUF v;                                                                                         \
            sl_gemm_widen8(p, &v);                                                                                     \
            return v;                                                                                                  \
        }                                                                                                              \
        sl_gemm_b_##SUF b;                                                                                             \
        memcpy(&b, p, sizeof b);                                                                                       \
        const sl_gemm_u_##SUF u = __builtin_convertvector(b, sl_gemm_u_##SUF) << 16;                                   \
        sl_gemm_f_##SUF f;                                                                                             \
        memcpy(&f, &u, sizeof f);                                                                                      \
        return __builtin_convertvector(f, sl_gemm_v_##SUF);                                                            \
    }                                                                                                                  \
    SL_GEMM_HSUM4_##SUF(T, SUF)                                                                                        \
    SL_ROWS_GEMM_AS(T, T, SUF, SUF, SL_GEMM_LOAD_SAME)                                                                 \
    SL_ROWS_GEMM_AS(T, uint16_t, SUF, SUF##_bf16, SL_GEMM_LOAD_BF16)

#endif
