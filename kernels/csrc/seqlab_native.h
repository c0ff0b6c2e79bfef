/* Shared by seqlab's compiled CPU kernels (kernels/_native.py builds each csrc/<name>.c on first use).
 *
 * Conventions every kernel follows: tensors arrive as raw pointers with explicit element strides (int64_t),
 * sizes as int64_t, the thread count as int (torch.get_num_threads(), so one setting governs both), and each
 * kernel is written once as a macro body instantiated for float and double (the float64 build is the one the
 * tests compare against the sequential reference to ~1e-12). Activations match torch's definitions exactly:
 * softplus uses torch's threshold of 20 (x > 20 returns x).
 */
#ifndef SEQLAB_NATIVE_H
#define SEQLAB_NATIVE_H

/* Floating-point compares may trap by default, so gcc will not turn a `c ? x : y` on floats into a vector blend
 * and leaves every loop that clamps or selects (sl_exp_f, softplus, masks) scalar. The kernels never read the
 * FP exception flags, so they are compiled without trapping math. */
#pragma GCC optimize("no-trapping-math")

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define SL_EXPORT __attribute__((visibility("default")))

static inline float sl_softplus_f(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
static inline double sl_softplus_d(double x) { return x > 20.0 ? x : log1p(exp(x)); }
static inline float sl_sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline double sl_sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }
static inline float sl_silu_f(float x) { return x * sl_sigmoid_f(x); }
static inline double sl_silu_d(double x) { return x * sl_sigmoid_d(x); }

/* Fast float exp, vectorisable (gcc turns a `#pragma omp simd` loop calling it into AVX-512): the recurrence
 * needs one exp per (channel, state, position), and libm's expf neither inlines nor vectorises.
 * exp(x) = 2^k e^r with k = round(x / ln 2) (the 1.5 * 2^23 trick rounds to nearest and leaves k in the low
 * mantissa bits), r = x - k ln 2 in two parts (so r is accurate to an ulp), e^r by Cephes' degree-5 minimax
 * polynomial for expf (relative error ~1e-7 on |r| <= ln2 / 2), and 2^k built from its exponent bits.
 * Arguments below -87.33 (where the result leaves the normal range) give 0, above 88.37 give +inf, NaN stays
 * NaN: what the decays of a scan need (large negative delta * A must decay to exactly 0). */
static inline float sl_exp_f(float x) {
    const float lo = -87.33654f, hi = 88.37626f;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float kf = xc * 1.44269504088896341f + 12582912.0f;
    int32_t kb;
    memcpy(&kb, &kf, sizeof kb);
    int32_t k = kb - 0x4B400000;
    kf -= 12582912.0f;
    float r = xc - kf * 0.693359375f;
    r = r - kf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t eb = (k + 127) << 23;
    float scale;
    memcpy(&scale, &eb, sizeof scale);
    float res = p * scale;
    res = x < lo ? 0.0f : res;
    res = x > hi ? INFINITY : res;
    return x != x ? x : res;
}

/* log1p(e) for e in [0, 1], vectorisable: 2 atanh(s) with s = e / (2 + e) in [0, 1/3] (no cancellation for
 * small e), odd series to s^13 (truncation below 2e-8 relative). */
static inline float sl_log1p_unit_f(float e) {
    float s = e / (2.0f + e);
    float s2 = s * s;
    float q = 2.0f / 13.0f;
    q = q * s2 + 2.0f / 11.0f;
    q = q * s2 + 2.0f / 9.0f;
    q = q * s2 + 2.0f / 7.0f;
    q = q * s2 + 2.0f / 5.0f;
    q = q * s2 + 2.0f / 3.0f;
    q = q * s2 + 2.0f;
    return s * q;
}

/* Vectorisable float softplus with torch's threshold: x > 20 gives x, else max(x, 0) + log1p(exp(-|x|))
 * (the same function as log1p(exp(x)), without overflow). */
static inline float sl_fast_softplus_f(float x) {
    float ax = x < 0.0f ? -x : x;
    float v = (x > 0.0f ? x : 0.0f) + sl_log1p_unit_f(sl_exp_f(-ax));
    return x > 20.0f ? x : v;
}
static inline float sl_fast_sigmoid_f(float x) { return 1.0f / (1.0f + sl_exp_f(-x)); }
static inline float sl_fast_silu_f(float x) { return x * sl_fast_sigmoid_f(x); }

/* The same functions on a vector of floats, written with GCC vector extensions: an explicit vector type leaves
 * the compiler no choice about vectorising the hot loops (its auto-vectoriser gives up on some of them inside
 * larger functions). The vector is one machine register (64 bytes with AVX-512, else 32): wider generic
 * vectors are split by gcc, and their compares and selects scalarised, which is slower than no vectors. */
#if defined(__AVX512F__)
#define SL_VBYTES 64
#else
#define SL_VBYTES 32
#endif
#pragma GCC diagnostic ignored "-Wpsabi" /* inlined helpers: the ABI of passing a vector by value never matters */
typedef float sl_vf __attribute__((vector_size(SL_VBYTES)));
typedef int32_t sl_vi __attribute__((vector_size(SL_VBYTES)));

/* lanes of a where mask is set (all ones), else lanes of b */
static inline sl_vf sl_vsel_f(sl_vi mask, sl_vf a, sl_vf b) {
    return (sl_vf)(((sl_vi)a & mask) | ((sl_vi)b & ~mask));
}

/* As sl_exp_f, with one difference: arguments in (88.38, 88.72] already give +inf (2^128), 2^-0.5 below
 * FLT_MAX; the upper clamp then needs no second select. */
static inline sl_vf sl_vexp_f(sl_vf x) {
    const float lo = -87.33654f, hi = 88.7f;
    sl_vi under = x < lo;
    sl_vf xc = sl_vsel_f(under, (sl_vf){} + lo, x);
    xc = sl_vsel_f(xc > hi, (sl_vf){} + hi, xc); /* k <= 128: exponent bits 255 = inf, never the sign bit */
    sl_vf kf = xc * 1.44269504088896341f + 12582912.0f;
    sl_vi k = (sl_vi)kf - 0x4B400000;
    kf -= 12582912.0f;
    sl_vf r = xc - kf * 0.693359375f;
    r = r - kf * -2.12194440e-4f;
    sl_vf p = (sl_vf){} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    sl_vf res = p * (sl_vf)((k + 127) << 23);
    return (sl_vf)((sl_vi)res & ~under); /* below the normal range: 0; NaN fails every compare and flows through */
}

static inline sl_vf sl_vsoftplus_f(sl_vf x) {
    sl_vi pos = x > 0.0f;
    sl_vf ax = sl_vsel_f(pos, x, -x);
    sl_vf e = sl_vexp_f(-ax);
    sl_vf t = e / (e + 2.0f), t2 = t * t;
    sl_vf q = (sl_vf){} + 2.0f / 13.0f;
    q = q * t2 + 2.0f / 11.0f;
    q = q * t2 + 2.0f / 9.0f;
    q = q * t2 + 2.0f / 7.0f;
    q = q * t2 + 2.0f / 5.0f;
    q = q * t2 + 2.0f / 3.0f;
    q = q * t2 + 2.0f;
    sl_vf v = sl_vsel_f(pos, x, (sl_vf){}) + t * q;
    return sl_vsel_f(x > 20.0f, x, v);
}

static inline sl_vf sl_vsigmoid_f(sl_vf x) { return 1.0f / (1.0f + sl_vexp_f(-x)); }

/* The version every library reports, so Python can refuse a stale cached build (kernels/_native.py keys the
 * cache by a hash of the sources, so this is a second line of defence). */
#define SEQLAB_NATIVE_ABI 1


/* Lane load / store of a strided run of SL_VL elements (SL_VEC, SL_REAL and SL_VL are the including file's
 * instantiation macros): a plain vector access when the elements are consecutive (stride 1) and the block is full,
 * else a gather / scatter of the first nl lanes (the rest read as 0). Expanded once per instantiation:
 * SL_DEFINE_LANE_IO(my_load, my_store). */
#define SL_DEFINE_LANE_IO(LOAD, STORE)                                                    \
    static inline SL_VEC LOAD(const SL_REAL *p, int64_t sc, int nl) {                     \
        SL_VEC v;                                                                         \
        if (sc == 1 && nl == SL_VL) {                                                     \
            memcpy(&v, p, sizeof v);                                                      \
        } else {                                                                          \
            SL_REAL tmp[SL_VL];                                                           \
            for (int c = 0; c < SL_VL; c++) tmp[c] = c < nl ? p[c * sc] : (SL_REAL)0;     \
            memcpy(&v, tmp, sizeof v);                                                    \
        }                                                                                 \
        return v;                                                                         \
    }                                                                                     \
    static inline void STORE(SL_REAL *p, int64_t sc, int nl, SL_VEC v) {                  \
        if (sc == 1 && nl == SL_VL) {                                                     \
            memcpy(p, &v, sizeof v);                                                      \
        } else {                                                                          \
            for (int c = 0; c < nl; c++) p[c * sc] = v[c];                                \
        }                                                                                 \
    }

#endif
