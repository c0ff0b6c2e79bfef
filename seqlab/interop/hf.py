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

At scale (sharded checkpoints, bf16, models larger than half the memory): ``load(dir, dtype=None, device=None)``
reads ``model.safetensors`` or HF's shards ``model-0000i-of-0000n.safetensors`` named by
``model.safetensors.index.json``, in any of fp32 / bf16 / fp16, without ever holding two copies of the weights.
The model is built on the meta device; every shard header, tensor name and shape is checked against the config
first (a missing shard, a tensor the index places in a shard that lacks it, a truncated shard, a wrong shape:
``CorruptFileError`` naming the file and the tensor, and nothing is read); then each parameter is allocated in
its final dtype on its final device and its bytes are read straight into it, shard by shard (through one
tensor-sized staging buffer when the dtype or device differs). ``dtype`` defaults to the checkpoint's own (its
embedding's), as before sharding existed; ``device`` to the CPU. Files are read, not memory-mapped: pages of a
map count in the process's resident memory while it is open, and a mapped model would depend on the file
staying unchanged. ``save(model, dir, max_shard_size="5GB")`` writes one file or HF's shards + index, streamed a
tensor at a time, every file to a temporary first. ``meta_model`` / ``parameter_count`` / ``state_bytes`` size a
model from its config alone (Codestral Mamba 7B: 7,285,403,648 parameters, 276,299,776 bytes of fp32 state per
sequence).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.io import atomic_write_files
from seqlab.models import LanguageModel

__all__ = ["load", "save", "config_from_hf", "config_to_hf", "meta_model", "state_bytes", "parameter_count"]

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


def _resolve_device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc})") from None


# ==================================================================================================
# safetensors files, one tensor at a time
# ==================================================================================================
# The safetensors format: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
# "data_offsets": [begin, end]}, "__metadata__": {...}} (offsets relative to the end of the header), then the
# tensor bytes, little-endian. Read here with plain file reads straight into the destination tensor's memory:
# no pickle, no whole-file buffer, and no memory map either, because the pages of a mapped file that are read
# count in the process's resident memory until the map closes (the page cache of plain reads does not).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_TAGS = {dtype: tag for tag, dtype in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_READ_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class _Stored:
    """One tensor in a safetensors file, not read yet: its shape and dtype (all the checks need) and where its
    bytes are (absolute offset in the file)."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: torch.Size
    start: int
    nbytes: int

    @property
    def is_meta(self) -> bool:  # the checks in _build ask this of tensors
        return False

    def dim(self) -> int:
        return len(self.shape)

    def read_into(self, out: torch.Tensor, handle) -> None:
        """Fill the contiguous CPU tensor ``out`` (this dtype and shape) with the stored bytes."""
        if self.nbytes == 0:
            return
        view = out.reshape(-1).view(torch.uint8).numpy().data
        handle.seek(self.start)
        done = 0
        while done < self.nbytes:
            got = handle.readinto(view[done : done + min(_READ_CHUNK, self.nbytes - done)])
            if not got:
                raise CorruptFileError(
                    f"{self.path}: truncated: tensor {self.name!r} needs bytes up to {self.start + self.nbytes}, "
                    f"the file ends at {self.start + done}"
                )
            done += got

    def read(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as handle:
            self.read_into(out, handle)
        return out


def _read_header(path: Path) -> dict[str, _Stored]:
    """The tensors of the safetensors file ``path``, checked (dtype, shape against byte span, every byte inside
    the file) but not read. ``CorruptFileError`` naming the file, and the tensor where there is one."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{path}: file is {size} bytes, too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER):
                raise CorruptFileError(
                    f"{path}: truncated or not a safetensors file (header length says {header_len} bytes, the "
                    f"file has {size - 8} after it)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise CorruptFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_start = 8 + header_len
    out: dict[str, _Stored] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CorruptFileError(f"{where}: its header entry is not an object")
        dtype = _ST_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise CorruptFileError(f"{where}: dtype {info.get('dtype')!r} is not one seqlab reads")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CorruptFileError(f"{where}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CorruptFileError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CorruptFileError(
                f"{where}: its bytes span {offsets[1] - offsets[0]}, but shape {shape} of {info['dtype']} needs "
                f"{nbytes}"
            )
        if data_start + offsets[1] > size:
            raise CorruptFileError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {data_start + offsets[1]}, the file has {size}"
            )
        out[name] = _Stored(path, name, dtype, torch.Size(shape), data_start + offsets[0], nbytes)
    return out


def _fill(pending: list[tuple[_Stored, torch.Tensor]]) -> None:
    """Read each stored tensor into its destination, file by file in file order (one file open at a time). A
    destination of another dtype or on another device gets the bytes through a temporary CPU tensor of this
    one tensor's size."""
    pending = sorted(pending, key=lambda item: (str(item[0].path), item[0].start))
    handle = None
    current: Path | None = None
    try:
        for stored, out in pending:
            if out.is_meta:
                continue
            if stored.path != current:
                if handle is not None:
                    handle.close()
                current = stored.path
                handle = open(current, "rb", buffering=0)
            if out.dtype == stored.dtype and out.device.type == "cpu" and out.is_contiguous():
                stored.read_into(out, handle)
            else:
                staging = torch.empty(stored.shape, dtype=stored.dtype)
                stored.read_into(staging, handle)
                out.copy_(staging)
                del staging
    except OSError as exc:
        raise CorruptFileError(f"{current}: not a readable safetensors file ({exc})") from None
    finally:
        if handle is not None:
            handle.close()


def _read_all(stored: Mapping[str, _Stored]) -> dict[str, torch.Tensor]:
    """Every stored tensor as a CPU tensor in its own dtype (one copy of the weights), read file by file."""
    out = {name: torch.empty(s.shape, dtype=s.dtype) for name, s in stored.items()}
    _fill([(s, out[name]) for name, s in stored.items()])
    return out


# ==================================================================================================
# building the model
# ==================================================================================================
def _build(
    config: BackboneConfig,
    vocab_size: int,
    tie: bool,
    hf_tensors: Mapping[str, Any],
    dtype,
    where: str,
    copy: bool,
    device: torch.device | None = None,
) -> LanguageModel:
    """Check names and shapes of ``hf_tensors`` (tensors, or ``_Stored`` tensors not read yet) against the model
    ``config`` describes, then build it with them. Everything is checked before anything is read."""
    with torch.device("meta"):
        # On the meta device nothing is allocated or randomly initialised: every parameter is replaced below.
        model = LanguageModel(config, vocab_size=vocab_size, tie_embeddings=tie)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    mapped: dict[str, Any] = {}
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
        if head is not None and head is not embeddings:
            if head.shape == embeddings.shape:
                head_t = head.read() if isinstance(head, _Stored) else head
                emb_t = embeddings.read() if isinstance(embeddings, _Stored) else embeddings
                same = torch.equal(head_t.to(emb_t.dtype), emb_t)
            else:
                same = False
            if not same:
                raise CorruptFileError(
                    f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                    f"backbone.embeddings.weight; set tie_word_embeddings to false to load a separate LM head"
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

    materialise(model, mapped, _resolve_dtype(dtype, mapped["embeddings.weight"].dtype), device, copy, where)
    return model.eval()


def materialise(
    model: nn.Module,
    sources: Mapping[str, Any],
    dtype: torch.dtype | None,
    device: torch.device | None,
    copy: bool,
    where: str,
) -> None:
    """Give every parameter (and persistent buffer) of ``model``, built on the meta device, its data from
    ``sources`` (its state_dict names -> tensors, or ``_Stored`` tensors read now straight from their files, file
    by file), in ``dtype`` (None: each source's own dtype) on ``device`` (None: the CPU for stored tensors, the
    source's device otherwise). Tied parameters stay one object. Non-persistent buffers left on the meta device
    (attention's rotary frequencies) are computed again. The names and shapes must have been checked."""
    made: dict[int, torch.Tensor] = {}
    pending: list[tuple[_Stored, torch.Tensor]] = []

    def data_of(full: str) -> torch.Tensor:
        src = sources[full]
        want = dtype or src.dtype
        if isinstance(src, _Stored):  # allocated now, filled below straight from the file
            data = torch.empty(src.shape, dtype=want, device=device or "cpu")
            pending.append((src, data))
            return data
        data = src.detach().to(dtype=want, copy=copy).contiguous()
        return data if device is None else data.to(device)

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for pname, meta_param in list(module._parameters.items()):
            if meta_param is None:
                continue
            new = made.get(id(meta_param))  # tied parameters are one object: keep them one
            if new is None:
                new = nn.Parameter(data_of(prefix + pname), requires_grad=meta_param.requires_grad)
                new.__dict__.update(meta_param.__dict__)  # markers such as _no_weight_decay
                made[id(meta_param)] = new
            module._parameters[pname] = new
        for bname, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta and prefix + bname in sources:
                module._buffers[bname] = data_of(prefix + bname)
    _fill(pending)
    if device is None or device.type != "meta":
        for module in model.modules():  # non-persistent buffers (rotary frequencies): computed again
            for bname, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_meta:
                    from seqlab.interop.hf_common import _rebuild_buffer

                    _rebuild_buffer(module, bname)
                    if device is not None:
                        module._buffers[bname] = module._buffers[bname].to(device)  # type: ignore[union-attr]
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:  # pragma: no cover - every parameter is in the checked sources
            raise CorruptFileError(f"{where}: no data for {leftover}")


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


def _read_weights(folder: Path) -> tuple[dict[str, _Stored], str]:
    """The tensors of the directory's model.safetensors, or of the shards its model.safetensors.index.json
    names, checked (every shard there, every indexed tensor in its shard and nothing else, every byte inside
    its file) but not read."""
    single = folder / WEIGHTS_NAME
    index = folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return _read_header(single), str(single)
    if index.is_file():
        document = _read_json(index, "weight index")
        weight_map = document.get("weight_map") if isinstance(document, Mapping) else None
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise CorruptFileError(f"{index}: has no weight_map object")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                raise CorruptFileError(f"{index}: tensor {name!r} is mapped to {shard!r}, not a file name")
            by_shard.setdefault(shard, []).append(name)
        stored: dict[str, _Stored] = {}
        for shard in sorted(by_shard):
            names = by_shard[shard]
            shard_path = folder / shard
            if not shard_path.is_file():
                more = f" and {len(names) - 1} more" if len(names) > 1 else ""
                raise CorruptFileError(
                    f"{index}: lists shard {shard!r} (with tensor {names[0]!r}{more}), which is not a file in {folder}"
                )
            header = _read_header(shard_path)
            absent = [n for n in names if n not in header]
            if absent:
                raise CorruptFileError(
                    f"{shard_path}: does not hold tensor(s) {', '.join(map(repr, absent))}, which "
                    f"{WEIGHTS_INDEX_NAME} places there"
                )
            extra = sorted(set(header) - set(names))
            if extra:
                raise CorruptFileError(
                    f"{shard_path}: holds tensor(s) {', '.join(map(repr, extra))}, which {WEIGHTS_INDEX_NAME} "
                    f"does not place there"
                )
            stored.update(header)
        return stored, str(index)
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


def load(path_or_model, *, dtype=None, device=None) -> LanguageModel:
    """A seqlab ``LanguageModel`` with the weights of a transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM``
    (or ``LlamaForCausalLM`` / ``JambaForCausalLM`` / ``BambaForCausalLM``, by model_type: ``hf_llama``,
    ``hf_hybrid``).

    ``path_or_model``: an in-memory transformers model (its parameters are copied; the seqlab model lives on
    the same device unless ``device`` says otherwise) or a local directory with config.json and
    model.safetensors, or sharded ``model-0000i-of-0000n.safetensors`` files and model.safetensors.index.json.

    ``dtype``: the parameter dtype of the result; default: the checkpoint's own (its embedding's dtype), so a
    bf16 checkpoint loads as bf16 and an fp32 one as fp32. ``device``: where the parameters go (default: the
    CPU for a directory). The model is returned in eval mode.

    A Mamba / Mamba-2 directory is loaded without a second copy of the weights: the model is built on the meta
    device, every name, shape and shard is checked before anything is read, then each parameter is allocated
    in its final dtype and device and filled straight from its file, shard by shard (converting one tensor at a
    time when the dtype differs). Bad files raise ``CorruptFileError`` naming the file and tensor; nothing is
    returned half-loaded.
    """
    if isinstance(path_or_model, LanguageModel):
        raise InputError("load converts a transformers model; this is already a seqlab LanguageModel")
    from seqlab.interop.hf_common import family_for as _family_for  # Llama, Jamba, Bamba (it imports this module)

    target = _resolve_device(device)
    if _looks_like_hf_model(path_or_model):
        hf = path_or_model
        where = f"{type(hf).__name__} (in memory)"
        family = _family_for(hf.config.to_dict(), where)
        if family is not None:
            if not hasattr(hf, "lm_head") and not hf.config.to_dict().get("tie_word_embeddings"):
                raise ConfigError(f"{where}: has no lm_head; give a {family.architecture}")
            model = family.load(hf.config.to_dict(), dict(hf.state_dict()), dtype, where, where, copy=True)
            return model if target is None else model.to(target)
        config, vocab_size, tie = config_from_hf(hf.config.to_dict(), where)
        if not hasattr(hf, "lm_head") and not tie:
            raise ConfigError(f"{where}: has no lm_head; give a {_ARCHITECTURE_OF[_MODEL_TYPE_OF[config.ssm]]}")
        tensors = dict(hf.state_dict())
        if not any(k.startswith("backbone.") for k in tensors):  # a bare MambaModel / Mamba2Model
            tensors = {f"backbone.{k}": v for k, v in tensors.items()}
        return _build(config, vocab_size, tie, tensors, dtype, where, copy=True, device=target)

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
        stored, weights_where = _read_weights(folder)
        # these families join and split tensors (fused gate/up, experts): read in the checkpoint's dtype first
        model = family.load(hf_config, _read_all(stored), dtype, str(config_path), weights_where, copy=False)
        return model if target is None else model.to(target)
    config, vocab_size, tie = config_from_hf(hf_config, str(config_path))
    stored, weights_where = _read_weights(folder)
    return _build(config, vocab_size, tie, stored, dtype, weights_where, copy=False, device=target)


# ==================================================================================================
# sizes of models too large to build
# ==================================================================================================
def _hf_config_of(source) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        return dict(source), "HF config"
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"expected an HF config (dict, config.json or its directory), got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        path = path / CONFIG_NAME
    document = _read_json(path, CONFIG_NAME)
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document, str(path)


def meta_model(config) -> LanguageModel:
    """The ``LanguageModel`` an HF config describes (a dict, a config.json path or a model directory), built on
    the meta device: shapes only, no memory and no initialisation (a 7B model builds in about a second). Use it to
    count parameters (``parameter_count``) and size states (``state_bytes``) of models too large to build."""
    from seqlab.interop.hf_common import family_for as _family_for

    hf_config, where = _hf_config_of(config)
    family = _family_for(hf_config, where)
    convert = family.config_from_hf if family is not None else config_from_hf
    backbone, vocab_size, tie = convert(hf_config, where)
    with torch.device("meta"):
        return LanguageModel(backbone, vocab_size=vocab_size, tie_embeddings=tie)


def parameter_count(model: nn.Module) -> int:
    """The number of parameters of ``model``, a tied embedding / LM head counted once (as HF counts)."""
    return sum(p.numel() for p in model.parameters())


def state_bytes(config, dtype=torch.float32, batch_size: int = 1) -> int:
    """Bytes of the recurrent state (``RecurrentState``: per layer the conv state and the SSM state) for
    ``batch_size`` sequences, with every state tensor in ``dtype``. seqlab keeps states in float32; bfloat16
    gives the size a half-precision cache would take.

    ``config``: a seqlab model, a ``BackboneConfig``, or an HF config (dict, config.json, directory). The
    shapes come from the model's own ``init_state`` on the meta device. A KV cache (attention layers) grows
    with the sequence and is not counted: this is the size at position 0 and, for a pure SSM, at any position.
    """
    from seqlab.state import state_layout

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(config, nn.Module):
        model = config
    elif isinstance(config, BackboneConfig):
        with torch.device("meta"):
            model = LanguageModel(config, vocab_size=1)
    else:
        model = meta_model(config)
    itemsize = _resolve_dtype(dtype, torch.float32).itemsize
    elements = sum(
        math.prod(0 if d is None else d for d in shape) for layer in state_layout(model) for shape, _ in layer.values()
    )
    return elements * itemsize * batch_size


# ==================================================================================================
# writing a directory
# ==================================================================================================
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?")
_SIZE_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _parse_size(value) -> int | None:
    """Bytes from an int or HF's spelling ("5GB" = 5 * 10**9, "500MiB" = 500 * 2**20); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip().lower())
        if match is None:
            raise ConfigError(f"max_shard_size {value!r}: expected bytes as an integer or e.g. '5GB', '500MiB'")
        number, prefix, binary = match.groups()
        value = float(number) * ((1024 if binary else 1000) ** _SIZE_POWER.get(prefix or "", 0))
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"max_shard_size must be a positive number of bytes, got {value!r}")
    return value


def _shard_plan(tensors: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Tensors in order, cut into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_safetensors(handle, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Stream ``tensors`` to ``handle`` in the safetensors format, a tensor at a time (no whole-file buffer)."""
    items = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in items:
        tag = _ST_TAGS.get(tensor.dtype)
        if tag is None:
            raise ConfigError(f"{name}: dtype {tensor.dtype} has no safetensors name seqlab writes")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": tag, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the tensor bytes start 8-aligned
    handle.write(struct.pack("<Q", len(raw)))
    handle.write(raw)
    for _, tensor in items:
        if tensor.numel():
            cpu = tensor.detach().to("cpu").contiguous()
            handle.write(cpu.reshape(-1).view(torch.uint8).numpy().data)


def write_directory(
    folder: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any],
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``tensors`` (HF names) and ``hf_config`` as a transformers model directory: model.safetensors when
    they fit in one shard of ``max_shard_size`` bytes (None: never shard), else HF's
    ``model-0000i-of-0000n.safetensors`` + model.safetensors.index.json
    (``{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}``), then ``extra_files`` (file name ->
    bytes: a tokenizer.json, an adapter.json; written in the same all-or-nothing set), then config.json last.

    Everything is written to temporary files first; an exception leaves the directory as it was and no
    temporary behind. Weight files of an earlier save that the new set does not use are removed, so a stale
    model.safetensors never shadows a new index."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a directory")
    limit = _parse_size(max_shard_size)
    _check_writable(tensors)
    plan = _shard_plan(tensors, limit)
    files: list[tuple[str, Any]] = []

    def shard_writer(names: list[str]):
        return lambda handle: _write_safetensors(handle, ((n, tensors[n]) for n in names))

    if len(plan) == 1:
        files.append((WEIGHTS_NAME, shard_writer(plan[0])))
    else:
        weight_map: dict[str, str] = {}
        for i, names in enumerate(plan, start=1):
            shard = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            files.append((shard, shard_writer(names)))
            weight_map.update(dict.fromkeys(names, shard))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        index_bytes = (json.dumps(index, indent=2) + "\n").encode("utf-8")
        files.append((WEIGHTS_INDEX_NAME, lambda handle: handle.write(index_bytes)))
    for extra_name, data in (extra_files or {}).items():
        if extra_name in (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or Path(extra_name).name != extra_name:
            raise InputError(f"{extra_name!r}: not a file name write_directory may write beside the weights")
        files.append((extra_name, lambda handle, data=bytes(data): handle.write(data)))
    config_bytes = (json.dumps(dict(hf_config), indent=2, sort_keys=True) + "\n").encode("utf-8")
    files.append((CONFIG_NAME, lambda handle: handle.write(config_bytes)))

    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    new = {name for name, _ in files}
    old = [
        entry.name
        for entry in os.scandir(folder)
        if entry.name not in new
        and (entry.name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or _SHARD_RE.fullmatch(entry.name))
    ]
    try:
        atomic_write_files(folder, files, remove=old)
    except BaseException:
        if created:  # a directory this call made, left empty by the failure: remove it too
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return folder


def save(
    model: LanguageModel, path: str | os.PathLike, *, max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Write ``model`` as a transformers model directory at ``path``: config.json and model.safetensors, or, when
    the weights exceed ``max_shard_size`` (bytes, or HF's spelling: "5GB" = 5 * 10**9, "500MiB"; default
    "5GB"; None: one file), HF's shards ``model-0000i-of-0000n.safetensors`` + model.safetensors.index.json.
    The weights keep the model's dtype (a bf16 model is saved as bf16).

    Tensors are streamed to the files one at a time (no copy of the whole model in memory). All files are
    written to temporaries (fsynced) before any is renamed into place, config.json last: an error leaves the
    directory as it was. Returns the directory.
    """
    if not isinstance(model, LanguageModel):
        raise ConfigError(
            f"save writes a LanguageModel as MambaForCausalLM / Mamba2ForCausalLM, got {type(model).__name__}; "
            f"transformers has no equivalent of other seqlab models"
        )
    _parse_size(max_shard_size)
    from seqlab.interop.hf_common import family_of_config

    family = family_of_config(model.config)  # attention, hybrid or feed-forward stacks: Llama, Jamba, Bamba
    if family is not None:
        return family.save(model, path, max_shard_size=max_shard_size)
    tied = model.lm_head.weight is model.embeddings.weight
    dtype = model.embeddings.weight.dtype
    hf_config = config_to_hf(model.config, model.vocab_size, tied, dtype)

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a directory")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # transformers re-ties it from tie_word_embeddings; safetensors refuses shared storage
        tensors[_seqlab_to_hf_name(name)] = tensor.detach()
    return write_directory(folder, tensors, hf_config, max_shard_size)


def _check_writable(tensors: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_meta:
            raise InputError(f"{name} is on the meta device (no data); load or initialise the weights before saving")
        if tensor.dtype not in _ST_TAGS:
            raise ConfigError(f"{name}: dtype {tensor.dtype} has no safetensors name seqlab writes")
