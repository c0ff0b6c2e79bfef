"""The run directory of a training run (``seqlab train --out DIR``, ``seqlab.pipelines.training.train_run``).

A run directory holds::

    DIR/latest, DIR/step-XXXXXXXX/   training checkpoints (seqlab.checkpoint; a resume continues from them)
    DIR/model.safetensors            the final model (seqlab.checkpoint.save_model)
    DIR/train.jsonl                  one JSON line per optimizer step (the Trainer's log)
    DIR/run.json                     the run's adapter, model and training settings, its data, and the summary

This module is core (no adapters, no stores): the run.json record with its checksum, the settings a resume takes
from the latest checkpoint and run.json, setting a previous run aside for ``overwrite``, the merge of given and
recorded settings into a ``TrainConfig`` and a ``BackboneConfig``, and the check that a model fits the machine.
Settings are named by the run's option names (``steps``, ``batch_size``, ``d_model``, ...: the keys of a
``[train]`` TOML table, the ``seqlab train`` flags without their dashes); errors name them as ``--option``.
Called by ``seqlab.pipelines.training`` (the whole run) and the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from seqlab.config import MOE_FIELDS
from seqlab.errors import ConfigError, CorruptFileError, InputError

__all__ = [
    "LOG_FILE",
    "MODEL_FILE",
    "MODEL_OPTIONS",
    "MOE_OPTIONS",
    "PREVIOUS_RUN",
    "RUN_DEFAULTS",
    "RUN_FILE",
    "RUN_FORMAT_VERSION",
    "TRAIN_OPTIONS",
    "backbone_config",
    "check_model_fits",
    "checkpoint_settings",
    "holds_run",
    "last_loss",
    "memory_bytes",
    "option_flag",
    "option_names",
    "read_run",
    "remove_previous_run",
    "resolve_device",
    "run_checksum",
    "run_train_config",
    "set_aside_previous_run",
    "train_settings",
    "write_run",
]

RUN_FILE = "run.json"
MODEL_FILE = "model.safetensors"
LOG_FILE = "train.jsonl"
PREVIOUS_RUN = ".previous-run"  # an overwritten run waits here until the new run has finished
RUN_FORMAT_VERSION = 2  # run.json: 2 carries a checksum of its contents

#: model option -> the BackboneConfig field of the same name, with the default of a new run
MODEL_OPTIONS: dict[str, Any] = {
    "ssm": "mamba1",
    "d_model": 128,
    "n_layer": 4,
    "d_state": None,
    "d_conv": 4,
    "expand": 2,
    "headdim": 64,
    "chunk_size": 256,
}
#: MoE options: each the BackboneConfig field of the same name (None: MoESettings' default). ``moe_experts``
#: turns every layer's feed-forward into a mixture of experts (``ffn="moe"``); the others need it.
MOE_OPTIONS: tuple[str, ...] = tuple(name for name in MOE_FIELDS if name != "moe_renormalize")  # Jamba's, HF only
#: training option -> TrainConfig field (defaults: TrainConfig's, except RUN_DEFAULTS)
TRAIN_OPTIONS: dict[str, str] = {
    "steps": "max_steps",
    "batch_size": "batch_size",
    "window": "window",
    "lr": "lr",
    "min_lr_ratio": "min_lr_ratio",
    "weight_decay": "weight_decay",
    "warmup": "warmup_steps",
    "grad_accum": "grad_accum",
    "grad_clip": "grad_clip",
    "eval_every": "eval_every",
    "eval_windows": "eval_windows",
    "checkpoint_every": "checkpoint_every",
    "seed": "seed",
    "bf16": "bf16",
    "carry_state": "carry_state",
    "pack": "pack",
    "keep_checkpoints": "keep_checkpoints",
}
#: a run's own defaults where they differ from TrainConfig's (a run always checkpoints; option names)
RUN_DEFAULTS: dict[str, Any] = {"checkpoint_every": 100, "eval_every": 100}


def option_flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``: how messages name an option."""
    return "--" + name.replace("_", "-")


def option_names(message: str, prefix: str, options: dict[str, str]) -> str:
    """'TrainConfig.max_steps must be ...' -> '--steps must be ...' (``options``: option -> field)."""
    for option, field in sorted(options.items(), key=lambda kv: -len(kv[1])):
        message = message.replace(f"{prefix}.{field}", option_flag(option))
    return message


# ------------------------------------------------------------------------------------------------------
# run.json


def run_checksum(record: dict) -> str:
    """SHA-256 of the record's canonical JSON, without its ``checksum`` key."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_run(out: str | os.PathLike, record: dict) -> None:
    """Write ``out/run.json`` atomically, with a checksum of its contents (a resume trusts its data and
    settings)."""
    from seqlab.io import atomic_write_bytes

    record = {k: v for k, v in record.items() if k != "checksum"}
    record["format_version"] = RUN_FORMAT_VERSION
    record["checksum"] = run_checksum(record)
    atomic_write_bytes(Path(out) / RUN_FILE, (json.dumps(record, indent=2) + "\n").encode())


def read_run(out: str | os.PathLike) -> dict:
    """The run recorded in ``out/run.json`` ({} when there is none); a damaged or edited file raises
    CorruptFileError naming it."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON, damaged or truncated ({' '.join(str(exc).split())})") from None
    if not isinstance(run, dict):
        raise CorruptFileError(f"{path}: not a seqlab train run file (not a JSON object)")
    version = run.get("format_version", 1)
    if "checksum" in run or version != 1:
        if run.get("checksum") != run_checksum(run):
            raise CorruptFileError(
                f"{path}: checksum mismatch, the file was altered or damaged (start over with "
                "--overwrite, or restore the file)"
            )
    for key in ("train", "data", "model", "adapter"):
        if key in run and not isinstance(run[key], dict):
            raise CorruptFileError(f"{path}: {key} is not a JSON object")
    return run


# ------------------------------------------------------------------------------------------------------
# what a run directory holds


def checkpoint_settings(out: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(adapter info, backbone config dict, train config dict) recorded in the latest checkpoint of ``out``."""
    from seqlab.checkpoint import latest_checkpoint, model_file_config, read_model_file, read_trainer_file

    folder = latest_checkpoint(out)
    _, meta = read_model_file(folder / "model.safetensors")
    _, trainer_meta = read_trainer_file(folder / "trainer.safetensors")
    if not meta.get("adapter") or not meta.get("config"):
        raise InputError(
            f"{folder}: the checkpoint records no adapter or model config (not made by seqlab train "
            "or a model built by an adapter): it cannot be resumed from the command line"
        )
    model_file_config(folder / "model.safetensors", meta)  # a bad key or value names the file
    trainer = trainer_meta.get("trainer")
    config = trainer.get("config") if isinstance(trainer, dict) else None
    if not isinstance(meta["adapter"], dict) or not isinstance(config or {}, dict):
        raise CorruptFileError(f"{folder}: the recorded adapter or training settings are not JSON objects")
    return meta["adapter"], meta["config"], dict(config or {})


def holds_run(out: str | os.PathLike) -> str | None:
    """What of a run ``out`` holds ("a checkpoint (step-00000030)", "a training run (run.json)"), or None."""
    from seqlab.checkpoint import has_checkpoint

    out = Path(out)
    if has_checkpoint(out):
        words = (out / "latest").read_bytes().decode("utf-8", "replace").split()
        return f"a checkpoint ({words[0] if words else 'latest'})"
    for name in (MODEL_FILE, RUN_FILE):
        if (out / name).exists():
            return f"a training run ({name})"
    return None


def set_aside_previous_run(out: str | os.PathLike) -> None:
    """Overwrite: move the old run's files into ``out/.previous-run`` (``remove_previous_run`` deletes them once
    the new run has finished, so a failed new run loses nothing)."""
    out = Path(out)
    previous = out / PREVIOUS_RUN
    if previous.exists():
        shutil.rmtree(previous)
    previous.mkdir()
    for entry in out.iterdir():
        if entry.name in (MODEL_FILE, RUN_FILE, LOG_FILE, "latest") or (
            entry.is_dir() and entry.name.startswith("step-")
        ):
            entry.rename(previous / entry.name)


def remove_previous_run(out: str | os.PathLike) -> None:
    """Delete the run ``set_aside_previous_run`` kept (the new run has finished)."""
    previous = Path(out) / PREVIOUS_RUN
    if previous.exists():
        shutil.rmtree(previous)


def last_loss(records: list[dict], log: str | os.PathLike) -> float | None:
    """The loss of the last step: of this call's ``records``, else the last valid line of the log (nothing was
    trained in this call: the run had reached its steps), else None."""
    if records:
        return records[-1]["loss"]
    log = Path(log)
    if log.is_file():
        for line in reversed(log.read_bytes().decode("utf-8", "replace").splitlines()):
            try:
                loss = json.loads(line)["loss"]
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                return float(loss)
    return None


# ------------------------------------------------------------------------------------------------------
# settings


def train_settings(given: dict[str, Any], recorded: dict[str, Any], resuming: bool) -> dict[str, Any]:
    """TrainConfig fields of a run: the run's defaults, then (``resuming``) the recorded TrainConfig fields, then
    the ``given`` options that are not None (option names, see ``TRAIN_OPTIONS``)."""
    from seqlab.train import TrainConfig

    base = TrainConfig().to_dict()
    settings = {TRAIN_OPTIONS[k]: v for k, v in RUN_DEFAULTS.items()}
    if resuming:
        settings.update({k: v for k, v in recorded.items() if k in base})
    for option, field in TRAIN_OPTIONS.items():
        value = given.get(option)
        if value is not None:
            settings[field] = value
    if given.get("pack") and given.get("carry_state") is None:  # packed rows start every row fresh
        settings["carry_state"] = False
    return settings


def run_train_config(settings: dict[str, Any], out: str | os.PathLike, progress: bool, has_eval: bool):
    """The TrainConfig of a run in ``out`` (checkpoints and log there); errors name the options."""
    from seqlab.train import TrainConfig

    out = Path(out)
    settings = dict(settings)
    if not has_eval:
        settings["eval_every"] = 0
    settings.update(checkpoint_dir=str(out), log_path=str(out / LOG_FILE), progress=progress)
    if settings.get("keep_checkpoints") == "all":
        settings["keep_checkpoints"] = None
    if settings.get("checkpoint_every", 0) == 0:
        raise ConfigError("--checkpoint-every must be >= 1 (seqlab train always keeps a checkpoint to resume from)")
    try:
        return TrainConfig(**settings)
    except ConfigError as exc:
        raise ConfigError(option_names(str(exc), "TrainConfig", TRAIN_OPTIONS)) from None
    except TypeError as exc:
        raise ConfigError(f"{out / RUN_FILE}: recorded training settings do not fit this seqlab ({exc})") from None


def backbone_config(given: dict[str, Any], recorded: dict | None):
    """The BackboneConfig of a run: the ``recorded`` one (a resumed run; a ``given`` option that differs is
    refused), else the given options over ``MODEL_OPTIONS``' defaults. ``moe_experts`` (``MOE_OPTIONS``) makes
    every layer's feed-forward a mixture of experts (``ffn="moe"``); the other MoE options need it."""
    from seqlab.config import BackboneConfig

    if recorded is not None:
        config = BackboneConfig.from_dict(recorded)
        for option in MODEL_OPTIONS:
            value = given.get(option)
            if value is not None and value != getattr(config, option):
                raise ConfigError(
                    f"{option_flag(option)} {value} differs from the run being resumed ({option} = "
                    f"{getattr(config, option)}): leave it out, or start over with --overwrite"
                )
        _check_recorded_moe(given, config)
        return config
    values = {k: (given[k] if given.get(k) is not None else default) for k, default in MODEL_OPTIONS.items()}
    moe = {k: given[k] for k in MOE_OPTIONS if given.get(k) is not None}
    if moe and "moe_experts" not in moe:
        raise ConfigError(
            f"{option_flag(next(iter(moe)))} sets the MoE layers: give --moe-experts N too (it turns the model's "
            "feed-forwards into mixtures of N experts)"
        )
    if moe:
        values.update(ffn="moe", **moe)
    try:
        return BackboneConfig(**values)
    except ConfigError as exc:
        names = {k: k for k in (*MODEL_OPTIONS, *MOE_OPTIONS)}
        raise ConfigError(option_names(str(exc), "BackboneConfig", names)) from None


def _check_recorded_moe(given: dict[str, Any], config) -> None:
    """A resumed run keeps its MoE settings: a given MoE option must equal the run's (its default included)."""
    moe = any(config.layer_spec(i)[1] == "moe" for i in range(config.n_layer))
    settings = config.moe_settings() if moe else None
    for option in MOE_OPTIONS:
        value = given.get(option)
        if value is None:
            continue
        if settings is None:
            raise ConfigError(
                f"{option_flag(option)} {value}: the run being resumed has no MoE layers (a dense model): leave "
                "it out, or start over with --overwrite"
            )
        have = getattr(settings, option.removeprefix("moe_"))
        if value != have:
            raise ConfigError(
                f"{option_flag(option)} {value} differs from the run being resumed ({option} = {have}): leave it "
                "out, or start over with --overwrite"
            )


# ------------------------------------------------------------------------------------------------------
# the machine


def resolve_device(name=None):
    """A torch.device from a name (``None``, ``""`` or ``"auto"``: cuda when available, else cpu) or a device."""
    import torch

    if isinstance(name, torch.device):
        device = name
    elif name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"--device {name!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    return device


def memory_bytes(device) -> int | None:
    """Memory of ``device`` in bytes (a GPU's, or the machine's RAM for the CPU), None when it cannot be told."""
    import torch

    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):  # pragma: no cover - no way to tell
        return None


def check_model_fits(backbone, device) -> None:
    """Refuse a model too large to train here (d_model 65536 with 1024 layers would otherwise allocate until the
    kernel kills the process; so would 4096 experts). The count is a lower bound: every Mamba layer has at least
    its input and output projections, 3 * d_model * d_inner weights, and its feed-forward (a gated MLP, or an MoE's
    experts) 3 * d_model * width per MLP."""
    count = backbone.n_layer * 3 * backbone.d_model * backbone.d_inner
    ffns = [backbone.layer_spec(i)[1] for i in range(backbone.n_layer)]
    moe_layers = ffns.count("moe")
    # a gated MLP has 3 * d_model * width weights; an MoE layer has that per expert
    count += ffns.count("mlp") * 3 * backbone.d_model * backbone.d_ffn_resolved
    sizes = f"--d-model {backbone.d_model} --n-layer {backbone.n_layer}"
    if moe_layers:
        settings = backbone.moe_settings()
        count += moe_layers * settings.experts * 3 * backbone.d_model * settings.d_expert
        sizes += f" --moe-experts {settings.experts} --moe-d-expert {settings.d_expert}"
    need, have = count * 16, memory_bytes(device)  # fp32 weights, gradients and two AdamW moments
    if have is not None and need > have:
        raise ConfigError(
            f"a model of over {count:,} parameters ({sizes}) needs over {need / 2**30:,.1f} GiB to train, this "
            f"machine has {have / 2**30:,.1f} GiB ({device.type}): use a smaller "
            + ("--d-model, --n-layer, --moe-experts or --moe-d-expert" if moe_layers else "--d-model or --n-layer")
        )
