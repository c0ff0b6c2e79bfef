"""Causal depthwise conv1d: the vectorised PyTorch path (the fast CPU path; runs on any device).

Same signatures and semantics as ``ref.py`` (mamba_ssm's ``causal_conv1d_fn`` / ``causal_conv1d_update``).

The convolution is ``w`` shifted multiply-adds over the sequence (w is 4 in Mamba), never a loop over time:
``y = bias + sum_k weight[:, k] * x[t - (w-1) + k]``. The output positions are processed in blocks of a few
thousand, reading the taps straight from ``x`` (only the first w - 1 outputs, which reach back into
``initial_state``, and inputs that need a dtype conversion are staged), accumulating with ``addcmul_`` into
the output itself when it has the compute dtype, and applying silu in place: memory beyond the (b, d, l)
input and output is constant in l.

Inputs stored position-major (the transpose of a contiguous (b, l, d) tensor, as a Mamba mixer produces them)
are worked on in that layout, and the output keeps it, so a mixer never pays for a transpose.

Autograd: a ``torch.autograd.Function`` runs the same blocked forward (so the grad and no-grad paths give the
same numbers), saves only its inputs, and computes the backward with the same shifted multiply-adds
(``g_x`` is the correlation of the pre-activation gradient with the taps, ``g_weight[:, k]`` a dot product per
tap), the gradient of ``initial_state`` and of the returned final state included. This avoids the im2col /
oneDNN paths of ``F.conv1d(groups=d)`` (slow for fp64, fp16 and bf16 on CPU) and keeps one code path for every
dtype and layout. The backward is not itself differentiable (no double backward).

Packed rows (``cu_seqlens``, batch 1): the blocked conv runs over the whole row as if it were one sequence,
then only the outputs whose taps reach back past their sequence's start (the first w - 1 positions of each
sequence, at most N (w - 1) of them) are recomputed from the right window (the sequence's ``initial_state``
row, or zeros, in front of its first inputs) and written over. Sequence i's final state is gathered from
[x, initial states] by index arithmetic. The recomputation and the gathers are index ops: autograd sends the
gradient of the overwritten outputs to the right x and initial-state entries (none to the discarded
cross-boundary outputs), so the gradients are those of running each sequence alone; no loop over sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._layout import channels_last as _channels_last
from .._layout import empty_like_layout as _empty_like_layout
from .._validate import records_grad
from .ref import check_conv_args, check_conv_update_args, compute_dtype

__all__ = ["causal_conv1d_chunked", "causal_conv1d_update_chunked"]

#: elements of (b, d, positions) per block of the inference forward
BLOCK_ELEMS = 1 << 18


class _Work:
    """A (b, d, l) tensor seen in the work layout: positions along ``dim`` (2 standard, 1 position-major)."""

    def __init__(self, cl: bool):
        self.cl = cl
        self.dim = 1 if cl else 2

    def view(self, x):
        return x.transpose(1, 2) if self.cl else x

    def per_channel(self, v):
        """(d,) -> broadcastable over the work layout."""
        return v if self.cl else v[:, None]


def _final_state(x, initial_state, w, state_dtype):
    """Last w - 1 inputs of [initial_state, x] as a fresh (b, d, w - 1) tensor."""
    b, d, l = x.shape
    if l >= w - 1:
        tail = x[:, :, l - (w - 1) :]
    else:
        prev = initial_state if initial_state is not None else x.new_zeros(b, d, w - 1)
        tail = torch.cat([prev[:, :, l:].to(x.dtype), x], dim=-1)
    return tail.to(state_dtype).clone(memory_format=torch.contiguous_format)


def _conv_forward(x, weight, bias, silu, initial_state, cdt, out, block_elems=None):
    """Blocked shifted multiply-adds into ``out`` (b, d, l), any dtype and layout. Returns ``out``."""
    b, d, l = x.shape
    w = weight.shape[1]
    lay = _Work(_channels_last(x))
    pd = lay.dim
    xw, ow = lay.view(x), lay.view(out)
    taps = [lay.per_channel(weight[:, k].to(cdt)) for k in range(w)]
    bias_c = lay.per_channel(bias.to(cdt)) if bias is not None else None
    Lb = max(w, (block_elems or BLOCK_ELEMS) // max(1, b * d))
    stage = None  # staged input block (with w - 1 positions of history in front)
    acc_buf = None  # accumulator when ``out`` does not have the compute dtype
    for s0 in range(0, l, Lb):
        Lv = min(Lb, l - s0)
        if s0 >= w - 1 and x.dtype == cdt:
            xin = xw.narrow(pd, s0 - (w - 1), Lv + w - 1)
        else:
            if stage is None:
                shape = (b, Lb + w - 1, d) if lay.cl else (b, d, Lb + w - 1)
                stage = torch.empty(shape, dtype=cdt, device=x.device)
            xin = stage.narrow(pd, 0, Lv + w - 1)
            if s0 >= w - 1:
                xin.copy_(xw.narrow(pd, s0 - (w - 1), Lv + w - 1))
            else:  # the first block (s0 == 0) reaches back into the initial state
                if initial_state is None:
                    xin.narrow(pd, 0, w - 1).zero_()
                else:
                    xin.narrow(pd, 0, w - 1).copy_(lay.view(initial_state))
                xin.narrow(pd, w - 1, Lv).copy_(xw.narrow(pd, 0, Lv))
        if out.dtype == cdt:
            acc = ow.narrow(pd, s0, Lv)
        else:
            if acc_buf is None:
                acc_buf = torch.empty((b, Lb, d) if lay.cl else (b, d, Lb), dtype=cdt, device=x.device)
            acc = acc_buf.narrow(pd, 0, Lv)
        if bias_c is not None:
            torch.addcmul(bias_c, xin.narrow(pd, 0, Lv), taps[0], out=acc)
        else:
            torch.mul(xin.narrow(pd, 0, Lv), taps[0], out=acc)
        for k in range(1, w):
            acc.addcmul_(xin.narrow(pd, k, Lv), taps[k])
        if silu:
            F.silu(acc, inplace=True)
        if out.dtype != cdt:
            ow.narrow(pd, s0, Lv).copy_(acc)
    return out


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu, cdt, block_elems):
        ctx.set_materialize_grads(False)
        y = _conv_forward(x, weight, bias, silu, initial_state, cdt, _empty_like_layout(x, x.dtype), block_elems)
        ctx.save_for_backward(x, weight, bias, initial_state)
        ctx.silu, ctx.cdt = silu, cdt
        state_dtype = initial_state.dtype if initial_state is not None else x.dtype
        return y, _final_state(x, initial_state, weight.shape[1], state_dtype)

    @staticmethod
    def backward(ctx, gy, g_final):
        x, weight, bias, initial_state = ctx.saved_tensors
        cdt = ctx.cdt
        b, d, l = x.shape
        w = weight.shape[1]
        lay = _Work(_channels_last(x))
        pd = lay.dim
        # full = [initial_state, x] in the work layout and cdt: positions 0..w-2 are the history
        prev = initial_state.to(cdt) if initial_state is not None else x.new_zeros(b, d, w - 1, dtype=cdt)
        full = torch.cat([lay.view(prev), lay.view(x).to(cdt)], dim=pd)
        if gy is None:
            g_pre = full.new_zeros(full.shape).narrow(pd, 0, l)
        else:
            g_pre = lay.view(gy).to(cdt)
            if ctx.silu:
                # silu'(p) = s (1 + p - p s) with s = sigmoid(p), built in place over the recomputed p
                p = lay.view(_conv_forward(x, weight, bias, False, initial_state, cdt, _empty_like_layout(x, cdt)))
                s = torch.sigmoid(p)
                torch.addcmul(p, p, s, value=-1, out=p).add_(1).mul_(s).mul_(g_pre)
                g_pre = p
        g_full = torch.zeros_like(full)
        taps = weight.to(cdt)
        for k in range(w):
            g_full.narrow(pd, k, l).addcmul_(g_pre, lay.per_channel(taps[:, k]))
        if g_final is not None and w > 1:
            g_full.narrow(pd, l, w - 1).add_(lay.view(g_final.to(cdt)))
        reduce_dims = (0, 1) if lay.cl else (0, 2)
        g_w = None
        if ctx.needs_input_grad[1]:
            tmp = torch.empty_like(g_pre)
            g_w = torch.stack(
                [torch.mul(g_pre, full.narrow(pd, k, l), out=tmp).sum(reduce_dims) for k in range(w)], dim=1
            ).to(weight.dtype)
        g_b = g_pre.sum(reduce_dims).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        g_x = lay.view(g_full.narrow(pd, w - 1, l)).to(x.dtype)
        g_init = None
        if initial_state is not None and ctx.needs_input_grad[3]:
            g_init = lay.view(g_full.narrow(pd, 0, w - 1)).to(initial_state.dtype)
        return g_x, g_w, g_b, g_init, None, None, None


def _packed_gather(x, initial_state, cu, w, cdt):
    """A function ``take(p, i)``: the values (d, *p.shape) in ``cdt`` at positions ``p`` of sequences ``i``
    (broadcast together), where a position before the sequence's start reads its initial state (or 0)."""
    _, d, l = x.shape
    h = w - 1
    x2 = x[0]
    init = None if initial_state is None else initial_state.permute(1, 0, 2).reshape(d, -1)  # (d, N * h)

    def take(p, i):
        p, i = torch.broadcast_tensors(p, i)
        start = cu[i]
        inside = (p >= start).reshape(-1)
        vals = x2.index_select(1, p.clamp(0, l - 1).reshape(-1)).to(cdt)
        if init is None:
            vals = vals * inside
        else:
            col = (i * h + (p - start + h)).clamp(0, init.shape[1] - 1).reshape(-1)
            vals = torch.where(inside, vals, init.index_select(1, col).to(cdt))
        return vals.view(d, *p.shape)

    return take


def _packed_conv(y, x, weight, bias, silu, initial_state, cu_seqlens, return_final_state, cdt):
    """Packed rows (module docstring): ``y`` is the conv of the whole row; returns (y fixed [, final])."""
    _, d, l = x.shape
    w = weight.shape[1]
    dev = x.device
    cu = cu_seqlens.to(dev, torch.int64)
    N = cu.numel() - 1
    h = w - 1
    state_dtype = initial_state.dtype if initial_state is not None else x.dtype
    if h == 0:
        return (y, torch.empty(N, d, 0, dtype=state_dtype, device=dev)) if return_final_state else y
    take = _packed_gather(x, initial_state, cu, w, cdt)
    # the first h positions of every sequence (those inside it): their windows, from the right sources
    seq = torch.arange(N, device=dev).repeat_interleave(h)
    pos = cu[:-1].repeat_interleave(h) + torch.arange(h, device=dev).repeat(N)
    inside = pos < cu[1:].repeat_interleave(h)
    seq, pos = seq[inside], pos[inside]
    taps = pos[:, None] - h + torch.arange(w, device=dev)  # (M, w)
    windows = take(taps, seq[:, None])  # (d, M, w)
    pre = (windows * weight.to(cdt)[:, None, :]).sum(-1)
    if bias is not None:
        pre = pre + bias.to(cdt)[:, None]
    fixed = (F.silu(pre) if silu else pre).to(y.dtype)[None]
    if records_grad(y, fixed):
        y = y.index_copy(2, pos, fixed)
    else:
        y.index_copy_(2, pos, fixed)
    if not return_final_state:
        return y
    # sequence i's final state: positions end_i - h .. end_i - 1 of [initial state i, sequence i]
    last = cu[1:, None] - h + torch.arange(h, device=dev)  # (N, h)
    final = take(last, torch.arange(N, device=dev)[:, None]).permute(1, 0, 2).to(state_dtype)
    return y, final.contiguous()


def causal_conv1d_chunked(
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
    """Vectorised causal depthwise conv1d. Returns y (b, d, l) in x.dtype (laid out like x), or
    (y, final_state (b, d, w - 1)), the state in initial_state's dtype (x.dtype when none is given).
    ``block_elems`` overrides the block size of the forward (tests). ``cu_seqlens`` (packed rows, batch 1):
    ``initial_state`` and the final state are (N, d, w - 1), one row per sequence (module docstring)."""
    b, d, l, w, silu = check_conv_args(x, weight, bias, activation, initial_state, cu_seqlens)
    cdt = compute_dtype(x, weight, bias, initial_state)
    if cu_seqlens is not None:
        y = causal_conv1d_chunked(x, weight, bias, activation, block_elems=block_elems)  # the whole row at once
        return _packed_conv(y, x, weight, bias, silu, initial_state, cu_seqlens, return_final_state, cdt)
    tensors = (x, weight, bias, initial_state)
    needs_grad = records_grad(*tensors)
    if needs_grad:
        y, final = _CausalConv1dFn.apply(x, weight, bias, initial_state, silu, cdt, block_elems)
        return (y, final) if return_final_state else y
    y = _conv_forward(x, weight, bias, silu, initial_state, cdt, _empty_like_layout(x, x.dtype), block_elems)
    if not return_final_state:
        return y
    state_dtype = initial_state.dtype if initial_state is not None else x.dtype
    return y, _final_state(x, initial_state, w, state_dtype)


def causal_conv1d_update_chunked(x, conv_state, weight, bias=None, activation=None):
    """One conv step: x (b, d), conv_state (b, d, w - 1) -> (y (b, d) in x.dtype, new_state in
    conv_state's dtype). Differentiable; never mutates ``conv_state``."""
    b, d, w, silu = check_conv_update_args(x, conv_state, weight, bias, activation)
    cdt = compute_dtype(x, conv_state, weight, bias)
    window = torch.cat([conv_state.to(cdt), x.to(cdt)[:, :, None]], dim=-1)  # (b, d, w), oldest first
    y = torch.einsum("bdw,dw->bd", window, weight.to(cdt))
    if bias is not None:
        y = y + bias.to(cdt)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), window[:, :, 1:].to(conv_state.dtype)
