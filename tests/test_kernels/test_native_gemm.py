"""The compiled rows GEMM (kernels/csrc/seqlab_gemm.h, exported for tests by gemm.c): Y = (R +) (X @ W.T + bias)
against torch, on odd shapes and strided rows, and row independence bit for bit: a row's result does not depend on
the batch around it, its place in the batch, or the thread count (what lets the fused decode step batch rows)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from seqlab.kernels import _native

LIB = _native.native_library("gemm.c")
if LIB is None:
    pytest.skip(
        f"the compiled CPU kernels do not build here: {_native.native_unavailable_reason('gemm.c')}",
        allow_module_level=True,
    )

_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_int]
for _fn in (LIB.sl_gemm_f32, LIB.sl_gemm_f64, LIB.sl_gemm_f32_bf16, LIB.sl_gemm_f64_bf16):
    _fn.argtypes = _ARGTYPES
    _fn.restype = ctypes.c_int

SENTINEL = 12345.0
ODD = (1, 3, 7, 33, 255, 257)


def gemm(W, X, bias=None, R=None, *, threads=1, ldx=None, ldy=None, in_place=False):
    """Run the kernel with X rows at stride ldx and Y (and R) rows at stride ldy; checks that nothing outside
    Y's rows was written and returns Y (batch, nout). A bfloat16 W runs the bfloat16-weight kernel in X's dtype."""
    (nout, nin), batch = W.shape, X.shape[0]
    dtype = X.dtype
    ldx = nin if ldx is None else ldx
    ldy = nout if ldy is None else ldy
    xbuf = torch.full((batch, ldx), SENTINEL, dtype=dtype)
    xbuf[:, :nin] = X
    ybuf = torch.full((batch, ldy), SENTINEL, dtype=dtype)
    rbuf = None
    if R is not None:
        rbuf = torch.full((batch, ldy), -SENTINEL, dtype=dtype)
        rbuf[:, :nout] = R
        if in_place:
            ybuf = rbuf
    fn = LIB.sl_gemm_f64 if dtype == torch.float64 else LIB.sl_gemm_f32
    if W.dtype == torch.bfloat16:
        fn = LIB.sl_gemm_f64_bf16 if dtype == torch.float64 else LIB.sl_gemm_f32_bf16
    ptrs = [_native.ptr(t) for t in (W, bias, xbuf, ybuf, rbuf)]
    rc = fn(*ptrs[:3], ldx, *ptrs[3:], ldy, nout, nin, batch, threads)
    assert rc == 0
    outside = -SENTINEL if in_place else SENTINEL
    assert torch.all(ybuf[:, nout:] == outside), "wrote past nout in a row"
    return ybuf[:, :nout].clone()


def inputs(nout, nin, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(nout, nin, generator=g, dtype=torch.float64).to(dtype)
    X = torch.randn(batch, nin, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(nout, generator=g, dtype=torch.float64).to(dtype)
    R = torch.randn(batch, nout, generator=g, dtype=torch.float64).to(dtype)
    return W, X, bias, R


def reference(W, X, bias, R):
    """In float64, with the sum of the magnitudes of the terms (the scale of a rounding error bound)."""
    W, X = W.double(), X.double()
    y = X @ W.T
    mag = X.abs() @ W.abs().T
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    if R is not None:
        y, mag = y + R.double(), mag + R.double().abs()
    return y, mag


def check_close(got, W, X, bias, R):
    want, mag = reference(W, X, bias, R)
    eps = torch.finfo(got.dtype).eps
    # each lane sums nin / 8 products in order, then a 3-level tree, + bias, + R: a bound of (nin / 8 + 8) eps |terms|
    bound = (W.shape[1] / 8 + 8) * eps * mag + torch.finfo(got.dtype).tiny
    err = (got.double() - want).abs()
    if got.dtype == torch.float64:
        assert torch.all(err <= 1e-12 * (1 + want.abs())), f"float64 off by {err.max():.3g}"
    assert torch.all(err <= bound), f"max error {err.max():.3g} over the bound {bound[err > bound].min():.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_on_odd_shapes_and_every_small_batch(dtype):
    seed = 0
    for nout in ODD:
        for nin in (*ODD, 8, 9, 16):
            W, X, bias, R = inputs(nout, nin, 17, dtype, seed)
            for batch in range(1, 18):
                seed += 1
                with_bias, with_r = seed % 2 == 0, seed % 3 != 0
                b, r = (bias if with_bias else None), (R[:batch] if with_r else None)
                got = gemm(W, X[:batch], b, r, threads=1 + seed % 2)
                check_close(got, W, X[:batch], b, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_r", [False, True])
def test_bias_and_residual_options_with_strided_rows(dtype, with_bias, with_r):
    for nout, nin, batch in [(257, 33, 16), (33, 255, 5), (8, 64, 1), (7, 9, 3), (1316, 256, 2)]:
        W, X, bias, R = inputs(nout, nin, batch, dtype, nout + nin)
        b, r = (bias if with_bias else None), (R if with_r else None)
        got = gemm(W, X, b, r, threads=2, ldx=nin + 5, ldy=nout + 3)
        check_close(got, W, X, b, r)
        assert torch.equal(got, gemm(W, X, b, r, threads=1)), "strides changed a result"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_residual_may_be_the_output(dtype):
    W, X, bias, R = inputs(255, 257, 6, dtype)
    assert torch.equal(gemm(W, X, bias, R, in_place=True, ldy=260), gemm(W, X, bias, R))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_rows_give_bias_plus_residual(dtype):
    W, X, bias, R = inputs(9, 0, 5, dtype)
    assert torch.equal(gemm(W, X, bias, R), R + (torch.zeros(9, dtype=dtype) + bias))
    assert gemm(W, X[:0], bias, R[:0]).shape == (0, 9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1024, 256), (48, 512), (257, 33), (7, 1000), (1, 9)])
def test_rows_are_independent_bit_for_bit(dtype, shape):
    """Each row gets exactly what it gets alone: whatever the batch size, its place in the batch, the other rows,
    and the thread count (1, 2, or more threads than row blocks)."""
    nout, nin = shape
    W, X, bias, R = inputs(nout, nin, 17, dtype, nout)
    alone = torch.cat([gemm(W, X[b : b + 1], bias, R[b : b + 1]) for b in range(17)])
    for batch in (2, 3, 4, 5, 7, 16, 17):
        for threads in (1, 2, 3):
            got = gemm(W, X[:batch], bias, R[:batch], threads=threads)
            assert torch.equal(got, alone[:batch]), (batch, threads)
    # the same rows in another order and next to other rows
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gemm(W, X[perm], bias, R[perm], threads=2), alone[perm])
    _, other, _, other_r = inputs(nout, nin, 16, dtype, nout + 1)
    mixed = torch.cat([other[:11], X[3:4], other[11:]])
    mixed_r = torch.cat([other_r[:11], R[3:4], other_r[11:]])
    assert torch.equal(gemm(W, mixed, bias, mixed_r)[11], alone[3])
    # and without bias and residual
    alone_plain = torch.cat([gemm(W, X[b : b + 1]) for b in range(17)])
    assert torch.equal(gemm(W, X, threads=2), alone_plain)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bfloat16_weights_give_the_widened_weights_result_bit_for_bit(dtype):
    """The bfloat16-weight kernel (a bfloat16 model's projections in the fused step) reads half the bytes and
    returns exactly what the kernel returns on the weights converted to ``dtype``: every odd shape (the
    zero-padded tail), every tile (batch 1 to 17), bias, residual and strides, 1 and 2 threads."""
    seed = 0
    for nout in ODD:
        for nin in (*ODD, 8, 9, 16):
            W, X, bias, R = inputs(nout, nin, 17, dtype, seed)
            Wb = W.to(torch.bfloat16)
            assert not torch.equal(Wb.to(dtype), W) or nin * nout < 4  # the weights really were rounded
            for batch in (1, 2, 3, 4, 5, 7, 16, 17):
                seed += 1
                b, r = (bias if seed % 2 else None), (R[:batch] if seed % 3 else None)
                got = gemm(Wb, X[:batch], b, r, threads=1 + seed % 2, ldx=nin + seed % 3)
                assert torch.equal(got, gemm(Wb.to(dtype), X[:batch], b, r)), (nout, nin, batch)
