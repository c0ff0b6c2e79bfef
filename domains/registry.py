"""The adapter registry (adapters are found by name: checkpoints, stores and the CLI record the name) and
rebuilding an adapter, or an adapter and its model, from a model file or checkpoint that recorded them;
``describe_model`` summarises such a file (``seqlab describe MODEL``).

``from_pretrained(dir) -> (model, adapter)`` / ``save_pretrained(model, dir, adapter)``: a model and its adapter
in one directory of Hugging Face's conventions. The core (``seqlab.pretrained``, ``LanguageModel.from_pretrained``)
reads and writes the model and never imports this room; the adapter's own files are written beside it from here:
``adapter.json`` (``{"name", "settings", "files", "model"}``) and one file per setting the adapter keeps apart
(``pretrained_files``: an HF tokenizer's ``tokenizer.json``). A transformers directory has no adapter.json: its
``tokenizer.json`` becomes an ``HFTokenizerAdapter``.
"""

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
    "from_pretrained",
    "get_adapter",
    "model_from_checkpoint",
    "register_adapter",
    "save_pretrained",
]

ADAPTER_FILE = "adapter.json"

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

    for module in ("bytes", "subword", "hf_tokenizer", "audio", "dna", "video", "memory"):
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
    if _is_pretrained_dir(path):  # save_pretrained's directory, or a transformers one with a tokenizer.json
        return from_pretrained(path, device=device)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "latest")):
        raise FileNotFoundError(
            f"{path}: no checkpoint here (no 'latest' file), and no pretrained model either (no config.json)"
        )
    if os.path.isdir(path):
        path = os.path.join(latest_checkpoint(path), "model.safetensors")
    _, meta = read_tensors(path, kind=MODEL_FORMAT, version=FORMAT_VERSION, full_checksum_since=2)
    info, config = meta.get("adapter"), meta.get("config")
    if not info:
        raise CorruptFileError(
            f"{path}: this model file records no adapter (it was not built with Adapter.build_model); load the "
            "model alone with LanguageModel.from_pretrained(path) (or SequenceModel's)"
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


# ------------------------------------------------------------------------------------------------------
# pretrained directories: the model (seqlab.pretrained) with its adapter's files beside it
# ------------------------------------------------------------------------------------------------------
def _is_pretrained_dir(path: str | os.PathLike) -> bool:
    """A directory with a config.json and no training checkpoint's ``latest``."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and not (os.path.exists(os.path.join(path, "latest")))
    )


def _plain_name(name, where) -> str:
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
        raise CorruptFileError(f"{where}: {name!r} is not a file name in its directory")
    return name


def _check_fits(adapter: Adapter, model: torch.nn.Module, where) -> None:
    spec = adapter.input_spec
    if spec.kind == "tokens":
        vocab = getattr(model, "vocab_size", None)
        if vocab != spec.vocab_size:
            raise ConfigError(
                f"{where}: the adapter {adapter.name!r} has a vocabulary of {spec.vocab_size} but the model's "
                f"embedding has {vocab} rows"
            )
    elif getattr(model, "d_input", None) != spec.width:
        raise ConfigError(
            f"{where}: the adapter {adapter.name!r} gives frames of {spec.width} features but the model takes "
            f"{getattr(model, 'd_input', None)}"
        )


def save_pretrained(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    adapter: Adapter | None = None,
    *,
    max_shard_size: int | str | None = "5GB",
):
    """Write ``model`` and ``adapter`` (default: the adapter the model was built by, ``model.adapter_info``) as
    one pretrained directory: the model as ``seqlab.pretrained.save_pretrained`` writes it, ``adapter.json`` and
    the adapter's own files (an HF tokenizer's ``tokenizer.json``), all or nothing. Returns the directory;
    ``from_pretrained`` loads both back."""
    import json

    from seqlab.pretrained import save_pretrained as save_model_dir

    stamp = getattr(model, "adapter_info", None)
    if adapter is None:
        if not stamp:
            raise ConfigError(
                "save_pretrained: this model was not built by an adapter; give the adapter, or save the model alone "
                "with model.save_pretrained(dir)"
            )
        adapter = adapter_from_info(stamp)
    _check_fits(adapter, model, "save_pretrained")
    settings = dict(adapter.settings())
    files: dict[str, bytes] = {}
    refs: dict[str, str] = {}
    for key, name in getattr(type(adapter), "pretrained_files", {}).items():
        value = settings.pop(key, None)
        if isinstance(value, str):
            files[name] = value.encode("utf-8")
            refs[key] = name
        elif value is not None:
            settings[key] = value
    document: dict = {"name": adapter.name, "settings": settings, "files": refs}
    options = stamp.get("model") if isinstance(stamp, dict) and stamp.get("name") == adapter.name else None
    if options:
        document["model"] = options
    files[ADAPTER_FILE] = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return save_model_dir(
        model,
        directory,
        max_shard_size=max_shard_size,
        files=files,
        adapter={"name": adapter.name, "file": ADAPTER_FILE},
    )


def _adapter_from_file(folder: str) -> tuple[Adapter, dict | None]:
    """The adapter of ``folder/adapter.json`` (its kept-apart settings read from their files) and its recorded
    build options."""
    import json

    path = os.path.join(folder, ADAPTER_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: no such file, but config.json lists it") from None
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not a readable adapter file ({' '.join(str(exc).split())})") from None
    if not isinstance(document, dict) or not isinstance(document.get("name"), str):
        raise CorruptFileError(f"{path}: expected a JSON object with the adapter's name")
    refs = document.get("files") or {}
    settings = document.get("settings") or {}
    if not isinstance(refs, dict) or not isinstance(settings, dict):
        raise CorruptFileError(f"{path}: 'files' and 'settings' must be JSON objects")
    try:
        cls = get_adapter(document["name"])
    except ConfigError as exc:
        raise CorruptFileError(f"{path}: {exc}") from None
    paths = {key: os.path.join(folder, _plain_name(name, path)) for key, name in refs.items()}
    reader = getattr(cls, "from_pretrained_files", None)
    try:
        if reader is not None:
            adapter = reader(dict(settings), paths)
        else:
            for key, file in paths.items():
                try:
                    with open(file, encoding="utf-8") as handle:
                        settings[key] = handle.read()
                except (OSError, UnicodeError) as exc:
                    raise CorruptFileError(f"{file}: not readable ({exc})") from None
            adapter = cls(**settings)
    except TypeError as exc:
        raise CorruptFileError(
            f"{path}: adapter {document['name']!r} cannot be rebuilt from its settings: {exc}"
        ) from None
    options = document.get("model")
    return adapter, options if isinstance(options, dict) else None


def from_pretrained(source: str | os.PathLike, *, dtype=None, device=None) -> tuple[torch.nn.Module, Adapter]:
    """``(model, adapter)`` from one directory: one written by ``save_pretrained`` (the adapter from its
    adapter.json), a transformers directory with a ``tokenizer.json`` (an ``HFTokenizerAdapter`` of the model's
    vocabulary; config.json's ``eos_token_id`` ends generation), a directory the core's
    ``model.save_pretrained`` wrote for a model built by an adapter (config.json records it); a model file or
    checkpoint folder goes to ``model_from_checkpoint``. ``dtype`` / ``device`` as in
    ``LanguageModel.from_pretrained``. The model is in eval mode and stamped with ``adapter_info``, so
    ``seqlab.checkpoint.save_model`` records the adapter."""
    from seqlab.pretrained import is_seqlab_config, load_pretrained, read_config

    path = os.fspath(source)
    if not _is_pretrained_dir(path):
        model, adapter = model_from_checkpoint(path, device=device)
        return (model if dtype is None else model.to(dtype)), adapter
    document, config_path = read_config(path)
    model = load_pretrained(path, dtype=dtype, device=device)
    options = None
    recorded = document.get("adapter")
    tokenizer = os.path.join(path, "tokenizer.json")
    if is_seqlab_config(document) and ADAPTER_FILE in (document.get("files") or []):
        adapter, options = _adapter_from_file(path)
        where = os.path.join(path, ADAPTER_FILE)
    elif is_seqlab_config(document) and isinstance(recorded, dict) and "settings" in recorded:
        try:
            adapter = adapter_from_info(recorded)
        except ConfigError as exc:
            raise CorruptFileError(f"{config_path}: recorded adapter: {exc}") from None
        options, where = recorded.get("model"), str(config_path)
    elif os.path.isfile(tokenizer):
        from .hf_tokenizer import HFTokenizerAdapter

        eos = document.get("eos_token_id")
        vocab = getattr(model, "vocab_size", None)
        ok = isinstance(eos, int) and not isinstance(eos, bool) and isinstance(vocab, int) and 0 <= eos < vocab
        adapter = HFTokenizerAdapter.from_file(tokenizer, vocab_size=vocab, eos_id=eos if ok else None)
        where = tokenizer
    else:
        raise CorruptFileError(
            f"{path}: no {ADAPTER_FILE} or tokenizer.json, and config.json records no adapter; load the model "
            "alone with LanguageModel.from_pretrained (or give the adapter: seqlab.domains.registry.save_pretrained)"
        )
    _check_fits(adapter, model, where)
    model.adapter_info = {**adapter.info(), "model": dict(options)} if options else adapter.info()
    return model, adapter
