"""The speculative acceptance rule and the sampling distribution both the target and the drafters use.

Exactness (Leviathan et al. 2023, Chen et al. 2023): a draft token x drawn from q is kept with probability
min(1, p(x)/q(x)); on rejection the output is drawn from the residual max(0, p - q) / sum(max(0, p - q)). The
output is then distributed exactly as p: q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) * residual(x)
= min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x). A point-mass draft (q one-hot at b, as from a deterministic
n-gram or subword drafter) is the special case: keep b with probability p(b), else draw from p with b removed,
renormalised. Greedy decoding is the case where p is one-hot at the target's argmax: a draft token is kept
exactly when it is the argmax, and the residual is the argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seqlab.errors import InputError


@dataclass(frozen=True)
class Sampling:
    """How a model's logits become the distribution a token is drawn from (the filters of ``generate``)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    banned: tuple[int, ...] = ()

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (..., V) float64 probabilities: one-hot at the argmax when greedy, else the law
        ``generate`` samples from (``seqlab.sampling.probabilities``)."""
        from seqlab.sampling import SamplingOptions, probabilities

        shape = logits.shape
        flat = logits.reshape(-1, shape[-1])
        if self.banned:
            index = torch.tensor(self.banned, dtype=torch.long, device=flat.device)
            flat = flat.index_fill(-1, index, float("-inf"))
        if self.greedy:
            out = torch.zeros(flat.shape, dtype=torch.float64, device=flat.device)
            out.scatter_(-1, flat.float().argmax(-1, keepdim=True), 1.0)
        else:
            out = probabilities(flat, SamplingOptions(self.temperature, self.top_k, self.top_p, self.min_p))
        return out.reshape(shape)

    def draw(self, probs: torch.Tensor, generator: torch.Generator) -> int:
        """One token from a (V,) distribution (the argmax when greedy, consuming no randomness)."""
        if self.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs.cpu().float(), 1, generator=generator)[0])


def accept_draft(
    p: torch.Tensor, q: torch.Tensor, draft: list[int], generator: torch.Generator, *, rule: str = "exact"
) -> tuple[int, int]:
    """Verify one row's draft. ``p``: (k+1, V) target probabilities after the context and after each draft
    prefix; ``q``: (k, V) the distributions the draft tokens were drawn from; ``draft``: the k tokens. Returns
    ``(n, token)``: the first n draft tokens are kept and ``token`` follows them (the resampled token at the
    first rejection, or the bonus token drawn from p[k] when all k are kept).

    ``rule="exact"`` is the rule above. ``rule="always"`` (keep every draft token) exists only as the negative
    control of the exactness tests: its output follows q, not p.
    """
    kept, extra = accept_drafts(p[None], q[None], torch.tensor([draft], dtype=torch.long), [generator], rule=rule)
    return kept[0], extra[0]


def accept_drafts(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    generators,
    *,
    rule: str = "exact",
    limits=None,
    lenient: torch.Tensor | None = None,
) -> tuple[list[int], list[int]]:
    """``accept_draft`` for a batch: p (b, k+1, V), q (b, k, V), drafts (b, k); ``generators[j]`` is row j's.
    ``limits[j]`` (default k): row j verifies only its first limits[j] draft tokens (a row near its token
    budget). Each row draws k uniforms, then one token, from its own generator whatever the others do, so a row
    samples the same in any batch.

    ``lenient`` (b, k) bool, LOSSY: draft tokens kept whatever the rule says (CS Drafting's leniency at an inner
    level of a cascade; ``cascade.SpeculativeDrafter``). The output is then not guaranteed to follow p."""
    if rule not in ("exact", "always"):
        raise InputError(f"rule must be 'exact' or 'always', got {rule!r}")
    b, k = drafts.shape
    if p.shape[:2] != (b, k + 1) or q.shape[:2] != (b, k):
        raise InputError(
            f"p must be (b, k+1, V) = ({b}, {k + 1}, V) and q ({b}, {k}, V), got {tuple(p.shape)}, {tuple(q.shape)}"
        )
    p = p.double().cpu()
    q = q.double().cpu()
    drafts = drafts.cpu()
    px = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (b, k)
    qx = q.gather(-1, drafts[..., None])[..., 0]
    if k and bool((qx <= 0).any()):
        j, pos = (qx <= 0).nonzero()[0].tolist()
        raise InputError(
            f"row {j}: draft token {int(drafts[j, pos])} at position {pos} has probability 0 under its own draft law"
        )
    uniforms = torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in generators]) if k else px
    # keep with probability min(1, p/q): u * q < p with u uniform in [0, 1)
    keep = (uniforms * qx < px) | (px >= qx) if rule == "exact" else torch.ones_like(px, dtype=torch.bool)
    if lenient is not None:
        keep = keep | lenient.cpu()
    rejected = ~keep
    first = torch.where(rejected.any(-1), rejected.int().argmax(-1), torch.full((b,), k)).tolist()
    verified = [k] * b if limits is None else [min(k, int(limit)) for limit in limits]
    kept, extra = [], []
    for j, (n, limit) in enumerate(zip(first, verified)):
        if n >= limit:  # every verified token kept
            n = limit
            law = p[j, n]  # the bonus token after them
        else:  # the first rejection: draw from the residual
            law = (p[j, n] - q[j, n]).clamp_min(0)
            total = float(law.sum())
            if not total > 0 or not math.isfinite(total):  # p == q up to rounding: rejection had probability ~0
                law, total = p[j, n], float(p[j, n].sum())
            law = law / total
        kept.append(n)
        if float(law.max()) >= 1.0:  # one-hot (greedy): no randomness used
            extra.append(int(law.argmax()))
        else:
            extra.append(int(torch.multinomial(law.float(), 1, generator=generators[j])[0]))
    return kept, extra


def output_law(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution of the first output token of a one-token draft under the exact rule, computed in
    closed form from (V,) p and q: q(x) min(1, p(x)/q(x)) + rejection mass * residual(x). Equals p; the tests
    check it on enumerated distributions."""
    p, q = p.double(), q.double()
    kept = torch.minimum(p, q)
    rejected = 1.0 - kept.sum()
    residual = (p - q).clamp_min(0)
    total = residual.sum()
    return kept + (rejected * residual / total if total > 0 else torch.zeros_like(p))
