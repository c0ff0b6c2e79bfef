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

/* The version every library reports, so Python can refuse a stale cached build (kernels/_native.py keys the
 * cache by a hash of the sources, so this is a second line of defence). */
#define SEQLAB_NATIVE_ABI 1

#endif
