"""Post-training runs from a model file (issue 21): the library behind ``seqlab laser`` and ``seqlab self-reward``
(the commands parse flags, show progress and print what these functions return).

* :func:`laser_run`: search LASER rank reductions of a trained model (``seqlab.posttrain.laser.laser_search``)
  scored by the adapter's held-out metric over files or stored sequences (streamed with the state carried, exactly
  as ``seqlab.pipelines.training.evaluate_model`` measures it), apply the best intervention (or the greedy
  composition when it beats the best single one) and write the reduced model as a normal model file, with the
  search's JSON report and heatmap beside it.
* :func:`self_reward_run`: self-rewarding fine-tuning of a byte model (``seqlab.posttrain.self_reward``) on the
  prompts of a file (one per line) or of the built-in program-checkable byte task (``seqlab.posttrain.tasks``),
  optionally measured on that task's held-out split (checker accuracy and judge agreement) after every iteration.

Both check everything they can before they write anything.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seqlab import runs
from seqlab.domains.training_data import check_trainable, evaluate, file_inputs
from seqlab.errors import ConfigError, InputError

__all__ = ["REPORT_NAME", "HEATMAP_NAME", "TASK_TRAIN", "TASK_TEST", "laser_run", "self_reward_run", "read_prompts"]

#: file names of a LASER search's report and heatmap in ``report_dir``
REPORT_NAME, HEATMAP_NAME = "laser_report.json", "laser_heatmap.png"
#: ``task_prompts``: the byte task's instances are one seeded stream cut into a seed/SFT slice of TASK_TRAIN (the
#: size ``examples/self_reward.py`` trains M0 on, skipped so that a prompt is never a training instance), the
#: self-reward prompts, then TASK_TEST held-out instances (the measure's split; ``seqlab.posttrain.tasks``)
TASK_TRAIN, TASK_TEST = 2000, 100


# ------------------------------------------------------------------------------------------------------
# LASER


def _check_out(model_path, out, overwrite: bool, what: str) -> None:
    """Refuse an ``out`` that is a folder, the source model file, or an existing file without ``overwrite``."""
    from seqlab.domains.registry import _model_file

    source = _model_file(model_path)
    if os.path.isdir(out):
        raise ConfigError(f"{what} --out {out}: is a folder; give the model file's path")
    if os.path.exists(out):
        if os.path.exists(source) and os.path.samefile(out, source):
            raise ConfigError(f"{what} --out {out}: is the source model file; write the new model elsewhere")
        if not overwrite:
            raise ConfigError(f"{what} --out {out}: exists; pass --overwrite to replace it")


def _report_paths(out: str | os.PathLike, report_dir) -> tuple[Path, Path]:
    """Where the report and heatmap go: ``report_dir/laser_report.json`` and ``.../laser_heatmap.png``; without
    ``report_dir``, OUT's folder, named after OUT's stem (``m.laser_report.json``, ``m.laser_heatmap.png``)."""
    if report_dir is not None:
        folder = Path(report_dir)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"laser --report-dir {report_dir}: is a file; give a folder")
        return folder / REPORT_NAME, folder / HEATMAP_NAME
    out = Path(out)
    return out.parent / f"{out.stem}.{REPORT_NAME}", out.parent / f"{out.stem}.{HEATMAP_NAME}"


def _cell(c) -> dict:
    return {"layer": c.layer, "kind": c.kind, "rho": c.rho, "rank": c.rank, "params_saved": c.params_saved,
            "score": c.score}  # fmt: skip


def _finite(value) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def laser_run(
    model_path,
    *,
    files: Sequence[str] | None = None,
    store=None,
    sequences: Sequence[str] | None = None,
    window: int = 4096,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
    rhos: Sequence[float] | None = None,
    compose: int = 0,
    method: str = "svd",
    seed: int = 0,
    out,
    report_dir=None,
    overwrite: bool = False,
    keep_best: bool = False,
    device=None,
    progress: bool = False,
) -> dict:
    """LASER-search the model at ``model_path`` (a model file or a training checkpoint folder) and write the
    reduced model to ``out`` (``seqlab.checkpoint.save_model``; it loads with ``model_from_checkpoint``).

    The score is the adapter's held-out metric (lower is better, e.g. bits per byte) of ``files`` (encoded by the
    model's adapter) or of a ``store``'s ``sequences`` (default: every complete one; refused unless written by the
    model's adapter), each streamed ``window`` elements at a time with the state carried. ``layers``, ``kinds``,
    ``rhos`` (default ``DEFAULT_RHOS``), ``compose``, ``method`` and ``seed`` are ``laser_search``'s. The chosen
    interventions: the greedy composition when ``compose > 0`` and its score beats the best single cell's, else the
    best single cell. When no cell beats the unmodified model, nothing is written to ``out`` (``"written": False``)
    unless ``keep_best``, which writes the best scored cell anyway. The search's report (``LaserReport.to_json``)
    and heatmap are written either way (``_report_paths``: ``report_dir`` or beside ``out``; replaced if there).

    ``out`` is never the source model file, and an existing one is replaced only with ``overwrite``; everything is
    checked before the search. Returns a JSON-able summary: ``baseline``, ``metric`` (of the written model, or
    None), ``metric_name``, ``chosen`` (cells), ``written``, ``reason``, parameter counts and file bytes before and
    after, the report and heatmap paths, ``cells`` (scored / skipped) and ``seconds``."""
    import json
    import time

    import torch

    from seqlab.checkpoint import save_model
    from seqlab.domains.registry import _model_file, model_from_checkpoint
    from seqlab.io import atomic_write_bytes
    from seqlab.posttrain.laser import DEFAULT_RHOS, METHODS, apply_interventions, laser_search, plot_heatmap

    started = time.perf_counter()
    if model_path in (None, ""):
        raise ConfigError("missing MODEL: a model file (model.safetensors) or a training checkpoint folder")
    if out in (None, ""):
        raise ConfigError("missing --out: the LASER'd model file to write")
    if bool(files) == bool(store):
        raise ConfigError("give the held-out data as FILE... or as --store S.zarr (one of them)")
    if sequences and not store:
        raise ConfigError("--sequences goes with --store")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not os.path.exists(model_path):
        raise InputError(f"{model_path}: no such model file or checkpoint folder")
    _check_out(model_path, out, overwrite, "laser")
    report_path, heatmap_path = _report_paths(out, report_dir)
    rho_list = list(DEFAULT_RHOS if rhos is None else rhos)
    device = runs.resolve_device(device)
    model, adapter = model_from_checkpoint(model_path, device=device)
    check_trainable(adapter)
    if getattr(model.config, "bidirectional", False):
        raise ConfigError(f"{model_path} is a bidirectional model: it has no next-element metric to score LASER by")
    if getattr(model, "quantization", None):
        raise ConfigError(f"{model_path} is quantized: LASER searches a full-precision model")
    if store:
        from seqlab.pipelines.train_data import store_inputs

        inputs = store_inputs(store, list(sequences) if sequences else None, window, model=model)
    else:
        inputs = file_inputs(adapter, list(files or []), window)

    def score(m) -> float:
        result = evaluate(m, adapter, inputs, device)
        for row in result["inputs"]:
            if row["targets"] == 0:
                raise InputError(f"{row['name']}: too short to measure (a metric needs at least 2 elements)")
        return float(result["metric"])

    params_before = sum(p.numel() for p in model.parameters())
    report = laser_search(
        model, score, layers=layers, kinds=kinds, rhos=rho_list, compose=compose, method=method, seed=seed,
        progress=progress,
    )  # fmt: skip
    best = report.best
    best_improves = best is not None and best.score is not None and report.improves(best.score)
    chosen: list = []
    reason: str
    if (
        compose
        and report.composed
        and report.composed_score is not None
        and (not best_improves or report.composed_score < float(best.score))  # type: ignore[union-attr,arg-type]
    ):
        chosen, reason = list(report.composed), f"the composition of {len(report.composed)} cells"
    elif best_improves:
        chosen, reason = [best], "the best single cell"
    elif keep_best and best is not None:
        chosen, reason = [best], "the best single cell, kept by --keep-best though it does not beat the baseline"
    elif best is None:
        reason = "no cell could be scored (every rank's factors would be larger than its matrix)"
    else:
        reason = "no intervention beats the unmodified model"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(report_path, json.dumps(report.to_json(), indent=1).encode())
    heatmap: str | None = None
    if any(c.delta is not None for c in report.cells):
        try:
            heatmap = os.fspath(plot_heatmap(report, heatmap_path))
        except ImportError as exc:  # matplotlib is optional (the demo extra): the report still says everything
            import warnings

            warnings.warn(f"no heatmap: {exc}", stacklevel=2)
    summary: dict[str, Any] = {
        "model": os.fspath(model_path),
        "out": os.fspath(out),
        "adapter": adapter.info(),
        "metric_name": adapter.metric_name,
        "baseline": report.baseline,
        "metric": None,
        "method": method,
        "rhos": rho_list,
        "compose": compose,
        "chosen": [_cell(c) for c in chosen],
        "reason": reason,
        "written": False,
        "cells": len(report.cells),
        "cells_scored": sum(c.score is not None for c in report.cells),
        "best": None if best is None else _cell(best),
        "composed": [_cell(c) for c in report.composed],
        "composed_score": _finite(report.composed_score),
        "params_before": params_before,
        "params_after": params_before,
        "source_bytes": os.path.getsize(_model_file(model_path)),
        "file_bytes": None,
        "report": os.fspath(report_path),
        "heatmap": heatmap,
    }
    if chosen:
        apply_interventions(model, chosen, method=method, seed=seed)
        with torch.no_grad():
            summary["metric"] = score(model)
        summary["params_after"] = sum(p.numel() for p in model.parameters())
        interventions = [{"layer": c.layer, "kind": c.kind, "rho": c.rho, "rank": c.rank} for c in chosen]
        extra = {
            "laser_from": os.path.basename(os.fspath(model_path)),
            "laser": {"interventions": interventions, "method": method, "seed": seed,
                      "metric_name": adapter.metric_name, "baseline": report.baseline, "metric": summary["metric"]},
        }  # fmt: skip
        save_model(out, model, extra=extra)
        summary["written"] = True
        summary["file_bytes"] = os.path.getsize(out)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


# ------------------------------------------------------------------------------------------------------
# self-rewarding


def read_prompts(path) -> list[bytes]:
    """The prompts of a file, one per line: each line's bytes without its line ending (``\\n`` or ``\\r\\n``);
    blank lines are left out. A file with no prompt is an InputError."""
    from seqlab.domains.bytes import open_input

    with open_input(os.fspath(path)) as handle:
        data = handle.read()
    prompts = [line.removesuffix(b"\r") for line in data.split(b"\n")]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompt (give one prompt per line)")
    return prompts


_ITERATION = re.compile(r"^iteration-\d+$")


def _check_run_folder(out, resume: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"self-reward --out {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise ConfigError(
            f"self-reward --out {out}: holds files already; pass --resume to continue that run, or give an empty "
            "or new folder"
        )
    if resume and out.is_dir() and any(out.iterdir()):
        if not any(_ITERATION.match(p.name) for p in out.iterdir()):
            raise ConfigError(f"self-reward --out {out}: holds no self-reward run to --resume")


def _check_resumed_prompts(out, prompts: list[bytes], resume: bool) -> None:
    """Refuse to --resume a run whose first iteration saw other prompts (its candidates.jsonl says which)."""
    import json

    first = Path(out) / "iteration-1" / "candidates.jsonl"
    if not resume or not first.is_file():
        return
    try:
        seen = {json.loads(line)["prompt"].encode("latin-1") for line in first.read_text().splitlines() if line}
    except (ValueError, KeyError, TypeError, UnicodeError) as exc:
        raise InputError(f"{first}: not a self-reward candidates file ({exc})") from None
    if seen != set(prompts):
        raise ConfigError(
            f"self-reward --resume: the run in {out} was started on other prompts ({len(seen)} of them); give the "
            "same --prompts, or --task-prompts and --seed, or start a new --out"
        )


def self_reward_run(
    model_path,
    *,
    out,
    prompts_file=None,
    task_prompts: int | None = None,
    iterations: int = 3,
    candidates: int = 4,
    judge_samples: int = 3,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    beta: float = 0.1,
    lr: float = 1e-4,
    epochs: int = 1,
    seed: int = 0,
    resume: bool = False,
    measure: bool = False,
    device=None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Self-rewarding fine-tuning (``seqlab.posttrain.self_reward``) of the byte model at ``model_path``; every
    file goes under ``out`` (``iteration-<t>/candidates.jsonl``, ``pairs.jsonl``, ``model.safetensors``,
    ``iteration.json``, and ``report.json``).

    The prompts: ``prompts_file`` (one prompt per line, :func:`read_prompts`) or ``task_prompts`` = N, the first N
    self-reward prompts of the built-in byte task (``seqlab.posttrain.tasks.make_splits(TASK_TRAIN, N,
    TASK_TEST, seed=seed)``); one of them. ``measure`` (only with ``task_prompts``): the program checker's accuracy
    (``evaluate_task``) and the judge's agreement with it (``judge_agreement``) on the task's TASK_TEST held-out
    instances, for M_0 .. M_T. The model must be a byte model (the judge rubric is byte text). ``out`` must be new
    or empty unless ``resume`` (which continues after the last finished iteration). ``progress(measure)`` is called
    after M_0 and each new M_t (not for iterations a resume finds finished). Returns a JSON-able summary with one
    row per iteration (pairs, unparseable judgements, mean score, DPO loss, measure), ``measures``, and the
    final model's path."""
    import time

    import torch

    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.posttrain import tasks as T
    from seqlab.posttrain.dpo import DPOConfig
    from seqlab.posttrain.self_reward import self_reward

    started = time.perf_counter()
    if model_path in (None, ""):
        raise ConfigError("missing --model: a byte model file (model.safetensors) or a training checkpoint folder")
    if out in (None, ""):
        raise ConfigError("missing --out: the folder the self-reward run writes")
    if (prompts_file is None) == (task_prompts is None):
        raise ConfigError("give the prompts as --prompts FILE or as --task-prompts N (one of them)")
    if measure and task_prompts is None:
        raise ConfigError("--measure needs --task-prompts: it checks answers with the byte task's program checker")
    if not os.path.exists(model_path):
        raise InputError(f"{model_path}: no such model file or checkpoint folder")
    dpo = DPOConfig(beta=beta, lr=lr, epochs=epochs, seed=seed)
    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
        test: list = []
    else:
        if isinstance(task_prompts, bool) or not isinstance(task_prompts, int) or task_prompts < 1:
            raise ConfigError(f"--task-prompts must be an integer >= 1, got {task_prompts!r}")
        splits = T.make_splits(TASK_TRAIN, task_prompts, TASK_TEST if measure else 0, seed=seed)
        prompts = [i.prompt for i in splits.prompts]
        test = splits.test
    _check_run_folder(out, resume)
    _check_resumed_prompts(out, prompts, resume)
    device = runs.resolve_device(device)
    model, adapter = model_from_checkpoint(model_path, device=device)
    if getattr(adapter, "name", None) != "bytes":
        raise ConfigError(
            f"self-reward needs a byte model (adapter 'bytes'); {model_path} was built by adapter "
            f"{getattr(adapter, 'name', None)!r}: the judge's rubric and the prompts are byte text"
        )
    if getattr(model, "quantization", None):
        raise ConfigError(f"{model_path} is quantized: self-reward fine-tunes a full-precision model")
    judges = T.judge_examples(test, seed=seed + 1000) if measure else []

    def measured(m) -> dict:
        got: dict = {}
        if measure:
            with torch.no_grad():
                got = T.evaluate_task(m, test)
                got.update({f"judge_{k}": v for k, v in T.judge_agreement(m, judges).items()})
        if progress is not None:
            progress(got)
        return got

    report = self_reward(
        model, prompts, iterations=iterations, candidates=candidates, judge_samples=judge_samples,
        temperature=temperature, max_new_tokens=max_new_tokens, dpo=dpo, out=out, seed=seed, measure=measured,
        resume=resume,
    )  # fmt: skip
    rows = []
    for r in report.iterations:
        dpo_summary = r.dpo or {}
        rows.append(
            {
                "iteration": r.iteration,
                "prompts": r.prompts,
                "candidates": r.candidates,
                "judgements": r.judgements,
                "unparseable": r.unparseable,
                "unscored": r.unscored,
                "pairs": r.pairs,
                "ties": r.ties,
                "mean_score": r.mean_score,
                "dpo_steps": dpo_summary.get("steps"),
                "dpo_loss_first": dpo_summary.get("losses_first"),
                "dpo_loss_last": dpo_summary.get("losses_last"),
                "measure": r.measure or {},
                "seconds": round(r.seconds, 3),
            }
        )
    last = Path(out) / f"iteration-{len(report.iterations)}" / "model.safetensors"
    return {
        "model": os.fspath(model_path),
        "out": os.fspath(out),
        "prompts": len(prompts),
        "prompt_source": "file" if prompts_file is not None else "task",
        "settings": report.settings,
        "measure": bool(measure),
        "measures": report.measures,
        "iterations": rows,
        "final_model": os.fspath(last) if report.iterations else None,
        "report": os.fspath(Path(out) / "report.json"),
        "seconds": round(time.perf_counter() - started, 3),
    }
