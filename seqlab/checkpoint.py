"""Training checkpoints: model weights, optimizer, scheduler, data position, carried state and RNG states.

Layout of a checkpoint directory::

    <dir>/step-00000040/model.safetensors     weights (kind "seqlab.checkpoint.model")
    <dir>/step-00000040/trainer.safetensors   optimizer tensors + RNG tensors, JSON rest in the metadata
    <dir>/step-00000040/state-<i>.safetensors carried RecurrentState of micro-batch i (when there is one)
    <dir>/latest                              "step-00000040", written atomically *last*

Every file is written atomically (temp file + fsync + rename), and ``latest`` is only moved once the whole
step folder is on disk, so a crash mid-save leaves the previous checkpoint as ``latest``. Nothing is pickled:
tensors are safetensors, the rest is JSON; a truncated or altered file raises ``CorruptFileError`` naming it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqlab.errors import CorruptFileError
from seqlab.io import atomic_write_bytes
from seqlab.safetensors_io import read_tensors, write_tensors
from seqlab.state import RecurrentState, require_fingerprint

MODEL_FORMAT = "seqlab.checkpoint.model"
TRAINER_FORMAT = "seqlab.checkpoint.trainer"
FORMAT_VERSION = 1
LATEST = "latest"


def step_dirname(step: int) -> str:
    return f"step-{int(step):08d}"


# ------------------------------------------------------------------------------------------------------
def save_model(path: str | os.PathLike, model: torch.nn.Module, extra: dict | None = None) -> Path:
    """Weights of ``model`` (tied parameters are written once per name, as copies) with its fingerprint, its
    config and, for a model built by a domain adapter, the adapter's name and settings (``adapter_info``)."""
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    meta: dict[str, Any] = {"fingerprint": getattr(model, "fingerprint", None)}
    adapter_info = getattr(model, "adapter_info", None)
    if adapter_info is not None:
        meta["adapter"] = _jsonable(adapter_info)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        meta["config"] = config.to_dict()
    meta.update(extra or {})
    return write_tensors(path, tensors, kind=MODEL_FORMAT, version=FORMAT_VERSION, meta=meta)


def load_model(path: str | os.PathLike, model: torch.nn.Module) -> dict:
    """Load weights written by ``save_model`` into ``model`` (in place); refuse another config's weights."""
    tensors, meta = read_tensors(path, kind=MODEL_FORMAT, version=FORMAT_VERSION)
    require_fingerprint(meta.get("fingerprint"), model, "checkpoint", str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CorruptFileError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise CorruptFileError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is "
                                   f"{tuple(own[name].shape)}")
    model.load_state_dict(tensors)
    return meta


# ------------------------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint JSON")


def _optimizer_split(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = _jsonable(value)
    return tensors, {"param_groups": _jsonable(state_dict["param_groups"]), "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_snapshot() -> tuple[dict[str, torch.Tensor], dict]:
    """Torch CPU (and CUDA) RNG states as uint8 tensors; python ``random`` and numpy as JSON / tensors."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def rng_restore(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------------------
def save_checkpoint(directory: str | os.PathLike, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, trainer_meta: dict,
                    states: list[RecurrentState | None] | None = None) -> Path:
    """Write ``<directory>/step-XXXXXXXX/`` and then move ``latest`` to it. Returns the step folder."""
    directory = Path(directory)
    folder = directory / step_dirname(step)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "model.safetensors", model, {"step": int(step)})
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    rng_tensors, rng_meta = rng_snapshot()
    sched = {k: _jsonable(v) for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    states = list(states or [])
    for i, state in enumerate(states):
        if state is not None:
            state.save(folder / f"state-{i}.safetensors")
    meta = {"step": int(step), "optimizer": opt_meta, "scheduler": sched, "rng": rng_meta,
            "trainer": _jsonable(trainer_meta), "states": [s is not None for s in states],
            "fingerprint": getattr(model, "fingerprint", None)}
    write_tensors(folder / "trainer.safetensors", {**opt_tensors, **rng_tensors}, kind=TRAINER_FORMAT,
                  version=FORMAT_VERSION, meta=meta)
    atomic_write_bytes(directory / LATEST, (folder.name + "\n").encode())
    return folder


def latest_checkpoint(directory: str | os.PathLike) -> Path:
    """The step folder ``latest`` points to; FileNotFoundError when there is no checkpoint."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"{directory}: no checkpoint here (no '{LATEST}' file)")
    name = pointer.read_bytes().decode("utf-8", "replace").strip()
    if not name.startswith("step-") or "/" in name or not (directory / name).is_dir():
        raise CorruptFileError(f"{pointer}: points to {name!r}, which is not a step folder in {directory}")
    return directory / name


def has_checkpoint(directory: str | os.PathLike | None) -> bool:
    return directory is not None and (Path(directory) / LATEST).is_file()


def load_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> tuple[dict, list[RecurrentState | None]]:
    """Restore model, optimizer, scheduler and RNG states in place from ``latest``.

    Returns ``(trainer_meta, states)``. All files are read and checked before anything is changed, so a
    corrupt checkpoint leaves the model and optimizer as they were.
    """
    folder = latest_checkpoint(directory)
    model_path, trainer_path = folder / "model.safetensors", folder / "trainer.safetensors"
    tensors, meta = read_tensors(trainer_path, kind=TRAINER_FORMAT, version=FORMAT_VERSION)
    require_fingerprint(meta.get("fingerprint"), model, "checkpoint", str(trainer_path))
    states: list[RecurrentState | None] = []
    for i, present in enumerate(meta.get("states", [])):
        states.append(RecurrentState.load(folder / f"state-{i}.safetensors", model) if present else None)
    try:
        opt_state = _optimizer_join(tensors, meta["optimizer"])
        sched_state = dict(meta["scheduler"])
        rng_meta, trainer_meta = meta["rng"], meta["trainer"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{trainer_path}: trainer metadata is incomplete ({exc})") from None
    load_model(model_path, model)
    optimizer.load_state_dict(opt_state)
    sched_state["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched_state)
    rng_restore(tensors, rng_meta)
    return trainer_meta, states


__all__ = ["has_checkpoint", "latest_checkpoint", "load_checkpoint", "load_model", "save_checkpoint", "save_model"]
