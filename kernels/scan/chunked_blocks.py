"""The selective scan's chunked path, its machinery: the per-thread workspace, block staging and the
two-pass forward over one block (steps 1-4 of ``chunked.py``'s docstring, which describes the algorithm and the
layouts). ``chunked.py`` runs the blocks over the sequence, its backward and the public functions.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from .._layout import channels_last as _channels_last

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def _softplus_(x: torch.Tensor, e: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """In-place softplus of ``x``, using the scratch tensors ``e``, ``v``, ``w`` (same shape as ``x``).

    ``softplus(x) = max(x, 0) + log1p(exp(-|x|))`` with ``log1p(e) = log(v) - ((v - 1) - e) / v`` for
    ``v = fl(1 + e)``: the classic correction of the rounding of 1 + e (``v - 1`` and ``(v - 1) - e`` are exact),
    accurate to a few ulp for every e in (0, 1]. torch's own softplus / log1p kernels are scalar on CPU
    (~10 ns per element); this uses only vectorised ops (exp2, log2) and is several times faster. It does not
    take torch's ``threshold=20`` shortcut: for x > 20 the two differ by less than 3e-9.
    """
    torch.abs(x, out=e)
    e.mul_(-_LOG2E).exp2_()  # e = exp(-|x|) in (0, 1]
    torch.add(e, 1.0, out=v)  # v = fl(1 + e)
    torch.sub(v, 1.0, out=w)
    w.sub_(e).div_(v)  # w = ((v - 1) - e) / v
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
            self.b, Cb, self.T, self.g, self.n, self.dg
        )

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
        return self.chunk[i][: self.b * Cb * self.g * self.n * self.dg].view(self.b, Cb, self.g, self.n, self.dg)


def _wview(x: torch.Tensor, s0: int, Lv: int, cl: bool) -> torch.Tensor:
    """Block [s0, s0 + Lv) of a (b, d, l) tensor in the work layout (a view)."""
    v = x[:, :, s0 : s0 + Lv]
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
    BT[:, :Lv].copy_(B[:, :, :, s0 : s0 + Lv].permute(0, 3, 1, 2))
    CT[:, :Lv].copy_(C[:, :, :, s0 : s0 + Lv].permute(0, 3, 1, 2))
    if Lp > Lv:  # padding: delta = 0 and delta * u = 0 give a = 1, x = 0: the state passes through unchanged
        for X in (dT, duT, BT, CT):
            X[:, Lv:].zero_()
    return dT, duT, BT, CT, d_w, u_w


class PackedRows:
    """Packed rows (``cu_seqlens``, batch 1) in the blocked scan: the sequences' starts and ends, block by block,
    and the per-sequence initial states in the internal layout (N, g, n, dg) (None: every sequence from zeros).

    The recurrence ``h_t = a_t h_{t-1} + x_t`` restarts at a start ``s`` of sequence ``i`` by taking
    ``a_s' = 0`` and ``x_s' = x_s + a_s h0_i``: the chunked machinery is unchanged, with the decays masked at
    the starts (a chunk holding a start has total decay 0) and the injections ``J_s = a_s h0_i`` added at the
    starts in both passes (sparse: at step t of the per-position loops, into the chunks that start a sequence
    at t)."""

    def __init__(self, cu_seqlens: torch.Tensor, h0, g: int, cdt, device):
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        self.N = cu.numel() - 1
        self.starts = cu[:-1]
        self.ends = cu[1:] - 1
        self.h0 = None if h0 is None else _state_to_internal(h0.detach().to(device, cdt), g)
        self.cdt, self.device = cdt, device

    def block(self, s0: int, Lv: int, T: int, Cb: int) -> PackedBlock:
        return PackedBlock(self, s0, Lv, T, Cb)


class PackedBlock:
    """One block's share of ``PackedRows``: st_idx / st_seq (positions in the block, sequence numbers) of the
    starts, en_idx / en_seq of the last positions; keep6 / chunk_keep, the 0/1 masks of the decays (None when no
    sequence starts in the block); st_by_t / en_by_t: step t -> (chunks, rows of st_idx / en_idx) of the starts /
    ends at step t of a chunk. After ``_forward_block``: a_st, the unmasked decays at the starts (k, g, n, dg),
    and Jv, the injections a_s h0_i there (None without initial states)."""

    def __init__(self, rows: PackedRows, s0: int, Lv: int, T: int, Cb: int):
        dev = rows.device
        self.device, self.T = dev, T
        sel = (rows.starts >= s0) & (rows.starts < s0 + Lv)
        st = rows.starts[sel] - s0
        self.st_idx, self.st_seq = st.to(dev), sel.nonzero().flatten().to(dev)
        sel_e = (rows.ends >= s0) & (rows.ends < s0 + Lv)
        en = rows.ends[sel_e] - s0
        self.en_idx, self.en_seq = en.to(dev), sel_e.nonzero().flatten().to(dev)
        self.st_cpu, self.en_cpu = st, en
        self.h0 = rows.h0
        self.keep6 = self.chunk_keep = None
        if st.numel():
            keep = torch.ones(Cb * T, dtype=rows.cdt)
            keep[st] = 0
            self.keep6 = keep.view(1, Cb, T, 1, 1, 1).to(dev)
            self.chunk_keep = keep.view(Cb, T).amin(1).view(1, Cb, 1, 1, 1).to(dev)
        self.a_st = None
        self.Jv = None

    def by_t(self, pos: torch.Tensor, first_chunk: int = 0, last_chunk: int | None = None) -> dict:
        """step t -> (chunk indices - first_chunk, rows of ``pos``) for the positions ``pos`` (CPU) whose chunk is
        in [first_chunk, last_chunk); a loop over the (at most T) steps, not over sequences."""
        c, t = pos // self.T, pos % self.T
        ok = c >= first_chunk
        if last_chunk is not None:
            ok &= c < last_chunk
        out = {}
        for tt in t[ok].unique().tolist():
            m = ok & (t == tt)
            out[tt] = ((c[m] - first_chunk).to(self.device), m.nonzero().flatten().to(self.device))
        return out

    def at(self, X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (positions in the block) of a (1, Cb, T, g, n, dg) buffer: (k, g, n, dg)."""
        return X.reshape(X.shape[1] * X.shape[2], *X.shape[3:]).index_select(0, idx)


def _inject(dst: torch.Tensor, where: dict, t: int, values: torch.Tensor) -> None:
    """dst (1, C, g, n, dg) += values[rows] at the chunks that ``where`` (a ``PackedBlock.by_t`` map) lists for
    step t."""
    hit = where.get(t)
    if hit is not None:
        chunks, rows = hit
        dst.index_add_(1, chunks, values.index_select(0, rows).unsqueeze(0))


def _forward_block(ws, A2, carry, dT, duT, BT, Cb, H=None, pack=None):
    """Steps 1-4 of the module docstring on one block.

    ``carry`` (b, g, n, dg) holds the state before the block and is updated in place to the state after it.
    Returns (a, H, P, Hs): the decays a (b, Cb, T, g, n, dg), the states H (written over ``a`` unless a
    separate buffer is given), the chunk decays P and the chunk start states Hs (b, Cb, g, n, dg).
    ``pack`` (a ``PackedBlock``, packed rows): the decays are masked at the sequence starts (so ``a`` comes back
    masked) and the initial-state injections added (see ``PackedRows``)."""
    b, g, n, dg, T = ws.b, ws.g, ws.n, ws.dg, ws.T
    a = ws.big6(0, Cb)
    torch.mul(dT.view(b, Cb, T, g, 1, dg), A2, out=a)
    a.exp2_()
    Jv = None
    if pack is not None and pack.keep6 is not None:
        pack.a_st = pack.at(a, pack.st_idx)  # the decays at the starts, before masking
        a.mul_(pack.keep6)
        if pack.h0 is not None:
            Jv = pack.Jv = pack.a_st * pack.h0.index_select(0, pack.st_seq)
    du6 = duT.view(b, Cb, T, g, 1, dg)
    B6 = BT.view(b, Cb, T, g, n, 1)
    Cp = Cb - 1  # the last chunk's end state comes out of pass 2
    if Cp:
        # pass 1: local chunk-end states from a zero start
        at = a[:, :Cp].unbind(2)
        dut = du6[:, :Cp].unbind(2)
        Bt = B6[:, :Cp].unbind(2)
        J1 = pack.by_t(pack.st_cpu, 0, Cp) if Jv is not None else None
        s = ws.chunkv(0, Cb)[:, :Cp]
        torch.mul(dut[0], Bt[0], out=s)
        if J1:
            _inject(s, J1, 0, Jv)
        for t in range(1, T):
            s.mul_(at[t]).addcmul_(dut[t], Bt[t])
            if J1:
                _inject(s, J1, t, Jv)
    # chunk decays exp(A * sum(delta)) and the true chunk start states
    P = ws.chunkv(1, Cb)
    torch.mul(dT.view(b, Cb, T, g, 1, dg).sum(2), A2, out=P)
    P.exp2_()
    if pack is not None and pack.chunk_keep is not None:
        P.mul_(pack.chunk_keep)
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
    J2 = pack.by_t(pack.st_cpu) if Jv is not None else None
    prev = Hs
    for t in range(T):
        torch.mul(at[t], prev, out=Ht[t]).addcmul_(dut[t], Bt[t])
        if J2:
            _inject(Ht[t], J2, t, Jv)
        prev = Ht[t]
    carry.copy_(H[:, Cb - 1, T - 1])
    return a, H, P, Hs


def _contract_c(ws, H, CT, Lp, out_ld):
    """y (b, Lp, d) = sum_n C * h as one batched (1 x n) @ (n x dg) matmul."""
    M = ws.b * Lp * ws.g
    torch.bmm(CT.view(M, 1, ws.n), H.view(M, ws.n, ws.dg), out=out_ld.view(M, 1, ws.dg))
    return out_ld
