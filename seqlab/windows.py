"""Training windows: the ``WindowSource`` protocol the ``Trainer`` reads, and ``ArraySource``, the one window
implementation over in-memory data (``SequenceSource`` for token ids, ``FrameSource`` for float frames; the domain
sources build on it). See docs/training.md.
"""

from __future__ import annotations

import numbers
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from seqlab.errors import ConfigError, InputError

__all__ = ["ArraySource", "FrameSource", "SequenceSource", "WindowSource"]


@runtime_checkable
class WindowSource(Protocol):
    """What the ``Trainer`` reads: ``num_windows`` windows of ``batch_size`` rows, ``window(i) -> (inputs,
    targets)``. ``SequenceSource`` (token ids), ``FrameSource`` (float frames), the domain sources (DNA's
    masked-LM and RC-augmented windows, video clips) and ``seqlab.pipelines``' ``StoreSource`` all satisfy it.

    Optional extension, packed rows (``seqlab.packing.PackedSource``): ``packed = True`` and ``cu_seqlens(i,
    rows=None)``, the boundaries of window ``i``'s documents in its rows flattened into one row; targets are -100
    where nothing is predicted. The ``Trainer`` runs such a source as packed rows (fresh state every window);
    a reader that ignores ``cu_seqlens`` would let state run across documents."""

    batch_size: int
    num_windows: int

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


_NUMPY_DTYPES = {torch.int64: np.int64, torch.float32: np.float32}


class ArraySource:
    """The one window implementation over in-memory data (a torch tensor, a numpy array or a memmap).

    The data is viewed as ``(groups * batch_size, stream_len, *features)`` streams; windows go group by group
    (one group: ``batch_size`` streams side by side), and in time order within a group. ``span(i)`` reads the
    elements ``[p*window, (p+1)*window + overlap)`` of the streams of window ``i``'s group (``p``: the window's
    place in its group), and only those: a memmap never loads whole. ``window(i)`` is next-element prediction
    over that span (``overlap=1``): inputs all but the last element, targets all but the first. Subclasses
    check and lay out their data, then call ``_setup``; sources that encode their windows (video) override
    ``window`` and build on ``span``.
    """

    overlap: int = 1
    #: the dtype windows come out as (int64 ids, float32 frames); None: the data's own (a numpy span stays one)
    dtype: torch.dtype | None = torch.int64

    def _setup(self, data, streams, batch_size: int, window: int) -> None:
        """``data``: what the user gave (kept as ``self.data``); ``streams``: its (groups * batch, length, ...)
        view."""
        self.data, self.streams = data, streams
        self.batch_size, self.window_size = int(batch_size), int(window)
        self.groups = int(streams.shape[0]) // self.batch_size
        self.stream_len = int(streams.shape[1])
        self.per_group = max(0, (self.stream_len - self.overlap) // self.window_size)
        self.num_windows = self.groups * self.per_group

    def __len__(self) -> int:
        return self.num_windows

    def span(self, index: int):
        """The streams of window ``index``'s group over its elements plus ``overlap``: (batch, window + overlap,
        ...)."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} is outside [0, {self.num_windows})")
        group, part = divmod(index, self.per_group)
        start = part * self.window_size
        chunk = self.streams[
            group * self.batch_size : (group + 1) * self.batch_size, start : start + self.window_size + self.overlap
        ]
        if self.dtype is None:
            return chunk
        if isinstance(chunk, np.ndarray):  # copies: a window never shares memory with the data
            return torch.from_numpy(np.array(chunk, dtype=_NUMPY_DTYPES[self.dtype]))
        return chunk.to(self.dtype, copy=True)

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.span(index)
        return chunk[:, :-1], chunk[:, 1:]


def _as_streams(data, batch_size: int):
    """A flat (N, *features) sequence -> its (batch_size, N // batch_size, *features) view (the tail dropped)."""
    length = data.shape[0] // batch_size
    return data[: batch_size * length].reshape(batch_size, length, *data.shape[1:])


class SequenceSource(ArraySource):
    """Windows for truncated BPTT over one long sequence of token ids (or ``(streams, length)`` rows).

    A 1-D sequence (torch tensor, numpy array or ``np.load(..., mmap_mode="r")`` memmap) is cut into
    ``batch_size`` contiguous streams like a language-model "batchify" (the tail that does not divide is
    dropped); a 2-D input's rows are the streams and their number must equal ``batch_size``. Window ``i``
    holds, for every stream, inputs at positions ``[i*window, (i+1)*window)`` and targets shifted by one.
    Only the window asked for is read, so a memmap never loads whole.
    """

    def __init__(self, data, batch_size: int, window: int) -> None:
        if isinstance(data, torch.Tensor):
            if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
                raise InputError(f"SequenceSource data must hold integer token ids, got dtype {data.dtype}")
            data = data.detach().cpu()
        elif isinstance(data, np.ndarray):
            if data.dtype.kind not in "iu":
                raise InputError(f"SequenceSource data must hold integer token ids, got dtype {data.dtype}")
        else:
            raise InputError(f"SequenceSource data must be a torch tensor or numpy array, got {type(data).__name__}")
        if data.ndim not in (1, 2):
            raise InputError(f"SequenceSource data must be 1-D or (streams, length), got shape {tuple(data.shape)}")
        for name, value in (("batch_size", batch_size), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InputError(f"SequenceSource {name} must be a positive int, got {value!r}")
        batch_size = int(batch_size)
        if data.ndim == 2 and data.shape[0] != batch_size:
            raise InputError(
                f"SequenceSource data has {data.shape[0]} rows, batch_size is {batch_size}: "
                "2-D data's rows are the streams"
            )
        self._setup(data, _as_streams(data, batch_size) if data.ndim == 1 else data, batch_size, window)
        if self.num_windows == 0:
            raise InputError(
                f"SequenceSource data of shape {tuple(data.shape)} is too short for one window of "
                f"{self.window_size}+1 tokens in each of {self.batch_size} streams"
            )


class FrameSource(ArraySource):
    """Windows of float frames for the ``Trainer`` (``SequenceSource`` takes integer ids only).

    ``frames``: ``(T, C)`` float. Cut into ``batch_size`` contiguous streams (the tail that does not divide is
    dropped), window ``i`` gives inputs ``(batch, window, C)`` = frames ``[i*window, (i+1)*window)`` of every
    stream and targets = the same shifted by one frame.
    """

    dtype = torch.float32

    def __init__(self, frames: torch.Tensor, batch_size: int, window: int) -> None:
        if not isinstance(frames, torch.Tensor) or not frames.is_floating_point() or frames.dim() != 2:
            what = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) else type(frames)
            raise InputError(f"FrameSource needs float frames of shape (T, C), got {what}")
        for name, value in (("batch_size", batch_size), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FrameSource.{name} must be a positive int, got {value!r}")
        frames = frames.detach().cpu().float()
        self._setup(frames, _as_streams(frames, batch_size), batch_size, window)
        if self.num_windows == 0:
            raise InputError(
                f"FrameSource: {frames.shape[0]} frames are too few for one window of {window}+1 "
                f"frames in each of {batch_size} streams"
            )
