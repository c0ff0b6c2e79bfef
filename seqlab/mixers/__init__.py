"""Sequence mixers and their registry.

A mixer maps hidden states (b, l, d_model) to (b, l, d_model) and carries a per-layer state, a dict of
named fp32 tensors. Every mixer implements ``forward(hidden, state, return_state)``, ``step(hidden, state)``
and ``init_state(batch_size, device)``. ``"attention"`` (seqlab.mixers.attention) keeps a KV cache as its
state; ``"mamba3"`` (seqlab.mixers.mamba3) is Mamba-3, SISO or MIMO. More kinds join with ``register_mixer``
and select them per layer through ``BackboneConfig.layer_overrides``.
"""

from __future__ import annotations

from collections.abc import Callable

from seqlab.errors import ConfigError

from .attention import AttentionMixer
from .base import Mixer
from .mamba1 import Mamba1Mixer
from .mamba2 import Mamba2Mixer
from .mamba3 import Mamba3Mixer

_MIXERS: dict[str, Callable[..., Mixer]] = {
    "mamba1": Mamba1Mixer,
    "mamba2": Mamba2Mixer,
    "mamba3": Mamba3Mixer,
    "attention": AttentionMixer,
}


def register_mixer(kind: str, factory: Callable[..., Mixer]) -> None:
    """Make ``kind`` usable in ``BackboneConfig.ssm`` / ``LayerOverride.mixer``:
    ``factory(config, layer_idx, **options)``."""
    _MIXERS[kind] = factory


def build_mixer(kind: str, config, layer_idx: int, options: dict) -> Mixer:
    try:
        factory = _MIXERS[kind]
    except KeyError:
        raise ConfigError(f"layer {layer_idx}: unknown mixer kind {kind!r}; registered: {sorted(_MIXERS)}") from None
    try:
        return factory(config, layer_idx, **options)
    except TypeError as exc:
        raise ConfigError(f"layer {layer_idx}: bad options {sorted(options)} for mixer {kind!r}: {exc}") from None


__all__ = ["AttentionMixer", "Mamba1Mixer", "Mamba2Mixer", "Mamba3Mixer", "Mixer", "build_mixer", "register_mixer"]
