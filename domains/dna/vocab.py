"""The DNA vocabulary (5 specials, then A C G T N; fixed: checkpoints depend on it) and reverse complement on token
ids and logits (Caduceus's group action: reverse the sequence, complement each id or vocabulary channel)."""

from __future__ import annotations

import torch

from seqlab.errors import InputError

__all__ = [
    "A",
    "BOS",
    "C",
    "COMPLEMENT",
    "EOS",
    "G",
    "IUPAC_AMBIGUOUS",
    "MASK",
    "N",
    "PAD",
    "SPECIALS",
    "T",
    "UNK",
    "VOCAB",
    "reverse_complement",
    "reverse_complement_logits",
]

# The vocabulary is fixed (checkpoints depend on it): ids 0-4 are specials, 5-9 the bases.
VOCAB = ("<pad>", "<mask>", "<unk>", "<bos>", "<eos>", "A", "C", "G", "T", "N")
PAD, MASK, UNK, BOS, EOS, A, C, G, T, N = range(10)
SPECIALS = (PAD, MASK, UNK, BOS, EOS)
# Complement of each id: A<->T, C<->G, N->N, every special is its own complement.
COMPLEMENT = (PAD, MASK, UNK, BOS, EOS, T, G, C, A, N)
IUPAC_AMBIGUOUS = "RYSWKMBDHV"

TEXT_ENCODING = "latin-1"  # one byte = one character, so string positions are byte positions


def _complement_table(device=None) -> torch.Tensor:
    return torch.tensor(COMPLEMENT, dtype=torch.long, device=device)


def reverse_complement(ids: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Reverse ``ids`` along ``dim`` and complement each id (A<->T, C<->G, N and specials fixed).

    An involution: ``reverse_complement(reverse_complement(x)) == x``. Specials keep their id but move with
    the reversal (a ``<bos>`` at the start ends up at the end), which is the group action the RC-equivariant
    model is defined by; for augmentation, apply it to windows of bases (``RCAugmentedSource``).
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"reverse_complement needs an integer tensor of token ids, got {getattr(ids, 'dtype', ids)!r}")
    bad = (ids < 0) | (ids >= len(VOCAB))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(f"reverse_complement: id {int(ids[where])} at position {where} is outside [0, {len(VOCAB)})")
    return _complement_table(ids.device)[ids.long()].flip(dim).to(ids.dtype)


def reverse_complement_logits(logits: torch.Tensor) -> torch.Tensor:
    """The reverse complement of per-position vocabulary scores (b, l, vocab): reverse the length axis and
    permute the vocabulary channels by the complement, so that ``argmax`` commutes with ``reverse_complement``."""
    if logits.shape[-1] != len(VOCAB):
        raise InputError(
            f"reverse_complement_logits needs a last axis of {len(VOCAB)} vocabulary scores, "
            f"got shape {tuple(logits.shape)}"
        )
    return logits.flip(-2)[..., _complement_table(logits.device)]
