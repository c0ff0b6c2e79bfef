"""A whole distillation run into a folder: progressive alignment stages, then end-to-end KL + CE, each stage a
``seqlab.train.Trainer`` run (its checkpoints, JSONL log and exact resume), or a Ray Train data-parallel run
(``seqlab.pipelines.ray_train.train_data_parallel``, the same Trainer on each worker).

The folder ``out``::

    distill.json          the plan (layers, stages, settings), written first; a resume reads it
    distill.jsonl         one line per step of every stage: stage, step, loss and its parts (kl, ce, align_mse...)
    stage-K-NAME/         stage K's checkpoints (Trainer layout) and train.jsonl; student.safetensors when done
    student.safetensors   the final student (a seqlab model file: ``seqlab eval``, ``seqlab generate`` load it)
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import torch

from seqlab.checkpoint import has_checkpoint, load_model, save_model
from seqlab.distill.mapping import (
    DEFAULT_DECAY,
    INIT_KINDS,
    build_student,
    calibrate_norms,
    choose_layers,
    stage_groups,
)
from seqlab.distill.objective import DistillModel, distill_metric, distill_parts, evaluate_distillation
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.io import atomic_write_bytes

PLAN_FILE = "distill.json"
LOG_FILE = "distill.jsonl"
STUDENT_FILE = "student.safetensors"
#: settings a resumed run keeps from its plan (a different value given is an error naming it)
PLAN_KEYS = (
    "layers",
    "stages",
    "steps",
    "e2e_steps",
    "init",
    "decay",
    "calibrate",
    "freeze_mlp",
    "batch_size",
    "window",
)


class PartsLoss:
    """The Trainer's ``loss_fn``: ``distill_parts``' loss, keeping the last training step's parts as floats
    (``last``) for the distillation log. Picklable (Ray sends it to the workers)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def __call__(self, output, targets):
        parts = distill_parts(output, targets)
        if torch.is_grad_enabled():  # a training step, not the Trainer's evaluation
            self.last = {k: float(v.detach()) for k, v in parts.items() if k != "loss"}
        return parts["loss"]


class StageFactory:
    """A picklable zero-argument factory of one stage's ``DistillModel`` (Ray Train builds it on each worker)."""

    def __init__(self, teacher, student, layers, mode: str, options: dict) -> None:
        self.teacher, self.student, self.layers, self.mode, self.options = teacher, student, layers, mode, options

    def __call__(self) -> DistillModel:
        return DistillModel(
            copy.deepcopy(self.teacher), copy.deepcopy(self.student), self.layers, self.mode, **self.options
        )


def read_plan(out) -> dict | None:
    """The plan recorded in a run folder (``distill.json``), or None when there is none."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
    except ValueError as exc:
        raise CorruptFileError(f"{path}: not JSON ({exc})") from None
    if not isinstance(plan, dict) or plan.get("seqlab") != "distill":
        raise CorruptFileError(f"{path}: not a seqlab distillation plan")
    return plan


def plan_stages(layers: list[int], stages: int, steps: int, e2e_steps: int) -> list[dict]:
    """The stages: one ``align`` stage per progressive group (each replaces its group on top of the earlier
    ones and aligns every replaced layer), then one ``e2e`` stage over the whole student (left out when
    ``e2e_steps`` is 0)."""
    plan: list[dict] = []
    done: list[int] = []
    for k, group in enumerate(stage_groups(layers, stages)):
        done = sorted(done + group)
        if steps:
            plan.append({"name": f"align{k + 1}", "mode": "align", "layers": done, "new": group, "steps": steps})
    if e2e_steps:
        plan.append({"name": "e2e", "mode": "e2e", "layers": list(layers), "new": [], "steps": e2e_steps})
    if not plan:
        raise ConfigError("--steps and --e2e-steps are both 0: no stage to run")
    return plan


def _count(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _first_window(train_data, batch_size: int, window: int) -> torch.Tensor:
    from seqlab.windows import SequenceSource, WindowSource

    source = train_data if isinstance(train_data, WindowSource) else SequenceSource(train_data, batch_size, window)
    return source.window(0)[0]


def _one_d_tokens(train_data):
    data = getattr(train_data, "data", train_data)
    if isinstance(data, torch.Tensor) or hasattr(data, "ndim"):
        if data.ndim == 1:
            return data
    raise InputError(
        "data-parallel distillation (ray_workers) needs the training data as one 1-D token sequence (files, "
        f"not a store), got {type(train_data).__name__}"
    )


def distill(
    teacher: Any,
    train_data,
    out,
    *,
    replace=None,
    stages: int | None = None,
    steps: int | None = None,
    e2e_steps: int | None = None,
    init: str | None = None,
    decay: float | None = None,
    freeze_mlp: bool | None = None,
    eval_data=None,
    train_options: dict[str, Any] | None = None,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    resume: bool = False,
    overwrite: bool = False,
    ray_workers: int = 0,
    data_parallel: Callable | None = None,
    ray_options: dict[str, Any] | None = None,
    progress: bool = True,
    notify: Callable[[str], None] | None = None,
    teacher_source: str | None = None,
    calibrate: bool | None = None,
) -> dict:
    """Distil ``teacher`` (a ``LanguageModel`` with attention layers) into a student with ``replace`` (a
    fraction or a list of layer indices) of its attention layers as Mamba-2 layers; return the run's summary.

    ``train_data``: a ``WindowSource`` (batch size and window as ``train_options``) or 1-D token ids (with
    ``ray_workers``, 1-D ids only). ``stages`` progressive alignment stages of ``steps`` steps each, then
    ``e2e_steps`` (default ``steps``; 0: none) of KL(teacher || student) + ``ce_weight`` * CE. ``init``:
    ``"attention"`` (the mapping of ``seqlab.distill.mapping``; with ``calibrate``, each mapped layer's norm
    weight is then set from the teacher on the first training window: ``calibrate_norms``) or ``"random"``.
    ``train_options``: ``seqlab.train.TrainConfig`` fields (lr, batch_size, window, checkpoint_every, seed ...).
    ``resume``: go on from the run in ``out`` (finished stages are skipped, the running one continues from its
    latest checkpoint; with Ray from its start); settings left None keep the run's own, a different one is
    refused. Left None in a new run: ``replace`` 0.5, ``stages`` 3, ``steps`` 100, ``init`` "attention",
    ``decay`` ``DEFAULT_DECAY``, ``calibrate`` True, ``freeze_mlp`` False. ``ray_workers``: N > 0 runs every
    stage data-parallel on N Ray Train workers through ``data_parallel``
    (``seqlab.pipelines.ray_train.train_data_parallel``; ``ray_options``: its keywords, e.g. ``storage_path``,
    ``quiet``). ``notify`` gets one-line notices; ``progress`` shows a bar per stage.

    The summary: ``layers``, ``stages`` (per stage: ``name``, ``mode``, ``layers``, ``steps``, ``first_loss``,
    ``last_loss``, ``seconds``; on Ray ``weight_checksums``), ``student`` (the model file), ``out``, and with
    ``eval_data`` the held-out ``eval_kl`` (nats per token) and the student's and teacher's
    ``eval_bits_per_token``.
    """
    from seqlab.train import TrainConfig, Trainer

    notify = notify or (lambda message: None)
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    plan_path = out / PLAN_FILE
    recorded = read_plan(out) if resume else None
    mine = recorded or {}
    replace = mine.get("layers", 0.5) if replace is None else replace
    stages = mine.get("stages", 3) if stages is None else stages
    steps = mine.get("steps", 100) if steps is None else steps
    e2e_steps = mine.get("e2e_steps") if e2e_steps is None else e2e_steps
    init = mine.get("init", "attention") if init is None else init
    decay = mine.get("decay", DEFAULT_DECAY) if decay is None else decay
    calibrate = mine.get("calibrate", True) if calibrate is None else calibrate
    freeze_mlp = mine.get("freeze_mlp", False) if freeze_mlp is None else freeze_mlp
    if init not in INIT_KINDS:
        raise ConfigError(f"--init must be one of {INIT_KINDS}, got {init!r}")
    _count("--ray-workers", ray_workers)
    options = dict(train_options or {})
    for key in ("batch_size", "window"):
        if key in mine:
            options.setdefault(key, mine[key])
    options.setdefault("batch_size", getattr(train_data, "batch_size", 8))
    options.setdefault("window", getattr(train_data, "window_size", 256))
    steps = _count("--steps", steps)
    e2e_steps = steps if e2e_steps is None else _count("--e2e-steps", e2e_steps)
    given = {
        "layers": choose_layers(teacher.config, replace),
        "stages": _count("--stages", stages, 1),
        "steps": steps,
        "e2e_steps": e2e_steps,
        "init": init,
        "decay": decay,
        "calibrate": bool(calibrate),
        "freeze_mlp": bool(freeze_mlp),
        "batch_size": options["batch_size"],
        "window": options["window"],
    }
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if recorded is not None:
        for key in PLAN_KEYS:
            if recorded.get(key) != given[key]:
                raise ConfigError(
                    f"the run in {out} was planned with {key}={recorded.get(key)!r}, now {given[key]!r}: give the "
                    "run's settings, or start over with --overwrite"
                )
        if recorded.get("teacher_fingerprint") != teacher.fingerprint:
            raise ConfigError(f"the run in {out} distils another teacher (its fingerprint differs)")
    elif plan_path.is_file() and not overwrite:
        raise InputError(f"--out {out} already holds a distillation run: pass --resume or --overwrite")
    plan = plan_stages(given["layers"], given["stages"], steps, e2e_steps)
    if overwrite and plan_path.is_file():
        for path in out.iterdir():  # only what a distillation run writes
            if path.name.startswith("stage-") and path.is_dir():
                shutil.rmtree(path)
            elif path.name in (PLAN_FILE, LOG_FILE, STUDENT_FILE):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "seqlab": "distill",
        **given,
        "teacher": teacher_source,
        "teacher_fingerprint": teacher.fingerprint,
        "plan": plan,
        "objective": {"temperature": temperature, "kl_weight": kl_weight, "ce_weight": ce_weight},
        "train": {k: v for k, v in options.items()},
    }
    atomic_write_bytes(plan_path, json.dumps(record, indent=1, default=str).encode())

    objective = {"temperature": temperature, "kl_weight": kl_weight, "ce_weight": ce_weight}
    seed = options.get("seed", 0)
    student = None
    summaries = []
    folders = [out / f"stage-{k + 1}-{stage['name']}" for k, stage in enumerate(plan)]
    finished = [k for k, folder in enumerate(folders) if (folder / STUDENT_FILE).is_file()]
    first_stage = finished[-1] + 1 if finished and resume else 0
    if first_stage:
        student = build_student(teacher, plan[first_stage - 1]["layers"], init, decay, seed)
        load_model(folders[first_stage - 1] / STUDENT_FILE, student)
        notify(f"stages up to {plan[first_stage - 1]['name']} are done: going on from there")
    for k, stage in enumerate(plan):
        folder = folders[k]
        done = folder / STUDENT_FILE
        if k < first_stage:
            continue
        fresh = [i for i in stage["new"] if init == "attention"]
        student = build_student(teacher, stage["layers"], init, decay, seed + k, base=student)
        if fresh and calibrate:  # the mapped layers' output scale: the teacher's on the first training window
            first_inputs = _first_window(train_data, options["batch_size"], options["window"])
            calibrate_norms(teacher, student, fresh, first_inputs.to(next(student.parameters()).device))
        model = DistillModel(
            teacher,
            student,
            stage["layers"],
            stage["mode"],
            freeze_mlp=freeze_mlp and stage["mode"] == "e2e",
            **objective,
        )
        loss_fn = PartsLoss()
        config = TrainConfig(
            **{
                **options,
                "max_steps": stage["steps"],
                "carry_state": False,
                "checkpoint_dir": str(folder),
                "log_path": str(folder / "train.jsonl"),
                "checkpoint_every": options.get("checkpoint_every") or max(1, stage["steps"] // 4),
                "progress": progress,
            }
        )
        folder.mkdir(parents=True, exist_ok=True)
        unit = "mse" if stage["mode"] == "align" else "bits"
        first: list[float] = []

        def write_log(trainer, step_record, stage=stage, loss_fn=loss_fn, first=first):
            line = {"stage": stage["name"], "step": step_record["step"], "loss": step_record["loss"], **loss_fn.last}
            for key in ("eval_loss", "eval_metric"):
                if key in step_record:
                    line[key] = step_record[key]
            if not first:
                first.append(step_record["loss"])
            with open(out / LOG_FILE, "a") as log:
                log.write(json.dumps(line) + "\n")

        started = time.perf_counter()
        if progress:
            notify(f"stage {k + 1}/{len(plan)} {stage['name']}: {stage['mode']} on layers {stage['layers']}")
        checksums = None
        if ray_workers:
            ray_run = {"storage_path": str(out / "ray"), "name": folder.name, **dict(ray_options or {})}
            last, losses, checksums = _run_ray(
                model, stage, config, train_data, loss_fn, ray_workers, data_parallel, ray_run, objective
            )
            for step, value in enumerate(losses, 1):
                write_log(None, {"step": step, "loss": value})
        else:
            hooks: dict[str, Any] = {
                "loss_fn": loss_fn,
                "metric_fn": distill_metric,
                "loss_unit": unit,
                "callbacks": [write_log],
            }
            if resume and has_checkpoint(folder):
                trainer = Trainer.resume(folder, model, config, train_data, eval_data, **hooks)
                notify(f"stage {stage['name']}: resuming at step {trainer.step}")
                _trim_log(out / LOG_FILE, stage["name"], trainer.step)
            else:
                trainer = Trainer(model, config, train_data, eval_data, **hooks)
            records = trainer.fit()
            last = records[-1]["loss"] if records else None
        save_model(done, student, {"stage": stage["name"], "distill": {"layers": stage["layers"]}})
        summaries.append(
            {
                "name": stage["name"],
                "mode": stage["mode"],
                "layers": stage["layers"],
                "steps": stage["steps"],
                "first_loss": first[0] if first else None,
                "last_loss": last,
                "loss_unit": unit,
                "seconds": time.perf_counter() - started,
                **({"weight_checksums": checksums} if checksums is not None else {}),
            }
        )
    assert student is not None
    final = save_model(out / STUDENT_FILE, student, {"distill": {"layers": given["layers"], "init": init}})
    summary: dict[str, Any] = {"layers": given["layers"], "stages": summaries, "student": str(final), "out": str(out)}
    if eval_data is not None:
        summary.update(evaluate_distillation(teacher, student, eval_data))
    record["summary"] = summary
    atomic_write_bytes(plan_path, json.dumps(record, indent=1, default=str).encode())
    return summary


def _trim_log(path: Path, stage: str, step: int) -> None:
    """Drop the log lines of ``stage`` after ``step`` (a resumed stage redoes them)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("stage") != stage or record.get("step", 0) <= step:
            keep.append(line)
    atomic_write_bytes(path, "".join(k + "\n" for k in keep).encode())


def _run_ray(model, stage, config, train_data, loss_fn, workers, data_parallel, ray_options, objective):
    """One stage on ``workers`` Ray Train workers through ``data_parallel`` (``train_data_parallel``'s
    signature; the caller passes it, since this room may not import the pipelines); the final weights come back
    into ``model``'s student. Returns the last step's loss and every step's (averaged over the workers) and the
    workers' weight checksums (equal: DDP kept the replicas in step)."""
    from seqlab.checkpoint import latest_checkpoint

    if data_parallel is None:
        raise ConfigError("ray_workers needs data_parallel= (seqlab.pipelines.ray_train.train_data_parallel)")
    factory = StageFactory(model.__dict__["teacher"], model.student, stage["layers"], stage["mode"], objective)
    result = data_parallel(
        factory,
        dc_replace(config, checkpoint_dir=None, checkpoint_every=0, log_path=None),
        _one_d_tokens(train_data),
        None,  # the held-out evaluation runs here, after the last stage
        num_workers=workers,
        loss_fn=loss_fn,
        metric_fn=distill_metric,
        checkpoint_every=0,
        **dict(ray_options or {}),
    )
    if getattr(result, "error", None) is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        load_model(latest_checkpoint(directory) / "model.safetensors", model)
    # the workers' Trainer reports every loss in bits (loss / ln 2): an alignment MSE is given back as is
    scale = math.log(2) if stage["mode"] == "align" else 1.0
    losses = [value * scale for value in result.metrics.get("losses") or []]
    return losses[-1] if losses else None, losses, result.metrics.get("weight_checksums")


__all__ = ["PartsLoss", "StageFactory", "distill", "plan_stages", "read_plan"]
