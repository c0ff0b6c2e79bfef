/* Sampling one token from a row of logits: seqlab.generate's do_sample=True, for the compiled decode loop
 * (step.c's sl_lm_greedy with sampling options) and for generate's step-by-step loop (sl_sample_f32/f64), so
 * both choose the same token from the same logits and uniform.
 *
 * The rule (seqlab/sampling.py's sample_reference is its float64 PyTorch twin; docs/generation.md):
 *   s = (logit - max logit) / temperature, p = exp(s)             (so the top token's p is exactly 1)
 *   top_k:  p = 0 where s < the k-th largest s                   (ties with it stay)
 *   top_p:  rank the tokens by (p descending, id ascending); p = 0 for every token whose mass ranked above it
 *           (summed in that order) is >= top_p * Z, Z the sum of p in id order (the top token always stays)
 *   min_p:  p = 0 where p < min_p                                  (min_p times the top token's p, which is 1)
 *   draw:   the first id whose running sum of p (in id order) exceeds u * (the sum of all p), u in [0, 1)
 * in float64 throughout. Written by hand: it runs inside the compiled loop's parallel region, between steps,
 * where no library call is available; it is a few passes over the vocabulary. */
#ifndef SEQLAB_SAMPLE_H
#define SEQLAB_SAMPLE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* seqlab/fused_step.py's _Sampling: every field 8 bytes. */
typedef struct {
    double temperature; /* > 0 */
    int64_t top_k;      /* 0: none */
    double top_p;       /* >= 1: none */
    double min_p;       /* <= 0: none */
} st_sampling;

typedef struct {
    double p;
    int64_t id;
} st_ranked;

static int st_rank_order(const void *a, const void *b) {
    const st_ranked *x = (const st_ranked *)a, *y = (const st_ranked *)b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The k-th largest (k >= 1) of a[0..n), reordering a (quickselect). */
static double st_kth_largest(double *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        const double pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                const double t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return a[want];
    }
    return a[want];
}

/* One token from logits already widened into p[0..V) (overwritten with the unnormalised probabilities), under
 * the options s and the uniform u in [0, 1). ranked: room for V entries. Returns the token, or -1 if a logit is
 * NaN or +inf, or every logit is -inf. */
static int64_t st_sample_row(double *p, int64_t V, const st_sampling *s, double u, st_ranked *ranked) {
    double m = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
        if (p[v] != p[v] || p[v] == INFINITY) return -1;
        if (p[v] > m) m = p[v];
    }
    if (m == -INFINITY) return -1;
    const double T = s->temperature;
    if (s->top_k > 0 && s->top_k < V) { /* on s: exp runs only for the tokens kept */
        double *copy = (double *)ranked; /* room for V doubles */
        for (int64_t v = 0; v < V; v++) copy[v] = (p[v] - m) / T;
        const double kth = st_kth_largest(copy, V, s->top_k);
        for (int64_t v = 0; v < V; v++) {
            const double sv = (p[v] - m) / T;
            p[v] = sv < kth ? 0 : exp(sv);
        }
    } else {
        for (int64_t v = 0; v < V; v++) p[v] = exp((p[v] - m) / T);
    }
    if (s->top_p < 1) {
        double z = 0;
        for (int64_t v = 0; v < V; v++) z += p[v];
        const double bound = s->top_p * z;
        /* Only the tokens with p >= t need ranking when their mass reaches the bound: every other token ranks
         * below all of them, so the mass above it is >= the bound and it is dropped. t: the lower edge of a
         * power-of-two band of p, from one pass that sums each band's mass (band j: p in [2^-(j+1), 2^-j), the
         * top one holding p = 1, the last everything below 2^-63); a margin of 1e-9 covers the other order of
         * summation. t = 0 at worst: every token with p > 0. */
        double band[64] = {0};
        for (int64_t v = 0; v < V; v++) {
            if (p[v] > 0) {
                uint64_t bits;
                memcpy(&bits, &p[v], sizeof bits);
                int64_t j = 1022 - (int64_t)((bits >> 52) & 0x7ff);
                band[j < 0 ? 0 : j > 63 ? 63 : j] += p[v];
            }
        }
        double t = 0, mass = 0;
        for (int j = 0; j < 63; j++) {
            mass += band[j];
            if (mass >= bound * (1 + 1e-9)) {
                t = ldexp(1.0, -(j + 1));
                break;
            }
        }
        int64_t n = 0;
        for (int64_t v = 0; v < V; v++)
            if (p[v] > 0 && p[v] >= t) ranked[n++] = (st_ranked){p[v], v};
        qsort(ranked, (size_t)n, sizeof(st_ranked), st_rank_order);
        double before = 0;
        int64_t keep = n;
        for (int64_t j = 1; j < n; j++) {
            before += ranked[j - 1].p;
            if (before >= bound) {
                keep = j;
                break;
            }
        }
        /* dropped: every token but the first keep ranked (those below t included); the kept are marked by sign */
        for (int64_t j = 0; j < keep; j++) p[ranked[j].id] = -p[ranked[j].id];
        for (int64_t v = 0; v < V; v++) p[v] = p[v] < 0 ? -p[v] : 0;
    }
    if (s->min_p > 0)
        for (int64_t v = 0; v < V; v++)
            if (p[v] < s->min_p) p[v] = 0;
    double z = 0;
    for (int64_t v = 0; v < V; v++) z += p[v];
    const double target = u * z;
    double c = 0;
    int64_t last = -1;
    for (int64_t v = 0; v < V; v++) {
        if (p[v] > 0) {
            c += p[v];
            last = v;
            if (c > target) return v;
        }
    }
    return last; /* not reached: c ends at z > u z */
}

#endif
