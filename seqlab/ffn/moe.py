"""Mixture-of-experts feed-forward (MoE-Mamba's "moe" layer): a softmax router, top-k experts per token, each
expert a SiLU-gated MLP, Switch-style capacity while training, no capacity (drop-free) at evaluation.

Dispatch has no loop over tokens: the (token, choice) pairs are sorted by expert (first choices before second
choices, tokens in order within each), a capacity cut keeps each expert's first ``capacity`` pairs, the kept
tokens are gathered into one contiguous block per expert, each expert runs two GEMMs on its block, and the
results are scattered back with their gate weights (``index_add``). Autograd differentiates the gather and the
scatter, so the backward is batched the same way. ``moe_reference`` is the per-token twin the tests hold it to.

Written here rather than taken from a library: the MoE libraries of the field (megablocks, tutel, fairscale's
MoE) are CUDA-only, tied to their own transformer layers, or unmaintained, and none keeps this project's
contract (drop-free, token-local routing at evaluation so any chunking of a stream gives the same outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import MoESettings


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
    h: torch.Tensor, router_weight: torch.Tensor, top_k: int, jitter: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) in fp32, the chosen experts (N, k) and their gate weights (N, k) for tokens h (N, d).

    k = 1: the gate is the chosen expert's probability (Switch); k > 1: the k probabilities renormalised."""
    x = h.float()
    if jitter > 0:
        x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
    with torch.autocast(h.device.type, enabled=False):
        logits = F.linear(x, router_weight.float())
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    gates = top_p if top_k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
    return logits, top_i, gates


def capacity_for(tokens: int, settings: MoESettings) -> int:
    """Each expert's token budget in a training batch of ``tokens`` tokens."""
    return max(1, math.ceil(settings.capacity_factor * tokens * settings.top_k / settings.experts))


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
    flat = experts.reshape(-1)  # pair p = token * k + choice
    token_of_pair = torch.arange(n, device=h.device).repeat_interleave(k)
    choice_of_pair = torch.arange(k, device=h.device).repeat(n)
    priority = choice_of_pair * n + token_of_pair
    order = torch.argsort(flat * (n * k) + priority)  # by expert, then priority
    counts = torch.bincount(flat, minlength=n_experts)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=h.device) - starts[flat[order]]
        order = order[rank < capacity]
        counts = counts.clamp(max=capacity)
    tokens = token_of_pair[order]
    xs = h.index_select(0, tokens)
    outs = []
    for e, block in enumerate(xs.split(counts.tolist())):
        if block.shape[0]:
            g, u = F.linear(block, gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(g) * u, down[e]))
    if not outs:
        return h.new_zeros(h.shape), 0
    ys = torch.cat(outs) * gates.reshape(-1)[order].unsqueeze(-1).to(outs[0].dtype)
    out = ys.new_zeros(n, h.shape[1]).index_add(0, tokens, ys)
    return out, int(order.numel())


class MoEFeedForward(nn.Module):
    """``BackboneConfig.ffn = "moe"``: ``experts`` SiLU-gated MLPs of width ``d_expert`` and a linear router.

    Parameters: ``router.weight`` (E, d_model), ``gate_up`` (E, 2 * d_expert, d_model), ``down`` (E, d_model,
    d_expert), each expert's slice laid out like an ``nn.Linear`` weight (out, in). While training, each forward
    leaves its ``RouterStats`` in ``last_stats`` (``seqlab.ffn.router_losses`` collects them); in eval mode there
    is no capacity, no jitter and ``last_stats`` is None.
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

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters of this layer."""
        s = self.settings
        per_expert = (self.gate_up.numel() + self.down.numel()) // s.experts
        router = self.router.weight.numel()
        return router + per_expert * s.experts, router + per_expert * s.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        h = x.reshape(-1, x.shape[-1])
        training = self.training and torch.is_grad_enabled()
        logits, experts, gates = route(h, self.router.weight, s.top_k, s.jitter if training else 0.0)
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
        if s.top_k > 1:
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
