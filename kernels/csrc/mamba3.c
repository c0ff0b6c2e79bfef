/* Mamba-3 scan: the compiled CPU recurrence (forward, backward) and the fused one-step decode update.
 *
 * kernels/mamba3/native_ops.py does the per-position elementwise work with torch ops (angle running sums,
 * rotations of B and C, biases, the trapezoid coefficients, the D term, the gate, mimo_o) and hands this file
 * only the part eager PyTorch cannot fuse: the recurrence over positions. Folding the trapezoid's beta term
 * (which reads the previous position's k and v) into a shifted state leaves one rank-r update per position:
 *
 *     u_t = alpha_t u_{t-1} + sum_r V_t[r] K_t[r]^T        (u (p, n) per head; K already scaled by the wrapper)
 *     Y_t[R] = u_t Q_t[R]                                   (R over the same r ranks)
 *
 * (kernels/mamba3/native_ops.py derives it: u_t = h_t + (1 - lam_{t+1}) dt_{t+1} KV_t.) Every (segment, head)
 * walks independently: a segment is a batch row, or one sequence of a packed row, entered from its own state.
 *
 * Layouts (all contiguous, T = float or double): alpha (b, l, h); V, Y (b, l, r, h, p); K, Q (b, l, r, h, n);
 * Hin, HT (nseg, h, p, n); checkpoints (sum of ceil(len / every) over segments, h, p, n), the state entering
 * every block of `every` positions, stored when the backward will run. The backward re-walks one block at a
 * time from its checkpoint into a per-thread buffer and walks the block in reverse with the adjoint state
 * dU (p, n): dU += sum_R dY_t[R] Q_t[R]^T; dQ_t[R] = u_t^T dY_t[R]; dV_t[r] = dU K_t[r]; dK_t[r] = dU^T V_t[r];
 * dalpha_t = <dU, u_{t-1}>; dU *= alpha_t; at the segment start dHin = dU.
 *
 * The decode step (mamba3_step_*) is the whole reference step of one position in one call: angle update,
 * rotations, trapezoid update with the two rank-r terms, D, gate and MIMO projections (no autograd).
 */
#include <stdlib.h>

#include "seqlab_native.h"

#define M3_TWO_PI 6.283185307179586476925286766559
#define M3_PI 3.1415926535897932384626433832795

SL_EXPORT int mamba3_abi(void) { return SEQLAB_NATIVE_ABI; }

/* ------------------------------------------------------------------------------------------ the recurrence */

#define M3_FWD(T, SUF)                                                                                         \
    SL_EXPORT void mamba3_fwd_##SUF(int64_t nseg, const int64_t *seg_b, const int64_t *seg_start,              \
                                    const int64_t *seg_len, const int64_t *seg_ck, int64_t L, int64_t H,       \
                                    int64_t P, int64_t N, int64_t R, const T *Hin, const T *alpha,             \
                                    const T *V, const T *K, const T *Q, T *Y, T *HT, T *ckpt, int64_t every,   \
                                    int nthreads) {                                                            \
        const int64_t PN = P * N;                                                                              \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nthreads)")                    \
        for (int64_t s = 0; s < nseg; s++) {                                                                   \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                T *restrict u = HT + (s * H + hh) * PN;                                                        \
                if (Hin)                                                                                       \
                    memcpy(u, Hin + (s * H + hh) * PN, sizeof(T) * PN);                                        \
                else                                                                                           \
                    memset(u, 0, sizeof(T) * PN);                                                              \
                const int64_t b = seg_b[s], t0 = seg_start[s], len = seg_len[s];                               \
                for (int64_t tt = 0; tt < len; tt++) {                                                         \
                    if (ckpt && tt % every == 0)                                                               \
                        memcpy(ckpt + ((seg_ck[s] + tt / every) * H + hh) * PN, u, sizeof(T) * PN);            \
                    const int64_t bt = b * L + t0 + tt;                                                        \
                    const T a = alpha[bt * H + hh];                                                            \
                    const T *Vt = V + bt * R * H * P + hh * P;                                                 \
                    const T *Kt = K + bt * R * H * N + hh * N;                                                 \
                    const T *Qt = Q + bt * R * H * N + hh * N;                                                 \
                    T *Yt = Y + bt * R * H * P + hh * P;                                                       \
                    if (R == 1) {                                                                              \
                        const T *restrict k0 = Kt, *restrict q0 = Qt;                                          \
                        for (int64_t i = 0; i < P; i++) {                                                      \
                            T *restrict ui = u + i * N;                                                        \
                            const T v0 = Vt[i];                                                                \
                            T acc = 0;                                                                         \
                            _Pragma("omp simd reduction(+ : acc)")                                            \
                            for (int64_t j = 0; j < N; j++) {                                                  \
                                const T nv = a * ui[j] + v0 * k0[j];                                           \
                                ui[j] = nv;                                                                    \
                                acc += nv * q0[j];                                                             \
                            }                                                                                  \
                            Yt[i] = acc;                                                                       \
                        }                                                                                      \
                    } else {                                                                                   \
                        for (int64_t i = 0; i < P; i++) {                                                      \
                            T *restrict ui = u + i * N;                                                        \
                            _Pragma("omp simd")                                                               \
                            for (int64_t j = 0; j < N; j++) ui[j] *= a;                                        \
                            for (int64_t r = 0; r < R; r++) {                                                  \
                                const T vr = Vt[r * H * P + i];                                                \
                                const T *restrict kr = Kt + r * H * N;                                         \
                                _Pragma("omp simd")                                                           \
                                for (int64_t j = 0; j < N; j++) ui[j] += vr * kr[j];                           \
                            }                                                                                  \
                            for (int64_t r = 0; r < R; r++) {                                                  \
                                const T *restrict qr = Qt + r * H * N;                                         \
                                T acc = 0;                                                                     \
                                _Pragma("omp simd reduction(+ : acc)")                                        \
                                for (int64_t j = 0; j < N; j++) acc += ui[j] * qr[j];                          \
                                Yt[r * H * P + i] = acc;                                                       \
                            }                                                                                  \
                        }                                                                                      \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

M3_FWD(float, f32)
M3_FWD(double, f64)

/* One position's state from the previous one (the backward's re-walk): out = a * prev + sum_r V[r] K[r]^T. */
#define M3_STEP_STATE(T, out, prev, a, Vt, Kt)                                                                 \
    do {                                                                                                       \
        for (int64_t i = 0; i < P; i++) {                                                                      \
            T *restrict oi = (out) + i * N;                                                                    \
            const T *restrict pi_ = (prev) + i * N;                                                            \
            const T v0 = (Vt)[i];                                                                              \
            const T *restrict k0 = (Kt);                                                                       \
            _Pragma("omp simd")                                                                               \
            for (int64_t j = 0; j < N; j++) oi[j] = (a) * pi_[j] + v0 * k0[j];                                 \
            for (int64_t r = 1; r < R; r++) {                                                                  \
                const T vr = (Vt)[r * H * P + i];                                                              \
                const T *restrict kr = (Kt) + r * H * N;                                                       \
                _Pragma("omp simd")                                                                           \
                for (int64_t j = 0; j < N; j++) oi[j] += vr * kr[j];                                           \
            }                                                                                                  \
        }                                                                                                      \
    } while (0)

#define M3_BWD(T, SUF)                                                                                         \
    SL_EXPORT int mamba3_bwd_##SUF(int64_t nseg, const int64_t *seg_b, const int64_t *seg_start,               \
                                   const int64_t *seg_len, const int64_t *seg_ck, int64_t L, int64_t H,        \
                                   int64_t P, int64_t N, int64_t R, const T *alpha, const T *V, const T *K,    \
                                   const T *Q, const T *ckpt, int64_t every, const T *dY, const T *dHT,        \
                                   T *dHin, T *dalpha, T *dV, T *dK, T *dQ, int nthreads) {                    \
        const int64_t PN = P * N;                                                                              \
        int failed = 0;                                                                                        \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nthreads)")                    \
        for (int64_t s = 0; s < nseg; s++) {                                                                   \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                /* the adjoint state and the re-walked states of one block */                                  \
                T *dU = (T *)malloc(sizeof(T) * PN * (every + 1));                                             \
                if (!dU) {                                                                                     \
                    _Pragma("omp atomic write") failed = 1;                                                    \
                    continue;                                                                                  \
                }                                                                                              \
                T *buf = dU + PN;                                                                              \
                if (dHT)                                                                                       \
                    memcpy(dU, dHT + (s * H + hh) * PN, sizeof(T) * PN);                                       \
                else                                                                                           \
                    memset(dU, 0, sizeof(T) * PN);                                                             \
                const int64_t b = seg_b[s], t0 = seg_start[s], len = seg_len[s];                               \
                const int64_t nblk = (len + every - 1) / every;                                                \
                for (int64_t c = nblk - 1; c >= 0; c--) {                                                      \
                    const int64_t c0 = c * every, c1 = (c0 + every < len) ? c0 + every : len;                  \
                    const T *entry = ckpt + ((seg_ck[s] + c) * H + hh) * PN;                                   \
                    for (int64_t tt = c0; tt < c1; tt++) {                                                     \
                        const int64_t bt = b * L + t0 + tt;                                                    \
                        const T a = alpha[bt * H + hh];                                                        \
                        const T *prev = tt == c0 ? entry : buf + (tt - c0 - 1) * PN;                           \
                        M3_STEP_STATE(T, buf + (tt - c0) * PN, prev, a, V + bt * R * H * P + hh * P,           \
                                      K + bt * R * H * N + hh * N);                                            \
                    }                                                                                          \
                    for (int64_t tt = c1 - 1; tt >= c0; tt--) {                                                \
                        const int64_t bt = b * L + t0 + tt;                                                    \
                        const T a = alpha[bt * H + hh];                                                        \
                        const T *ut = buf + (tt - c0) * PN;                                                    \
                        const T *up = tt == c0 ? entry : buf + (tt - c0 - 1) * PN;                             \
                        const int64_t vo = bt * R * H * P + hh * P, ko = bt * R * H * N + hh * N;              \
                        for (int64_t r = 0; r < R; r++) {                                                      \
                            memset(dQ + ko + r * H * N, 0, sizeof(T) * N);                                     \
                            memset(dK + ko + r * H * N, 0, sizeof(T) * N);                                     \
                        }                                                                                      \
                        T da = 0;                                                                              \
                        for (int64_t i = 0; i < P; i++) {                                                      \
                            T *restrict di = dU + i * N;                                                       \
                            const T *restrict uti = ut + i * N;                                                \
                            const T *restrict upi = up + i * N;                                                \
                            if (R == 1) {                                                                      \
                                const T g0 = dY[vo + i], v0 = V[vo + i];                                       \
                                const T *restrict q0 = Q + ko, *restrict k0 = K + ko;                          \
                                T *restrict dq0 = dQ + ko, *restrict dk0 = dK + ko;                            \
                                T sdv = 0, sda = 0;                                                            \
                                _Pragma("omp simd reduction(+ : sdv, sda)")                                   \
                                for (int64_t j = 0; j < N; j++) {                                              \
                                    const T d = di[j] + g0 * q0[j];                                            \
                                    dq0[j] += g0 * uti[j];                                                     \
                                    sdv += d * k0[j];                                                          \
                                    dk0[j] += v0 * d;                                                          \
                                    sda += d * upi[j];                                                         \
                                    di[j] = a * d;                                                             \
                                }                                                                              \
                                dV[vo + i] = sdv;                                                              \
                                da += sda;                                                                     \
                            } else {                                                                           \
                                for (int64_t r = 0; r < R; r++) {                                              \
                                    const T g = dY[vo + r * H * P + i];                                        \
                                    const T *restrict qr = Q + ko + r * H * N;                                 \
                                    T *restrict dqr = dQ + ko + r * H * N;                                     \
                                    _Pragma("omp simd")                                                       \
                                    for (int64_t j = 0; j < N; j++) {                                          \
                                        di[j] += g * qr[j];                                                    \
                                        dqr[j] += g * uti[j];                                                  \
                                    }                                                                          \
                                }                                                                              \
                                for (int64_t r = 0; r < R; r++) {                                              \
                                    const T vr = V[vo + r * H * P + i];                                        \
                                    const T *restrict kr = K + ko + r * H * N;                                 \
                                    T *restrict dkr = dK + ko + r * H * N;                                     \
                                    T sdv = 0;                                                                 \
                                    _Pragma("omp simd reduction(+ : sdv)")                                    \
                                    for (int64_t j = 0; j < N; j++) {                                          \
                                        sdv += di[j] * kr[j];                                                  \
                                        dkr[j] += vr * di[j];                                                  \
                                    }                                                                          \
                                    dV[vo + r * H * P + i] = sdv;                                              \
                                }                                                                              \
                                T sda = 0;                                                                     \
                                _Pragma("omp simd reduction(+ : sda)")                                        \
                                for (int64_t j = 0; j < N; j++) {                                              \
                                    sda += di[j] * upi[j];                                                     \
                                    di[j] *= a;                                                                \
                                }                                                                              \
                                da += sda;                                                                     \
                            }                                                                                  \
                        }                                                                                      \
                        dalpha[bt * H + hh] = da;                                                              \
                    }                                                                                          \
                }                                                                                              \
                if (dHin) memcpy(dHin + (s * H + hh) * PN, dU, sizeof(T) * PN);                                \
                free(dU);                                                                                      \
            }                                                                                                  \
        }                                                                                                      \
        return failed ? -1 : 0;                                                                                \
    }

M3_BWD(float, f32)
M3_BWD(double, f64)

/* ------------------------------------------------------------------------------------ the fused decode step */

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

/* Inputs contiguous in the compute dtype: angle_s (b, h, a), ssm_s (b, h, p, n), k_s (b, r, h, n),
 * v_s (b, h, p); x, z (b, h, p); dt, A, trap (b, h); B, C (b, r, g, n); angles (b, a); Bb, Cb (h, r, n);
 * D (h) or NULL; z, mx, mz, mo (h, r, p) or NULL. Outputs: y (b, h, p), or (b, r, h, p) when per_rank;
 * the new state parts (same shapes as the old ones). */
#define M3_DECODE(T, SUF, EXP, TANH, COS, SIN, FLOOR, SILU, SIGMOID)                                           \
    SL_EXPORT void mamba3_step_##SUF(                                                                          \
        int64_t Bsz, int64_t H, int64_t P, int64_t N, int64_t R, int64_t G, int64_t A_, const T *angle_s,      \
        const T *ssm_s, const T *k_s, const T *v_s, const T *x, const T *dt, const T *Arate, const T *Bm,      \
        const T *Cm, const T *trap, const T *angles, const T *Bb, const T *Cb, const T *D, const T *z,         \
        const T *mx, const T *mz, const T *mo, int per_rank, T *y, T *angle_o, T *ssm_o, T *k_o, T *v_o,       \
        int nthreads) {                                                                                        \
        const int mimo = R > 1;                                                                                \
        const int64_t PN = P * N, hpg = H / G;                                                                 \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(nthreads)")                        \
        for (int64_t b = 0; b < Bsz; b++) {                                                                    \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                const int64_t bh = b * H + hh, gi = hh / hpg;                                                  \
                const T d = dt[bh];                                                                            \
                T *ang = angle_o + bh * A_;                                                                    \
                for (int64_t m = 0; m < A_; m++) {                                                             \
                    const T v = angle_s[bh * A_ + m] + TANH(angles[b * A_ + m]) * (T)M3_PI * d;                \
                    ang[m] = v - (T)M3_TWO_PI * FLOOR(v / (T)M3_TWO_PI);                                       \
                }                                                                                              \
                T *kq = (T *)malloc(sizeof(T) * (2 * R * N + 2 * R * P + N));                                  \
                if (!kq) continue; /* unreachable in practice: a few KiB */                                    \
                T *q = kq + R * N, *vp = q + R * N, *vn = vp + R * P, *tmp = vn + R * P;                       \
                for (int64_t r = 0; r < R; r++) {                                                              \
                    const T *braw = Bm + ((b * R + r) * G + gi) * N, *bb = Bb + (hh * R + r) * N;              \
                    for (int64_t j = 0; j < N; j++) tmp[j] = braw[j] + bb[j];                                  \
                    T *kr = k_o + ((b * R + r) * H + hh) * N;                                                  \
                    M3_ROTATE(T, COS, SIN, kr, tmp, ang, A_, N, mimo);                                         \
                    const T *craw = Cm + ((b * R + r) * G + gi) * N, *cb = Cb + (hh * R + r) * N;              \
                    for (int64_t j = 0; j < N; j++) tmp[j] = craw[j] + cb[j];                                  \
                    M3_ROTATE(T, COS, SIN, q + r * N, tmp, ang, A_, N, mimo);                                  \
                    for (int64_t i = 0; i < P; i++) {                                                          \
                        const T w = mx ? mx[(hh * R + r) * P + i] : (T)1;                                      \
                        vp[r * P + i] = v_s[bh * P + i] * w;                                                   \
                        vn[r * P + i] = x[bh * P + i] * w;                                                     \
                    }                                                                                          \
                }                                                                                              \
                const T lam = SIGMOID(trap[bh]), alpha = EXP(Arate[bh] * d);                                   \
                const T beta = ((T)1 - lam) * d * alpha, gamma = lam * d;                                      \
                for (int64_t i = 0; i < P; i++) v_o[bh * P + i] = x[bh * P + i];                               \
                T *hn = ssm_o + bh * PN;                                                                       \
                const T *ho = ssm_s + bh * PN;                                                                 \
                for (int64_t i = 0; i < P; i++) {                                                              \
                    T *restrict hi = hn + i * N;                                                               \
                    const T *restrict oi = ho + i * N;                                                         \
                    _Pragma("omp simd")                                                                       \
                    for (int64_t j = 0; j < N; j++) hi[j] = alpha * oi[j];                                     \
                    for (int64_t r = 0; r < R; r++) {                                                          \
                        const T cp = beta * vp[r * P + i], cn = gamma * vn[r * P + i];                         \
                        const T *restrict kp = k_s + ((b * R + r) * H + hh) * N;                               \
                        const T *restrict kn = k_o + ((b * R + r) * H + hh) * N;                               \
                        _Pragma("omp simd")                                                                   \
                        for (int64_t j = 0; j < N; j++) hi[j] += cp * kp[j] + cn * kn[j];                      \
                    }                                                                                          \
                }                                                                                              \
                for (int64_t i = 0; i < P; i++) {                                                              \
                    const T *restrict hi = hn + i * N;                                                         \
                    T out = 0;                                                                                 \
                    for (int64_t r = 0; r < R; r++) {                                                          \
                        const T *restrict qr = q + r * N;                                                      \
                        T acc = 0;                                                                             \
                        _Pragma("omp simd reduction(+ : acc)")                                                \
                        for (int64_t j = 0; j < N; j++) acc += hi[j] * qr[j];                                  \
                        if (D) acc += D[hh] * vn[r * P + i];                                                   \
                        if (z) {                                                                               \
                            const T zz = z[bh * P + i] * (mz ? mz[(hh * R + r) * P + i] : (T)1);               \
                            acc *= SILU(zz);                                                                   \
                        }                                                                                      \
                        if (per_rank)                                                                          \
                            y[((b * R + r) * H + hh) * P + i] = acc;                                           \
                        else                                                                                   \
                            out += (mo ? mo[(hh * R + r) * P + i] : (T)1) * acc;                               \
                    }                                                                                          \
                    if (!per_rank) y[bh * P + i] = out;                                                        \
                }                                                                                              \
                free(kq);                                                                                      \
            }                                                                                                  \
        }                                                                                                      \
    }

M3_DECODE(float, f32, expf, tanhf, cosf, sinf, floorf, sl_silu_f, sl_sigmoid_f)
M3_DECODE(double, f64, exp, tanh, cos, sin, floor, sl_silu_d, sl_sigmoid_d)
