"""Causal depthwise conv1d: Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Same signatures, semantics and return conventions as ``chunked.py`` / ``ref.py`` (mamba_ssm's
``causal_conv1d_fn`` / ``causal_conv1d_update``)::

    y_t = act(bias + sum_{k=0}^{w-1} weight[:, k] * x_{t - (w-1) + k})        x (b, d, l), weight (d, w)

with the w - 1 inputs before position 0 taken from ``initial_state`` (zeros when None), and ``final_state`` the
last w - 1 inputs of ``[initial_state, x]``. Arithmetic is float32 for fp16 / bf16 / fp32 inputs and float64
when any input is float64 (a constexpr accumulator dtype; float64 is slow on most GPUs but exact to the
reference). ``y`` comes back in ``x.dtype`` with x's layout (a position-major x, i.e. the transpose of a
contiguous (b, l, d) as a Mamba mixer hands it over, gives a position-major y); the state holds raw inputs
and keeps the dtype of the state passed in (``x.dtype`` when none is), exactly like the chunked path.

Kernels
-------
``_conv_fwd_kernel`` (one launch): grid (time blocks, channel blocks, batch). A program owns a
(BLOCK_D, BLOCK_L) tile of y. For each tap k it loads the tile of ``[initial_state, x]`` shifted by
k - (w - 1) positions (the w - 1 halo in front of the tile comes from x, or from ``initial_state`` for the
first block); the w shifted loads overlap and are served from L1/L2, so DRAM sees each input once. It fuses
bias, silu, the cast to the output dtype and, in the last time block, the final-state write.

``_conv_bwd_kernel`` (one launch): grid (time chunks, channel blocks, batch). A program walks its chunk of
the sequence in BLOCK_L tiles and, from x, weight, bias, gy and g_final, recomputes the pre-activation where
silu needs it (never stored by the forward), and produces

- ``dx_t = sum_k weight[:, k] * gp_{t + (w-1) - k}`` (+ g_final for the last w - 1 positions), where
  ``gp = gy * silu'(pre)`` is recomputed at the w shifted positions (with silu, w (w + 2) tile loads per
  tile, all but about three of them (x, gy, dx's neighbours) served from L1/L2; a shared-memory staging of
  the x tile would cut the L1 traffic and is the obvious next step if the backward is L1-bound on a GPU);
- per-chunk partial ``dweight[:, k] = sum_t gp_t * x_{t - (w-1) + k}`` and ``dbias = sum_t gp_t`` in
  fp32 registers, written once per program to a small (chunks * b, w, d) buffer that the host sums
  (deterministic, no atomics);
- ``dinitial_state`` from the program holding t = 0 (the same formula at positions -(w-1) .. -1, plus the
  g_final entries that pass straight through when l < w - 1).

``_conv_update_kernel`` (decode step, one launch): grid (channel blocks, batch); a (BLOCK_D, w) window of
[conv_state, x] is reduced against the taps, bias + silu fused, and the shifted window is written to a fresh
state (the state passed in is never written).

Packed rows (``cu_seqlens``, batch 1; ``VARLEN``): the kernels read the sequence number of every position
(int32, (l,)) and ``cu_seqlens``. A position t of sequence i = [lo, hi) reads its taps from x down to lo and
from row i of ``initial_state`` before it (zeros without one), so no tap crosses a boundary; in the backward
only outputs in [lo, hi) feed dx_t, and g_final's row i enters at the last w - 1 positions before hi. The
final states and dinitial_state (N rows) are written by the first time block of each channel block, as
tiles of (sequence, slot) columns (so a sequence shorter than w - 1 passes part of its initial state through,
as in the reference); no loop over sequences.

Minimum bytes moved (the benchmark's roofline; s = element size of x/y, s_st of the state):
forward ``b*d*l*(s_x + s_y) + d*w*s_w`` (+ ``2*b*d*(w-1)*s_st`` with states); forward + backward adds
``b*d*l*(s_x + s_gy + s_dx)`` (x is re-read, the pre-activation recomputed); decode step
``b*d*(s_x + s_y + 2*(w-1)*s_st) + d*w*s_w``.

Block sizes are picked from the layout (no autotune, so the interpreter runs the same code): position-major
x (stride 1 along d) gets wide channel tiles (coalesced along d), standard x wide time tiles (coalesced along
l). Strides are passed as arguments, so channels-last views, strided views and expanded gradients need no copy.

Autograd: ``torch.autograd.Function`` around the two kernels, with gradients for x, weight, bias and
initial_state, through both y and the returned final state. The backward is not itself differentiable.
The decode step has no Triton backward: when a gradient is needed (grad mode on and an input requires
grad) it runs the differentiable chunked path (``causal_conv1d_update_chunked``), which gives the same numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import channels_last as _channels_last
from .._layout import empty_like_layout as _empty_like_layout
from .._triton import interpreting, require_triton_device
from .._validate import records_grad
from .ref import check_conv_args, check_conv_update_args, compute_dtype
from .triton_kernels import _conv_bwd_kernel, _conv_fwd_kernel, _conv_update_kernel

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton"]

#: programs the backward aims for (time chunks x channel blocks x batch): enough to fill a large GPU a few
#: times over while keeping the per-chunk dweight partials small
_BWD_TARGET_PROGRAMS = 1024


# ---------------------------------------------------------------------------------------------- host side


def _acc_dtype(cdt: torch.dtype):
    return tl.float64 if cdt == torch.float64 else tl.float32


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _tiles(x: torch.Tensor, d: int, l: int, elems: int, block_l=None, block_d=None):
    """(BLOCK_D, BLOCK_L) for a tile of about ``elems`` elements, long along the unit-stride dimension."""
    if _channels_last(x):
        bd = min(64, _pow2(d))
        bl = max(16, min(elems // bd, _pow2(l)))
    else:
        bl = max(16, min(256, _pow2(l)))
        bd = max(1, min(elems // bl, _pow2(d)))
    return int(block_d or bd), int(block_l or bl)


def _strides3(t, fallback=(0, 0, 0)):
    return tuple(t.stride()) if t is not None else fallback


def _or(t, fallback):
    """A real tensor for a pointer argument: Triton cannot take None, nor an empty tensor on every device."""
    return t if t is not None and t.numel() > 0 else fallback


def _num_warps(elems: int) -> int:
    return 4 if elems <= 2048 else 8


def _sequence_numbers(cu: torch.Tensor, length: int) -> torch.Tensor:
    """The sequence number of every position (int32, (length,)), on cu's device without a host sync."""
    positions = torch.arange(length, device=cu.device)
    return torch.searchsorted(cu[1:], positions, right=True).to(torch.int32)


class _Packed:
    """Packed rows for the kernels: the sequence number of every position (int32, (l,)) and cu_seqlens (int64)
    on the inputs' device."""

    def __init__(self, cu_seqlens, device, length):
        self.cu = cu_seqlens.to(device, torch.int64).contiguous()
        self.N = self.cu.numel() - 1
        self.seq = _sequence_numbers(self.cu, length)


def _conv_forward(x, weight, bias, initial_state, silu, cdt, want_state, block_l=None, block_d=None, packed=None):
    b, d, l = x.shape
    w = weight.shape[1]
    y = _empty_like_layout(x, x.dtype)
    state_dtype = initial_state.dtype if initial_state is not None else x.dtype
    rows = b if packed is None else packed.N
    final = torch.empty(rows, d, w - 1, dtype=state_dtype, device=x.device) if want_state else None
    if b * d == 0:
        return y, final
    bd, bl = _tiles(x, d, l, 4096, block_l, block_d)
    n_tblocks = max(1, triton.cdiv(l, bl))
    has_init = initial_state is not None and w > 1
    write_state = want_state and w > 1
    init = initial_state if has_init else None
    grid = (n_tblocks, triton.cdiv(d, bd), b)
    _conv_fwd_kernel[grid](
        x,
        _or(init, x),
        weight,
        _or(bias, weight),
        y,
        _or(final if write_state else None, y),
        packed.seq if packed is not None else y,
        packed.cu if packed is not None else y,
        d,
        l,
        n_tblocks,
        packed.N if packed is not None else 0,
        *x.stride(),
        *_strides3(init),
        *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *y.stride(),
        *_strides3(final if write_state else None),
        BLOCK_D=bd,
        BLOCK_L=bl,
        SP=_pow2(w - 1),
        W=w,
        HAS_INIT=has_init,
        HAS_BIAS=bias is not None,
        SILU=silu,
        WRITE_STATE=write_state,
        ACC=_acc_dtype(cdt),
        VARLEN=packed is not None,
        num_warps=_num_warps(bd * bl),
    )
    return y, final


def _conv_backward(
    x,
    weight,
    bias,
    initial_state,
    gy,
    g_final,
    silu,
    cdt,
    needs,
    block_l=None,
    block_d=None,
    bwd_chunk=None,
    packed=None,
):
    """Gradients (dx, dweight, dbias, dinitial_state); ``needs`` = which of them are wanted."""
    b, d, l = x.shape
    w = weight.shape[1]
    dev = x.device
    need_x, need_w, need_b, need_i = needs
    has_init = initial_state is not None and w > 1
    has_gy = gy is not None and l > 0
    has_gf = g_final is not None and w > 1
    dx = _empty_like_layout(x, x.dtype)
    di = (
        torch.empty(initial_state.shape[0], d, w - 1, dtype=initial_state.dtype, device=dev)
        if initial_state is not None and need_i
        else None
    )
    want_di = di is not None and w > 1
    if di is not None and w == 1:
        di.zero_()
    want_dw = bool(need_w) and has_gy
    want_db = bias is not None and bool(need_b) and has_gy
    bd, bl = _tiles(x, d, l, 2048, block_l, block_d)
    n_dblocks = triton.cdiv(d, bd)
    n_tblocks = max(1, triton.cdiv(l, bl))
    if bwd_chunk is not None:
        chunk_blocks = int(bwd_chunk)
    else:
        n_chunks = min(n_tblocks, max(1, triton.cdiv(_BWD_TARGET_PROGRAMS, b * n_dblocks)))
        if interpreting():
            n_chunks = 1  # the interpreter runs programs one after another: fewer, longer ones are faster
        chunk_blocks = triton.cdiv(n_tblocks, n_chunks)
    n_chunks = max(1, triton.cdiv(n_tblocks, chunk_blocks))
    dw_part = (
        torch.empty(n_chunks * b, w, d, dtype=torch.float32 if cdt != torch.float64 else cdt, device=dev)
        if want_dw
        else None
    )
    db_part = (
        torch.empty(n_chunks * b, d, dtype=torch.float32 if cdt != torch.float64 else cdt, device=dev)
        if want_db
        else None
    )
    if b * d > 0:
        init = initial_state if has_init else None
        gf = g_final if has_gf else None
        gy_arg = gy if has_gy else None
        grid = (n_chunks, n_dblocks, b)
        _conv_bwd_kernel[grid](
            x,
            _or(init, x),
            weight,
            _or(bias, weight),
            _or(gy_arg, x),
            _or(gf, x),
            dx,
            _or(di if want_di else None, dx),
            _or(dw_part, dx),
            _or(db_part, dx),
            packed.seq if packed is not None else dx,
            packed.cu if packed is not None else dx,
            b,
            d,
            l,
            chunk_blocks * bl,
            packed.N if packed is not None else 0,
            *x.stride(),
            *_strides3(init),
            *weight.stride(),
            bias.stride(0) if bias is not None else 0,
            *_strides3(gy_arg),
            *_strides3(gf),
            *dx.stride(),
            *_strides3(di if want_di else None),
            BLOCK_D=bd,
            BLOCK_L=bl,
            SP=_pow2(w - 1),
            WP=_pow2(w),
            W=w,
            HAS_INIT=has_init,
            HAS_BIAS=bias is not None,
            SILU=silu,
            HAS_GY=has_gy,
            HAS_GFINAL=has_gf,
            WANT_DINIT=want_di,
            WANT_DW=want_dw,
            WANT_DB=want_db,
            ACC=_acc_dtype(cdt),
            VARLEN=packed is not None,
            num_warps=_num_warps(bd * bl),
        )
    g_x = dx if need_x else None
    g_w = None
    if need_w:
        g_w = dw_part.sum(0).t().to(weight.dtype) if want_dw else torch.zeros_like(weight)
    g_b = None
    if bias is not None and need_b:
        g_b = db_part.sum(0).to(bias.dtype) if want_db else torch.zeros_like(bias)
    return g_x, g_w, g_b, di


class _CausalConv1dTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu, cdt, tiles, packed=None):
        ctx.set_materialize_grads(False)
        y, final = _conv_forward(x, weight, bias, initial_state, silu, cdt, True, *tiles[:2], packed=packed)
        ctx.save_for_backward(x, weight, bias, initial_state)
        ctx.silu, ctx.cdt, ctx.tiles, ctx.packed = silu, cdt, tiles, packed
        return y, final

    @staticmethod
    def backward(ctx, gy, g_final):
        x, weight, bias, initial_state = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        g_x, g_w, g_b, g_i = _conv_backward(
            x, weight, bias, initial_state, gy, g_final, ctx.silu, ctx.cdt, needs, *ctx.tiles, packed=ctx.packed
        )
        return g_x, g_w, g_b, g_i, None, None, None, None


def causal_conv1d_triton(
    x,
    weight,
    bias=None,
    activation=None,
    initial_state=None,
    return_final_state=False,
    *,
    block_l=None,
    block_d=None,
    bwd_chunk=None,
    cu_seqlens=None,
):
    """Causal depthwise conv1d on Triton. Returns y (b, d, l) in x.dtype (laid out like x), or
    (y, final_state (b, d, w - 1)), the state in initial_state's dtype (x.dtype when none is).

    float64 inputs are computed in float64. ``block_l`` / ``block_d`` (tile sizes, powers of two) and
    ``bwd_chunk`` (time tiles per backward program) override the heuristics (tests).

    ``cu_seqlens`` (packed rows, batch 1): ``initial_state`` and the final state are (N, d, w - 1), one row per
    sequence; no tap crosses a sequence start (module docstring, "Packed rows")."""
    require_triton_device("causal_conv1d", x, weight, bias, initial_state)
    b, d, l, w, silu = check_conv_args(x, weight, bias, activation, initial_state, cu_seqlens)
    cdt = compute_dtype(x, weight, bias, initial_state)
    packed = None if cu_seqlens is None else _Packed(cu_seqlens, x.device, l)
    tensors = (x, weight, bias, initial_state)
    needs_grad = records_grad(*tensors)
    if needs_grad:
        y, final = _CausalConv1dTritonFn.apply(
            x, weight, bias, initial_state, silu, cdt, (block_l, block_d, bwd_chunk), packed
        )
        return (y, final) if return_final_state else y
    y, final = _conv_forward(
        x, weight, bias, initial_state, silu, cdt, return_final_state, block_l, block_d, packed=packed
    )
    if not return_final_state:
        return y
    if w == 1:
        final = torch.empty(b if packed is None else packed.N, d, 0, dtype=final.dtype, device=x.device)
    return y, final


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None):
    """One conv decode step on Triton: x (b, d), conv_state (b, d, w - 1) -> (y (b, d) in x.dtype, new_state
    in conv_state's dtype). ``conv_state`` is never written. One kernel launch; float64 inputs compute in
    float64. No Triton backward: when grad mode is on and an input requires grad, the differentiable torch
    path runs instead (same numbers)."""
    require_triton_device("causal_conv1d_update", x, conv_state, weight, bias)
    b, d, w, silu = check_conv_update_args(x, conv_state, weight, bias, activation)
    tensors = (x, conv_state, weight, bias)
    if records_grad(*tensors):
        from .chunked import causal_conv1d_update_chunked

        return causal_conv1d_update_chunked(x, conv_state, weight, bias, activation)
    cdt = compute_dtype(x, conv_state, weight, bias)
    y = torch.empty(b, d, dtype=x.dtype, device=x.device)
    new_state = torch.empty(b, d, w - 1, dtype=conv_state.dtype, device=x.device)
    if b * d == 0:
        return y, new_state
    bd = min(256, _pow2(d))
    has_state = w > 1
    st = conv_state if has_state else None
    ns = new_state if has_state else None
    grid = (triton.cdiv(d, bd), b)
    _conv_update_kernel[grid](
        x,
        _or(st, x),
        weight,
        _or(bias, weight),
        y,
        _or(ns, y),
        d,
        *x.stride(),
        *_strides3(st),
        *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *y.stride(),
        *_strides3(ns),
        BLOCK_D=bd,
        WP=_pow2(w),
        W=w,
        HAS_BIAS=bias is not None,
        SILU=silu,
        ACC=_acc_dtype(cdt),
        num_warps=4,
    )
    return y, new_state
