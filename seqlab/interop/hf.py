"""Hugging Face transformers interop: load ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` into a seqlab
``LanguageModel`` and save a ``LanguageModel`` as a directory that transformers loads.

``load(path_or_model)`` takes an in-memory transformers model or a local directory with ``config.json`` and
``model.safetensors`` (or a sharded ``model.safetensors.index.json``). Directories are read without
transformers: config.json is parsed here and the weights come from safetensors, never from a pickle.

What maps to what (checked against transformers 5.23's modeling_mamba.py / modeling_mamba2.py):

====================================  ===============================================
HF config (``mamba`` / ``mamba2``)      seqlab ``BackboneConfig``
====================================  ===============================================
hidden_size, num_hidden_layers          d_model, n_layer
state_size, conv_kernel, expand         d_state, d_conv, expand
time_step_rank (Mamba-1)                dt_rank
head_dim, n_groups, chunk_size          headdim, ngroups, chunk_size (Mamba-2)
use_bias, use_conv_bias                 proj_bias, conv_bias
layer_norm_epsilon, residual_in_fp32    norm_eps, residual_in_fp32
time_step_min/max/floor                 dt_min/dt_max/dt_init_floor (initialisation only)
vocab_size, tie_word_embeddings         LanguageModel(vocab_size, tie_embeddings)
====================================  ===============================================

Weights keep their names except the embedding: ``backbone.embeddings.weight`` (or the older
``backbone.embedding.weight``) <-> ``embeddings.weight``; ``backbone.layers.{i}.*``, ``backbone.norm_f.weight``
and ``lm_head.weight`` are the same on both sides, with the same layouts (conv weight (channels, 1, width),
in_proj rows ordered x|z for Mamba-1 and z|xBC|dt for Mamba-2, A_log/D/dt_bias per channel or per head).

Settings seqlab does not compute the same way are refused with a ``ConfigError`` naming the field
(activation other than SiLU, a Mamba-2 ``time_step_limit`` that clamps, ``rms_norm: false``,
``norm_before_gate: true``, an in_proj with Mamba-2's extra parallel-MLP rows), rather than loading a model
that would silently compute something else.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torch import nn

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.io import atomic_write_bytes
from seqlab.models import LanguageModel

__all__ = ["load", "save", "config_from_hf", "config_to_hf"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

_SSM_OF = {"mamba": "mamba1", "mamba2": "mamba2"}
_MODEL_TYPE_OF = {"mamba1": "mamba", "mamba2": "mamba2"}
_ARCHITECTURE_OF = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}

# transformers writes config.json "diffed" against these class defaults, so a missing key means the default.
# (Values of transformers' MambaConfig / Mamba2Config; unchanged from 4.44 to 5.23.)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mamba": {
        "vocab_size": 50280,
        "hidden_size": 768,
        "state_size": 16,
        "num_hidden_layers": 32,
        "layer_norm_epsilon": 1e-5,
        "expand": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "time_step_rank": "auto",
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "tie_word_embeddings": True,
    },
    "mamba2": {
        "num_heads": 128,
        "head_dim": 64,
        "vocab_size": 32768,
        "hidden_size": 4096,
        "state_size": 128,
        "num_hidden_layers": 64,
        "layer_norm_epsilon": 1e-5,
        "expand": 2,
        "conv_kernel": 4,
        "n_groups": 8,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "time_step_limit": (0.0, math.inf),
        "chunk_size": 256,
        "tie_word_embeddings": False,
    },
}

_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan, "inf": math.inf, "-inf": -math.inf}


# ==================================================================================================
# config
# ==================================================================================================
def _decode_float(value: Any) -> Any:
    """transformers >= 5 writes inf as {"__float__": "Infinity"}; older versions write a bare Infinity."""
    if isinstance(value, Mapping) and set(value) == {"__float__"}:
        return _FLOAT_TAGS.get(value["__float__"], value)
    if isinstance(value, str) and value in _FLOAT_TAGS:
        return _FLOAT_TAGS[value]
    return value


def _as_int(cfg: Mapping[str, Any], key: str, where: str) -> int:
    value = cfg[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _as_bool(cfg: Mapping[str, Any], key: str, where: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _as_float(cfg: Mapping[str, Any], key: str, where: str) -> float:
    value = _decode_float(cfg[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def config_from_hf(hf_config: Mapping[str, Any], where: str = "HF config") -> tuple[BackboneConfig, int, bool]:
    """Map a transformers Mamba/Mamba-2 config (as a dict) to ``(BackboneConfig, vocab_size, tie_embeddings)``.

    Raises ``ConfigError`` naming the field for anything seqlab cannot compute the same way.
    """
    if not isinstance(hf_config, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type")
    if model_type not in _SSM_OF:
        raise ConfigError(
            f"{where}: model_type is {model_type!r}; seqlab loads 'mamba' (MambaForCausalLM), "
            f"'mamba2' (Mamba2ForCausalLM), 'llama', 'jamba' and 'bamba'"
        )
    cfg = {
        **_HF_DEFAULTS[model_type],
        **{k: v for k, v in hf_config.items() if v is not None or k not in _HF_DEFAULTS[model_type]},
    }
    ssm = _SSM_OF[model_type]

    if cfg["hidden_act"] != "silu":
        raise ConfigError(f"{where}: hidden_act is {cfg['hidden_act']!r}; seqlab's Mamba mixers use 'silu' only")
    d_model = _as_int(cfg, "hidden_size", where)
    expand = cfg["expand"]
    if isinstance(expand, float) and expand.is_integer():
        expand = int(expand)
    if isinstance(expand, bool) or not isinstance(expand, int) or expand <= 0:
        raise ConfigError(
            f"{where}: expand is {expand!r}; seqlab needs a positive integer expand (intermediate size = "
            f"expand * hidden_size)"
        )
    d_inner = expand * d_model
    if "intermediate_size" in cfg and cfg["intermediate_size"] is not None and cfg["intermediate_size"] != d_inner:
        raise ConfigError(
            f"{where}: intermediate_size is {cfg['intermediate_size']!r} but expand * hidden_size is {d_inner}; "
            f"seqlab (like transformers) uses expand * hidden_size"
        )

    fields: dict[str, Any] = dict(
        d_model=d_model,
        n_layer=_as_int(cfg, "num_hidden_layers", where),
        ssm=ssm,
        d_state=_as_int(cfg, "state_size", where),
        d_conv=_as_int(cfg, "conv_kernel", where),
        expand=expand,
        norm_eps=_as_float(cfg, "layer_norm_epsilon", where),
        residual_in_fp32=_as_bool(cfg, "residual_in_fp32", where),
        conv_bias=_as_bool(cfg, "use_conv_bias", where),
        proj_bias=_as_bool(cfg, "use_bias", where),
        dt_min=_as_float(cfg, "time_step_min", where),
        dt_max=_as_float(cfg, "time_step_max", where),
        dt_init_floor=_as_float(cfg, "time_step_floor", where),
    )
    if fields["norm_eps"] <= 0:
        raise ConfigError(f"{where}: layer_norm_epsilon must be > 0, got {fields['norm_eps']}")

    if ssm == "mamba1":
        rank = cfg["time_step_rank"]
        fields["dt_rank"] = "auto" if rank == "auto" else _as_int(cfg, "time_step_rank", where)
    else:
        num_heads = _as_int(cfg, "num_heads", where)
        head_dim = _as_int(cfg, "head_dim", where)
        n_groups = _as_int(cfg, "n_groups", where)
        if num_heads * head_dim != d_inner:
            raise ConfigError(
                f"{where}: num_heads * head_dim = {num_heads} * {head_dim} = {num_heads * head_dim} must equal "
                f"expand * hidden_size = {d_inner}"
            )
        if num_heads % n_groups:
            raise ConfigError(f"{where}: num_heads ({num_heads}) must be divisible by n_groups ({n_groups})")
        limit = _decode_float(cfg["time_step_limit"])
        if isinstance(limit, (list, tuple)):
            limit = [_decode_float(v) for v in limit]
        ok = (
            isinstance(limit, (list, tuple))
            and len(limit) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)
            and limit[0] <= 0
            and limit[1] == math.inf
        )
        if not ok:
            raise ConfigError(
                f"{where}: time_step_limit is {limit!r}; seqlab does not clamp dt, so only (0.0, inf) (no clamping) "
                f"is supported"
            )
        if cfg.get("rms_norm", True) is not True:
            raise ConfigError(
                f"{where}: rms_norm is {cfg['rms_norm']!r}; seqlab's Mamba-2 always applies the "
                f"gated RMSNorm (rms_norm: true)"
            )
        if cfg.get("norm_before_gate", False) is not False:
            raise ConfigError(
                f"{where}: norm_before_gate is {cfg['norm_before_gate']!r}; seqlab (like transformers) "
                f"computes norm(y * silu(z)), i.e. norm_before_gate: false"
            )
        if cfg.get("d_mlp"):
            raise ConfigError(f"{where}: d_mlp is {cfg['d_mlp']!r}; seqlab's Mamba-2 has no parallel MLP in in_proj")
        fields.update(headdim=head_dim, ngroups=n_groups, chunk_size=_as_int(cfg, "chunk_size", where))

    try:
        config = BackboneConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{where}: maps to an invalid seqlab config: {exc}") from None
    vocab_size = _as_int(cfg, "vocab_size", where)
    tie = _as_bool(cfg, "tie_word_embeddings", where)
    return config, vocab_size, tie


def config_to_hf(
    config: BackboneConfig, vocab_size: int, tie_embeddings: bool, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """The config.json transformers needs for ``config``; ``ConfigError`` for what it cannot represent."""
    if config.bidirectional:
        raise ConfigError("bidirectional=True: transformers' Mamba models are causal only; cannot save as HF")
    if config.layer_overrides:
        raise ConfigError(
            f"layer_overrides {sorted(config.layer_overrides)}: transformers' Mamba models have identical layers; "
            f"cannot save a hybrid stack as HF"
        )
    if config.ffn is not None:
        raise ConfigError(f"ffn={config.ffn!r}: transformers' Mamba blocks have no feed-forward; cannot save as HF")
    model_type = _MODEL_TYPE_OF[config.ssm]
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURE_OF[model_type]],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "use_bias": config.proj_bias,
        "use_conv_bias": config.conv_bias,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "tie_word_embeddings": bool(tie_embeddings),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if config.ssm == "mamba1":
        out.update(time_step_rank=config.dt_rank, intermediate_size=config.d_inner)
    else:
        # time_step_limit is left to its default (0, inf): no clamping, what seqlab computes.
        out.update(
            num_heads=config.nheads, head_dim=config.headdim, n_groups=config.ngroups, chunk_size=config.chunk_size
        )
    return out


# ==================================================================================================
# weights
# ==================================================================================================
def _hf_to_seqlab_name(name: str) -> str | None:
    if name in ("backbone.embeddings.weight", "backbone.embedding.weight"):
        return "embeddings.weight"
    if name == "lm_head.weight" or name.startswith(("backbone.layers.", "backbone.norm_f.")):
        return name
    return None


def _seqlab_to_hf_name(name: str) -> str:
    return "backbone.embeddings.weight" if name == "embeddings.weight" else name


def _resolve_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype name")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch.dtype (or its name), got {dtype!r}")
    return dtype


def _build(
    config: BackboneConfig,
    vocab_size: int,
    tie: bool,
    hf_tensors: Mapping[str, torch.Tensor],
    dtype,
    where: str,
    copy: bool,
) -> LanguageModel:
    """Check names and shapes of ``hf_tensors`` against the model ``config`` describes, then build it with them."""
    with torch.device("meta"):
        # On the meta device nothing is allocated or randomly initialised: every parameter is replaced below.
        model = LanguageModel(config, vocab_size=vocab_size, tie_embeddings=tie)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unexpected: list[str] = []
    for hf_name, tensor in hf_tensors.items():
        name = _hf_to_seqlab_name(hf_name)
        if name is None or name not in expected or name in mapped:
            unexpected.append(hf_name)
            continue
        mapped[name] = tensor
        source[name] = hf_name

    if tie and "embeddings.weight" in mapped:
        head = mapped.get("lm_head.weight")
        embeddings = mapped["embeddings.weight"]
        if (
            head is not None
            and head is not embeddings
            and (head.shape != embeddings.shape or not torch.equal(head.to(embeddings.dtype), embeddings))
        ):
            raise CorruptFileError(
                f"{where}: tie_word_embeddings is true but lm_head.weight differs from backbone.embeddings.weight; "
                f"set tie_word_embeddings to false to load a separate LM head"
            )
        mapped["lm_head.weight"] = embeddings
        source["lm_head.weight"] = source["embeddings.weight"]

    # Mamba-2's optional parallel MLP (mamba_ssm's d_mlp) widens in_proj: name it instead of a bare shape error.
    if config.ssm == "mamba2":
        for name, tensor in mapped.items():
            if name.endswith("mixer.in_proj.weight") and name in expected:
                extra = tensor.shape[0] - expected[name][0]
                if tensor.dim() == 2 and extra > 0 and extra % 2 == 0 and tensor.shape[1] == expected[name][1]:
                    raise ConfigError(
                        f"{where}: {source[name]} has {extra} more rows than expected {expected[name]}: a Mamba-2 "
                        f"in_proj with a parallel MLP (d_mlp = {extra // 2}), which seqlab does not implement"
                    )

    problems: list[str] = []
    missing = [_seqlab_to_hf_name(n) for n in expected if n not in mapped]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    for name, tensor in mapped.items():
        if tuple(tensor.shape) != expected[name]:
            problems.append(f"{source[name]} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        elif not tensor.dtype.is_floating_point:
            problems.append(f"{source[name]} has dtype {tensor.dtype}, expected a floating-point tensor")
        elif tensor.is_meta:
            problems.append(f"{source[name]} is on the meta device (offloaded?); load the model's weights first")
    if problems:
        raise CorruptFileError(
            f"{where} does not match its config ({config.ssm}, {config.n_layer} layers, "
            f"d_model {config.d_model}): " + "; ".join(problems)
        )

    dtype = _resolve_dtype(dtype, mapped["embeddings.weight"].dtype)
    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for pname, meta_param in list(module._parameters.items()):
            if meta_param is None:
                continue
            new = made.get(id(meta_param))  # tied parameters are one object: keep them one
            if new is None:
                full = f"{module_name}.{pname}" if module_name else pname
                data = mapped[full].detach().to(dtype=dtype, copy=copy).contiguous()
                new = nn.Parameter(data, requires_grad=meta_param.requires_grad)
                new.__dict__.update(meta_param.__dict__)  # markers such as _no_weight_decay
                made[id(meta_param)] = new
            module._parameters[pname] = new
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover - every parameter is in `expected`
        raise CorruptFileError(f"{where}: no data for {leftover}")
    return model.eval()


# ==================================================================================================
# reading a directory
# ==================================================================================================
def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: no {what} (a transformers model directory needs one)") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    single = folder / WEIGHTS_NAME
    index = folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return _load_safetensors(single), str(single)
    if index.is_file():
        weight_map = _read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, Mapping):
            raise CorruptFileError(f"{index}: has no weight_map object")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / str(shard)
            if Path(str(shard)).name != str(shard) or not shard_path.is_file():
                raise CorruptFileError(f"{index}: lists shard {shard!r}, which is not a file in {folder}")
            tensors.update(_load_safetensors(shard_path))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CorruptFileError(f"{index}: tensors {absent} are listed but not in their shards")
        return tensors, str(index)
    pickles = [name for name in _PICKLE_NAMES if (folder / name).exists()]
    pickles += sorted(p.name for p in folder.glob("pytorch_model-*.bin"))
    if pickles:
        raise CorruptFileError(
            f"{folder}: has only {pickles[0]} (a pickle) and no {WEIGHTS_NAME}; seqlab reads safetensors only and "
            f"never unpickles weights. Convert it once where you trust the file, e.g. "
            f"`Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
        )
    raise CorruptFileError(f"{folder}: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) found")


def _looks_like_hf_model(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and hasattr(obj, "config") and hasattr(obj.config, "to_dict")


def load(path_or_model, *, dtype=None) -> LanguageModel:
    """A seqlab ``LanguageModel`` with the weights of a transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM``
    (or ``LlamaForCausalLM`` / ``JambaForCausalLM`` / ``BambaForCausalLM``, by model_type: ``hf_llama``,
    ``hf_hybrid``).

    ``path_or_model``: an in-memory transformers model (its parameters are copied; the seqlab model lives on
    the same device) or a local directory with config.json and model.safetensors. ``dtype``: the parameter
    dtype of the result (default: the checkpoint's embedding dtype). The model is returned in eval mode.
    """
    if isinstance(path_or_model, LanguageModel):
        raise InputError("load converts a transformers model; this is already a seqlab LanguageModel")
    from seqlab.interop.hf_common import family_for as _family_for  # Llama, Jamba, Bamba (it imports this module)

    if _looks_like_hf_model(path_or_model):
        hf = path_or_model
        where = f"{type(hf).__name__} (in memory)"
        family = _family_for(hf.config.to_dict(), where)
        if family is not None:
            if not hasattr(hf, "lm_head") and not hf.config.to_dict().get("tie_word_embeddings"):
                raise ConfigError(f"{where}: has no lm_head; give a {family.architecture}")
            return family.load(hf.config.to_dict(), dict(hf.state_dict()), dtype, where, where, copy=True)
        config, vocab_size, tie = config_from_hf(hf.config.to_dict(), where)
        if not hasattr(hf, "lm_head") and not tie:
            raise ConfigError(f"{where}: has no lm_head; give a {_ARCHITECTURE_OF[_MODEL_TYPE_OF[config.ssm]]}")
        tensors = dict(hf.state_dict())
        if not any(k.startswith("backbone.") for k in tensors):  # a bare MambaModel / Mamba2Model
            tensors = {f"backbone.{k}": v for k, v in tensors.items()}
        return _build(config, vocab_size, tie, tensors, dtype, where, copy=True)

    if not isinstance(path_or_model, (str, os.PathLike)):
        raise InputError(
            f"load needs a transformers MambaForCausalLM / Mamba2ForCausalLM or a directory path, "
            f"got {type(path_or_model).__name__}"
        )
    folder = Path(path_or_model)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory (load reads a local transformers model directory)")
    config_path = folder / CONFIG_NAME
    hf_config = _read_json(config_path, CONFIG_NAME)
    family = _family_for(hf_config, str(config_path))
    if family is not None:
        family.config_from_hf(hf_config, str(config_path))  # config errors come before reading the weights
        tensors, weights_where = _read_weights(folder)
        return family.load(hf_config, tensors, dtype, str(config_path), weights_where, copy=False)
    config, vocab_size, tie = config_from_hf(hf_config, str(config_path))
    tensors, weights_where = _read_weights(folder)
    return _build(config, vocab_size, tie, tensors, dtype, weights_where, copy=False)


# ==================================================================================================
# writing a directory
# ==================================================================================================
def save(model: LanguageModel, path: str | os.PathLike) -> Path:
    """Write ``model`` as a transformers model directory (config.json + model.safetensors) at ``path``.

    Each file is written atomically (temp file, fsync, rename): a crash leaves the old file whole. The
    weights are written first and config.json last. Returns the directory.
    """
    if not isinstance(model, LanguageModel):
        raise ConfigError(
            f"save writes a LanguageModel as MambaForCausalLM / Mamba2ForCausalLM, got {type(model).__name__}; "
            f"transformers has no equivalent of other seqlab models"
        )
    from seqlab.interop.hf_common import family_of_config

    family = family_of_config(model.config)  # attention, hybrid or feed-forward stacks: Llama, Jamba, Bamba
    if family is not None:
        return family.save(model, path)
    tied = model.lm_head.weight is model.embeddings.weight
    dtype = model.embeddings.weight.dtype
    hf_config = config_to_hf(model.config, model.vocab_size, tied, dtype)

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # transformers re-ties it from tie_word_embeddings; safetensors refuses shared storage
        tensors[_seqlab_to_hf_name(name)] = tensor.detach().to("cpu").contiguous()
    data = st_save(tensors, metadata={"format": "pt"})
    atomic_write_bytes(folder / WEIGHTS_NAME, data)
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(folder / CONFIG_NAME, text.encode("utf-8"))
    return folder
