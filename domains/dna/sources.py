"""Training sources for DNA: masked-LM windows (``MaskedBaseSource``) and reverse-complement augmentation of a
next-element source (``RCAugmentedSource``)."""

from __future__ import annotations

import torch

from seqlab.errors import ConfigError, InputError
from seqlab.windows import ArraySource, WindowSource

from .vocab import MASK, A, reverse_complement

__all__ = ["MaskedBaseSource", "RCAugmentedSource", "mask_bases"]


def mask_bases(
    ids: torch.Tensor,
    rate: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM pair: ``(inputs, targets)`` with about ``rate`` of the base positions replaced by ``<mask>``
    in ``inputs``; ``targets`` holds the true id there and -100 elsewhere (ignored by loss and metric)."""
    if not 0 < rate <= 1:
        raise ConfigError(f"mask_bases rate must be in (0, 1], got {rate!r}")
    chosen = (torch.rand(ids.shape, generator=generator) < rate).to(ids.device) & (ids >= A)
    return ids.masked_fill(chosen, MASK), torch.where(chosen, ids, torch.full_like(ids, -100))


class MaskedBaseSource(ArraySource):
    """Trainer source for masked-LM training (``TrainConfig(carry_state=False)``): window ``i`` is
    ``batch_size`` rows of ``window`` ids cut from ``ids`` like ``SequenceSource`` (the same ``ArraySource``
    windows, without the one-element overlap), masked by ``mask_bases`` with a generator seeded by
    ``(seed, i)``, so a resumed run sees the same masks."""

    overlap = 0

    def __init__(self, ids: torch.Tensor, batch_size: int, window: int, rate: float = 0.15, seed: int = 0) -> None:
        ids = torch.as_tensor(ids).reshape(-1).long()
        self.rate, self.seed = rate, int(seed)
        batch_size = int(batch_size)
        length = ids.numel() // batch_size
        self._setup(ids, ids[: length * batch_size].reshape(batch_size, length), batch_size, window)
        if self.num_windows == 0:
            raise InputError(
                f"MaskedBaseSource: {ids.numel()} ids are too few for one window of {window} in each "
                f"of {batch_size} rows"
            )

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.span(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return mask_bases(rows, self.rate, generator)


class RCAugmentedSource:
    """Reverse-complement augmentation of a next-element source (e.g. ``SequenceSource``): each row of window
    ``i`` is replaced, with probability ``p``, by the reverse complement of its ``window + 1`` ids (then split
    into inputs and targets again), decided by a generator seeded by ``(seed, i)``. A flipped row is a different
    stretch of the other strand, so train with ``TrainConfig(carry_state=False)``."""

    def __init__(self, source, p: float = 0.5, seed: int = 0) -> None:
        if not 0 <= p <= 1:
            raise ConfigError(f"RCAugmentedSource p must be in [0, 1], got {p!r}")
        if not isinstance(source, WindowSource):
            raise ConfigError(
                f"RCAugmentedSource wraps a training source (a WindowSource such as SequenceSource), "
                f"got {type(source).__name__}"
            )
        self.source, self.p, self.seed = source, p, int(seed)
        self.batch_size, self.num_windows = source.batch_size, source.num_windows

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.source.window(index)
        chunk = torch.cat([inputs, targets[:, -1:]], 1)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        flip = torch.rand(chunk.shape[0], generator=generator) < self.p
        chunk = torch.where(flip.unsqueeze(1), reverse_complement(chunk, -1), chunk)
        return chunk[:, :-1], chunk[:, 1:]
