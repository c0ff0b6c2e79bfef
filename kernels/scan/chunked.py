"""Mamba-1 selective scan: the vectorised PyTorch path (the fast CPU path; runs on any device).

Same signatures and semantics as ``ref.py`` (mamba_ssm's ``selective_scan_fn`` / ``selective_state_update``).

Algorithm: blocked two-pass chunked scan
---------------------------------------
The sequence is processed in blocks of ``L = C * T`` positions (``C`` chunks of ``T`` positions; a block's
(b, L, n, d) buffer holds about ``BLOCK_ELEMS`` elements, so the working set stays cache-sized), carrying the
exact state from block to block. Inside a block, with ``a_t = exp(delta_t * A)`` and ``x_t = delta_t u_t B_t``:

1. ``a`` for the whole block in one ``mul`` + ``exp2_`` (A is pre-scaled by log2(e); torch's exp2 is ~3x
   faster than its exp on CPU, and just as stable).
2. Pass 1: the local end state of every chunk from a zero start, ``s = a_t * s + x_t``: a Python loop over the
   T positions of a chunk, each step one vectorised op over all the chunks of the block (and b, n, d).
3. The true start state of every chunk, by a loop over the C chunks: ``H_c = P_{c-1} * H_{c-1} + s_{c-1}``,
   where ``P_c = exp(A * sum(delta over chunk c))`` is the chunk's total decay.
4. Pass 2: the exact recurrence ``h_t = a_t * h_{t-1} + x_t`` again, from the true chunk starts, written in
   place over ``a``; then ``y = C . h`` as one batched matmul over the block.

Why this form: every quantity is a product of factors ``exp(delta * A)`` taken forwards in time, or the
exponential of a forward sum of ``delta * A``. Nothing is ever divided by a decay (no ``exp(S_t) * exp(-S_s)``
factorisation), so the result is exact for any delta and A and cannot overflow unless the true state does
(decays that underflow become 0, as in the reference). The work is linear in l: one exp2 and about six cheap
elementwise passes per (b, d, n, position), where a single sequential pass would need one exp2 and three; that
second pass is the price of running T steps over all C chunks at once instead of l steps one by one. The
Python loops run 2T + C times per block of T * C positions (T = 16, C = 32 at the benchmark shape), never once
per position. Memory beyond the (b, d, l) inputs and output is a fixed-size workspace (kept per thread between
calls: fresh pages cost ~2 us each here), so it is constant in l; the (b, d, l, n) tensor is never formed.

Layouts: the block buffers are (b, C, T, g, n, d/g), so that a step's slice (b, C, g, n, d/g) has a long
contiguous inner run. (b, d, l) inputs reach that layout through contiguous staging copies and 2-D transposes
(torch's blocked transpose, ~4x faster than a strided gather). Inputs stored position-major, i.e. the
transpose of a contiguous (b, l, d) tensor as a Mamba mixer produces them, are used without any transpose,
and the output then has that layout too.

Autograd
--------
Under ``torch.no_grad()`` / ``inference_mode`` (or when nothing requires grad) the whole op, the delta
preprocessing and the D / z epilogue included, runs in the workspace with ``out=`` / in-place ops.

With gradients, the scan core (u, delta, A, B, C, initial_state -> y, final_state) is a
``torch.autograd.Function`` whose forward saves only its inputs and the block-start states (l / L tensors of
(b, d, n)) and whose backward recomputes each block (newest first) and runs the adjoint recurrence
``mu_t = C_t gy_t + a_{t+1} mu_{t+1}`` with the same two-pass chunked machinery, backwards. Autograd through
composed ops would store every (b, d, n) state of the sequence, i.e. the (b, d, l, n) tensor, and replay a
graph of O(l) nodes; the recomputing backward needs a few block buffers and is faster. The cheap (b, d, l)
parts (delta bias + softplus, D * u, the silu(z) gate) are composed from differentiable ops around it.
The backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .._dt import prepare_dt
from .._layout import channels_last as _channels_last
from .._layout import empty_like_layout as _empty_like_layout
from .._validate import records_grad
from .ref import check_scan_args, check_state_update_args, compute_dtype

__all__ = ["clear_workspace_cache", "selective_scan_chunked", "selective_state_update_chunked"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)

#: positions per chunk (the length of the per-position loops inside a block)
CHUNK = 16
#: elements of one (b, L, n, d) block buffer (8 MiB in fp32; 4 to 16 MiB measured alike on a 2-core EPYC).
#: The backward holds three such buffers.
BLOCK_ELEMS = 1 << 21
#: the same for the autograd path (its forward must cut the sequence where its backward does)
BLOCK_ELEMS_GRAD = 1 << 21
#: fewest chunks per block: the per-position Python loops then run at most (2 / MIN_CHUNKS + 1 / T) times per
#: position even when b * d * n alone exceeds the block budget
MIN_CHUNKS = 8


def _plan(b: int, d: int, n: int, l: int, chunk: int, block_elems: int) -> tuple[int, int]:
    """(T, C): T positions per chunk, C chunks per block (block buffers of about ``block_elems`` elements)."""
    T = max(1, min(chunk, l))
    per_position = max(1, b * d * n)
    C = max(MIN_CHUNKS, block_elems // (per_position * T))
    return T, min(C, -(-l // T))


def _softplus_(x: torch.Tensor, e: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """In-place softplus of ``x``, using the scratch tensors ``e``, ``v``, ``w`` (same shape as ``x``).

    ``softplus(x) = max(x, 0) + log1p(exp(-|x|))`` with ``log1p(e) = log(v) - ((v - 1) - e) / v`` for
    ``v = fl(1 + e)``: the classic correction of the rounding of 1 + e (``v - 1`` and ``(v - 1) - e`` are exact),
    accurate to a few ulp for every e in (0, 1]. torch's own softplus / log1p kernels are scalar on CPU
    (~10 ns per element); this uses only vectorised ops (exp2, log2) and is several times faster. It does not
    take torch's ``threshold=20`` shortcut: for x > 20 the two differ by less than 3e-9.
    """
    torch.abs(x, out=e)
    e.mul_(-_LOG2E).exp2_()              # e = exp(-|x|) in (0, 1]
    torch.add(e, 1.0, out=v)             # v = fl(1 + e)
    torch.sub(v, 1.0, out=w)
    w.sub_(e).div_(v)                    # w = ((v - 1) - e) / v
    v.log2_()
    x.clamp_(min=0).add_(v, alpha=_LN2).sub_(w)
    return x


def _stage_transposed(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (b, >=Lv, k) contiguous rows  <-  src (b, k, Lv) contiguous, same dtype: one 2-D transpose per batch
    (torch's blocked transpose path; a strided gather straight from (b, k, l) is ~4x slower)."""
    Lv = src.shape[2]
    for i in range(src.shape[0]):
        dst[i, :Lv].copy_(src[i].t())


def _unstage_transposed(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (b, k, Lv) contiguous  <-  src (b, >=Lv, k) contiguous rows."""
    Lv = dst.shape[2]
    for i in range(dst.shape[0]):
        dst[i].copy_(src[i, :Lv].t())


class _Workspace:
    """Buffers for one call, reused by every block; views of flat storage so that any prefix is contiguous.

    Work layout ``cl`` (channels-last inputs): the (b, d, l)-level work is done on (b, Lp, d) buffers, with
    no transposes at all; otherwise on (b, d, Lv) buffers, moved to and from (b, Lp, d) by 2-D transposes.
    big: (b, C, T, g, n, dg) block buffers;  ld: (b, Lp, d);  dl: (b, d, Lv);  lgn: (b, Lp, g, n);
    chunk: (b, C, g, n, dg) per-chunk states.
    """

    def __init__(self, b, d, n, g, T, C, dtype, device, *, cl, n_big, n_work, n_core, n_lgn, n_chunk):
        L = T * C
        dg = d // g
        self.b, self.d, self.n, self.g, self.dg, self.T, self.C, self.cl = b, d, n, g, dg, T, C, cl
        kw = dict(dtype=dtype, device=device)
        self.big = [torch.empty(b * L * g * n * dg, **kw) for _ in range(n_big)]
        # (b, Lp, d) buffers: the core's inputs / outputs (and, in the cl layout, the work buffers too)
        self.ld = [torch.empty(b * L * d, **kw) for _ in range(n_core + (n_work if cl else 0))]
        self.dl = [torch.empty(b * d * L, **kw) for _ in range(0 if cl else n_work)]
        self.n_core = n_core
        self.lgn = [torch.empty(b * L * g * n, **kw) for _ in range(n_lgn)]
        self.chunk = [torch.empty(b * C * g * n * dg, **kw) for _ in range(n_chunk)]

    def big6(self, i, Cb):
        return self.big[i][: self.b * Cb * self.T * self.g * self.n * self.dg].view(
            self.b, Cb, self.T, self.g, self.n, self.dg)

    def core(self, i, Lp):
        """(b, Lp, d) core buffer ``i``."""
        return self.ld[i][: self.b * Lp * self.d].view(self.b, Lp, self.d)

    def work(self, i, Lv):
        """Work buffer ``i`` in the work layout: (b, Lv, d) if cl else (b, d, Lv)."""
        if self.cl:
            return self.ld[self.n_core + i][: self.b * Lv * self.d].view(self.b, Lv, self.d)
        return self.dl[i][: self.b * self.d * Lv].view(self.b, self.d, Lv)

    def to_core(self, dst_core, src_work):
        """Work-layout block -> rows [:Lv] of a (b, Lp, d) core buffer (a no-op when they already share it)."""
        if self.cl:
            if src_work.data_ptr() != dst_core.data_ptr():
                dst_core[:, : src_work.shape[1]].copy_(src_work)
        else:
            _stage_transposed(dst_core, src_work)

    def lgnv(self, i, Lp):
        return self.lgn[i][: self.b * Lp * self.g * self.n].view(self.b, Lp, self.g, self.n)

    def chunkv(self, i, Cb):
        return self.chunk[i][: self.b * Cb * self.g * self.n * self.dg].view(
            self.b, Cb, self.g, self.n, self.dg)


def _wview(x: torch.Tensor, s0: int, Lv: int, cl: bool) -> torch.Tensor:
    """Block [s0, s0 + Lv) of a (b, d, l) tensor in the work layout (a view)."""
    v = x[:, :, s0:s0 + Lv]
    return v.transpose(1, 2) if cl else v


def _winput(ws, x, s0, Lv, slot, cdt):
    """Block of ``x`` in the work layout and ``cdt``: a view for position-major inputs of that dtype, else
    staged into work ``slot``."""
    v = _wview(x, s0, Lv, ws.cl)
    if ws.cl and x.dtype == cdt and _channels_last(x):
        return v
    # (b, d, l) layout: one contiguous copy, so that the strided rows are read from memory once
    return ws.work(slot, Lv).copy_(v)


_CACHE = threading.local()
#: workspaces kept per thread between calls (a fresh 30 MB workspace costs ~10 ms of page faults per call)
CACHE_ENTRIES = 3


def _workspace(*key, **counts) -> _Workspace:
    """A (per-thread, least-recently-used) cached ``_Workspace``; its buffers never leave one call."""
    full_key = key + tuple(sorted(counts.items()))
    cache = getattr(_CACHE, "entries", None)
    if cache is None:
        cache = _CACHE.entries = OrderedDict()
    ws = cache.pop(full_key, None)
    if ws is None:
        ws = _Workspace(*key, **counts)
    cache[full_key] = ws
    while len(cache) > CACHE_ENTRIES:
        cache.popitem(last=False)
    return ws


def clear_workspace_cache() -> None:
    """Free the scratch buffers this thread keeps between calls."""
    _CACHE.entries = OrderedDict()


def _state_to_internal(h: torch.Tensor, g: int) -> torch.Tensor:
    """(b, d, n) -> (b, g, n, d/g) view."""
    b, d, n = h.shape
    return h.reshape(b, g, d // g, n).transpose(2, 3)


def _state_to_external(h: torch.Tensor) -> torch.Tensor:
    """(b, g, n, d/g) -> (b, d, n), a fresh contiguous tensor."""
    b, g, n, dg = h.shape
    return h.transpose(2, 3).reshape(b, g * dg, n).clone(memory_format=torch.contiguous_format)


def _a_layout(A: torch.Tensor, g: int, cdt, scale: float = 1.0) -> torch.Tensor:
    """(d, n) -> (g, n, d/g) contiguous, times ``scale``."""
    d, n = A.shape
    A_ = A.to(cdt)
    if scale != 1.0:
        A_ = A_ * scale
    return A_.reshape(g, d // g, n).transpose(1, 2).contiguous()


# work slots: 0 delta, 1 delta * u, 2 y / gradient, 3-5 scratch, 6 u, 7 z / gy
def _stage_block(ws, s0, Lv, Lp, delta, u, B, C, cdt, *, bias=None, softplus=False):
    """Stage one block. Returns (dT, duT, BT, CT, d_w, u_w): dT / duT (b, Lp, d) the effective delta and
    delta * u in the core layout, zero-padded past Lv; BT / CT (b, Lp, g, n); d_w / u_w the effective delta
    and u in the work layout and ``cdt``."""
    dT, duT = ws.core(0, Lp), ws.core(1, Lp)
    d_w = dT[:, :Lv] if ws.cl else ws.work(0, Lv)
    d_w.copy_(_wview(delta, s0, Lv, ws.cl))
    if bias is not None:
        d_w.add_(bias)
    if softplus:
        _softplus_(d_w, ws.work(3, Lv), ws.work(4, Lv), ws.work(5, Lv))
    ws.to_core(dT, d_w)
    u_w = _winput(ws, u, s0, Lv, 6, cdt)
    du_w = duT[:, :Lv] if ws.cl else ws.work(1, Lv)
    torch.mul(d_w, u_w, out=du_w)
    ws.to_core(duT, du_w)
    BT, CT = ws.lgnv(0, Lp), ws.lgnv(1, Lp)
    BT[:, :Lv].copy_(B[:, :, :, s0:s0 + Lv].permute(0, 3, 1, 2))
    CT[:, :Lv].copy_(C[:, :, :, s0:s0 + Lv].permute(0, 3, 1, 2))
    if Lp > Lv:  # padding: delta = 0 and delta * u = 0 give a = 1, x = 0: the state passes through unchanged
        for X in (dT, duT, BT, CT):
            X[:, Lv:].zero_()
    return dT, duT, BT, CT, d_w, u_w


def _forward_block(ws, A2, carry, dT, duT, BT, Cb, H=None):
    """Steps 1-4 of the module docstring on one block.

    ``carry`` (b, g, n, dg) holds the state before the block and is updated in place to the state after it.
    Returns (a, H, P, Hs): the decays a (b, Cb, T, g, n, dg), the states H (written over ``a`` unless a
    separate buffer is given), the chunk decays P and the chunk start states Hs (b, Cb, g, n, dg)."""
    b, g, n, dg, T = ws.b, ws.g, ws.n, ws.dg, ws.T
    a = ws.big6(0, Cb)
    torch.mul(dT.view(b, Cb, T, g, 1, dg), A2, out=a)
    a.exp2_()
    du6 = duT.view(b, Cb, T, g, 1, dg)
    B6 = BT.view(b, Cb, T, g, n, 1)
    Cp = Cb - 1  # the last chunk's end state comes out of pass 2
    if Cp:
        # pass 1: local chunk-end states from a zero start
        at = a[:, :Cp].unbind(2)
        dut = du6[:, :Cp].unbind(2)
        Bt = B6[:, :Cp].unbind(2)
        s = ws.chunkv(0, Cb)[:, :Cp]
        torch.mul(dut[0], Bt[0], out=s)
        for t in range(1, T):
            s.mul_(at[t]).addcmul_(dut[t], Bt[t])
    # chunk decays exp(A * sum(delta)) and the true chunk start states
    P = ws.chunkv(1, Cb)
    torch.mul(dT.view(b, Cb, T, g, 1, dg).sum(2), A2, out=P)
    P.exp2_()
    Hs = ws.chunkv(2, Cb)
    Hs[:, 0].copy_(carry)
    if Cp:
        Hl, sl, Pl = Hs.unbind(1), ws.chunkv(0, Cb).unbind(1), P.unbind(1)
        for c in range(1, Cb):
            torch.addcmul(sl[c - 1], Pl[c - 1], Hl[c - 1], out=Hl[c])
    # pass 2: the exact recurrence from the true chunk starts
    if H is None:
        H = a
    at, Ht, dut, Bt = a.unbind(2), H.unbind(2), du6.unbind(2), B6.unbind(2)
    prev = Hs
    for t in range(T):
        torch.mul(at[t], prev, out=Ht[t]).addcmul_(dut[t], Bt[t])
        prev = Ht[t]
    carry.copy_(H[:, Cb - 1, T - 1])
    return a, H, P, Hs


def _contract_c(ws, H, CT, Lp, out_ld):
    """y (b, Lp, d) = sum_n C * h as one batched (1 x n) @ (n x dg) matmul."""
    M = ws.b * Lp * ws.g
    torch.bmm(CT.view(M, 1, ws.n), H.view(M, ws.n, ws.dg), out=out_ld.view(M, 1, ws.dg))
    return out_ld


def _normalise_bc(X: torch.Tensor) -> torch.Tensor:
    return X if X.dim() == 4 else X.unsqueeze(1)


def _common_groups(B: torch.Tensor, C: torch.Tensor):
    """Give B and C the same number of groups (repeating the coarser one); both (b, g, n, l)."""
    gB, gC = B.shape[1], C.shape[1]
    if gB == gC:
        return B, C
    g = gB * gC // math.gcd(gB, gC)
    return B.repeat_interleave(g // gB, dim=1), C.repeat_interleave(g // gC, dim=1)


def _scan_forward(u, delta, A, B, C, h0, cdt, *, delta_bias=None, softplus=False, D=None, z=None,
                  out=None, save_starts=False, chunk=CHUNK, block_elems=BLOCK_ELEMS):
    """Blocked forward; B, C are (b, g, n, l). Returns (y, final_state (b, d, n), starts or None).

    With ``out`` given, the delta preprocessing and the D / z epilogue are fused in and the result is written
    into ``out`` (b, d, l) (any dtype); otherwise y is the raw scan output ``sum_n C h`` in ``cdt`` (laid out
    like ``u``) and ``delta`` must already be the effective delta."""
    b, d, l = u.shape
    n = A.shape[1]
    g = B.shape[1]
    dg = d // g
    dev = u.device
    cl = _channels_last(u)
    T, Cmax = _plan(b, d, n, l, chunk, block_elems)
    L = T * Cmax
    ws = _workspace(b, d, n, g, T, Cmax, cdt, dev, cl=cl, n_big=1, n_work=8, n_core=3, n_lgn=2, n_chunk=3)
    A2 = _a_layout(A, g, cdt, _LOG2E)
    carry = torch.zeros(b, g, n, dg, dtype=cdt, device=dev)
    if h0 is not None:
        carry.copy_(_state_to_internal(h0, g))
    bias = None
    if delta_bias is not None:
        bias = delta_bias.to(cdt) if cl else delta_bias.to(cdt)[:, None]
    D_c = None
    if D is not None:
        D_c = D.to(cdt) if cl else D.to(cdt)[:, None]
    y = out if out is not None else _empty_like_layout(u, cdt)
    starts = [] if save_starts else None
    for s0 in range(0, l, L):
        Lv = min(L, l - s0)
        Cb = -(-Lv // T)
        Lp = Cb * T
        if save_starts:
            starts.append(carry.clone())
        dT, duT, BT, CT, _, u_w = _stage_block(ws, s0, Lv, Lp, delta, u, B, C, cdt, bias=bias,
                                               softplus=softplus)
        _, H, _, _ = _forward_block(ws, A2, carry, dT, duT, BT, Cb)
        yT = _contract_c(ws, H, CT, Lp, ws.core(2, Lp))
        if cl:
            y_w = yT[:, :Lv]
        else:
            y_w = ws.work(2, Lv)
            _unstage_transposed(y_w, yT)
        if D_c is not None:
            y_w.addcmul_(u_w, D_c)
        y_dst = _wview(y, s0, Lv, cl)
        if z is not None:
            z_w = _winput(ws, z, s0, Lv, 7, cdt)
            gate = torch.sigmoid(z_w, out=ws.work(3, Lv)).mul_(z_w)   # silu(z)
            if y.dtype == cdt:
                torch.mul(y_w, gate, out=y_dst)
                continue
            y_w.mul_(gate)
        y_dst.copy_(y_w)
    final = _state_to_external(carry)
    return y, final, (torch.stack(starts) if save_starts else None)


def _scan_backward(u, delta, A, B, C, starts, gy, g_final, cdt, chunk, block_elems):
    """Gradients of (y = sum_n C h, final_state) w.r.t. u, delta (effective), A, B, C (b, g, n, l), h0.

    Per block, newest first: recompute the states from the saved block start, then the adjoint
    ``mu_t = dL/dh_t = C_t * gy_t + a_{t+1} * mu_{t+1}`` by the same two-pass chunked scan run backwards
    (local adjoints from a zero carry at each chunk end; exact chunk carries; exact adjoints), then
    g_C = sum gy h,  g_B = sum mu delta u,  g_(delta u) = sum_n mu B,
    and through a = exp(delta A) with X = mu * a * h_{t-1}:  g_delta += sum_n X A,  g_A += sum X delta."""
    b, d, l = u.shape
    n = A.shape[1]
    g = B.shape[1]
    dg = d // g
    dev = u.device
    cl = _channels_last(u)
    T, Cmax = _plan(b, d, n, l, chunk, block_elems)
    L = T * Cmax
    ws = _workspace(b, d, n, g, T, Cmax, cdt, dev, cl=cl, n_big=3, n_work=8, n_core=5, n_lgn=4, n_chunk=4)
    A2 = _a_layout(A, g, cdt, _LOG2E)
    A_nat = _a_layout(A, g, cdt)
    gu = _empty_like_layout(u, cdt)
    gdelta = _empty_like_layout(u, cdt)
    gB = torch.empty(b, g, n, l, dtype=cdt, device=dev)
    gC = torch.empty(b, g, n, l, dtype=cdt, device=dev)
    gA = torch.zeros(g, n, dg, dtype=cdt, device=dev)
    K = torch.zeros(b, g, n, dg, dtype=cdt, device=dev)  # dL/d(state after the current block)
    if g_final is not None:
        K.copy_(_state_to_internal(g_final, g))
    nblocks = -(-l // L)
    for k in reversed(range(nblocks)):
        s0 = k * L
        Lv = min(L, l - s0)
        Cb = -(-Lv // T)
        Lp = Cb * T
        M = b * Lp * g
        dT, duT, BT, CT, d_w, u_w = _stage_block(ws, s0, Lv, Lp, delta, u, B, C, cdt)
        gyT = ws.core(2, Lp)
        if gy is None:
            gyT.zero_()
        else:
            ws.to_core(gyT, _winput(ws, gy, s0, Lv, 7, cdt))
            if Lp > Lv:
                gyT[:, Lv:].zero_()
        a, H, P, Hs = _forward_block(ws, A2, starts[k].clone(), dT, duT, BT, Cb, H=ws.big6(1, Cb))
        # g_C = sum_dg gy h, as (1 x dg) @ (dg x n): ~3x faster than the (n x dg) @ (dg x 1) mat-vec form
        gCT = ws.lgnv(2, Lp)
        torch.bmm(gyT.view(M, 1, dg), H.view(M, n, dg).transpose(1, 2), out=gCT.view(M, 1, n))
        gy6 = gyT.view(b, Cb, T, g, 1, dg)
        C6 = CT.view(b, Cb, T, g, n, 1)
        # reverse pass 1 (chunks 1..Cb-1): local adjoints from a zero carry at each chunk end;
        # e_c = a_0 * r_0 is what flows out of the start of chunk c
        if Cb > 1:
            at, gyt, Ct = a[:, 1:].unbind(2), gy6[:, 1:].unbind(2), C6[:, 1:].unbind(2)
            e = ws.chunkv(0, Cb)[:, 1:]
            torch.mul(Ct[T - 1], gyt[T - 1], out=e)
            for t in range(T - 2, -1, -1):
                e.mul_(at[t + 1]).addcmul_(Ct[t], gyt[t])
            e.mul_(at[0])
        # chunk carries: Ks[c] = dL/dh at the end of chunk c from everything after it
        Ks = ws.chunkv(3, Cb)
        Ks[:, Cb - 1].copy_(K)
        if Cb > 1:
            Kl, el, Pl = Ks.unbind(1), ws.chunkv(0, Cb).unbind(1), P.unbind(1)
            for c in range(Cb - 2, -1, -1):
                torch.addcmul(el[c + 1], Pl[c + 1], Kl[c + 1], out=Kl[c])
        # reverse pass 2: exact adjoints mu_t, and X_t = mu_t * a_t * h_{t-1} written over H
        Mu = ws.big6(2, Cb)
        at, Ht, Mt = a.unbind(2), H.unbind(2), Mu.unbind(2)
        gyt, Ct = gy6.unbind(2), C6.unbind(2)
        torch.addcmul(Ks, Ct[T - 1], gyt[T - 1], out=Mt[T - 1])
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                torch.mul(at[t + 1], Mt[t + 1], out=Mt[t]).addcmul_(Ct[t], gyt[t])
            torch.mul(Mt[t], at[t], out=Ht[t]).mul_(Ht[t - 1] if t > 0 else Hs)
        torch.mul(Mu[:, 0, 0], a[:, 0, 0], out=K)  # dL/d(state before this block)
        gBT = ws.lgnv(3, Lp)
        torch.bmm(duT.view(M, 1, dg), Mu.view(M, n, dg).transpose(1, 2), out=gBT.view(M, 1, n))
        gduT = ws.core(3, Lp)
        torch.bmm(BT.view(M, 1, n), Mu.view(M, n, dg), out=gduT.view(M, 1, dg))
        XA = torch.mul(H, A_nat, out=a)
        gdaT = ws.core(4, Lp)
        torch.sum(XA.view(b, Lp, g, n, dg), dim=3, out=gdaT.view(b, Lp, g, dg))
        H.mul_(dT.view(b, Cb, T, g, 1, dg))
        gA.add_(H.view(b * Lp, g, n, dg).sum(0))
        if cl:
            gdu_w, gda_w = gduT[:, :Lv], gdaT[:, :Lv]
        else:
            gdu_w, gda_w = ws.work(2, Lv), ws.work(3, Lv)
            _unstage_transposed(gdu_w, gduT)
            _unstage_transposed(gda_w, gdaT)
        torch.mul(gdu_w, d_w, out=_wview(gu, s0, Lv, cl))
        torch.addcmul(gda_w, gdu_w, u_w, out=_wview(gdelta, s0, Lv, cl))
        gB[:, :, :, s0:s0 + Lv].copy_(gBT[:, :Lv].permute(0, 2, 3, 1))
        gC[:, :, :, s0:s0 + Lv].copy_(gCT[:, :Lv].permute(0, 2, 3, 1))
    gA_ext = gA.transpose(1, 2).reshape(d, n)
    return gu, gdelta, gA_ext, gB, gC, _state_to_external(K)


class _Softplus(torch.autograd.Function):
    """softplus with the vectorised forward of ``_softplus_``; backward ``g * sigmoid(x)``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _softplus_(x.clone(), torch.empty_like(x), torch.empty_like(x), torch.empty_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class _SelectiveScanCore(torch.autograd.Function):
    """(u, delta_eff, A, B, C, h0) -> (y = sum_n C h, final_state); recomputing backward (see module doc)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, cdt, chunk, block_elems):
        ctx.set_materialize_grads(False)
        y, final, starts = _scan_forward(u, delta, A, B, C, h0, cdt, save_starts=True, chunk=chunk,
                                         block_elems=block_elems)
        ctx.save_for_backward(u, delta, A, B, C, starts)
        ctx.cdt, ctx.chunk, ctx.block_elems = cdt, chunk, block_elems
        ctx.h0_meta = None if h0 is None else h0.dtype
        return y, final

    @staticmethod
    def backward(ctx, gy, g_final):
        u, delta, A, B, C, starts = ctx.saved_tensors
        cdt = ctx.cdt
        gy_c = None if gy is None else gy.to(cdt)
        gf_c = None if g_final is None else g_final.to(cdt)
        gu, gdelta, gA, gB, gC, gh0 = _scan_backward(u, delta, A, B, C, starts, gy_c, gf_c, cdt,
                                                     ctx.chunk, ctx.block_elems)
        gh0 = None if ctx.h0_meta is None else gh0.to(ctx.h0_meta)
        return (gu.to(u.dtype), gdelta.to(delta.dtype), gA.to(A.dtype), gB.to(B.dtype), gC.to(C.dtype),
                gh0, None, None, None)


def _empty_scan(u, initial_state, b, d, n, cdt, return_final_state):
    out = u.new_empty(b, d, 0)
    if not return_final_state:
        return out
    if initial_state is None:
        return out, torch.zeros(b, d, n, dtype=cdt, device=u.device)
    return out, initial_state.to(cdt) * 1  # a fresh tensor that still carries autograd


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         initial_state=None, return_final_state=False, *, chunk_size=None, block_elems=None):
    """Vectorised Mamba-1 selective scan (see the module docstring for the algorithm).

    Returns out (b, d, l) in u.dtype, or (out, final_state (b, d, n)) with ``return_final_state``; the state
    is float32 (float64 for float64 inputs). ``chunk_size`` / ``block_elems`` override the tiling (tests).
    """
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if l == 0:
        return _empty_scan(u, initial_state, b, d, n, cdt, return_final_state)
    B4, C4 = _common_groups(_normalise_bc(B), _normalise_bc(C))
    chunk = chunk_size or CHUNK
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = records_grad(*tensors)
    if not needs_grad:
        out = _empty_like_layout(u, u.dtype)  # position-major inputs give a position-major output
        out, final, _ = _scan_forward(u, delta, A, B4, C4, initial_state, cdt, delta_bias=delta_bias,
                                      softplus=delta_softplus, D=D, z=z, out=out, chunk=chunk,
                                      block_elems=block_elems or BLOCK_ELEMS)
        return (out, final) if return_final_state else out
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = _Softplus.apply(dt)
    y, final = _SelectiveScanCore.apply(u, dt, A, B4, C4, initial_state, cdt, chunk,
                                        block_elems or BLOCK_ELEMS_GRAD)
    if D is not None:
        y = y + u.to(cdt) * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(u.dtype)
    return (out, final) if return_final_state else out


def selective_state_update_chunked(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One Mamba-1 decode step, vectorised over (b, d, n); differentiable; never mutates ``state``.

    Returns (y (b, d) in x.dtype, new_state (b, d, n) float32, or float64 when any input is float64).
    """
    b, d, n = check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    cdt = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    B3 = B.to(cdt) if B.dim() == 3 else B.to(cdt)[:, None]
    C3 = C.to(cdt) if C.dim() == 3 else C.to(cdt)[:, None]
    if B3.shape[1] != C3.shape[1]:
        B3, C3 = _common_groups(B3[..., None], C3[..., None])
        B3, C3 = B3[..., 0], C3[..., 0]
    g = B3.shape[1]
    dg = d // g
    x_ = x.to(cdt)
    dt_ = prepare_dt(dt, dt_bias, dt_softplus, cdt)
    # grouped views: channel (g, dg) reads B[:, g] without materialising per-channel copies
    decay = torch.exp(dt_[:, :, None] * A.to(cdt)).reshape(b, g, dg, n)
    drive = (dt_ * x_).reshape(b, g, dg, 1) * B3[:, :, None, :]
    new_state = torch.addcmul(drive, decay, state.to(cdt).reshape(b, g, dg, n))
    y = torch.matmul(new_state, C3[:, :, :, None]).reshape(b, d)
    if D is not None:
        y = y + D.to(cdt) * x_
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype), new_state.reshape(b, d, n)
