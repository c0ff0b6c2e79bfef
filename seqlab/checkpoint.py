"""Training checkpoints: model weights, optimizer, scheduler, data position, carried state and RNG states.

Layout of a checkpoint directory::

    <dir>/step-00000040/model.safetensors     weights (kind "seqlab.checkpoint.model")
    <dir>/step-00000040/trainer.safetensors   optimizer tensors + RNG tensors, JSON rest in the metadata
    <dir>/step-00000040/state-<i>.safetensors carried RecurrentState of micro-batch i (when there is one)
    <dir>/latest                              "step-00000040" and its checksum, written atomically *last*

Every file is written atomically (temp file + fsync + rename), and ``latest`` is only moved once the whole
step folder is on disk, so a crash mid-save leaves the previous checkpoint as ``latest``. Nothing is pickled:
tensors are safetensors, the rest is JSON. Format version 2: every byte of every file is checksummed (the
JSON metadata too: optimizer settings, scheduler step, RNG states, trainer position, model config and adapter
settings), and ``latest`` carries a checksum of its line; a truncated or altered file raises
``CorruptFileError`` naming it. Version 1 checkpoints and model files (tensor bytes checksummed only) still load.
Older step folders are pruned after each save (``prune_checkpoints``, keep-last-N); the one ``latest`` names is
never removed.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqlab.errors import ConfigError, CorruptFileError, SeqlabError
from seqlab.io import atomic_write_bytes, fsync_dir
from seqlab.safetensors_io import read_tensors, write_tensors
from seqlab.state import RecurrentState, require_fingerprint

MODEL_FORMAT = "seqlab.checkpoint.model"
TRAINER_FORMAT = "seqlab.checkpoint.trainer"
#: 2: the checksum covers every byte of a file (metadata included); 1: tensor bytes only (still read)
FORMAT_VERSION = 2
FULL_CHECKSUM_SINCE = 2
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d{8,})")
_DELETING = ".deleting"


def step_dirname(step: int) -> str:
    return f"step-{int(step):08d}"


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a model file written by ``save_model`` (checked: format, version, checksum)."""
    return read_tensors(path, kind=MODEL_FORMAT, version=FORMAT_VERSION, full_checksum_since=FULL_CHECKSUM_SINCE)


def read_trainer_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a checkpoint's ``trainer.safetensors`` (checked: format, version, checksum)."""
    return read_tensors(path, kind=TRAINER_FORMAT, version=FORMAT_VERSION, full_checksum_since=FULL_CHECKSUM_SINCE)


def model_file_config(path: str | os.PathLike, meta: dict):
    """The ``BackboneConfig`` recorded in a model file's metadata (None when it records none); a bad key or
    value is a ``CorruptFileError`` naming the file and the key."""
    from seqlab.config import BackboneConfig

    config = meta.get("config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{path}: the recorded model config is not a JSON object")
    try:
        return BackboneConfig.from_dict(config)
    except ConfigError as exc:
        raise CorruptFileError(f"{path}: recorded model config: {exc}") from None


# ------------------------------------------------------------------------------------------------------
def save_model(path: str | os.PathLike, model: torch.nn.Module, extra: dict | None = None) -> Path:
    """Weights of ``model`` (tied parameters are written once per name, as copies) with its fingerprint, its
    config and, for a model built by a domain adapter, the adapter's name and settings (``adapter_info``). A
    LASER'd model (``model.low_rank``, ``seqlab.posttrain.laser``) writes its factors, a quantized one
    (``model.quantization``) its packed codes; a model carrying both is refused (ConfigError)."""
    if getattr(model, "low_rank", None):  # a LASER'd model (seqlab.posttrain.laser): factors, not dense matrices
        from seqlab.posttrain.laser import save_low_rank

        return save_low_rank(path, model, extra)
    if getattr(model, "quantization", None):  # a model quantized by seqlab.quant.quantize_model: packed codes
        from seqlab.quant.storage import save_quantized

        return save_quantized(path, model, extra)
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    meta = model_meta(model)
    meta.update(extra or {})
    return write_tensors(path, tensors, kind=MODEL_FORMAT, version=FORMAT_VERSION, meta=meta)


def model_meta(model: torch.nn.Module) -> dict[str, Any]:
    """The metadata a model file records about ``model``: fingerprint, config and adapter info."""
    meta: dict[str, Any] = {"fingerprint": getattr(model, "fingerprint", None)}
    adapter_info = getattr(model, "adapter_info", None)
    if adapter_info is not None:
        meta["adapter"] = jsonable(adapter_info)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        meta["config"] = config.to_dict()
    return meta


def load_model(path: str | os.PathLike, model: torch.nn.Module) -> dict:
    """Load weights written by ``save_model`` into ``model`` (in place); refuse another config's weights."""
    tensors, meta = read_model_file(path)
    require_fingerprint(meta.get("fingerprint"), model, "checkpoint", str(path))
    if meta.get("low_rank") is not None:  # seqlab.posttrain.laser's file: low-rank layers installed, then loaded
        from seqlab.posttrain.laser import load_low_rank

        return load_low_rank(path, model, tensors, meta)
    if meta.get("quantization") is not None:  # seqlab.quant's quantized model file: the layers are swapped in
        from seqlab.quant.storage import load_quantized

        return load_quantized(path, model, tensors, meta)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CorruptFileError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise CorruptFileError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(own[name].shape)}"
            )
        if tensor.dtype != own[name].dtype:
            raise CorruptFileError(f"{path}: {name} has dtype {tensor.dtype}, the model's is {own[name].dtype}")
    model.load_state_dict(tensors)
    return meta


# ------------------------------------------------------------------------------------------------------
def jsonable(value):
    """``value`` as plain JSON values (str/int/float/bool/None, lists, str-keyed dicts; a one-element tensor as its
    number); TypeError naming the type of anything else."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
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
                scalars.setdefault(str(index), {})[key] = jsonable(value)
    return tensors, {"param_groups": jsonable(state_dict["param_groups"]), "scalars": scalars}


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
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
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
def save_checkpoint(
    directory: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_meta: dict,
    states: list[RecurrentState | None] | None = None,
) -> Path:
    """Write ``<directory>/step-XXXXXXXX/`` and then move ``latest`` to it. Returns the step folder."""
    directory = Path(directory)
    folder = directory / step_dirname(step)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / "model.safetensors", model, {"step": int(step)})
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    rng_tensors, rng_meta = rng_snapshot()
    sched = {k: jsonable(v) for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    states = list(states or [])
    for i, state in enumerate(states):
        if state is not None:
            state.save(folder / f"state-{i}.safetensors")
    meta = {
        "step": int(step),
        "optimizer": opt_meta,
        "scheduler": sched,
        "rng": rng_meta,
        "trainer": jsonable(trainer_meta),
        "states": [s is not None for s in states],
        "fingerprint": getattr(model, "fingerprint", None),
    }
    write_tensors(
        folder / "trainer.safetensors",
        {**opt_tensors, **rng_tensors},
        kind=TRAINER_FORMAT,
        version=FORMAT_VERSION,
        meta=meta,
    )
    atomic_write_bytes(directory / LATEST, _latest_bytes(folder.name))
    return folder


def _latest_bytes(name: str) -> bytes:
    """``latest``'s bytes: the step folder's name and the SHA-256 of that name on one line (format 1: the name
    alone; a truncated line of format 2 is never a valid format 1 line, it lacks the newline)."""
    return f"{name} sha256:{hashlib.sha256(name.encode()).hexdigest()}\n".encode()


def _step_folders(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for entry in directory.iterdir() if directory.is_dir() else []:
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            out.append((int(match.group(1)), entry))
    return sorted(out)


def latest_checkpoint(directory: str | os.PathLike) -> Path:
    """The step folder ``latest`` points to; FileNotFoundError when there is no checkpoint, CorruptFileError
    when ``latest`` is damaged or names no step folder (the message lists the step folders there)."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"{directory}: no checkpoint here (no '{LATEST}' file)")
    data = pointer.read_bytes()
    name = data.split(b" ", 1)[0].split(b"\n", 1)[0].decode("utf-8", "replace")
    legacy = data == (name + "\n").encode()  # format 1: the name alone
    if not _STEP_DIR.fullmatch(name) or not (legacy or data == _latest_bytes(name)):
        raise CorruptFileError(
            f"{pointer}: damaged (it should name a step folder and its checksum); " + _repair_hint(directory)
        )
    if not (directory / name).is_dir():
        raise CorruptFileError(
            f"{pointer}: points to {name!r}, which is not a step folder in {directory}; " + _repair_hint(directory)
        )
    return directory / name


def _repair_hint(directory: Path) -> str:
    folders = [p.name for _, p in _step_folders(directory)]
    if not folders:
        return "there is no step folder to resume from"
    return (
        f"step folders here: {', '.join(folders[-5:])}; to resume from one, write its name into "
        f"{directory / LATEST} (echo {folders[-1]} > {directory / LATEST}, or seqlab.checkpoint.set_latest)"
    )


def set_latest(directory: str | os.PathLike, step_folder: str | os.PathLike) -> Path:
    """Point ``latest`` at ``step_folder`` (a repair after a damaged ``latest``); the folder must exist."""
    directory, name = Path(directory), Path(step_folder).name
    if not _STEP_DIR.fullmatch(name) or not (directory / name).is_dir():
        raise FileNotFoundError(f"{directory / name}: no such step folder")
    atomic_write_bytes(directory / LATEST, _latest_bytes(name))
    return directory / name


def prune_checkpoints(directory: str | os.PathLike, keep: int | None) -> list[Path]:
    """Remove all but the newest ``keep`` step folders up to ``latest`` (None: keep all). The folder ``latest``
    names is always kept, and so are folders of later steps than it (left by an interrupted run; resuming
    rewrites them). Each folder is first renamed to ``.step-XXXXXXXX.deleting`` and then removed, so a crash
    mid-prune leaves only whole step folders under their names; leftovers are removed by the next prune."""
    directory = Path(directory)
    removed: list[Path] = []
    for entry in directory.iterdir() if directory.is_dir() else []:
        if entry.name.startswith(".step-") and entry.name.endswith(_DELETING) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    if keep is None:
        return removed
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep_checkpoints must be an int >= 1 or None (keep all), got {keep!r}")
    try:
        latest = latest_checkpoint(directory)
    except (FileNotFoundError, CorruptFileError):
        return removed  # never guess which checkpoint a resume would pick
    match = _STEP_DIR.fullmatch(latest.name)
    assert match is not None  # latest_checkpoint only returns step folders
    latest_step = int(match.group(1))
    older = [p for step, p in _step_folders(directory) if step <= latest_step and p != latest]
    for folder in older[: max(0, len(older) - (keep - 1))]:
        doomed = folder.with_name(f".{folder.name}{_DELETING}")
        os.replace(folder, doomed)
        removed.append(folder)
    if removed:
        fsync_dir(directory)
    for folder in removed:
        shutil.rmtree(folder.with_name(f".{folder.name}{_DELETING}"), ignore_errors=True)
    return removed


def has_checkpoint(directory: str | os.PathLike | None) -> bool:
    return directory is not None and (Path(directory) / LATEST).is_file()


def load_checkpoint(
    directory: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[dict, list[RecurrentState | None]]:
    """Restore model, optimizer, scheduler and RNG states in place from ``latest``.

    Returns ``(trainer_meta, states)``. All files are read and checked before anything is changed, so a
    corrupt checkpoint leaves the model and optimizer as they were.
    """
    folder = latest_checkpoint(directory)
    model_path, trainer_path = folder / "model.safetensors", folder / "trainer.safetensors"
    tensors, meta = read_trainer_file(trainer_path)
    require_fingerprint(meta.get("fingerprint"), model, "checkpoint", str(trainer_path))
    states: list[RecurrentState | None] = []
    present_list = meta.get("states", [])
    if not isinstance(present_list, list):
        raise CorruptFileError(f"{trainer_path}: trainer metadata 'states' is not a list")
    for i, present in enumerate(present_list):
        states.append(RecurrentState.load(folder / f"state-{i}.safetensors", model) if present else None)
    try:
        opt_state = _optimizer_join(tensors, meta["optimizer"])
        sched_state = dict(meta["scheduler"])
        rng_meta, trainer_meta = meta["rng"], meta["trainer"]
        if not isinstance(trainer_meta, dict):
            raise TypeError("'trainer' is not an object")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptFileError(f"{trainer_path}: trainer metadata is incomplete ({exc!r})") from None
    # a transaction: what does not fit raises CorruptFileError and the live objects are rolled back
    old_opt, old_sched, old_rng = optimizer.state_dict(), scheduler.state_dict(), rng_snapshot()
    try:
        _check_scheduler(trainer_path, scheduler, sched_state)
        optimizer.load_state_dict(opt_state)
        sched_state["lr_lambdas"] = [None] * len(optimizer.param_groups)
        scheduler.load_state_dict(sched_state)
        rng_restore(tensors, rng_meta)
        load_model(model_path, model)  # checks every weight before it changes the model
    except BaseException as exc:
        optimizer.load_state_dict(old_opt)
        scheduler.load_state_dict(old_sched)
        rng_restore(*old_rng)
        if isinstance(exc, (SeqlabError, OSError)) or not isinstance(exc, Exception):
            raise
        raise CorruptFileError(
            f"{trainer_path}: optimizer, scheduler or RNG state does not fit this run ({' '.join(repr(exc).split())})"
        ) from None
    return trainer_meta, states


_SCHEDULER_KEYS = ("last_epoch", "_step_count", "base_lrs", "_last_lr")


def _check_scheduler(where, scheduler, state: dict) -> None:
    """The stored scheduler state holds the keys a resume needs, and every key the live scheduler also has holds
    a value of the same kind (keys another torch version adds or drops are left alone)."""
    own = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    missing = [k for k in _SCHEDULER_KEYS if k in own and k not in state]
    if missing:
        raise CorruptFileError(f"{where}: scheduler state lacks {missing}")

    def fits(have, want) -> bool:
        if isinstance(want, bool) or isinstance(have, bool):
            return isinstance(want, bool) and isinstance(have, bool)
        if isinstance(want, int):
            return isinstance(have, int)
        if isinstance(want, float):
            return isinstance(have, (int, float)) and math.isfinite(have)
        if isinstance(want, (list, tuple)):
            return isinstance(have, (list, tuple)) and len(have) == len(want) and all(map(fits, have, want))
        return want is None or type(have) is type(want)

    for key, value in own.items():
        if key in state and not fits(state[key], value):
            raise CorruptFileError(f"{where}: scheduler state {key} = {state[key]!r} does not fit ({value!r} now)")
    if isinstance(state.get("last_epoch"), int) and state["last_epoch"] < -1:
        raise CorruptFileError(f"{where}: scheduler state last_epoch = {state['last_epoch']} is negative")


__all__ = [
    "has_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "model_file_config",
    "prune_checkpoints",
    "read_model_file",
    "read_trainer_file",
    "save_checkpoint",
    "save_model",
    "set_latest",
]
