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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from seqlab.errors import ConfigError

#: the built-in mixer kinds a config's ``ssm`` may name (its default mixer; "attention" makes a Transformer stack)
SSM_KINDS = ("mamba1", "mamba2", "mamba3", "attention")
#: the rope_scaling types the attention mixer implements (HF transformers' names)
ROPE_SCALING_TYPES = ("linear", "llama3")
#: the largest width, layer count, state size ... a config accepts (a guard against absurd values from files)
MAX_DIM = 1 << 20
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
class MoESettings:
    """An MoE feed-forward's settings (``BackboneConfig.moe_settings()``; each is ``BackboneConfig.moe_<name>``).

    ``experts`` (8): the number of experts. ``top_k`` (1, as in Switch and MoE-Mamba): experts per token; with
    k = 1 the output is the chosen expert's times its router probability, with k > 1 the k probabilities are
    renormalised to sum to 1. ``d_expert``: each expert's gated-MLP width (default the dense ``d_ffn``, so a
    top-1 MoE has a dense layer's active parameters). ``capacity_factor`` (1.25): while training, each expert
    takes at most ``ceil(capacity_factor * tokens * top_k / experts)`` tokens of a batch; the rest pass on the
    residual path (the MoE adds nothing for them). At evaluation and generation there is no capacity limit.
    ``jitter`` (0): while training, the router's input is multiplied by uniform noise in
    [1 - jitter, 1 + jitter] (Switch). ``balance_weight`` (0.01): the weight of the Switch load-balancing loss
    ``experts * sum_i f_i * P_i`` (1 under uniform routing). ``z_weight`` (0.001): the weight of the router
    z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE). ``every`` (1): with ``ffn="moe"``, layer i is an MoE layer
    when ``(i + 1) % every == 0`` and a dense ``"mlp"`` layer otherwise.
    """

    experts: int
    top_k: int
    d_expert: int
    capacity_factor: float = 1.25
    jitter: float = 0.0
    balance_weight: float = 0.01
    z_weight: float = 0.001
    every: int = 1
    renormalize: bool | None = None


@dataclass(frozen=True)
class AttentionSettings:
    """An attention layer's settings (``BackboneConfig.attention_settings(i)``; each is ``BackboneConfig.attn_<name>``).

    ``heads``: query heads (default ``d_model // head_dim``). ``kv_heads``: key/value heads (default ``heads``;
    fewer is grouped-query attention, ``heads`` must be a multiple). ``head_dim`` (default ``d_model // heads``,
    or 64 when neither is given). ``rope_theta`` (10000.0): the rotary base. ``rope_dim``: how many dims of each
    head rotate (default ``head_dim``; 0 = no position encoding, as in Jamba's attention layers; the first
    ``rope_dim`` dims rotate in the half-split layout of Llama/NeoX). ``rope_scaling``: None, or HF's
    ``{"rope_type": "linear", "factor": f}`` or ``{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}``. ``window``: sliding-window size (a query sees
    itself and the ``window - 1`` tokens before it; None = the whole past). ``bias``: biases on the q/k/v
    projections (False); ``out_bias``: on the output projection (False).
    """

    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_dim: int = 0
    rope_scaling: Mapping[str, Any] | None = None
    window: int | None = None
    bias: bool = False
    out_bias: bool = False

    @classmethod
    def resolve(cls, d_model: int, values: Mapping[str, Any], where: str = "BackboneConfig") -> AttentionSettings:
        def pos_int(name: str, allow_zero: bool = False) -> int | None:
            value = values.get(name)
            if value is None:
                return None
            low = 0 if allow_zero else 1
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_DIM:
                raise ConfigError(f"{where}: {name} must be an int in [{low}, {MAX_DIM}], got {value!r}")
            return value

        heads, kv_heads, head_dim = pos_int("attn_heads"), pos_int("attn_kv_heads"), pos_int("attn_head_dim")
        if heads is None:
            head_dim = head_dim or min(64, d_model)
            if d_model % head_dim:
                raise ConfigError(
                    f"{where}: attn_heads is not set and d_model ({d_model}) is not a multiple of attn_head_dim "
                    f"({head_dim}): set attn_heads"
                )
            heads = d_model // head_dim
        if head_dim is None:
            if d_model % heads:
                raise ConfigError(
                    f"{where}: attn_head_dim is not set and d_model ({d_model}) is not a multiple of attn_heads "
                    f"({heads}): set attn_head_dim"
                )
            head_dim = d_model // heads
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ConfigError(
                f"{where}: attn_heads ({heads}) must be a multiple of attn_kv_heads ({kv_heads}) (grouped-query "
                "attention shares each key/value head among attn_heads / attn_kv_heads query heads)"
            )
        theta = values.get("attn_rope_theta")
        if theta is None:
            theta = 10000.0
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
            raise ConfigError(f"{where}: attn_rope_theta must be a finite number > 1, got {theta!r}")
        rope_dim = pos_int("attn_rope_dim", allow_zero=True)
        rope_dim = head_dim if rope_dim is None else rope_dim
        if rope_dim > head_dim or rope_dim % 2:
            raise ConfigError(
                f"{where}: attn_rope_dim must be even and at most attn_head_dim ({head_dim}), got {rope_dim}"
            )
        scaling = values.get("attn_rope_scaling")
        if scaling is not None:
            scaling = check_rope_scaling(scaling, f"{where}: attn_rope_scaling")
        window = pos_int("attn_window")
        flags = {}
        for name in ("attn_bias", "attn_out_bias"):
            value = values.get(name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
            flags[name] = bool(value)
        return cls(
            heads,
            kv_heads,
            head_dim,
            float(theta),
            rope_dim,
            scaling,
            window,
            flags["attn_bias"],
            flags["attn_out_bias"],
        )


@dataclass(frozen=True)
class Mamba3Settings:
    """A Mamba-3 layer's settings (``BackboneConfig.mamba3_settings(i)``), as in mamba_ssm's ``Mamba3`` module.

    From the shared fields: ``d_state`` (N, the state size per head), ``d_inner = expand * d_model``,
    ``headdim`` (P; ``nheads = d_inner // headdim``), ``ngroups`` (the B/C groups; nheads divisible by it),
    ``chunk_size`` (the chunked kernels' block length: compute only, not the result). The ``mamba3_*`` fields:
    ``rope_fraction`` (0.5 or 1.0, default 0.5): the part of the state that rotates; the number of rotary angles
    is ``floor(d_state * rope_fraction / 2)`` (at least 1). ``A_floor`` (1e-4): the data-dependent decay rate is
    clamped to at most ``-A_floor``. ``outproj_norm`` (False): a gated RMSNorm per head before ``out_proj``
    (``norm(y) * silu(z)``) instead of the gate ``y * silu(z)``. ``mimo_rank`` (1 = SISO; r > 1 is MIMO of rank r).
    ``A_activation``: how the rate's projection becomes positive before the minus sign and the floor:
    ``"heavy_tail"`` (default; mamba_ssm's main branch: ``1 + u`` for u >= 0, ``1 / (1 - u)`` below) or
    ``"softplus"`` (the mamba-ssm 2.3.2 release's module; for its checkpoints).
    """

    d_state: int
    d_inner: int
    headdim: int
    ngroups: int
    chunk_size: int
    rope_fraction: float = 0.5
    A_floor: float = 1e-4
    outproj_norm: bool = False
    mimo_rank: int = 1
    A_activation: str = "heavy_tail"

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def num_rope_angles(self) -> int:
        split = int(self.d_state * self.rope_fraction)
        return (split - split % 2) // 2

    @property
    def is_mimo(self) -> bool:
        return self.mimo_rank > 1

    @classmethod
    def resolve(cls, d_model: int, values: Mapping[str, Any], where: str = "BackboneConfig") -> Mamba3Settings:
        def pos_int(name: str) -> int:
            value = values.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_DIM:
                raise ConfigError(f"{where}: {name} must be a positive int (at most {MAX_DIM}), got {value!r}")
            return value

        d_state, expand, headdim, ngroups, chunk_size = (
            pos_int(n) for n in ("d_state", "expand", "headdim", "ngroups", "chunk_size")
        )
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ConfigError(
                f"{where}: Mamba-3 needs d_inner (expand * d_model = {d_inner}) divisible by headdim ({headdim})"
            )
        if (d_inner // headdim) % ngroups:
            raise ConfigError(f"{where}: Mamba-3 needs nheads ({d_inner // headdim}) divisible by ngroups ({ngroups})")
        fraction = values.get("mamba3_rope_fraction")
        fraction = 0.5 if fraction is None else fraction
        if isinstance(fraction, bool) or fraction not in (0.5, 1.0):
            raise ConfigError(f"{where}: mamba3_rope_fraction must be 0.5 or 1.0 (as in mamba_ssm), got {fraction!r}")
        floor = values.get("mamba3_A_floor")
        floor = 1e-4 if floor is None else floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor < 0:
            raise ConfigError(f"{where}: mamba3_A_floor must be a finite number >= 0, got {floor!r}")
        norm = values.get("mamba3_outproj_norm")
        if norm is not None and not isinstance(norm, bool):
            raise ConfigError(f"{where}: mamba3_outproj_norm must be true or false, got {norm!r}")
        rank = values.get("mamba3_mimo_rank")
        rank = 1 if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= 64:
            raise ConfigError(f"{where}: mamba3_mimo_rank must be an int in [1, 64] (1 = SISO), got {rank!r}")
        activation = values.get("mamba3_A_activation")
        activation = "heavy_tail" if activation is None else activation
        if activation not in MAMBA3_A_ACTIVATIONS:
            raise ConfigError(f"{where}: mamba3_A_activation must be one of {MAMBA3_A_ACTIVATIONS}, got {activation!r}")
        settings = cls(
            d_state, d_inner, headdim, ngroups, chunk_size, float(fraction), float(floor), bool(norm), rank, activation
        )
        if settings.num_rope_angles < 1:
            raise ConfigError(
                f"{where}: Mamba-3 needs at least one rotary angle: d_state ({d_state}) * mamba3_rope_fraction "
                f"({fraction}) must be at least 2"
            )
        return settings


def check_rope_scaling(scaling: Any, where: str) -> dict[str, Any]:
    """A checked copy of an HF-style rope_scaling mapping; unsupported types are an error naming the type."""
    if not isinstance(scaling, Mapping):
        raise ConfigError(f"{where} must be a mapping like {{'rope_type': 'linear', 'factor': 2.0}}, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(f"{where}: rope_type {kind!r} is not supported; seqlab implements {ROPE_SCALING_TYPES}")
    needed = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    }[kind]
    out: dict[str, Any] = {"rope_type": kind}
    for name in needed:
        value = scaling.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: {kind} scaling needs {name} > 0, got {value!r}")
        out[name] = value
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ConfigError(
            f"{where}: llama3 scaling needs high_freq_factor > low_freq_factor (the blend between them divides by "
            f"their difference), got {out['high_freq_factor']!r} and {out['low_freq_factor']!r}"
        )
    return out


@dataclass(frozen=True)
class BackboneConfig:
    """Shape and behaviour of a Mamba backbone.

    Mamba-1 (``ssm="mamba1"``) uses ``d_state`` (16 by default), ``dt_rank`` and ``d_conv``; Mamba-2
    (``ssm="mamba2"``) uses ``d_state`` (128 by default), ``headdim``, ``ngroups`` and ``chunk_size``.
    ``d_inner = expand * d_model``.

    ``ffn``: the feed-forward kind after every mixer (``"mlp"``: a gated MLP of width ``d_ffn``; ``"moe"``: a
    mixture of experts; None: none). The ``moe_*`` fields set the MoE layers (see ``MoESettings`` for their
    defaults and meaning) and are refused when no layer is an MoE layer. ``ffn="moe"`` is the MoE-Mamba
    layout (every mixer followed by an MoE); with ``moe_every=2`` only every second layer's feed-forward is an
    MoE (layers 1, 3, ...) and the others are dense ``"mlp"`` layers.

    ``ssm="attention"`` (or ``layer_overrides={i: {"mixer": "attention"}}`` for a hybrid) selects causal
    multi-head attention, set by the ``attn_*`` fields (see ``AttentionSettings``; refused when no layer is an
    attention layer).

    ``mamba_inner_norms``: None (default) or False: the Mamba-1 mixer as in mamba_ssm; True: RMSNorms (eps
    ``norm_eps``) on its dt, B and C right after ``x_proj`` (``dt_layernorm``, ``b_layernorm``, ``c_layernorm``),
    as in Jamba. Refused when no layer is a Mamba-1 layer. ``moe_renormalize``: see ``MoESettings.renormalize``.

    ``ssm="mamba3"`` (or ``layer_overrides={i: {"mixer": "mamba3", "options": {...}}}``) selects Mamba-3
    (seqlab.mixers.mamba3): it uses ``d_state`` (128 by default), ``expand``, ``headdim``, ``ngroups`` (the B/C
    groups), ``chunk_size`` and ``dt_min``/``dt_max``/``dt_init_floor``, plus the ``mamba3_*`` fields (see
    ``Mamba3Settings``; refused when no layer is a Mamba-3 layer).
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
    moe_experts: int | None = None
    moe_top_k: int | None = None
    moe_d_expert: int | None = None
    moe_capacity_factor: float | None = None
    moe_jitter: float | None = None
    moe_balance_weight: float | None = None
    moe_z_weight: float | None = None
    moe_every: int | None = None
    moe_renormalize: bool | None = None
    mamba_inner_norms: bool | None = None
    attn_heads: int | None = None
    attn_kv_heads: int | None = None
    attn_head_dim: int | None = None
    attn_rope_theta: float | None = None
    attn_rope_dim: int | None = None
    attn_rope_scaling: Mapping[str, Any] | None = None
    attn_window: int | None = None
    attn_bias: bool | None = None
    attn_out_bias: bool | None = None
    mamba3_rope_fraction: float | None = None
    mamba3_A_floor: float | None = None
    mamba3_outproj_norm: bool | None = None
    mamba3_mimo_rank: int | None = None
    mamba3_A_activation: str | None = None
    layer_overrides: Mapping[int, LayerOverride] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_DIM:
                raise ConfigError(f"BackboneConfig.{name} must be a positive int (at most {MAX_DIM}), got {value!r}")

        def number(name: str, positive: bool = True) -> None:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or (value <= 0 if positive else value < 0)
            ):
                raise ConfigError(
                    f"BackboneConfig.{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
                )

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"BackboneConfig.{name} must be true or false, got {getattr(self, name)!r}")

        for name in ("d_model", "n_layer", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            positive_int(name)
        if not isinstance(self.ssm, str) or self.ssm not in SSM_KINDS:
            raise ConfigError(f"BackboneConfig.ssm must be one of {SSM_KINDS}, got {self.ssm!r}")
        if self.d_state is None:
            object.__setattr__(self, "d_state", 16 if self.ssm == "mamba1" else 128)
        positive_int("d_state")
        if isinstance(self.dt_rank, str) and self.dt_rank == "auto":
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        positive_int("dt_rank")
        number("norm_eps")
        for name in ("residual_in_fp32", "bidirectional", "conv_bias", "proj_bias"):
            flag(name)
        if not isinstance(self.bidirectional_combine, str) or self.bidirectional_combine not in BIDIRECTIONAL_COMBINE:
            raise ConfigError(
                f"BackboneConfig.bidirectional_combine must be one of {BIDIRECTIONAL_COMBINE}, "
                f"got {self.bidirectional_combine!r}"
            )
        for name in ("dt_min", "dt_max"):
            number(name)
        number("dt_init_floor", positive=False)
        if not (0 < self.dt_min <= self.dt_max):
            raise ConfigError(f"BackboneConfig needs 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")
        pair = self.A_init_range
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in pair)
        ):
            raise ConfigError(f"BackboneConfig.A_init_range must be two finite numbers, got {pair!r}")
        lo, hi = pair
        if not (0 < lo <= hi):
            raise ConfigError(f"BackboneConfig.A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")
        object.__setattr__(self, "A_init_range", (float(lo), float(hi)))
        if self.ffn is not None and not isinstance(self.ffn, str):
            raise ConfigError(f"BackboneConfig.ffn must be a feed-forward kind name or None, got {self.ffn!r}")
        if self.d_ffn is not None:
            positive_int("d_ffn")
        for name in ("moe_experts", "moe_top_k", "moe_d_expert", "moe_every"):
            if getattr(self, name) is not None:
                positive_int(name)
        for name, positive in (
            ("moe_capacity_factor", True),
            ("moe_jitter", False),
            ("moe_balance_weight", False),
            ("moe_z_weight", False),
        ):
            if getattr(self, name) is not None:
                number(name, positive=positive)
        for name in ("moe_renormalize", "mamba_inner_norms"):
            if getattr(self, name) is not None:
                flag(name)
        if self.moe_jitter is not None and self.moe_jitter >= 1:
            raise ConfigError(f"BackboneConfig.moe_jitter must be in [0, 1), got {self.moe_jitter!r}")
        if self.moe_every is not None and self.ffn != "moe":
            raise ConfigError(
                f"BackboneConfig.moe_every is set ({self.moe_every}) but ffn is {self.ffn!r}: moe_every picks which "
                "layers of an ffn='moe' model get an MoE"
            )
        if self.moe_every is not None and self.moe_every > self.n_layer:
            raise ConfigError(
                f"BackboneConfig.moe_every is {self.moe_every}, more than n_layer ({self.n_layer}): no layer would "
                "be an MoE layer"
            )
        if not isinstance(self.layer_overrides, Mapping):
            raise ConfigError(
                f"BackboneConfig.layer_overrides must be a mapping of layer index to override, got "
                f"{type(self.layer_overrides).__name__}"
            )

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
                    raise ConfigError(f"layer_overrides[{key}] has unknown fields {sorted(unknown, key=str)}")
                value = LayerOverride(**value)
            if isinstance(value, LayerOverride):
                for name in ("mixer", "ffn"):
                    if getattr(value, name) is not None and not isinstance(getattr(value, name), str):
                        raise ConfigError(
                            f"layer_overrides[{key}].{name} must be a kind name or None, got {getattr(value, name)!r}"
                        )
                if not isinstance(value.options, Mapping) or not all(isinstance(k, str) for k in value.options):
                    raise ConfigError(
                        f"layer_overrides[{key}].options must be a mapping of setting names to values, "
                        f"got {value.options!r}"
                    )
            if not isinstance(value, LayerOverride):
                raise ConfigError(
                    f"layer_overrides[{key}] must be a LayerOverride or a dict, got {type(value).__name__}"
                )
            overrides[key] = value
        object.__setattr__(self, "layer_overrides", dict(sorted(overrides.items())))
        # Shape checks that need the resolved per-layer kinds.
        for i in range(self.n_layer):
            self.validate_layer(i)
        self._check_moe()
        self._check_attention()
        self._check_mamba3()
        if self.mamba_inner_norms is not None and not any(
            self.layer_spec(i)[0] == "mamba1" for i in range(self.n_layer)
        ):
            raise ConfigError(
                "BackboneConfig.mamba_inner_norms is set but no layer is a Mamba-1 layer: it applies only to "
                "mixer 'mamba1'"
            )

    def _attention_fields_given(self) -> list[str]:
        return [name for name in ATTN_FIELDS if getattr(self, name) is not None]

    def _check_attention(self) -> None:
        attn_layers = [i for i in range(self.n_layer) if self.layer_spec(i)[0] == "attention"]
        given = self._attention_fields_given()
        if not attn_layers:
            if given:
                raise ConfigError(
                    f"BackboneConfig.{given[0]} is set but no layer is an attention layer: the attn_* fields apply "
                    "only with ssm='attention' or a layer_overrides entry with mixer='attention'"
                )
            return
        for i in attn_layers:
            self.attention_settings(i)  # raises ConfigError naming the field

    def _check_mamba3(self) -> None:
        layers = [i for i in range(self.n_layer) if self.layer_spec(i)[0] == "mamba3"]
        if not layers:
            given = [name for name in MAMBA3_FIELDS if getattr(self, name) is not None]
            if given:
                raise ConfigError(
                    f"BackboneConfig.{given[0]} is set but no layer is a Mamba-3 layer: the mamba3_* fields apply "
                    "only with ssm='mamba3' or a layer_overrides entry with mixer='mamba3'"
                )
            return
        if self.ssm == "mamba3":
            self.mamba3_settings()  # the config-level values, checked even if every layer overrides them

    def mamba3_settings(self, index: int | None = None) -> Mamba3Settings:
        """Layer ``index``'s Mamba-3 settings (the config's fields, then that layer's options), with the defaults
        filled in and every value checked (ConfigError naming the field)."""
        values = {name: getattr(self, name) for name in (*MAMBA3_SHARED_FIELDS, *MAMBA3_FIELDS)}
        where = "BackboneConfig"
        if index is not None:
            kind, _, options = self.layer_spec(index)
            if kind != "mamba3":
                raise ConfigError(f"layer {index} is a {kind!r} layer, not a Mamba-3 layer: it has no Mamba-3 settings")
            values.update({k: v for k, v in options.items() if k in values})
            if index in self.layer_overrides:
                where = f"layer {index}"
        return Mamba3Settings.resolve(self.d_model, values, where)

    def with_layer_options(self, kind: str, options: Mapping[str, Any]) -> BackboneConfig:
        """This config as one layer of mixer ``kind`` with ``options`` sees it: the options replace fields, and the
        other layers' kinds and attention fields drop out (a Mamba layer's options never mean attention)."""
        cleared: dict[str, Any] = {name: None for name in ATTN_FIELDS if name not in options}
        if kind != "mamba1" and "mamba_inner_norms" not in options:
            cleared["mamba_inner_norms"] = None
        if kind != "mamba3":
            cleared.update({name: None for name in MAMBA3_FIELDS if name not in options})
        return dataclasses.replace(self, ssm=kind, layer_overrides={}, **cleared, **options)

    def attention_settings(self, index: int | None = None) -> AttentionSettings:
        """Layer ``index``'s attention settings (the config's attn_* fields, then that layer's options), with the
        defaults filled in and every value checked."""
        values = {name: getattr(self, name) for name in ATTN_FIELDS}
        where = "BackboneConfig"
        if index is not None:
            _, _, options = self.layer_spec(index)
            unknown = sorted(set(options) - set(ATTN_FIELDS))
            if unknown and self.layer_spec(index)[0] == "attention":
                raise ConfigError(
                    f"layer {index}: bad options {unknown} for mixer 'attention': it takes the attn_* fields "
                    f"{list(ATTN_FIELDS)}"
                )
            values.update({k: v for k, v in options.items() if k in ATTN_FIELDS})
            if index in self.layer_overrides:
                where = f"layer {index}"
        return AttentionSettings.resolve(self.d_model, values, where)

    def _check_moe(self) -> None:
        moe_layers = [i for i in range(self.n_layer) if self.layer_spec(i)[1] == "moe"]
        if not moe_layers:
            given = [name for name in MOE_FIELDS if getattr(self, name) is not None]
            if given:
                raise ConfigError(
                    f"BackboneConfig.{given[0]} is set but no layer has an MoE feed-forward: the moe_* fields apply "
                    "only with ffn='moe' (or a layer_overrides entry with ffn='moe')"
                )
            return
        settings = self.moe_settings()
        if settings.top_k > settings.experts:
            raise ConfigError(
                f"BackboneConfig.moe_top_k is {settings.top_k}, more than moe_experts ({settings.experts}): each "
                "token picks top_k distinct experts"
            )
        if settings.renormalize is True and settings.top_k == 1:
            raise ConfigError(
                "BackboneConfig.moe_renormalize is True with moe_top_k 1: renormalising one probability makes every "
                "gate 1 and cuts the router off from the task loss; leave it None (or False) for top-1"
            )

    # ----------------------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    def layer_spec(self, index: int) -> tuple[str, str | None, dict[str, Any]]:
        """(mixer kind, ffn kind or None, mixer options) for layer ``index``."""
        default_ffn = self.ffn
        if default_ffn == "moe" and (index + 1) % (self.moe_every or 1):
            default_ffn = "mlp"  # MoE on every moe_every-th layer, dense feed-forwards between
        override = self.layer_overrides.get(index)
        if override is None:
            return self.ssm, default_ffn, {}
        mixer = override.mixer or self.ssm
        ffn = override.ffn if override.ffn is not None else default_ffn
        return mixer, (None if ffn == "none" else ffn), dict(override.options)

    @property
    def d_ffn_resolved(self) -> int:
        """The dense feed-forward width: ``d_ffn``, or 8/3 * d_model rounded up to a multiple of 64."""
        return self.d_ffn or 64 * ((8 * self.d_model // 3 + 63) // 64)

    def moe_settings(self) -> MoESettings:
        """The MoE layers' settings with the defaults filled in (see ``MoESettings``)."""
        defaults = MoESettings(experts=8, top_k=1, d_expert=self.d_ffn_resolved)
        values = {
            name: getattr(self, "moe_" + name)
            for name in (f.name for f in dataclasses.fields(MoESettings))
            if getattr(self, "moe_" + name) is not None
        }
        return dataclasses.replace(defaults, **values)

    def validate_layer(self, index: int) -> None:
        mixer, _, options = self.layer_spec(index)
        if mixer == "mamba3":
            unknown = sorted(set(options) - set(MAMBA3_SHARED_FIELDS) - set(MAMBA3_FIELDS) - {"norm_eps"})
            if unknown:
                raise ConfigError(
                    f"layer {index}: bad options {unknown} for mixer 'mamba3': it takes "
                    f"{[*MAMBA3_SHARED_FIELDS, *MAMBA3_FIELDS, 'norm_eps']}"
                )
            self.mamba3_settings(index)
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
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneConfig:
        """A config from ``to_dict``'s output (e.g. read from a file); every key and value is checked."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"BackboneConfig.from_dict needs a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"BackboneConfig has no fields {sorted(map(str, unknown))}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"BackboneConfig needs the fields {missing}")
        data = dict(data)
        if isinstance(data.get("A_init_range"), list):
            data["A_init_range"] = tuple(data["A_init_range"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the state and its meaning (not the weights, not init ranges,
        not the MoE training-only settings; an unset moe_*, attn_*, mamba3_* or mamba_inner_norms field leaves the
        hash as it was before those fields existed)."""
        arch = {
            k: v
            for k, v in self.to_dict().items()
            if k not in _INIT_ONLY
            and k not in _TRAIN_ONLY
            and not (
                (k in MOE_FIELDS or k in ATTN_FIELDS or k in MAMBA3_FIELDS or k == "mamba_inner_norms") and v is None
            )
        }
        text = json.dumps(arch, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: the attention fields of BackboneConfig (all None unless a layer is an attention layer)
ATTN_FIELDS = (
    "attn_heads",
    "attn_kv_heads",
    "attn_head_dim",
    "attn_rope_theta",
    "attn_rope_dim",
    "attn_rope_scaling",
    "attn_window",
    "attn_bias",
    "attn_out_bias",
)

#: the Mamba-3 fields of BackboneConfig (all None unless a layer is a Mamba-3 layer; None = the default)
MAMBA3_FIELDS = (
    "mamba3_rope_fraction",
    "mamba3_A_floor",
    "mamba3_outproj_norm",
    "mamba3_mimo_rank",
    "mamba3_A_activation",
)
#: the activations of Mamba-3's data-dependent rate (BackboneConfig.mamba3_A_activation)
MAMBA3_A_ACTIVATIONS = ("heavy_tail", "softplus")
#: the shared fields a Mamba-3 layer reads (and a mamba3 layer's options may override)
MAMBA3_SHARED_FIELDS = ("d_state", "expand", "headdim", "ngroups", "chunk_size", "dt_min", "dt_max", "dt_init_floor")

# Fields that only shape the random initialisation, not what a trained model computes.
_INIT_ONLY = frozenset({"dt_min", "dt_max", "dt_init_floor", "A_init_range"})
#: the MoE fields of BackboneConfig (all None unless a layer is an MoE layer)
MOE_FIELDS = (
    "moe_experts",
    "moe_top_k",
    "moe_d_expert",
    "moe_capacity_factor",
    "moe_jitter",
    "moe_balance_weight",
    "moe_z_weight",
    "moe_every",
    "moe_renormalize",
)
# MoE settings that act only while training (capacity drops, jitter, auxiliary losses).
_TRAIN_ONLY = frozenset({"moe_capacity_factor", "moe_jitter", "moe_balance_weight", "moe_z_weight"})
