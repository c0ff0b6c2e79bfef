"""Exact speculative decoding for any seqlab LanguageModel target (Mamba-1, Mamba-2, attention, hybrids).

Each round: the drafter proposes k tokens per row; the target verifies them in ONE forward from its state
(seqlab prefills many tokens on an existing state exactly), with ``states_at`` giving the state after every
position of that forward; the acceptance rule (``acceptance.accept_draft``) keeps a prefix of each row's draft
and adds one token; each row moves to the state at its own acceptance length, so nothing is re-run. Rows of a
batch accept different numbers of tokens and stay in one batch (per-row states are concatenated each round).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqlab.decoding.acceptance import Sampling, accept_drafts
from seqlab.decoding.cursor import ModelCursor
from seqlab.decoding.drafters import Drafter, ModelDrafter
from seqlab.errors import InputError


@dataclass
class SpeculativeStats:
    """Counts of one speculative ``generate`` call: ``rounds`` (target verification forwards),
    ``target_calls`` (every target forward, prefill catch-up and the final state included), ``drafted`` and
    ``accepted`` draft tokens, ``generated`` tokens, and ``accepted_per_round`` (per row, per round)."""

    rounds: int = 0
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0
    accepted_per_round: list[list[int]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Generated tokens per verification forward of one row (1 = no gain over plain decoding)."""
        rows = sum(len(r) for r in self.accepted_per_round)
        return self.generated / rows if rows else 0.0


def as_drafter(draft, target) -> Drafter:
    """A Drafter from what the user gave: a LanguageModel (drafting with the target's sampling) or a Drafter;
    its vocabulary must be the target's."""
    from seqlab.models import LanguageModel

    if isinstance(draft, LanguageModel):
        drafter: Drafter = ModelDrafter(draft)
    elif isinstance(draft, Drafter):
        drafter = draft
    else:
        raise InputError(
            f"draft must be a seqlab LanguageModel or a Drafter (seqlab.decoding), got {type(draft).__name__}"
        )
    if drafter.vocab_size != target.vocab_size:
        raise InputError(
            f"the draft's vocabulary has {drafter.vocab_size} ids, the target's {target.vocab_size}: a drafter "
            "must propose ids of the target's vocabulary (for a subword drafter of a byte model use "
            "seqlab.decoding.SubwordDrafter)"
        )
    return drafter


def check_speculate(speculate) -> int:
    if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 1:
        raise InputError(f"speculate (draft tokens per round) must be an int >= 1, got {speculate!r}")
    return speculate


def speculative_decode(
    model,
    rows: list[torch.Tensor],
    starts,
    drafter: Drafter,
    k: int,
    max_new_tokens: int,
    sampling: Sampling,
    generators: list[torch.Generator],
    stops: list[tuple[int, ...]],
    callback=None,
    rule: str = "exact",
):
    """The decoding loop behind ``generate(..., draft=, speculate=)``. Returns (tokens, states, reasons, stats)."""
    n = len(rows)
    prompts = [row.tolist() for row in rows]
    sequences = [list(p) for p in prompts]
    cursor = ModelCursor(model, sequences, starts)
    drafter.reset()
    draft_generators = [torch.Generator().manual_seed(int(g.initial_seed()) + 7919) for g in generators]
    tokens: list[list[int]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    stats = SpeculativeStats(accepted_per_round=[[] for _ in range(n)])
    active = [i for i in range(n) if max_new_tokens > 0]
    with torch.no_grad():
        while active:
            # Every round drafts k tokens (a row's draws never depend on the others); a row near its budget
            # verifies fewer.
            kk = k
            limits = [min(k, max_new_tokens - len(tokens[i]) - 1) for i in active]
            seqs = [sequences[i] for i in active]
            stable = [len(s) for s in seqs]
            draft, q = drafter.draft(seqs, active, kk, stable, sampling, draft_generators)
            if tuple(draft.shape) != (len(active), kk) or q.shape[:2] != draft.shape:
                raise RuntimeError(f"the drafter returned tokens {tuple(draft.shape)} / q {tuple(q.shape)}")
            cursor.sync(seqs, active)
            logits = cursor.feed(draft)
            p = sampling.probs(logits)
            stats.rounds += 1
            still = []
            kept_rows, extras = accept_drafts(p, q, draft, [generators[i] for i in active], rule=rule, limits=limits)
            proposals = draft.tolist()
            for j, i in enumerate(active):
                proposal, kept, extra = proposals[j], kept_rows[j], extras[j]
                stats.drafted += limits[j]
                stats.accepted += kept
                stats.accepted_per_round[i].append(kept)
                done = False
                for token in [*proposal[:kept], extra]:
                    tokens[i].append(token)
                    sequences[i].append(token)
                    stats.generated += 1
                    if callback is not None:
                        callback(i, token)
                    if any(tuple(tokens[i][-len(s) :]) == s for s in stops):
                        reasons[i], done = "stop", True
                        break
                    if len(tokens[i]) >= max_new_tokens:
                        done = True
                        break
                if not done:
                    still.append(i)
            active = still
        # The final state of every row has consumed the prompt and every generated token.
        every = list(range(n))
        cursor.sync([sequences[i] for i in every], every)
        cursor.feed()
    states = [cursor.final_state(i) for i in range(n)]
    stats.target_calls = cursor.calls
    return tokens, states, reasons, stats
