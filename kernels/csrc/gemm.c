/* The rows GEMM of seqlab_gemm.h on its own, for its tests and benchmarks (tests/test_kernels/test_native_gemm.py):
 * one parallel region of nthreads around one call. The decode step (step.c) calls the kernel from inside its own
 * region instead. Returns 0. sl_gemm_f32_bf16 / sl_gemm_f64_bf16: the bfloat16-weight variant. */
#include "seqlab_native.h"
#include "seqlab_gemm.h"

SL_ROWS_GEMM(float, f32)
SL_ROWS_GEMM(double, f64)

#define SL_GEMM_EXPORT(T, SUF)                                                                                         \
    SL_EXPORT int sl_gemm_##SUF(const T *W, const T *bias, const T *X, int64_t ldx, T *Y, const T *R, int64_t ldy,     \
                                int64_t nout, int64_t nin, int64_t batch, int nthreads) {                              \
        _Pragma("omp parallel num_threads(nthreads)")                                                                  \
            sl_rows_gemm_##SUF(W, bias, X, ldx, Y, R, ldy, nout, nin, batch);                                          \
        return 0;                                                                                                      \
    }

SL_GEMM_EXPORT(float, f32)
SL_GEMM_EXPORT(double, f64)

/* The same on bfloat16 weights (uint16_t bits), X / bias / R / Y in T. */
#define SL_GEMM_EXPORT_BF16(T, SUF)                                                                                    \
    SL_EXPORT int sl_gemm_##SUF##_bf16(const uint16_t *W, const T *bias, const T *X, int64_t ldx, T *Y, const T *R,    \
                                       int64_t ldy, int64_t nout, int64_t nin, int64_t batch, int nthreads) {          \
        _Pragma("omp parallel num_threads(nthreads)")                                                                  \
            sl_rows_gemm_##SUF##_bf16(W, bias, X, ldx, Y, R, ldy, nout, nin, batch);                                   \
        return 0;                                                                                                      \
    }

SL_GEMM_EXPORT_BF16(float, f32)
SL_GEMM_EXPORT_BF16(double, f64)
