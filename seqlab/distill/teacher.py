"""The teacher of a distillation run from a path: a seqlab model file, a training run or checkpoint folder, or a
local Hugging Face directory (``config.json`` + safetensors, read by ``seqlab.interop.hf.load``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from seqlab.checkpoint import latest_checkpoint, load_model, model_file_config, read_model_file
from seqlab.errors import ConfigError, InputError


def load_teacher(path: str | os.PathLike, device=None):
    """A ``LanguageModel`` (frozen, in eval mode) from ``path``; a model file's ``adapter_info`` is kept on it."""
    from seqlab.models import LanguageModel

    where = Path(path)
    if where.is_dir() and (where / "config.json").is_file():
        from seqlab.interop.hf import load

        model = load(where)
    else:
        if where.is_dir():
            if (where / "model.safetensors").is_file():
                where = where / "model.safetensors"
            else:
                where = latest_checkpoint(where) / "model.safetensors"
        if not where.is_file():
            raise InputError(f"--teacher {path}: no such model file, run folder or HF directory")
        tensors, meta = read_model_file(where)
        config = model_file_config(where, meta)
        if config is None or "embeddings.weight" not in tensors:
            raise ConfigError(f"--teacher {where}: not a seqlab language model file (no config or embeddings)")
        tied = "lm_head.weight" in tensors and torch.equal(tensors["lm_head.weight"], tensors["embeddings.weight"])
        model = LanguageModel(config, int(tensors["embeddings.weight"].shape[0]), tie_embeddings=tied)
        load_model(where, model)
        if meta.get("adapter") is not None:
            model.adapter_info = meta["adapter"]
    if device is not None:
        model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
