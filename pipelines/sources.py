"""Stored sequences as training windows (``StoreSource``, a ``seqlab.train.WindowSource``), and the check that
a model was built by the adapter that wrote a sequence (``check_model_fits``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange

from seqlab.errors import ConfigError, InputError

from .store import open_store
from .store_format import SequenceInfo, _jsonable

__all__ = ["StoreSource", "check_model_fits"]


def check_model_fits(model, info: SequenceInfo, where: str) -> None:
    """Refuse a model built by another adapter than the one that wrote the sequence (or of the wrong kind)."""
    model_info = getattr(model, "adapter_info", None)

    def encoding(adapter_info: dict) -> dict:  # what decides the encoding; the model's build options do not
        return _jsonable({k: adapter_info.get(k) for k in ("name", "settings")})

    if model_info is not None and info.adapter is not None and encoding(model_info) != encoding(info.adapter):
        raise InputError(
            f"{where} was written by adapter {info.adapter}, but the model was built by adapter "
            f"{model_info}: encode the data with the model's adapter (or use a model built by "
            f"{info.adapter.get('name')!r})"
        )
    vocab = getattr(model, "vocab_size", None)
    d_input = getattr(model, "d_input", None)
    if vocab is not None:
        if info.kind != "tokens":
            raise InputError(f"{where} holds continuous frames, the model takes token ids")
        if info.vocab_size is not None and info.vocab_size > vocab:
            raise InputError(f"{where} holds ids in [0, {info.vocab_size}), the model's vocabulary is {vocab}")
    elif d_input is not None:
        if info.kind != "continuous":
            raise InputError(f"{where} holds token ids, the model takes continuous frames of width {d_input}")
        width = math.prod(info.frame_shape)
        if width != d_input:
            raise InputError(
                f"{where} holds frames of shape {info.frame_shape} ({width} values), the model takes d_input={d_input}"
            )


class StoreSource:
    """Windows of stored sequences for ``seqlab.train.Trainer`` (truncated BPTT, state carried and detached).

    ``names``: one sequence or a list, laid end to end. Like ``SequenceSource``, the whole is cut into
    ``batch_size`` contiguous streams (the tail that does not divide is dropped); window ``i`` holds inputs at
    ``[i*window, (i+1)*window)`` of every stream and targets shifted by one. Only the chunks a window touches
    are read (each stream keeps its last chunks), so memory does not grow with the sequence.
    ``model``: when given, refused unless built by the adapter that wrote the sequences.
    """

    def __init__(
        self,
        store,
        names,
        batch_size: int,
        window: int,
        *,
        model=None,
        allow_incomplete: bool = False,
        cache_chunks: int | None = None,
    ) -> None:
        store = open_store(store, "r")
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise InputError(f"sequence store {store.where}: StoreSource needs at least one sequence name")
        for value, what in ((batch_size, "batch_size"), (window, "window")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"StoreSource {what} must be a positive int, got {value!r}")
        self.store, self.names = store, names
        self.batch_size, self.window_size = batch_size, window
        cache = cache_chunks or 2 * batch_size + 2
        self.readers = [store.reader(n, allow_incomplete=allow_incomplete, cache_chunks=cache) for n in names]
        first = self.readers[0].info
        for reader in self.readers[1:]:
            info = reader.info
            if (info.kind, info.frame_shape, _jsonable(info.adapter)) != (
                first.kind,
                first.frame_shape,
                _jsonable(first.adapter),
            ):
                raise InputError(
                    f"sequence store {store.where}: sequences {first.name!r} and {info.name!r} were "
                    "encoded differently (adapter, kind or frame shape): they cannot be one source"
                )
        if model is not None:
            for reader in self.readers:
                check_model_fits(model, reader.info, reader.where)
        self.offsets = np.cumsum([0] + [r.length for r in self.readers])
        self.total = int(self.offsets[-1])
        self.stream_len = self.total // batch_size
        self.num_windows = max(0, (self.stream_len - 1) // window)
        if self.num_windows == 0:
            raise InputError(
                f"sequence store {store.where}: sequences {names} hold {self.total} elements, too few "
                f"for one window of {window}+1 in each of {batch_size} streams"
            )

    def __len__(self) -> int:
        return self.num_windows

    @property
    def chunk_reads(self) -> int:
        return sum(r.chunk_reads for r in self.readers)

    def _span(self, start: int, stop: int) -> np.ndarray:
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for k in range(first, len(self.readers)):
            base = int(self.offsets[k])
            if base >= stop:
                break
            lo, hi = max(start - base, 0), min(stop - base, self.readers[k].length)
            if hi > lo:
                parts.append(self.readers[k].read(lo, hi, raw=True))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} is outside [0, {self.num_windows})")
        start = int(index) * self.window_size
        rows = [
            self._span(b * self.stream_len + start, b * self.stream_len + start + self.window_size + 1)
            for b in range(self.batch_size)
        ]
        chunk = self.readers[0].to_tensor(np.stack(rows))
        if chunk.dim() > 3:  # (batch, time, *frame) -> (batch, time, features) for a SequenceModel
            chunk = rearrange(chunk, "b t ... -> b t (...)")
        return chunk[:, :-1], chunk[:, 1:]
