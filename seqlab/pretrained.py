"""``from_pretrained`` / ``save_pretrained``: a model as a directory in Hugging Face's conventions.

A seqlab pretrained directory::

    <dir>/config.json                         seqlab's config (``"format": "seqlab.pretrained"``; no model_type,
                                              so transformers never mistakes it for one of its own)
    <dir>/model.safetensors                   the weights under their seqlab (state_dict) names, in their dtype
    <dir>/model-0000i-of-0000n.safetensors    ... or HF's shards past ``max_shard_size``, with
    <dir>/model.safetensors.index.json        HF's index ({"metadata": {"total_size"}, "weight_map"})
    <dir>/adapter.json, tokenizer.json, ...   files a domain adapter saves beside the model (``files`` below)

``save_pretrained(model, dir)`` writes every file to a temporary first and renames them into place with
config.json last (``seqlab.interop.hf.write_directory``): an error leaves the directory as it was.
``load_pretrained(dir)`` reads any of:

- a seqlab pretrained directory (above);
- a transformers directory of a family ``seqlab.interop.hf`` loads (Mamba, Mamba-2, Llama, Jamba, Bamba), by its
  config.json's model_type;
- a seqlab model file (``seqlab.checkpoint.save_model``, ``seqlab train``'s ``model.safetensors``) or a training
  checkpoint folder: the model is rebuilt from the recorded config and the shapes of its weights.

The model is built on the meta device and each tensor read straight into its parameter (no second copy of
the weights), after every name, shape and shard was checked. ``dtype=None`` keeps the stored dtypes (a save and
load round trip is bit-exact); ``device=None`` is the CPU.

The core loads the model only: a domain adapter (the bytes adapter, an HF ``tokenizers`` tokenizer) lives in
``seqlab.domains``, which the core never imports. ``seqlab.domains.registry.from_pretrained(dir)`` returns
``(model, adapter)``, and ``seqlab.domains.registry.save_pretrained(model, dir, adapter)`` writes the adapter's
files (adapter.json, tokenizer.json) beside the model through ``save_pretrained(..., files=...)``.
``model.adapter_info`` (set by ``Adapter.build_model``) is recorded in config.json by this module too, as in a
model file, so a directory the core alone saved still names its adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqlab.checkpoint import jsonable
from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, CorruptFileError, FormatVersionError

__all__ = ["FORMAT", "FORMAT_VERSION", "load_pretrained", "read_config", "save_pretrained"]

FORMAT = "seqlab.pretrained"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
_NOTE = "a seqlab model, not a transformers config: load it with seqlab's LanguageModel.from_pretrained"
_CLASSES = ("LanguageModel", "SequenceModel")


# ------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    try:
        return jsonable(value)
    except TypeError as exc:
        raise ConfigError(f"cannot record it in config.json: {exc}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str | None = "5GB",
    files: Mapping[str, bytes] | None = None,
    adapter: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a ``LanguageModel`` or ``SequenceModel``) as a seqlab pretrained directory: config.json,
    the weights (one ``model.safetensors``, or HF's shards + index past ``max_shard_size``: bytes, or "5GB",
    "500MiB"; None: one file) and ``files`` (name -> bytes, written in the same all-or-nothing set; config.json
    lists them). ``adapter``: the adapter info to record (default: ``model.adapter_info`` when the model was
    built by an adapter). Returns the directory."""
    from seqlab.interop.hf import write_directory
    from seqlab.models import LanguageModel, SequenceModel

    if not isinstance(model, (LanguageModel, SequenceModel)):
        raise ConfigError(f"save_pretrained writes a LanguageModel or SequenceModel, got {type(model).__name__}")
    if getattr(model, "low_rank", None) or getattr(model, "quantization", None):
        raise ConfigError(
            "save_pretrained writes full-precision models; a LASER'd or quantized model is saved with "
            "seqlab.checkpoint.save_model (one model file)"
        )
    tensors: dict[str, torch.Tensor] = {}
    tied = False
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(model, LanguageModel) and name == "lm_head.weight" and tensor is model.embeddings.weight:
            tied = True
            continue  # one copy on disk; the loader ties it again (safetensors refuses shared storage)
        tensors[name] = tensor.detach()
    document: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "note": _NOTE,
        "class": type(model).__name__,
        "config": model.config.to_dict(),
        "fingerprint": model.fingerprint,
        "dtype": _dtype_name(next(iter(tensors.values())).dtype),
    }
    if isinstance(model, LanguageModel):
        document.update(vocab_size=model.vocab_size, tie_embeddings=tied)
    else:
        document.update(d_input=model.d_input, d_output=model.d_output)
    info = adapter if adapter is not None else getattr(model, "adapter_info", None)
    document["adapter"] = None if info is None else _jsonable(dict(info))
    document["files"] = sorted(files or {})
    return write_directory(directory, tensors, document, max_shard_size, extra_files=files)


# ------------------------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The parsed config.json of ``directory`` and its path; a missing or unparsable file is a one-line
    ``CorruptFileError`` naming it."""
    folder = Path(directory)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptFileError(
            f"{path}: no such file; a pretrained directory (seqlab's save_pretrained, or a transformers model) "
            "needs its config.json"
        ) from None
    except (OSError, UnicodeError) as exc:
        raise CorruptFileError(f"{path}: not readable ({exc})") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document, path


def is_seqlab_config(document: Mapping[str, Any]) -> bool:
    return document.get("format") == FORMAT


def load_pretrained(source: str | os.PathLike, *, dtype=None, device=None, expect: type | None = None) -> nn.Module:
    """The model in ``source``: a seqlab pretrained directory, a transformers directory of a supported family,
    or a seqlab model file / checkpoint folder (see the module docstring). ``dtype``: the parameters' dtype
    (default: as stored); ``device``: where they go (default: the CPU). ``expect``: the class the caller wants
    (``LanguageModel.from_pretrained`` refuses a SequenceModel). Returned in eval mode."""
    from seqlab.interop.hf import _resolve_device, _resolve_dtype

    want = None if dtype is None else _resolve_dtype(dtype, torch.float32)
    target = _resolve_device(device)
    path = Path(source)
    if path.is_file() or (path.is_dir() and (path / "latest").is_file()):
        model = _from_model_file(path, want, target)
    else:
        document, config_path = read_config(path)
        if is_seqlab_config(document):
            model = _from_seqlab_dir(path, document, config_path, want, target)
        elif "model_type" in document or "architectures" in document:
            from seqlab.interop import hf

            model = hf.load(path, dtype=want, device=target)
        else:
            raise CorruptFileError(
                f'{config_path}: neither a seqlab config ("format": "{FORMAT}") nor a transformers config '
                "(no model_type)"
            )
    if expect is not None and not isinstance(model, expect):
        raise ConfigError(
            f"{source}: holds a {type(model).__name__}; use {type(model).__name__}.from_pretrained to load it"
        )
    return model.eval()


def _field(document: Mapping[str, Any], key: str, where: Path, kind, optional: bool = False) -> Any:
    value = document.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise CorruptFileError(f"{where}: {key} is {value!r}, expected a {getattr(kind, '__name__', kind)}")
    return value


def _from_seqlab_dir(folder: Path, document: dict, config_path: Path, dtype, device) -> nn.Module:
    from seqlab.interop.hf import _read_weights

    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptFileError(f"{config_path}: format_version is {version!r}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{config_path}: format_version {version} is newer than this seqlab reads ({FORMAT_VERSION}); "
            "upgrade seqlab"
        )
    kind = document.get("class")
    if kind not in _CLASSES:
        raise CorruptFileError(f"{config_path}: class is {kind!r}, expected one of {list(_CLASSES)}")
    config_dict = _field(document, "config", config_path, dict)
    try:
        config = BackboneConfig.from_dict(config_dict)
    except ConfigError as exc:
        raise CorruptFileError(f"{config_path}: config: {exc}") from None
    if kind == "LanguageModel":
        head = {
            "vocab_size": _field(document, "vocab_size", config_path, int),
            "tie_embeddings": _field(document, "tie_embeddings", config_path, bool),
        }
    else:
        head = {
            "d_input": _field(document, "d_input", config_path, int),
            "d_output": _field(document, "d_output", config_path, int, optional=True),
        }
    model: Any = _meta_model(kind, config, head, config_path)  # adapter_info is set on it below
    recorded = document.get("fingerprint")
    if recorded is not None and recorded != model.fingerprint:
        raise CorruptFileError(
            f"{config_path}: records fingerprint {recorded!r}, but its config builds {model.fingerprint!r} "
            "(written by another seqlab version, or edited)"
        )
    stored, weights_where = _read_weights(folder)
    _check_and_fill(model, stored, weights_where, dtype, device, copy=False)
    adapter_record = document.get("adapter")
    if isinstance(adapter_record, dict) and "settings" in adapter_record:  # full info, not a pointer to adapter.json
        model.adapter_info = adapter_record
    return model


def _meta_model(kind: str, config: BackboneConfig, head: dict, where) -> nn.Module:
    from seqlab.models import LanguageModel, SequenceModel

    cls = LanguageModel if kind == "LanguageModel" else SequenceModel
    try:
        with torch.device("meta"):  # shapes only: every tensor is replaced by its stored data
            return cls(config, **head)
    except ConfigError as exc:
        raise CorruptFileError(f"{where}: the recorded model does not build: {exc}") from None


def _check_and_fill(model: nn.Module, sources: Mapping[str, Any], where: str, dtype, device, copy: bool) -> None:
    """Check ``sources`` (state_dict names -> tensors or stored tensors) against the meta ``model`` (every name,
    no other, shapes, floating-point dtypes) and put them in; a tied LM head takes the embedding."""
    from seqlab.interop.hf import materialise
    from seqlab.models import LanguageModel

    expected = model.state_dict(keep_vars=True)
    tied = isinstance(model, LanguageModel) and model.lm_head.weight is model.embeddings.weight
    wanted = {n: tuple(t.shape) for n, t in expected.items() if not (tied and n == "lm_head.weight")}
    problems: list[str] = []
    missing = [n for n in wanted if n not in sources]
    unexpected = sorted(n for n in sources if n not in wanted)
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for name, shape in wanted.items():
        tensor = sources.get(name)
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        elif not tensor.dtype.is_floating_point:
            problems.append(f"{name} has dtype {tensor.dtype}, expected a floating-point tensor")
    if problems:
        raise CorruptFileError(f"{where} does not match its config: " + "; ".join(problems))
    mapped = dict(sources)
    if tied:
        mapped["lm_head.weight"] = mapped["embeddings.weight"]
    materialise(model, mapped, dtype, device, copy, where)


def _from_model_file(path: Path, dtype, device) -> nn.Module:
    """A model file (``save_model``) or a checkpoint folder's latest one, rebuilt from its recorded config and
    the shapes of its weights: ``embeddings.weight`` makes a LanguageModel (tied when ``lm_head.weight`` equals
    it), ``input_proj.weight`` a SequenceModel."""
    from seqlab.checkpoint import latest_checkpoint, model_file_config, read_model_file

    file = latest_checkpoint(path) / "model.safetensors" if path.is_dir() else path
    tensors, meta = read_model_file(file)
    if meta.get("low_rank") is not None or meta.get("quantization") is not None:
        raise ConfigError(
            f"{file}: a LASER'd or quantized model file; rebuild it with seqlab.domains.registry.model_from_checkpoint "
            "(or build the model and use seqlab.checkpoint.load_model)"
        )
    config = model_file_config(file, meta)
    if config is None:
        raise CorruptFileError(f"{file}: records no backbone config to rebuild the model from")
    embeddings, projection = tensors.get("embeddings.weight"), tensors.get("input_proj.weight")
    if embeddings is not None and embeddings.dim() == 2:
        head_weight = tensors.get("lm_head.weight")
        tied = head_weight is None or (head_weight.shape == embeddings.shape and torch.equal(head_weight, embeddings))
        if tied:
            tensors.pop("lm_head.weight", None)
        model = _meta_model("LanguageModel", config, {"vocab_size": embeddings.shape[0], "tie_embeddings": tied}, file)
    elif projection is not None and projection.dim() == 2:
        out = tensors.get("output_head.weight")
        d_output = None if out is None or out.dim() != 2 else int(out.shape[0])
        model = _meta_model("SequenceModel", config, {"d_input": int(projection.shape[1]), "d_output": d_output}, file)
    else:
        raise CorruptFileError(f"{file}: holds neither embeddings.weight nor input_proj.weight: not a seqlab model")
    _check_and_fill(model, tensors, str(file), dtype, device, copy=False)
    if isinstance(meta.get("adapter"), dict):
        model.adapter_info = meta["adapter"]
    return model
