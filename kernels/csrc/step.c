/* The fused decode step of seqlab's Mamba blocks (seqlab/fused_step.py drives it).
 *
 * One call runs a run of consecutive Mamba-1 / Mamba-2 / Mamba-3 blocks for one token per row: per block
 *   h = RMSNorm(residual); mixer step on h; residual = residual + out_proj(...)
 *   and, for a block with a feed-forward, residual = residual + ffn(RMSNorm(residual)), ffn the gated MLP
 *   down(silu(gate) * up) or the mixture of experts (seqlab/ffn/moe.py at evaluation)
 * exactly as seqlab/blocks.py Block.step (GatedMLP, MoEFeedForward), Mamba1Mixer.step, Mamba2Mixer.step and
 * Mamba3Mixer.step compute it, in one OpenMP
 * parallel region (one fork per call, a barrier between phases) instead of about sixty small eager ops per
 * layer, whose per-op cost was most of a decode step at d_model 256.
 *
 * Semantics that are copied on purpose from the eager path (so that the float64 build matches it tightly):
 * - RMSNorm and Mamba-2's gated RMSNorm normalise in float32 whatever the model's dtype (seqlab/norm.py does;
 *   a float64 model gets its norms in float32, then multiplied by the float64 weight);
 * - the conv state is stored in float32 (the mixers return conv_state.float()), the scan state in the compute
 *   dtype;
 * - residual_in_fp32 rounds the residual to float32 before the add (Block._mix);
 * - the derived parameters (A = -exp(A_log.float()), D.float(), the dt bias .float()) are computed by the caller
 *   with the same torch ops and passed in, already in the compute dtype.
 * Sums run in another order than torch's BLAS, so float32 results agree to rounding, not bit for bit.
 *
 * Batch > 1: every projection is one GEMM over the batch rows (seqlab_gemm.h), so each weight row is read once
 * per call for all rows. The state passed in is read only; the new states go to separate buffers.
 */
#include <stdlib.h>

#include "seqlab_native.h"
#include "seqlab_gemm.h"
#include "seqlab_mamba3_head.h"
#include "seqlab_sample.h"

/* How a projection's weight is held (kind 0: the dense weight pointer of st_layer; 1: LASER's low-rank factors,
 * seqlab/posttrain/laser.py LowRankLinear, y = left (right x) + bias; 2: AQLM codes, seqlab/quant/linear.py
 * AQLMLinear, W[o, j g + i] = scales[o] * sum_m codebooks[m, codes[o, j, m], i]; 3: the dense weight pointer of
 * st_layer holds bfloat16, widened to T as the rows GEMM loads it: a bfloat16 model stepped in float32). For the
 * MoE's stacked experts, gu_q / down_q kind 3 says the same of ffn_gu_w / ffn_down_w. Every field is 8 bytes. */
typedef struct {
    int64_t kind, rank, n_codebooks, code_bits, group_size;
    const void *a;        /* low-rank: left (nout, rank); AQLM: codebooks (M, 2^B, g) */
    const void *b;        /* low-rank: right (rank, nin); AQLM: scales (nout) */
    const int32_t *codes; /* AQLM: (nout, nin / g, M) */
} st_proj;

/* One block's shapes and weight pointers, filled once per model by seqlab/fused_step.py (a ctypes Structure
 * with this exact layout: every field is 8 bytes). Pointers are to T (the compute dtype) unless noted. */
typedef struct {
    int64_t kind; /* 1: Mamba-1, 2: Mamba-2, 3: Mamba-3, 4: attention */
    int64_t d_model, d_inner, d_state, d_conv, dt_rank, nheads, headdim, ngroups;
    int64_t n_in;          /* rows of in_proj */
    int64_t conv_ch;       /* conv channels: d_inner (Mamba-1) or d_inner + 2 g n (Mamba-2) */
    int64_t residual_fp32; /* Block.residual_in_fp32 */
    int64_t gate_group;    /* Mamba-2's gated norm group size */
    double norm_eps, gate_eps;
    const void *norm_w, *in_w, *in_b, *conv_w, *conv_b, *x_w, *dt_w, *dt_b, *A, *D, *gate_w, *out_w, *out_b;
    /* The block's feed-forward after its RMSNorm (d_ffn 0: none): the gated MLP (seqlab/blocks.py GatedMLP) when
     * n_experts is 0, else the mixture of experts at evaluation (seqlab/ffn/moe.py: drop-free, token-local). */
    int64_t d_ffn;
    double ffn_eps;
    const void *ffn_norm_w; /* (d_model) */
    const void *ffn_gu_w;   /* MLP (2 d_ffn, d_model), MoE (n_experts, 2 d_ffn, d_model): gate rows, then up rows */
    const void *ffn_down_w; /* MLP (d_model, d_ffn), MoE (n_experts, d_model, d_ffn) */
    int64_t n_experts, top_k, renormalize;
    const float *router_w; /* (n_experts, d_model) float32: the router runs in float32 whatever T (route()) */
    /* Mamba-3 (kind 3; seqlab/mixers/mamba3.py): MIMO rank, rotary angles, the rate's activation (0: heavy tail,
     * 1: softplus), the gated RMSNorm before out_proj (its weight in gate_w, eps in gate_eps), the rate's floor,
     * B_norm's and C_norm's eps; the norms' weights (d_state), B_bias and C_bias (nheads, rank, d_state), the MIMO
     * projections (nheads, rank, headdim) or NULL. D and dt_b hold its D and dt_bias. */
    int64_t mimo_rank, n_angles, a_softplus, outproj_norm;
    double a_floor, b_eps, c_eps;
    const void *b_norm_w, *c_norm_w, *b_bias, *c_bias, *mimo_x, *mimo_z, *mimo_o;
    /* in_proj, x_proj, dt_proj, out_proj, the MLP's gate_up and down when not dense (kind 0: in_w ... ffn_down_w) */
    st_proj in_q, x_q, dt_q, out_q, gu_q, down_q;
    /* Attention (kind 4; seqlab/mixers/attention.py): nheads query heads, ngroups key/value heads, headdim, d_inner
     * = nheads headdim, n_in = (nheads + 2 ngroups) headdim; q_proj in in_w / in_b / in_q, o_proj in out_w / out_b /
     * out_q, k_proj and v_proj here; rope_dim rotated dims per head with their rope_dim / 2 frequencies (double:
     * the float32 inverse frequencies as AttentionMixer._frequencies holds them); window (0: none) for the greedy
     * loop, which sizes each step's cache itself (st_attn_slots); the other calls get the sizes in st_attn_io. */
    int64_t rope_dim, window;
    const double *inv_freq;
    const void *k_w, *k_b, *v_w, *v_b;
    st_proj k_q, v_q;
} st_layer;

/* Per block and call: the state read (conv float32, ssm T) and the new state written. */
typedef struct {
    const float *conv_in; /* Mamba-3: the angle (T) */
    float *conv_out;
    const void *ssm_in;
    void *ssm_out;
    const void *k_in; /* Mamba-3: the previous position's key and value (T) in and out; NULL otherwise */
    void *k_out;
    const void *v_in;
    void *v_out;
    int64_t unused[2]; /* st_attn_io's stride and start */
} st_io;

/* An attention block's st_io: its KV cache (batch, kv_heads, slots, headdim) in T read (slots_in slots) and
 * written (slots_out: min(max(seen) + 1, window, slots_in + 1), sized by the caller), seen (batch) in and out.
 * stride 0: k_in / v_in hold the old cache, k_out / v_out get the new one (a copy of the kept entries and this
 * token's). stride > 0 (the greedy loop): k_out / v_out are buffers of (batch, kv_heads, stride, headdim) holding
 * the old cache at slots [start, start + slots_in); this token's entry is written after it, in place, and the new
 * cache is the last slots_out entries there (k_in / v_in unused). */
typedef struct {
    const void *k_in;
    void *k_out;
    const void *v_in;
    void *v_out;
    const int64_t *seen_in;
    int64_t *seen_out;
    int64_t slots_in, slots_out, stride, start;
} st_attn_io;
_Static_assert(sizeof(st_attn_io) == sizeof(st_io), "an attention block's io takes one st_io");

/* The slots of the cache an attention step writes: the last min(max(seen) + 1, window, slots_in + 1) entries of
 * [old cache, this token], as seqlab/mixers/attention.py _cache_at keeps them. */
static int64_t st_attn_slots(const st_layer *L, const st_attn_io *a, int64_t batch) {
    int64_t top = 0;
    for (int64_t b = 0; b < batch; b++) top = a->seen_in[b] > top ? a->seen_in[b] : top;
    int64_t keep = top + 1 < a->slots_in + 1 ? top + 1 : a->slots_in + 1;
    return L->window > 0 && keep > L->window ? L->window : keep;
}

/* The widest attention head the fused step takes (a stack accumulator; seqlab/fused_step.py runs wider eagerly). */
#define ST_MAX_HEAD_DIM 256
/* Query heads of one key/value head whose attention runs in one pass over the cache (a stack accumulator each). */
#define ST_ATTN_HEADS 8

/* The LanguageModel around the blocks, for sl_lm_step (seqlab/fused_step.py's _LM: every field 8 bytes). */
typedef struct {
    int64_t vocab, d_model;
    double norm_eps;
    const void *emb_w;  /* (vocab, d_model) T: the embedding */
    const void *norm_w; /* (d_model) T: the final RMSNorm's weight */
    const void *head_w; /* (vocab, d_model) T: the LM head (the embedding itself when tied) */
    const void *head_b; /* (vocab) T or NULL */
    /* 1: emb_w and head_w hold bfloat16 (a bfloat16 model stepped in float32), and the logits are rounded to
     * bfloat16 (round to nearest even, as torch converts), the values its eager step returns and argmaxes */
    int64_t bf16;
} st_lm;

/* generate's repetition penalty on a float32 logit of an id already seen: divided by the penalty when positive,
 * else multiplied, in float32 (seqlab/generate.py _filter_logits; torch divides a float32 tensor by a Python float
 * in float32). */
static inline float st_penalised(float x, int seen, float penalty) {
    return !seen ? x : x > 0 ? x / penalty : x * penalty;
}

/* x rounded to the nearest bfloat16 (ties to even; NaN stays NaN), as a float. */
static inline float st_round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x;
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* 1 / sqrt(mean(v^2) + eps) of n values taken as float32 (torch's F.rms_norm on float32; squares summed in
 * double, so the float32 mean is the correctly rounded one). */
#define ST_RMS_SCALE(T, SUF)                                                                                           \
    static inline float st_rms_scale_##SUF(const T *restrict x, int64_t n, double eps) {                               \
        double s = 0.0;                                                                                                \
        _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; i++) {                                         \
            float v = (float)x[i];                                                                                     \
            s += (double)(v * v);                                                                                      \
        }                                                                                                              \
        float mean = (float)s / (float)n;                                                                              \
        return 1.0f / sqrtf(mean + (float)eps);                                                                        \
    }
ST_RMS_SCALE(float, f32)
ST_RMS_SCALE(double, f64)

/* AQLM projections: batch rows per pass over a weight row (a stack array of this many accumulators), and the
 * largest group size the fused step takes (seqlab/fused_step.py runs a larger one eagerly). */
#define ST_AQLM_ROWS 16
#define ST_AQLM_MAX_GROUP 64

/* The most experts per token the fused MoE takes (seqlab/fused_step.py runs a wider top-k eagerly). */
#define ST_MAX_TOP_K 16

/* Channels per block in the vectorised passes (a stack array of this many per thread). */
#define ST_BLOCK 64

/* The projections: seqlab_gemm.h's register-blocked rows GEMM (Y[b] = R[b] + W X[b] + bias), workshared over
 * output rows inside the caller's parallel region; a row's result does not depend on the batch it is in. */
SL_ROWS_GEMM(float, f32)
SL_ROWS_GEMM(double, f64)

/* Workspace widths of a run of blocks: [proj, conv channels, x_proj output, d_inner, 2 d_ffn (MLP), the MoE's T
 * elements per row, its int64 per row, its int64 per call, the largest low-rank projection's rank]; -2 if the
 * blocks do not share one d_model. */
#define ST_WIDTHS 9
static int st_widths(const st_layer *layers, int64_t n_layers, int64_t w[ST_WIDTHS]) {
    const int64_t dm = layers[0].d_model;
    for (int i = 0; i < ST_WIDTHS; i++) w[i] = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const st_layer *L = &layers[l];
        if (L->d_model != dm) return -2;
        /* Mamba-1: x_proj's output; Mamba-3: each head's scratch (seqlab_mamba3_head.h) */
        const int64_t R3 = L->mimo_rank, N3 = L->d_state, P3 = L->headdim;
        const int64_t xd = L->kind == 1 ? L->dt_rank + 2 * L->d_state
                           : L->kind == 3 ? L->nheads * (R3 * N3 + 2 * R3 * P3 + N3)
                                          : 0;
        w[0] = L->n_in > w[0] ? L->n_in : w[0];
        w[1] = L->conv_ch > w[1] ? L->conv_ch : w[1];
        w[2] = xd > w[2] ? xd : w[2];
        w[3] = L->d_inner > w[3] ? L->d_inner : w[3];
        const st_proj *qs[8] = {&L->in_q, &L->x_q, &L->dt_q, &L->out_q, &L->gu_q, &L->down_q, &L->k_q, &L->v_q};
        for (int q = 0; q < 8; q++)
            if (qs[q]->kind == 1 && qs[q]->rank > w[8]) w[8] = qs[q]->rank;
        if (L->n_experts > 0) {
            const int64_t E = L->n_experts, K = L->top_k, per_row = dm + E + K + K * (2 * dm + 2 * L->d_ffn);
            w[5] = per_row > w[5] ? per_row : w[5];
            w[6] = 2 * K > w[6] ? 2 * K : w[6];
            w[7] = E + 1 > w[7] ? E + 1 : w[7];
        } else {
            w[4] = 2 * L->d_ffn > w[4] ? 2 * L->d_ffn : w[4];
        }
    }
    return 0;
}

/* Elements of workspace the layers loop needs: res (the residual entering a block, rounded to float32 first under
 * residual_fp32), h (normed input), two residual buffers that alternate, proj (in_proj output), xc (conv output),
 * xdbl (Mamba-1's x_proj output), y (scan output, then Mamba-2's gated norm output), dt (Mamba-1's dt_proj output),
 * ffn (the MLP's gate and up rows; silu(gate) * up overwrites the gate half), the MoE's buffers (st_moe), the
 * low-rank projections' inner rows (st_proj_run), then the MoE's int64 indices, 8-byte aligned (the elements of T
 * they take, plus one of slack for the alignment). */
static size_t st_t_elems(const st_layer *layers, int64_t batch, const int64_t w[ST_WIDTHS]) {
    return (size_t)batch * (size_t)(4 * layers[0].d_model + w[0] + w[1] + w[2] + 2 * w[3] + w[4] + w[5] + w[8]);
}
static size_t st_work_elems(const st_layer *layers, int64_t batch, const int64_t w[ST_WIDTHS], size_t t_size) {
    const size_t ints = (size_t)(batch * w[6] + w[7]);
    return st_t_elems(layers, batch, w) + (ints * sizeof(int64_t) + t_size - 1) / t_size + 8 / t_size;
}
static inline int64_t *st_int_work(void *after) { return (int64_t *)(((uintptr_t)after + 7) & ~(uintptr_t)7); }

/* The MoE's router for one row, as seqlab/ffn/moe.py route() computes it in float32: softmax of the logits
 * lg[0..E), the top_k experts by probability (ties: the lower index first), each one's gate (renormalised over the
 * k when asked). Writes the experts to sel and their gates to gate, in the order chosen. */
static void st_route(float *lg, int64_t E, int64_t K, int64_t renorm, int64_t *sel, float *gate) {
    float m = lg[0];
    for (int64_t e = 1; e < E; e++) m = lg[e] > m ? lg[e] : m;
    float s = 0.0f;
    for (int64_t e = 0; e < E; e++) {
        lg[e] = expf(lg[e] - m);
        s += lg[e];
    }
    for (int64_t e = 0; e < E; e++) lg[e] /= s;
    float total = 0.0f;
    for (int64_t j = 0; j < K; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t q = 0; q < j; q++) taken |= sel[q] == e;
            if (!taken && (best < 0 || lg[e] > lg[best])) best = e;
        }
        sel[j] = best;
        gate[j] = lg[best];
        total += lg[best];
    }
    if (renorm)
        for (int64_t j = 0; j < K; j++) gate[j] /= total;
}

/* The layers loop, run by every thread of the caller's parallel region (orphaned worksharing): hidden_in ->
 * hidden_out through n_layers blocks, the states in io. Ends with a barrier (hidden_out is complete). */
#define ST_STEP(T, SUF, EXP, SOFTPLUS, SILU, GATE_SILU)                                                                \
    /* AQLM rows: Y[b, o] = (R +) scales[o] * sum_j (dequantised group j of row o) . X[b, group j] + bias, the         \
     * (nout, nin) matrix never formed: each group's g weights are summed from the M codebooks where they are used     \
     * (the codebooks stay in L1), for up to ST_AQLM_ROWS batch rows at once. Workshared over the output rows;         \
     * a row's result does not depend on the batch it is in. */                                                        \
    static void st_aqlm_rows_##SUF(const st_proj *p, const T *bias, const T *X, int64_t ldx, T *Y, const T *R,         \
                                   int64_t ldy, int64_t nout, int64_t nin, int64_t batch) {                            \
        const int64_t g = p->group_size, M = p->n_codebooks, K = (int64_t)1 << p->code_bits, G = nin / g;              \
        const T *cb = (const T *)p->a, *sc = (const T *)p->b;                                                          \
        _Pragma("omp for schedule(static)") for (int64_t o = 0; o < nout; o++) {                                       \
            const int32_t *co = p->codes + o * G * M;                                                                  \
            for (int64_t b0 = 0; b0 < batch; b0 += ST_AQLM_ROWS) {                                                     \
                const int64_t nb = batch - b0 < ST_AQLM_ROWS ? batch - b0 : ST_AQLM_ROWS;                              \
                /* per row, one accumulator lane per position in a group (elementwise multiply-adds that               \
                 * vectorise without reassociating a sum), summed in lane order at the end */                          \
                T accv[ST_AQLM_ROWS][ST_AQLM_MAX_GROUP], acc[ST_AQLM_ROWS];                                            \
                for (int64_t r = 0; r < nb; r++)                                                                       \
                    for (int64_t i = 0; i < g; i++) accv[r][i] = 0;                                                    \
                for (int64_t j = 0; j < G; j++) {                                                                      \
                    T wv[ST_AQLM_MAX_GROUP];                                                                           \
                    const T *c0 = cb + (int64_t)co[j * M] * g;                                                         \
                    _Pragma("omp simd") for (int64_t i = 0; i < g; i++) wv[i] = c0[i];                                 \
                    for (int64_t m = 1; m < M; m++) {                                                                  \
                        const T *cm = cb + (m * K + co[j * M + m]) * g;                                                \
                        _Pragma("omp simd") for (int64_t i = 0; i < g; i++) wv[i] += cm[i];                            \
                    }                                                                                                  \
                    for (int64_t r = 0; r < nb; r++) {                                                                 \
                        const T *x = X + (b0 + r) * ldx + j * g;                                                       \
                        T *av = accv[r];                                                                               \
                        _Pragma("omp simd") for (int64_t i = 0; i < g; i++) av[i] += wv[i] * x[i];                     \
                    }                                                                                                  \
                }                                                                                                      \
                for (int64_t r = 0; r < nb; r++) {                                                                     \
                    T sum = 0;                                                                                         \
                    for (int64_t i = 0; i < g; i++) sum += accv[r][i];                                                 \
                    acc[r] = sum;                                                                                      \
                }                                                                                                      \
                for (int64_t r = 0; r < nb; r++) {                                                                     \
                    const int64_t at = (b0 + r) * ldy + o;                                                             \
                    const T v = acc[r] * sc[o] + (bias ? bias[o] : (T)0);                                              \
                    Y[at] = R ? R[at] + v : v;                                                                         \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }                                                                                                                  \
                                                                                                                       \
    /* The rows GEMM on a dense weight W in T, or in bfloat16 (bf16 != 0). */                                          \
    static void st_dense_##SUF(const void *W, int bf16, const T *bias, const T *X, int64_t ldx, T *Y, const T *R,      \
                               int64_t ldy, int64_t nout, int64_t nin, int64_t batch) {                                \
        if (bf16)                                                                                                      \
            sl_rows_gemm_##SUF##_bf16((const uint16_t *)W, bias, X, ldx, Y, R, ldy, nout, nin, batch);                 \
        else                                                                                                           \
            sl_rows_gemm_##SUF((const T *)W, bias, X, ldx, Y, R, ldy, nout, nin, batch);                               \
    }                                                                                                                  \
                                                                                                                       \
    /* A projection Y[b] = (R[b] +) P X[b] + bias for every batch row, P as st_proj says: the rows GEMM on the         \
     * dense W (in T, or bfloat16: kind 3), the low-rank's two (right into tmp, batch * rank, then left), or the       \
     * AQLM rows. */                                                                                                   \
    static void st_proj_run_##SUF(const st_proj *p, const T *W, const T *bias, const T *X, int64_t ldx, T *Y,          \
                                  const T *R, int64_t ldy, int64_t nout, int64_t nin, int64_t batch, T *tmp) {         \
        if (p->kind == 1) {                                                                                            \
            const int64_t k = p->rank;                                                                                 \
            sl_rows_gemm_##SUF((const T *)p->b, NULL, X, ldx, tmp, NULL, k, k, nin, batch);                            \
            sl_rows_gemm_##SUF((const T *)p->a, bias, tmp, k, Y, R, ldy, nout, k, batch);                              \
        } else if (p->kind == 2) {                                                                                     \
            st_aqlm_rows_##SUF(p, bias, X, ldx, Y, R, ldy, nout, nin, batch);                                          \
        } else {                                                                                                       \
            st_dense_##SUF(W, p->kind == 3, bias, X, ldx, Y, R, ldy, nout, nin, batch);                                \
        }                                                                                                              \
    }                                                                                                                  \
                                                                                                                       \
    /* The Mamba-3 mixer between in_proj and out_proj (seqlab/mixers/mamba3.py Mamba3Mixer.step): proj rows            \
     * [z, x, B, C, dd_dt, dd_A, trap, angle]; B and C RMSNormed over d_state into bc (B then C per row); dt =         \
     * softplus(dd_dt + dt_bias), A = min(-act(dd_A), -a_floor); then per (row, head) m3_head (the gate inside         \
     * unless the gated RMSNorm follows), y into ybuf (batch, d_inner); scratch: each head's m3_head scratch. */       \
    static void st_mamba3_##SUF(const st_layer *L, const st_io *io, int64_t batch, const T *proj, T *bc,               \
                                T *scratch, T *ybuf) {                                                                 \
        const int64_t H = L->nheads, P = L->headdim, G = L->ngroups, N = L->d_state, R = L->mimo_rank;                 \
        const int64_t NA = L->n_angles, Di = L->d_inner, nin = L->n_in, RGN = R * G * N, cc = 2 * RGN;                 \
        const int64_t dto = 2 * Di + 2 * RGN, ao = dto + H, tro = ao + H, ango = tro + H, hpg = H / G;                 \
        const int64_t sc = R * N + 2 * R * P + N, PN = P * N;                                                          \
        const T *bnw = (const T *)L->b_norm_w, *cnw = (const T *)L->c_norm_w, *dtb = (const T *)L->dt_b;               \
        const T *Bb = (const T *)L->b_bias, *Cb = (const T *)L->c_bias, *Dp = (const T *)L->D;                         \
        const T *mx = (const T *)L->mimo_x, *mz = (const T *)L->mimo_z, *mo = (const T *)L->mimo_o;                    \
        const T *ang_in = (const T *)(const void *)io->conv_in, *ssm_in = (const T *)io->ssm_in;                       \
        const T *k_in = (const T *)io->k_in, *v_in = (const T *)io->v_in;                                              \
        T *ang_out = (T *)(void *)io->conv_out, *ssm_out = (T *)io->ssm_out, *k_out = (T *)io->k_out;                  \
        T *v_out = (T *)io->v_out;                                                                                     \
        _Pragma("omp for schedule(static) collapse(2)") for (int64_t b = 0; b < batch; b++) {                          \
            for (int64_t q = 0; q < 2 * R * G; q++) {                                                                  \
                const T *src = proj + b * nin + 2 * Di + q * N;                                                        \
                const int c = q >= R * G;                                                                              \
                const T *w = c ? cnw : bnw;                                                                            \
                const float r = st_rms_scale_##SUF(src, N, c ? L->c_eps : L->b_eps);                                   \
                T *dst = bc + b * cc + q * N;                                                                          \
                for (int64_t i = 0; i < N; i++) dst[i] = (T)((float)src[i] * r) * w[i];                                \
            }                                                                                                          \
        }                                                                                                              \
        _Pragma("omp for schedule(static) collapse(2)") for (int64_t b = 0; b < batch; b++) {                          \
            for (int64_t hh = 0; hh < H; hh++) {                                                                       \
                const T *row = proj + b * nin;                                                                         \
                const int64_t bh = b * H + hh, gi = hh / hpg;                                                          \
                const T d = SOFTPLUS(row[dto + hh] + dtb[hh]), u = row[ao + hh];                                       \
                const T act = L->a_softplus ? SOFTPLUS(u) : (u > 0 ? u : (T)0) + (T)1 / ((T)1 - (u < 0 ? u : (T)0));   \
                const T arate = -act < (T)(-L->a_floor) ? -act : (T)(-L->a_floor);                                     \
                m3_head_##SUF(P, N, R, NA, ang_in + bh * NA, ang_out + bh * NA, ssm_in + bh * PN, ssm_out + bh * PN,   \
                              k_in + (b * R * H + hh) * N, k_out + (b * R * H + hh) * N, H * N, v_in + bh * P,         \
                              v_out + bh * P, row + Di + hh * P, d, arate, row[tro + hh], row + ango,                  \
                              bc + b * cc + gi * N, bc + b * cc + RGN + gi * N, G * N, Bb + hh * R * N,                \
                              Cb + hh * R * N, Dp ? Dp + hh : NULL, L->outproj_norm ? NULL : row + hh * P,             \
                              mx ? mx + hh * R * P : NULL, mz ? mz + hh * R * P : NULL, mo ? mo + hh * R * P : NULL,   \
                              0, ybuf + b * Di + hh * P, 0, scratch + (b * H + hh) * sc);                              \
            }                                                                                                          \
        }                                                                                                              \
        if (L->outproj_norm) { /* GatedRMSNorm(norm_before_gate): norm(y) per head in T's width, * w * silu(z) */      \
            const T *gw = (const T *)L->gate_w;                                                                        \
            _Pragma("omp for schedule(static) collapse(2)") for (int64_t b = 0; b < batch; b++) {                      \
                for (int64_t hh = 0; hh < H; hh++) {                                                                   \
                    T *yv = ybuf + b * Di + hh * P;                                                                    \
                    const T *zv = proj + b * nin + hh * P;                                                             \
                    double s2 = 0.0;                                                                                   \
                    for (int64_t i = 0; i < P; i++) s2 += (double)yv[i] * (double)yv[i];                               \
                    const T r = (T)(1.0 / sqrt((double)(T)(s2 / (double)P) + (double)(T)L->gate_eps));                 \
                    for (int64_t i = 0; i < P; i++) yv[i] = yv[i] * r * gw[hh * P + i] * SILU(zv[i]);                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }                                                                                                                  \
                                                                                                                       \
    /* The attention mixer between its q/k/v projections and o_proj (seqlab/mixers/attention.py AttentionMixer.step,   \
     * one query per row): proj rows [q (H hd), k (KV hd), v (KV hd)]; the first rope_dim dims of every q and k head   \
     * rotated to the row's position seen[b] (angles in double, cos and sin rounded to T, HF's half-split layout);     \
     * the new cache: the last slots_out entries of [the old cache, this token], right-aligned as _cache_at cuts it;   \
     * then per (row, head) softmax(q k / sqrt(hd)) v over the new cache's real slots (those at positions >= 0),       \
     * one pass with a running maximum, into ybuf (batch, H hd). */                                                    \
    static void st_attention_##SUF(const st_layer *L, const st_attn_io *io, int64_t batch, T *proj, T *ybuf) {         \
        const int64_t H = L->nheads, KV = L->ngroups, hd = L->headdim, nin = L->n_in, per = H / KV;                    \
        const int64_t half = L->rope_dim / 2, si = io->slots_in, so = io->slots_out;                                   \
        const T *k_in = (const T *)io->k_in, *v_in = (const T *)io->v_in;                                              \
        T *k_out = (T *)io->k_out, *v_out = (T *)io->v_out;                                                            \
        if (half > 0) {                                                                                                \
            _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++) {                                  \
                T cs[ST_MAX_HEAD_DIM / 2], sn[ST_MAX_HEAD_DIM / 2];                                                    \
                for (int64_t i = 0; i < half; i++) {                                                                   \
                    const double a = (double)io->seen_in[b] * L->inv_freq[i];                                          \
                    cs[i] = (T)cos(a);                                                                                 \
                    sn[i] = (T)sin(a);                                                                                 \
                }                                                                                                      \
                for (int64_t q = 0; q < H + KV; q++) {                                                                 \
                    T *x = proj + b * nin + q * hd;                                                                    \
                    for (int64_t i = 0; i < half; i++) {                                                               \
                        const T x0 = x[i], x1 = x[i + half];                                                           \
                        x[i] = x0 * cs[i] + -x1 * sn[i];                                                               \
                        x[i + half] = x1 * cs[i] + x0 * sn[i];                                                         \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        /* the new cache: slots [first, first + so) of k_out / v_out, stride slots per (row, kv head) */               \
        const int64_t stride = io->stride > 0 ? io->stride : so, first = io->stride > 0 ? io->start + si + 1 - so : 0; \
        _Pragma("omp for schedule(static) collapse(2)") for (int64_t b = 0; b < batch; b++) {                          \
            for (int64_t g = 0; g < KV; g++) {                                                                         \
                const size_t bytes = (size_t)hd * sizeof(T);                                                           \
                const int64_t base = (b * KV + g) * stride;                                                            \
                for (int64_t j = io->stride > 0 ? so - 1 : 0; j < so; j++) { /* in place: only the new entry */        \
                    const int64_t e = si + 1 - so + j; /* index into [old cache, new entry] */                         \
                    const int64_t at = (base + first + j) * hd, from = ((b * KV + g) * si + e) * hd;                   \
                    memcpy(k_out + at, e < si ? k_in + from : proj + b * nin + (H + g) * hd, bytes);                   \
                    memcpy(v_out + at, e < si ? v_in + from : proj + b * nin + (H + KV + g) * hd, bytes);              \
                }                                                                                                      \
                if (g == 0) io->seen_out[b] = io->seen_in[b] + 1;                                                      \
            }                                                                                                          \
        }                                                                                                              \
        const T scale = (T)(1.0 / sqrt((double)hd));                                                                   \
        /* per (row, kv head, chunk of up to ST_ATTN_HEADS of the query heads sharing it): the cache's keys and        \
         * values read once for the whole chunk (grouped-query attention reads each per / chunk times, not per         \
         * times); chunks are halved while there are fewer of them than threads. Each head's sums run in the same      \
         * order whatever the chunk, so a head's result does not depend on it. */                                      \
        int64_t hc = per < ST_ATTN_HEADS ? per : ST_ATTN_HEADS;                                                        \
        while (hc > 1 && batch * KV * ((per + hc - 1) / hc) < omp_get_num_threads()) hc = (hc + 1) / 2;                \
        const int64_t chunks = (per + hc - 1) / hc;                                                                    \
        _Pragma("omp for schedule(static) collapse(3)") for (int64_t b = 0; b < batch; b++) {                          \
            for (int64_t g = 0; g < KV; g++) {                                                                         \
                for (int64_t c = 0; c < chunks; c++) {                                                                 \
                    const int64_t h0 = g * per + c * hc, nh = c * hc + hc <= per ? hc : per - c * hc;                  \
                    const int64_t real = io->seen_in[b] + 1, j0 = so - real > 0 ? so - real : 0;                       \
                    const T *kb = k_out + ((b * KV + g) * stride + first) * hd;                                        \
                    const T *vb = v_out + ((b * KV + g) * stride + first) * hd;                                        \
                    T acc[ST_ATTN_HEADS][ST_MAX_HEAD_DIM], m[ST_ATTN_HEADS], l[ST_ATTN_HEADS];                         \
                    for (int64_t r = 0; r < nh; r++) {                                                                 \
                        m[r] = l[r] = 0;                                                                               \
                        for (int64_t i = 0; i < hd; i++) acc[r][i] = 0;                                                \
                    }                                                                                                  \
                    for (int64_t j = j0; j < so; j++) {                                                                \
                        const T *kj = kb + j * hd, *vj = vb + j * hd;                                                  \
                        for (int64_t r = 0; r < nh; r++) {                                                             \
                            const T *q = proj + b * nin + (h0 + r) * hd;                                               \
                            T *a = acc[r], s = 0;                                                                      \
                            _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < hd; i++) s += q[i] * kj[i];   \
                            s *= scale;                                                                                \
                            if (j == j0 || s > m[r]) { /* a new maximum: rescale what was summed so far */             \
                                const T cr = j == j0 ? (T)0 : EXP(m[r] - s);                                           \
                                l[r] *= cr;                                                                            \
                                _Pragma("omp simd") for (int64_t i = 0; i < hd; i++) a[i] *= cr;                       \
                                m[r] = s;                                                                              \
                            }                                                                                          \
                            const T p = EXP(s - m[r]);                                                                 \
                            l[r] += p;                                                                                 \
                            _Pragma("omp simd") for (int64_t i = 0; i < hd; i++) a[i] += p * vj[i];                    \
                        }                                                                                              \
                    }                                                                                                  \
                    for (int64_t r = 0; r < nh; r++) {                                                                 \
                        T *y = ybuf + b * H * hd + (h0 + r) * hd;                                                      \
                        for (int64_t i = 0; i < hd; i++) y[i] = acc[r][i] / l[r];                                      \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }                                                                                                                  \
                                                                                                                       \
    /* The gated MLP's activation on rows of [gate (F), up (F)]: gate = silu(gate) * up in place, vectorised over      \
     * blocks of channels, workshared over (row, block). */                                                            \
    static void st_gate_##SUF(T *buf, int64_t rows, int64_t F) {                                                       \
        const int64_t nfb = (F + ST_BLOCK - 1) / ST_BLOCK;                                                             \
        _Pragma("omp for schedule(static) collapse(2)") for (int64_t r = 0; r < rows; r++) {                           \
            for (int64_t blk = 0; blk < nfb; blk++) {                                                                  \
                T *g = buf + r * 2 * F;                                                                                \
                const int64_t i0 = blk * ST_BLOCK, i1 = i0 + ST_BLOCK < F ? i0 + ST_BLOCK : F;                         \
                _Pragma("omp simd") for (int64_t i = i0; i < i1; i++) g[i] = SILU(g[i]) * g[F + i];                    \
            }                                                                                                          \
        }                                                                                                              \
    }                                                                                                                  \
                                                                                                                       \
    /* The mixture of experts on the normed rows h (batch, d_model), added to next (seqlab/ffn/moe.py at evaluation:   \
     * every (row, choice) pair kept). The router in float32; the pairs sorted by expert (rows in order within one),   \
     * each expert's pairs gathered and run as two rows GEMMs (its weights read once for all its rows), then each      \
     * row's gated expert outputs summed in expert order and added to next. Run by every thread of the region. */      \
    static void st_moe_##SUF(const st_layer *L, int64_t batch, const T *h, T *next, T *mw, int64_t *iw) {              \
        const int64_t dm = L->d_model, E = L->n_experts, K = L->top_k, F = L->d_ffn, F2 = 2 * F, P = batch * K;        \
        float *hf = (float *)mw, *lg = hf + batch * dm, *gate = lg + batch * E; /* in mw's first dm + E + K */         \
        T *xs = mw + batch * (dm + E + K), *act = xs + P * dm, *ys = act + P * F2;                                     \
        int64_t *sel = iw, *pos = sel + P, *start = pos + P; /* start: E + 1 */                                        \
        _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++) {                                      \
            for (int64_t i = 0; i < dm; i++) hf[b * dm + i] = (float)h[b * dm + i];                                    \
        }                                                                                                              \
        sl_rows_gemm_f32(L->router_w, NULL, hf, dm, lg, NULL, E, E, dm, batch);                                        \
        _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++)                                        \
            st_route(lg + b * E, E, K, L->renormalize, sel + b * K, gate + b * K);                                     \
        _Pragma("omp single") { /* a counting sort of the pairs p = b K + j by expert */                               \
            for (int64_t e = 0; e <= E; e++) start[e] = 0;                                                             \
            for (int64_t p = 0; p < P; p++) start[sel[p] + 1]++;                                                       \
            for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];                                                  \
            for (int64_t e = 0; e < E; e++) {                                                                          \
                int64_t at = start[e];                                                                                 \
                for (int64_t p = 0; p < P; p++)                                                                        \
                    if (sel[p] == e) pos[p] = at++;                                                                    \
            }                                                                                                          \
        }                                                                                                              \
        _Pragma("omp for schedule(static)") for (int64_t p = 0; p < P; p++)                                            \
            memcpy(xs + pos[p] * dm, h + (p / K) * dm, (size_t)dm * sizeof(T));                                        \
        /* the experts' stacked weights: in T, or bfloat16 (kind 3) */                                                 \
        const int wb = L->gu_q.kind == 3;                                                                              \
        const size_t es = wb ? sizeof(uint16_t) : sizeof(T);                                                           \
        for (int64_t e = 0; e < E; e++) {                                                                              \
            const int64_t n = start[e + 1] - start[e];                                                                 \
            if (n > 0)                                                                                                 \
                st_dense_##SUF((const char *)L->ffn_gu_w + e * F2 * dm * es, wb, NULL, xs + start[e] * dm, dm,         \
                               act + start[e] * F2, NULL, F2, F2, dm, n);                                              \
        }                                                                                                              \
        st_gate_##SUF(act, P, F);                                                                                      \
        for (int64_t e = 0; e < E; e++) {                                                                              \
            const int64_t n = start[e + 1] - start[e];                                                                 \
            if (n > 0)                                                                                                 \
                st_dense_##SUF((const char *)L->ffn_down_w + e * dm * F * es, wb, NULL, act + start[e] * F2, F2,       \
                               ys + start[e] * dm, NULL, dm, dm, F, n);                                                \
        }                                                                                                              \
        _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++) {                                      \
            int64_t order[ST_MAX_TOP_K];                                                                               \
            for (int64_t j = 0; j < K; j++) order[j] = j;                                                              \
            for (int64_t j = 1; j < K; j++) /* this row's choices by expert (index_add_'s row order) */                \
                for (int64_t q = j; q > 0 && sel[b * K + order[q]] < sel[b * K + order[q - 1]]; q--) {                 \
                    const int64_t t = order[q];                                                                        \
                    order[q] = order[q - 1];                                                                           \
                    order[q - 1] = t;                                                                                  \
                }                                                                                                      \
            for (int64_t i = 0; i < dm; i++) {                                                                         \
                T acc = 0;                                                                                             \
                for (int64_t j = 0; j < K; j++) {                                                                      \
                    const int64_t p = b * K + order[j];                                                                \
                    acc += ys[pos[p] * dm + i] * (T)gate[p];                                                           \
                }                                                                                                      \
                next[b * dm + i] += acc;                                                                               \
            }                                                                                                          \
        }                                                                                                              \
    }                                                                                                                  \
                                                                                                                       \
    static void st_layers_##SUF(const st_layer *layers, const st_io *io, int64_t n_layers, int64_t batch,              \
                                const T *hidden_in, T *hidden_out, T *work, const int64_t w[ST_WIDTHS]) {              \
        const int64_t dm = layers[0].d_model, w_proj = w[0], w_xc = w[1], w_xdbl = w[2];                               \
        T *res = work, *h = res + batch * dm, *ping = h + batch * dm, *pong = ping + batch * dm;                       \
        T *proj = pong + batch * dm, *xc = proj + batch * w_proj, *xdbl = xc + batch * w_xc;                           \
        T *ybuf = xdbl + batch * w_xdbl, *dtbuf = ybuf + batch * w[3], *fbuf = dtbuf + batch * w[3];                   \
        T *mw = fbuf + batch * w[4], *lr = mw + batch * w[5];                                                          \
        int64_t *iw = st_int_work(lr + batch * w[8]);                                                                  \
        const T *cur = hidden_in;                                                                                      \
        for (int64_t l = 0; l < n_layers; l++) {                                                                       \
            const st_layer *L = &layers[l];                                                                            \
            const int64_t D = L->d_inner, N = L->d_state, W = L->d_conv, nin = L->n_in, cc = L->conv_ch;               \
            T *next = l == n_layers - 1 ? hidden_out : (l % 2 == 0 ? ping : pong);                                     \
            const T *norm_w = (const T *)L->norm_w;                                                                    \
            /* RMSNorm in float32, times the weight in T (seqlab/norm.py) */                                           \
            _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++) {                                  \
                const T *x = cur + b * dm;                                                                             \
                float r = st_rms_scale_##SUF(x, dm, L->norm_eps);                                                      \
                for (int64_t i = 0; i < dm; i++) {                                                                     \
                    h[b * dm + i] = (T)((float)x[i] * r) * norm_w[i];                                                  \
                    res[b * dm + i] = L->residual_fp32 ? (T)(float)x[i] : x[i];                                        \
                }                                                                                                      \
            }                                                                                                          \
            if (L->kind != 4)                                                                                          \
                st_proj_run_##SUF(&L->in_q, (const T *)L->in_w, (const T *)L->in_b, h, dm, proj, NULL, nin, nin, dm,   \
                                  batch, lr);                                                                          \
            if (L->kind == 4) { /* q, k and v side by side in each proj row */                                         \
                const int64_t nq = L->nheads * L->headdim, nkv = L->ngroups * L->headdim;                              \
                st_proj_run_##SUF(&L->in_q, (const T *)L->in_w, (const T *)L->in_b, h, dm, proj, NULL, nin, nq, dm,    \
                                  batch, lr);                                                                          \
                st_proj_run_##SUF(&L->k_q, (const T *)L->k_w, (const T *)L->k_b, h, dm, proj + nq, NULL, nin, nkv,     \
                                  dm, batch, lr);                                                                      \
                st_proj_run_##SUF(&L->v_q, (const T *)L->v_w, (const T *)L->v_b, h, dm, proj + nq + nkv, NULL, nin,    \
                                  nkv, dm, batch, lr);                                                                 \
                st_attention_##SUF(L, (const st_attn_io *)&io[l], batch, proj, ybuf);                                  \
            } else if (L->kind == 3) {                                                                                 \
                st_mamba3_##SUF(L, &io[l], batch, proj, xc, xdbl, ybuf);                                               \
            } else {                                                                                                   \
            /* conv step + SiLU on the conv channels (Mamba-1: x = proj[:D]; Mamba-2: xBC = proj[D:D+cc]) */           \
            const int64_t conv_off = L->kind == 1 ? 0 : D;                                                             \
            const T *cw = (const T *)L->conv_w, *cb = (const T *)L->conv_b;                                            \
            const float *cin = io[l].conv_in;                                                                          \
            float *cout = io[l].conv_out;                                                                              \
            _Pragma("omp for schedule(static) collapse(2)") for (int64_t b = 0; b < batch; b++) {                      \
                for (int64_t c = 0; c < cc; c++) {                                                                     \
                    const float *si = cin + (b * cc + c) * (W - 1);                                                    \
                    float *so = cout + (b * cc + c) * (W - 1);                                                         \
                    T xin = proj[b * nin + conv_off + c];                                                              \
                    T acc = 0;                                                                                         \
                    for (int64_t k = 0; k < W - 1; k++) acc += (T)si[k] * cw[c * W + k];                               \
                    acc += xin * cw[c * W + W - 1];                                                                    \
                    if (cb) acc += cb[c];                                                                              \
                    for (int64_t k = 0; k + 1 < W - 1; k++) so[k] = si[k + 1];                                         \
                    if (W > 1) so[W - 2] = (float)xin;                                                                 \
                    xc[b * cc + c] = acc;                                                                              \
                }                                                                                                      \
            }                                                                                                          \
            /* SiLU on the conv outputs, vectorised (a pass of its own: the conv loop's inner taps keep it scalar) */  \
            _Pragma("omp for schedule(static)") for (int64_t q = 0; q < batch * cc; q += ST_BLOCK) {                   \
                const int64_t qe = q + ST_BLOCK < batch * cc ? q + ST_BLOCK : batch * cc;                              \
                _Pragma("omp simd") for (int64_t i = q; i < qe; i++) xc[i] = SILU(xc[i]);                              \
            }                                                                                                          \
            const T *A = (const T *)L->A, *Dp = (const T *)L->D, *dtb = (const T *)L->dt_b;                            \
            const T *s_in = (const T *)io[l].ssm_in;                                                                   \
            T *s_out = (T *)io[l].ssm_out;                                                                             \
            if (L->kind == 1) {                                                                                        \
                const int64_t R = L->dt_rank, xd = R + 2 * N;                                                          \
                st_proj_run_##SUF(&L->x_q, (const T *)L->x_w, NULL, xc, cc, xdbl, NULL, xd, xd, D, batch, lr);         \
                /* dt_proj + bias as a GEMM too (a 16-term dot per channel was one long dependency chain) */           \
                st_proj_run_##SUF(&L->dt_q, (const T *)L->dt_w, dtb, xdbl, xd, dtbuf, NULL, D, D, R, batch, lr);       \
                /* softplus(dt) and the gate silu(z), vectorised over a block of channels; then per channel the        \
                 * selective state update and the D skip */                                                            \
                const int64_t nblk = (D + ST_BLOCK - 1) / ST_BLOCK;                                                    \
                _Pragma("omp for schedule(static) collapse(2)") for (int64_t b = 0; b < batch; b++) {                  \
                    for (int64_t blk = 0; blk < nblk; blk++) {                                                         \
                        const int64_t c0 = blk * ST_BLOCK, c1 = c0 + ST_BLOCK < D ? c0 + ST_BLOCK : D;                 \
                        const T *xb = xdbl + b * xd;                                                                   \
                        T dts[ST_BLOCK], gate[ST_BLOCK];                                                               \
                        const T *zb = proj + b * nin + D, *dtr = dtbuf + b * D;                                        \
                        _Pragma("omp simd") for (int64_t c = c0; c < c1; c++) {                                        \
                            dts[c - c0] = SOFTPLUS(dtr[c]);                                                            \
                            gate[c - c0] = SILU(zb[c]);                                                                \
                        }                                                                                              \
                        const T *restrict Bv = xb + R, *restrict Cv = xb + R + N;                                      \
                        for (int64_t c = c0; c < c1; c++) {                                                            \
                            const T dt = dts[c - c0], xv = xc[b * cc + c], dx = dt * xv;                               \
                            const T *restrict Ac = A + c * N;                                                          \
                            const T *restrict s0 = s_in + (b * D + c) * N;                                             \
                            T *restrict s1 = s_out + (b * D + c) * N;                                                  \
                            T y = 0;                                                                                   \
                            _Pragma("omp simd reduction(+ : y)") for (int64_t n = 0; n < N; n++) {                     \
                                T s = s0[n] * EXP(dt * Ac[n]) + dx * Bv[n];                                            \
                                s1[n] = s;                                                                             \
                                y += s * Cv[n];                                                                        \
                            }                                                                                          \
                            y += Dp[c] * xv;                                                                           \
                            ybuf[b * D + c] = y * gate[c - c0];                                                        \
                        }                                                                                              \
                    }                                                                                                  \
                }                                                                                                      \
            } else {                                                                                                   \
                const int64_t H = L->nheads, P = L->headdim, G = L->ngroups, per = H / G;                              \
                /* dt + bias + softplus per head, the SSD state update, D skip */                                      \
                _Pragma("omp for schedule(static) collapse(2)") for (int64_t b = 0; b < batch; b++) {                  \
                    for (int64_t hh = 0; hh < H; hh++) {                                                               \
                        T dt = SOFTPLUS(proj[b * nin + D + cc + hh] + dtb[hh]);                                        \
                        T dA = EXP(dt * A[hh]);                                                                        \
                        const int64_t g = hh / per;                                                                    \
                        const T *restrict Bv = xc + b * cc + D + g * N;                                                \
                        const T *restrict Cv = xc + b * cc + D + G * N + g * N;                                        \
                        for (int64_t p = 0; p < P; p++) {                                                              \
                            const T xv = xc[b * cc + hh * P + p], xdt = xv * dt;                                       \
                            const T *restrict s0 = s_in + ((b * H + hh) * P + p) * N;                                  \
                            T *restrict s1 = s_out + ((b * H + hh) * P + p) * N;                                       \
                            T y = 0;                                                                                   \
                            _Pragma("omp simd reduction(+ : y)") for (int64_t n = 0; n < N; n++) {                     \
                                T s = s0[n] * dA + xdt * Bv[n];                                                        \
                                s1[n] = s;                                                                             \
                                y += s * Cv[n];                                                                        \
                            }                                                                                          \
                            ybuf[b * D + hh * P + p] = y + xv * Dp[hh];                                                \
                        }                                                                                              \
                    }                                                                                                  \
                }                                                                                                      \
                /* gated RMSNorm: norm(y * silu(z)) per group, in float32, times the weight in T */                    \
                const int64_t gs = L->gate_group, ng = D / gs;                                                         \
                const T *gw = (const T *)L->gate_w;                                                                    \
                _Pragma("omp for schedule(static) collapse(2)") for (int64_t b = 0; b < batch; b++) {                  \
                    for (int64_t q = 0; q < ng; q++) {                                                                 \
                        T *yv = ybuf + b * D + q * gs;                                                                 \
                        const T *zv = proj + b * nin + q * gs;                                                         \
                        double s = 0.0;                                                                                \
                        _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < gs; i++) {                        \
                            float v = GATE_SILU((float)zv[i]) * (float)yv[i];                                          \
                            yv[i] = (T)v;                                                                              \
                            s += (double)(v * v);                                                                      \
                        }                                                                                              \
                        float r = 1.0f / sqrtf((float)s / (float)gs + (float)L->gate_eps);                             \
                        for (int64_t i = 0; i < gs; i++) yv[i] = (T)((float)yv[i] * r) * gw[q * gs + i];               \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
            }                                                                                                          \
            /* out_proj, added to the residual */                                                                      \
            st_proj_run_##SUF(&L->out_q, (const T *)L->out_w, (const T *)L->out_b, ybuf, D, next, res, dm, dm, D,      \
                              batch, lr);                                                                              \
            if (L->d_ffn > 0) {                                                                                        \
                /* the feed-forward (Block._mix): next += ffn(RMSNorm(next)) */                                        \
                const int64_t F = L->d_ffn, F2 = 2 * L->d_ffn;                                                         \
                const T *fnw = (const T *)L->ffn_norm_w;                                                               \
                _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++) {                              \
                    const T *x = next + b * dm;                                                                        \
                    float r = st_rms_scale_##SUF(x, dm, L->ffn_eps);                                                   \
                    for (int64_t i = 0; i < dm; i++) h[b * dm + i] = (T)((float)x[i] * r) * fnw[i];                    \
                }                                                                                                      \
                if (L->n_experts > 0)                                                                                  \
                    st_moe_##SUF(L, batch, h, next, mw, iw);                                                           \
                else {                                                                                                 \
                /* the gated MLP: down(silu(gate) * up) */                                                             \
                st_proj_run_##SUF(&L->gu_q, (const T *)L->ffn_gu_w, NULL, h, dm, fbuf, NULL, F2, F2, dm, batch, lr);   \
                st_gate_##SUF(fbuf, batch, F);                                                                         \
                st_proj_run_##SUF(&L->down_q, (const T *)L->ffn_down_w, NULL, fbuf, F2, next, next, dm, dm, F, batch,  \
                                  lr);                                                                                 \
                }                                                                                                      \
            }                                                                                                          \
            _Pragma("omp barrier");                                                                                    \
            cur = next;                                                                                                \
        }                                                                                                              \
    }                                                                                                                  \
                                                                                                                       \
    SL_EXPORT int sl_step_##SUF(const st_layer *layers, const st_io *io, int64_t n_layers, int64_t batch,              \
                                const T *hidden_in, T *hidden_out, int nthreads) {                                     \
        int64_t w[ST_WIDTHS];                                                                                          \
        if (st_widths(layers, n_layers, w)) return -2;                                                                 \
        T *work = (T *)malloc(st_work_elems(layers, batch, w, sizeof(T)) * sizeof(T));                                 \
        if (!work) return -1;                                                                                          \
        _Pragma("omp parallel num_threads(nthreads)")                                                                  \
            st_layers_##SUF(layers, io, n_layers, batch, hidden_in, hidden_out, work, w);                              \
        free(work);                                                                                                    \
        return 0;                                                                                                      \
    }                                                                                                                  \
                                                                                                                       \
    /* A whole LanguageModel step: embedding rows of ids, the blocks, the final RMSNorm (hidden_out, as                \
     * Backbone.step returns it) and the head (logits). -3 (nothing written) if an id is outside [0, vocab). */        \
    /* One whole LanguageModel step for every thread of the caller's parallel region: embedding rows of ids, the       \
     * blocks, the final RMSNorm (hidden_out, as Backbone.step returns it) and the head (logits). */                   \
    static void st_lm_body_##SUF(const st_layer *layers, const st_io *io, int64_t n_layers, int64_t batch,             \
                                 const st_lm *lm, const int64_t *ids, T *hidden_out, T *logits, T *work, T *x0,        \
                                 T *x1, const int64_t w[ST_WIDTHS]) {                                                  \
        const int64_t dm = lm->d_model;                                                                                \
        const T *nw = (const T *)lm->norm_w;                                                                           \
        _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++) {                                      \
            if (lm->bf16) { /* a bfloat16 row, widened exactly */                                                      \
                const uint16_t *row = (const uint16_t *)lm->emb_w + ids[b] * dm;                                       \
                for (int64_t i = 0; i < dm; i++) {                                                                     \
                    const uint32_t u = (uint32_t)row[i] << 16;                                                         \
                    float f;                                                                                           \
                    memcpy(&f, &u, sizeof f);                                                                          \
                    x0[b * dm + i] = (T)f;                                                                             \
                }                                                                                                      \
            } else                                                                                                     \
                memcpy(x0 + b * dm, (const T *)lm->emb_w + ids[b] * dm, (size_t)dm * sizeof(T));                       \
        }                                                                                                              \
        st_layers_##SUF(layers, io, n_layers, batch, x0, x1, work, w);                                                 \
        /* norm_f: seqlab/norm.py's RMSNorm (float32 statistics, times the weight in T) */                             \
        _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++) {                                      \
            const T *x = x1 + b * dm;                                                                                  \
            float r = st_rms_scale_##SUF(x, dm, lm->norm_eps);                                                         \
            for (int64_t i = 0; i < dm; i++) hidden_out[b * dm + i] = (T)((float)x[i] * r) * nw[i];                    \
        }                                                                                                              \
        st_dense_##SUF(lm->head_w, (int)lm->bf16, (const T *)lm->head_b, hidden_out, dm, logits, NULL, lm->vocab,      \
                       lm->vocab, dm, batch);                                                                          \
        if (lm->bf16) {                                                                                                \
            _Pragma("omp for schedule(static)") for (int64_t j = 0; j < batch * lm->vocab; j++) logits[j] =            \
                (T)st_round_bf16((float)logits[j]);                                                                    \
        }                                                                                                              \
    }                                                                                                                  \
                                                                                                                       \
    /* Workspace of an LM step: the layers' and two hidden buffers (NULL if out of memory or -2 shapes). */            \
    static T *st_lm_work_##SUF(const st_layer *layers, int64_t n_layers, int64_t batch, const st_lm *lm,               \
                               int64_t w[ST_WIDTHS], T **x0, T **x1) {                                                 \
        if (st_widths(layers, n_layers, w) || lm->d_model != layers[0].d_model) return NULL;                           \
        const size_t base = st_work_elems(layers, batch, w, sizeof(T)), dm = (size_t)lm->d_model;                      \
        T *work = (T *)malloc((base + 2 * (size_t)batch * dm) * sizeof(T));                                            \
        if (work) {                                                                                                    \
            *x0 = work + base;                                                                                         \
            *x1 = *x0 + batch * dm;                                                                                    \
        }                                                                                                              \
        return work;                                                                                                   \
    }                                                                                                                  \
                                                                                                                       \
    /* A whole LanguageModel step. -3 (nothing written) if an id is outside [0, vocab). */                             \
    SL_EXPORT int sl_lm_step_##SUF(const st_layer *layers, const st_io *io, int64_t n_layers, int64_t batch,           \
                                   const st_lm *lm, const int64_t *ids, T *hidden_out, T *logits, int nthreads) {      \
        for (int64_t b = 0; b < batch; b++)                                                                            \
            if (ids[b] < 0 || ids[b] >= lm->vocab) return -3;                                                          \
        int64_t w[ST_WIDTHS];                                                                                          \
        T *x0 = NULL, *x1 = NULL, *work = st_lm_work_##SUF(layers, n_layers, batch, lm, w, &x0, &x1);                  \
        if (!work) return -1;                                                                                          \
        _Pragma("omp parallel num_threads(nthreads)")                                                                  \
            st_lm_body_##SUF(layers, io, n_layers, batch, lm, ids, hidden_out, logits, work, x0, x1, w);               \
        free(work);                                                                                                    \
        return 0;                                                                                                      \
    }                                                                                                                  \
                                                                                                                       \
    /* Greedy or sampled decoding in one call and one parallel region: up to n_steps steps, each feeding every row's   \
     * token (ids0 first, then the token chosen from the logits before it) and writing the token chosen after it to    \
     * next_tokens[k * batch + b]. smp NULL: the argmax (torch's argmax of the float32 logits: the first maximum, a    \
     * NaN above all); else sampled (seqlab_sample.h) with row b's uniform uniforms[b * n_steps + k], and a row        \
     * whose logits cannot be sampled gets -1 and ends the call after that step. banned[0..n_banned): ids whose        \
     * logits count as -inf when choosing (generate's suppress_tokens; the logits written are the model's). seen       \
     * (batch, V), or NULL: the repetition penalty, applied to the float32 logits of the ids marked (generate's        \
     * _filter_logits), each chosen id marked as the loop goes (the caller marks the prompt's ids and ids0).           \
     * It returns after the first step that fed a token in watch[0..n_watch) (the last tokens of the caller's          \
     * stop sequences) and returns the number of steps run (-1: out of memory, -3: an id of ids0 outside the           \
     * vocabulary). io3 holds three st_io sets of n_layers: step 0 reads the caller's state and writes X (set 0),      \
     * odd steps read X and write Y (set 1), even steps from 2 read Y and write X (set 2); hidden_out and logits       \
     * are the last step's. An attention layer's k and v are one pair of buffers for the whole call (st_attn_io        \
     * with stride > 0, the same in the three sets; set 0's slots_in and start say where the caller's cache was        \
     * copied): each step appends its entry in place and its cache is the last st_attn_slots entries, so a step        \
     * reads the cache without copying it (the caller cuts the last step's cache out of the buffers). */               \
    SL_EXPORT int64_t sl_lm_greedy_##SUF(const st_layer *layers, const st_io *io3, int64_t n_layers, int64_t batch,    \
                                         const st_lm *lm, const int64_t *ids0, int64_t n_steps, const int64_t *watch,  \
                                         int64_t n_watch, const int64_t *banned, int64_t n_banned, uint8_t *seen,      \
                                         double penalty, const st_sampling *smp, const double *uniforms,               \
                                         int64_t *next_tokens,                                                         \
                                         T *hidden_out, T *logits, int nthreads) {                                     \
        for (int64_t b = 0; b < batch; b++)                                                                            \
            if (ids0[b] < 0 || ids0[b] >= lm->vocab) return -3;                                                        \
        int64_t w[ST_WIDTHS], done = 0;                                                                                \
        int stop = 0;                                                                                                  \
        T *x0 = NULL, *x1 = NULL, *work = st_lm_work_##SUF(layers, n_layers, batch, lm, w, &x0, &x1);                  \
        /* this step's io: the set's, with an attention layer's cache sizes (its cache grows by a slot a step up to    \
         * the window; the caller gave buffers for the largest, each step's cache packed at their start) */            \
        st_io *io = (st_io *)malloc((size_t)n_layers * sizeof(st_io));                                                 \
        const int64_t V = lm->vocab;                                                                                   \
        /* sampling: each row's probabilities and ranking room (seqlab_sample.h) */                                    \
        double *probs = smp ? (double *)malloc((size_t)(batch * V) * sizeof(double)) : NULL;                           \
        st_ranked *ranked = smp ? (st_ranked *)malloc((size_t)(batch * V) * sizeof(st_ranked)) : NULL;                 \
        /* the banned ids (generate's suppress_tokens): their logits count as -inf when a token is chosen */           \
        uint8_t *ban = n_banned > 0 ? (uint8_t *)calloc((size_t)V, 1) : NULL;                                          \
        if (!work || !io || (smp && (!probs || !ranked)) || (n_banned > 0 && !ban)) {                                  \
            free(work);                                                                                                \
            free(io);                                                                                                  \
            free(probs);                                                                                               \
            free(ranked);                                                                                              \
            free(ban);                                                                                                 \
            return -1;                                                                                                 \
        }                                                                                                              \
        for (int64_t q = 0; q < n_banned; q++)                                                                         \
            if (banned[q] >= 0 && banned[q] < V) ban[banned[q]] = 1;                                                   \
        int bad = 0;                                                                                                   \
        const float pen = (float)penalty; /* as torch divides a float32 tensor by a Python float */                    \
        _Pragma("omp parallel num_threads(nthreads)") {                                                                \
            for (int64_t k = 0; k < n_steps; k++) {                                                                    \
                const st_io *set = k == 0 ? io3 : io3 + (k % 2 ? n_layers : 2 * n_layers);                             \
                const int64_t *ids = k == 0 ? ids0 : next_tokens + (k - 1) * batch;                                    \
                _Pragma("omp single") {                                                                                \
                    for (int64_t l = 0; l < n_layers; l++) {                                                           \
                        st_attn_io *a = (st_attn_io *)&io[l];                                                          \
                        const int64_t slots = k == 0 ? 0 : a->slots_out;                                               \
                        const int64_t start = k == 0 ? 0 : a->start + a->slots_in + 1 - slots;                         \
                        io[l] = set[l];                                                                                \
                        if (layers[l].kind == 4 && k > 0) { /* the cache the last step left in the buffers */          \
                            a->slots_in = slots;                                                                       \
                            a->start = start;                                                                          \
                        }                                                                                              \
                        if (layers[l].kind == 4) a->slots_out = st_attn_slots(&layers[l], a, batch);                   \
                    }                                                                                                  \
                }                                                                                                      \
                st_lm_body_##SUF(layers, io, n_layers, batch, lm, ids, hidden_out, logits, work, x0, x1, w);           \
                _Pragma("omp for schedule(static)") for (int64_t b = 0; b < batch; b++) {                              \
                    const T *x = logits + b * V;                                                                       \
                    if (smp) { /* row b's token k: its uniform k (seqlab_sample.h; -1: NaN or +inf logits) */          \
                        double *p = probs + b * V;                                                                     \
                        for (int64_t v = 0; v < V; v++)                                                                \
                            p[v] = ban && ban[v] ? -INFINITY                                                           \
                                   : seen      ? (double)st_penalised((float)x[v], seen[b * V + v], pen)               \
                                               : (double)x[v];                                                         \
                        const int64_t t = st_sample_row(p, V, smp, uniforms[b * n_steps + k], ranked + b * V);         \
                        next_tokens[k * batch + b] = t;                                                                \
                        if (seen && t >= 0) seen[b * V + t] = 1;                                                       \
                        if (t < 0) {                                                                                   \
                            _Pragma("omp atomic write") bad = 1;                                                       \
                        }                                                                                              \
                        continue;                                                                                      \
                    }                                                                                                  \
                    int64_t best = 0;                                                                                  \
                    const uint8_t *was = seen ? seen + b * V : NULL;                                                   \
                    float bv = ban && ban[0] ? -INFINITY : st_penalised((float)x[0], was && was[0], pen);              \
                    for (int64_t v = 1; v < V; v++) {                                                                  \
                        const float xv = ban && ban[v] ? -INFINITY : st_penalised((float)x[v], was && was[v], pen);    \
                        if (xv > bv || (xv != xv && bv == bv)) {                                                       \
                            best = v;                                                                                  \
                            bv = xv;                                                                                   \
                        }                                                                                              \
                    }                                                                                                  \
                    next_tokens[k * batch + b] = best;                                                                 \
                    if (seen) seen[b * V + best] = 1;                                                                  \
                }                                                                                                      \
                _Pragma("omp single") {                                                                                \
                    done = k + 1;                                                                                      \
                    if (bad) stop = 1; /* a row could not sample: never feed its -1 */                                 \
                    for (int64_t b = 0; b < batch && !stop; b++)                                                       \
                        for (int64_t q = 0; q < n_watch; q++)                                                          \
                            if (ids[b] == watch[q]) stop = 1;                                                          \
                }                                                                                                      \
                if (stop) break; /* every thread reads the same flag: the single ends with a barrier */                \
            }                                                                                                          \
        }                                                                                                              \
        free(work);                                                                                                    \
        free(io);                                                                                                      \
        free(probs);                                                                                                   \
        free(ranked);                                                                                                  \
        free(ban);                                                                                                     \
        return done;                                                                                                   \
    }                                                                                                                  \
                                                                                                                       \
    /* One sampled token per row of logits (rows, V), row b with uniforms[b] (seqlab_sample.h), as the loop above      \
     * samples: generate's step-by-step loop calls it, so both loops choose alike. 0, or 1 + the first row whose       \
     * logits cannot be sampled (NaN or +inf, or all -inf), or -1 out of memory. */                                    \
    SL_EXPORT int64_t sl_sample_##SUF(const T *logits, int64_t rows, int64_t V, const st_sampling *smp,                \
                                      const double *uniforms, int64_t *out) {                                          \
        double *p = (double *)malloc((size_t)V * sizeof(double));                                                      \
        st_ranked *ranked = (st_ranked *)malloc((size_t)V * sizeof(st_ranked));                                        \
        int64_t code = p && ranked ? 0 : -1;                                                                           \
        for (int64_t b = 0; b < rows && code == 0; b++) {                                                              \
            for (int64_t v = 0; v < V; v++) p[v] = (double)logits[b * V + v];                                          \
            out[b] = st_sample_row(p, V, smp, uniforms[b], ranked);                                                    \
            if (out[b] < 0) code = 1 + b;                                                                              \
        }                                                                                                              \
        free(p);                                                                                                       \
        free(ranked);                                                                                                  \
        return code;                                                                                                   \
    }
/* float: seqlab_native.h's vectorisable exp, softplus and SiLU (at batch 16 libm's per-channel calls were a tenth
 * of the step); double: libm, as the float64 reference runs. */
/* Mamba-3's per-head step with libm's functions, as mamba3.c's state-update kernel runs it. */
M3_HEAD(float, f32, expf, tanhf, cosf, sinf, floorf, sl_silu_f, sl_sigmoid_f)
M3_HEAD(double, f64, exp, tanh, cos, sin, floor, sl_silu_d, sl_sigmoid_d)

ST_STEP(float, f32, sl_exp_f, sl_fast_softplus_f, sl_fast_silu_f, sl_fast_silu_f)
ST_STEP(double, f64, exp, sl_softplus_d, sl_silu_d, sl_silu_f)

SL_EXPORT int sl_step_abi(void) { return SEQLAB_NATIVE_ABI * 1000 + (int)sizeof(st_layer); }
SL_EXPORT int sl_lm_step_abi(void) { return SEQLAB_NATIVE_ABI * 1000 + (int)sizeof(st_lm); }
SL_EXPORT int sl_sample_abi(void) { return SEQLAB_NATIVE_ABI * 1000 + (int)sizeof(st_sampling); }
