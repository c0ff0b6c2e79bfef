"""The optional fine-tune after AQLM quantization (issue 20): train a quantized model's continuous parameters to
match the full-precision model's next-token distributions on the calibration windows.

AQLM quantizes each layer on its own, against that layer's calibration objective; the errors of many layers add
up through the network. The AQLM paper (Egiazarian et al., 2024) therefore ends with a global fine-tune: the
codebooks, the per-output scales and the parameters that stayed in full precision (such as the norms) are trained
to make the quantized model's outputs match the full-precision model's, with the codes held fixed.
:func:`finetune_quantized` does that with KL(teacher || student) of the next-token distributions (mean over
tokens) as the loss.

Trained (everything else is frozen; each parameter's ``requires_grad`` is restored afterwards):

- every :class:`~seqlab.quant.linear.AQLMLinear`'s ``codebooks`` and ``scales`` (and ``bias`` when it has one);
- with ``train_norms``, the weights of the norm modules (every class of :mod:`seqlab.norm`: ``RMSNorm``,
  ``GatedRMSNorm``), cheap to train and exactly what corrects a layer's output scale.

Not trained: the codes (integers: changing them is a discrete search, which the quantizer did), the embeddings
and LM head, the mixers' other full-precision parameters (convolutions, ``A``, ``D``, ``dt`` biases, layers the
quantizer skipped) and MoE experts (stored compressed, dequantized in memory: their codebooks are not parameters
of the model). Keeping the set small keeps the fine-tune from over-fitting a small calibration set.

What is kept is what is saved: after training every floating-point tensor is rounded to the values the quantized
checkpoint holds (``round_rest`` at ``model.quantization["full_precision_bits"]``: fp16 values), the mean KL
over all windows is measured on those rounded values, and if it is not below the KL before training the starting
parameters are put back (``FinetuneReport.restored``). An exception or interrupt part-way leaves the model's
parameters exactly as they were.
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from seqlab import norm as _norm
from seqlab.errors import ConfigError, InputError
from seqlab.quant.linear import AQLMLinear
from seqlab.quant.storage import round_rest

#: teacher log-probabilities of all windows are kept in memory when they fit in this many bytes (else recomputed)
TEACHER_CACHE_BYTES = 1 << 30


@dataclass
class FinetuneReport:
    """What :func:`finetune_quantized` did: ``kl_before`` and ``kl_after`` are the mean KL(teacher || student) in
    nats per token over all windows, before training and as kept (after rounding; equal to ``kl_before`` when
    ``restored``); ``losses`` the training loss of each step (before its update); ``restored`` whether training
    made things worse and the starting parameters were put back."""

    steps: int
    kl_before: float
    kl_after: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    restored: bool = False


def norm_classes() -> tuple[type[nn.Module], ...]:
    """Every ``nn.Module`` class defined in :mod:`seqlab.norm` (the norms whose weights are trained)."""
    return tuple(
        cls
        for _, cls in inspect.getmembers(_norm, inspect.isclass)
        if issubclass(cls, nn.Module) and cls.__module__ == _norm.__name__
    )


def trainable_parameters(model: nn.Module, *, train_norms: bool = True) -> dict[str, nn.Parameter]:
    """The parameters :func:`finetune_quantized` trains, by name (each tensor once, even when tied)."""
    norms = norm_classes()
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, AQLMLinear):
            names = ["codebooks", "scales", "bias"]
        elif train_norms and isinstance(module, norms):
            names = ["weight"]
        else:
            continue
        for leaf in names:
            p = getattr(module, leaf, None)
            if isinstance(p, nn.Parameter) and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                chosen[f"{prefix}.{leaf}" if prefix else leaf] = p
    return chosen


def _kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) in nats (teacher given as log-probabilities)."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - log_q)).sum()


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _check_windows(windows) -> list[torch.Tensor]:
    if isinstance(windows, torch.Tensor) or not isinstance(windows, Sequence):
        raise InputError(f"windows must be a list of (batch, length) token id tensors, got {type(windows).__name__}")
    windows = list(windows)
    if not windows:
        raise InputError("windows is empty: give at least one (batch, length) calibration window")
    for i, w in enumerate(windows):
        if not isinstance(w, torch.Tensor):
            raise InputError(f"windows[{i}] must be a token id tensor, got {type(w).__name__}")
        if w.dim() != 2 or w.numel() == 0:
            raise InputError(f"windows[{i}] must be a non-empty (batch, length) tensor, got shape {tuple(w.shape)}")
    return windows


def _check_settings(steps, lr, batch_size, progress) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be None or an int >= 1 (windows per step), got {batch_size!r}")
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be callable as progress(step, steps, loss), got {type(progress).__name__}")


def finetune_quantized(
    model: nn.Module,
    teacher: nn.Module,
    windows: Sequence[torch.Tensor],
    *,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int | None = None,
    seed: int = 0,
    train_norms: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> FinetuneReport:
    """Fine-tune ``model`` (quantized by :func:`seqlab.quant.quantize_model`) in place to match ``teacher`` (the
    full-precision model it came from) on ``windows``; return a :class:`FinetuneReport`.

    Trains the AQLM layers' codebooks, scales and biases and, with ``train_norms``, the norm weights (module
    docstring: what is trained and why) with Adam at learning rate ``lr`` for ``steps`` steps. The loss is
    KL(teacher || student) of the next-token distributions, mean over the tokens of the step's windows; the
    teacher runs without gradients, once per window (its log-probabilities are cached when they fit in
    :data:`TEACHER_CACHE_BYTES`). ``windows``: a non-empty list of (batch, length) token id tensors (the
    calibration windows); each step takes ``batch_size`` of them (None: one), cycling through all of them in an
    order shuffled by ``seed`` on every pass. ``progress(step, steps, loss)`` after each step (step from 1).

    The model runs in eval mode (no dropout: the function used at inference is fitted) and is left in eval mode;
    the teacher's mode is restored. Afterwards the parameters are rounded to their stored values (fp16 for a
    16-bit ``full_precision_bits``), so that ``seqlab.checkpoint.save_model`` writes what was measured; the result
    is kept only if its mean KL over all windows is below the KL before training, else the starting parameters
    are restored (``report.restored``). An exception part-way restores the starting parameters and re-raises.

    Raises ``ConfigError`` for a model that is not quantized (no ``model.quantization``), the teacher being the
    model itself, or bad settings; ``InputError`` for an empty or malformed window list and for a teacher whose
    vocabulary or logits do not match the model's."""
    start_time = time.perf_counter()
    layout = getattr(model, "quantization", None)
    if not layout:
        raise ConfigError(
            "finetune_quantized needs a model quantized by seqlab.quant.quantize_model (model.quantization is not "
            "set); quantize it first"
        )
    if teacher is model:
        raise ConfigError("the teacher must be the full-precision model, not the quantized model itself")
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be an nn.Module (the full-precision model), got {type(teacher).__name__}")
    _check_settings(steps, lr, batch_size, progress)
    windows = _check_windows(windows)
    v_model, v_teacher = getattr(model, "vocab_size", None), getattr(teacher, "vocab_size", None)
    if v_model is not None and v_teacher is not None and v_model != v_teacher:
        raise InputError(f"the teacher's vocabulary ({v_teacher}) differs from the model's ({v_model})")
    bits = int(layout.get("full_precision_bits", 16))
    params = trainable_parameters(model, train_norms=train_norms)
    if not params:
        raise ConfigError("the model has no AQLMLinear layer and no norm to train")
    device, teacher_device = _device(model), _device(teacher)

    teacher_was_training = teacher.training
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    snapshot = _snapshot(model, params, bits)
    model.eval()
    teacher.eval()
    try:
        teacher_logp = _TeacherCache(teacher, windows, teacher_device, device)
        tokens = [w.shape[0] * w.shape[1] for w in windows]

        def window_kl(i: int) -> torch.Tensor:
            """Sum of the per-token KL on window ``i`` (differentiable when grad is enabled)."""
            target = teacher_logp[i]
            logits = model(windows[i].to(device)).logits
            if tuple(logits.shape) != tuple(target.shape):
                raise InputError(
                    f"windows[{i}]: the model's logits are {tuple(logits.shape)} but the teacher's are "
                    f"{tuple(target.shape)} (another vocabulary or output?)"
                )
            return _kl(logits, target)

        def mean_kl() -> float:
            with torch.no_grad():
                return sum(float(window_kl(i)) for i in range(len(windows))) / sum(tokens)

        kl_before = mean_kl()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(list(params.values()), lr=lr)
        order = _Order(len(windows), seed)
        per_step = batch_size or 1
        losses: list[float] = []
        for step in range(1, steps + 1):
            picked = [order.next() for _ in range(per_step)]
            count = sum(tokens[i] for i in picked)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            with torch.enable_grad():
                for i in picked:  # one backward per window: memory of one window's activations
                    loss = window_kl(i) / count
                    loss.backward()
                    total += float(loss.detach())
            optimizer.step()
            losses.append(total)
            if progress is not None:
                progress(step, steps, total)
        round_rest(model, bits)  # what is saved is what is measured and kept
        kl_after = mean_kl()
        restored = steps > 0 and not kl_after < kl_before  # no better (or not finite): keep the start
        if restored:
            _restore(snapshot)
            kl_after = kl_before
    except BaseException:
        _restore(snapshot)
        raise
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.eval()
        teacher.train(teacher_was_training)
        for p in params.values():
            p.grad = None
    return FinetuneReport(steps, kl_before, kl_after, losses, time.perf_counter() - start_time, restored)


def _snapshot(model: nn.Module, params: dict[str, nn.Parameter], bits: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of what the fine-tune may change: the trained parameters, and any other floating-point tensor that
    ``round_rest`` would change (none in a model fresh from ``quantize_model``)."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = [(p, p.detach().clone()) for p in params.values()]
    if bits == 16:
        trained = {id(p) for p in params.values()}
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point() and id(t) not in trained and not torch.equal(t, t.half().to(t.dtype)):
                    pairs.append((t, t.detach().clone()))
    return pairs


def _restore(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, saved in snapshot:
            tensor.copy_(saved)


class _Order:
    """Window indices cycling through all windows, reshuffled (seeded) on every pass."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.rng = n, random.Random(seed)
        self.queue: list[int] = []

    def next(self) -> int:
        if not self.queue:
            self.queue = list(range(self.n))
            self.rng.shuffle(self.queue)
        return self.queue.pop()


class _TeacherCache:
    """The teacher's next-token log-probabilities per window, on the student's device: all computed once when
    they fit in :data:`TEACHER_CACHE_BYTES`, else recomputed on each use."""

    def __init__(self, teacher: nn.Module, windows: list[torch.Tensor], teacher_device, device) -> None:
        self.teacher, self.windows, self.teacher_device, self.device = teacher, windows, teacher_device, device
        first = self._compute(0)
        size = first.element_size() * first.shape[-1] * sum(w.numel() for w in windows)
        self.cache: dict[int, torch.Tensor] | None = None
        if size <= TEACHER_CACHE_BYTES:
            self.cache = {0: first}
            for i in range(1, len(windows)):
                self.cache[i] = self._compute(i)

    def _compute(self, i: int) -> torch.Tensor:
        with torch.no_grad():
            logits = self.teacher(self.windows[i].to(self.teacher_device)).logits
        return F.log_softmax(logits.float(), dim=-1).to(self.device)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache[i] if self.cache is not None else self._compute(i)


__all__ = ["TEACHER_CACHE_BYTES", "FinetuneReport", "finetune_quantized", "norm_classes", "trainable_parameters"]
