"""Streaming a stored sequence through a model with carried state (docs/architecture.md, the state contract).

``stream(model, store, name, window=...)`` reads the sequence window by window (the next window is read in a
background thread while the model runs on the current one) and runs the model over the windows with
``seqlab.streaming.stream_pieces``, the one routine that threads the ``RecurrentState`` from each call into the
next; it yields one ``StreamWindow`` per window. Concatenating the outputs equals one pass of the model over the
whole sequence, and memory stays that of one window whatever the sequence length. ``stream_bits`` scores the
next element of a stored token sequence the same way (``targets=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.state import RecurrentState
from seqlab.streaming import stream_pieces

from .reader import SequenceReader
from .sources import check_model_fits
from .store import open_store

__all__ = ["StreamWindow", "stream", "stream_bits", "stream_output"]


@dataclass(eq=False)
class StreamWindow:
    """One window of a stream: elements ``[start, stop)`` of the sequence, the model's ``output`` for them
    (batch of one: ``(1, stop - start, ...)``), its ``hidden`` states and the ``state`` after ``stop``.
    ``chunk_reads``: chunks decoded so far by this stream (each chunk is decoded once; with prefetch the
    next window's chunks may already be counted)."""

    index: int
    start: int
    stop: int
    output: torch.Tensor
    hidden: torch.Tensor
    state: RecurrentState
    chunk_reads: int = 0


def _open(model, store, name: str, allow_incomplete: bool = False) -> SequenceReader:
    """A reader of sequence ``name`` that the model fits (its adapter wrote it), for a carried-state stream."""
    store = open_store(store, "r")
    reader = store.reader(name, allow_incomplete=allow_incomplete, cache_chunks=2)
    check_model_fits(model, reader.info, reader.where)
    if getattr(getattr(model, "config", None), "bidirectional", False):
        raise InputError(f"{reader.where}: a bidirectional model cannot stream with carried state")
    return reader


def _check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"stream window must be a positive int, got {window!r}")


def stream(
    model,
    store,
    name: str,
    window: int = 4096,
    state: RecurrentState | None = None,
    *,
    start: int | None = None,
    stop: int | None = None,
    prefetch: bool = True,
    allow_incomplete: bool = False,
    grad: bool = False,
) -> Iterator[StreamWindow]:
    """Run ``model`` over sequence ``name`` of ``store`` (a ``SequenceStore`` or a path) in windows.

    ``state``: continue from it (batch of one); ``start`` defaults to ``state.position`` (0 without a state),
    so ``stream(..., state=last.state)`` picks up where an earlier stream stopped. ``stop``: end (default the
    sequence length). The model must have been built by the adapter that wrote the sequence (when both say
    which). Runs under ``torch.no_grad()`` unless ``grad=True``.
    """
    _check_window(window)
    reader = _open(model, store, name, allow_incomplete)
    if state is not None:
        state.check_compatible(model, batch_size=1)
    begin = (state.position if state is not None else 0) if start is None else start
    end = reader.length if stop is None else stop
    for value, what in ((begin, "start"), (end, "stop")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{reader.where}: stream {what} must be an int, got {value!r}")
    if not 0 <= begin <= end <= reader.length:
        raise InputError(
            f"{reader.where}: stream range [{begin}, {end}) is out of range: the sequence holds "
            f"{reader.length} elements"
        )
    spans = [(lo, min(lo + window, end)) for lo in range(begin, end, window)]
    return _windows(model, reader, spans, state, begin, prefetch, grad)


def _read_ahead(reader: SequenceReader, spans, prefetch: bool) -> Iterator[torch.Tensor]:
    """``reader.read(lo, hi)`` for each span in order; with ``prefetch`` the next span is read in a background
    thread while the caller works on the current one (only that thread touches the reader meanwhile)."""
    if not prefetch:
        for lo, hi in spans:
            yield reader.read(lo, hi)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqlab-prefetch")
    try:
        pending = pool.submit(reader.read, *spans[0]) if spans else None
        for index in range(len(spans)):
            values = pending.result()
            if index + 1 < len(spans):
                pending = pool.submit(reader.read, *spans[index + 1])
            yield values
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _steps(model, reader, spans, state, begin, prefetch, grad, targets: bool):
    """``stream_pieces`` over the spans read ahead, both generators closed when the caller stops early."""
    pieces = _read_ahead(reader, spans, prefetch)
    steps = stream_pieces(model, pieces, state=state, start=begin, targets=targets, device=_device(model), grad=grad)
    try:
        yield from steps
    finally:
        steps.close()
        pieces.close()


def _windows(model, reader, spans, state, begin, prefetch, grad) -> Iterator[StreamWindow]:
    for step in _steps(model, reader, spans, state, begin, prefetch, grad, targets=False):
        yield StreamWindow(
            step.index, step.start, step.stop, step.output.output, step.output.hidden, step.state, reader.chunk_reads
        )


def stream_output(model, store, name: str, window: int = 4096, **options) -> tuple[torch.Tensor, RecurrentState]:
    """All outputs of ``stream`` concatenated (for sequences whose outputs fit in memory) and the final state."""
    outputs, state = [], options.get("state")
    for step in stream(model, store, name, window, **options):
        outputs.append(step.output)
        state = step.state
    if not outputs:
        raise InputError(f"stream of {name!r} covered no elements")
    return torch.cat(outputs, dim=1), state


def stream_bits(
    model,
    store,
    name: str,
    window: int = 4096,
    *,
    start: int = 0,
    stop: int | None = None,
    warm: int | None = None,
    sink: Callable[[np.ndarray], None] | None = None,
) -> tuple[float, int]:
    """Bits (-log2 p) of the next element for inputs ``[start, stop)`` of a stored token sequence (default:
    every prediction, ``stop = length - 1``), streamed with the state carried. ``warm``: begin from a zero
    state at ``warm`` and run ``[warm, start)`` first (default ``start``: a zero state at ``start``). ``sink``
    receives each window's float32 bits in order. Returns (sum of bits, predictions)."""
    _check_window(window)
    reader = _open(model, store, name)
    stop = reader.length - 1 if stop is None else stop
    warm = start if warm is None else warm
    for value, what in ((start, "start"), (stop, "stop"), (warm, "warm")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{reader.where}: stream_bits {what} must be an int, got {value!r}")
    if warm < start and not 0 <= warm <= start <= reader.length:
        raise InputError(
            f"{reader.where}: stream range [{warm}, {start}) is out of range: the sequence holds "
            f"{reader.length} elements"
        )
    state = None
    if warm < start:
        warm_up = [(lo, min(lo + window, start)) for lo in range(warm, start, window)]
        for step in _steps(model, reader, warm_up, None, warm, True, False, targets=False):
            state = step.state
    total, count = 0.0, 0
    if stop <= start:
        return total, count
    if not 0 <= start < stop < reader.length:
        raise InputError(
            f"{reader.where}: stream_bits inputs [{start}, {stop}) are out of range: the sequence holds "
            f"{reader.length} elements, the last input needs one after it"
        )
    # pieces [start, start+window] then windows shifted by one: with the one-element tail stream_pieces carries,
    # each model call takes inputs [lo, lo + window) and the targets after them, the windows of ``stream``
    spans = [(start, min(start + window, stop) + 1)]
    spans += [(lo + 1, min(lo + window, stop) + 1) for lo in range(start + window, stop, window)]
    for step in _steps(model, reader, spans, state, start, True, False, targets=True):
        logits = step.output.output[0].float()
        targets = step.targets[0].to(logits.device)
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        bits = (-logp / math.log(2)).cpu().numpy().astype(np.float32)
        total += float(bits.astype(np.float64).sum())
        count += bits.shape[0]
        if sink is not None:
            sink(bits)
    return total, count
