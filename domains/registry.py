"""The adapter registry (adapters are found by name: checkpoints, stores and the CLI record the name) and
rebuilding an adapter, or an adapter and its model, from a model file or checkpoint that recorded them;
``describe_model`` summarises such a file (``seqlab describe MODEL``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from seqlab.errors import ConfigError, CorruptFileError, FormatVersionError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Adapter

__all__ = [
    "ADAPTERS",
    "adapter_from_checkpoint",
    "adapter_from_info",
    "describe_model",
    "get_adapter",
    "model_from_checkpoint",
    "register_adapter",
]

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` findable by its ``name`` (checkpoints, stores and the CLI use the name)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"adapter class {cls.__name__} needs a non-empty class attribute 'name'")
    if name in ADAPTERS and ADAPTERS[name] is not cls:
        raise ConfigError(f"an adapter named {name!r} is already registered ({ADAPTERS[name].__name__})")
    ADAPTERS[name] = cls
    return cls


def _load_builtin_adapters() -> None:
    # importing the modules registers them; optional dependencies are imported lazily inside each adapter
    import importlib

    for module in ("bytes", "subword", "audio", "dna", "video", "memory"):
        try:
            importlib.import_module(f"seqlab.domains.{module}")
        except ModuleNotFoundError as exc:  # an adapter module that is not in this build
            if exc.name != f"seqlab.domains.{module}":
                raise


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered under ``name``."""
    if name not in ADAPTERS:
        _load_builtin_adapters()
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ConfigError(f"no adapter named {name!r}; known: {sorted(ADAPTERS)}") from None


def adapter_from_info(info: dict) -> Adapter:
    """Rebuild an adapter from ``adapter.info()`` (``{"name": ..., "settings": {...}}``)."""
    if not isinstance(info, dict) or "name" not in info:
        raise ConfigError(f"adapter info must be a dict with a 'name', got {info!r}")
    cls = get_adapter(info["name"])
    try:
        return cls(**dict(info.get("settings") or {}))
    except TypeError as exc:
        raise ConfigError(
            f"adapter {info['name']!r} cannot be rebuilt from settings {info.get('settings')}: {exc}"
        ) from None


def adapter_from_checkpoint(path: str | os.PathLike) -> Adapter:
    """The adapter a model file (``save_model``) or a training checkpoint directory was trained with."""
    from seqlab.checkpoint import FORMAT_VERSION, MODEL_FORMAT, latest_checkpoint
    from seqlab.safetensors_io import read_tensors

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(latest_checkpoint(path), "model.safetensors")
    _, meta = read_tensors(path, kind=MODEL_FORMAT, version=FORMAT_VERSION, full_checksum_since=2)
    info = meta.get("adapter")
    if not info:
        raise CorruptFileError(
            f"{path}: this model file records no adapter (it was not built with Adapter.build_model)"
        )
    try:
        return adapter_from_info(info)
    except ConfigError as exc:
        raise CorruptFileError(f"{path}: recorded adapter: {exc}") from None


def model_from_checkpoint(path: str | os.PathLike, device=None) -> tuple[torch.nn.Module, Adapter]:
    """Rebuild ``(model, adapter)`` from a model file (``save_model``) or a training checkpoint directory alone:
    the adapter from its recorded settings, the model by ``adapter.build_model(config, **options)`` with the
    recorded config and build options, then the weights (fingerprint-checked). Returns the model in eval mode."""
    from seqlab.checkpoint import FORMAT_VERSION, MODEL_FORMAT, latest_checkpoint, load_model
    from seqlab.safetensors_io import read_tensors

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(latest_checkpoint(path), "model.safetensors")
    _, meta = read_tensors(path, kind=MODEL_FORMAT, version=FORMAT_VERSION, full_checksum_since=2)
    info, config = meta.get("adapter"), meta.get("config")
    if not info:
        raise CorruptFileError(
            f"{path}: this model file records no adapter (it was not built with "
            "Adapter.build_model); build the model yourself and use seqlab.checkpoint.load_model"
        )
    if not config:
        raise CorruptFileError(f"{path}: this model file records no backbone config")
    from seqlab.checkpoint import model_file_config

    backbone = model_file_config(path, meta)  # a bad key or value: CorruptFileError naming the file and key
    quantized = meta.get("quantization") is not None
    try:
        adapter = adapter_from_info(info)
        options = dict(info.get("model") or {})
        if quantized:  # built without the fp32 weights of the quantized layers, on the device
            from seqlab.quant.storage import build_for_quantized

            model = build_for_quantized(lambda: adapter.build_model(backbone, **options), meta, device)
        else:
            model = adapter.build_model(backbone, **options)
    except (ConfigError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptFileError(f"{path}: recorded adapter or model options do not build a model: {exc}") from None
    if device is not None and not quantized:
        model = model.to(device)
    load_model(path, model)
    return model.eval(), adapter


def _model_file(path: str | os.PathLike) -> str:
    """The model file a path names: the file itself, or a checkpoint folder's latest ``model.safetensors`` (a run
    folder of ``seqlab train --out`` holds both; its latest checkpoint is its final model)."""
    from seqlab.checkpoint import latest_checkpoint

    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "latest")) and os.path.isfile(os.path.join(path, "model.safetensors")):
            return os.path.join(path, "model.safetensors")
        return os.path.join(latest_checkpoint(path), "model.safetensors")
    return path


def describe_model(path: str | os.PathLike, device=None) -> dict:
    """What a model file (``save_model``: ``seqlab train``'s ``model.safetensors``, a checkpoint's) or a
    checkpoint folder holds: ``seqlab.models.model_summary`` of the model it rebuilds (class, fingerprint, config,
    MoE settings, total and active parameters), with ``path`` (the model file read), ``adapter`` (its recorded
    info, None when it records none) and ``step`` (the recorded training step, or None).

    A file made by an adapter is rebuilt by ``model_from_checkpoint``; one that records no adapter but a config
    and a language model's ``embeddings.weight`` and ``lm_head.weight`` (``train_data_parallel``'s checkpoints, a
    ``LanguageModel`` saved by hand) is rebuilt as a ``LanguageModel``, tied when the two tensors are equal. The
    file is read as safetensors only (never unpickled) and every weight is checked: a damaged file, or one that is
    not a seqlab model file, raises ``CorruptFileError`` naming it."""
    from seqlab.checkpoint import load_model, model_file_config, read_model_file
    from seqlab.models import LanguageModel, model_summary

    file = _model_file(path)
    try:
        tensors, meta = read_model_file(file)
    except FormatVersionError:
        raise
    except CorruptFileError as exc:  # "truncated or damaged" alone would mislead about a text file or a store
        reason = str(exc).removeprefix(f"{file}: ")
        raise CorruptFileError(f"{file}: not a seqlab model file, or a damaged one ({reason})") from None
    if meta.get("adapter"):
        del tensors
        model, adapter = model_from_checkpoint(file, device=device)
        info: dict | None = adapter.info()
    else:
        config = model_file_config(file, meta)
        embeddings, head = tensors.get("embeddings.weight"), tensors.get("lm_head.weight")
        if config is None or embeddings is None or head is None or embeddings.dim() != 2:
            raise CorruptFileError(
                f"{file}: this model file records no adapter, and no config and language-model weights to rebuild "
                "it from; build the model yourself and use seqlab.checkpoint.load_model"
            )
        tied = head.shape == embeddings.shape and torch.equal(head, embeddings)
        del tensors
        try:
            model = LanguageModel(config, int(embeddings.shape[0]), tie_embeddings=tied)
        except ConfigError as exc:
            raise CorruptFileError(f"{file}: recorded model does not build: {exc}") from None
        if device is not None:
            model = model.to(device)
        load_model(file, model)
        model.eval()
        info = None
    step = meta.get("step")
    return {
        "path": file,
        "adapter": info,
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        **model_summary(model),
    }
