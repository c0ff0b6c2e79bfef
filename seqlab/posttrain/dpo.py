"""Direct Preference Optimization (DPO, Rafailov et al. 2023, issue 21): fine-tune a language model on pairs
(prompt, chosen response, rejected response) against a frozen reference model, without a reward model.

The loss of one pair, with pi the policy being trained, ref the frozen reference and beta > 0::

    -log sigmoid(beta * ((log pi(chosen|prompt) - log ref(chosen|prompt))
                         - (log pi(rejected|prompt) - log ref(rejected|prompt))))

where ``log pi(y|x)`` is the sum over the response tokens of their log-probabilities given the prompt and the
earlier response tokens (``sequence_logprobs``). ``beta * (log pi(y|x) - log ref(y|x))`` is the response's
implicit reward; ``dpo_loss`` reports its mean for chosen and rejected responses, their margin and how often the
chosen one gets the higher reward.

Scoring (``sequence_logprobs``):

- Rows of prompt + response are right-padded to the longest row of a batch and scored in one forward. The models
  are causal, so padding after a row's last token cannot change its earlier positions (an attention layer's mask
  is causal too); the padded positions are masked out of the sum.
- The model runs with its modules in eval mode for the forward (their modes are restored afterwards), with or
  without autograd. That is what makes a row's score independent of the rest of its batch: an MoE layer
  (``seqlab.ffn.moe``) in training mode has a per-batch expert capacity, drops tokens over it and jitters its
  router, so a row's log-probability would depend on its batch neighbours (and their padding). In eval mode it
  routes every token by its own hidden vector without capacity, so a row scores what it scores alone, one token
  at a time through ``model.step``, as generation samples it. The consequence for DPO: the MoE router still
  learns through its gate weights, but no capacity drops, jitter or auxiliary balance losses act during DPO.
  Nothing else in seqlab's models depends on the training flag.

Training (``train_dpo``) keeps the Trainer's conventions (``seqlab.train``, ``seqlab.checkpoint``): AdamW with
the Trainer's parameter groups (no decay on vectors), a constant learning rate, gradient clipping, global RNGs
seeded from the config, and checkpoints with model, optimizer, RNG states, the step and the data order, written
atomically with ``latest`` moved last and old step folders pruned. The reference's log-probabilities never
change, so they are computed once, before the first step (and again on resume: deterministic, so equal).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seqlab.checkpoint import (
    has_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_trainer_file,
    save_checkpoint,
)
from seqlab.errors import ConfigError, CorruptFileError, InputError

#: ``trainer.safetensors``' "trainer" metadata of a DPO checkpoint names this kind
CHECKPOINT_KIND = "seqlab.posttrain.dpo"
#: DPOConfig fields a resumed run must share with the checkpoint: they decide every step's update
_RESUME_FIELDS = ("beta", "lr", "batch_size", "seed", "weight_decay", "grad_clip")


@dataclass(frozen=True)
class PreferencePair:
    """One preference: 1-D long token ids of the ``prompt`` (>= 1 token), the preferred response ``chosen`` and
    the other response ``rejected`` (>= 1 token each). Checked by ``train_dpo`` against the model's vocabulary."""

    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor


# ------------------------------------------------------------------------------------------------------
# scoring


@contextmanager
def _eval_modes(model: torch.nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode inside, each one's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_ids(ids, vocab: int, where: str) -> torch.Tensor:
    """``ids`` as a 1-D int64 tensor of >= 1 token inside [0, vocab); an InputError naming ``where`` otherwise."""
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"{where} must be a 1-D torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"{where} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise InputError(f"{where} must be 1-D (one sequence of token ids), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise InputError(f"{where} is empty: give at least one token")
    wide = ids.to(torch.int64)
    bad = (wide < 0) | (wide >= vocab)
    if bool(bad.any()):
        at = int(bad.nonzero()[0, 0])
        raise InputError(f"{where}[{at}] = {int(wide[at])} is outside the vocabulary [0, {vocab})")
    return wide


def _check_model(model, what: str) -> int:
    """The vocabulary size of a causal token model; a ConfigError naming ``what`` for anything else."""
    vocab = getattr(model, "vocab_size", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(vocab, int) or not hasattr(model, "fingerprint"):
        raise ConfigError(
            f"{what} must be a seqlab LanguageModel (token ids in, logits out), got {type(model).__name__}"
        )
    if getattr(getattr(model, "config", None), "bidirectional", False):
        raise ConfigError(f"{what} is bidirectional: DPO scores responses with a causal language model")
    return vocab


def sequence_logprobs(
    model, prompts: list[torch.Tensor], responses: list[torch.Tensor], *, batch_size: int = 16
) -> torch.Tensor:
    """(n,) float32: for each i, the sum over the tokens of ``responses[i]`` of log p(token | ``prompts[i]`` and
    the response tokens before it). The prompt's own tokens are not scored.

    Rows are sorted by length and scored ``batch_size`` at a time, right-padded and masked, with the model's
    modules in eval mode (restored after; see the module docstring for why: a row's score never depends on its
    batch neighbours, MoE models included). Differentiable with respect to the model's weights when autograd is
    enabled. The result is on the model's device. Bad ids raise ``InputError`` naming ``prompts[i]`` or
    ``responses[i]``."""
    vocab = _check_model(model, "model")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(prompts, (list, tuple)) or not isinstance(responses, (list, tuple)):
        raise InputError("prompts and responses must be lists of 1-D token id tensors")
    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts but {len(responses)} responses: give one response per prompt")
    if not prompts:
        raise InputError("no prompts: give at least one (prompt, response)")
    rows = [
        (_check_ids(p, vocab, f"prompts[{i}]"), _check_ids(r, vocab, f"responses[{i}]"))
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    device = next(model.parameters()).device
    # longest first, so each batch pads little (the order cannot change a row's score; the result is put back)
    order = sorted(range(len(rows)), key=lambda i: -(rows[i][0].numel() + rows[i][1].numel()))
    parts = []
    with _eval_modes(model):
        for start in range(0, len(order), batch_size):
            parts.append(_score_batch(model, [rows[i] for i in order[start : start + batch_size]], device))
    scores = torch.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long, device=device)
    inverse[torch.tensor(order, device=device)] = torch.arange(len(order), device=device)
    return scores[inverse]


def _score_batch(model, rows: list[tuple[torch.Tensor, torch.Tensor]], device) -> torch.Tensor:
    """The response log-probability sums of one batch of (prompt, response) rows, in the rows' order."""
    lengths = [p.numel() + r.numel() for p, r in rows]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # 0 pads: a valid id, and its positions are masked
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)  # over targets ids[:, 1:]
    for b, (p, r) in enumerate(rows):
        ids[b, : p.numel()] = p
        ids[b, p.numel() : lengths[b]] = r
        # target t + 1 is a response token when p.numel() <= t + 1 < length
        mask[b, p.numel() - 1 : lengths[b] - 1] = True
    ids, mask = ids.to(device), mask.to(device)
    # the logits of the last position predict nothing scored: dropped before the float32 log-softmax
    logits = model(ids[:, :-1], return_state=False).logits.float()
    targets = ids[:, 1:]
    token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, token, torch.zeros_like(token)).sum(dim=1)


# ------------------------------------------------------------------------------------------------------
# loss


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict]:
    """The DPO loss, ``mean(-log sigmoid(beta * ((pc - rc) - (pr - rr))))``, over (n,) sequence log-probs of the
    policy and the reference for the chosen and rejected responses (``sequence_logprobs``).

    Returns ``(loss, stats)``; ``stats`` holds floats: ``chosen_reward`` and ``rejected_reward`` (means of the
    implicit rewards ``beta * (pc - rc)`` and ``beta * (pr - rr)``), ``reward_margin`` (mean of their
    difference) and ``reward_accuracy`` (share of pairs whose chosen reward is strictly higher)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ConfigError(f"beta must be a finite number > 0, got {beta!r}")
    named = (
        ("policy_chosen", policy_chosen),
        ("policy_rejected", policy_rejected),
        ("reference_chosen", reference_chosen),
        ("reference_rejected", reference_rejected),
    )
    for name, value in named:
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() == 0:
            what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{name} must be a non-empty 1-D tensor of sequence log-probs, got {what}")
        if value.shape != policy_chosen.shape:
            raise InputError(f"{name} has shape {tuple(value.shape)}, policy_chosen {tuple(policy_chosen.shape)}")
    device = policy_chosen.device
    chosen = beta * (policy_chosen.float() - reference_chosen.to(device).float())
    rejected = beta * (policy_rejected.float() - reference_rejected.to(device).float())
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    stats = {
        "reward_accuracy": float((margin.detach() > 0).float().mean()),
        "reward_margin": float(margin.detach().mean()),
        "chosen_reward": float(chosen.detach().mean()),
        "rejected_reward": float(rejected.detach().mean()),
    }
    return loss, stats


# ------------------------------------------------------------------------------------------------------
# training


@dataclass
class DPOConfig:
    """Settings of ``train_dpo``. ``beta``: the DPO temperature (> 0; smaller lets the policy drift further from
    the reference). ``steps``: optimizer steps (None: ``epochs`` passes over the pairs, ceil(n / batch_size)
    steps each; a step's batch is the next ``batch_size`` pairs of the epoch's seeded shuffle, the last one of an
    epoch may be smaller). ``grad_clip``: max global gradient norm (None: no clipping). ``checkpoint_every``:
    write a checkpoint every k steps into ``train_dpo(out=...)`` (and after the last step); ``keep_checkpoints``:
    step folders kept (None: all)."""

    beta: float = 0.1
    lr: float = 1e-4
    steps: int | None = None
    epochs: int = 1
    batch_size: int = 8
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = 2

    def __post_init__(self) -> None:
        def number(name: str, positive: bool) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"DPOConfig.{name} must be a finite number, got {value!r}")
            if value < 0 or (positive and value == 0):
                raise ConfigError(f"DPOConfig.{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
            setattr(self, name, float(value))

        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                extra = " or None" if optional else ""
                raise ConfigError(f"DPOConfig.{name} must be an int >= {low}{extra}, got {value!r}")

        number("beta", True)
        number("lr", True)
        number("weight_decay", False)
        if self.grad_clip is not None:
            number("grad_clip", True)
        integer("steps", 1, optional=True)
        integer("epochs", 1)
        integer("batch_size", 1)
        integer("seed", 0)
        integer("checkpoint_every", 1, optional=True)
        integer("keep_checkpoints", 1, optional=True)

    def total_steps(self, num_pairs: int) -> int:
        """The run's optimizer steps for ``num_pairs`` pairs."""
        return self.steps if self.steps is not None else self.epochs * math.ceil(num_pairs / self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DPOReport:
    """What one ``train_dpo`` call did. ``steps``: the optimizer step the policy is at (the run's total; a resumed
    run counts the steps before the resume); ``start_step``: the step this call began at (0 unless resumed).
    Per step of this call: ``losses``, ``reward_accuracy``, ``reward_margin`` and the full ``records`` (step,
    loss, the ``dpo_loss`` stats, grad_norm, epoch, and ``pairs``: the indices of the step's pairs).
    ``seconds``: wall time of the call, scoring of the reference included."""

    steps: int
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    reward_accuracy: list[float] = field(default_factory=list)
    reward_margin: list[float] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _check_pairs(pairs, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise InputError("pairs is empty: give at least one PreferencePair")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PreferencePair):
            raise InputError(f"pairs[{i}] must be a PreferencePair, got {type(pair).__name__}")
        out.append(
            tuple(_check_ids(getattr(pair, f), vocab, f"pairs[{i}].{f}") for f in ("prompt", "chosen", "rejected"))
        )
    return out  # type: ignore[return-value]


def pairs_digest(pairs: Sequence[tuple[torch.Tensor, ...]]) -> str:
    """SHA-256 over the pairs' token ids in order (with each sequence's length), recorded in a DPO checkpoint."""
    h = hashlib.sha256()
    for triple in pairs:
        for ids in triple:
            h.update(np.int64(ids.numel()).tobytes())
            h.update(ids.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over a model's state_dict (names, dtypes, shapes and bytes): which reference a run scored against."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The shuffle of epoch ``epoch``: from its own generator, so it does not touch the global RNGs."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def train_dpo(
    policy,
    reference,
    pairs: list[PreferencePair],
    config: DPOConfig = DPOConfig(),  # noqa: B008 - a frozen-by-convention default, never mutated here
    *,
    out=None,
    resume: bool = False,
    progress: bool = False,
    callback: Callable[[int, dict], Any] | None = None,
) -> DPOReport:
    """Train ``policy`` in place with DPO on ``pairs`` against ``reference`` and return a ``DPOReport``.

    ``reference``: the frozen model the policy is held to, of the same architecture (same config fingerprint and
    vocabulary, else ``ConfigError`` naming both) and not sharing weights with the policy. It is only ever run
    under ``torch.no_grad()``, in eval mode, and its weights, gradients and modes are left as they were. Its
    log-probabilities are computed once, before the first step.

    ``out``: a folder for checkpoints (the Trainer's layout, ``seqlab.checkpoint``): one every
    ``config.checkpoint_every`` steps and one after the last step, each with the policy, the optimizer, the RNG
    states, the step, the epoch's data order, a digest of the pairs, of the reference's weights, and the config.
    ``resume=True`` continues from ``out``'s latest checkpoint (a fresh start when there is none) and gives the
    same weights as an uninterrupted run; it refuses other pairs, another reference, or another value of a
    setting that decides the updates (beta, lr, batch_size, seed, weight_decay, grad_clip; ``steps`` and
    ``epochs`` may grow). Without ``resume``, a folder that already holds a checkpoint is refused.

    ``progress``: a tqdm bar. ``callback(step, stats)``: after every step (and its checkpoint), with ``step``
    counted from 1 and ``stats`` the step's record. Bad pairs raise ``InputError`` naming the pair and field.
    """
    t0 = time.perf_counter()
    if not isinstance(config, DPOConfig):
        raise ConfigError(f"train_dpo needs a DPOConfig, got {type(config).__name__}")
    vocab = _check_model(policy, "policy")
    ref_vocab = _check_model(reference, "reference")
    if policy is reference:
        raise ConfigError("policy and reference are the same model: give the reference as a frozen copy")
    if policy.fingerprint != reference.fingerprint or vocab != ref_vocab:
        raise ConfigError(
            f"the reference is another architecture than the policy: policy fingerprint {policy.fingerprint} with "
            f"vocabulary {vocab}, reference fingerprint {reference.fingerprint} with vocabulary {ref_vocab}"
        )
    shared = {id(p) for p in policy.parameters()} & {id(p) for p in reference.parameters()}
    if shared:
        raise ConfigError("policy and reference share parameters: training would move the reference")
    if (resume or config.checkpoint_every) and out is None:
        raise ConfigError("train_dpo: resume and DPOConfig.checkpoint_every need a checkpoint folder (out=...)")
    rows = _check_pairs(pairs, vocab)
    digest = pairs_digest(rows)
    ref_digest = weights_digest(reference) if out is not None else None
    total = config.total_steps(len(rows))
    per_epoch = math.ceil(len(rows) / config.batch_size)

    from seqlab.train import _param_groups

    optimizer = torch.optim.AdamW(
        _param_groups(policy, config.weight_decay), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)  # constant: kept for the checkpoint
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    import random

    random.seed(config.seed)
    step, orders = 0, {}
    if out is not None and has_checkpoint(out):
        if not resume:
            raise ConfigError(
                f"{out} already holds a DPO checkpoint: pass resume=True to continue it, or another folder"
            )
        step, epoch, order = _check_resume(Path(out), config, digest, ref_digest, len(rows))
        load_checkpoint(out, model=policy, optimizer=optimizer, scheduler=scheduler)
        orders[epoch] = order

    with torch.no_grad():
        prompts = [r[0] for r in rows]
        ref_chosen = sequence_logprobs(reference, prompts, [r[1] for r in rows], batch_size=2 * config.batch_size)
        ref_rejected = sequence_logprobs(reference, prompts, [r[2] for r in rows], batch_size=2 * config.batch_size)

    from tqdm.auto import tqdm

    report = DPOReport(steps=step, start_step=step)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", desc="dpo")
    try:
        while step < total:
            epoch, index = divmod(step, per_epoch)
            if epoch not in orders:
                orders = {epoch: _epoch_order(config.seed, epoch, len(rows))}
            batch = orders[epoch][index * config.batch_size : (index + 1) * config.batch_size]
            prompts = [rows[i][0] for i in batch]
            scores = sequence_logprobs(
                policy,
                prompts + prompts,
                [rows[i][1] for i in batch] + [rows[i][2] for i in batch],
                batch_size=2 * len(batch),
            )
            picked = torch.tensor(batch)
            loss, stats = dpo_loss(
                scores[: len(batch)], scores[len(batch) :], ref_chosen[picked], ref_rejected[picked], config.beta
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            scheduler.step()
            step += 1
            record = {
                "step": step,
                "loss": float(loss.detach()),
                **stats,
                "grad_norm": grad_norm,
                "epoch": epoch,
                "pairs": list(batch),
            }
            if out is not None and (step == total or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                _save(Path(out), step, policy, optimizer, scheduler, config, digest, ref_digest, orders[epoch], epoch)
            report.steps = step
            report.losses.append(record["loss"])
            report.reward_accuracy.append(stats["reward_accuracy"])
            report.reward_margin.append(stats["reward_margin"])
            report.records.append(record)
            bar.set_postfix({"loss": f"{record['loss']:.4f}", "acc": f"{stats['reward_accuracy']:.2f}"}, refresh=False)
            bar.update(1)
            if callback is not None:
                callback(step, record)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _save(out: Path, step, policy, optimizer, scheduler, config, digest, ref_digest, order, epoch) -> None:
    meta = {
        "kind": CHECKPOINT_KIND,
        "step": step,
        "epoch": epoch,
        "order": list(order),
        "pairs_sha256": digest,
        "reference_sha256": ref_digest,
        "config": config.to_dict(),
    }
    save_checkpoint(out, step=step, model=policy, optimizer=optimizer, scheduler=scheduler, trainer_meta=meta)
    try:
        prune_checkpoints(out, config.keep_checkpoints)  # never the one just written (latest)
    except OSError as exc:  # the new checkpoint is safe; an old folder that cannot go stays
        import warnings

        warnings.warn(f"could not remove old checkpoints in {out}: {exc}", RuntimeWarning, stacklevel=3)


def _check_resume(out: Path, config: DPOConfig, digest: str, ref_digest, n: int) -> tuple[int, int, list[int]]:
    """The (step, epoch, data order) of ``out``'s latest checkpoint, after checking it belongs to this run;
    nothing is changed before every check passed."""
    trainer_file = latest_checkpoint(out) / "trainer.safetensors"
    meta = read_trainer_file(trainer_file)[1].get("trainer")
    if not isinstance(meta, dict) or meta.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(f"{trainer_file}: not a DPO checkpoint (a checkpoint of another kind of run)")
    if meta.get("pairs_sha256") != digest:
        raise ConfigError(
            f"the checkpoint in {out} was trained on other preference pairs (digest {meta.get('pairs_sha256')}, "
            f"these pairs {digest}): resume with the run's pairs, in the same order"
        )
    if meta.get("reference_sha256") != ref_digest:
        raise ConfigError(f"the checkpoint in {out} was trained against another reference model (other weights)")
    stored = meta.get("config")
    if not isinstance(stored, dict):
        raise CorruptFileError(f"{trainer_file}: DPO metadata has no config")
    for name in _RESUME_FIELDS:
        have = getattr(config, name)
        if stored.get(name) != have:
            raise ConfigError(
                f"DPOConfig.{name} is {have!r}, the checkpoint in {out} was made with {stored.get(name)!r}: "
                "resume with the run's settings"
            )
    step, epoch, order = meta.get("step"), meta.get("epoch"), meta.get("order")
    for name, value in (("step", step), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CorruptFileError(f"{trainer_file}: DPO {name} must be an int >= 0, got {value!r}")
    if not isinstance(order, list) or sorted(order) != list(range(n)):
        raise CorruptFileError(f"{trainer_file}: the stored data order is not a permutation of the {n} pairs")
    assert isinstance(step, int) and isinstance(epoch, int)
    if step > config.total_steps(n):
        raise ConfigError(
            f"the checkpoint in {out} is at step {step}, past this run's {config.total_steps(n)} steps: "
            "raise DPOConfig.steps or epochs"
        )
    # the order of the epoch of the checkpoint's last step (the step after it may open the next epoch, whose
    # order train_dpo draws from the seed as an uninterrupted run does)
    return step, epoch, [int(i) for i in order]


__all__ = [
    "DPOConfig",
    "DPOReport",
    "PreferencePair",
    "dpo_loss",
    "pairs_digest",
    "sequence_logprobs",
    "train_dpo",
    "weights_digest",
]
