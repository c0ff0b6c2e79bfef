"""Backbone configuration: one validated dataclass, with per-layer overrides.

Per-layer overrides are the extension point for hybrid stacks: a later issue registers a new mixer kind
(e.g. attention) or feed-forward kind (e.g. MoE) in ``seqlab.blocks`` and a config selects it for some layers,
without changing this class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from seqlab.errors import ConfigError

SSM_KINDS = ("mamba1", "mamba2")
BIDIRECTIONAL_COMBINE = ("add", "mean")


@dataclass(frozen=True)
class LayerOverride:
    """What one layer does differently from the config's defaults.

    ``mixer``: a registered mixer kind (``"mamba1"``, ``"mamba2"``; later issues add more), None = the
    config's ``ssm``. ``ffn``: a registered feed-forward kind after the mixer (``"mlp"``; None = the
    config's ``ffn``). ``options``: keyword settings passed to that layer's mixer (e.g. ``{"d_state": 32}``).
    """

    mixer: str | None = None
    ffn: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer, "ffn": self.ffn, "options": dict(self.options)}


@dataclass(frozen=True)
class BackboneConfig:
    """Shape and behaviour of a Mamba backbone.

    Mamba-1 (``ssm="mamba1"``) uses ``d_state`` (16 by default), ``dt_rank`` and ``d_conv``; Mamba-2
    (``ssm="mamba2"``) uses ``d_state`` (128 by default), ``headdim``, ``ngroups`` and ``chunk_size``.
    ``d_inner = expand * d_model``.
    """

    d_model: int
    n_layer: int
    ssm: str = "mamba1"
    d_state: int | None = None
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    bidirectional: bool = False
    bidirectional_combine: str = "add"
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    ffn: str | None = None
    d_ffn: int | None = None
    layer_overrides: Mapping[int, LayerOverride] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"BackboneConfig.{name} must be a positive int, got {value!r}")

        for name in ("d_model", "n_layer", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            positive_int(name)
        if self.ssm not in SSM_KINDS:
            raise ConfigError(f"BackboneConfig.ssm must be one of {SSM_KINDS}, got {self.ssm!r}")
        if self.d_state is None:
            object.__setattr__(self, "d_state", 16 if self.ssm == "mamba1" else 128)
        positive_int("d_state")
        if self.dt_rank == "auto":
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        positive_int("dt_rank")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ConfigError(f"BackboneConfig.norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.bidirectional_combine not in BIDIRECTIONAL_COMBINE:
            raise ConfigError(
                f"BackboneConfig.bidirectional_combine must be one of {BIDIRECTIONAL_COMBINE}, "
                f"got {self.bidirectional_combine!r}"
            )
        if not (0 < self.dt_min <= self.dt_max):
            raise ConfigError(f"BackboneConfig needs 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")
        lo, hi = self.A_init_range
        if not (0 < lo <= hi):
            raise ConfigError(f"BackboneConfig.A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")
        object.__setattr__(self, "A_init_range", (float(lo), float(hi)))
        if self.d_ffn is not None:
            positive_int("d_ffn")

        overrides: dict[int, LayerOverride] = {}
        for key, value in dict(self.layer_overrides).items():
            if isinstance(key, str) and key.isdigit():
                key = int(key)
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < self.n_layer:
                raise ConfigError(
                    f"BackboneConfig.layer_overrides has key {key!r}: keys must be layer indices in [0, {self.n_layer})"
                )
            if isinstance(value, Mapping):
                unknown = set(value) - {"mixer", "ffn", "options"}
                if unknown:
                    raise ConfigError(f"layer_overrides[{key}] has unknown fields {sorted(unknown)}")
                value = LayerOverride(**value)
            if not isinstance(value, LayerOverride):
                raise ConfigError(f"layer_overrides[{key}] must be a LayerOverride or a dict, got {type(value).__name__}")
            overrides[key] = value
        object.__setattr__(self, "layer_overrides", dict(sorted(overrides.items())))
        # Shape checks that need the resolved per-layer kinds.
        for i in range(self.n_layer):
            self.validate_layer(i)

    # ----------------------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    def layer_spec(self, index: int) -> tuple[str, str | None, dict[str, Any]]:
        """(mixer kind, ffn kind or None, mixer options) for layer ``index``."""
        override = self.layer_overrides.get(index)
        if override is None:
            return self.ssm, self.ffn, {}
        mixer = override.mixer or self.ssm
        ffn = override.ffn if override.ffn is not None else self.ffn
        return mixer, (None if ffn == "none" else ffn), dict(override.options)

    def validate_layer(self, index: int) -> None:
        mixer, _, options = self.layer_spec(index)
        if mixer == "mamba2":
            d_inner = options.get("expand", self.expand) * self.d_model
            headdim = options.get("headdim", self.headdim)
            ngroups = options.get("ngroups", self.ngroups)
            where = "BackboneConfig" if index not in self.layer_overrides else f"layer {index}"
            if d_inner % headdim:
                raise ConfigError(
                    f"{where}: Mamba-2 needs d_inner (expand * d_model = {d_inner}) divisible by headdim ({headdim})"
                )
            if (d_inner // headdim) % ngroups:
                raise ConfigError(
                    f"{where}: Mamba-2 needs nheads ({d_inner // headdim}) divisible by ngroups ({ngroups})"
                )

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "layer_overrides":
                value = {str(k): v.to_dict() for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BackboneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"BackboneConfig has no fields {sorted(unknown)}")
        data = dict(data)
        if "A_init_range" in data:
            data["A_init_range"] = tuple(data["A_init_range"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the state and its meaning (not the weights, not init ranges)."""
        arch = {k: v for k, v in self.to_dict().items() if k not in _INIT_ONLY}
        text = json.dumps(arch, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# Fields that only shape the random initialisation, not what a trained model computes.
_INIT_ONLY = frozenset({"dt_min", "dt_max", "dt_init_floor", "A_init_range"})
