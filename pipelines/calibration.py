"""Calibration windows for quantization from files or a sequence store (issue 20).

``calibration_windows(model, adapter, files=... | store=...)`` reads the inputs the way ``seqlab eval`` does (files
encoded by the model's adapter through its streaming reader; stored sequences read chunk by chunk, each refused
unless the model was built by the adapter that wrote it) and keeps ``count`` windows of ``window`` elements,
chosen uniformly at random (seeded) among all full windows of all inputs by reservoir sampling: memory holds
only the kept windows however large the store is, and the choice does not depend on how the inputs are cut into
pieces. Windows are aligned at multiples of ``window`` from each input's start. Each window is a (1, window)
tensor of token ids (or (1, window, features) for a continuous adapter), what ``collect_input_moments`` takes.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator

import torch

from seqlab.errors import ConfigError, InputError


def _windows_of(pieces: Iterable[torch.Tensor], window: int) -> Iterator[torch.Tensor]:
    """Consecutive full windows of ``window`` elements of a stream of pieces (a short tail is dropped)."""
    buffer: list[torch.Tensor] = []
    held = 0
    for piece in pieces:
        while piece.shape[0]:
            take = min(window - held, piece.shape[0])
            buffer.append(piece[:take])
            held += take
            piece = piece[take:]
            if held == window:
                yield torch.cat(buffer)
                buffer, held = [], 0


def calibration_windows(
    model,
    adapter,
    *,
    files: list[str | os.PathLike] | None = None,
    store=None,
    sequences: list[str] | None = None,
    count: int = 64,
    window: int = 256,
    seed: int = 0,
) -> list[torch.Tensor]:
    """``count`` calibration windows (module docstring) from ``files`` or ``store`` (``sequences``: default every
    complete one). Raises ConfigError for bad settings, InputError when the inputs hold no full window (an empty
    file, a store without complete sequences, inputs shorter than ``window``), when a file does not exist, or when
    a stored sequence was written by another adapter than the model's."""
    from seqlab.domains.training_data import check_trainable, file_inputs

    for name, value in (("count", count), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"calibration {name} must be a positive integer, got {value!r}")
    if bool(files) == (store is not None):
        raise ConfigError("give the calibration data as files or as a store (one of them)")
    check_trainable(adapter)
    if store is not None:
        from seqlab.pipelines.train_data import store_inputs

        inputs = store_inputs(store, sequences, window, model=model)  # checks each sequence's adapter
    else:
        if sequences:
            raise ConfigError("calibration sequences go with a store")
        inputs = file_inputs(adapter, [os.fspath(f) for f in files or []], window)
    rng = random.Random(seed)
    kept: list[torch.Tensor] = []
    seen = 0
    for item in inputs:
        for piece in _windows_of(item.pieces(), window):
            seen += 1
            if len(kept) < count:
                kept.append(piece.clone())
            else:
                slot = rng.randrange(seen)
                if slot < count:
                    kept[slot] = piece.clone()
    if not kept:
        names = ", ".join(item.name for item in inputs)
        raise InputError(
            f"the calibration set ({names}) holds no window of {window} elements: give more data or a smaller window"
        )
    return [w.unsqueeze(0) for w in kept]


__all__ = ["calibration_windows"]
