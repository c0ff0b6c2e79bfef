"""The stack: residual blocks and the final RMSNorm, threading a RecurrentState through every layer."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from seqlab.blocks import BidirectionalBlock, Block
from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, InputError, StateError, StateMismatchError
from seqlab.fused_step import fused_step, trust, trusted_plan
from seqlab.kernels import BACKENDS, KernelInputError, canonical_backend
from seqlab.kernels._varlen import resolve_packing as _resolve_packing
from seqlab.mixers.base import check_states_at
from seqlab.norm import RMSNorm
from seqlab.state import RecurrentState


def resolve_packing(cu_seqlens, seq_idx, hidden: torch.Tensor) -> torch.Tensor | None:
    """The checked ``cu_seqlens`` (int64, N + 1 entries) of a packed input ``hidden`` (1, T, ...), from either
    spelling (``cu_seqlens`` (N + 1,) or ``seq_idx`` (1, T)), or None when the input is not packed. InputError
    names the argument: both given, batch != 1, boundaries not strictly increasing from 0 to T, ..."""
    if cu_seqlens is None and seq_idx is None:
        return None
    try:
        cu = _resolve_packing(cu_seqlens, seq_idx, hidden.shape[0], hidden.shape[1])
    except KernelInputError as exc:
        raise InputError(str(exc)) from None
    assert cu is not None
    return cu


def packed_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """The length of every sequence of a packed row."""
    bounds = cu_seqlens.tolist()
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


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

    def _check_state(self, state: RecurrentState | None, hidden: torch.Tensor, rows: int | None = None) -> None:
        if state is None:
            return
        if self.config.bidirectional:
            raise StateError("bidirectional models cannot stream: call them on the whole sequence with state=None")
        if not isinstance(state, RecurrentState):
            raise InputError(f"state must be a RecurrentState or None, got {type(state).__name__}")
        if rows is not None and state.batch_size != rows:  # packed: one state row per sequence
            state.check_compatible(self, device=hidden.device)
            raise StateMismatchError(
                f"state holds {state.batch_size} rows, the packed input {rows} sequences (cu_seqlens): give one "
                "state row per sequence"
            )
        state.check_compatible(self, batch_size=hidden.shape[0] if rows is None else rows, device=hidden.device)

    def forward(
        self,
        hidden: torch.Tensor,
        state: RecurrentState | None = None,
        return_state: bool = True,
        states_at=None,
        *,
        cu_seqlens=None,
        seq_idx=None,
    ):
        """(hidden, new_state). With ``states_at`` (strictly increasing offsets 1..l within this call: the state
        after the first p elements), (hidden, new_state, states): one ``RecurrentState`` per position, at
        ``position`` = start + p, from this one forward (see docs/generation.md).

        Packed rows: ``cu_seqlens`` (N + 1,) or ``seq_idx`` (1, T) with hidden (1, T, d_model): N sequences laid
        end to end, each run as if alone (from zeros, or from row i of ``state``, which then has N rows); the new
        state has N rows, row i at its start position + the length of sequence i."""
        cu = resolve_packing(cu_seqlens, seq_idx, hidden)
        if cu is not None:
            return self._forward_packed(hidden, state, return_state, states_at, cu)
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
        if state is None:
            return hidden, RecurrentState(new_layers, hidden.shape[1], self.fingerprint)
        return hidden, state.advanced(new_layers, hidden.shape[1])

    def _forward_packed(self, hidden, state, return_state: bool, states_at, cu: torch.Tensor):
        if self.config.bidirectional:
            raise InputError(
                "packed rows (cu_seqlens/seq_idx) need a causal model: a bidirectional model would see across "
                "the sequence boundaries"
            )
        if states_at is not None:
            raise InputError("states_at cannot be combined with packed rows (cu_seqlens/seq_idx)")
        lengths = packed_lengths(cu)
        self._check_state(state, hidden, rows=len(lengths))
        new_layers = []
        for i, layer in enumerate(self._blocks()):
            hidden, layer_state = layer(hidden, None if state is None else state.layers[i], return_state, cu_seqlens=cu)
            new_layers.append(layer_state)
        hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
        if not return_state:
            return hidden, None
        if state is None:
            return hidden, RecurrentState(new_layers, tuple(lengths), self.fingerprint)  # type: ignore[arg-type]
        return hidden, state.advanced(new_layers, lengths)

    def step(self, hidden: torch.Tensor, state: RecurrentState | None, *, fused: bool = True):
        """One element per sequence: hidden (b, d_model). ``fused`` (default True): run the Mamba blocks through
        the compiled decode step where it applies (CPU, float32/float64, no autograd, plain blocks; see
        ``seqlab.fused_step``), else, and for every other block, each block's eager ``step``: same results."""
        if state is None:
            state = self.init_state(hidden.shape[0], hidden.device)
        # a state this model's fused step returned, untouched since, was checked when it went in and made to the
        # same layout: checking it again costs more than the step's own Python
        plan = trusted_plan(self, state, hidden) if fused and isinstance(hidden, torch.Tensor) else None
        if plan is None:
            self._check_state(state, hidden)
        done = fused_step(self, hidden, state, plan) if fused else None
        if done is not None:
            hidden, new_layers = done
            hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
            new_state = state.advanced(new_layers, 1)
            trust(self, new_state)
            return hidden, new_state
        new_layers = []
        for i, layer in enumerate(self._blocks()):
            hidden, layer_state = layer.step(hidden, state.layers[i])
            new_layers.append(layer_state)
        hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
        return hidden, state.advanced(new_layers, 1)

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

        def after(layers, consumed: int) -> RecurrentState:  # each row's position moved on by `consumed`
            if state is None:
                return RecurrentState(layers, consumed, self.fingerprint)
            return state.advanced(layers, consumed)

        states = [after([at_layers[i][j] for i in range(len(at_layers))], p) for j, p in enumerate(positions)]
        new_state = after(new_layers, hidden.shape[1]) if return_state else None
        return hidden, new_state, states
