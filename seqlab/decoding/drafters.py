"""Drafters: whatever proposes the next k tokens for a target model to verify.

A drafter answers ``draft(sequences, rows, k, stable, sampling, generators) -> (tokens, q)``: for each listed
row (its whole token sequence so far), k proposed tokens (b, k) and the distributions they were drawn from
(b, k, V) float64 (one-hot for a deterministic drafter). Any drafter is exact under the acceptance rule, because
the rule only needs q to be the law the draft was really drawn from; a better drafter is only faster.

- ``ModelDrafter(model)``: a smaller seqlab LanguageModel decoding autoregressively on its own recurrent state
  (Mamba-1, Mamba-2, attention or hybrid), rolled back through checkpoints like the target.
- ``MaxGramDrafter(max_n)``: a statistical drafter with no neural cost (the bottom of a cascade, "Max-Gram" in
  CS Drafting): the continuation of the longest earlier match of the sequence's last tokens, else the most
  frequent follower of the last token, else the most frequent token so far.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol, runtime_checkable

import torch

from seqlab.decoding.acceptance import Sampling
from seqlab.decoding.cursor import ModelCursor
from seqlab.errors import InputError


@runtime_checkable
class Drafter(Protocol):
    vocab_size: int

    def reset(self) -> None:
        """Forget every row: a new generate call starts."""

    def draft(
        self,
        sequences: list[list[int]],
        rows: list[int],
        k: int,
        stable: list[int],
        sampling: Sampling,
        generators: list[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.zeros(*tokens.shape, vocab, dtype=torch.float64)
    return out.scatter_(-1, tokens.cpu()[..., None], 1.0)


class ModelDrafter:
    """A LanguageModel drafting k tokens one step at a time from its own state (checkpointed for rollback).
    ``sampling``: the drafter's own sampling; None (default) uses the target's (same temperature and filters)."""

    def __init__(self, model, sampling: Sampling | None = None) -> None:
        from seqlab.models import LanguageModel

        if not isinstance(model, LanguageModel):
            raise InputError(f"a draft model must be a seqlab LanguageModel, got {type(model).__name__}")
        if model.config.bidirectional:
            raise InputError("a bidirectional model cannot draft: it has no recurrent state")
        self.model = model.eval()
        self.vocab_size = model.vocab_size
        self.sampling = sampling
        self.cursor: ModelCursor | None = None
        self.steps = 0  # drafter forwards

    def reset(self) -> None:
        self.cursor = None

    def draft(self, sequences, rows, k, stable, sampling, generators):
        own = self.sampling or sampling
        with torch.no_grad():
            if self.cursor is None:
                self.cursor = ModelCursor(self.model, [s[:1] for s in _all_rows(sequences, rows)], _nones(rows))
            self.cursor.sync(sequences, rows, stable)
            logits = self.cursor.feed()
            tokens, qs = [], []
            for step in range(k):
                q = own.probs(logits[:, -1])
                chosen = [own.draw(q[j], generators[i]) for j, i in enumerate(rows)]
                tokens.append(chosen)
                qs.append(q.cpu())
                if step < k - 1:
                    logits = self.cursor.feed(torch.tensor(chosen, dtype=torch.long)[:, None])
        self.steps = self.cursor.calls
        return torch.tensor(tokens, dtype=torch.long).T.contiguous(), torch.stack(qs, dim=1)


def _all_rows(sequences, rows):
    """Sequences indexed by row id for the cursor's creation (rows absent here never appear later)."""
    by_row = dict(zip(rows, sequences))
    return [by_row.get(i, [0]) for i in range(max(rows) + 1)]


def _nones(rows):
    return [None] * (max(rows) + 1)


class MaxGramDrafter:
    """Draft by matching: the tokens that followed the longest earlier occurrence (up to ``max_n`` tokens) of
    the sequence's end; without any match, the most frequent follower of the last token, else the most frequent
    token. Deterministic, so its q is one-hot; it indexes each row's stable prefix incrementally (a dict lookup
    per drafted token)."""

    def __init__(self, vocab_size: int, max_n: int = 8) -> None:
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise InputError(f"max_n must be a positive int, got {max_n!r}")
        self.vocab_size = int(vocab_size)
        self.max_n = max_n
        self.reset()

    def reset(self) -> None:
        self._index: dict[int, dict[tuple[int, ...], int]] = {}  # row -> n-gram -> position of the next token
        self._followers: dict[int, dict[int, Counter]] = {}
        self._counts: dict[int, Counter] = {}
        self._indexed: dict[int, int] = {}
        self._source: dict[int, list[int]] = {}

    def _update(self, row: int, seq: list[int], upto: int) -> None:
        index = self._index.setdefault(row, {})
        followers = self._followers.setdefault(row, {})
        counts = self._counts.setdefault(row, Counter())
        done = self._indexed.get(row, 0)
        for t in range(done, upto):
            token = seq[t]
            counts[token] += 1
            if t >= 1:
                followers.setdefault(seq[t - 1], Counter())[token] += 1
            for n in range(1, min(self.max_n, t) + 1):
                index[tuple(seq[t - n : t])] = t  # the n-gram ending before t is followed by seq[t]
        self._indexed[row] = max(done, upto)
        self._source[row] = seq[: self._indexed[row]]

    def next_token(self, row: int, context: list[int]) -> int:
        index = self._index.get(row, {})
        source = self._source.get(row, [])
        for n in range(min(self.max_n, len(context)), 0, -1):
            at = index.get(tuple(context[-n:]))
            if at is not None:
                return source[at]
        followers = self._followers.get(row, {}).get(context[-1]) if context else None
        if followers:
            return followers.most_common(1)[0][0]
        counts = self._counts.get(row)
        return counts.most_common(1)[0][0] if counts else (context[-1] if context else 0)

    def draft(self, sequences, rows, k, stable, sampling, generators):
        tokens = []
        for seq, i, keep in zip(sequences, rows, stable):
            self._update(i, seq, keep)
            context = list(seq)
            row = []
            for _ in range(k):
                token = self.next_token(i, context)
                row.append(token)
                context.append(token)
            tokens.append(row)
        out = torch.tensor(tokens, dtype=torch.long)
        return out, one_hot(out, self.vocab_size)
