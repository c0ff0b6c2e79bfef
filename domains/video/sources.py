"""Video training windows (``VideoSource``) and synthetic clips for tests, docs and examples
(``moving_square_clips``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.windows import ArraySource

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import VideoAdapter

__all__ = ["VideoSource", "moving_square_clips"]


class VideoSource(ArraySource):
    """Trainer windows from a set of clips (n, T, H, W, C) (uint8 or float [0, 1]; numpy, memmap or torch).

    Clips go ``batch_size`` at a time. ``task="next_frame"``: each batch of clips is cut into windows of
    ``window`` steps (None: the whole clip), inputs the patches at steps ``[i*window, (i+1)*window)`` and targets
    the same shifted by one step; the windows of one batch come in time order, so ``carry_state=True`` threads
    the state through each clip (use ``n == batch_size`` for one long video cut into streams, or whole-clip
    windows with ``carry_state=False``). ``task="classify"``: inputs whole clips, targets ``labels`` (n,).
    Only the clips of the window asked for are read and encoded (``seqlab.windows.ArraySource`` cuts the
    windows: the clips are its streams of slabs).
    """

    dtype = None  # spans stay raw frames; ``window`` encodes them

    def __init__(self, adapter: VideoAdapter, clips, batch_size: int, window: int | None = None, labels=None) -> None:
        if isinstance(clips, torch.Tensor):
            clips = clips.detach().cpu().numpy()
        if not isinstance(clips, np.ndarray) or clips.ndim != 5:
            raise InputError(
                f"VideoSource clips must be an array (n, T, H, W, C), got "
                f"{getattr(clips, 'shape', type(clips).__name__)}"
            )
        self.adapter, self.clips, batch_size = adapter, clips, int(batch_size)
        if clips.shape[0] // batch_size == 0:
            raise InputError(f"VideoSource has {clips.shape[0]} clips, fewer than batch_size={batch_size}")
        t = adapter.tubelet[0]
        steps = clips.shape[1] // t
        if adapter.task == "classify":
            if labels is None:
                raise InputError("VideoSource for task='classify' needs labels (one per clip)")
            self.labels = torch.as_tensor(np.asarray(labels)).long()
            if self.labels.shape != (clips.shape[0],):
                raise InputError(
                    f"VideoSource labels have shape {tuple(self.labels.shape)}, expected ({clips.shape[0]},)"
                )
            if window is not None:
                raise ConfigError("VideoSource window is for task='next_frame'; classify windows are whole clips")
            self.overlap, window = 0, steps
        else:
            self.labels = None
            window = steps - 1 if window is None else int(window)
            if window <= 0:
                raise InputError(
                    f"VideoSource clips of {clips.shape[1]} frames are too short: next-frame needs at "
                    f"least two slabs of {t} frame(s)"
                )
            if (steps - 1) // window == 0:
                raise InputError(f"VideoSource clips have {steps} steps, too few for one window of {window}+1")
        groups = clips.shape[0] // batch_size
        slabs = clips[: groups * batch_size, : steps * t]  # a view: nothing is read yet
        self._setup(clips, slabs.reshape(slabs.shape[0], steps, t, *slabs.shape[2:]), batch_size, window)

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.span(index)  # (batch, steps, t, H, W, C) raw frames
        a = self.adapter
        patches = torch.stack([a.encode(clip.reshape(-1, *clip.shape[2:])) for clip in chunk])
        if a.task == "classify":
            group = index // self.per_group
            return patches, self.labels[group * self.batch_size : (group + 1) * self.batch_size]
        return patches[:, :-1], patches[:, 1:]


# ------------------------------------------------------------------------------------------------------
# synthetic data for tests, docs and examples


DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx): right, left, down, up


def moving_square_clips(
    n: int, frames: int, size: int = 16, square: int = 4, channels: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 clips (n, frames, size, size, channels): a bright square on a dark, faintly textured
    background moving one pixel per frame in one of four directions (wrapping at the edges), and the direction
    labels (n,) (0 right, 1 left, 2 down, 3 up). Start positions and directions are drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(DIRECTIONS), size=n)
    starts = rng.integers(0, size, size=(n, 2))
    clips = np.zeros((n, frames, size, size, channels), dtype=np.uint8)
    background = rng.integers(0, 40, size=(n, 1, size, size, channels), dtype=np.uint8)
    clips[:] = background
    yy, xx = np.arange(square)[:, None], np.arange(square)[None, :]
    for i in range(n):
        dy, dx = DIRECTIONS[labels[i]]
        for f in range(frames):
            y0, x0 = starts[i, 0] + dy * f, starts[i, 1] + dx * f
            clips[i, f, (y0 + yy) % size, (x0 + xx) % size, :] = 220
    return clips, labels
