"""AQLM quantized matmul: Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

The format is ``seqlab.quant.AQLMLinear``'s: ``codes`` (out, G, M) integers, ``codebooks`` (M, 2**B, g),
``scales`` (out,), optional ``bias`` (out,); ``W_hat[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o,
j, m]]``. Two entry points:

- :func:`aqlm_matmul_triton` computes ``x @ W_hat.T + bias`` for ``x`` (..., in). Up to ``max_matvec_rows``
  rows (decode) it runs ``_aqlm_matvec_kernel``: grid (output blocks, rows); per group the row's slice is
  loaded once and each output's M codewords are gathered from the codebooks and dotted with it. This is the GPU
  form of the lookup idea in the AQLM paper: on a GPU the codebooks (2x8g8: 8 KiB in fp16, 16 KiB in fp32) sit in
  L1/shared memory and a codeword gather costs about what a weight load costs, while DRAM moves only the codes,
  2 bits per weight instead of 16 or 32, which is what bounds a batch-1 matvec. The CPU path's precomputed table
  (``AQLMLinear._forward_lut``) pays off there because the CPU's gathers are scalar; here the dot products are
  vectorised over the group. Longer inputs (prefill) dequantise the weight with ``_aqlm_dequant_kernel`` (grid
  (output blocks, groups)) and call the GEMM (cuBLAS on a GPU).
- :func:`aqlm_dequantize_triton` returns ``W_hat`` (out, in).

Arithmetic is fp32 whatever the input dtype; the output has ``x``'s dtype. No autograd: these are inference paths
(``AQLMLinear`` uses them only when no gradient is needed, and its torch paths otherwise). Block sizes are fixed
(no autotune, so the interpreter runs the same code); the GPU timing waits for a GPU session (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton

from .._triton import require_triton_device
from .triton_kernels import _aqlm_dequant_kernel, _aqlm_matvec_kernel

__all__ = ["aqlm_dequantize_triton", "aqlm_matmul_triton"]

#: outputs per program
BLOCK_O = 64
#: rows up to which the matvec kernel runs (beyond: dequantise, then one GEMM)
MAX_MATVEC_ROWS = 8


def _check(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    if codes.dim() != 3 or codebooks.dim() != 3 or codes.shape[2] != codebooks.shape[0]:
        raise ValueError(
            f"aqlm: codes {tuple(codes.shape)} and codebooks {tuple(codebooks.shape)} do not fit (M must agree)"
        )
    if tuple(scales.shape) != (codes.shape[0],) or (bias is not None and tuple(bias.shape) != (codes.shape[0],)):
        raise ValueError(f"aqlm: scales and bias must be ({codes.shape[0]},) for codes {tuple(codes.shape)}")
    require_triton_device("aqlm", codes, codebooks, scales, bias)


def _launch_args(codes: torch.Tensor, codebooks: torch.Tensor):
    m, size, g = codebooks.shape
    return dict(M=m, K=size, G=g, G_PAD=triton.next_power_of_2(g), BLOCK_O=BLOCK_O)


def aqlm_dequantize_triton(
    codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``W_hat`` (out, G*g) in ``dtype`` (default the codebooks')."""
    _check(codes, codebooks, scales, None)
    out_features, groups, _ = codes.shape
    g = codebooks.shape[2]
    w = torch.empty(out_features, groups * g, dtype=dtype or codebooks.dtype, device=codebooks.device)
    grid = (triton.cdiv(out_features, BLOCK_O), groups)
    _aqlm_dequant_kernel[grid](
        codes.contiguous(),
        codebooks.contiguous(),
        scales.contiguous(),
        w,
        out_features,
        groups,
        **_launch_args(codes, codebooks),
    )
    return w


def aqlm_matmul_triton(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_matvec_rows: int = MAX_MATVEC_ROWS,
) -> torch.Tensor:
    """``x @ W_hat.T (+ bias)`` for ``x`` (..., in); see the module docstring for the two paths."""
    _check(codes, codebooks, scales, bias)
    out_features, groups, _ = codes.shape
    in_features = groups * codebooks.shape[2]
    if x.shape[-1] != in_features:
        raise ValueError(f"aqlm: x has {x.shape[-1]} features, the weight takes {in_features}")
    require_triton_device("aqlm", x)
    lead = x.shape[:-1]
    rows = x.numel() // in_features if in_features else 0
    if rows == 0 or rows > max_matvec_rows:
        w = aqlm_dequantize_triton(codes, codebooks, scales, dtype=x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x.reshape(rows, in_features).contiguous()
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(out_features, BLOCK_O), rows)
    _aqlm_matvec_kernel[grid](
        x2,
        codes.contiguous(),
        codebooks.contiguous(),
        scales.contiguous(),
        bias if bias is not None else scales,  # not read without a bias
        y,
        out_features,
        groups,
        x2.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        **_launch_args(codes, codebooks),
    )
    return y.reshape(*lead, out_features)
