"""A small, modality-agnostic trainer for seqlab models: truncated BPTT with carried state, AdamW with warmup +
cosine, gradient clipping and accumulation, bf16 autocast, JSONL logs, atomic checkpoints and exact resume.

The pieces are a model (``model(inputs, state, return_state=True) -> output`` with ``output.state``), a data
source of windows (a ``WindowSource``: ``SequenceSource``, ``FrameSource``, ``adapter.source(...)``, or anything
with ``batch_size``, ``num_windows`` and ``window(i) -> (inputs, targets)``), a loss ``loss_fn(output, targets) ->
scalar tensor`` (reported in ``loss_unit``) and a metric ``metric_fn(output, targets) -> number``.

A packed source (``seqlab.packing.PackedSource``: documents laid end to end into full rows) is run as packed rows:
each micro-batch's rows flattened into one row with the documents' ``cu_seqlens`` (``model(ids (1, T), None,
return_state=False, cu_seqlens=...)``), every window from a fresh state (``carry_state=False``), the loss averaged
over the real targets only (a document's last element predicts nothing: target -100). See docs/training.md.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seqlab.checkpoint import has_checkpoint, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.ffn import RouterLosses, router_losses
from seqlab.io import atomic_write_bytes
from seqlab.packing import IGNORE, PackedSource
from seqlab.windows import ArraySource, FrameSource, SequenceSource, WindowSource

#: the largest step count, batch, window ... a TrainConfig accepts (as the CLI's count types)
BIG = 1 << 30

# ------------------------------------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    batch_size: int = 8
    window: int = 256
    carry_state: bool = True
    pack: bool = False
    bf16: bool = False
    eval_every: int = 0
    eval_windows: int = 8
    log_path: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int | None = 3
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def number(name, low=None, high=None, low_open=False):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                value = float(value)  # numpy floats and 0-d tensors' .item() alike
                setattr(self, name, value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"TrainConfig.{name} must be a finite number, got {value!r}")
            if low is not None and (value <= low if low_open else value < low):
                raise ConfigError(f"TrainConfig.{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
            if high is not None and value > high:
                raise ConfigError(f"TrainConfig.{name} must be <= {high}, got {value!r}")

        def integer(name, low, high=BIG):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                value = int(value)  # numpy and torch integers too
                setattr(self, name, value)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"TrainConfig.{name} must be an int in [{low}, {high}], got {value!r}")

        def flag(name):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")

        number("lr", 0, 100, low_open=True)
        if self.lr < 1e-12:
            raise ConfigError(
                f"TrainConfig.lr must be >= 1e-12 (smaller steps change no float32 weight), got {self.lr!r}"
            )
        number("weight_decay", 0, 100)
        number("min_lr_ratio", 0, 1)
        if self.grad_clip is not None:
            number("grad_clip", 0, 1e12, low_open=True)
            if self.grad_clip < 1e-12:
                raise ConfigError(f"TrainConfig.grad_clip must be >= 1e-12 or None, got {self.grad_clip!r}")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ConfigError(f"TrainConfig.betas must be a pair (beta1, beta2), got {self.betas!r}")
        for b in self.betas:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
                raise ConfigError(f"TrainConfig.betas must hold two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        integer("max_steps", 1)
        integer("warmup_steps", 0)
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"TrainConfig.warmup_steps ({self.warmup_steps}) must be <= TrainConfig.max_steps ({self.max_steps})"
            )
        integer("grad_accum", 1)
        integer("batch_size", 1)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"TrainConfig.batch_size ({self.batch_size}) must be divisible by TrainConfig.grad_accum "
                f"({self.grad_accum}): each optimizer step splits the batch into that many micro-batches"
            )
        integer("window", 1)
        integer("eval_every", 0)
        integer("eval_windows", 1)
        integer("checkpoint_every", 0)
        integer("seed", 0, 2**63 - 1)
        if self.keep_checkpoints is not None:
            integer("keep_checkpoints", 1)
        for name in ("carry_state", "pack", "bf16", "progress"):
            flag(name)
        if self.pack and self.carry_state:
            raise ConfigError(
                "TrainConfig.pack packs documents into rows that each start from a fresh state: it cannot carry "
                "the state across windows (set TrainConfig.carry_state=False)"
            )
        for name in ("log_path", "checkpoint_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"TrainConfig.{name} must be a path or None, got {value!r}")
            if value is not None:
                setattr(self, name, os.fspath(value))
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ConfigError("TrainConfig.checkpoint_dir must be set when checkpoint_every > 0")

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        return self.lr * self.lr_factor(step)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# ------------------------------------------------------------------------------------------------------
# losses (data sources: seqlab.windows, re-exported here)


def next_token_loss(output, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a LanguageModel's logits."""
    logits = output.logits if hasattr(output, "logits") else output
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def bits_per_token(output, targets: torch.Tensor) -> float:
    return float(next_token_loss(output, targets)) / math.log(2)


# ------------------------------------------------------------------------------------------------------
# trainer


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _router_record(routers: list) -> dict:
    """The MoE ``moe_*`` log fields of one optimizer step: the micro-batches' router measurements averaged, and
    a ``warnings`` list naming each layer whose router collapsed (one expert taking > 90% of the tokens)."""
    records = [r.record() for r in routers]
    out: dict[str, Any] = {}
    for key in ("moe_balance_loss", "moe_z_loss", "moe_dropped_fraction", "moe_max_expert_fraction"):
        out[key] = sum(r[key] for r in records) / len(records)
    layers = records[0]["moe_expert_fraction"]
    out["moe_expert_fraction"] = {
        layer: [sum(r["moe_expert_fraction"][layer][e] for r in records) / len(records) for e in range(len(shares))]
        for layer, shares in layers.items()
    }
    averaged = RouterLosses(torch.zeros(()), 0.0, 0.0, 0.0, {int(k): v for k, v in out["moe_expert_fraction"].items()})
    warnings = averaged.collapsed()
    if warnings:
        out["warnings"] = warnings
    return out


def _is_packed(source) -> bool:
    """True for a packed source (``seqlab.packing.PackedSource``: rows of documents with their ``cu_seqlens``)."""
    return source is not None and getattr(source, "packed", False) is True and hasattr(source, "cu_seqlens")


def _flatten(inputs: torch.Tensor) -> torch.Tensor:
    """(b, L[, d]) packed rows -> one row (1, b * L[, d])."""
    return inputs.reshape(1, inputs.shape[0] * inputs.shape[1], *inputs.shape[2:])


@dataclass
class _Position:
    step: int = 0
    window: int = 0
    epoch: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)


def _refuse_growing_state(model: torch.nn.Module) -> None:
    """Truncated BPTT carries the state from window to window for the whole run: an attention layer without a
    window would keep every training token in its KV cache (memory and time growing without bound)."""
    from seqlab.mixers.attention import AttentionMixer

    layers = [m.layer_idx for m in model.modules() if isinstance(m, AttentionMixer) and m.window is None]
    if layers:
        raise ConfigError(
            f"attention layer(s) {layers} have no attn_window: carried across training windows their KV cache "
            "would grow with every step. Set attn_window (a bounded cache), or TrainConfig.carry_state=False "
            "(each window starts fresh)"
        )


class Trainer:
    """``Trainer(model, config, train_data).fit()`` trains for ``config.max_steps`` optimizer steps.

    ``train_data`` / ``eval_data``: a ``WindowSource`` (e.g. ``SequenceSource``, ``adapter.source(...)``) or raw
    token data (wrapped in a ``SequenceSource`` with the config's batch_size and window; eval data may also be a
    source of another batch size). ``callbacks``: functions ``fn(trainer, record)`` called after each optimizer
    step (after its log line and checkpoint).

    ``loss_unit``: the unit the ``loss`` and ``eval_loss`` of each record are reported in (``adapter.loss_unit``):
    ``"bits"`` (the default: ``loss_fn`` is a likelihood in nats, reported divided by ln 2, like the metrics) or
    ``"mse"`` (a mean squared error, reported as is). Each record and the progress bar name it.
    """

    LOSS_UNITS = ("bits", "mse")

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        train_data,
        eval_data=None,
        loss_fn: Callable | None = None,
        metric_fn: Callable | None = None,
        callbacks: list[Callable] | None = None,
        loss_unit: str = "bits",
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer needs a TrainConfig, got {type(config).__name__}")
        if loss_unit not in self.LOSS_UNITS:
            raise ConfigError(f"Trainer loss_unit must be one of {self.LOSS_UNITS}, got {loss_unit!r}")
        self.loss_unit = loss_unit
        self.model, self.config = model, config
        if config.carry_state:
            _refuse_growing_state(model)
        self.train_data = self._source(train_data, "train_data")
        if self.train_data.batch_size != config.batch_size:
            raise ConfigError(
                f"TrainConfig.batch_size is {config.batch_size}, train_data yields batches of "
                f"{self.train_data.batch_size}"
            )
        self.eval_data = None if eval_data is None else self._source(eval_data, "eval_data")
        self.packed = _is_packed(self.train_data)
        self._check_packing(model)
        self.loss_fn = loss_fn or next_token_loss
        self.metric_fn = metric_fn or bits_per_token
        self.callbacks = list(callbacks or [])
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        import random

        random.seed(config.seed)
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay),
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, config.lr_factor)
        self.pos = _Position()
        self.states: list = [None] * config.grad_accum
        self.history: list[dict] = []
        self._collapsed: set[str] = set()  # MoE layers whose router is collapsed (warned once until they recover)

    def _check_packing(self, model) -> None:
        """A packed source (rows of documents, ``cu_seqlens`` per window) needs ``carry_state=False``, a row
        length equal to ``window`` and a model that takes ``cu_seqlens``; ``TrainConfig.pack`` needs one."""
        c = self.config
        if c.pack and not self.packed:
            raise ConfigError(
                f"TrainConfig.pack is set, but train_data is a {type(self.train_data).__name__}, not packed rows "
                "(seqlab.packing.PackedSource)"
            )
        packed = [(n, s) for n, s in (("train_data", self.train_data), ("eval_data", self.eval_data)) if _is_packed(s)]
        if not packed:
            return
        if c.carry_state:
            raise ConfigError(
                f"{packed[0][0]} is packed rows (documents laid end to end, each row starting from a fresh state): "
                "the state cannot be carried across windows; set TrainConfig.carry_state=False"
            )
        if self.packed and self.train_data.window_size != c.window:
            raise ConfigError(
                f"TrainConfig.window is {c.window}, train_data packs rows of {self.train_data.window_size}"
            )
        import inspect

        try:
            takes = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # a builtin or C forward: let the call say
            return
        if "cu_seqlens" not in takes and not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
            raise ConfigError(
                f"{packed[0][0]} is packed rows, but {type(model).__name__}.forward takes no cu_seqlens (the "
                "documents' boundaries inside a row): train this model on unpacked windows"
            )

    @property
    def packing(self) -> dict | None:
        """The training source's packing counts and efficiency (``PackingStats.to_dict()``), or None when the
        training data is not packed."""
        return self.train_data.stats().to_dict() if self.packed and hasattr(self.train_data, "stats") else None

    def _source(self, data, name):
        if isinstance(data, WindowSource):
            return data
        if hasattr(data, "window") and not isinstance(data, (torch.Tensor, np.ndarray)):
            missing = [m for m in ("batch_size", "num_windows", "window") if not hasattr(data, m)]
            raise InputError(
                f"{name}: a {type(data).__name__} is not a training source (a WindowSource): it has no "
                f"{', '.join(missing)}"
            )
        try:
            return SequenceSource(data, self.config.batch_size, self.config.window)
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from None

    @property
    def step(self) -> int:
        return self.pos.step

    def report_loss(self, loss: float) -> float:
        """A value of ``loss_fn`` in ``loss_unit`` (nats / ln 2 for bits, as is for mse)."""
        return loss / math.log(2) if self.loss_unit == "bits" else loss

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def resume(cls, checkpoint_dir, model, config: TrainConfig, train_data, eval_data=None, **kwargs) -> Trainer:
        """A trainer restored from ``checkpoint_dir``'s latest checkpoint (``fit()`` then continues exactly)."""
        if config.checkpoint_dir is None or os.fspath(checkpoint_dir) != config.checkpoint_dir:
            from dataclasses import replace

            config = replace(config, checkpoint_dir=os.fspath(checkpoint_dir))
        trainer = cls(model, config, train_data, eval_data, **kwargs)
        trainer.load_checkpoint(checkpoint_dir)
        return trainer

    def save_checkpoint(self, directory=None) -> Path:
        directory = directory or self.config.checkpoint_dir
        if directory is None:
            raise ConfigError("TrainConfig.checkpoint_dir is not set and no directory was given")
        c = self.config
        meta = {
            "step": self.pos.step,
            "window": self.pos.window,
            "epoch": self.pos.epoch,
            "tokens": self.pos.tokens,
            "batch_size": c.batch_size,
            "window_len": c.window,
            "grad_accum": c.grad_accum,
            "carry_state": c.carry_state,
            "config": c.to_dict(),
        }
        folder = save_checkpoint(
            directory,
            step=self.pos.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_meta=meta,
            states=self.states,
        )
        try:
            prune_checkpoints(directory, self.config.keep_checkpoints)  # never the one just written (latest)
        except OSError as exc:  # the new checkpoint is safe; an old folder that cannot go stays
            import warnings

            warnings.warn(f"could not remove old checkpoints in {directory}: {exc}", RuntimeWarning, stacklevel=2)
        return folder

    def load_checkpoint(self, directory=None) -> None:
        directory = directory or self.config.checkpoint_dir
        c = self.config
        # checked against this run before anything changes (the model, optimizer and RNGs stay as they are)
        trainer_file = latest_checkpoint(directory) / "trainer.safetensors"
        from seqlab.checkpoint import read_trainer_file

        meta = read_trainer_file(trainer_file)[1].get("trainer")
        if not isinstance(meta, dict):
            raise CorruptFileError(f"{trainer_file}: trainer metadata is incomplete (no 'trainer' object)")
        recorded = meta.get("config")
        recorded = recorded if isinstance(recorded, dict) else {}
        if bool(recorded.get("pack", False)) != c.pack:
            raise ConfigError(
                f"TrainConfig.pack is {c.pack}, the checkpoint in {directory} was made with pack="
                f"{bool(recorded.get('pack', False))}: the data position would not match"
            )
        for key, have in (("batch_size", c.batch_size), ("window_len", c.window), ("grad_accum", c.grad_accum)):
            if meta.get(key) != have:
                field_name = "window" if key == "window_len" else key
                raise ConfigError(
                    f"TrainConfig.{field_name} is {have}, the checkpoint in {directory} was made with "
                    f"{meta.get(key)}: the data position would not match"
                )
        position = []
        for key in ("step", "window", "epoch", "tokens"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CorruptFileError(f"{trainer_file}: trainer {key} must be an int >= 0, got {value!r}")
            position.append(value)
        if position[1] >= self.train_data.num_windows:
            raise ConfigError(
                f"the checkpoint in {directory} is at window {position[1]} of the data, the data now "
                f"has {self.train_data.num_windows} windows: give the run's data"
            )
        meta, states = load_checkpoint(directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.pos = _Position(step=position[0], window=position[1], epoch=position[2], tokens=position[3])
        self.states = [s.to(self.device) if s is not None else None for s in states] or [None] * c.grad_accum
        if len(self.states) != c.grad_accum:
            self.states = [None] * c.grad_accum
        self._trim_log()

    def _trim_log(self) -> None:
        """After a resume, drop log lines of steps the resumed run will redo."""
        path = self.config.log_path
        if path is None or not Path(path).is_file():
            return
        keep = []
        for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
            try:
                step = json.loads(line).get("step", 0)
                if isinstance(step, (int, float)) and step <= self.pos.step:
                    keep.append(line)
            except (ValueError, AttributeError, TypeError):
                continue
        atomic_write_bytes(path, "".join(k + "\n" for k in keep).encode())  # a kill leaves the old log whole

    # ------------------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _packed_forward(self, source, index: int, inputs, targets, rows: slice):
        """The model over rows ``rows`` of packed window ``index``, flattened into one row with its
        ``cu_seqlens``: (output, flat targets (1, n_rows * window))."""
        cu = source.cu_seqlens(index, rows).to(self.device)
        flat_targets = targets[rows].reshape(1, -1)
        out = self.model(_flatten(inputs[rows]), None, return_state=False, cu_seqlens=cu)
        return out, flat_targets

    def _packed_step(self) -> tuple[float, list, int]:
        """Forward and backward of one packed window: each micro-batch's rows as one flattened row, the loss of
        the window the mean over its real targets (each micro-batch's mean weighted by its share of them).
        Returns (loss in nats, routers, targets)."""
        c, source, index = self.config, self.train_data, self.pos.window
        inputs, targets = source.window(index)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        micro = c.batch_size // c.grad_accum
        counts = [int((targets[m * micro : (m + 1) * micro] != IGNORE).sum()) for m in range(c.grad_accum)]
        n = sum(counts)
        total, routers = 0.0, []
        for m in range(c.grad_accum):
            if counts[m] == 0:  # only padding and documents' last elements: nothing to learn here
                continue
            rows = slice(m * micro, (m + 1) * micro)
            with self._autocast():
                out, flat_targets = self._packed_forward(source, index, inputs, targets, rows)
                loss = self.loss_fn(out, flat_targets)
            share = counts[m] / n
            router = router_losses(self.model)
            if router is not None:
                routers.append(router)
                ((loss + router.loss) * share).backward()
            else:
                (loss * share).backward()
            total += float(loss.detach()) * share
        return (total if n else math.nan), routers, n

    def _train_step(self) -> dict:
        c, model = self.config, self.model
        if self.packed:
            self.optimizer.zero_grad(set_to_none=True)
            total, routers, trained = self._packed_step()
            return self._finish_step(total, routers, c.batch_size * c.window, trained)
        inputs, targets = self.train_data.window(self.pos.window)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        micro = c.batch_size // c.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        routers = []
        for m in range(c.grad_accum):
            rows = slice(m * micro, (m + 1) * micro)
            state = self.states[m] if c.carry_state else None
            with self._autocast():
                out = model(inputs[rows], state, return_state=c.carry_state)
                loss = self.loss_fn(out, targets[rows])
            router = router_losses(model)  # MoE layers: auxiliary losses and utilisation (None for dense models)
            if router is not None:
                routers.append(router)
                ((loss + router.loss) / c.grad_accum).backward()
            else:
                (loss / c.grad_accum).backward()
            total += float(loss.detach()) / c.grad_accum
            # TBPTT: the state goes on to the next window, but its graph stops here.
            self.states[m] = out.state.detach() if c.carry_state and out.state is not None else None
        return self._finish_step(total, routers, int(targets.numel()), None)

    def _finish_step(self, total: float, routers: list, elements: int, trained: int | None) -> dict:
        """Clip, step the optimizer and the schedule, advance the data position by a window of ``elements``;
        the step's log record (``trained``: a packed window's real targets, recorded with its packing
        efficiency)."""
        c = self.config
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = c.grad_clip if c.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.pos.step += 1
        self.pos.tokens += elements
        self.pos.window += 1
        if self.pos.window >= self.train_data.num_windows:  # epoch wraps: back to the start, fresh state
            self.pos.window, self.pos.epoch = 0, self.pos.epoch + 1
            self.states = [None] * c.grad_accum
        record = {
            "step": self.pos.step,
            "loss": self.report_loss(total),
            "loss_unit": self.loss_unit,
            "lr": lr,
            "grad_norm": grad_norm,
        }
        if trained is not None:
            record["targets"] = trained
            record["packing_efficiency"] = trained / (c.batch_size * c.window)
        if routers:
            record.update(_router_record(routers))
        return record

    @torch.no_grad()
    def evaluate(self, windows: int | None = None) -> dict:
        """Mean loss (in ``loss_unit``) and metric over the first ``windows`` (default eval_windows) windows of
        eval_data, with the state carried across them when ``carry_state`` (else reset every window)."""
        if self.eval_data is None:
            raise ConfigError("Trainer.evaluate needs eval_data")
        n = min(windows or self.config.eval_windows, self.eval_data.num_windows)
        was_training = self.model.training
        self.model.eval()
        if _is_packed(self.eval_data):
            try:
                return self._evaluate_packed(n)
            finally:
                self.model.train(was_training)
        state, losses, metrics = None, [], []
        try:
            for i in range(n):
                inputs, targets = self.eval_data.window(i)
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                with self._autocast():
                    out = self.model(
                        inputs, state if self.config.carry_state else None, return_state=self.config.carry_state
                    )
                    losses.append(float(self.loss_fn(out, targets)))
                    metrics.append(float(self.metric_fn(out, targets)))
                state = out.state if self.config.carry_state else None
        finally:
            self.model.train(was_training)
        return {"eval_loss": self.report_loss(sum(losses) / n), "eval_metric": sum(metrics) / n}

    def _evaluate_packed(self, n: int) -> dict:
        """``evaluate`` over packed rows: each window's rows as one flattened row with its ``cu_seqlens``; the
        loss and metric of each window weighted by its real targets (-100: nothing predicted)."""
        source = self.eval_data
        assert source is not None  # evaluate() refuses a Trainer without eval_data first
        loss_sum = metric_sum = 0.0
        count = 0
        for i in range(n):
            inputs, targets = source.window(i)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            k = int((targets != IGNORE).sum())
            if k == 0:
                continue
            with self._autocast():
                out, flat_targets = self._packed_forward(source, i, inputs, targets, slice(None))
                loss_sum += float(self.loss_fn(out, flat_targets)) * k
                metric_sum += float(self.metric_fn(out, flat_targets)) * k
            count += k
        if count == 0:
            return {"eval_loss": math.nan, "eval_metric": math.nan}
        return {"eval_loss": self.report_loss(loss_sum / count), "eval_metric": metric_sum / count}

    def _warn_collapse(self, record: dict) -> None:
        """A RuntimeWarning when an MoE layer's router collapses (the log record carries ``warnings`` every step
        it stays collapsed; the warning is raised again only after the layer recovered)."""
        now = {line.split(":")[0] for line in record.get("warnings", [])}
        for line in record.get("warnings", []):
            if line.split(":")[0] not in self._collapsed:
                import warnings

                warnings.warn(f"step {record['step']}: {line}", RuntimeWarning, stacklevel=3)
        self._collapsed = now

    def fit(self, resume: bool = False) -> list[dict]:
        """Train until ``max_steps``. ``resume=True`` first loads the latest checkpoint in ``checkpoint_dir``
        when there is one (and starts fresh otherwise). Returns this call's log records."""
        c = self.config
        if resume and has_checkpoint(c.checkpoint_dir):
            self.load_checkpoint()
        from tqdm.auto import tqdm

        bar = tqdm(total=c.max_steps, initial=self.pos.step, disable=not c.progress, unit="step")
        log = open(c.log_path, "a") if c.log_path else None  # noqa: SIM115 - closed in the finally below
        records = []
        self.model.train()
        try:
            while self.pos.step < c.max_steps:
                t0 = time.perf_counter()
                record = self._train_step()
                self._warn_collapse(record)
                seconds = max(time.perf_counter() - t0, 1e-9)
                record["tokens_per_s"] = (c.batch_size * c.window) / seconds
                if "targets" in record:  # packed rows: the trained targets per second too
                    record["targets_per_s"] = record["targets"] / seconds
                record["epoch"] = self.pos.epoch
                last = self.pos.step == c.max_steps
                if self.eval_data is not None and c.eval_every and (self.pos.step % c.eval_every == 0 or last):
                    record.update(self.evaluate())
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if c.checkpoint_every and (self.pos.step % c.checkpoint_every == 0 or last):
                    self.save_checkpoint()
                records.append(record)
                self.history.append(record)
                shown = {"loss": f"{record['loss']:.4f} {self.loss_unit}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if "eval_metric" in record:
                    shown["metric"] = f"{record['eval_metric']:.4f}"
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
                for fn in self.callbacks:
                    fn(self, record)
        finally:
            bar.close()
            if log is not None:
                log.close()
        return records


__all__ = [
    "ArraySource",
    "FrameSource",
    "PackedSource",
    "SequenceSource",
    "TrainConfig",
    "Trainer",
    "WindowSource",
    "bits_per_token",
    "next_token_loss",
]
