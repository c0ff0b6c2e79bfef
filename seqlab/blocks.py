"""Residual blocks: pre-norm mixer (+ optional feed-forward), and the bidirectional variant.

Feed-forward kinds live in a registry like mixers: ``"mlp"`` (here) and ``"moe"`` (``seqlab.ffn.moe``); a new
kind joins with ``register_ffn``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError, StateError
from seqlab.ffn.moe import MoEFeedForward
from seqlab.mixers import build_mixer
from seqlab.norm import RMSNorm


class GatedMLP(nn.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x)); width ``config.d_ffn_resolved`` (``d_ffn``, default 8/3 *
    d_model rounded up to a multiple of 64)."""

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        d_ffn = config.d_ffn_resolved
        self.gate_up = nn.Linear(config.d_model, 2 * d_ffn, bias=False)
        self.down = nn.Linear(d_ffn, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


_FFNS: dict[str, Callable[..., nn.Module]] = {"mlp": GatedMLP, "moe": MoEFeedForward}


def register_ffn(kind: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``kind`` usable as ``BackboneConfig.ffn`` / ``LayerOverride.ffn``: factory(config, layer_idx)."""
    _FFNS[kind] = factory


def build_ffn(kind: str, config, layer_idx: int) -> nn.Module:
    try:
        return _FFNS[kind](config, layer_idx)
    except KeyError:
        raise ConfigError(f"layer {layer_idx}: unknown ffn kind {kind!r}; registered: {sorted(_FFNS)}") from None


class Block(nn.Module):
    """``x + mixer(norm(x))`` then, if configured, ``x + ffn(ffn_norm(x))``; residual stream in fp32 by option.

    ``_perturb`` (None unless DRµGS installs one, seqlab.decoding.drugs) is called at the sites "mixer_in" (the
    normalised input of the mixer), "mixer_out" (its output) and "residual" (the stream leaving the block)."""

    _perturb: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        kind, ffn, options = config.layer_spec(layer_idx)
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = build_mixer(kind, config, layer_idx, options)
        self.ffn_norm: RMSNorm | None
        self.ffn: nn.Module | None
        if ffn is not None:
            self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
            self.ffn = build_ffn(ffn, config, layer_idx)
        else:
            self.ffn_norm, self.ffn = None, None

    def _mix(self, residual: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        residual = residual.float() if self.residual_in_fp32 else residual
        residual = residual + mixed
        if self.ffn is not None and self.ffn_norm is not None:
            residual = residual + self.ffn(self.ffn_norm(residual.to(self.ffn_norm.weight.dtype)))
        return residual

    def forward(self, residual, state=None, return_state=True, states_at=None, *, cu_seqlens=None):
        """(residual, new_state); with ``states_at``: (residual, new_state, the layer states at those positions).
        ``cu_seqlens`` (packed rows, residual (1, T, d)): the mixer runs each sequence as if alone and returns one
        state row per sequence; the feed-forward is per token."""
        h = self.norm(residual.to(self.norm.weight.dtype))
        perturb = self._perturb
        if perturb is not None:
            h = perturb("mixer_in", h)
        if states_at is not None:
            if cu_seqlens is not None:
                raise InputError("states_at cannot be combined with packed rows (cu_seqlens)")
            out, new_state, at = self.mixer(h, state, True, states_at=states_at)
            return self._output(residual, out, perturb), new_state, at
        if cu_seqlens is not None:
            out, new_state = self.mixer(h, state, return_state, cu_seqlens=cu_seqlens)
        else:
            out, new_state = self.mixer(h, state, return_state)
        return self._output(residual, out, perturb), new_state

    def step(self, residual, state):
        h = self.norm(residual.to(self.norm.weight.dtype))
        perturb = self._perturb
        if perturb is not None:
            h = perturb("mixer_in", h)
        out, new_state = self.mixer.step(h, state)
        return self._output(residual, out, perturb), new_state

    def _output(self, residual, out, perturb):
        if perturb is None:
            return self._mix(residual, out)
        return perturb("residual", self._mix(residual, perturb("mixer_out", out)))

    def init_state(self, batch_size: int, device=None):
        return self.mixer.init_state(batch_size, device)


class BidirectionalBlock(Block):
    """A forward mixer and a second mixer run on the reversed sequence, combined by sum or mean.

    Non-causal (every output sees the whole input), so it has no streaming state.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        kind, _, options = config.layer_spec(layer_idx)
        self.mixer_rev = build_mixer(kind, config, layer_idx, options)
        self.combine = config.bidirectional_combine

    def forward(self, residual, state=None, return_state=True, states_at=None, *, cu_seqlens=None):
        if cu_seqlens is not None:
            raise InputError(
                "packed rows (cu_seqlens) need a causal model: a bidirectional block would see across the sequence "
                "boundaries"
            )
        if states_at is not None:
            raise StateError("bidirectional blocks have no streaming state: there are no states at positions")
        if state is not None:
            raise StateError("bidirectional blocks see the whole sequence and cannot stream from a state")
        h = self.norm(residual.to(self.norm.weight.dtype))
        fwd, _ = self.mixer(h, None, False)
        rev, _ = self.mixer_rev(h.flip(1), None, False)
        out = fwd + rev.flip(1)
        if self.combine == "mean":
            out = out / 2
        return self._mix(residual, out), None

    def step(self, residual, state):
        raise StateError("bidirectional models cannot decode step by step: they need the whole sequence")

    def init_state(self, batch_size: int, device=None):
        raise StateError("bidirectional models have no streaming state")
