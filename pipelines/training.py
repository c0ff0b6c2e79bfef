"""A whole training run, and the evaluation of a trained model, from files or a sequence store: the library
behind ``seqlab train`` and ``seqlab eval`` (the commands parse flags and TOML, then call ``train_run`` /
``evaluate_model`` and print what they return).

``train_run(out, files=... | store=..., options=...)`` checks everything before it touches ``out``, writes
checkpoints, ``train.jsonl``, ``run.json`` and ``model.safetensors`` there (the layout is ``seqlab.runs``),
resumes from the latest checkpoint (``resume=True``; settings left out keep the run's own) or starts over
(``overwrite=True``; the old run is kept aside until the new one has finished), and ends with the exact held-out
evaluation. It lives here, in the room that sees both files (``seqlab.domains.training_data``) and stores
(``seqlab.pipelines.train_data``); zarr is imported only for a store.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seqlab import runs
from seqlab.domains.training_data import check_trainable, evaluate, file_inputs, files_data
from seqlab.errors import ConfigError, CorruptFileError, InputError

__all__ = ["data_spec", "evaluate_model", "train_run"]


def data_spec(
    *,
    files=None,
    adapter=None,
    adapter_settings=None,
    eval_files=None,
    eval_fraction=None,
    store=None,
    sequences=None,
    eval_sequences=None,
    recorded: dict | None = None,
) -> dict:
    """The data spec of a run (recorded in run.json): files with their adapter and held-out data, or a store
    with its sequences; with neither, the ``recorded`` spec of the run being resumed."""
    if files and store:
        raise ConfigError("give training data either as FILE... or as --store, not both")
    if store:
        if eval_files or eval_fraction is not None:
            raise ConfigError("with --store, held-out data comes from --eval-sequences (not --eval/--eval-fraction)")
        if adapter_settings and not adapter:
            raise ConfigError(
                "with --store, the adapter is the one the store was encoded with: leave out --adapter-settings"
            )
        spec = {"store": os.fspath(store), "sequences": sequences, "eval_sequences": eval_sequences, "domain": adapter}
        if adapter_settings:  # an adapter that learns its encoding on the store (subword on bytes): its settings
            spec["adapter_settings"] = adapter_settings
        return spec
    if files:
        if sequences or eval_sequences:
            raise ConfigError("--sequences and --eval-sequences go with --store")
        if adapter is None and recorded and "files" in recorded:  # a resume: the run's adapter
            adapter = recorded.get("domain")
            adapter_settings = recorded.get("adapter_settings") if adapter_settings is None else adapter_settings
        if adapter in (None, ""):
            raise ConfigError("missing required setting(s) --adapter (a flag, or a key in --config)")
        return {
            "files": [os.path.abspath(f) for f in files],
            "domain": adapter,
            "adapter_settings": adapter_settings,
            "eval": [os.path.abspath(f) for f in eval_files or []],
            "eval_fraction": eval_fraction,
        }
    if recorded:
        return recorded
    raise ConfigError("no training data: give FILE... (with --adapter) or --store S.zarr")


def _plain(value, drop: str | None = None):
    import json

    value = json.loads(json.dumps(value, default=str))
    if drop and isinstance(value, dict):
        value.pop(drop, None)
    return value


def _notify(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def train_run(
    out,
    *,
    files=None,
    adapter: str | None = None,
    adapter_settings=None,
    eval_files=None,
    eval_fraction: float | None = None,
    store=None,
    sequences=None,
    eval_sequences=None,
    options: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device=None,
    progress: bool = True,
    notify: Callable[[str], None] | None = None,
    on_start: Callable[[dict], None] | None = None,
) -> dict:
    """Train a model for a domain adapter into the run folder ``out`` and return the run's summary.

    Data: ``files`` with ``adapter`` (an adapter's name), ``adapter_settings`` and held-out ``eval_files`` or
    ``eval_fraction``; or a ``store`` with ``sequences`` and held-out ``eval_sequences``; a resumed run may give
    neither (its recorded data). ``options``: model and training settings by option name (``runs.MODEL_OPTIONS``,
    ``runs.MOE_OPTIONS``, ``runs.TRAIN_OPTIONS``; None or missing: the default, or the resumed run's value).
    ``device``: a name or torch.device (default: cuda when available). ``notify``: told a resume's one-line
    notices (default: a Python warning). ``on_start``: told once everything is checked, just before the first
    step, the model's ``seqlab.models.model_summary`` (class, config, MoE settings, ``parameters`` total and
    active) with ``step`` (where training starts) and ``resumed``. Nothing in ``out`` changes until every setting
    and the data are checked. An MoE model's training log (``train.jsonl``) holds the router's ``moe_*`` fields
    each step, and a router collapse is a ``RuntimeWarning`` (``seqlab.train.Trainer``).

    The summary: ``steps``, ``steps_this_run``, ``tokens``, ``seconds``, ``train_loss`` (the last step's, in
    ``loss_unit``: the adapter's, bits or mse), ``metric_name``, ``uniform_baseline``, ``model`` (the final
    model file), ``out``, ``parameters`` (``{"total", "active"}``: an MoE model's active parameters are those one
    token uses), with held-out data ``held_out`` (the metric over it), ``held_out_targets`` and
    ``held_out_inputs`` (per input), and with ``options["pack"]`` (packed rows of documents, seqlab.packing)
    ``packing`` (``PackingStats.to_dict()``: documents, targets, positions, ``efficiency``, ``padded_efficiency``)."""
    import torch

    from seqlab.checkpoint import has_checkpoint, save_model
    from seqlab.models import model_summary
    from seqlab.train import Trainer

    notify = notify or _notify
    options = dict(options or {})
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    held = runs.holds_run(out) if out.is_dir() else None
    if held and not (resume or overwrite):
        raise InputError(f"--out {out} already holds {held}: pass --resume to continue it or --overwrite to start over")
    resuming = bool(resume and has_checkpoint(out))
    run = runs.read_run(out) if resume else {}
    restarting = bool(resume and not resuming and run.get("data"))
    if resuming:
        adapter_info, model_config, recorded_train = runs.checkpoint_settings(out)
        recorded_train = {**recorded_train, **run.get("train", {})}
    elif restarting:  # stopped before its first checkpoint: the same run again, from step 0
        adapter_info, model_config = run.get("adapter"), run.get("model")
        from seqlab.config import BackboneConfig

        try:
            BackboneConfig.from_dict(model_config or {})
        except ConfigError as exc:
            raise CorruptFileError(f"{out / runs.RUN_FILE}: recorded model config: {exc}") from None
        recorded_train = dict(run.get("train") or {})
        notify(
            f"no checkpoint in {out} yet (the run stopped before its first one): starting it again from step 0 "
            f"with the data and settings in {out / runs.RUN_FILE}"
        )
    else:
        adapter_info, model_config, recorded_train = None, None, {}
        if resume:
            notify(f"no checkpoint in {out} yet: starting a new run")
    device = runs.resolve_device(device)
    settings = runs.train_settings(options, recorded_train, resuming or restarting)
    backbone = runs.backbone_config(options, model_config)
    spec = data_spec(
        files=files,
        adapter=adapter,
        adapter_settings=adapter_settings,
        eval_files=eval_files,
        eval_fraction=eval_fraction,
        store=store,
        sequences=sequences,
        eval_sequences=eval_sequences,
        recorded=run.get("data"),
    )
    batch_size, window = settings.get("batch_size", 8), settings.get("window", 256)
    for name, value in (("batch_size", batch_size), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{runs.option_flag(name)} must be an int >= 1, got {value!r}")

    seed = settings.get("seed", 0)
    build_options = dict((adapter_info or {}).get("model") or {})

    def build(encoder):
        runs.check_model_fits(backbone, device)
        torch.manual_seed(seed)  # the initial weights follow the seed
        return encoder.build_model(backbone, **build_options).to(device)

    if "store" in spec:
        from seqlab.pipelines.train_data import store_data

        data, model = store_data(spec, batch_size, window, build, pack=bool(settings.get("pack")))
    else:
        data = files_data(spec, batch_size, window, progress, pack=bool(settings.get("pack")))
        model = build(data.adapter)
    if adapter_info is not None and _plain(adapter_info, drop="model") != _plain(data.adapter.info()):
        raise ConfigError(
            f"the run in {out} was trained with adapter {adapter_info}, the data now given is "
            f"encoded by {data.adapter.info()}: give the run's data, or start over with --overwrite"
        )
    if resuming and run.get("train_elements") not in (None, data.train_elements):
        raise ConfigError(
            f"the training data now holds {data.train_elements} elements, the run in {out} was "
            f"made on {run['train_elements']}: the data position would not match (give the same "
            "data, or start over with --overwrite)"
        )
    config = runs.run_train_config(settings, out, progress, data.eval_source is not None)
    hooks = {"loss_fn": data.adapter.loss, "metric_fn": data.adapter.metric, "loss_unit": data.adapter.loss_unit}
    if resuming:  # loads the checkpoint (and checks it fits these settings) before anything is written
        try:
            trainer = Trainer.resume(out, model, config, data.train, data.eval_source, **hooks)
        except ConfigError as exc:
            raise ConfigError(runs.option_names(str(exc), "TrainConfig", runs.TRAIN_OPTIONS)) from None
    else:
        trainer = Trainer(model, config, data.train, data.eval_source, **hooks)

    # everything is checked: only now is out touched
    out.mkdir(parents=True, exist_ok=True)
    if held and not resuming:  # overwrite, or a resume of a run that never reached a checkpoint
        runs.set_aside_previous_run(out)
    record = {
        "seqlab": "train",
        "adapter": data.adapter.info(),
        "model": backbone.to_dict(),
        "model_options": build_options,
        "train": {k: v for k, v in config.to_dict().items() if k not in ("checkpoint_dir", "log_path", "progress")},
        "data": data.spec,
        "train_elements": data.train_elements,
    }
    if data.packing is not None:  # packed rows (--pack): efficiency, and the padding baseline's
        record["packing"] = data.packing
    runs.write_run(out, record)
    description = model_summary(model)
    if on_start is not None:
        on_start({**description, "step": trainer.step, "resumed": resuming})
    start_step, started = trainer.step, time.perf_counter()
    records = trainer.fit()  # checkpoints every checkpoint_every steps and at the last one
    seconds = time.perf_counter() - started
    model_path = save_model(out / runs.MODEL_FILE, model, {"step": trainer.step})

    summary = {
        "steps": trainer.step,
        "steps_this_run": trainer.step - start_step,
        "tokens": trainer.pos.tokens,
        "seconds": seconds,
        "train_loss": runs.last_loss(records, out / runs.LOG_FILE),
        "loss_unit": data.adapter.loss_unit,
        "metric_name": data.adapter.metric_name,
        "uniform_baseline": data.adapter.uniform_baseline(),
        "model": str(model_path),
        "out": str(out),
        "parameters": description["parameters"],
    }
    if data.packing is not None:
        summary["packing"] = data.packing
    if data.held_out:
        model.eval()
        result = evaluate(model, data.adapter, data.held_out, device, progress)
        summary.update(held_out=result["metric"], held_out_targets=result["targets"], held_out_inputs=result["inputs"])
    record["summary"] = summary
    runs.write_run(out, record)
    runs.remove_previous_run(out)
    return summary


def evaluate_model(
    model_path, *, files=None, store=None, sequences=None, window: int = 4096, device=None, progress: bool = False
) -> dict:
    """The held-out metric of a trained model (a model file or a training checkpoint folder) over ``files``
    (encoded by the model's adapter) or a ``store``'s ``sequences`` (default: every complete one), each streamed
    ``window`` elements at a time with the state carried (exact: one pass over it). Returns ``{"model",
    "adapter", "metric_name", "inputs": [{"name", "metric", "targets"}], "metric", "targets",
    "uniform_baseline"}``; an input too short to measure (under 2 elements) raises InputError."""
    from seqlab.domains.base import model_from_checkpoint

    if model_path in (None, ""):
        raise ConfigError("missing MODEL: a model file (model.safetensors) or a training checkpoint folder")
    if bool(files) == bool(store):
        raise ConfigError("give the held-out data as FILE... or as --store S.zarr (one of them)")
    if not os.path.exists(model_path):
        raise InputError(f"{model_path}: no such model file or checkpoint folder")
    device = runs.resolve_device(device)
    model, adapter = model_from_checkpoint(model_path, device=device)
    check_trainable(adapter)
    if getattr(model.config, "bidirectional", False):
        raise ConfigError(f"{model_path} is a bidirectional model: it has no next-element metric to stream")
    if store:
        from seqlab.pipelines.train_data import store_inputs

        inputs = store_inputs(store, sequences, window, model=model)
    else:
        if sequences:
            raise ConfigError("--sequences goes with --store")
        inputs = file_inputs(adapter, files, window)
    result = evaluate(model, adapter, inputs, device, progress)
    for row in result["inputs"]:
        if row["targets"] == 0:
            raise InputError(f"{row['name']}: too short to measure (a metric needs at least 2 elements)")
    return {"model": os.fspath(model_path), "adapter": adapter.info(), **result}
