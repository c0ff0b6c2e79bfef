"""Mixture-of-experts feed-forward (MoE-Mamba's "moe" layer): a softmax router, top-k experts per token, each
expert a SiLU-gated MLP, Switch-style capacity while training, no capacity (drop-free) at evaluation.

Dispatch has no loop over tokens: the (token, choice) pairs are sorted by expert (first choices before second
choices, tokens in order within each: one stable sort), a capacity cut keeps each expert's first ``capacity``
pairs, the kept tokens are gathered into one block of rows per expert (packed, or padded to equal blocks so each
GEMM is one ``bmm``: ``_Layout``), each expert runs its GEMMs on its block, and the results come back to their
tokens with their gate weights (a gather for top-1, ``index_add`` for k > 1). The experts' forward and backward
are one ``autograd.Function`` (``_ExpertMLPs``) whose backward does each expert's weight gradient as one GEMM into
its slice. ``moe_reference`` is the per-token twin the tests hold it to. Timings: ``bench/moe.py`` and
docs/benchmarks.md ("MoE layer (CPU)"). On a GPU this is the same plain PyTorch (no Triton MoE kernel yet).

Written here rather than taken from a library: the MoE libraries of the field (megablocks, tutel, fairscale's
MoE) are CUDA-only, tied to their own transformer layers, or unmaintained, and none keeps this project's
contract (drop-free, token-local routing at evaluation so any chunking of a stream gives the same outputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import MoESettings
from seqlab.errors import ConfigError


@dataclass
class RouterStats:
    """What one MoE layer's last training forward measured (``MoEFeedForward.last_stats``).

    ``balance_loss``, ``z_loss``: the unweighted auxiliary losses (tensors with their graphs). ``fraction``:
    the share of (token, choice) pairs the router sent to each expert, before capacity drops (sums to 1).
    ``dropped``: the share of pairs over an expert's capacity (they pass on the residual path).
    """

    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    fraction: torch.Tensor
    dropped: float


def route(
    h: torch.Tensor, router_weight: torch.Tensor, top_k: int, jitter: float = 0.0, renormalize: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) in fp32, the chosen experts (N, k) and their gate weights (N, k) for tokens h (N, d).

    k = 1: the gate is the chosen expert's probability (Switch); k > 1: the k probabilities renormalised.
    ``renormalize`` (``MoESettings.renormalize``): None is that rule, False keeps the k probabilities as they are
    (Jamba), True renormalises for any k."""
    x = h.float()
    if jitter > 0:
        x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
    with torch.autocast(h.device.type, enabled=False):
        logits = F.linear(x, router_weight.float())
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    gates = top_p / top_p.sum(dim=-1, keepdim=True) if _renormalizes(top_k, renormalize) else top_p
    return logits, top_i, gates


def _renormalizes(top_k: int, renormalize: bool | None) -> bool:
    """Whether the top-k gate weights are divided by their sum (``MoESettings.renormalize``)."""
    return top_k > 1 if renormalize is None else renormalize


def capacity_for(tokens: int, settings: MoESettings) -> int:
    """Each expert's token budget in a training batch of ``tokens`` tokens."""
    return max(1, math.ceil(settings.capacity_factor * tokens * settings.top_k / settings.experts))


#: The padded layout (each GEMM one ``bmm`` over E blocks of the busiest expert's rows, see ``_Layout``) is used
#: when it computes at most this share more rows than there are kept pairs; otherwise one GEMM per expert.
#: On a GPU each GEMM call is a kernel launch, and 0.3 covers a training batch at the default capacity factor
#: 1.25 (the busiest expert holds at most 1.25x the even share) with a few drops; that choice is reasoned, not
#: measured (no GPU timing of this layer yet). On the CPU a call costs little beyond its FLOPs when the machine
#: is not oversubscribed, and the padded bmm was no faster per FLOP than the per-expert GEMMs (bench/moe.py,
#: docs/benchmarks.md), so padding is used there only when it is nearly free.
PAD_SLACK = 0.3
PAD_SLACK_CPU = 0.02


def dispatch(
    h: torch.Tensor,
    experts: torch.Tensor,
    gates: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    capacity: int | None = None,
) -> tuple[torch.Tensor, int]:
    """sum over a token's kept choices of gate * expert(h): h (N, d), experts and gates (N, k), gate_up
    (E, 2f, d), down (E, d, f). Returns the output (N, d) and the number of (token, choice) pairs kept.

    Pairs are served in priority order (every token's first choice, in token order, then every second choice,
    ...), so a capacity cut drops the latest second choices first, as in GShard/Switch."""
    n, k = experts.shape
    n_experts = gate_up.shape[0]
    # Pair p = choice * n + token numbers the pairs in priority order, so a stable sort by expert alone puts
    # them by expert and, within an expert, in priority order.
    flat = experts.reshape(-1) if k == 1 else experts.t().reshape(-1)
    by_expert, order = torch.sort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=n_experts).tolist()  # on the host: a sync on a GPU
    if capacity is not None and max(sizes, default=0) > capacity:
        counts = torch.tensor(sizes, device=h.device)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=h.device) - starts[by_expert]
        order = order[rank < capacity]
        sizes = [min(size, capacity) for size in sizes]
    if not order.numel():
        return h.new_zeros(h.shape), 0
    tokens = order if k == 1 else order % n
    kept_gates = (gates.reshape(-1) if k == 1 else gates.t().reshape(-1))[order]
    layout = _Layout(sizes, tokens, n, k == 1)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (h, gate_up, down, kept_gates))
    out = _ExpertMLPs.apply(h, gate_up, down, kept_gates, layout, backward)
    return out, int(order.numel())


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's, for the tensors autocast casts, else h's."""
    device = h.device.type
    if h.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype


class _Layout:
    """Where the kept (token, choice) pairs sit in the experts' row buffers, and how rows go back to tokens.

    The pairs come sorted by expert, ``sizes[e]`` of them for expert e. Packed: the K pairs in that order, one
    GEMM per expert with rows. Padded (when E x max(sizes) <= (1 + slack) x K, see ``PAD_SLACK``): E blocks of
    max(sizes) rows, expert e's pairs at the top of block e and zero rows below, so each of the six GEMMs of a
    step is one ``torch.bmm`` over all experts; the zero rows cost FLOPs, never correctness (their inputs,
    outputs and gradients are exactly zero). One batched call instead of E matters where a call is dear: on a
    GPU each is a kernel launch, and on a CPU shared with other busy processes each is a rendezvous of a thread
    team whose members wait for cores (an earlier version there, at 2 threads, took 3.6x the dense layer's time
    packed and 1.7x padded at 32 experts). On a CPU the layer has to itself, the per-expert GEMMs are as fast
    per FLOP and padding only wastes (see ``PAD_SLACK``).

    Buffers have ``rows + 1`` rows, the last one zero. With one choice per token (top-1) every token has at
    most one row, so rows go back to tokens by a gather (a dropped token reads the zero row) instead of a
    zero-filled output and a scatter-add; with k > 1 they are summed with ``index_add_``."""

    def __init__(self, sizes: list[int], tokens: torch.Tensor, n: int, one_choice: bool) -> None:
        device = tokens.device
        kept = tokens.numel()
        self.experts = len(sizes)
        self.block = max(sizes)
        slack = PAD_SLACK_CPU if device.type == "cpu" else PAD_SLACK
        self.padded = self.experts > 1 and self.experts * self.block <= (1 + slack) * kept
        self.blocks: list[tuple[int, slice]] = []
        start = 0
        for e, size in enumerate(sizes):
            if size:
                self.blocks.append((e, slice(start, start + size)))
                start += size
        self.rows = self.experts * self.block if self.padded else kept
        self.position: torch.Tensor | None = None  # kept pair -> its row (padded layout only)
        self.padding: torch.Tensor | None = None  # (rows, 1) True on padding rows (padded layout only)
        if self.padded:
            counts = torch.tensor(sizes, device=device)
            expert = torch.repeat_interleave(torch.arange(self.experts, device=device), counts)
            starts = torch.cumsum(counts, 0) - counts
            self.position = expert * self.block + torch.arange(kept, device=device) - starts[expert]
            self.padding = torch.ones(self.rows, 1, dtype=torch.bool, device=device).index_fill_(
                0, self.position, False
            )
        self.row_tokens = self.spread(tokens)  # padding rows -> token 0 (their values are masked to zero)
        self.row_of_token: torch.Tensor | None = None  # top-1: each token's row, or the zero row
        if one_choice:
            rows = self.position if self.position is not None else torch.arange(kept, device=device)
            self.row_of_token = torch.full((n,), self.rows, dtype=torch.long, device=device).index_copy_(
                0, tokens, rows
            )

    def spread(self, pairs: torch.Tensor) -> torch.Tensor:
        """(K, ...) values of the kept pairs -> (rows, ...), zeros in the padding."""
        if self.position is None:
            return pairs
        return pairs.new_zeros(self.rows, *pairs.shape[1:]).index_copy_(0, self.position, pairs)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, ...) -> (K, ...): the kept pairs' rows."""
        return rows if self.position is None else rows.index_select(0, self.position)

    def buffer(self, like: torch.Tensor, width: int) -> torch.Tensor:
        """An uninitialised (rows + 1, width) buffer whose last row is zero."""
        buf = like.new_empty(self.rows + 1, width)
        buf[self.rows].zero_()
        return buf

    def token_rows(self, src: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """buf[:rows] = each row's token's row of src (N, d), zero on padding rows; returns buf[:rows]."""
        out = buf[: self.rows]
        torch.index_select(src, 0, self.row_tokens, out=out)
        if self.padding is not None:
            out.masked_fill_(self.padding, 0)
        return out

    def to_tokens(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """(rows + 1, d) buffer (last row zero) -> (N, d): the sum of each token's rows."""
        if self.row_of_token is not None:
            return buf.index_select(0, self.row_of_token)
        return buf.new_zeros(n, buf.shape[1]).index_add_(0, self.row_tokens, buf[: self.rows])

    def pieces(self) -> list[tuple[int | slice, Callable[[torch.Tensor], torch.Tensor]]]:
        """The GEMM pieces: (which experts' weights, a view of a (rows, ...) buffer on their rows). Packed: one
        piece per expert with rows, 2-D views; padded: one piece, (E, block, ...) views, so ``torch.matmul``
        runs it as a ``bmm``."""
        if self.padded:
            return [(slice(None), _blocks_view(self.experts, self.block))]
        return [(e, _rows_view(rows)) for e, rows in self.blocks]


def _rows_view(rows: slice) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[rows]


def _blocks_view(experts: int, block: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[: experts * block].view(experts, block, *t.shape[1:])


class _ExpertMLPs(torch.autograd.Function):
    """The experts on their rows of kept pairs, gated and summed per token, with a hand-written backward.

    Inputs: h (N, d), gate_up (E, 2f, d), down (E, d, f), the kept pairs' gates (K,) and their ``_Layout``.
    Forward: xs = h[row tokens]; per expert a = xs @ gate_up[e]^T, act = silu(a_gate) * a_up,
    y = gate * (act @ down[e]^T), each expert's rows done start to finish while they are in cache; then each
    token's sum of its rows.

    Autograd through per-expert slices (the first version) made ``gate_up[e]`` and ``down[e]`` views whose
    backward each wrote a zero tensor the size of the whole (E, ...) parameter: O(E^2) memory traffic, 2.5-5.9x
    the dense layer's time at 32 experts. Here each expert's dW is one GEMM written straight into its slice of
    the gradient; only xs and a are kept (y is not: the gate's gradient is <dL/dy', act @ down^T> =
    <(dL/dy') @ down, act>, a row dot; act is recomputed from a)."""

    @staticmethod
    def forward(ctx, h, gate_up, down, gates, layout, backward):
        dtype = _compute_dtype(h)
        d, f = h.shape[1], down.shape[2]
        w1, w2 = gate_up.to(dtype), down.to(dtype)
        hd = h.to(dtype)
        xs = layout.token_rows(hd, layout.buffer(hd, d))
        row_gates = layout.spread(gates.to(dtype)).unsqueeze(-1)
        # a is kept for the backward; without one, each expert's block is a temporary that stays in cache
        a = xs.new_empty(xs.shape[0], 2 * f) if backward else None
        ys = layout.buffer(xs, d)
        for e, view in layout.pieces():
            if a is None:
                a_e = torch.matmul(view(xs), w1[e].mT)
            else:
                a_e = view(a)
                torch.matmul(view(xs), w1[e].mT, out=a_e)
            act = F.silu(a_e[..., :f]).mul_(a_e[..., f:])
            y_e = view(ys)
            torch.matmul(act, w2[e].mT, out=y_e)
            y_e.mul_(view(row_gates))
        out = layout.to_tokens(ys, h.shape[0])
        if backward:
            ctx.save_for_backward(xs, a, w1, w2, row_gates)
        ctx.layout = layout
        ctx.dtypes = (h.dtype, gate_up.dtype, down.dtype, gates.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, a, w1, w2, row_gates = ctx.saved_tensors
        layout: _Layout = ctx.layout
        need_h, need_gate_up, need_down, need_gates = ctx.needs_input_grad[:4]
        f = w2.shape[2]
        buf = layout.buffer(xs, xs.shape[1])
        g = layout.token_rows(grad_out.to(xs.dtype), buf)  # dL/dy' for the gated rows y' = gate * y
        row_grad_gates = g.new_empty(g.shape[0])
        empty = len(layout.blocks) < layout.experts and not layout.padded
        grad_w1 = torch.zeros_like(w1) if empty else torch.empty_like(w1)
        grad_w2 = torch.zeros_like(w2) if empty else torch.empty_like(w2)
        for e, view in layout.pieces():
            g_e, a_e, gate = view(g), view(a), view(row_gates)
            u = torch.matmul(g_e, w2[e])  # dL/dy' @ down[e] = dL/d(act) / gate
            silu_gate = F.silu(a_e[..., :f])
            act = silu_gate * a_e[..., f:]
            if need_gates:
                torch.sum(u * act, dim=-1, out=view(row_grad_gates))
            if need_down:
                act.mul_(gate)  # dW2_e = (gate * g)^T act = g^T (gate * act)
                torch.matmul(g_e.mT, act, out=grad_w2[e])
            del act
            u.mul_(gate)  # now dL/d(act)
            da = a_e.new_empty(a_e.shape)
            torch.mul(u, silu_gate, out=da[..., f:])
            del silu_gate
            da[..., :f] = torch.ops.aten.silu_backward(u.mul_(a_e[..., f:]), a_e[..., :f])
            del u
            if need_gate_up:
                torch.matmul(da.mT, view(xs), out=grad_w1[e])
            torch.matmul(da, w1[e], out=g_e)  # g_e is not needed any more: it takes dL/dxs
        grad_gates = layout.gather(row_grad_gates).to(ctx.dtypes[3]) if need_gates else None
        grad_h = layout.to_tokens(buf, grad_out.shape[0]).to(ctx.dtypes[0]) if need_h else None
        grad_gate_up = grad_w1.to(ctx.dtypes[1]) if need_gate_up else None
        grad_down = grad_w2.to(ctx.dtypes[2]) if need_down else None
        return grad_h, grad_gate_up, grad_down, grad_gates, None, None


class MoEFeedForward(nn.Module):
    """``BackboneConfig.ffn = "moe"``: ``experts`` SiLU-gated MLPs of width ``d_expert`` and a linear router.

    Parameters: ``router.weight`` (E, d_model), ``gate_up`` (E, 2 * d_expert, d_model), ``down`` (E, d_model,
    d_expert), each expert's slice laid out like an ``nn.Linear`` weight (out, in). While training, each forward
    leaves its ``RouterStats`` in ``last_stats`` (``seqlab.ffn.router_losses`` collects them); in eval mode there
    is no capacity, no jitter and ``last_stats`` is None. A copy (``copy.deepcopy``, ``pickle``) leaves
    ``last_stats`` behind (None in the copy): the stats carry the forward's autograd graph, which cannot be copied.
    """

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        s = self.settings = config.moe_settings()
        d, f = config.d_model, s.d_expert
        self.layer_idx = layer_idx
        self.router = nn.Linear(d, s.experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(s.experts, 2 * f, d))
        self.down = nn.Parameter(torch.empty(s.experts, d, f))
        # each expert initialised like the nn.Linear it stands for (uniform in +-1/sqrt(fan_in))
        nn.init.uniform_(self.gate_up, -1 / math.sqrt(d), 1 / math.sqrt(d))
        nn.init.uniform_(self.down, -1 / math.sqrt(f), 1 / math.sqrt(f))
        self.last_stats: RouterStats | None = None

    def __getstate__(self) -> dict:
        # deepcopy and pickle go through here: drop the last training forward's stats, whose losses are non-leaf
        # tensors with their graph (deepcopy refuses those; a copy has not run that forward anyway)
        state = super().__getstate__()
        state["last_stats"] = None
        return state

    def parameter_counts(self, ranks: Mapping[tuple[str, int], int] | None = None) -> tuple[int, int]:
        """(total, active per token) parameters of this layer: the router, and each expert's ``gate_up`` and
        ``down`` slice as out * in, or, for a slice named in ``ranks`` (``{("gate_up" | "down", expert): rank}``:
        the experts LASER reduced, ``seqlab.ffn.parameter_counts``), as the rank * (out + in) numbers of its
        factors. Active: the router and the ``top_k / experts`` share of the experts' sum (rounded to the nearest
        integer; with experts of one size exactly ``top_k`` experts)."""
        s = self.settings
        ranks = ranks or {}
        slices = {(part, e) for part in ("gate_up", "down") for e in range(s.experts)}
        unknown = [key for key in ranks if key not in slices]
        if unknown:
            raise ConfigError(f"no such expert slice (part, expert) in this {s.experts}-expert layer: {unknown}")
        experts = 0
        for part in ("gate_up", "down"):
            out, inp = getattr(self, part).shape[1:]
            for e in range(s.experts):
                rank = ranks.get((part, e))
                experts += out * inp if rank is None else rank * (out + inp)
        router = self.router.weight.numel()
        return router + experts, router + (2 * experts * s.top_k + s.experts) // (2 * s.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        h = x.reshape(-1, x.shape[-1])
        training = self.training and torch.is_grad_enabled()
        jitter = s.jitter if training else 0.0
        if s.renormalize is None:  # route's four-argument form, which wrappers of it (tests, tools) may assume
            logits, experts, gates = route(h, self.router.weight, s.top_k, jitter)
        else:
            logits, experts, gates = route(h, self.router.weight, s.top_k, jitter, renormalize=s.renormalize)
        capacity = capacity_for(h.shape[0], s) if training else None
        out, kept = dispatch(h, experts, gates, self.gate_up, self.down, capacity)
        if training:
            self.last_stats = _router_stats(logits, experts, s.experts, kept)
        else:
            self.last_stats = None
        return out.reshape(x.shape)


def _router_stats(logits: torch.Tensor, experts: torch.Tensor, n_experts: int, kept: int) -> RouterStats:
    probs = logits.softmax(dim=-1)
    pairs = experts.numel()
    fraction = torch.bincount(experts.reshape(-1), minlength=n_experts).float() / max(pairs, 1)
    balance = n_experts * (fraction * probs.mean(dim=0)).sum()  # Switch: E * sum_i f_i * P_i (f not differentiable)
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return RouterStats(balance, z_loss, fraction.detach(), 1.0 - kept / max(pairs, 1))


def moe_reference(layer: MoEFeedForward, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """The per-token twin of ``MoEFeedForward.forward`` (no jitter): each token's router softmax, its top-k,
    and each kept choice's expert applied to that token alone, in the same priority order (all first choices
    in token order, then the second choices, ...) with a per-expert counter for the capacity. Slow; for tests."""
    s = layer.settings
    h = x.reshape(-1, x.shape[-1])
    rows: list[torch.Tensor] = [h.new_zeros(h.shape[1]) for _ in range(h.shape[0])]
    choices = []
    for t in range(h.shape[0]):
        logits = h[t].float() @ layer.router.weight.float().t()
        probs = torch.exp(logits - logits.max())
        probs = probs / probs.sum()
        top = sorted(range(s.experts), key=lambda e: (-float(probs[e].detach()), e))[: s.top_k]
        weights = [probs[e] for e in top]
        if _renormalizes(s.top_k, s.renormalize):
            total = sum(weights)
            weights = [w / total for w in weights]
        choices.append(list(zip(top, weights)))
    used = [0] * s.experts
    for j in range(s.top_k):
        for t in range(h.shape[0]):
            e, w = choices[t][j]
            if capacity is not None and used[e] >= capacity:
                continue
            used[e] += 1
            f = s.d_expert
            a = layer.gate_up[e, :f] @ h[t]
            b = layer.gate_up[e, f:] @ h[t]
            rows[t] = rows[t] + w * (layer.down[e] @ (F.silu(a) * b))
    return torch.stack(rows).reshape(x.shape)
