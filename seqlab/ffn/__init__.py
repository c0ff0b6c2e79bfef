"""Feed-forward kinds beyond the dense gated MLP of ``seqlab.blocks``: the mixture of experts (``"moe"``).

``router_losses(model)`` gathers what the MoE layers of a model measured in their last training forward: the
weighted auxiliary loss to add to the task loss, and the per-layer utilisation the trainer logs. See
docs/moe.md and docs/architecture.md ("where new things go").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from seqlab.errors import ConfigError
from seqlab.ffn.moe import MoEFeedForward, RouterStats, capacity_for, dispatch, moe_reference, route

#: a router whose busiest expert takes more than this share of the tokens is reported as collapsed
COLLAPSE_FRACTION = 0.9


@dataclass
class RouterLosses:
    """The MoE layers' last training forward: ``loss`` (balance_weight * balance + z_weight * z, summed over
    layers, with its graph), the unweighted means over layers (``balance_loss``, ``z_loss``), the
    ``dropped_fraction`` (mean over layers) and each layer's ``expert_fraction`` (layer index -> shares)."""

    loss: torch.Tensor
    balance_loss: float
    z_loss: float
    dropped_fraction: float
    expert_fraction: dict[int, list[float]] = field(default_factory=dict)

    @property
    def max_expert_fraction(self) -> float:
        return max(max(v) for v in self.expert_fraction.values())

    def collapsed(self, threshold: float = COLLAPSE_FRACTION) -> list[str]:
        """One line per layer whose busiest expert took more than ``threshold`` of the tokens."""
        lines = []
        for layer, shares in self.expert_fraction.items():
            top = max(range(len(shares)), key=shares.__getitem__)
            if shares[top] > threshold:
                lines.append(
                    f"MoE router collapse in layer {layer}: expert {top} took {shares[top]:.0%} of the tokens "
                    f"(more than {threshold:.0%}); raise moe_balance_weight or moe_jitter, or lower the learning rate"
                )
        return lines

    def record(self) -> dict:
        """Flat numbers for a training log record (``moe_*`` keys)."""
        return {
            "moe_balance_loss": self.balance_loss,
            "moe_z_loss": self.z_loss,
            "moe_dropped_fraction": self.dropped_fraction,
            "moe_max_expert_fraction": self.max_expert_fraction,
            "moe_expert_fraction": {str(k): v for k, v in self.expert_fraction.items()},
        }


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def router_losses(model: nn.Module, clear: bool = True) -> RouterLosses | None:
    """The auxiliary losses and utilisation of ``model``'s MoE layers' last training forward, or None when the
    model has no MoE layer or none ran in training mode since the last call. ``clear``: forget them after."""
    layers = [m for m in moe_layers(model) if m.last_stats is not None]
    if not layers:
        return None
    loss = torch.zeros((), device=layers[0].router.weight.device)
    balance = z = dropped = 0.0
    fractions = {}
    for m in layers:
        st = m.last_stats
        assert st is not None
        loss = loss + m.settings.balance_weight * st.balance_loss + m.settings.z_weight * st.z_loss
        balance += float(st.balance_loss.detach())
        z += float(st.z_loss.detach())
        dropped += st.dropped
        fractions[m.layer_idx] = [float(v) for v in st.fraction]
        if clear:
            m.last_stats = None
    n = len(layers)
    return RouterLosses(loss, balance / n, z / n, dropped / n, fractions)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"total": every parameter (tied ones once; a quantized layer's weight counts as out * in + bias, not its
    codebooks and scales; a LASER'd layer counts what it stands for: a ``LowRankLinear`` its factors and bias, an
    MoE expert slice reduced in ``model.low_rank`` the rank * (out + in) numbers of its factors, not the dense
    product its stacked parameter holds in memory), "active": the parameters one token uses (an MoE layer counts
    its router and the ``top_k / experts`` share of its experts, ``MoEFeedForward.parameter_counts``)}."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():  # a quantized layer (seqlab.quant.AQLMLinear) counts the weights it stands for
        counted = getattr(m, "represented_parameters", None)
        if callable(counted):
            total += counted() - sum(p.numel() for p in m.parameters())
    reduced = _reduced_experts(model)
    inactive = 0
    for name, m in model.named_modules():  # each module once (a shared one under its first name)
        if not isinstance(m, MoEFeedForward):
            continue
        layer_total, layer_active = m.parameter_counts(reduced.pop(name, None))
        total -= m.parameter_counts()[0] - layer_total  # a reduced expert stands for its factors
        inactive += layer_total - layer_active
    if reduced:
        names = ", ".join(f"{moe}.{part}[{e}]" for moe, ranks in reduced.items() for part, e in ranks)
        raise ConfigError(f"model.low_rank names MoE expert slices of no MoE layer of this model: {names}")
    return {"total": total, "active": total - inactive}


_EXPERT_SLICE = re.compile(r"^(?P<moe>.+)\.(?P<part>gate_up|down)\[(?P<e>\d+)\]$")


def _reduced_experts(model: nn.Module) -> dict[str, dict[tuple[str, int], int]]:
    """The MoE expert slices LASER reduced (``model.low_rank``, seqlab.posttrain.laser): MoE layer name ->
    {(part, expert): rank}."""
    reduced: dict[str, dict[tuple[str, int], int]] = {}
    for name, entry in (getattr(model, "low_rank", None) or {}).items():
        match = _EXPERT_SLICE.match(name)
        if match is None:
            continue  # a LowRankLinear: its parameters are its factors, counted as they are
        rank = entry.get("rank") if isinstance(entry, dict) else None
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"model.low_rank entry of {name} has no positive integer rank: {entry!r}")
        reduced.setdefault(match["moe"], {})[(match["part"], int(match["e"]))] = rank
    return reduced


__all__ = [
    "COLLAPSE_FRACTION",
    "MoEFeedForward",
    "RouterLosses",
    "RouterStats",
    "capacity_for",
    "dispatch",
    "moe_layers",
    "moe_reference",
    "parameter_counts",
    "route",
    "router_losses",
]
