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

Packed rows
-----------
With ``cu_seqlens`` (batch 1, N sequences end to end) the recurrence restarts at every sequence start s of
sequence i by taking ``a_s = 0`` and adding ``a_s h0_i`` (its initial state, or nothing) to the drive
(``chunked_blocks.PackedRows``): the masked decays make every chunk holding a start have total decay 0, so steps
1-4 run unchanged, with the injections added at their steps in both passes; each sequence's final state is
copied out of pass 2 at its last position. The backward masks the same decays, adds sequence i's final-state
gradient to the adjoint at its last position, and reads ``dL/dh0_i = mu_s a_s`` at its start (the term
``mu_s a_s h0_i`` joins X there, so g_delta and g_A need nothing else). No loop over sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._dt import prepare_dt
from .._layout import channels_last as _channels_last
from .._layout import empty_like_layout as _empty_like_layout
from .._states_at import check_positions, scan_in_pieces
from .._validate import records_grad
from ..errors import KernelInputError
from .chunked_blocks import (
    _LOG2E,
    PackedRows,
    _a_layout,
    _contract_c,
    _forward_block,
    _inject,
    _softplus_,
    _stage_block,
    _state_to_external,
    _state_to_internal,
    _unstage_transposed,
    _winput,
    _workspace,
    _wview,
    clear_workspace_cache,
)
from .ref import check_scan_args, check_state_update_args, compute_dtype

__all__ = ["clear_workspace_cache", "selective_scan_chunked", "selective_state_update_chunked"]

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


def _normalise_bc(X: torch.Tensor) -> torch.Tensor:
    return X if X.dim() == 4 else X.unsqueeze(1)


def _common_groups(B: torch.Tensor, C: torch.Tensor):
    """Give B and C the same number of groups (repeating the coarser one); both (b, g, n, l)."""
    gB, gC = B.shape[1], C.shape[1]
    if gB == gC:
        return B, C
    g = gB * gC // math.gcd(gB, gC)
    return B.repeat_interleave(g // gB, dim=1), C.repeat_interleave(g // gC, dim=1)


def _scan_forward(
    u,
    delta,
    A,
    B,
    C,
    h0,
    cdt,
    *,
    delta_bias=None,
    softplus=False,
    D=None,
    z=None,
    out=None,
    save_starts=False,
    chunk=CHUNK,
    block_elems=BLOCK_ELEMS,
    states_at=(),
    kept=None,
    packed=None,
):
    """Blocked forward; B, C are (b, g, n, l). Returns (y, final_state (b, d, n), starts or None).

    ``states_at`` (checked positions in 1..l): pass 2 holds every position's state of a block, so the states at
    those positions are copied out of it, (b, d, n) each, appended to ``kept``.

    With ``out`` given, the delta preprocessing and the D / z epilogue are fused in and the result is written
    into ``out`` (b, d, l) (any dtype); otherwise y is the raw scan output ``sum_n C h`` in ``cdt`` (laid out
    like ``u``) and ``delta`` must already be the effective delta.

    ``packed`` (a ``PackedRows``; batch 1, ``h0`` None): the state restarts at every sequence start and the final
    state is (N, d, n), each sequence's state after its last position (copied out of the blocks' pass 2)."""
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
    finals = None if packed is None else torch.zeros(packed.N, g, n, dg, dtype=cdt, device=dev)
    for s0 in range(0, l, L):
        Lv = min(L, l - s0)
        Cb = -(-Lv // T)
        Lp = Cb * T
        if save_starts:
            starts.append(carry.clone())
        dT, duT, BT, CT, _, u_w = _stage_block(ws, s0, Lv, Lp, delta, u, B, C, cdt, bias=bias, softplus=softplus)
        pack = None if packed is None else packed.block(s0, Lv, T, Cb)
        _, H, _, _ = _forward_block(ws, A2, carry, dT, duT, BT, Cb, pack=pack)
        if pack is not None:
            finals.index_copy_(0, pack.en_seq, pack.at(H, pack.en_idx))
        if kept is not None:
            for p in states_at:
                if s0 < p <= s0 + Lv:
                    c, t = divmod(p - 1 - s0, T)
                    kept.append(_state_to_external(H[:, c, t]))
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
            gate = torch.sigmoid(z_w, out=ws.work(3, Lv)).mul_(z_w)  # silu(z)
            if y.dtype == cdt:
                torch.mul(y_w, gate, out=y_dst)
                continue
            y_w.mul_(gate)
        y_dst.copy_(y_w)
    final = _state_to_external(carry if finals is None else finals)
    return y, final, (torch.stack(starts) if save_starts else None)


def _scan_backward(u, delta, A, B, C, starts, gy, g_final, cdt, chunk, block_elems, packed=None):
    """Gradients of (y = sum_n C h, final_state) w.r.t. u, delta (effective), A, B, C (b, g, n, l), h0.

    Per block, newest first: recompute the states from the saved block start, then the adjoint
    ``mu_t = dL/dh_t = C_t * gy_t + a_{t+1} * mu_{t+1}`` by the same two-pass chunked scan run backwards
    (local adjoints from a zero carry at each chunk end; exact chunk carries; exact adjoints), then
    g_C = sum gy h,  g_B = sum mu delta u,  g_(delta u) = sum_n mu B,
    and through a = exp(delta A) with X = mu * a * h_{t-1}:  g_delta += sum_n X A,  g_A += sum X delta.

    ``packed`` (a ``PackedRows``): the decays are masked at the sequence starts, the final-state gradient
    g_final (N, d, n) enters the adjoint at each sequence's last position (injected at its step, as J in the
    forward), X gains mu_s J_s = mu_s a_s h0_i at the starts, and the returned dL/dh0 is (N, d, n):
    mu_s a_s (unmasked decay) at each start."""
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
    gF = gh0 = None
    if packed is not None:
        gh0 = torch.zeros(packed.N, g, n, dg, dtype=cdt, device=dev)
        if g_final is not None:
            gF = _state_to_internal(g_final, g)
    elif g_final is not None:
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
        pack = None if packed is None else packed.block(s0, Lv, T, Cb)
        a, H, P, Hs = _forward_block(ws, A2, starts[k].clone(), dT, duT, BT, Cb, H=ws.big6(1, Cb), pack=pack)
        Gv = G1 = G2 = None  # packed rows: g_final at the sequences' last positions, by step
        if gF is not None and pack.en_idx.numel():
            Gv = gF.index_select(0, pack.en_seq)
            G1, G2 = pack.by_t(pack.en_cpu, 1), pack.by_t(pack.en_cpu)
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
            if G1:
                _inject(e, G1, T - 1, Gv)
            for t in range(T - 2, -1, -1):
                e.mul_(at[t + 1]).addcmul_(Ct[t], gyt[t])
                if G1:
                    _inject(e, G1, t, Gv)
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
            if G2:
                _inject(Mt[t], G2, t, Gv)
            torch.mul(Mt[t], at[t], out=Ht[t]).mul_(Ht[t - 1] if t > 0 else Hs)
        torch.mul(Mu[:, 0, 0], a[:, 0, 0], out=K)  # dL/d(state before this block)
        if pack is not None and pack.keep6 is not None:
            mu_st = pack.at(Mu, pack.st_idx)
            gh0.index_copy_(0, pack.st_seq, mu_st * pack.a_st)  # dL/dh0_i = mu_s a_s
            if pack.Jv is not None:  # X_s += mu_s a_s h0_i
                H.view(-1, g, n, dg).index_add_(0, pack.st_idx, mu_st * pack.Jv)
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
        gB[:, :, :, s0 : s0 + Lv].copy_(gBT[:, :Lv].permute(0, 2, 3, 1))
        gC[:, :, :, s0 : s0 + Lv].copy_(gCT[:, :Lv].permute(0, 2, 3, 1))
    gA_ext = gA.transpose(1, 2).reshape(d, n)
    return gu, gdelta, gA_ext, gB, gC, _state_to_external(K if gh0 is None else gh0)


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
    def forward(ctx, u, delta, A, B, C, h0, cdt, chunk, block_elems, cu_seqlens=None):
        ctx.set_materialize_grads(False)
        packed = None if cu_seqlens is None else PackedRows(cu_seqlens, h0, B.shape[1], cdt, u.device)
        y, final, starts = _scan_forward(
            u,
            delta,
            A,
            B,
            C,
            None if packed is not None else h0,
            cdt,
            save_starts=True,
            chunk=chunk,
            block_elems=block_elems,
            packed=packed,
        )
        ctx.packed = packed
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
        gu, gdelta, gA, gB, gC, gh0 = _scan_backward(
            u, delta, A, B, C, starts, gy_c, gf_c, cdt, ctx.chunk, ctx.block_elems, ctx.packed
        )
        gh0 = None if ctx.h0_meta is None else gh0.to(ctx.h0_meta)
        return (
            gu.to(u.dtype),
            gdelta.to(delta.dtype),
            gA.to(A.dtype),
            gB.to(B.dtype),
            gC.to(C.dtype),
            gh0,
            None,
            None,
            None,
            None,
        )


def _empty_scan(u, initial_state, b, d, n, cdt, return_final_state):
    out = u.new_empty(b, d, 0)
    if not return_final_state:
        return out
    if initial_state is None:
        return out, torch.zeros(b, d, n, dtype=cdt, device=u.device)
    return out, initial_state.to(cdt) * 1  # a fresh tensor that still carries autograd


def selective_scan_chunked(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
    *,
    chunk_size=None,
    block_elems=None,
    states_at=None,
    cu_seqlens=None,
):
    """Vectorised Mamba-1 selective scan (see the module docstring for the algorithm).

    ``states_at`` (strictly increasing positions in 1..l): also return the states after those positions,
    (b, k, d, n), as the last item: (out, final_state, states) or (out, states). Without autograd they are copied
    out of the blocks' pass-2 states (no extra scan work); with autograd the call is split at the positions and
    the state threaded (``kernels/_states_at.py``).

    Returns out (b, d, l) in u.dtype, or (out, final_state (b, d, n)) with ``return_final_state``; the state
    is float32 (float64 for float64 inputs). ``chunk_size`` / ``block_elems`` override the tiling (tests).

    ``cu_seqlens`` (N + 1,) (packed rows, batch 1): the state restarts at every sequence start (from zeros or
    ``initial_state`` (N, d, n)); the final state is (N, d, n). Done inside the blocks (``PackedRows``), no loop
    over sequences; the gradients are those of running each sequence alone.
    """
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    if cu_seqlens is not None and states_at is not None:
        raise KernelInputError("states_at cannot be combined with cu_seqlens (packed rows)")
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = records_grad(*tensors)
    if states_at is not None:
        positions = check_positions(states_at, l)
        if needs_grad or l == 0:
            fixed = dict(A=A, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus)
            fixed |= dict(chunk_size=chunk_size, block_elems=block_elems)
            sequences = dict(u=u, delta=delta, B=B, C=C, z=z)
            run = lambda **kw: selective_scan_chunked(**kw, **fixed)  # noqa: E731
            return scan_in_pieces(run, sequences, -1, l, initial_state, positions, return_final_state)
    if l == 0:
        return _empty_scan(u, initial_state, b, d, n, cdt, return_final_state)
    B4, C4 = _common_groups(_normalise_bc(B), _normalise_bc(C))
    chunk = chunk_size or CHUNK
    if not needs_grad:
        kept: list | None = None if states_at is None else []
        out = _empty_like_layout(u, u.dtype)  # position-major inputs give a position-major output
        packed = None if cu_seqlens is None else PackedRows(cu_seqlens, initial_state, B4.shape[1], cdt, u.device)
        out, final, _ = _scan_forward(
            u,
            delta,
            A,
            B4,
            C4,
            initial_state if packed is None else None,
            cdt,
            delta_bias=delta_bias,
            softplus=delta_softplus,
            D=D,
            z=z,
            out=out,
            chunk=chunk,
            block_elems=block_elems or BLOCK_ELEMS,
            states_at=positions if kept is not None else (),
            kept=kept,
            packed=packed,
        )
        if kept is not None:
            states = torch.stack(kept, dim=1)
            return (out, final, states) if return_final_state else (out, states)
        return (out, final) if return_final_state else out
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = _Softplus.apply(dt)
    y, final = _SelectiveScanCore.apply(
        u, dt, A, B4, C4, initial_state, cdt, chunk, block_elems or BLOCK_ELEMS_GRAD, cu_seqlens
    )
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
