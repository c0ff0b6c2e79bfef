"""A program-checkable instruction task on byte strings, for self-rewarding fine-tuning (issue 21).

A byte model (``LanguageModel`` with vocab 256, token id == byte value) reads a prompt and writes an answer that
ends with a newline (the stop token of every generation here). Four kinds of instruction, one fixed format::

    reverse abc=    ->  cba\\n       the letters in reverse order
    sort dcab=      ->  abcd\\n      the letters in alphabetical order
    vowels hello=   ->  2\\n         how many of a, e, i, o, u
    add 12+7=       ->  19\\n        the sum of two numbers 0..49

``TaskInstance.check(answer)`` is the program checker: the answer, with one trailing newline removed, must equal
the expected bytes exactly.

The judge format (the model scores an answer with the same weights that wrote it)::

    judge reverse abc=cba score=   ->  5\\n

Rubric (fixed, binary on a 0..5 scale): **5** when the answer is exactly the expected answer, **0** otherwise
(anything else: a wrong letter, order, count or digit, a missing or extra character, an empty answer).
``parse_score`` reads the first integer after optional spaces at the start of the judge's text with a regular
expression and accepts 0..5 (so a judge may also say 1..4; those are parsed, averaged like the others, and
count as "correct" when above 2.5); anything else is unparseable (None).

Seed data for M0 (``seed_corpus``): instruction -> correct answer documents, and judge documents for correct
answers (score 5) and realistic corruptions (score 0: off-by-one counts, a partially reversed string, an adjacent
swap, a dropped or doubled letter, a wrong digit), every label computed by the checker. Splits (``make_splits``)
are disjoint by construction: one seeded stream of distinct prompts is cut into seed/train, self-reward prompts
and a held-out test set.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqlab.errors import ConfigError, InputError
from seqlab.ffn import router_losses

KINDS = ("reverse", "sort", "vowels", "add")
STOP = 10  # b"\n": every answer and every judge score ends with it
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWELS = frozenset(b"aeiou")
MAX_ADD = 49
CORRECT_SCORE = 5
WRONG_SCORE = 0
SCORE_RE = re.compile(rb"^ *([0-9]+)(?![0-9])")


@dataclass(frozen=True)
class TaskInstance:
    """One instruction: ``kind`` and its ``text`` (letters, or ``"a+b"`` for add); ``prompt`` and ``answer`` are
    the bytes a model reads and should write (the answer ends with ``b"\\n"``)."""

    kind: str
    text: bytes

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"TaskInstance.kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.text, bytes) or not self.text:
            raise InputError(f"TaskInstance.text must be non-empty bytes, got {self.text!r}")

    @property
    def prompt(self) -> bytes:
        return self.kind.encode() + b" " + self.text + b"="

    @property
    def expected(self) -> bytes:
        """The correct answer without its newline, computed by the program."""
        if self.kind == "reverse":
            return self.text[::-1]
        if self.kind == "sort":
            return bytes(sorted(self.text))
        if self.kind == "vowels":
            return str(sum(b in VOWELS for b in self.text)).encode()
        a, b = self.text.split(b"+")
        return str(int(a) + int(b)).encode()

    @property
    def answer(self) -> bytes:
        return self.expected + b"\n"

    def check(self, answer: bytes) -> bool:
        """Whether ``answer`` (one trailing newline optional) is exactly the correct answer."""
        if not isinstance(answer, (bytes, bytearray)):
            raise InputError(f"check takes the answer as bytes, got {type(answer).__name__}")
        answer = bytes(answer)
        if answer.endswith(b"\n"):
            answer = answer[:-1]
        return answer == self.expected


@dataclass(frozen=True)
class JudgeExample:
    """An answer to an instance and the rubric's score for it (from the checker)."""

    instance: TaskInstance
    answer: bytes  # without the trailing newline
    score: int

    @property
    def prompt(self) -> bytes:
        return judge_prompt(self.instance.prompt, self.answer)

    @property
    def target(self) -> bytes:
        return str(self.score).encode() + b"\n"


def judge_prompt(prompt: bytes, candidate: bytes) -> bytes:
    """The rubric prompt for ``candidate`` (one trailing newline is dropped): ``judge <prompt><answer> score=``."""
    if candidate.endswith(b"\n"):
        candidate = candidate[:-1]
    return b"judge " + prompt + candidate + b" score="


def parse_score(text: bytes | str) -> int | None:
    """The score 0..5 at the start of a judge's text (leading spaces allowed), or None when there is none."""
    if isinstance(text, str):
        text = text.encode("latin-1", "replace")
    match = SCORE_RE.match(bytes(text))
    if match is None:
        return None
    value = int(match.group(1))
    return value if 0 <= value <= CORRECT_SCORE else None


def rubric_score(instance: TaskInstance, answer: bytes) -> int:
    """The rubric's score of ``answer``: 5 when the checker accepts it, else 0."""
    return CORRECT_SCORE if instance.check(answer) else WRONG_SCORE


# ------------------------------------------------------------------------------------------------------
# instances and splits


def _check_lengths(min_len: int, max_len: int) -> None:
    for name, value in (("min_len", min_len), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
            raise ConfigError(f"{name} must be an int in [1, 64], got {value!r}")
    if min_len > max_len:
        raise ConfigError(f"min_len ({min_len}) must be <= max_len ({max_len})")


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ConfigError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    return kinds


def _draw(rng: random.Random, kind: str, min_len: int, max_len: int) -> TaskInstance:
    if kind == "add":
        return TaskInstance(kind, f"{rng.randint(0, MAX_ADD)}+{rng.randint(0, MAX_ADD)}".encode())
    length = rng.randint(min_len, max_len)
    return TaskInstance(kind, "".join(rng.choice(LETTERS) for _ in range(length)).encode())


def _distinct(n: int, kinds: tuple[str, ...], seed: int, min_len: int, max_len: int) -> list[TaskInstance]:
    """``n`` instances with distinct prompts, kinds in turn, from one stream seeded ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(f"seqlab.posttrain.tasks:{seed}")
    out: list[TaskInstance] = []
    seen: set[bytes] = set()
    misses = 0
    while len(out) < n:
        instance = _draw(rng, kinds[len(out) % len(kinds)], min_len, max_len)
        if instance.prompt in seen:
            misses += 1
            if misses > 100 * n + 1000:
                raise ConfigError(
                    f"cannot draw {n} distinct prompts of kinds {kinds} with lengths {min_len}..{max_len}"
                )
            continue
        seen.add(instance.prompt)
        out.append(instance)
    return out


def make_instances(
    n: int, *, kinds: Sequence[str] = KINDS, seed: int = 0, min_len: int = 3, max_len: int = 6
) -> list[TaskInstance]:
    """``n`` instances with distinct prompts, the kinds in turn, lowercase letter strings of ``min_len`` to
    ``max_len`` letters (add: two numbers 0..49). The same arguments give the same list."""
    _check_lengths(min_len, max_len)
    return _distinct(n, _check_kinds(kinds), seed, min_len, max_len)


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint instance sets: ``train`` (M0's seed data), ``prompts`` (the self-reward prompts), ``test``."""

    train: list[TaskInstance]
    prompts: list[TaskInstance]
    test: list[TaskInstance]


def make_splits(
    n_train: int,
    n_prompts: int,
    n_test: int,
    *,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    min_len: int = 3,
    max_len: int = 6,
) -> TaskSplits:
    """One stream of distinct prompts cut into three consecutive slices, so no prompt is in two splits."""
    every = make_instances(n_train + n_prompts + n_test, kinds=kinds, seed=seed, min_len=min_len, max_len=max_len)
    return TaskSplits(every[:n_train], every[n_train : n_train + n_prompts], every[n_train + n_prompts :])


# ------------------------------------------------------------------------------------------------------
# corruptions and judge examples


def _digit_change(text: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(text))
    digits = [d for d in b"0123456789" if d != text[i] and not (i == 0 and d == ord("0") and len(text) > 1)]
    return text[:i] + bytes([rng.choice(digits)]) + text[i + 1 :]


def corrupt(instance: TaskInstance, rng: random.Random) -> bytes:
    """A realistic wrong answer (no newline) for ``instance``; the checker always rejects it."""
    good = instance.expected
    for _ in range(50):
        if instance.kind in ("vowels", "add"):
            how = rng.choice(("plus1", "minus1", "digit") + (("ten",) if instance.kind == "add" else ()))
            value = int(good)
            if how == "plus1":
                bad = str(value + 1).encode()
            elif how == "minus1":
                bad = str(max(value - 1, 0) if value else 1).encode()
            elif how == "ten":
                bad = str(value + 10 if value < 10 or rng.random() < 0.5 else value - 10).encode()
            else:
                bad = _digit_change(good, rng)
        else:
            how = rng.choice(("swap", "drop", "double", "partial" if instance.kind == "reverse" else "unsorted"))
            if how == "swap" and len(good) > 1:
                i = rng.randrange(len(good) - 1)
                bad = good[:i] + good[i + 1 : i + 2] + good[i : i + 1] + good[i + 2 :]
            elif how == "drop" and len(good) > 1:
                i = rng.randrange(len(good))
                bad = good[:i] + good[i + 1 :]
            elif how == "double":
                i = rng.randrange(len(good))
                bad = good[: i + 1] + good[i:]
            elif how == "partial":  # only a prefix of the text reversed, or the text as it was
                k = rng.randint(0, len(good) - 1)
                bad = instance.text[:k][::-1] + instance.text[k:]
            else:  # the letters as given
                bad = instance.text
        if not instance.check(bad):
            return bad
    return good + good[:1]  # always wrong: one letter or digit too many


def judge_examples(instances: Sequence[TaskInstance], *, seed: int = 0, wrong_per_right: int = 1) -> list[JudgeExample]:
    """For each instance, its correct answer (score 5) and ``wrong_per_right`` corruptions (score 0), labelled
    by the checker."""
    rng = random.Random(f"seqlab.posttrain.tasks.judge:{seed}")
    out = []
    for instance in instances:
        answers = [instance.expected] + [corrupt(instance, rng) for _ in range(wrong_per_right)]
        out += [JudgeExample(instance, a, rubric_score(instance, a)) for a in answers]
    return out


def seed_corpus(
    instances: Sequence[TaskInstance], judges: Sequence[JudgeExample], *, seed: int = 0
) -> list[tuple[bytes, bytes]]:
    """M0's training documents as (prompt, target) pairs, shuffled: every instruction with its answer and every
    judge example with its score. ``sft`` trains on them; ``b"".join(p + t for p, t in docs)`` is the same
    data as one byte stream for the Trainer."""
    docs = [(i.prompt, i.answer) for i in instances] + [(j.prompt, j.target) for j in judges]
    random.Random(f"seqlab.posttrain.tasks.corpus:{seed}").shuffle(docs)
    return docs


# ------------------------------------------------------------------------------------------------------
# training M0


def _ids(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.long)


def sft(
    model,
    docs: Sequence[tuple[bytes, bytes]],
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    prompt_weight: float = 0.1,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup: int = 20,
    callback=None,
) -> list[float]:
    """Supervised fine-tuning of a byte ``LanguageModel`` on (prompt, target) documents, in place: next-byte
    cross-entropy on the target bytes, plus ``prompt_weight`` times that on the prompt bytes (the prompts are
    random strings; a little weight teaches the format without spending the model on them). Rows are padded on
    the right (a causal model never sees the padding from earlier positions; padded positions have no loss).
    AdamW with linear warmup and cosine decay. An MoE model's router losses (``seqlab.ffn.router_losses``: the
    weighted load-balancing and z-losses) are added to the loss each step, as the ``Trainer`` adds them. Returns
    the loss per step (the cross-entropy alone, nats per target byte)."""
    if not docs:
        raise InputError("sft needs at least one (prompt, target) document")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    device = next(model.parameters()).device
    rng = random.Random(f"seqlab.posttrain.tasks.sft:{seed}")
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(steps):
        batch = []
        for _ in range(min(batch_size, len(docs))):
            if not order:
                order = list(range(len(docs)))
                rng.shuffle(order)
            batch.append(docs[order.pop()])
        length = max(len(p) + len(t) for p, t in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        weights = torch.zeros(len(batch), length - 1)
        for r, (p, t) in enumerate(batch):
            ids[r, : len(p) + len(t)] = _ids(p + t)
            weights[r, : len(p) - 1] = prompt_weight  # position j predicts byte j + 1
            weights[r, len(p) - 1 : len(p) + len(t) - 1] = 1.0
        ids, weights = ids.to(device), weights.to(device)
        logits = model(ids[:, :-1], None, return_state=False).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        target_mask = (weights == 1.0).float()
        loss = (nll * weights.reshape(-1)).sum() / target_mask.sum()
        router = router_losses(model)  # MoE layers: auxiliary losses (None for dense models); clears last_stats
        if router is not None:
            loss = loss + router.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            losses.append(float((nll * target_mask.reshape(-1)).sum() / target_mask.sum()))
        if callback is not None:
            callback(step, losses[-1])
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------------------
# measurement (the checker's side)


def complete(
    model,
    prompts: Sequence[bytes],
    *,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[bytes]:
    """Generated continuations of byte prompts (each stops after its first newline, which it keeps)."""
    from seqlab.generate import generate

    if not prompts:
        return []
    was_training = model.training
    model.eval()
    ids = [_ids(p) for p in prompts]
    try:
        if do_sample:
            out = generate(model, ids, max_new_tokens, do_sample=True, temperature=temperature, seed=seed, stop=[STOP])
        else:
            out = generate(model, ids, max_new_tokens, stop=[STOP])
    finally:
        model.train(was_training)
    return [bytes(t) for t in out.tokens]


def _answer_budget(instances: Sequence[TaskInstance]) -> int:
    return max(len(i.answer) for i in instances) + 2


def evaluate_task(model, instances: Sequence[TaskInstance], *, max_new_tokens: int | None = None) -> dict:
    """Greedy answers checked by the program: ``accuracy`` overall, ``accuracy_<kind>`` per kind, ``n``."""
    if not instances:
        raise InputError("evaluate_task needs at least one instance")
    budget = max_new_tokens or _answer_budget(instances)
    answers = complete(model, [i.prompt for i in instances], max_new_tokens=budget)
    right = [i.check(a) for i, a in zip(instances, answers)]
    out: dict = {"accuracy": sum(right) / len(right), "n": len(right)}
    for kind in KINDS:
        mine = [r for i, r in zip(instances, right) if i.kind == kind]
        if mine:
            out[f"accuracy_{kind}"] = sum(mine) / len(mine)
    return out


def judge_agreement(model, examples: Sequence[JudgeExample], *, samples: int = 0, seed: int = 0) -> dict:
    """How often the model's judge score agrees with the checker's: a parsed score agrees when (score > 2.5) is
    (the checker accepts the answer). Greedy judging when ``samples`` is 0, else that many sampled judgements
    per example (temperature 1). Returns ``agreement`` (agreeing / parsed), ``agreement_all`` (agreeing / all
    judgements, an unparseable one counting as a disagreement), ``unparseable`` (count), ``n`` (judgements)."""
    if not examples:
        raise InputError("judge_agreement needs at least one judge example")
    prompts = [e.prompt for e in examples]
    if samples:
        texts = complete(
            model, [p for p in prompts for _ in range(samples)], max_new_tokens=4, do_sample=True, seed=seed
        )
        truth = [e.score for e in examples for _ in range(samples)]
    else:
        texts = complete(model, prompts, max_new_tokens=4)
        truth = [e.score for e in examples]
    scores = [parse_score(t) for t in texts]
    parsed = [(s, want) for s, want in zip(scores, truth) if s is not None]
    agree = sum((s > CORRECT_SCORE / 2) == (want > CORRECT_SCORE / 2) for s, want in parsed)
    return {
        "agreement": agree / len(parsed) if parsed else 0.0,
        "agreement_all": agree / len(scores),
        "unparseable": len(scores) - len(parsed),
        "n": len(scores),
    }


__all__ = [
    "CORRECT_SCORE",
    "KINDS",
    "STOP",
    "WRONG_SCORE",
    "JudgeExample",
    "TaskInstance",
    "TaskSplits",
    "complete",
    "corrupt",
    "evaluate_task",
    "judge_agreement",
    "judge_examples",
    "judge_prompt",
    "make_instances",
    "make_splits",
    "parse_score",
    "rubric_score",
    "seed_corpus",
    "sft",
]
