"""The distillation objective as a model the ``Trainer`` trains: ``DistillModel(teacher, student, ...)``.

The Trainer (and Ray Train's data-parallel loop, which runs the Trainer on each worker) trains any module whose
output a ``loss_fn(output, targets)`` turns into a loss. ``DistillModel`` runs the frozen teacher and the student
on the same window and returns a ``DistillOutput``; ``distill_loss`` is the loss:

- ``mode="align"`` (a progressive stage): each replaced layer's Mamba-2 mixer gets the teacher's input to that
  layer's attention (teacher-forced) and the loss is the mean over those layers of the MSE between its output
  and the teacher attention's output. Only the replaced mixers train.
- ``mode="e2e"``: the whole student runs; the loss is ``kl_weight * KL(teacher || student)`` at
  ``temperature`` (times temperature^2, as in Hinton et al.) plus ``ce_weight`` times the next-token
  cross-entropy, in nats. Everything trains but what ``freeze_mlp`` freezes (feed-forwards and their norms).

The teacher is held outside the module's parameters and state dict (``.to()`` still moves it): checkpoints hold
the student only, and DDP neither broadcasts nor reduces the teacher (every worker loads the same one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError

MODES = ("align", "e2e")


@dataclass(eq=False)
class DistillOutput:
    """What ``DistillModel`` returns: the student's ``logits`` (None in align mode), the teacher's, the
    ``align`` losses per replaced layer (align mode), and ``state`` (always None: windows are independent)."""

    logits: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    align: dict[int, torch.Tensor] = field(default_factory=dict)
    state: None = None
    settings: dict = field(default_factory=dict)


def _set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class DistillModel(nn.Module):
    """The student (a registered submodule) and the frozen teacher (not one) for one distillation stage."""

    def __init__(
        self,
        teacher: Any,
        student: Any,
        layers: Sequence[int],
        mode: str = "e2e",
        *,
        temperature: float = 1.0,
        kl_weight: float = 1.0,
        ce_weight: float = 0.0,
        freeze_mlp: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"DistillModel mode must be one of {MODES}, got {mode!r}")
        for name, value in (("temperature", temperature), ("kl_weight", kl_weight), ("ce_weight", ce_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        self.__dict__["teacher"] = teacher.eval()  # not a submodule: outside parameters() and state_dict()
        _set_trainable(teacher, False)
        self.student: Any = student
        self.config = student.config
        self.layers = list(layers)
        self.mode = mode
        self.settings = {
            "temperature": float(temperature),
            "kl_weight": float(kl_weight),
            "ce_weight": float(ce_weight),
        }
        if mode == "align":
            _set_trainable(student, False)
            for i in self.layers:
                _set_trainable(student.backbone.layers[i].mixer, True)
        else:
            _set_trainable(student, True)
            if freeze_mlp:
                for block in student.backbone.layers:
                    for part in (block.ffn, block.ffn_norm):
                        if part is not None:
                            _set_trainable(part, False)

    @property
    def fingerprint(self) -> str:
        return self.student.fingerprint

    def _apply(self, fn, *args, **kwargs):
        self.__dict__["teacher"]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.__dict__["teacher"].eval()
        return self

    def forward(self, input_ids: torch.Tensor, state=None, return_state: bool = True) -> DistillOutput:
        teacher = self.__dict__["teacher"]
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = []
        if self.mode == "align":
            for i in self.layers:

                def keep(module, args, output, i=i):
                    captured[i] = (args[0].detach(), output[0].detach())

                hooks.append(teacher.backbone.layers[i].mixer.register_forward_hook(keep))
        try:
            with torch.no_grad():
                teacher_out = teacher(input_ids, None, return_state=False)
        finally:
            for hook in hooks:
                hook.remove()
        if self.mode == "align":
            losses = {}
            for i in self.layers:
                given, wanted = captured[i]
                got, _ = self.student.backbone.layers[i].mixer(given, None, False)
                losses[i] = F.mse_loss(got.float(), wanted.float())
            return DistillOutput(None, None, losses, settings=self.settings)
        student_out = self.student(input_ids, None, return_state=False)
        return DistillOutput(student_out.logits, teacher_out.logits, settings=self.settings)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Mean over positions of KL(teacher || student) in nats, of the softened distributions (temperature)."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def distill_parts(output: DistillOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss and its parts: ``align_mse`` and ``align_mse_layer{i}`` (align mode), or ``kl`` and ``ce``
    (e2e, in nats; kl at the temperature)."""
    if output.align:
        parts = {f"align_mse_layer{i}": loss for i, loss in output.align.items()}
        parts["loss"] = parts["align_mse"] = torch.stack(list(output.align.values())).mean()
        return parts
    assert output.logits is not None and output.teacher_logits is not None
    s = output.settings
    temperature = s.get("temperature", 1.0)
    kl = kl_divergence(output.logits, output.teacher_logits, temperature)
    logits = output.logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss = s.get("kl_weight", 1.0) * kl * temperature**2 + s.get("ce_weight", 0.0) * ce
    return {"loss": loss, "kl": kl, "ce": ce}


def distill_loss(output: DistillOutput, targets: torch.Tensor) -> torch.Tensor:
    """The Trainer's ``loss_fn`` for a ``DistillModel`` (a module-level function, so Ray can pickle it)."""
    return distill_parts(output, targets)["loss"]


def distill_metric(output: DistillOutput, targets: torch.Tensor) -> float:
    """The Trainer's ``metric_fn``: the student's bits per token in e2e mode, the mean layer MSE in align mode."""
    if output.align:
        return float(torch.stack(list(output.align.values())).mean())
    assert output.logits is not None
    logits = output.logits.float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))) / math.log(2)


@torch.no_grad()
def evaluate_distillation(teacher, student, eval_data, windows: int | None = None) -> dict:
    """Held-out ``eval_kl`` (KL(teacher || student), nats per token) and ``eval_bits_per_token`` of the student
    and ``teacher_bits_per_token``, over ``eval_data``'s windows (a WindowSource or 1-D ids, windows of 256)."""
    from seqlab.windows import SequenceSource, WindowSource

    source = eval_data if isinstance(eval_data, WindowSource) else SequenceSource(eval_data, 1, 256)
    n = source.num_windows if windows is None else min(windows, source.num_windows)
    was = student.training
    student.eval()
    kl = ce_s = ce_t = 0.0
    tokens = 0
    device = next(student.parameters()).device
    try:
        for i in range(n):
            inputs, targets = (x.to(device) for x in source.window(i))
            s = student(inputs, None, return_state=False).logits.float()
            t = teacher(inputs, None, return_state=False).logits.float()
            count = targets.numel()
            kl += float(kl_divergence(s, t)) * count
            ce_s += float(F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1), reduction="sum"))
            ce_t += float(F.cross_entropy(t.reshape(-1, t.shape[-1]), targets.reshape(-1), reduction="sum"))
            tokens += count
    finally:
        student.train(was)
    if not tokens:
        raise InputError("the held-out data holds no window to evaluate")
    return {
        "eval_kl": kl / tokens,
        "eval_bits_per_token": ce_s / tokens / math.log(2),
        "teacher_bits_per_token": ce_t / tokens / math.log(2),
        "eval_tokens": tokens,
    }
