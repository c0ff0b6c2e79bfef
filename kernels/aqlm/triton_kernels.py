"""AQLM's Triton kernels (device code): the codeword-gather matvec for decode and the dequantisation for prefill.

``triton_ops.py`` picks the tiles, launches them and describes the method.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _aqlm_matvec_kernel(
    x_ptr,
    codes_ptr,
    books_ptr,
    scales_ptr,
    bias_ptr,
    y_ptr,
    out_features,
    groups,
    s_xr,
    s_yr,
    M: tl.constexpr,
    K: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_O: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """y[r, o] = scales[o] * sum_{j,m} <x[r, j*G:(j+1)*G], books[m, codes[o, j, m]]> (+ bias[o]) for one row r
    and a block of BLOCK_O outputs: per group, the row's slice is loaded once and every output's M codewords are
    gathered (the codebooks are small and stay in cache) and dotted with it, in fp32."""
    r = tl.program_id(1)
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o < out_features
    k = tl.arange(0, G_PAD)
    k_mask = k < G
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for j in range(0, groups):
        xs = tl.load(x_ptr + r * s_xr + j * G + k, mask=k_mask, other=0.0).to(tl.float32)
        for m in tl.static_range(M):
            code = tl.load(codes_ptr + (o * groups + j) * M + m, mask=o_mask, other=0)
            words = tl.load(
                books_ptr + (m * K + code)[:, None] * G + k[None, :],
                mask=o_mask[:, None] & k_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(words * xs[None, :], axis=1)
    acc = acc * tl.load(scales_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * s_yr + o, acc.to(y_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _aqlm_dequant_kernel(
    codes_ptr,
    books_ptr,
    scales_ptr,
    w_ptr,
    out_features,
    groups,
    M: tl.constexpr,
    K: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """W_hat[o, j*G:(j+1)*G] = scales[o] * sum_m books[m, codes[o, j, m]] for a block of outputs and one group j."""
    j = tl.program_id(1)
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o < out_features
    k = tl.arange(0, G_PAD)
    mask = o_mask[:, None] & (k < G)[None, :]
    acc = tl.zeros((BLOCK_O, G_PAD), dtype=tl.float32)
    for m in tl.static_range(M):
        code = tl.load(codes_ptr + (o * groups + j) * M + m, mask=o_mask, other=0)
        acc += tl.load(books_ptr + (m * K + code)[:, None] * G + k[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = acc * tl.load(scales_ptr + o, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(w_ptr + o[:, None] * (groups * G) + j * G + k[None, :], acc.to(w_ptr.dtype.element_ty), mask=mask)
