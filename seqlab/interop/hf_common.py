"""What the transformer-style HF families share (``hf_llama``: Llama; ``hf_hybrid``: Jamba, Bamba): the
tensor name map, the fused <-> split weights, rotary settings both ways, building the model from checked
tensors and writing a directory. ``seqlab.interop.hf.load`` / ``save`` dispatch here; see docs/interop-hybrid.md.

These families lay a layer out the same way (``model.layers.{i}.input_layernorm``, the mixer under
``self_attn`` or ``mamba``, a feed-forward norm and a feed-forward), so one map serves all three; a ``Family``
names the parts that differ and maps the config.

=====================================================  ============================================
seqlab ``LanguageModel``                                 HF ``*ForCausalLM``
=====================================================  ============================================
embeddings.weight                                        model.embed_tokens.weight
backbone.layers.{i}.norm.weight                          model.layers.{i}.input_layernorm.weight
backbone.layers.{i}.mixer.* (attention)                  model.layers.{i}.self_attn.*
backbone.layers.{i}.mixer.* (Mamba-1 / Mamba-2)          model.layers.{i}.mamba.*
backbone.layers.{i}.ffn_norm.weight                      ...post_attention_layernorm / pre_ff_layernorm
backbone.layers.{i}.ffn.gate_up.weight (rows gate|up)    ...{mlp|feed_forward}.gate_proj + up_proj
backbone.layers.{i}.ffn.down.weight                      ...down_proj.weight
backbone.layers.{i}.ffn.router.weight (MoE)              model.layers.{i}.feed_forward.router.weight
backbone.layers.{i}.ffn.gate_up (E, 2f, d) (MoE)         ...experts.{e}.gate_proj/up_proj.weight (or the
backbone.layers.{i}.ffn.down (E, d, f) (MoE)             fused experts.gate_up_proj / down_proj)
backbone.norm_f.weight                                   model.norm.weight / model.final_layernorm.weight
lm_head.weight                                           lm_head.weight (absent when tied)
=====================================================  ============================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqlab.config import ROPE_SCALING_TYPES, AttentionSettings, BackboneConfig
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.interop.hf import (
    DEFAULT_MAX_SHARD_SIZE,
    _as_bool,
    _as_float,
    _as_int,
    _decode_float,
    _resolve_dtype,
    write_directory,
)
from seqlab.models import LanguageModel

Tensors = list[torch.Tensor]


# ==================================================================================================
# config helpers
# ==================================================================================================
def merged(defaults: Mapping[str, Any], hf_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """config.json over the class defaults (transformers may leave defaults out; a null takes the default)."""
    if not isinstance(hf_config, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(hf_config).__name__}")
    return {**defaults, **{k: v for k, v in hf_config.items() if v is not None or k not in defaults}}


def as_int(cfg: Mapping[str, Any], key: str, where: str) -> int:
    return _as_int(cfg, key, where)


def as_bool(cfg: Mapping[str, Any], key: str, where: str) -> bool:
    return _as_bool(cfg, key, where)


def as_float(cfg: Mapping[str, Any], key: str, where: str) -> float:
    return _as_float(cfg, key, where)


def as_index(cfg: Mapping[str, Any], key: str, where: str) -> int:
    """A non-negative integer (layer offsets)."""
    value = cfg[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key} must be a non-negative integer, got {value!r}")
    return value


def require_silu(cfg: Mapping[str, Any], where: str, what: str) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act is {cfg['hidden_act']!r}; seqlab's {what} use 'silu' only")


def refuse_true(cfg: Mapping[str, Any], key: str, where: str, why: str) -> None:
    if key in cfg and cfg[key] is not None and cfg[key] is not False:
        raise ConfigError(f"{where}: {key} is {cfg[key]!r}; {why}")


def attention_heads(cfg: Mapping[str, Any], where: str) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) as transformers' LlamaAttention reads them."""
    hidden = as_int(cfg, "hidden_size", where)
    heads = as_int(cfg, "num_attention_heads", where)
    kv = heads if cfg.get("num_key_value_heads") is None else as_int(cfg, "num_key_value_heads", where)
    if heads % kv:
        raise ConfigError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    head_dim = as_int(cfg, "head_dim", where) if cfg.get("head_dim") is not None else hidden // heads
    if head_dim <= 0:
        raise ConfigError(f"{where}: hidden_size {hidden} / num_attention_heads {heads} gives no head_dim")
    return heads, kv, head_dim


def rope_from_hf(
    cfg: Mapping[str, Any], where: str, head_dim: int, default_partial: float, allow_partial: bool
) -> dict[str, Any]:
    """attn_rope_theta / attn_rope_dim / attn_rope_scaling from transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling`` (which wins when both are there, as in transformers)."""
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = cfg.get(key) or {}
    if not isinstance(rope, Mapping):
        raise ConfigError(f"{where}: {key} must be an object, got {rope!r}")
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    theta = 10000.0 if theta is None else _decode_float(theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise ConfigError(f"{where}: {key}.rope_theta must be a finite number > 1, got {theta!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling: dict[str, Any] | None = None
    if kind in ROPE_SCALING_TYPES:
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
        scaling["rope_type"] = kind
        if kind == "llama3":
            original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
            scaling["original_max_position_embeddings"] = original or cfg.get("max_position_embeddings")
        scaling = {k: v for k, v in scaling.items() if k != "attention_factor"}  # unused by linear / llama3
    elif kind != "default":
        raise ConfigError(
            f"{where}: {key} has rope_type {kind!r}; seqlab implements 'default', "
            + ", ".join(repr(t) for t in ROPE_SCALING_TYPES)
        )
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_partial))
    partial = _decode_float(partial)
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise ConfigError(f"{where}: partial_rotary_factor must be in (0, 1], got {partial!r}")
    if partial != 1 and not allow_partial:
        raise ConfigError(
            f"{where}: partial_rotary_factor is {partial!r}; this model's transformers class rotates the whole head "
            f"(partial rotary is not defined for it)"
        )
    rope_dim = int(head_dim * partial)
    if rope_dim % 2:
        raise ConfigError(
            f"{where}: partial_rotary_factor {partial} of head_dim {head_dim} gives an odd rotary width {rope_dim}"
        )
    return {"attn_rope_theta": float(theta), "attn_rope_dim": rope_dim, "attn_rope_scaling": scaling}


def rope_to_hf(settings: AttentionSettings, partial: float | None) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` for these settings (``partial``: written when not None)."""
    out: dict[str, Any] = {"rope_theta": settings.rope_theta, "rope_type": "default"}
    if settings.rope_scaling is not None:
        out.update(dict(settings.rope_scaling))
    if partial is not None:
        out["partial_rotary_factor"] = partial
    return out


def build_config(fields: dict[str, Any], where: str) -> BackboneConfig:
    try:
        return BackboneConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{where}: maps to an invalid seqlab config: {exc}") from None


# ==================================================================================================
# what a seqlab config can be saved as
# ==================================================================================================
def hf_family_of(config: BackboneConfig) -> str | None:
    """The model_type of the transformers family that represents ``config`` ("llama", "jamba", "bamba"), or
    None for a plain Mamba / Mamba-2 stack (``seqlab.interop.hf``'s own path). ``ConfigError`` naming the field
    for a stack no transformers family represents."""
    specs = [config.layer_spec(i) for i in range(config.n_layer)]
    kinds = {kind for kind, _, _ in specs}
    ffns = {ffn for _, ffn, _ in specs}
    if (
        config.ssm in ("mamba1", "mamba2")
        and not config.layer_overrides
        and config.ffn is None
        and not config.mamba_inner_norms
    ):
        return None
    what = []
    if config.ffn is not None:
        what.append(f"ffn={config.ffn!r}")
    if config.layer_overrides:
        what.append(f"layer_overrides {sorted(config.layer_overrides)}")
    if config.ssm == "attention":
        what.append("ssm='attention'")
    if config.mamba_inner_norms:
        what.append("mamba_inner_norms=True")
    reason = ", ".join(what)
    if config.bidirectional:
        raise ConfigError("bidirectional=True: transformers' causal LMs are causal only; cannot save as HF")
    if "mamba3" in kinds:
        layers = [i for i, (kind, _, _) in enumerate(specs) if kind == "mamba3"]
        raise ConfigError(
            f"Mamba-3 layers ({', '.join(map(str, layers))}): transformers has no Mamba-3 model, so this stack cannot "
            "be saved as an HF directory; save it with model.save_pretrained(DIR) (seqlab's own directory format) "
            "or seqlab.checkpoint.save_model"
        )
    if {"mamba1", "mamba2"} <= kinds:
        raise ConfigError(
            f"{reason}: this stack mixes Mamba-1 and Mamba-2 layers; no transformers model does, cannot save as HF"
        )
    if "mamba1" in kinds:
        if not config.mamba_inner_norms:
            raise ConfigError(
                f"{reason}: a Mamba-1 stack with feed-forwards or attention layers is, in transformers, "
                "JambaForCausalLM, whose Mamba-1 mixers normalise dt, B and C (mamba_inner_norms=True); this "
                "model's have no such norms, so it cannot be saved as HF"
            )
        return "jamba"
    if "mamba2" in kinds:
        return "bamba"
    if "moe" in ffns:
        return "jamba"  # attention only, with MoE layers: Jamba with attention on every layer
    return "llama"


def families() -> dict[str, Family]:
    """model_type -> Family for the families of ``hf_llama`` and ``hf_hybrid``."""
    from seqlab.interop.hf_hybrid import BAMBA, JAMBA  # they import this module
    from seqlab.interop.hf_llama import LLAMA

    return {family.model_type: family for family in (LLAMA, JAMBA, BAMBA)}


def family_for(hf_config: Any, where: str) -> Family | None:
    """The family that loads ``hf_config`` (by model_type, else by architectures), or None (Mamba, Mamba-2 and
    unknown types are ``seqlab.interop.hf``'s to load or refuse). A model_type whose architectures name another
    class is refused, naming both."""
    if not isinstance(hf_config, Mapping):
        return None
    known = families()
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type is None:
        by_class = {f.architecture: f for f in known.values()}
        return next((by_class[a] for a in architectures if a in by_class), None)
    family = known.get(model_type)
    if family is not None and architectures and family.architecture not in architectures:
        raise ConfigError(
            f"{where}: model_type is {model_type!r} but architectures is {architectures}; seqlab loads "
            f"model_type {model_type!r} as {family.architecture}"
        )
    return family


def family_of_config(config: BackboneConfig) -> Family | None:
    """The family ``save`` writes ``config`` as (see ``hf_family_of``), or None for a plain Mamba stack."""
    name = hf_family_of(config)
    return None if name is None else families()[name]


def check_saveable(config: BackboneConfig, dtype: torch.dtype, family: str) -> None:
    """What every family needs: one setting per kind of layer, and no fp32 residual on a non-fp32 model."""
    for i, override in config.layer_overrides.items():
        if override.options:
            raise ConfigError(
                f"layer_overrides[{i}].options {dict(override.options)}: {family} layers of one kind share one "
                f"setting in transformers; cannot save per-layer options as HF"
            )
    if config.residual_in_fp32 and dtype != torch.float32:
        raise ConfigError(
            f"residual_in_fp32=True with {dtype} weights: transformers' {family} adds the residual in the model's "
            f"dtype; set residual_in_fp32=False (or save in float32) to save as HF"
        )


def check_attention_saveable(config: BackboneConfig, family: str) -> AttentionSettings | None:
    """The attention layers' settings (None without attention layers), refusing what ``family`` lacks."""
    layers = [i for i in range(config.n_layer) if config.layer_spec(i)[0] == "attention"]
    if not layers:
        return None
    s = config.attention_settings(layers[0])
    if s.window is not None:
        raise ConfigError(f"attn_window={s.window}: transformers' {family} attention has no sliding window")
    if s.bias != s.out_bias:
        raise ConfigError(
            f"attn_bias={s.bias} but attn_out_bias={s.out_bias}: transformers' {family} has one attention_bias "
            "for q/k/v and o_proj"
        )
    if config.d_model % s.heads:
        raise ConfigError(
            f"attn_heads={s.heads} does not divide d_model={config.d_model}: transformers' {family} config requires "
            "hidden_size % num_attention_heads == 0"
        )
    return s


def layer_pattern(layers: list[int], n_layer: int, what: str) -> tuple[int, int]:
    """(period, offset) with ``i % period == offset`` exactly for i in ``layers`` (Jamba's layout)."""
    wanted = set(layers)
    for period in range(1, n_layer + 2):
        for offset in range(period):
            if {i for i in range(n_layer) if i % period == offset} == wanted:
                return period, offset
    raise ConfigError(
        f"{what} layers {sorted(wanted)} are not one residue class i % period == offset; transformers' Jamba "
        "places them that way only, so this layout cannot be saved as HF"
    )


# ==================================================================================================
# tensor names
# ==================================================================================================
@dataclass(frozen=True)
class Recipe:
    """How one seqlab tensor is made of HF tensors (``join``) and split back into them (``split``)."""

    hf_names: tuple[str, ...]
    join: Callable[[Tensors], torch.Tensor]
    split: Callable[[torch.Tensor], Tensors]


def _one(name: str) -> Recipe:
    return Recipe((name,), lambda ts: ts[0], lambda t: [t])


def _gate_up(gate: str, up: str) -> Recipe:
    return Recipe((gate, up), lambda ts: torch.cat(ts, 0), lambda t: list(t.chunk(2, 0)))


def _experts_gate_up(prefix: str, experts: int) -> Recipe:
    names = tuple(f"{prefix}.experts.{e}.{part}_proj.weight" for e in range(experts) for part in ("gate", "up"))
    return Recipe(
        names,
        lambda ts: torch.stack([torch.cat(ts[2 * e : 2 * e + 2], 0) for e in range(experts)]),
        lambda t: [half for e in range(experts) for half in t[e].chunk(2, 0)],
    )


def _experts_down(prefix: str, experts: int) -> Recipe:
    names = tuple(f"{prefix}.experts.{e}.down_proj.weight" for e in range(experts))
    return Recipe(names, lambda ts: torch.stack(ts), lambda t: list(t.unbind(0)))


@dataclass(frozen=True)
class Names:
    """The HF names that differ between families."""

    ffn: str  # "mlp" (Llama) or "feed_forward" (Jamba, Bamba)
    ffn_norm: str  # "post_attention_layernorm" or "pre_ff_layernorm"
    final_norm: str  # "model.norm.weight" or "model.final_layernorm.weight"


def recipe_for(name: str, config: BackboneConfig, names: Names, fused_experts: bool) -> Recipe:
    """The HF recipe of seqlab tensor ``name`` (``fused_experts``: transformers 5's in-memory expert tensors)."""
    if name == "embeddings.weight":
        return _one("model.embed_tokens.weight")
    if name == "lm_head.weight":
        return _one("lm_head.weight")
    if name == "backbone.norm_f.weight":
        return _one(names.final_norm)
    prefix, index, rest = name.split(".", 3)[1:]
    if prefix != "layers" or not index.isdigit():  # pragma: no cover - every backbone tensor is in a layer
        raise ConfigError(f"no HF name for {name}")
    i = int(index)
    hf = f"model.layers.{i}"
    part, _, tail = rest.partition(".")
    if part == "norm":
        return _one(f"{hf}.input_layernorm.{tail}")
    if part == "ffn_norm":
        return _one(f"{hf}.{names.ffn_norm}.{tail}")
    if part == "mixer":
        mixer = "self_attn" if config.layer_spec(i)[0] == "attention" else "mamba"
        return _one(f"{hf}.{mixer}.{tail}")
    if part == "ffn":
        ff = f"{hf}.{names.ffn}"
        if tail == "gate_up.weight":
            return _gate_up(f"{ff}.gate_proj.weight", f"{ff}.up_proj.weight")
        if tail == "down.weight":
            return _one(f"{ff}.down_proj.weight")
        if tail == "router.weight":
            return _one(f"{ff}.router.weight")
        experts = config.moe_settings().experts
        if tail == "gate_up":
            return _one(f"{ff}.experts.gate_up_proj") if fused_experts else _experts_gate_up(ff, experts)
        if tail == "down":
            return _one(f"{ff}.experts.down_proj") if fused_experts else _experts_down(ff, experts)
    raise ConfigError(f"no HF name for seqlab tensor {name}")  # pragma: no cover - a new parameter kind


# ==================================================================================================
# load
# ==================================================================================================
def build(
    config: BackboneConfig,
    vocab_size: int,
    tie: bool,
    names: Names,
    hf_tensors: Mapping[str, torch.Tensor],
    dtype,
    where: str,
    copy: bool,
) -> LanguageModel:
    """The model ``config`` describes, with ``hf_tensors`` checked against it (names, shapes) and put in."""
    if hf_tensors and not any(k.startswith("model.") for k in hf_tensors):  # a bare *Model in memory
        hf_tensors = {f"model.{k}": v for k, v in hf_tensors.items()}
    fused = any(k.endswith(".experts.gate_up_proj") for k in hf_tensors)
    with torch.device("meta"):
        model = LanguageModel(config, vocab_size=vocab_size, tie_embeddings=tie)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    used: set[str] = set()
    missing: list[str] = []
    problems: list[str] = []
    mapped: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        if tie and name == "lm_head.weight":
            continue
        recipe = recipe_for(name, config, names, fused)
        absent = [n for n in recipe.hf_names if n not in hf_tensors]
        if absent:
            missing.extend(absent)
            continue
        parts = [hf_tensors[n] for n in recipe.hf_names]
        used.update(recipe.hf_names)
        label = recipe.hf_names[0] if len(recipe.hf_names) == 1 else " + ".join(recipe.hf_names[:2]) + " ..."
        if any(p.is_meta for p in parts):
            problems.append(f"{label} is on the meta device (offloaded?); load the model's weights first")
            continue
        if any(not p.dtype.is_floating_point for p in parts):
            problems.append(f"{label} has dtype {parts[0].dtype}, expected a floating-point tensor")
            continue
        try:
            tensor = recipe.join([p.detach() for p in parts]) if len(parts) > 1 else parts[0].detach()
        except RuntimeError:
            shapes = ", ".join(f"{n} {tuple(hf_tensors[n].shape)}" for n in recipe.hf_names[:4])
            problems.append(f"shapes do not fit together for {name}: {shapes}")
            continue
        if tuple(tensor.shape) != shape:
            problems.append(f"{label} gives shape {tuple(tensor.shape)}, expected {shape}")
            continue
        mapped[name] = tensor

    if tie and "lm_head.weight" in hf_tensors:
        head, embeddings = hf_tensors["lm_head.weight"], hf_tensors.get("model.embed_tokens.weight")
        used.add("lm_head.weight")
        if (
            embeddings is not None
            and head is not embeddings
            and not head.is_meta
            and (head.shape != embeddings.shape or not torch.equal(head.to(embeddings.dtype), embeddings))
        ):
            raise CorruptFileError(
                f"{where}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                f"set tie_word_embeddings to false to load a separate LM head"
            )
    unexpected = sorted(set(hf_tensors) - used)
    if missing:
        problems.insert(0, f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.insert(1 if missing else 0, f"unexpected tensors: {', '.join(unexpected)}")
    if problems:
        raise CorruptFileError(
            f"{where} does not match its config ({config.n_layer} layers, d_model {config.d_model}): "
            + "; ".join(problems)
        )

    dtype = _resolve_dtype(dtype, mapped["embeddings.weight"].dtype)
    if tie:
        mapped["lm_head.weight"] = mapped["embeddings.weight"]
    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for pname, meta_param in list(module._parameters.items()):
            if meta_param is None:
                continue
            new = made.get(id(meta_param))  # tied parameters are one object: keep them one
            if new is None:
                full = f"{module_name}.{pname}" if module_name else pname
                data = mapped[full].to(dtype=dtype, copy=copy).contiguous()
                new = nn.Parameter(data, requires_grad=meta_param.requires_grad)
                new.__dict__.update(meta_param.__dict__)  # markers such as _no_weight_decay
                made[id(meta_param)] = new
            module._parameters[pname] = new
    # non-persistent buffers (the rotary frequencies) were made on the meta device: compute them again
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                _rebuild_buffer(module, bname)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover - every parameter is in `expected`
        raise CorruptFileError(f"{where}: no data for {leftover}")
    device = mapped["embeddings.weight"].device
    return model.to(device).eval()


def _rebuild_buffer(module: nn.Module, name: str) -> None:
    from seqlab.mixers.attention import AttentionMixer, rope_inverse_frequencies

    if isinstance(module, AttentionMixer) and name == "inv_freq":
        module._buffers[name] = rope_inverse_frequencies(module.settings).float()
        return
    raise CorruptFileError(f"{type(module).__name__}.{name}: no way to rebuild this buffer")  # pragma: no cover


# ==================================================================================================
# save
# ==================================================================================================
def hf_tensors_of(model: LanguageModel, names: Names) -> dict[str, torch.Tensor]:
    """``model``'s tensors under their HF names (per-expert MoE tensors, as transformers writes them)."""
    tied = model.lm_head.weight is model.embeddings.weight
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # transformers re-ties it from tie_word_embeddings; safetensors refuses shared storage
        recipe = recipe_for(name, model.config, names, fused_experts=False)
        for hf_name, part in zip(recipe.hf_names, recipe.split(tensor.detach().to("cpu")), strict=True):
            out[hf_name] = part.contiguous().clone() if len(recipe.hf_names) > 1 else part.contiguous()
    return out


def write(
    model: LanguageModel,
    path: str | os.PathLike,
    hf_config: dict[str, Any],
    names: Names,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write config.json + model.safetensors (or shards + index past ``max_shard_size``) at ``path``, with
    ``seqlab.interop.hf.write_directory`` (temporaries first, config.json last)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a directory")
    return write_directory(folder, hf_tensors_of(model, names), hf_config, max_shard_size)


@dataclass(frozen=True)
class Family:
    """One transformers family: its names, and its config both ways."""

    model_type: str
    architecture: str
    names: Names
    config_from_hf: Callable[[Mapping[str, Any], str], tuple[BackboneConfig, int, bool]]
    config_to_hf: Callable[[LanguageModel], dict[str, Any]]

    def load(self, hf_config: Mapping[str, Any], tensors, dtype, where: str, weights_where: str, copy: bool):
        config, vocab_size, tie = self.config_from_hf(hf_config, where)
        return build(config, vocab_size, tie, self.names, tensors, dtype, weights_where, copy)

    def save(
        self, model: LanguageModel, path: str | os.PathLike, max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE
    ) -> Path:
        return write(model, path, self.config_to_hf(model), self.names, max_shard_size)


def common_hf_config(family: Family, model: LanguageModel) -> dict[str, Any]:
    """The keys every family writes the same way."""
    config = model.config
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": model.lm_head.weight is model.embeddings.weight,
        "dtype": str(model.embeddings.weight.dtype).removeprefix("torch."),
    }
