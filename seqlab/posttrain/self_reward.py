"""Self-rewarding fine-tuning (issue 21; Yuan et al. 2024, "Self-Rewarding Language Models"): the model writes
candidates, judges them itself, and iterative DPO on its own preferences gives the next model.

Iteration t (t = 1..T), with the current model M_{t-1} (M_0 = the model given):

1. **Candidates.** M_{t-1} samples ``candidates`` continuations of every prompt (temperature ``temperature``),
   each stopping after its first newline (byte 10) or ``max_new_tokens``; candidate j of prompt i is drawn
   with seed ``base + i * candidates + j`` (``seqlab.generate``'s per-row seeds), ``base`` set by ``seed`` and t.
2. **Judging.** For every candidate, ``judge_samples`` sampled generations (temperature ``judge_temperature``)
   of ``judge_prompt(prompt, candidate)``; ``parse_score`` reads a number from each text or returns None. The
   candidate's score is the mean of its parsed scores, pooled over every copy of the same text sampled for the
   same prompt (one text, one score); unparseable judgements are counted and left out; a candidate with no
   parsed judgement has no score (and is never in a pair).
3. **Pairs.** Per prompt, among the scored candidates: chosen = the highest score, rejected = the lowest (the
   first candidate in generation order on ties), kept when the scores differ and the two texts differ.
   ``shuffle_pairs=True`` is the control: the same pairs, each with chosen and rejected exchanged on a fair
   coin (``random.Random`` seeded by ``seed`` and t; ``swapped`` in pairs.jsonl), so the preference signal is
   noise while the data seen by DPO is otherwise identical.
4. **DPO.** ``seqlab.posttrain.dpo.train_dpo`` trains the policy on the pairs with a frozen copy of M_{t-1} as
   the reference; the result is M_t (with no pair, M_t = M_{t-1}; the record says so).

The loop sees prompts as bytes and the judge as two functions (``judge_prompt``, ``parse_score``); it never
receives a task instance, so a task's program checker cannot be used to train. ``measure(model) -> dict``
(optional) is called on M_0 .. M_T only to record measurements (an experiment passes the checker there).

Files under ``out``: ``iteration-<t>/candidates.jsonl`` (one line per candidate: prompt, candidate, judge texts,
parsed scores, mean score), ``iteration-<t>/pairs.jsonl`` (one line per pair), ``iteration-<t>/model.safetensors``
(M_t, ``seqlab.checkpoint.save_model``), ``iteration-<t>/iteration.json`` (the iteration's record, written last:
its presence marks the iteration finished, and ``resume=True`` continues after the last finished one), and
``report.json``. Bytes are written as JSON strings decoded as latin-1 (each byte one character, so
``text.encode("latin-1")`` gives the exact bytes back).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from seqlab.checkpoint import load_model, save_model
from seqlab.errors import ConfigError, InputError
from seqlab.io import atomic_write_bytes
from seqlab.posttrain.dpo import DPOConfig, PreferencePair, train_dpo
from seqlab.posttrain.tasks import STOP
from seqlab.posttrain.tasks import judge_prompt as default_judge_prompt
from seqlab.posttrain.tasks import parse_score as default_parse_score


def _text(data: bytes) -> str:
    return data.decode("latin-1")


@dataclass
class IterationRecord:
    """What iteration ``iteration`` did: counts, the mean judged score, the DPO summary, the measure of M_t."""

    iteration: int
    prompts: int
    candidates: int
    judgements: int
    unparseable: int
    unscored: int  # candidates with no parsed judgement
    pairs: int
    ties: int  # prompts whose scored candidates all had the same score
    identical: int  # prompts whose best and worst candidates differed in score but not in text
    mean_score: float | None
    swapped: int  # pairs whose roles the control exchanged (0 unless shuffle_pairs)
    dpo: dict | None  # None when there was no pair (M_t = M_{t-1})
    measure: dict | None
    seconds: float


@dataclass
class SelfRewardReport:
    """``measures[t]``: ``measure(M_t)`` for t = 0..T (empty dicts without a measure); ``iterations``: one record
    per iteration; ``model``: M_T (a copy: the model given is left as it was)."""

    settings: dict
    measures: list[dict] = field(default_factory=list)
    iterations: list[IterationRecord] = field(default_factory=list)
    model: Any = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "measures": self.measures,
            "iterations": [asdict(r) for r in self.iterations],
            "seconds": self.seconds,
        }


def _sample(model, prompts: list[bytes], max_new_tokens: int, temperature: float, seed: int) -> list[bytes]:
    from seqlab.generate import generate

    if not prompts:
        return []
    ids = [torch.tensor(list(p), dtype=torch.long) for p in prompts]
    out = generate(model, ids, max_new_tokens, do_sample=True, temperature=temperature, seed=seed, stop=[STOP])
    return [bytes(t) for t in out.tokens]


def _check_prompts(prompts) -> list[bytes]:
    if isinstance(prompts, (bytes, str)) or not isinstance(prompts, Sequence):
        raise InputError("prompts must be a list of byte strings")
    if not prompts:
        raise InputError("prompts is empty: self_reward needs at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, (bytes, bytearray)):
            raise InputError(
                f"prompts[{i}] is a {type(p).__name__}: give the prompt bytes only (the loop never sees a task "
                "instance or its checker)"
            )
        if not p:
            raise InputError(f"prompts[{i}] is empty")
        out.append(bytes(p))
    return out


def _positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return str(value)


def _dpo_summary(report) -> dict:
    fields = ("steps", "start_step", "losses", "reward_accuracy", "reward_margin", "seconds")
    out = {k: getattr(report, k) for k in fields if hasattr(report, k)}
    for key in ("losses", "reward_accuracy", "reward_margin"):
        values = out.get(key) or []
        if values:
            out[f"{key}_first"], out[f"{key}_last"] = values[0], values[-1]
    return _jsonable(out)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def self_reward(
    model,
    prompts: Sequence[bytes],
    *,
    iterations: int = 3,
    candidates: int = 4,
    judge_samples: int = 3,
    temperature: float = 1.0,
    judge_temperature: float = 1.0,
    max_new_tokens: int = 16,
    judge_max_new_tokens: int = 4,
    dpo: DPOConfig | None = None,
    judge_prompt: Callable[[bytes, bytes], bytes] = default_judge_prompt,
    parse_score: Callable[[bytes], int | float | None] = default_parse_score,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    shuffle_pairs: bool = False,
    measure: Callable[[Any], dict] | None = None,
    resume: bool = False,
    progress: bool = False,
) -> SelfRewardReport:
    """Run ``iterations`` rounds of self-rewarding on a copy of ``model`` (see the module docstring) and return
    the report; with ``out``, every candidate, judgement, score and pair is written there."""
    started = time.perf_counter()
    prompts = _check_prompts(prompts)
    iterations = _positive_int("iterations", iterations, 0)
    candidates = _positive_int("candidates", candidates, 2)
    judge_samples = _positive_int("judge_samples", judge_samples)
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    judge_max_new_tokens = _positive_int("judge_max_new_tokens", judge_max_new_tokens)
    for name, value in (("temperature", temperature), ("judge_temperature", judge_temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConfigError(f"{name} must be a number > 0 (the loop samples), got {value!r}")
    dpo = DPOConfig() if dpo is None else dpo
    if not isinstance(dpo, DPOConfig):
        raise ConfigError(f"dpo must be a DPOConfig, got {type(dpo).__name__}")
    if resume and out is None:
        raise ConfigError("resume=True needs out=<the run's folder>")
    settings = {
        "prompts": len(prompts),
        "iterations": iterations,
        "candidates": candidates,
        "judge_samples": judge_samples,
        "temperature": temperature,
        "judge_temperature": judge_temperature,
        "max_new_tokens": max_new_tokens,
        "judge_max_new_tokens": judge_max_new_tokens,
        "dpo": _jsonable(asdict(dpo)),
        "seed": seed,
        "shuffle_pairs": shuffle_pairs,
    }
    folder = None if out is None else Path(out)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    policy = copy.deepcopy(model)
    policy.eval()
    report = SelfRewardReport(settings)
    report.measures.append(_jsonable(measure(policy)) if measure is not None else {})
    for t in range(1, iterations + 1):
        done = None if folder is None else folder / f"iteration-{t}" / "iteration.json"
        if resume and done is not None and done.is_file():
            record = json.loads(done.read_text())
            load_model(done.parent / "model.safetensors", policy)
            policy.eval()
            report.iterations.append(IterationRecord(**record))
            report.measures.append(record["measure"] or {})
            continue
        record = _iteration(
            policy, prompts, t, candidates, judge_samples, temperature, judge_temperature, max_new_tokens,
            judge_max_new_tokens, dpo, judge_prompt, parse_score, folder, seed, shuffle_pairs, measure, progress,
        )  # fmt: skip
        report.iterations.append(record)
        report.measures.append(record.measure or {})
        if progress:
            print(
                f"self_reward iteration {t}: {record.pairs} pairs, {record.unparseable}/{record.judgements} "
                f"unparseable, measure {record.measure}",
                flush=True,
            )
    report.model = policy
    report.seconds = time.perf_counter() - started
    if folder is not None:
        atomic_write_bytes(folder / "report.json", json.dumps(report.to_dict(), indent=1).encode())
    return report


def _iteration(
    policy, prompts, t, candidates, judge_samples, temperature, judge_temperature, max_new_tokens,
    judge_max_new_tokens, dpo, judge_prompt, parse_score, folder, seed, shuffle_pairs, measure, progress,
) -> IterationRecord:  # fmt: skip
    """One iteration on ``policy`` in place (M_{t-1} -> M_t)."""
    t0 = time.perf_counter()
    base = (seed * 1_000 + t) * 10_000_000  # distinct per (seed, iteration); rows add their index
    policy.eval()
    rows = [p for p in prompts for _ in range(candidates)]
    texts = _sample(policy, rows, max_new_tokens, temperature, base)
    judge_rows = [judge_prompt(p, c) for p, c in zip(rows, texts) for _ in range(judge_samples)]
    judged = _sample(policy, judge_rows, judge_max_new_tokens, judge_temperature, base + 5_000_000)
    lines, scores = [], []
    unparseable = 0
    for k, (prompt, candidate) in enumerate(zip(rows, texts)):
        verdicts = judged[k * judge_samples : (k + 1) * judge_samples]
        parsed = [parse_score(v) for v in verdicts]
        good = [float(s) for s in parsed if s is not None]
        unparseable += len(parsed) - len(good)
        score = sum(good) / len(good) if good else None
        scores.append(score)
        lines.append(
            {
                "iteration": t,
                "prompt_index": k // candidates,
                "candidate_index": k % candidates,
                "prompt": _text(prompt),
                "candidate": _text(candidate),
                "judge_texts": [_text(v) for v in verdicts],
                "scores": parsed,
                "score": score,
            }
        )
    # one text, one score: copies of the same candidate text for a prompt pool their parsed judgements (a text
    # sampled twice is judged twice as often, not scored twice independently), so a pair never holds one text
    pooled: dict[tuple[int, bytes], list[float]] = {}
    for k, line in enumerate(lines):
        good = [float(v) for v in line["scores"] if v is not None]
        pooled.setdefault((k // candidates, texts[k]), []).extend(good)
    for k, line in enumerate(lines):
        votes = pooled[(k // candidates, texts[k])]
        scores[k] = sum(votes) / len(votes) if votes else None
        line["score"] = scores[k]
    unscored = sum(score is None for score in scores)
    coin = random.Random(f"seqlab.posttrain.self_reward.shuffle:{seed}:{t}")
    pairs, pair_lines = [], []
    ties = identical = swapped = 0
    for i, prompt in enumerate(prompts):
        scored = [(scores[i * candidates + j], j) for j in range(candidates) if scores[i * candidates + j] is not None]
        if not scored:
            continue
        best = max(scored, key=lambda s: (s[0], -s[1]))  # the first candidate among equal scores
        worst = min(scored, key=lambda s: (s[0], s[1]))
        if best[0] == worst[0]:
            ties += 1
            continue
        chosen, rejected = texts[i * candidates + best[1]], texts[i * candidates + worst[1]]
        if chosen == rejected:
            identical += 1
            continue
        chosen_score, rejected_score = best[0], worst[0]
        swap = shuffle_pairs and coin.random() < 0.5
        if swap:
            chosen, rejected = rejected, chosen
            chosen_score, rejected_score = rejected_score, chosen_score
            swapped += 1
        pairs.append(
            PreferencePair(
                torch.tensor(list(prompt), dtype=torch.long),
                torch.tensor(list(chosen), dtype=torch.long),
                torch.tensor(list(rejected), dtype=torch.long),
            )
        )
        pair_lines.append(
            {
                "iteration": t,
                "prompt_index": i,
                "prompt": _text(prompt),
                "chosen": _text(chosen),
                "rejected": _text(rejected),
                "chosen_score": chosen_score,
                "rejected_score": rejected_score,
                "swapped": swap,
            }
        )
    here = None if folder is None else folder / f"iteration-{t}"
    if here is not None:
        here.mkdir(parents=True, exist_ok=True)
        _write_jsonl(here / "candidates.jsonl", lines)
        _write_jsonl(here / "pairs.jsonl", pair_lines)
    summary = None
    if pairs:
        reference = copy.deepcopy(policy).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        policy.train()
        result = train_dpo(policy, reference, pairs, replace(dpo, seed=dpo.seed + t), progress=progress)
        summary = _dpo_summary(result)
        del reference
    policy.eval()
    if here is not None:
        save_model(here / "model.safetensors", policy, {"self_reward": {"iteration": t, "seed": seed}})
    valid = [s for s in scores if s is not None]
    record = IterationRecord(
        iteration=t,
        prompts=len(prompts),
        candidates=len(rows),
        judgements=len(judged),
        unparseable=unparseable,
        unscored=unscored,
        pairs=len(pairs),
        ties=ties,
        identical=identical,
        mean_score=sum(valid) / len(valid) if valid else None,
        swapped=swapped,
        dpo=summary,
        measure=_jsonable(measure(policy)) if measure is not None else None,
        seconds=time.perf_counter() - t0,
    )
    if here is not None:
        atomic_write_bytes(here / "iteration.json", json.dumps(asdict(record)).encode())
    return record


__all__ = ["IterationRecord", "SelfRewardReport", "self_reward"]
