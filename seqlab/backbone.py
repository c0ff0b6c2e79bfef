"""The stack: residual blocks and the final RMSNorm, threading a RecurrentState through every layer."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from seqlab.blocks import BidirectionalBlock, Block
from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, InputError, StateError
from seqlab.kernels import BACKENDS, KernelInputError, canonical_backend
from seqlab.mixers.base import check_states_at
from seqlab.norm import RMSNorm
from seqlab.state import RecurrentState


class Backbone(nn.Module):
    """(b, l, d_model) hidden states in, normalised hidden states and the new state out."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        if not isinstance(config, BackboneConfig):
            raise ConfigError(f"Backbone needs a BackboneConfig, got {type(config).__name__}")
        self.config = config
        block = BidirectionalBlock if config.bidirectional else Block
        self.layers = nn.ModuleList(block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self._fingerprint = config.fingerprint()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def _blocks(self) -> list[Block | BidirectionalBlock]:
        """The layers, typed (nn.ModuleList hands out plain modules)."""
        return [cast("Block | BidirectionalBlock", layer) for layer in self.layers]

    def set_backend(self, backend: str, *, _stacklevel: int = 1) -> None:
        """Pick the kernel backend of every mixer: "auto" (default), "ref", "chunked" or "triton" ("torch", the
        old name of "chunked", works with a FutureWarning)."""
        try:
            backend = canonical_backend(backend, stacklevel=_stacklevel + 1)
        except KernelInputError:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}") from None
        for module in self.modules():
            if hasattr(module, "backend") and module is not self:
                setattr(module, "backend", backend)  # noqa: B010 (mixers are typed as nn.Module here)

    def init_state(self, batch_size: int, device=None) -> RecurrentState:
        if self.config.bidirectional:
            raise StateError("bidirectional models have no streaming state: they need the whole sequence at once")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        return RecurrentState([layer.init_state(batch_size, device) for layer in self._blocks()], 0, self.fingerprint)

    def _check_state(self, state: RecurrentState | None, hidden: torch.Tensor) -> None:
        if state is None:
            return
        if self.config.bidirectional:
            raise StateError("bidirectional models cannot stream: call them on the whole sequence with state=None")
        if not isinstance(state, RecurrentState):
            raise InputError(f"state must be a RecurrentState or None, got {type(state).__name__}")
        state.check_compatible(self, batch_size=hidden.shape[0], device=hidden.device)

    def forward(
        self, hidden: torch.Tensor, state: RecurrentState | None = None, return_state: bool = True, states_at=None
    ):
        """(hidden, new_state). With ``states_at`` (strictly increasing offsets 1..l within this call: the state
        after the first p elements), (hidden, new_state, states): one ``RecurrentState`` per position, at
        ``position`` = start + p, from this one forward (see docs/generation.md)."""
        self._check_state(state, hidden)
        if states_at is not None:
            return self._forward_states_at(hidden, state, return_state, states_at)
        return_state = return_state and not self.config.bidirectional
        new_layers = []
        for i, layer in enumerate(self.layers):
            hidden, layer_state = layer(hidden, None if state is None else state.layers[i], return_state)
            new_layers.append(layer_state)
        hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
        if not return_state:
            return hidden, None
        position = (0 if state is None else state.position) + hidden.shape[1]
        return hidden, RecurrentState(new_layers, position, self.fingerprint)

    def step(self, hidden: torch.Tensor, state: RecurrentState | None):
        """One element per sequence: hidden (b, d_model)."""
        if state is None:
            state = self.init_state(hidden.shape[0], hidden.device)
        self._check_state(state, hidden)
        new_layers = []
        for i, layer in enumerate(self._blocks()):
            hidden, layer_state = layer.step(hidden, state.layers[i])
            new_layers.append(layer_state)
        hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
        return hidden, RecurrentState(new_layers, state.position + 1, self.fingerprint)

    def _forward_states_at(self, hidden: torch.Tensor, state: RecurrentState | None, return_state: bool, states_at):
        if self.config.bidirectional:
            raise StateError("bidirectional models have no streaming state: there are no states at positions")
        positions = check_states_at(states_at, hidden.shape[1])
        new_layers, at_layers = [], []
        for i, layer in enumerate(self._blocks()):
            hidden, layer_state, at = layer(hidden, None if state is None else state.layers[i], True, positions)
            new_layers.append(layer_state)
            at_layers.append(at)
        hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
        start = 0 if state is None else state.position
        states = [
            RecurrentState([at_layers[i][j] for i in range(len(at_layers))], start + p, self.fingerprint)
            for j, p in enumerate(positions)
        ]
        new_state = RecurrentState(new_layers, start + hidden.shape[1], self.fingerprint) if return_state else None
        return hidden, new_state, states
