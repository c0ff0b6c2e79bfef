/* Mamba-3 scan on the CPU: the recurrence (forward, checkpointed backward), the angle walk and the rotations of
 * B and C (each with its backward), and the fused one-step decode update.
 *
 * kernels/mamba3/native_ops.py wraps each kernel in an autograd.Function and does the remaining O(l h p)
 * elementwise work with torch ops (trapezoid coefficients, the gate, mimo_o). Folding the trapezoid's beta term
 * (which reads the previous position's k and v) into a shifted state u_t = h_t + c_t KV_t (c_t =
 * (1 - lam_{t+1}) dt_{t+1}, 0 at a sequence's last position) leaves one rank-r update per position:
 *
 *     u_t = alpha_t u_{t-1} + w_t sum_r V_t[r] K_t[r]^T                  (u (p, n) per head; w = gamma + c)
 *     Y_t[R] = u_t Q_t[R] - c_t sum_r (K_t[r] . Q_t[R]) V_t[r] + D V_t[R]      (R over the same r ranks)
 *
 * Every (segment, head) walks independently: a segment is a batch row, or one sequence of a packed row,
 * entered from its own state (Hin: the initial state with the first position's beta term folded in).
 *
 * Layouts (all contiguous, T = float or double): alpha, w, c (b, l, h); V, Y (b, l, r, h, p); K, Q
 * (b, l, r, h, n); Hin, HT (nseg, h, p, n); checkpoints (sum of ceil(len / every) over segments, h, p, n), the
 * state entering every block of `every` positions, stored when the backward will run. The backward re-walks
 * one block at a time from its checkpoint into a per-thread buffer and walks the block in reverse with the
 * adjoint state dU (p, n): dU += sum_R dY_t[R] Q_t[R]^T; dQ_t[R] = u_t^T dY_t[R]; dV_t[r] = w_t dU K_t[r];
 * dK_t[r] = w_t dU^T V_t[r]; dw_t = sum_r V_t[r] . dU K_t[r]; dalpha_t = <dU, u_{t-1}>; dU *= alpha_t (plus
 * the correction's and D's terms); at the segment start dHin = dU.
 *
 * The decode step (mamba3_step_*) is the whole reference step of one position in one call: angle update,
 * rotations, trapezoid update with the two rank-r terms, D, gate and MIMO projections (no autograd).
 */
#include <stdlib.h>

#include "seqlab_native.h"
#include "seqlab_mamba3_head.h"

SL_EXPORT int mamba3_abi(void) { return SEQLAB_NATIVE_ABI; }

/* ------------------------------------------------------------------------------------------ the recurrence */

/* The hot inner loops as functions: restrict on parameters is what lets gcc vectorise them without alias checks. */
#define M3_ROWS(T, SUF)                                                                                        \
    /* u = a u + vw k (in place); returns u . q */                                                             \
    static inline T m3_row_fwd_##SUF(T *restrict u, const T *restrict k, const T *restrict q, T a, T vw,       \
                                     int64_t n) {                                                              \
        T acc = 0;                                                                                             \
        _Pragma("omp simd reduction(+ : acc)")                                                                \
        for (int64_t j = 0; j < n; j++) {                                                                      \
            const T nv = a * u[j] + vw * k[j];                                                                 \
            u[j] = nv;                                                                                         \
            acc += nv * q[j];                                                                                  \
        }                                                                                                      \
        return acc;                                                                                            \
    }                                                                                                          \
    /* the backward of one row of m3_row_fwd (SISO): d = du + g q; dq += g ut; dk += vw d; du = a d;            \
     * returns d . k in *sdv and d . up in *sda */                                                             \
    static inline void m3_row_bwd_##SUF(T *restrict du, const T *restrict q, const T *restrict k,             \
                                        const T *restrict ut, const T *restrict up, T *restrict dq,            \
                                        T *restrict dk, T g, T vw, T a, int64_t n, T *sdv_out, T *sda_out) {   \
        T sdv = 0, sda = 0;                                                                                    \
        _Pragma("omp simd reduction(+ : sdv, sda)")                                                           \
        for (int64_t j = 0; j < n; j++) {                                                                      \
            const T d = du[j] + g * q[j];                                                                      \
            dq[j] += g * ut[j];                                                                                \
            sdv += d * k[j];                                                                                   \
            dk[j] += vw * d;                                                                                   \
            sda += d * up[j];                                                                                  \
            du[j] = a * d;                                                                                     \
        }                                                                                                      \
        *sdv_out = sdv;                                                                                        \
        *sda_out = sda;                                                                                        \
    }                                                                                                          \
    /* out = a prev + vw k */                                                                                  \
    static inline void m3_row_axpby_##SUF(T *restrict out, const T *restrict prev, const T *restrict k, T a,  \
                                          T vw, int64_t n) {                                                   \
        _Pragma("omp simd")                                                                                   \
        for (int64_t j = 0; j < n; j++) out[j] = a * prev[j] + vw * k[j];                                      \
    }

M3_ROWS(float, f32)
M3_ROWS(double, f64)

/* Small per-(sequence, head) scratch: kq[r][R] = k[r] . q[R] and vdy[r][R] = v[r] . dY[R]. */
#define M3_DOTS(T, out, X, xs, Yv, ys, R, LEN)                                                                 \
    do {                                                                                                       \
        for (int64_t r_ = 0; r_ < (R); r_++)                                                                   \
            for (int64_t R_ = 0; R_ < (R); R_++) {                                                             \
                const T *restrict xa = (X) + r_ * (xs), *restrict yb = (Yv) + R_ * (ys);                       \
                T acc_ = 0;                                                                                    \
                _Pragma("omp simd reduction(+ : acc_)")                                                       \
                for (int64_t j_ = 0; j_ < (LEN); j_++) acc_ += xa[j_] * yb[j_];                                \
                (out)[r_ * (R) + R_] = acc_;                                                                   \
            }                                                                                                  \
    } while (0)

#define M3_FWD(T, SUF)                                                                                         \
    SL_EXPORT int mamba3_fwd_##SUF(int64_t nseg, const int64_t *seg_b, const int64_t *seg_start,               \
                                   const int64_t *seg_len, const int64_t *seg_ck, int64_t L, int64_t H,        \
                                   int64_t P, int64_t N, int64_t R, const T *Hin, const T *alpha, const T *w,  \
                                   const T *cc, const T *Dh, const T *V, const T *K, const T *Q, T *Y, T *HT, T *ckpt,      \
                                   int64_t every, int nthreads) {                                              \
        const int64_t PN = P * N, RHP = R * H * P, RHN = R * H * N;                                            \
        int failed = 0;                                                                                        \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nthreads)")                    \
        for (int64_t s = 0; s < nseg; s++) {                                                                   \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                T *kq = (T *)malloc(sizeof(T) * R * R);                                                        \
                if (!kq) {                                                                                     \
                    _Pragma("omp atomic write") failed = 1;                                                    \
                    continue;                                                                                  \
                }                                                                                              \
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
                    const T a = alpha[bt * H + hh], wt = w[bt * H + hh], ct = cc[bt * H + hh];                 \
                    const T *Vt = V + bt * RHP + hh * P;                                                       \
                    const T *Kt = K + bt * RHN + hh * N;                                                       \
                    const T *Qt = Q + bt * RHN + hh * N;                                                       \
                    T *Yt = Y + bt * RHP + hh * P;                                                             \
                    M3_DOTS(T, kq, Kt, H * N, Qt, H * N, R, N);                                                \
                    if (R == 1) {                                                                              \
                        const T *restrict k0 = Kt, *restrict q0 = Qt;                                          \
                        const T corr = ct * kq[0] - (Dh ? Dh[hh] : (T)0);                                      \
                        for (int64_t i = 0; i < P; i++)                                                        \
                            Yt[i] = m3_row_fwd_##SUF(u + i * N, k0, q0, a, wt * Vt[i], N) - corr * Vt[i];      \
                    } else {                                                                                   \
                        for (int64_t i = 0; i < P; i++) {                                                      \
                            T *restrict ui = u + i * N;                                                        \
                            _Pragma("omp simd")                                                               \
                            for (int64_t j = 0; j < N; j++) ui[j] *= a;                                        \
                            for (int64_t r = 0; r < R; r++) {                                                  \
                                const T vr = wt * Vt[r * H * P + i];                                           \
                                const T *restrict kr = Kt + r * H * N;                                         \
                                _Pragma("omp simd")                                                           \
                                for (int64_t j = 0; j < N; j++) ui[j] += vr * kr[j];                           \
                            }                                                                                  \
                            for (int64_t R2 = 0; R2 < R; R2++) {                                               \
                                const T *restrict qr = Qt + R2 * H * N;                                        \
                                T acc = 0;                                                                     \
                                _Pragma("omp simd reduction(+ : acc)")                                        \
                                for (int64_t j = 0; j < N; j++) acc += ui[j] * qr[j];                          \
                                for (int64_t r = 0; r < R; r++) acc -= ct * kq[r * R + R2] * Vt[r * H * P + i]; \
                                if (Dh) acc += Dh[hh] * Vt[R2 * H * P + i];                                    \
                                Yt[R2 * H * P + i] = acc;                                                      \
                            }                                                                                  \
                        }                                                                                      \
                    }                                                                                          \
                }                                                                                              \
                free(kq);                                                                                      \
            }                                                                                                  \
        }                                                                                                      \
        return failed ? -1 : 0;                                                                                \
    }

M3_FWD(float, f32)
M3_FWD(double, f64)

/* One position's state from the previous one (the backward's re-walk): out = a prev + wt sum_r V[r] K[r]^T. */
#define M3_STEP_STATE(T, SUF, out, prev, a, wt, Vt, Kt)                                                             \
    do {                                                                                                       \
        for (int64_t i = 0; i < P; i++) {                                                                      \
            T *restrict oi = (out) + i * N;                                                                    \
            const T *restrict pi_ = (prev) + i * N;                                                            \
            m3_row_axpby_##SUF(oi, pi_, (Kt), (a), (wt) * (Vt)[i], N);                                         \
            for (int64_t r = 1; r < R; r++) {                                                                  \
                const T vr = (wt) * (Vt)[r * H * P + i];                                                       \
                const T *restrict kr = (Kt) + r * H * N;                                                       \
                _Pragma("omp simd")                                                                           \
                for (int64_t j = 0; j < N; j++) oi[j] += vr * kr[j];                                           \
            }                                                                                                  \
        }                                                                                                      \
    } while (0)

#define M3_BWD(T, SUF)                                                                                         \
    SL_EXPORT int mamba3_bwd_##SUF(int64_t nseg, const int64_t *seg_b, const int64_t *seg_start,               \
                                   const int64_t *seg_len, const int64_t *seg_ck, int64_t L, int64_t H,        \
                                   int64_t P, int64_t N, int64_t R, const T *alpha, const T *w, const T *cc,   \
                                   const T *Dh, const T *V, const T *K, const T *Q, const T *ckpt, int64_t every,           \
                                   const T *dY, const T *dHT, T *dHin, T *dalpha, T *dw, T *dcc, T *dV,        \
                                   T *dK, T *dQ, T *dDp, int nthreads) {                                               \
        const int64_t PN = P * N, RHP = R * H * P, RHN = R * H * N;                                            \
        int failed = 0;                                                                                        \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nthreads)")                    \
        for (int64_t s = 0; s < nseg; s++) {                                                                   \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                /* the adjoint state, the re-walked states of one block, and kq / vdy */                       \
                T *dU = (T *)malloc(sizeof(T) * (PN * (every + 1) + 2 * R * R));                               \
                if (!dU) {                                                                                     \
                    _Pragma("omp atomic write") failed = 1;                                                    \
                    continue;                                                                                  \
                }                                                                                              \
                T *buf = dU + PN, *kq = buf + PN * every, *vdy = kq + R * R;                                   \
                if (dHT)                                                                                       \
                    memcpy(dU, dHT + (s * H + hh) * PN, sizeof(T) * PN);                                       \
                else                                                                                           \
                    memset(dU, 0, sizeof(T) * PN);                                                             \
                const int64_t b = seg_b[s], t0 = seg_start[s], len = seg_len[s];                               \
                const int64_t nblk = (len + every - 1) / every;                                                \
                const T Dv = Dh ? Dh[hh] : (T)0;                                                               \
                T dDacc = 0;                                                                                   \
                for (int64_t c = nblk - 1; c >= 0; c--) {                                                      \
                    const int64_t c0 = c * every, c1 = (c0 + every < len) ? c0 + every : len;                  \
                    const T *entry = ckpt + ((seg_ck[s] + c) * H + hh) * PN;                                   \
                    for (int64_t tt = c0; tt < c1; tt++) {                                                     \
                        const int64_t bt = b * L + t0 + tt;                                                    \
                        const T *prev = tt == c0 ? entry : buf + (tt - c0 - 1) * PN;                           \
                        M3_STEP_STATE(T, SUF, buf + (tt - c0) * PN, prev, alpha[bt * H + hh], w[bt * H + hh],       \
                                      V + bt * RHP + hh * P, K + bt * RHN + hh * N);                           \
                    }                                                                                          \
                    for (int64_t tt = c1 - 1; tt >= c0; tt--) {                                                \
                        const int64_t bt = b * L + t0 + tt;                                                    \
                        const T a = alpha[bt * H + hh], wt = w[bt * H + hh], ct = cc[bt * H + hh];             \
                        const T *ut = buf + (tt - c0) * PN;                                                    \
                        const T *up = tt == c0 ? entry : buf + (tt - c0 - 1) * PN;                             \
                        const int64_t vo = bt * RHP + hh * P, ko = bt * RHN + hh * N;                          \
                        /* the correction y[R] -= c sum_r (k[r] . q[R]) v[r]: its gradients first */           \
                        M3_DOTS(T, kq, K + ko, H * N, Q + ko, H * N, R, N);                                    \
                        M3_DOTS(T, vdy, V + vo, H * P, dY + vo, H * P, R, P);                                  \
                        T dct = 0;                                                                             \
                        for (int64_t x_ = 0; x_ < R * R; x_++) dct -= kq[x_] * vdy[x_];                        \
                        dcc[bt * H + hh] = dct;                                                                \
                        for (int64_t r = 0; r < R; r++) dDacc += vdy[r * R + r];                               \
                        for (int64_t r = 0; r < R; r++) {                                                      \
                            T *restrict dkr = dK + ko + r * H * N, *restrict dqr = dQ + ko + r * H * N;        \
                            memset(dkr, 0, sizeof(T) * N);                                                     \
                            memset(dqr, 0, sizeof(T) * N);                                                     \
                            for (int64_t R2 = 0; R2 < R; R2++) {                                               \
                                const T fk = -ct * vdy[r * R + R2], fq = -ct * vdy[R2 * R + r];                \
                                const T *restrict qR = Q + ko + R2 * H * N, *restrict kR = K + ko + R2 * H * N; \
                                _Pragma("omp simd")                                                           \
                                for (int64_t j = 0; j < N; j++) {                                              \
                                    dkr[j] += fk * qR[j];                                                      \
                                    dqr[j] += fq * kR[j];                                                      \
                                }                                                                              \
                            }                                                                                  \
                        }                                                                                      \
                        T da = 0, dwt = 0;                                                                     \
                        for (int64_t i = 0; i < P; i++) {                                                      \
                            T *restrict di = dU + i * N;                                                       \
                            const T *restrict uti = ut + i * N;                                                \
                            const T *restrict upi = up + i * N;                                                \
                            if (R == 1) {                                                                      \
                                const T g0 = dY[vo + i], v0 = V[vo + i];                                       \
                                T sdv, sda;                                                                    \
                                m3_row_bwd_##SUF(di, Q + ko, K + ko, uti, upi, dQ + ko, dK + ko, g0, wt * v0, a, N, \
                                                 &sdv, &sda);                                                  \
                                dV[vo + i] = wt * sdv + (Dv - ct * kq[0]) * g0;                                \
                                dwt += v0 * sdv;                                                               \
                                da += sda;                                                                     \
                            } else {                                                                           \
                                for (int64_t R2 = 0; R2 < R; R2++) {                                           \
                                    const T g = dY[vo + R2 * H * P + i];                                       \
                                    const T *restrict qr = Q + ko + R2 * H * N;                                \
                                    T *restrict dqr = dQ + ko + R2 * H * N;                                    \
                                    _Pragma("omp simd")                                                       \
                                    for (int64_t j = 0; j < N; j++) {                                          \
                                        di[j] += g * qr[j];                                                    \
                                        dqr[j] += g * uti[j];                                                  \
                                    }                                                                          \
                                }                                                                              \
                                for (int64_t r = 0; r < R; r++) {                                              \
                                    const T vr = V[vo + r * H * P + i], vw = wt * vr;                          \
                                    const T *restrict kr = K + ko + r * H * N;                                 \
                                    T *restrict dkr = dK + ko + r * H * N;                                     \
                                    T sdv = 0;                                                                 \
                                    _Pragma("omp simd reduction(+ : sdv)")                                    \
                                    for (int64_t j = 0; j < N; j++) {                                          \
                                        sdv += di[j] * kr[j];                                                  \
                                        dkr[j] += vw * di[j];                                                  \
                                    }                                                                          \
                                    T corr = 0;                                                                \
                                    for (int64_t R2 = 0; R2 < R; R2++)                                         \
                                        corr += kq[r * R + R2] * dY[vo + R2 * H * P + i];                      \
                                    dV[vo + r * H * P + i] = wt * sdv - ct * corr + Dv * dY[vo + r * H * P + i]; \
                                    dwt += vr * sdv;                                                           \
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
                        dw[bt * H + hh] = dwt;                                                                 \
                    }                                                                                          \
                }                                                                                              \
                if (dHin) memcpy(dHin + (s * H + hh) * PN, dU, sizeof(T) * PN);                                \
                if (dDp) dDp[s * H + hh] = dDacc;                                                              \
                free(dU);                                                                                      \
            }                                                                                                  \
        }                                                                                                      \
        return failed ? -1 : 0;                                                                                \
    }

M3_BWD(float, f32)
M3_BWD(double, f64)

/* ------------------------------------------------------------------------------ the rotations of B and C */

/* K = rot(B[group of h] + Bb[h], angle[h]) and Q likewise from C, per position (b*l of them), rank and head.
 * B, C (BL, R, G, N); Bb, Cb (H, R, N); cos and sin of the angles (BL, H, A) (torch's vectorised cos/sin are
 * several times faster than libm's scalar calls); K, Q (BL, R, H, N). SISO pairs (2m, 2m + 1), MIMO
 * pairs (m, m + N/2); the other dims pass unrotated. */
#define M3_ROT_FWD(T, SUF)                                                                           \
    SL_EXPORT void mamba3_rot_fwd_##SUF(int64_t BL, int64_t R, int64_t G, int64_t H, int64_t N, int64_t A_,    \
                                        int mimo, const T *Bm, const T *Cm, const T *Bb, const T *Cb,          \
                                        const T *cosa, const T *sina, T *K, T *Q, int nthreads) {                              \
        const int64_t hpg = H / G;                                                                             \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                                    \
        for (int64_t bl = 0; bl < BL; bl++) {                                                                  \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                const T *cs = cosa + (bl * H + hh) * A_, *sn = sina + (bl * H + hh) * A_;                      \
                for (int64_t r = 0; r < R; r++) {                                                              \
                    for (int which = 0; which < 2; which++) {                                                  \
                        const T *src = (which ? Cm : Bm) + ((bl * R + r) * G + hh / hpg) * N;                  \
                        const T *bias = (which ? Cb : Bb) + (hh * R + r) * N;                                  \
                        T *out = (which ? Q : K) + ((bl * R + r) * H + hh) * N;                                \
                        _Pragma("omp simd")                                                                   \
                        for (int64_t j = 0; j < N; j++) out[j] = src[j] + bias[j];                             \
                        for (int64_t m = 0; m < A_; m++) {                                                     \
                            const int64_t i0 = mimo ? m : 2 * m, i1 = mimo ? m + N / 2 : 2 * m + 1;            \
                            const T x0 = out[i0], x1 = out[i1];                                                \
                            out[i0] = x0 * cs[m] - x1 * sn[m];                                                 \
                            out[i1] = x0 * sn[m] + x1 * cs[m];                                                 \
                        }                                                                                      \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

/* The backward: with dpre = rot^T(dK) per (position, rank, head), dB (BL, R, G, N) = dpre summed over the heads
 * of each group (one thread owns a position, so no two threads write one row), dBb (nthreads, H, R, N) = dpre
 * summed over the positions each thread ran (the caller sums the threads), likewise for C; and dcos, dsin
 * (BL, H, A): for a pair (k0, k1) = (u0 cos - u1 sin, u0 sin + u1 cos), d/dcos = dk0 u0 + dk1 u1 and
 * d/dsin = dk1 u0 - dk0 u1, summed over ranks and over K and Q. dK or dQ may be NULL (no gradient). */
#define M3_ROT_BWD(T, SUF)                                                                           \
    SL_EXPORT void mamba3_rot_bwd_##SUF(int64_t BL, int64_t R, int64_t G, int64_t H, int64_t N, int64_t A_,    \
                                        int mimo, const T *Bm, const T *Cm, const T *Bb, const T *Cb,          \
                                        const T *cosa, const T *sina, const T *dK, const T *dQ, T *dB, T *dC, T *dBb, T *dCb,  \
                                        T *dcos, T *dsin, int nthreads) {                                               \
        const int64_t hpg = H / G, HRN = H * R * N;                                                            \
        memset(dB, 0, sizeof(T) * BL * R * G * N);                                                             \
        memset(dC, 0, sizeof(T) * BL * R * G * N);                                                             \
        memset(dBb, 0, sizeof(T) * nthreads * HRN);                                                            \
        memset(dCb, 0, sizeof(T) * nthreads * HRN);                                                            \
        _Pragma("omp parallel num_threads(nthreads)")                                                         \
        {                                                                                                      \
            const int tid = omp_get_thread_num();                                                              \
            T tmp[N];                                                                                          \
            _Pragma("omp for schedule(static)")                                                               \
            for (int64_t bl = 0; bl < BL; bl++) {                                                              \
                for (int64_t hh = 0; hh < H; hh++) {                                                           \
                    const T *cs = cosa + (bl * H + hh) * A_, *sn = sina + (bl * H + hh) * A_;                  \
                    T *dc = dcos + (bl * H + hh) * A_, *ds = dsin + (bl * H + hh) * A_;                        \
                    for (int64_t m = 0; m < A_; m++) dc[m] = ds[m] = 0;                                        \
                    for (int64_t r = 0; r < R; r++) {                                                          \
                        for (int which = 0; which < 2; which++) {                                              \
                            const T *dsrc = which ? dQ : dK;                                                   \
                            if (!dsrc) continue;                                                               \
                            const int64_t grow = ((bl * R + r) * G + hh / hpg) * N;                            \
                            const T *src = (which ? Cm : Bm) + grow;                                           \
                            const T *bias = (which ? Cb : Bb) + (hh * R + r) * N;                              \
                            const T *d = dsrc + ((bl * R + r) * H + hh) * N;                                   \
                            memcpy(tmp, d, sizeof(T) * N);                                                     \
                            for (int64_t m = 0; m < A_; m++) {                                                 \
                                const int64_t i0 = mimo ? m : 2 * m, i1 = mimo ? m + N / 2 : 2 * m + 1;        \
                                const T u0 = src[i0] + bias[i0], u1 = src[i1] + bias[i1];                      \
                                const T d0 = d[i0], d1 = d[i1];                                                \
                                tmp[i0] = d0 * cs[m] + d1 * sn[m];                                             \
                                tmp[i1] = -d0 * sn[m] + d1 * cs[m];                                            \
                                dc[m] += d0 * u0 + d1 * u1;                                                    \
                                ds[m] += d1 * u0 - d0 * u1;                                                    \
                            }                                                                                  \
                            T *restrict drow = (which ? dC : dB) + grow;                                       \
                            T *restrict dbias = (which ? dCb : dBb) + tid * HRN + (hh * R + r) * N;            \
                            _Pragma("omp simd")                                                               \
                            for (int64_t j = 0; j < N; j++) {                                                  \
                                drow[j] += tmp[j];                                                             \
                                dbias[j] += tmp[j];                                                            \
                            }                                                                                  \
                        }                                                                                      \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

M3_ROT_FWD(float, f32)
M3_ROT_FWD(double, f64)
M3_ROT_BWD(float, f32)
M3_ROT_BWD(double, f64)

/* ------------------------------------------------------------------------------------ the fused decode step */

/* Inputs contiguous in the compute dtype: angle_s (b, h, a), ssm_s (b, h, p, n), k_s (b, r, h, n),
 * v_s (b, h, p); x, z (b, h, p); dt, A, trap (b, h); B, C (b, r, g, n); angles (b, a); Bb, Cb (h, r, n);
 * D (h) or NULL; z, mx, mz, mo (h, r, p) or NULL. Outputs: y (b, h, p), or (b, r, h, p) when per_rank;
 * the new state parts (same shapes as the old ones). Each (row, head) is seqlab_mamba3_head.h's m3_head. */
#define M3_DECODE(T, SUF, EXP, TANH, COS, SIN, FLOOR, SILU, SIGMOID)                                           \
    M3_HEAD(T, SUF, EXP, TANH, COS, SIN, FLOOR, SILU, SIGMOID)                                                 \
    SL_EXPORT void mamba3_step_##SUF(                                                                          \
        int64_t Bsz, int64_t H, int64_t P, int64_t N, int64_t R, int64_t G, int64_t A_, const T *angle_s,      \
        const T *ssm_s, const T *k_s, const T *v_s, const T *x, const T *dt, const T *Arate, const T *Bm,      \
        const T *Cm, const T *trap, const T *angles, const T *Bb, const T *Cb, const T *D, const T *z,         \
        const T *mx, const T *mz, const T *mo, int per_rank, T *y, T *angle_o, T *ssm_o, T *k_o, T *v_o,       \
        int nthreads) {                                                                                        \
        const int64_t PN = P * N, hpg = H / G;                                                                 \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(nthreads)")                        \
        for (int64_t b = 0; b < Bsz; b++) {                                                                    \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                const int64_t bh = b * H + hh, gi = hh / hpg;                                                  \
                T *scratch = (T *)malloc(sizeof(T) * (R * N + 2 * R * P + N));                                 \
                if (!scratch) continue; /* unreachable in practice: a few KiB */                               \
                T *yh = per_rank ? y + (b * R * H + hh) * P : y + bh * P;                                      \
                m3_head_##SUF(P, N, R, A_, angle_s + bh * A_, angle_o + bh * A_, ssm_s + bh * PN,              \
                              ssm_o + bh * PN, k_s + (b * R * H + hh) * N, k_o + (b * R * H + hh) * N, H * N,  \
                              v_s + bh * P, v_o + bh * P, x + bh * P, dt[bh], Arate[bh], trap[bh],             \
                              angles + b * A_, Bm + (b * R * G + gi) * N, Cm + (b * R * G + gi) * N, G * N,    \
                              Bb + hh * R * N, Cb + hh * R * N, D ? D + hh : NULL, z ? z + bh * P : NULL,      \
                              mx ? mx + hh * R * P : NULL, mz ? mz + hh * R * P : NULL,                        \
                              mo ? mo + hh * R * P : NULL, per_rank, yh, H * P, scratch);                      \
                free(scratch);                                                                                 \
            }                                                                                                  \
        }                                                                                                      \
    }

M3_DECODE(float, f32, expf, tanhf, cosf, sinf, floorf, sl_silu_f, sl_sigmoid_f)
M3_DECODE(double, f64, exp, tanh, cos, sin, floor, sl_silu_d, sl_sigmoid_d)

/* ------------------------------------------------------------------------------------------ the angle walk */

/* ang_t = (ang_{t-1} + inc_t) mod 2 pi per (sequence, head, pair), from ang0 (nseg, H, A) or 0; inc, ang
 * (b, L, H, A). The running angle is kept in double (a float32 angle would lose its low bits over a long
 * sequence), wrapped at every step as the reference does. The backward: the gradient of inc_t is the sum of
 * dang_s over s >= t in the same sequence (the wrap has slope 1); dang0 is that sum at the sequence start. */
#define M3_ANGLE(T, SUF)                                                                                       \
    SL_EXPORT void mamba3_angle_fwd_##SUF(int64_t nseg, const int64_t *seg_b, const int64_t *seg_start,        \
                                          const int64_t *seg_len, int64_t L, int64_t H, int64_t A_,            \
                                          const T *inc, const T *ang0, T *ang, int nthreads) {                 \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(nthreads)")                        \
        for (int64_t s = 0; s < nseg; s++) {                                                                   \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                const int64_t b = seg_b[s], t0 = seg_start[s], len = seg_len[s];                               \
                double cur[A_ > 0 ? A_ : 1];                                                                   \
                for (int64_t m = 0; m < A_; m++) cur[m] = ang0 ? (double)ang0[(s * H + hh) * A_ + m] : 0.0;    \
                for (int64_t tt = 0; tt < len; tt++) {                                                         \
                    const int64_t o = ((b * L + t0 + tt) * H + hh) * A_;                                       \
                    _Pragma("omp simd")                                                                       \
                    for (int64_t m = 0; m < A_; m++) {                                                         \
                        double v = cur[m] + (double)inc[o + m];                                                \
                        v -= M3_TWO_PI * floor(v / M3_TWO_PI);                                                 \
                        cur[m] = v;                                                                            \
                        ang[o + m] = (T)v;                                                                     \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    SL_EXPORT void mamba3_angle_bwd_##SUF(int64_t nseg, const int64_t *seg_b, const int64_t *seg_start,        \
                                          const int64_t *seg_len, int64_t L, int64_t H, int64_t A_,            \
                                          const T *dang, T *dinc, T *dang0, int nthreads) {                    \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(nthreads)")                        \
        for (int64_t s = 0; s < nseg; s++) {                                                                   \
            for (int64_t hh = 0; hh < H; hh++) {                                                               \
                const int64_t b = seg_b[s], t0 = seg_start[s], len = seg_len[s];                               \
                T g[A_ > 0 ? A_ : 1];                                                                          \
                for (int64_t m = 0; m < A_; m++) g[m] = 0;                                                     \
                for (int64_t tt = len - 1; tt >= 0; tt--) {                                                    \
                    const int64_t o = ((b * L + t0 + tt) * H + hh) * A_;                                       \
                    _Pragma("omp simd")                                                                       \
                    for (int64_t m = 0; m < A_; m++) {                                                         \
                        g[m] += dang[o + m];                                                                   \
                        dinc[o + m] = g[m];                                                                    \
                    }                                                                                          \
                }                                                                                              \
                if (dang0)                                                                                     \
                    for (int64_t m = 0; m < A_; m++) dang0[(s * H + hh) * A_ + m] = g[m];                      \
            }                                                                                                  \
        }                                                                                                      \
    }

M3_ANGLE(float, f32)
M3_ANGLE(double, f64)
