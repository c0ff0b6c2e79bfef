/* One Mamba-3 decode step for one (row, head): shared by mamba3.c's mamba3_step (the state-update kernel) and
 * step.c's fused block step, so both run the same arithmetic in the same order.
 *
 * M3_HEAD(T, SUF, EXP, TANH, COS, SIN, FLOOR, SILU, SIGMOID) defines m3_head_SUF(...) with pointers already at this
 * row and head (strides where a part runs over the MIMO ranks r):
 *   ang_in, ang_out (A_): the accumulated angle; ssm_in, ssm_out (P, N); k_in, k_out (rank r at + r * k_rs, N
 *   each); v_in, v_out (P): the previous position's key and value; x (P); d (dt), arate (A), trap (pre-sigmoid);
 *   angles (A_): this row's rotary rates; Bm, Cm (rank r at + r * bc_rs, N each): B and C before their biases;
 *   Bb, Cb (rank r at + r * N); D (this head's skip) or NULL; z (P) or NULL; mx, mz, mo (rank r at + r * P) or
 *   NULL; y: per_rank ? rank r at + r * y_rs : (P); scratch: R N + 2 R P + N elements.
 * The math is kernels/mamba3/ref.py's _step, for one head.
 */
#ifndef SEQLAB_MAMBA3_HEAD_H
#define SEQLAB_MAMBA3_HEAD_H

#include <stdint.h>

#define M3_TWO_PI 6.283185307179586476925286766559
#define M3_PI 3.1415926535897932384626433832795

/* Rotate the rotary pairs of u (n) by ang (a) into out: SISO pairs (2m, 2m + 1), MIMO pairs (m, m + n/2). */
#define M3_ROTATE(T, COS, SIN, out, u, ang, A_, N_, mimo)                                                      \
    do {                                                                                                       \
        for (int64_t j = 0; j < (N_); j++) (out)[j] = (u)[j];                                                  \
        for (int64_t m = 0; m < (A_); m++) {                                                                   \
            const T cs = COS((ang)[m]), sn = SIN((ang)[m]);                                                    \
            const int64_t i0 = (mimo) ? m : 2 * m, i1 = (mimo) ? m + (N_) / 2 : 2 * m + 1;                     \
            const T x0 = (u)[i0], x1 = (u)[i1];                                                                \
            (out)[i0] = x0 * cs - x1 * sn;                                                                     \
            (out)[i1] = x0 * sn + x1 * cs;                                                                     \
        }                                                                                                      \
    } while (0)

#define M3_HEAD(T, SUF, EXP, TANH, COS, SIN, FLOOR, SILU, SIGMOID)                                             \
    static inline void m3_head_##SUF(                                                                          \
        int64_t P, int64_t N, int64_t R, int64_t A_, const T *ang_in, T *ang_out, const T *ssm_in,             \
        T *ssm_out, const T *k_in, T *k_out, int64_t k_rs, const T *v_in, T *v_out, const T *x, T d, T arate,  \
        T trap, const T *angles, const T *Bm, const T *Cm, int64_t bc_rs, const T *Bb, const T *Cb,            \
        const T *D, const T *z, const T *mx, const T *mz, const T *mo, int per_rank, T *y, int64_t y_rs,       \
        T *scratch) {                                                                                          \
        const int mimo = R > 1;                                                                                \
        for (int64_t m = 0; m < A_; m++) {                                                                     \
            const T v = ang_in[m] + TANH(angles[m]) * (T)M3_PI * d;                                            \
            ang_out[m] = v - (T)M3_TWO_PI * FLOOR(v / (T)M3_TWO_PI);                                           \
        }                                                                                                      \
        T *q = scratch, *vp = q + R * N, *vn = vp + R * P, *tmp = vn + R * P;                                  \
        for (int64_t r = 0; r < R; r++) {                                                                      \
            const T *braw = Bm + r * bc_rs, *bb = Bb + r * N;                                                  \
            for (int64_t j = 0; j < N; j++) tmp[j] = braw[j] + bb[j];                                          \
            T *kr = k_out + r * k_rs;                                                                          \
            M3_ROTATE(T, COS, SIN, kr, tmp, ang_out, A_, N, mimo);                                             \
            const T *craw = Cm + r * bc_rs, *cb = Cb + r * N;                                                  \
            for (int64_t j = 0; j < N; j++) tmp[j] = craw[j] + cb[j];                                          \
            M3_ROTATE(T, COS, SIN, q + r * N, tmp, ang_out, A_, N, mimo);                                      \
            for (int64_t i = 0; i < P; i++) {                                                                  \
                const T w = mx ? mx[r * P + i] : (T)1;                                                         \
                vp[r * P + i] = v_in[i] * w;                                                                   \
                vn[r * P + i] = x[i] * w;                                                                      \
            }                                                                                                  \
        }                                                                                                      \
        const T lam = SIGMOID(trap), alpha = EXP(arate * d);                                                   \
        const T beta = ((T)1 - lam) * d * alpha, gamma = lam * d;                                              \
        for (int64_t i = 0; i < P; i++) v_out[i] = x[i];                                                       \
        for (int64_t i = 0; i < P; i++) {                                                                      \
            T *restrict hi = ssm_out + i * N;                                                                  \
            const T *restrict oi = ssm_in + i * N;                                                             \
            _Pragma("omp simd") for (int64_t j = 0; j < N; j++) hi[j] = alpha * oi[j];                         \
            for (int64_t r = 0; r < R; r++) {                                                                  \
                const T cp = beta * vp[r * P + i], cn = gamma * vn[r * P + i];                                 \
                const T *restrict kp = k_in + r * k_rs;                                                        \
                const T *restrict kn = k_out + r * k_rs;                                                       \
                _Pragma("omp simd") for (int64_t j = 0; j < N; j++) hi[j] += cp * kp[j] + cn * kn[j];          \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t i = 0; i < P; i++) {                                                                      \
            const T *restrict hi = ssm_out + i * N;                                                            \
            T out = 0;                                                                                         \
            for (int64_t r = 0; r < R; r++) {                                                                  \
                const T *restrict qr = q + r * N;                                                              \
                T acc = 0;                                                                                     \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t j = 0; j < N; j++) acc += hi[j] * qr[j];   \
                if (D) acc += D[0] * vn[r * P + i];                                                            \
                if (z) {                                                                                       \
                    const T zz = z[i] * (mz ? mz[r * P + i] : (T)1);                                           \
                    acc *= SILU(zz);                                                                           \
                }                                                                                              \
                if (per_rank)                                                                                  \
                    y[r * y_rs + i] = acc;                                                                     \
                else                                                                                           \
                    out += (mo ? mo[r * P + i] : (T)1) * acc;                                                  \
            }                                                                                                  \
            if (!per_rank) y[i] = out;                                                                         \
        }                                                                                                      \
    }

#endif
