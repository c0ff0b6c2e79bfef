"""Mamba-2 SSD scan, chunked ("state space duality") form in plain PyTorch: the fast CPU path.

The sequence is cut into chunks of ``chunk_size`` steps. Inside a chunk the scan is a masked quadratic form
(an attention-like (q, q) matrix per head: C_i . B_j times the decay from j to i), across chunks a small
recurrence carries one (h, p, n) state per chunk boundary:

1. intra-chunk:   y_i  += sum_{j <= i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j        (per head, (q, q) @ (q, p))
2. chunk states:  S_c   = sum_j exp(cs_end - cs_j) dt_j x_j B_j^T                  (per group, (hg p, q) @ (q, n))
3. state passing: S_in[c + 1] = exp(cs_end[c]) S_in[c] + S_c                          (a loop over chunks)
4. state output:  y_i  += exp(cs_i) C_i . S_in                                        (per group, (q, n) @ (n, hg p))

where cs is the running sum of dt * A inside the chunk. Heads of one group share B and C, so steps 2 and 4 are
one GEMM per (chunk, group) with the heads folded into the GEMM's large side.

Numerics. The running sums are taken in float64 (they are only (b, l, h) numbers), so every per-step decay
(exp(cs_i), exp(cs_end - cs_j), exp(cs_end)) is the exp of an accurate segment sum, non-positive when A <= 0;
nothing is ever written as exp(cumsum) * exp(-cumsum). The (q, q) matrix needs its segment sums cs_i - cs_j
accurate relative to the segment itself, not to |cs| (which reaches hundreds under strong decay):
- no_grad driver: each running sum is split as cs = hi + lo with hi = float32(cs); hi_i - hi_j is rounded once,
  relative to the segment, and the residue enters as factors exp(lo_i) on the rows and exp(-lo_j) on the
  columns, folded into ops that run anyway (no extra pass over the (q, q) matrix);
- autograd driver: the differences are taken in float64 and rounded once, so that the backward pass also sums
  their gradients (row sums minus column sums, which cancel in total) in float64: dA and ddt stay accurate.
The (q, q) matrix is computed in base 2, as 2^(log2(e) * segment): exp2 runs several times faster than exp here.

Decay factors below exp(-60) (float32; exp(-600) in float64) are treated as negligible: per-step factors become
exactly 0 and the (q, q) segment sums are clamped to -60 before the exp (a perturbation of ~1e-26 relative).
Without that, strong decays produce denormals and underflows, which x86 handles tens of times slower, and
exp(-inf) is several times slower than exp of a normal number. Entries above the diagonal are clamped to the
same floor and then zeroed through the lower-triangular C.B matrix, so no inf * 0 can appear (A > 0 included).

Packed rows (``cu_seqlens``, batch 1, several sequences end to end; kernels/_varlen.py). The scan runs over the
whole row from a zero state with a constant _JUMP (1024) subtracted from the log decay dt * A at every sequence
start. Every decay that reaches across a start (the (q, q) segment sums, the chunk-state weights
exp(cs_end - cs_j), the chunk decay exp(cs_end) of the state passing, the state-output factor exp(cs_i)) then
holds exp(-1024 + ...) = 0 (float32 and float64; floored to exactly 0 or to exp(-60) like any other negligible
decay), so nothing crosses a boundary, and since the jump is a constant the gradients (through dt, A) are those
of each sequence alone: this is mamba_ssm's seq_idx masking (cross-sequence pairs get segment sum -inf, a chunk
does not receive the previous chunk's state across a start), folded into the running sums, so that neither the
drivers here nor the Triton kernels need a mask of their own. Per sequence (no loop over sequences: batched
over them, segments of at most one chunk padded to the longest; ``_scan_chunked_packed``): its initial state
h0_i adds E_t C_t . h0_i on the steps of its first chunk and joins the state leaving that chunk (the state
passing carries it on); its final state is the state entering its last chunk, decayed, plus that chunk's own
steps. Precision: the running sums grow by 1024 per start inside a chunk (about 1e-12 relative in float64 with
64 starts in one chunk; float32 keeps hi + lo as before).

Two drivers share this math. With autograd recording, plain differentiable ops (memory grows with l, like any
autograd graph). Under no_grad, chunks are processed in blocks of a bounded number of elements with in-place
ops in scratch buffers, so the working memory stays constant in l beyond the inputs and the output; the scratch
buffers (tens of MiB) are kept per thread between calls, as fresh large allocations are slow here.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from einops import rearrange

from .._states_at import check_positions, scan_in_pieces
from .._validate import records_grad
from .ref import check_packed_args, check_scan_args, check_step_args, d_as_hp, prepare_dt

__all__ = ["ssd_scan_chunked", "ssd_state_update_chunked"]

# Upper bound on b * h * q * (block length) for one block: the (q, q) decay matrices of a block, 8 MiB in
# float32. Big enough that the GEMMs are efficient, small enough to stay in cache-friendly, reusable buffers.
_BLOCK_ELEMS = 1 << 21


def _blocks(l: int, q: int, b: int, h: int):
    """Spans (start, chunks, chunk_len): blocks of full chunks, then the tail (l % q steps) as one short chunk."""
    per_block = max(1, _BLOCK_ELEMS // max(1, b * h * q * q))
    full = l // q
    start = 0
    while full > 0:
        c = min(per_block, full)
        yield start, c, q
        start += c * q
        full -= c
    if start < l:
        yield start, 1, l - start


# log of the smallest decay factor that is not treated as zero (see the module docstring)
_LOG_FLOOR = {torch.float32: -60.0, torch.float64: -600.0}
_LOG2E = 1.0 / math.log(2.0)


def _segment_bounds(q: int, cd: torch.dtype, device):
    """Clamp bounds for the (q, q) segment sums (base 2) and the 0/1 lower-triangular mask.

    clamp(seg, lower, upper) keeps seg (floored) on and below the diagonal and sets the floor above it.
    """
    floor = _LOG_FLOOR[cd] * _LOG2E
    lower = torch.full((q, q), floor, dtype=cd, device=device)
    above = torch.ones((q, q), dtype=torch.bool, device=device).triu_(1)
    upper = torch.full((q, q), float("inf"), dtype=cd, device=device).masked_fill_(above, floor)
    tril = (~above).to(cd)
    return lower, upper, tril


def _decay_factor(seg: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """exp(seg) (seg in float64) cast to cd, exactly 0 below the floor."""
    return torch.where(seg >= _LOG_FLOOR[cd], seg.exp(), 0.0).to(cd)


def _decays(dtq: torch.Tensor, A: torch.Tensor, cd: torch.dtype, split: bool, jq=None):
    """Per-step decay factors of each chunk from dtq (b, c, h, q).

    Returns hi (b, c, h, q): running sums of dt * A in base 2 (times log2(e): exp2 is several times faster than
    exp on CPU), in float64 unless ``split``, then rounded to the compute dtype with the residue returned as
    e_lo / e_lo_neg = 2^(+-(cs2 - hi)) (None otherwise); pre = exp(cs_i) (decay from the chunk start through
    step i), post = exp(cs_end - cs_j) (decay after step j to the chunk end) and chunk = exp(cs_end) (b, c, h).
    ``jq`` (1, c, 1, q) float64 (packed rows): _JUMP at every sequence start, subtracted from the log decay (see
    the module docstring).
    """
    a = dtq.to(torch.float64) * A.to(torch.float64)[:, None]
    if jq is not None:
        a = a - jq
    cs = a.contiguous().cumsum(-1)
    cs2 = cs * _LOG2E
    if cd == torch.float64 or not split:
        hi, e_lo, e_lo_neg = cs2, None, None
    else:
        hi = cs2.to(cd)
        # The rounding residue is piecewise constant in cs: no gradient flows through it (hi carries it all).
        lo = (cs2 - hi.to(torch.float64)).detach()
        e_lo, e_lo_neg = lo.exp2().to(cd), (-lo).exp2().to(cd)
    total = cs[..., -1:]
    pre = _decay_factor(cs, cd)
    post = _decay_factor(total - cs, cd)
    chunk = _decay_factor(total.squeeze(-1), cd)
    return hi, e_lo, e_lo_neg, pre, post, chunk


def _grouped(t: torch.Tensor, g: int, pattern: str) -> torch.Tensor:
    return rearrange(t, pattern, g=g)


# --------------------------------------------------------------------------------------------------------------
# autograd driver: differentiable ops only


def _block_autograd(xq, dtq, A, Bq, Cq, state, bounds, Dhp, zq, cd, g, jq=None, inj=None):
    """One block of c chunks of q steps. xq/zq (b, c, q, h, p), dtq (b, c, h, q), Bq/Cq (b, c, q, g, n),
    state (b, h, p, n); packed rows: ``jq`` the log-decay jumps, ``inj`` {chunk: state} added to the state
    leaving those chunks. Returns y (b, c, q, h, p), the state after the block and the states entering its chunks."""
    b, c, q, h, p = xq.shape
    hi, _, _, pre, post, chunk = _decays(dtq, A, cd, split=False, jq=jq)
    Cg = rearrange(Cq, "b c q g n -> b c g q n")
    Bg = rearrange(Bq, "b c q g n -> b c g q n")

    # 1. intra-chunk quadratic term. The segment sums are differences of float64 running sums, rounded once: the
    #    backward pass then sums their gradients (row sums minus column sums, whose total cancels exactly) in
    #    float64 too, which keeps dA and ddt accurate under strong decay.
    lower, upper, tril = bounds
    seg = (hi[..., :, None] - hi[..., None, :]).to(cd)
    L = torch.clamp(seg, lower, upper).exp2()  # (b, c, h, q, q)
    CB = (Cg @ Bg.transpose(-1, -2)) * tril  # (b, c, g, q, q)
    M = _grouped(L, g, "b c (g hh) i j -> b c g hh i j") * CB[:, :, :, None]
    xd = _grouped(xq, g, "b c q (g hh) p -> b c g hh q p") * _grouped(dtq, g, "b c (g hh) q -> b c g hh q 1")
    y_diag = M @ xd  # (b, c, g, hh, q, p)

    # 2. per-chunk states
    xs = _grouped(xq, g, "b c q (g hh) p -> b c g q hh p") * _grouped(dtq * post, g, "b c (g hh) q -> b c g q hh 1")
    S_local = rearrange(xs, "b c g q hh p -> b c g (hh p) q") @ Bg  # (b, c, g, hh p, n)
    S_local = rearrange(S_local, "b c g (hh p) n -> b c (g hh) p n", p=p)

    # 3. state passing across the chunks of the block
    entering = []
    s = state
    for k in range(c):
        entering.append(s)
        s = s * chunk[:, k, :, None, None] + S_local[:, k]
        if inj is not None and k in inj:
            s = s + inj[k]
    S_in = torch.stack(entering, dim=1)  # (b, c, h, p, n)

    # 4. state-to-output term
    y_off = Cg @ _grouped(S_in, g, "b c (g hh) p n -> b c g n (hh p)")  # (b, c, g, q, hh p)
    y_off = rearrange(y_off, "b c g q (hh p) -> b c q (g hh) p", p=p) * rearrange(pre, "b c h q -> b c q h 1")
    y = y_off + rearrange(y_diag, "b c g hh q p -> b c q (g hh) p")
    if Dhp is not None:
        y = y + xq * Dhp
    if zq is not None:
        y = y * F.silu(zq)
    return y, s, S_in


# --------------------------------------------------------------------------------------------------------------
# no_grad driver: same math, in place, one bounded block at a time


class _Workspace:
    """Flat scratch buffers that every block reuses: a fresh multi-MiB tensor costs a page fault per 4 KiB on
    first touch, comparable to the arithmetic done on it (at l = 2048 that was 40% of the call)."""

    def __init__(self, dtype: torch.dtype, device):
        self.dtype, self.device = dtype, device
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        flat = self._flat.get(name)
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._flat[name] = flat
        return flat[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._flat.values())


# One workspace per thread, dtype and device is kept between calls when it is small (it is bounded by
# _BLOCK_ELEMS, not by l: about 30 MiB at h=16, p=32, n=64, q=64 in float32).
_WORKSPACE_KEEP_BYTES = 96 << 20
_workspaces = threading.local()


def _workspace(dtype: torch.dtype, device) -> _Workspace:
    cache = getattr(_workspaces, "cache", None)
    if cache is None:
        cache = _workspaces.cache = {}
    key = (dtype, str(device))
    if key not in cache:
        cache[key] = _Workspace(dtype, device)
    return cache[key]


def _release_if_large(ws: _Workspace) -> None:
    if ws.nbytes() > _WORKSPACE_KEEP_BYTES:
        _workspaces.cache.pop((ws.dtype, str(ws.device)), None)


def _block_lean(xq, dtq, A, Bq, Cq, state, bounds, Dhp, zq, cd, g, out, ws, jq=None, inj=None, keep=None):
    """As _block_autograd, but in place in the workspace ``ws``; writes y into ``out`` (a (b, c, q, g, hh, p)
    view of the output, any dtype) and returns the state after the block. Packed rows: ``jq``, ``inj`` as in
    _block_autograd; ``keep`` (block-local chunk indices): also returns copies of the states entering them."""
    b, c, q, h, p = xq.shape
    n = Bq.shape[-1]
    hg = h // g
    hi, e_lo, e_lo_neg, pre, post, chunk = _decays(dtq, A, cd, split=True, jq=jq)
    Cg = rearrange(Cq, "b c q g n -> b c g q n")
    Bg = rearrange(Bq, "b c q g n -> b c g q n")

    # 1. intra-chunk quadratic term; M is laid out (b, c, h, q, q) and x (b, c, h, q, p) so that the batched
    #    matmul runs over contiguous (b c h) without copies.
    M = ws.get("M", (b, c, h, q, q))
    torch.sub(hi[..., :, None], hi[..., None, :], out=M)
    lower, upper, tril = bounds
    M.clamp_(lower, upper).exp2_()
    CB = torch.matmul(Cg, Bg.transpose(-1, -2), out=ws.get("CB", (b, c, g, q, q))).mul_(tril)
    M.view(b, c, g, hg, q, q).mul_(CB[:, :, :, None])
    coef = dtq if e_lo_neg is None else dtq * e_lo_neg
    xd = torch.mul(rearrange(xq, "b c q h p -> b c h q p"), coef[..., None], out=ws.get("X", (b, c, h, q, p)))
    y_diag = torch.matmul(M, xd, out=ws.get("Y", (b, c, h, q, p)))

    # 2. per-chunk states: heads of a group folded into one (hg p, q) @ (q, n) GEMM per chunk
    xs = torch.mul(
        _grouped(xq, g, "b c q (g hh) p -> b c g q hh p"),
        _grouped(dtq * post, g, "b c (g hh) q -> b c g q hh 1"),
        out=ws.get("X", (b, c, g, q, hg, p)),
    )
    S_local = torch.matmul(
        xs.view(b, c, g, q, hg * p).transpose(-1, -2), Bg, out=ws.get("S", (b, c, g, hg * p, n))
    ).view(b, c, h, p, n)

    # 3. state passing: S_in[:, k] is the state entering chunk k
    S_in = ws.get("S_in", (b, c, h, p, n))
    S_in[:, 0].copy_(state)
    for k in range(1, c):
        torch.addcmul(S_local[:, k - 1], S_in[:, k - 1], chunk[:, k - 1, :, None, None], out=S_in[:, k])
        if inj is not None and k - 1 in inj:
            S_in[:, k].add_(inj[k - 1])
    s_out = torch.addcmul(S_local[:, c - 1], S_in[:, c - 1], chunk[:, c - 1, :, None, None])
    if inj is not None and c - 1 in inj:
        s_out.add_(inj[c - 1])
    kept = None if keep is None else S_in[:, keep].clone()

    # 4. state-to-output term, then the rest of y accumulated on top of it
    direct = g == 1 and out.dtype == cd and out.is_contiguous()  # then acc's layout is out's: no final copy
    acc = out.view(b, c, g, q, hg * p) if direct else ws.get("acc", (b, c, g, q, hg * p))
    torch.matmul(Cg, S_in.view(b, c, g, hg * p, n).transpose(-1, -2), out=acc)
    acc = acc.view(b, c, g, q, hg, p)
    acc.mul_(_grouped(pre, g, "b c (g hh) q -> b c g q hh 1"))
    y_diag = _grouped(y_diag, g, "b c (g hh) q p -> b c g q hh p")
    if e_lo is None:
        acc.add_(y_diag)
    else:
        acc.addcmul_(y_diag, _grouped(e_lo, g, "b c (g hh) q -> b c g q hh 1"))
    if Dhp is not None:
        acc.addcmul_(_grouped(xq, g, "b c q (g hh) p -> b c g q hh p"), _grouped(Dhp, g, "(g hh) p -> g 1 hh p"))
    if zq is not None:
        zg = _grouped(zq, g, "b c q (g hh) p -> b c g q hh p")
        gate = torch.sigmoid(zg, out=ws.get("X", (b, c, g, q, hg, p))).mul_(zg)  # silu(z)
        acc.mul_(gate)
    if not direct:
        out.copy_(rearrange(acc, "b c g q hh p -> b c q g hh p"))
    return s_out if keep is None else (s_out, kept)


# --------------------------------------------------------------------------------------------------------------


def _block_packing(start, c, Q, inject, capture):
    """The packed-row extras of the block of chunks [start // Q, start // Q + c): the injections as {block-local
    chunk: (h, p, n) state} (None when none falls in it; at most one per chunk, that of the sequence that goes on
    past it) and the block-local indices of the captured chunks (None if none)."""
    c0 = start // Q
    inj = keep = None
    if inject is not None:
        idx, vals = inject
        hit = (idx >= c0) & (idx < c0 + c)
        if bool(hit.any()):
            inj = dict(zip((idx[hit] - c0).tolist(), vals[hit].unbind(0)))
    if capture is not None:
        hit = (capture >= c0) & (capture < c0 + c)
        if bool(hit.any()):
            keep = capture[hit] - c0
    return inj, keep


def _scan_autograd(x, dt_args, A, B, C, z, Dhp, state, spans, bounds, cd, g, jumps=None, inject=None, capture=None):
    """Differentiable driver: autograd keeps every block's intermediates (some 20-30 KiB per step at h=16, p=32,
    n=64, q=64). The inputs are cut with split, whose backward is one cat, not with per-block slicing, whose
    backward would build a full-length zero gradient per block.

    Packed rows (b = 1): ``jumps`` (l,) the log-decay jumps; ``inject`` (chunk index (K,), states (K, h, p, n)):
    added to the state leaving those chunks; ``capture`` (sorted chunk indices (U,)): the states entering those
    chunks are returned as a third item (U, h, p, n)."""
    b, l, h, p = x.shape
    if not spans:
        return x.new_zeros((b, 0, h, p)), state
    sizes = [c * q for _, c, q in spans]
    xs = x.to(cd).split(sizes, dim=1)
    dts = prepare_dt(*dt_args, cd).split(sizes, dim=1)
    Bs = B.to(cd).split(sizes, dim=1)
    Cs = C.to(cd).split(sizes, dim=1)
    zs = z.to(cd).split(sizes, dim=1) if z is not None else [None] * len(spans)
    js = jumps.split(sizes) if jumps is not None else [None] * len(spans)
    pieces, kept = [], []
    s = state
    Q = spans[0][2]
    for i, (start, c, q) in enumerate(spans):
        inj, keep = _block_packing(start, c, Q, inject, capture)
        args = (
            rearrange(xs[i], "b (c q) h p -> b c q h p", q=q),
            rearrange(dts[i], "b (c q) h -> b c h q", q=q),
            A,
            rearrange(Bs[i], "b (c q) g n -> b c q g n", q=q),
            rearrange(Cs[i], "b (c q) g n -> b c q g n", q=q),
            s,
            bounds[q],
            Dhp,
            None if zs[i] is None else rearrange(zs[i], "b (c q) h p -> b c q h p", q=q),
            cd,
            g,
            None if js[i] is None else js[i].view(1, -1, 1, q),
            inj,
        )
        yq, s, S_in = _block_autograd(*args)
        pieces.append(rearrange(yq, "b c q h p -> b (c q) h p"))
        if keep is not None:
            kept.append(S_in[0, keep])
    y = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    if capture is not None:
        return y.to(x.dtype), s, torch.cat(kept, dim=0)
    return y.to(x.dtype), s


def _scan_lean(x, dt_args, A, B, C, z, Dhp, state, spans, bounds, cd, g, jumps=None, inject=None, capture=None):
    """no_grad driver: block by block in a reused workspace, y written into its final tensor; nothing but the
    output is allocated in proportion to l. Packed rows: as ``_scan_autograd``."""
    dt, dt_bias, dt_softplus = dt_args
    b, l, h, p = x.shape
    ws = _workspace(cd, x.device)
    y = torch.empty((b, l, h, p), dtype=x.dtype, device=x.device)
    s = state
    kept = []
    for start, c, q in spans:
        inj, keep = _block_packing(start, c, spans[0][2], inject, capture)
        span = slice(start, start + c * q)
        xq = rearrange(x[:, span].to(cd), "b (c q) h p -> b c q h p", q=q)
        dtq = rearrange(prepare_dt(dt[:, span], dt_bias, dt_softplus, cd), "b (c q) h -> b c h q", q=q)
        Bq = rearrange(B[:, span].to(cd), "b (c q) g n -> b c q g n", q=q)
        Cq = rearrange(C[:, span].to(cd), "b (c q) g n -> b c q g n", q=q)
        zq = None if z is None else rearrange(z[:, span].to(cd), "b (c q) h p -> b c q h p", q=q)
        out = rearrange(y[:, span], "b (c q) (g hh) p -> b c q g hh p", q=q, g=g)
        jq = None if jumps is None else jumps[span].view(1, -1, 1, q)
        s = _block_lean(xq, dtq, A, Bq, Cq, s, bounds[q], Dhp, zq, cd, g, out, ws, jq, inj, keep)
        if keep is not None:
            s, states = s
            kept.append(states[0])
    _release_if_large(ws)
    if capture is not None:
        return y, s, torch.cat(kept, dim=0) if kept else state.new_zeros((0, *state.shape[1:]))
    return y, s


def ssd_scan_chunked(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
    states_at=None,
    cu_seqlens=None,
):
    """Chunked SSD scan; same signature and results as ``ssd_scan_ref`` (mamba_chunk_scan_combined semantics).

    ``chunk_size`` only changes how the work is blocked (64 or 128 is right for CPU), never the result.
    ``states_at`` (strictly increasing positions in 1..l): also return the states after those positions,
    (b, k, h, p, n), as the last item: (y, final_state, states) or (y, states); see ``_states_at_direct``.
    ``cu_seqlens`` (packed rows, batch 1; initial and final states (N, h, p, n)): see ``_packed``.
    """
    if cu_seqlens is not None:
        args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, states_at, cu_seqlens)
        return _scan_chunked_packed(*args, dt_softplus, return_final_state)
    if states_at is not None:
        positions = check_positions(states_at, x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else 0)
        y, final = ssd_scan_chunked(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, return_final_state=True
        )
        if len(positions) * x.shape[1] <= _DIRECT_STATES_MAX:
            states = _states_at_direct(x, dt, A, B, dt_bias, dt_softplus, initial_state, positions, final)
        else:  # long calls with many positions: split and thread (kernels/_states_at.py)
            fixed = dict(A=A, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)
            sequences = dict(x=x, dt=dt, B=B, C=C, z=z)
            run = lambda **kw: ssd_scan_chunked(**kw, **fixed)  # noqa: E731
            y, final, states = scan_in_pieces(run, sequences, 1, x.shape[1], initial_state, positions, True)
        return (y, final, states) if return_final_state else (y, states)
    dims = check_scan_args(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    b, l, h, p, g, n, cd = dims.b, dims.l, dims.h, dims.p, dims.g, dims.n, dims.compute_dtype
    chunk_size = int(chunk_size)
    Ac = A.to(cd)
    Dhp = d_as_hp(D, cd)
    if initial_state is None:
        state = torch.zeros((b, h, p, n), dtype=cd, device=x.device)
    else:
        state = initial_state.to(cd)
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    recording = records_grad(*inputs)

    spans = list(_blocks(l, chunk_size, b, h))
    bounds = {q: _segment_bounds(q, cd, x.device) for q in {q for _, _, q in spans}}
    dt_args = (dt, dt_bias, dt_softplus)
    run = _scan_autograd if recording else _scan_lean
    y, s = run(x, dt_args, Ac, B, C, z, Dhp, state, spans, bounds, cd, g)
    if s is initial_state:
        s = s.clone()  # l == 0: never hand back the caller's own tensor
    return (y, s) if return_final_state else y


# --------------------------------------------------------------------------------------------------------------
# packed rows (cu_seqlens)

#: subtracted from the log decay at every sequence start: exp(-_JUMP + anything real) is exactly 0 in float32 and
#: float64 and below every floor of _LOG_FLOOR; small, so that the in-chunk running sums stay accurate
_JUMP = 1024.0


def packed_jumps(cu: torch.Tensor, l: int, dtype=torch.float64) -> torch.Tensor:
    """(l,) tensor: _JUMP at every sequence start but the first, 0 elsewhere."""
    jumps = torch.zeros(l, dtype=dtype, device=cu.device)
    jumps[cu[1:-1]] = _JUMP
    return jumps


def _gather_segments(lo: torch.Tensor, hi: torch.Tensor, l: int):
    """Per sequence i the steps lo_i <= t < hi_i (at most one chunk), padded: indices (N, L) clamped into the
    row and the (N, L) mask of the real ones (L = the longest segment)."""
    width = int((hi - lo).max())
    idx = lo[:, None] + torch.arange(width, device=lo.device)
    return idx.clamp(max=l - 1), idx < hi[:, None]


def _scan_chunked_packed(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, states_at, cu_seqlens, sp, final):
    """Packed rows natively (see the module docstring): the scan over the whole row from a zero state with the
    sequence starts as -_JUMP steps of the log decay, and per sequence i (start t0, end e, first chunk c0, last
    chunk ce; decays from the row's float64 running sum of dt * A):

    - initial state h0_i: its term E_t C_t . h0_i on the steps of its first chunk (E_t = the decay from t0
      through t), and E h0_i joins the state leaving chunk c0 (the state passing carries it on) when the
      sequence goes on past c0;
    - final state: the state entering chunk ce decayed to e (when the sequence started before ce) plus the sum
      over its steps in ce (plus E_e h0_i when it never left c0).

    The per-sequence terms are batched GEMMs over segments of at most one chunk, padded to the longest; the
    entering states come out of the drivers (``capture``)."""
    dims, cu, N = check_packed_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, states_at, cu_seqlens)
    b, l, h, p, g, n, cd = dims.b, dims.l, dims.h, dims.p, dims.g, dims.n, dims.compute_dtype
    Q = int(chunk_size)
    Dhp = d_as_hp(D, cd)
    state = torch.zeros((b, h, p, n), dtype=cd, device=x.device)
    gate_after = z is not None and initial_state is not None  # the initial-state term enters before the gate
    recording = records_grad(x, dt, A, B, C, D, z, dt_bias, initial_state)
    spans = list(_blocks(l, Q, b, h))
    bounds = {q: _segment_bounds(q, cd, x.device) for q in {q for _, _, q in spans}}
    run = _scan_autograd if recording else _scan_lean

    t0, end = cu[:-1], cu[1:]
    c0, ce = t0 // Q, (end - 1) // Q
    goes_on = ce > c0
    inject = h0 = cs0 = None
    if initial_state is not None or final:
        dtc = prepare_dt(dt, dt_bias, sp, cd)[0]  # (l, h)
        cs0 = F.pad(torch.cumsum(dtc.to(torch.float64) * A.to(torch.float64), dim=0), (0, 0, 1, 0))  # (l + 1, h)
    if initial_state is not None:
        h0 = initial_state.to(cd)
        send = torch.minimum(end, (c0 + 1) * Q)
        e_x = _decay_factor(cs0[send] - cs0[t0], cd)  # (N, h): from t0 through send - 1
        on = goes_on.nonzero().flatten()
        if on.numel():
            inject = (c0[on], e_x[on, :, None, None] * h0[on])
    capture = torch.unique(ce) if final else None
    out = run(
        x.to(cd) if gate_after else x,
        (dt, dt_bias, sp),
        A.to(cd),
        B,
        C,
        None if gate_after else z,
        Dhp,
        state,
        spans,
        bounds,
        cd,
        g,
        packed_jumps(cu, l),
        inject,
        capture,
    )
    y = out[0]
    if initial_state is not None:  # E_t C_t . h0_i on the first-chunk steps, as (N, g, L, n) @ (N, g, n, hg p)
        idx, real = _gather_segments(t0, send, l)
        E = torch.where(real[..., None], _decay_factor(cs0[idx + 1] - cs0[t0][:, None], cd), 0.0)  # (N, L, h)
        Cg = rearrange(C[0].to(cd)[idx], "i t g n -> i g t n")
        y0 = Cg @ rearrange(h0, "i (g hh) p n -> i g n (hh p)", g=g)  # (N, g, L, hh p)
        y0 = rearrange(y0, "i g t (hh p) -> i t (g hh) p", p=p) * E[..., None]
        y = y.to(cd)
        y = y.index_add_(1, idx[real], y0[real][None]) if not recording else y.index_add(1, idx[real], y0[real][None])
        if z is not None:
            y = y * F.silu(z.to(cd))
        y = y.to(x.dtype)
    if not final:
        return y
    # the state entering chunk ce, decayed to e, when the sequence started before ce
    entering = out[2][torch.searchsorted(capture, ce)]  # (N, h, p, n)
    into = torch.where(goes_on[:, None], _decay_factor(cs0[end] - cs0[ce * Q], cd), 0.0)
    s = entering * into[..., None, None]
    # its steps in ce: (N, g, hh p, L) @ (N, g, L, n)
    lo = torch.maximum(t0, ce * Q)
    idx, real = _gather_segments(lo, end, l)
    w = torch.where(real[..., None], _decay_factor(cs0[end][:, None] - cs0[idx + 1], cd), 0.0) * dtc[idx]
    xs = rearrange(x[0].to(cd)[idx] * w[..., None], "i t (g hh) p -> i g (hh p) t", g=g)
    own = xs @ rearrange(B[0].to(cd)[idx], "i t g n -> i g t n")  # (N, g, hh p, n)
    s = s + rearrange(own, "i g (hh p) n -> i (g hh) p n", p=p)
    if initial_state is not None:  # never left its first chunk: h0 straight to the final state
        s = s + torch.where(goes_on[:, None], 0.0, e_x)[..., None, None] * h0
    return y, s


#: largest (positions x length) for which ``_states_at_direct`` forms its (b, k, l, h) decay matrix
_DIRECT_STATES_MAX = 1 << 12


def _states_at_direct(x, dt, A, B, dt_bias, dt_softplus, initial_state, positions, final):
    """The states after ``positions`` directly, without walking the positions one by one:

        S_p = exp(cs_p) S_0 + sum_{j <= p} exp(cs_p - cs_j) dt_j outer(x_j, B_j)

    with cs the running sum of dt * A in float64 (so every decay is the exp of an accurate segment sum,
    non-positive for A <= 0). One (b, k, l, h) decay matrix and one contraction: meant for a verifier's short
    calls (k * l bounded by ``_DIRECT_STATES_MAX``). Differentiable."""
    cd = final.dtype
    b, l, h, _ = x.shape
    dtc = prepare_dt(dt, dt_bias, dt_softplus, cd)  # (b, l, h)
    cs = torch.cumsum(dtc.to(torch.float64) * A.to(torch.float64), dim=1)
    at = torch.tensor([p - 1 for p in positions], dtype=torch.long, device=x.device)
    seg = cs[:, at, None, :] - cs[:, None, :, :]  # (b, k, l, h): cs_p - cs_j
    causal = (torch.arange(l, device=x.device)[None, :] <= at[:, None])[None, :, :, None]
    # the entries past p are zeroed before the exp too, so that neither the value nor its gradient can be inf * 0
    weights = torch.where(causal, torch.exp(torch.where(causal, seg, 0.0)), 0.0).to(cd)
    Bh = B.to(cd).repeat_interleave(h // B.shape[2], dim=2)  # (b, l, h, n)
    drive = dtc[..., None] * x.to(cd)  # (b, l, h, p)
    states = torch.einsum("bklh,blhp,blhn->bkhpn", weights, drive, Bh)
    if initial_state is not None:
        states = states + torch.exp(cs[:, at]).to(cd)[..., None, None] * initial_state.to(cd)[:, None]
    return states


def ssd_state_update_chunked(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step: returns (y (b, h, p), new_state (b, h, p, n)); the state passed in is not modified."""
    dims = check_step_args(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias)
    b, h, p, g, cd = dims.b, dims.h, dims.p, dims.g, dims.compute_dtype
    xc = x.to(cd)
    dtc = prepare_dt(dt, dt_bias, dt_softplus, cd)
    decay = torch.exp(dtc * A.to(cd))  # (b, h)
    xdt = rearrange(xc * dtc[..., None], "b (g hh) p -> b g (hh p) 1", g=g)
    scaled = rearrange(state.to(cd), "b (g hh) p n -> b g (hh p) n", g=g) * rearrange(
        decay[..., None].expand(b, h, p), "b (g hh) p -> b g (hh p) 1", g=g
    )
    new_state = torch.addcmul(scaled, xdt, B.to(cd)[:, :, None, :])  # (b, g, hh p, n)
    y = torch.matmul(new_state, C.to(cd)[..., None])  # (b, g, hh p, 1)
    y = rearrange(y, "b g (hh p) 1 -> b (g hh) p", p=p)
    Dhp = d_as_hp(D, cd)
    if Dhp is not None:
        y = y + xc * Dhp
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype), rearrange(new_state, "b g (hh p) n -> b (g hh) p n", p=p)
