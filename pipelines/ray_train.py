"""Data-parallel training of seqlab models with Ray Train (``TorchTrainer`` + DDP).

``train_data_parallel(model_factory, config, train_data)`` starts ``num_workers`` Ray Train workers. Each one
builds the model, wraps it in DistributedDataParallel (gloo on CPU, NCCL on GPU), takes its own contiguous,
equal-sized slice of the token sequence and runs seqlab's ``Trainer`` on it; DDP averages the gradients, so
every rank holds the same weights after every step. The ranks average every step's loss and report to Ray
(the rank-averaged loss and, for an MoE model, the rank-averaged ``moe_*`` router fields: auxiliary losses and
expert utilisation) once ``report_seconds`` have passed since the last report, at checkpoint steps and at the last
step, whose report holds every step's loss: Ray Train collects one report per worker per poll, so reporting
every step held training to one step per poll (``_ReportPace``). Rank 0 attaches seqlab checkpoints
(safetensors, ``seqlab.checkpoint`` layout) every ``config.checkpoint_every`` steps and at the end.
``load_trained_model(result)`` rebuilds a ``LanguageModel`` from the final checkpoint.
See docs/training.md ("Data-parallel training with Ray Train").
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqlab.checkpoint import latest_checkpoint, load_model, save_checkpoint
from seqlab.config import BackboneConfig
from seqlab.errors import BackendUnavailableError, ConfigError, InputError
from seqlab.models import LanguageModel
from seqlab.train import TrainConfig, Trainer

from .ray_cluster import connect

MODEL_SPEC_FILE = "seqlab_model.json"


# ------------------------------------------------------------------------------------------------------
# model specs


def _build_model(model_factory) -> torch.nn.Module:
    """``model_factory`` is a picklable zero-argument callable returning a model, or a
    ``(BackboneConfig | dict, vocab_size)`` spec for a ``LanguageModel``."""
    if isinstance(model_factory, (tuple, list)):
        if len(model_factory) != 2:
            raise ConfigError(f"model spec must be (BackboneConfig or dict, vocab_size), got {model_factory!r}")
        config, vocab_size = model_factory
        if isinstance(config, dict):
            config = BackboneConfig.from_dict(config)
        return LanguageModel(config, vocab_size)
    if not callable(model_factory):
        raise ConfigError(
            f"model_factory must be a callable or a (config, vocab_size) spec, got {type(model_factory).__name__}"
        )
    model = model_factory()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model_factory() must return a torch.nn.Module, got {type(model).__name__}")
    return model


def _model_spec(model: torch.nn.Module) -> dict[str, Any]:
    spec: dict[str, Any] = {"class": type(model).__name__, "fingerprint": getattr(model, "fingerprint", None)}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        spec["config"] = config.to_dict()
    if isinstance(model, LanguageModel):
        spec["vocab_size"] = model.vocab_size
        spec["tie_embeddings"] = model.tie_embeddings
    return spec


def _shard(train_data, rank: int, world: int):
    """Rank ``rank``'s contiguous slice of a 1-D token sequence; all slices have the same length."""
    if isinstance(train_data, torch.Tensor):
        train_data = train_data.detach().cpu()
    elif not isinstance(train_data, np.ndarray):
        raise InputError(
            f"train_data must be a 1-D torch tensor or numpy array of token ids, got {type(train_data).__name__}"
        )
    if train_data.ndim != 1:
        raise InputError(
            f"train_data must be 1-D (one token sequence) to shard by rank, got shape {tuple(train_data.shape)}"
        )
    size = train_data.shape[0] // world
    return train_data[rank * size : (rank + 1) * size]


# ------------------------------------------------------------------------------------------------------
# the worker


def _weight_checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


#: the scalar MoE fields of a step record (seqlab.ffn.RouterLosses.record), averaged over the ranks
MOE_SCALARS = ("moe_balance_loss", "moe_z_loss", "moe_dropped_fraction", "moe_max_expert_fraction")


def _average_moe(record: dict, world: int, all_reduce: Callable[[torch.Tensor], None]) -> dict:
    """The ``moe_*`` fields of this rank's step record averaged over the ``world`` ranks (each rank trains on an
    equal share of the tokens, so the mean of the ranks' shares is the global batch's share), with ``warnings``
    recomputed from the averaged expert fractions. ``all_reduce`` sums a float64 tensor over the ranks in place.
    Every rank must call this with records of the same layers (the same model); {} for a dense model."""
    from seqlab.ffn import RouterLosses

    if "moe_expert_fraction" not in record:
        return {}
    layers = sorted(record["moe_expert_fraction"], key=int)
    shares = [record["moe_expert_fraction"][layer] for layer in layers]
    flat = [float(record[key]) for key in MOE_SCALARS] + [float(v) for row in shares for v in row]
    values = torch.tensor(flat, dtype=torch.float64)
    all_reduce(values)
    values = (values / world).tolist()
    out: dict[str, Any] = dict(zip(MOE_SCALARS, values[: len(MOE_SCALARS)]))
    fractions, at = {}, len(MOE_SCALARS)
    for layer, row in zip(layers, shares):
        fractions[layer] = values[at : at + len(row)]
        at += len(row)
    out["moe_expert_fraction"] = fractions
    collapsed = RouterLosses(torch.zeros(()), 0.0, 0.0, 0.0, {int(k): v for k, v in fractions.items()}).collapsed()
    if collapsed:
        out["warnings"] = collapsed
    return out


#: Ray Train's controller collects one report per worker each time it polls the workers (its health check,
#: ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), and a worker's ``ray.train.report`` waits while the
#: previous report is still uncollected (a queue of one). Reporting every step therefore held training to one
#: step per poll (measured: 2.0 s a step for a model whose steps take milliseconds).
RAY_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_POLL_DEFAULT_S = 2.0


def _ray_poll_seconds() -> float:
    try:
        value = float(os.environ.get(RAY_POLL_ENV, RAY_POLL_DEFAULT_S))
    except ValueError:
        return RAY_POLL_DEFAULT_S
    return value if math.isfinite(value) and value >= 0 else RAY_POLL_DEFAULT_S


class _ReportPace:
    """Which steps report to Ray: every checkpoint step and the last one, and otherwise a step when at least
    ``seconds`` passed since the last report (0: every step). ``clock`` is the time in seconds. Each rank asks
    ``wants`` with its own clock; the ranks then agree (a step reports when any rank wants it), so all of them
    call ``ray.train.report`` together."""

    def __init__(self, seconds: float, checkpoint_every: int, max_steps: int, clock: Callable[[], float]):
        self.seconds, self.every, self.max_steps, self.clock = seconds, checkpoint_every, max_steps, clock
        self.last = clock()

    def checkpoint(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == self.max_steps

    def wants(self, step: int) -> bool:
        return self.checkpoint(step) or self.clock() - self.last >= self.seconds

    def reported(self) -> None:
        self.last = self.clock()


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    user_config: TrainConfig = loop_config["config"]
    # Ray storage holds the checkpoints (rank 0 writes them below); the Trainer itself saves none, and only
    # rank 0 writes the JSONL log.
    config = replace(
        user_config,
        checkpoint_every=0,
        checkpoint_dir=None,
        progress=False,
        log_path=user_config.log_path if rank == 0 else None,
    )
    torch.manual_seed(config.seed)
    model = _build_model(loop_config["model_factory"])
    spec = _model_spec(model)
    # prepare_model moves the model to this worker's device and wraps it in DDP (rank 0's weights broadcast).
    ddp = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    inner = ddp.module if hasattr(ddp, "module") else ddp
    shard = _shard(loop_config["train_data"], rank, world)
    trainer = Trainer(
        ddp, config, shard, loop_config["eval_data"], loss_fn=loop_config["loss_fn"], metric_fn=loop_config["metric_fn"]
    )
    max_steps = user_config.max_steps
    pace = _ReportPace(loop_config["report_seconds"], loop_config["checkpoint_every"], max_steps, time.monotonic)
    losses: list[float] = []
    reports = 0

    def report(tr: Trainer, record: dict) -> None:
        nonlocal reports
        step = tr.step
        # one all-reduce: the sum of the ranks' losses (each on its own shard) and whether any rank wants a report
        summed = torch.tensor([record["loss"], float(pace.wants(step))], dtype=torch.float64)
        dist.all_reduce(summed)
        losses.append(float(summed[0]) / world)
        if not summed[1] > 0:
            return
        reports += 1
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics.update(loss=losses[-1], rank0_loss=record["loss"], world_size=world, reports=reports)
        # MoE: the router's losses and utilisation of the global batch, not rank 0's share of it
        metrics.update(_average_moe(record, world, dist.all_reduce))
        last = step == max_steps
        if last:
            sums = [None] * world
            dist.all_gather_object(sums, _weight_checksum(inner))
            metrics.update(weight_checksums=sums, losses=list(losses))
        if pace.checkpoint(step):
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    meta = {
                        "step": step,
                        "world_size": world,
                        "config": user_config.to_dict(),
                        "shard_tokens": int(shard.shape[0]),
                    }
                    save_checkpoint(
                        tmp,
                        step=step,
                        model=inner,
                        optimizer=tr.optimizer,
                        scheduler=tr.scheduler,
                        trainer_meta=meta,
                        states=tr.states,
                    )
                    Path(tmp, MODEL_SPEC_FILE).write_text(json.dumps(spec))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)
        pace.reported()

    trainer.callbacks.append(report)
    trainer.fit()


# ------------------------------------------------------------------------------------------------------
# driver


def _check_cluster(scaling, num_workers: int, address: str | None) -> None:
    """Refuse a run the cluster cannot place: Ray Train starts all ``num_workers`` workers at once (one placement
    group), so a request beyond the cluster's total (a GPU on a cluster without one) would wait forever while Ray
    prints autoscaler lines."""
    import ray

    try:
        per_worker = scaling._resources_per_worker_not_none
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"resources_per_worker: {exc}") from None
    have = ray.cluster_resources()
    where = f"the Ray cluster at {address!r}" if address else "this machine's Ray cluster"
    for resource, amount in per_worker.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
            raise ConfigError(f"resources_per_worker[{resource!r}] must be a finite number >= 0, got {amount!r}")
        need, total = amount * num_workers, float(have.get(resource, 0.0))
        if need > total + 1e-9:
            asked = "use_gpu=True" if resource == "GPU" and scaling.use_gpu else f"{amount:g} {resource} per worker"
            raise BackendUnavailableError(
                f"{num_workers} worker(s) with {asked} need {need:g} {resource} at once, more than {where} has "
                f"({total:g}); Ray Train would wait for them forever. Lower num_workers or the request, or join a "
                f"cluster that has them (address=)"
            )


def train_data_parallel(
    model_factory: Callable[[], torch.nn.Module] | tuple,
    config: TrainConfig,
    train_data,
    eval_data=None,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    address: str | None = None,
    storage_path: str | os.PathLike | None = None,
    name: str | None = None,
    loss_fn: Callable | None = None,
    metric_fn: Callable | None = None,
    checkpoint_every: int | None = None,
    backend: str | None = None,
    resources_per_worker: dict | None = None,
    report_seconds: float | None = None,
    quiet: bool = False,
):
    """Train ``model_factory()`` on ``train_data`` with ``num_workers`` data-parallel Ray Train workers.

    ``model_factory``: a picklable zero-argument callable returning the model, or a ``(BackboneConfig or its
    dict, vocab_size)`` spec for a ``LanguageModel``. ``config``: the per-worker ``TrainConfig`` (each worker
    steps ``max_steps`` times on batches of ``batch_size`` streams from its shard, so one global step sees
    ``num_workers * batch_size`` streams). ``train_data``: one 1-D token sequence (tensor or array), cut into
    ``num_workers`` equal contiguous shards. ``eval_data``: evaluated whole by every rank. ``address``:
    None starts (or reuses) a local Ray cluster, else joins that cluster. ``storage_path`` (default
    ``~/ray_results``) and ``name``: where Ray keeps the run and its checkpoints. ``checkpoint_every``: rank 0
    reports a checkpoint every that many steps (default ``config.checkpoint_every``) and always at the last
    step; ``config.checkpoint_dir`` is not used (Ray storage holds the checkpoints). ``backend``: the
    torch.distributed backend (default gloo on CPU, nccl on GPU). ``report_seconds``: the least time between two
    reports to Ray (``ray.train.report``) other than the checkpoint steps and the last step, which always report;
    default Ray Train's poll interval (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s), since a worker waits for the
    controller's next poll when it reports again sooner; 0 reports every step, at most one step per poll.
    ``quiet``: Ray's own log lines off (start-up notices, Ray Train's progress reports and status tables:
    ``seqlab.pipelines.ray_cluster``).

    Returns Ray's ``Result``: ``result.metrics`` (rank 0's last report: ``loss`` averaged over ranks,
    ``losses`` per step, ``weight_checksums`` per rank, ``reports`` how many reports the run made; an MoE model's
    ``moe_balance_loss``, ``moe_z_loss``, ``moe_dropped_fraction``, ``moe_max_expert_fraction`` and per-layer
    ``moe_expert_fraction`` averaged over ranks, with ``warnings`` when a layer's router collapsed),
    ``result.checkpoint`` (the final seqlab checkpoint; ``load_trained_model(result)`` loads it), ``result.path``.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train_data_parallel needs a TrainConfig, got {type(config).__name__}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if getattr(config, "pack", False):
        raise ConfigError(
            "train_data_parallel cuts one token sequence into contiguous shards; packed rows of documents "
            "(TrainConfig.pack) are not supported on Ray Train workers yet: train packed in one process (Trainer)"
        )
    if isinstance(train_data, torch.Tensor):
        train_data = train_data.detach().cpu()
    _shard(train_data, 0, num_workers)  # fail here, not inside a worker
    every = config.checkpoint_every if checkpoint_every is None else checkpoint_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"checkpoint_every must be an int >= 0, got {every!r}")
    if report_seconds is None:
        report_seconds = _ray_poll_seconds()
    if (
        isinstance(report_seconds, bool)
        or not isinstance(report_seconds, (int, float))
        or not math.isfinite(report_seconds)
        or report_seconds < 0
    ):
        raise ConfigError(f"report_seconds must be a finite number of seconds >= 0, got {report_seconds!r}")
    connect(address, quiet=quiet, log_to_driver=False)
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker)
    _check_cluster(scaling, num_workers, address)
    storage = os.path.abspath(os.path.expanduser(os.fspath(storage_path or "~/ray_results")))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "model_factory": model_factory,
            "config": config,
            "train_data": train_data,
            "eval_data": eval_data,
            "loss_fn": loss_fn,
            "metric_fn": metric_fn,
            "checkpoint_every": every,
            "report_seconds": float(report_seconds),
        },
        torch_config=TorchConfig(backend=backend or ("nccl" if use_gpu else "gloo")),
        scaling_config=scaling,
        run_config=RunConfig(storage_path=storage, name=name),
    )
    return trainer.fit()


def load_trained_model(result_or_checkpoint, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The weights of a run's final checkpoint in a model: a Ray ``Result``, a ``ray.train.Checkpoint`` or a
    checkpoint directory. Without ``model`` a ``LanguageModel`` is rebuilt from the saved config and
    vocab size; with one, the weights load into it (its config fingerprint must match)."""
    checkpoint = getattr(result_or_checkpoint, "checkpoint", result_or_checkpoint)
    if checkpoint is None:
        raise FileNotFoundError("the run has no checkpoint (did it fail? see result.error)")
    if hasattr(checkpoint, "as_directory"):
        with checkpoint.as_directory() as directory:
            return _load_from_directory(Path(directory), model)
    return _load_from_directory(Path(checkpoint), model)


def _load_from_directory(directory: Path, model: torch.nn.Module | None) -> torch.nn.Module:
    if model is None:
        spec = json.loads((directory / MODEL_SPEC_FILE).read_text())
        if spec.get("class") != "LanguageModel" or "vocab_size" not in spec:
            raise ConfigError(f"{directory}: the checkpoint holds a {spec.get('class')}; pass model= to load it")
        model = LanguageModel(
            BackboneConfig.from_dict(spec["config"]),
            spec["vocab_size"],
            tie_embeddings=spec.get("tie_embeddings", True),
        )
    load_model(latest_checkpoint(directory) / "model.safetensors", model)
    return model


__all__ = ["load_trained_model", "train_data_parallel"]
