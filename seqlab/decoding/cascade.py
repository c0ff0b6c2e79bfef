"""Cascade Speculative Drafting (Chen et al. 2023): drafters of decreasing cost, each drafting for the one above.

- Vertical cascade, ``SpeculativeDrafter(model, lower, k)``: a draft model that is itself decoded speculatively,
  drafted by ``lower`` and verified with the exact rule. Its output follows the model's own law exactly, so the
  law it reports upward (q) is the model's distribution at each position; the level above stays exact. The
  bottom of a cascade is a statistical drafter with no neural cost (``MaxGramDrafter``).
- Horizontal cascade, ``HorizontalCascade([(drafter, n), ...])``: the first n positions of a draft come from the
  first drafter, the next from the second, and so on (later positions are less likely to be kept, so they are
  given to cheaper drafters); the last drafter fills whatever is left.
- ``cascade(models, allocation)``: both, from an allocation matrix: ``allocation[i][j]`` is how many of the
  tokens drafted for level i (0 = the target, i = models[i-1]) come from drafter j of the levels below it
  (models[i], models[i+1], ..., then Max-Gram).

Every level accepts exactly unless ``lossy_leniency`` is set. The paper's leniency l > 1 (its code applies it to
the inner levels only, never to the target's check): an inner level also keeps a draft token x whenever its
model gives x probability above q(x) / l. The target still verifies exactly, so GREEDY output stays the target's
own greedy output (the target keeps only its argmax, whatever proposed it); SAMPLED output loses its guarantee: the
inner level's tokens no longer follow the law it reports upward, so the target's check no longer corrects to its
own law. Hence the name.
"""

from __future__ import annotations

import math

import torch

from seqlab.decoding.acceptance import Sampling, accept_drafts
from seqlab.decoding.cursor import ModelCursor
from seqlab.decoding.drafters import Drafter, MaxGramDrafter, _all_rows, _nones, one_hot
from seqlab.errors import InputError


class SpeculativeDrafter:
    """``model`` drafts for the level above by speculative decoding with ``lower`` proposing ``k`` tokens per
    round. ``stats``: this level's rounds and accepted tokens."""

    def __init__(self, model, lower: Drafter, k: int, lossy_leniency: float | None = None) -> None:
        from seqlab.decoding.speculative import as_drafter, check_speculate

        self.k = check_speculate(k)
        self.leniency = check_leniency(lossy_leniency)
        self.lower = as_drafter(lower, model)
        self.model = model.eval()
        self.vocab_size = model.vocab_size
        self.cursor: ModelCursor | None = None
        self.rounds = 0
        self.accepted = 0
        self.drafted = 0

    def reset(self) -> None:
        self.cursor = None
        self.lower.reset()

    def draft(self, sequences, rows, k, stable, sampling: Sampling, generators):
        with torch.no_grad():
            if self.cursor is None:
                self.cursor = ModelCursor(self.model, [s[:1] for s in _all_rows(sequences, rows)], _nones(rows))
            produced: list[list[int]] = [[] for _ in rows]
            laws: list[list[torch.Tensor]] = [[] for _ in rows]
            while True:
                need = [j for j in range(len(rows)) if len(produced[j]) < k]
                if not need:
                    break
                sub_rows = [rows[j] for j in need]
                seqs = [sequences[j] + produced[j] for j in need]
                sub_stable = [stable[j] for j in need]
                draft, q = self.lower.draft(seqs, sub_rows, self.k, sub_stable, sampling, generators)
                self.cursor.sync(seqs, sub_rows, sub_stable)
                logits = self.cursor.feed(draft)
                p = sampling.probs(logits)
                limits = [min(self.k, k - len(produced[j]) - 1) for j in need]
                lenient = None
                if self.leniency is not None:  # the model's unfiltered-by-greedy law, as the paper's code uses
                    soft = p if not sampling.greedy else _soft(sampling).probs(logits)
                    sx = soft[:, :-1].double().cpu().gather(-1, draft.cpu()[..., None])[..., 0]
                    qx = q.double().cpu().gather(-1, draft.cpu()[..., None])[..., 0]
                    lenient = sx * self.leniency > qx
                kept, extra = accept_drafts(
                    p, q, draft, [generators[i] for i in sub_rows], limits=limits, lenient=lenient
                )
                self.rounds += 1
                proposals = draft.tolist()
                for m, j in enumerate(need):
                    n = kept[m]
                    self.drafted += limits[m]
                    self.accepted += n
                    out = [*proposals[m][:n], extra[m]]
                    produced[j].extend(out)
                    if sampling.greedy:  # a point mass at what was produced (the model's argmax unless lenient)
                        laws[j].extend(one_hot(torch.tensor(out), self.vocab_size))
                    else:  # each output token follows this model's law there (exactly, unless lenient)
                        laws[j].extend(p[m, : n + 1].cpu())
        tokens = torch.tensor([row[:k] for row in produced], dtype=torch.long)
        return tokens, torch.stack([torch.stack(row[:k]) for row in laws])


def check_leniency(value) -> float | None:
    """None (exact) or a float >= 1 (1 is exact too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise InputError(f"lossy_leniency must be a finite number >= 1 (or None for exact), got {value!r}")
    return float(value)


def _soft(sampling: Sampling) -> Sampling:
    """The same filters without the argmax: the law a greedy level's leniency compares against."""
    return Sampling(False, 1.0, sampling.top_k, sampling.top_p, sampling.min_p, sampling.banned)


class HorizontalCascade:
    """Positions of one draft split between drafters: ``parts`` = [(drafter, n), ...] in drafting order."""

    def __init__(self, parts: list[tuple[Drafter, int]]) -> None:
        if not parts:
            raise InputError("a horizontal cascade needs at least one (drafter, count) part")
        vocab = {d.vocab_size for d, _ in parts}
        if len(vocab) != 1:
            raise InputError(f"the drafters of a cascade must share one vocabulary, got sizes {sorted(vocab)}")
        for j, (_, n) in enumerate(parts):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InputError(f"cascade part {j}: the count must be an int >= 0, got {n!r}")
        self.parts = parts
        self.vocab_size = vocab.pop()

    def reset(self) -> None:
        for drafter, _ in self.parts:
            drafter.reset()

    def draft(self, sequences, rows, k, stable, sampling, generators):
        tokens: list[torch.Tensor] = []
        laws: list[torch.Tensor] = []
        done = 0
        for j, (drafter, n) in enumerate(self.parts):
            take = k - done if j == len(self.parts) - 1 else min(n, k - done)
            if take <= 0:
                continue
            prefix = torch.cat(tokens, dim=1).tolist() if tokens else [[] for _ in rows]
            seqs = [s + extra for s, extra in zip(sequences, prefix)]
            t, q = drafter.draft(seqs, rows, take, stable, sampling, generators)
            tokens.append(t)
            laws.append(q)
            done += take
        return torch.cat(tokens, dim=1), torch.cat(laws, dim=1)


def cascade(
    models: list, allocation: list[list[int]] | None = None, max_n: int = 8, lossy_leniency: float | None = None
) -> Drafter:
    """The drafter for a target from draft ``models`` (largest first) and a Max-Gram bottom.

    ``allocation[i]`` (one row per level i = 0..len(models)): the counts of the tokens drafted for level i (0 =
    the target, i = models[i-1]) by models[i], models[i+1], ..., then Max-Gram; row i has len(models) - i + 1
    entries. A row's total is that level's draft length (the target's ``speculate`` may differ: the last drafter
    fills). Default for one model: [[3, 1], [2]], tied best of eight allocations by wall clock in
    ``bench/decoding.py --allocations`` (docs/benchmarks.md, "Speculative decoding (CPU)"); the default for more
    models extends that row and is not measured.

    ``lossy_leniency`` (None, or l >= 1): every draft model's level also keeps tokens its model gives more than
    q / l (module docstring): greedy output is still the target's, sampled output is not guaranteed exact."""
    from seqlab.models import LanguageModel

    leniency = check_leniency(lossy_leniency)
    if not models:
        raise InputError("cascade needs at least one draft model (the bottom Max-Gram drafter is added)")
    for j, model in enumerate(models):
        if not isinstance(model, LanguageModel):
            raise InputError(f"cascade models[{j}] must be a seqlab LanguageModel, got {type(model).__name__}")
    vocab = models[0].vocab_size
    if allocation is None:
        allocation = [[3] * len(models) + [1]] + [[2] * (len(models) - i) + [1] for i in range(1, len(models))]
        allocation.append([2])
    if len(allocation) != len(models) + 1:
        raise InputError(
            f"allocation needs {len(models) + 1} rows (the target's and each model's), got {len(allocation)}"
        )
    for i, row in enumerate(allocation):
        want = len(models) - i + 1
        if len(row) != want or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in row):
            raise InputError(f"allocation[{i}] must be {want} ints >= 0 (models[{i}:] then Max-Gram), got {row!r}")
        if sum(row) < 1:
            raise InputError(f"allocation[{i}] drafts nothing: its counts sum to 0")

    def drafter_for(level: int) -> Drafter:
        parts: list[tuple[Drafter, int]] = []
        row = allocation[level]
        for j, count in enumerate(row[:-1]):
            if count:
                index = level + j  # models[index] sits at level index + 1
                lower = drafter_for(index + 1)
                parts.append((SpeculativeDrafter(models[index], lower, sum(allocation[index + 1]), leniency), count))
        if row[-1] or not parts:
            parts.append((MaxGramDrafter(vocab, max_n), row[-1]))
        return parts[0][0] if len(parts) == 1 else HorizontalCascade(parts)

    return drafter_for(0)
