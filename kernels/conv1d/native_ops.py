"""Causal depthwise conv1d: the compiled CPU path (``csrc/conv1d.c``, built on first use by ``kernels/_native.py``).

Same signatures, checks and results as ``chunked.py``. The C kernel walks the positions once per slice of
channel blocks, vectorised across consecutive channels, parallel over (batch row, slice) with OpenMP, and reads
its inputs through their strides (the mixer's position-major views and contiguous (b, d, l) alike); the output
has x's layout. float32 and float64 run natively (bf16 / fp16 inputs are computed in float32 and converted back).

Autograd: a ``torch.autograd.Function`` whose backward is also C (gradients of x, weight, bias and
initial_state, the final state's gradient included; no double backward).

Delegated to ``chunked`` (the vectorised PyTorch path, same results): packed rows (``cu_seqlens``) and kernels
wider than 64 taps.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .._layout import empty_like_layout
from .._native import native_library, num_threads, ptr
from .._validate import records_grad
from ..errors import KernelInputError
from .chunked import _final_state, causal_conv1d_chunked, causal_conv1d_update_chunked
from .ref import check_conv_args, check_conv_update_args, compute_dtype

__all__ = ["causal_conv1d_native", "causal_conv1d_update_native"]

#: widest kernel the C code handles (its per-position window buffer)
MAX_WIDTH = 64

_I64 = ctypes.c_int64
_P = ctypes.c_void_p


class _ConvArgs(ctypes.Structure):
    # mirrors sl_conv_args in csrc/conv1d.c (same order)
    _fields_ = [(f, _I64) for f in ("b", "d", "l", "w", "silu")]
    _fields_ += [(f, _I64 * 3) for f in ("sx", "sy", "sgy", "sgx", "sinit")]
    _fields_ += [(f, _P) for f in ("x", "weight", "bias", "init", "y", "gy", "gfinal", "gx", "gw", "gb", "ginit")]


class _StepArgs(ctypes.Structure):
    # mirrors sl_conv_step_args in csrc/conv1d.c
    _fields_ = [(f, _I64) for f in ("b", "d", "w", "silu")]
    _fields_ += [("sx", _I64 * 2), ("sstate", _I64 * 3), ("sy", _I64 * 2), ("snew", _I64 * 3)]
    _fields_ += [(f, _P) for f in ("x", "state", "weight", "bias", "y", "new_state")]


_STEP_WORDS = ctypes.sizeof(_StepArgs) // 8


@functools.cache
def _fn(name: str, cdt: torch.dtype):
    lib = native_library("conv1d.c")
    if lib is None:  # the dispatcher checks first; a direct call on a machine without a compiler lands here
        raise RuntimeError("seqlab's compiled conv1d kernels (csrc/conv1d.c) cannot be built or loaded here")
    return getattr(lib, f"{name}_{'d' if cdt == torch.float64 else 'f'}")


def _strides(t: torch.Tensor | None, k: int):
    return (_I64 * k)(*(t.stride() if t is not None else (0,) * k))


def _args(x, weight, bias, init, silu: bool) -> _ConvArgs:
    b, d, l = x.shape
    args = _ConvArgs()
    args.b, args.d, args.l, args.w, args.silu = b, d, l, weight.shape[1], int(silu)
    args.sx, args.sinit = _strides(x, 3), _strides(init, 3)
    args.x, args.weight, args.bias, args.init = ptr(x), ptr(weight), ptr(bias), ptr(init)
    return args


def _prepare(x, weight, bias, init, cdt):
    """Compute-dtype tensors for C: x and the initial state by strides, weight and bias dense."""
    x_ = x.detach().to(cdt)
    w_ = weight.detach().to(cdt).contiguous()
    b_ = None if bias is None else bias.detach().to(cdt).contiguous()
    i_ = None if init is None else init.detach().to(cdt)
    return x_, w_, b_, i_


def _forward(x, weight, bias, init, silu, cdt, out_dtype):
    args = _args(x, weight, bias, init, silu)
    y = empty_like_layout(x, cdt)
    args.sy, args.y = _strides(y, 3), ptr(y)
    _fn("sl_conv_fwd", cdt)(ctypes.byref(args), num_threads())
    return y.to(out_dtype)


class _NativeConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, init, silu, cdt):
        ctx.set_materialize_grads(False)
        ins = _prepare(x, weight, bias, init, cdt)
        y = _forward(*ins, silu, cdt, x.dtype)
        ctx.save_for_backward(*ins)
        ctx.silu, ctx.cdt = silu, cdt
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, None if init is None else init.dtype)
        state_dtype = init.dtype if init is not None else x.dtype
        return y, _final_state(x.detach(), None if init is None else init.detach(), weight.shape[1], state_dtype)

    @staticmethod
    def backward(ctx, gy, g_final):
        x, weight, bias, init = ctx.saved_tensors
        cdt = ctx.cdt
        b, d, l = x.shape
        w = weight.shape[1]
        args = _args(x, weight, bias, init, ctx.silu)
        gy_c = None if gy is None else gy.to(cdt)
        gf_c = None if g_final is None or w == 1 else g_final.to(cdt).contiguous()
        gx = empty_like_layout(x, cdt)
        gw = torch.empty(b, d, w, dtype=cdt)
        gb = torch.empty(b, d, dtype=cdt)
        ginit = torch.empty(b, d, w - 1, dtype=cdt)
        args.sgy, args.sgx = _strides(gy_c, 3), _strides(gx, 3)
        args.gy, args.gfinal, args.gx, args.gw, args.gb = ptr(gy_c), ptr(gf_c), ptr(gx), ptr(gw), ptr(gb)
        args.ginit = ptr(ginit)
        _fn("sl_conv_bwd", cdt)(ctypes.byref(args), num_threads())
        x_dt, w_dt, b_dt, i_dt = ctx.dtypes
        need = ctx.needs_input_grad
        return (
            gx.to(x_dt) if need[0] else None,
            gw.sum(0).to(w_dt) if need[1] else None,
            gb.sum(0).to(b_dt) if b_dt is not None and need[2] else None,
            ginit.to(i_dt) if i_dt is not None and need[3] else None,
            None,
            None,
        )


def causal_conv1d_native(
    x,
    weight,
    bias=None,
    activation=None,
    initial_state=None,
    return_final_state=False,
    *,
    block_elems=None,
    cu_seqlens=None,
):
    """Compiled causal depthwise conv1d (see the module docstring); arguments and results as
    ``causal_conv1d_chunked``: y (b, d, l) in x.dtype laid out like x, or (y, final_state (b, d, w - 1)) in
    initial_state's dtype (x.dtype when none is given). ``block_elems`` is accepted for signature parity and
    ignored. Packed rows (``cu_seqlens``) and kernels wider than 64 taps run on ``chunked``."""
    b, d, l, w, silu = check_conv_args(x, weight, bias, activation, initial_state, cu_seqlens)
    if cu_seqlens is not None or w > MAX_WIDTH:
        kw = dict(block_elems=block_elems, cu_seqlens=cu_seqlens)
        return causal_conv1d_chunked(x, weight, bias, activation, initial_state, return_final_state, **kw)
    if x.device.type != "cpu":
        raise KernelInputError(f"the native causal conv1d runs on CPU tensors; x is on {x.device}")
    cdt = compute_dtype(x, weight, bias, initial_state)
    if records_grad(x, weight, bias, initial_state):
        y, final = _NativeConv.apply(x, weight, bias, initial_state, silu, cdt)
        return (y, final) if return_final_state else y
    y = _forward(*_prepare(x, weight, bias, initial_state, cdt), silu, cdt, x.dtype)
    if not return_final_state:
        return y
    state_dtype = initial_state.dtype if initial_state is not None else x.dtype
    return y, _final_state(x, initial_state, w, state_dtype)


def causal_conv1d_update_native(x, conv_state, weight, bias=None, activation=None):
    """One conv step in one C call (arguments and results as ``causal_conv1d_update_chunked``): x (b, d),
    conv_state (b, d, w - 1) -> (y (b, d) in x.dtype, new_state in conv_state's dtype); ``conv_state`` is not
    mutated. With autograd recording (or more than 64 taps), the differentiable ``chunked`` step runs instead."""
    b, d, w, silu = check_conv_update_args(x, conv_state, weight, bias, activation)
    if records_grad(x, conv_state, weight, bias) or w > MAX_WIDTH:
        return causal_conv1d_update_chunked(x, conv_state, weight, bias, activation)
    if x.device.type != "cpu":
        raise KernelInputError(f"the native conv update runs on CPU tensors; x is on {x.device}")
    cdt = compute_dtype(x, conv_state, weight, bias)
    x_ = x.to(cdt)
    st = conv_state.to(cdt)
    w_ = weight.to(cdt).contiguous()
    b_ = None if bias is None else bias.to(cdt).contiguous()
    y = torch.empty(b, d, dtype=cdt)
    new_state = torch.empty(b, d, w - 1, dtype=cdt)
    # one flat int64 array in _StepArgs' field order (all 8-byte words): cheaper than filling a Structure
    vals = [b, d, w, int(silu), *x_.stride(), *st.stride(), *y.stride(), *new_state.stride()]
    vals += [0 if t is None else t.data_ptr() for t in (x_, st, w_, b_, y, new_state)]
    args = (_I64 * _STEP_WORDS)(*vals)
    _fn("sl_conv_step", cdt)(args, num_threads())
    return y.to(x.dtype), new_state.to(conv_state.dtype)
