"""Streaming a stored sequence through a model with carried state (design.md, invariant 1).

``stream(model, store, name, window=...)`` reads the sequence window by window (the next window is read in a
background thread while the model runs on the current one), threads the ``RecurrentState`` from each window
into the next and yields one ``StreamWindow`` per window. Concatenating the outputs equals one pass of the
model over the whole sequence, and memory stays that of one window whatever the sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from seqlab.errors import ConfigError, InputError
from seqlab.state import RecurrentState

from .store import SequenceReader, check_model_fits, open_store

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


def _model_input(reader: SequenceReader, values: torch.Tensor) -> torch.Tensor:
    if reader.info.kind == "continuous" and values.dim() > 2:  # (t, *frame) -> (t, features)
        values = rearrange(values, "t ... -> t (...)")
    return values.unsqueeze(0)


def stream(model, store, name: str, window: int = 4096, state: RecurrentState | None = None, *,
           start: int | None = None, stop: int | None = None, prefetch: bool = True,
           allow_incomplete: bool = False, grad: bool = False) -> Iterator[StreamWindow]:
    """Run ``model`` over sequence ``name`` of ``store`` (a ``SequenceStore`` or a path) in windows.

    ``state``: continue from it (batch of one); ``start`` defaults to ``state.position`` (0 without a state),
    so ``stream(..., state=last.state)`` picks up where an earlier stream stopped. ``stop``: end (default the
    sequence length). The model must have been built by the adapter that wrote the sequence (when both say
    which). Runs under ``torch.no_grad()`` unless ``grad=True``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"stream window must be a positive int, got {window!r}")
    store = open_store(store, "r")
    reader = store.reader(name, allow_incomplete=allow_incomplete, cache_chunks=2)
    check_model_fits(model, reader.info, reader.where)
    if getattr(getattr(model, "config", None), "bidirectional", False):
        raise InputError(f"{reader.where}: a bidirectional model cannot stream with carried state")
    if state is not None:
        state.check_compatible(model, batch_size=1)
    begin = (state.position if state is not None else 0) if start is None else start
    end = reader.length if stop is None else stop
    for value, what in ((begin, "start"), (end, "stop")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{reader.where}: stream {what} must be an int, got {value!r}")
    if not 0 <= begin <= end <= reader.length:
        raise InputError(f"{reader.where}: stream range [{begin}, {end}) is out of range: the sequence holds "
                         f"{reader.length} elements")
    return _run(model, reader, window, state, begin, end, prefetch, grad)


def _run(model, reader, window, state, begin, end, prefetch, grad) -> Iterator[StreamWindow]:
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    starts = range(begin, end, window)  # a range, not a list: nothing grows with the sequence length

    def bounds(i: int) -> tuple[int, int]:
        return starts[i], min(starts[i] + window, end)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqlab-prefetch") if prefetch else None
    try:
        pending = pool.submit(reader.read, *bounds(0)) if pool and len(starts) else None
        for index in range(len(starts)):
            lo, hi = bounds(index)
            # only the worker thread touches the reader while a read is pending, one read at a time
            values = pending.result() if pool else reader.read(lo, hi)
            if pool and index + 1 < len(starts):
                pending = pool.submit(reader.read, *bounds(index + 1))
            x = _model_input(reader, values).to(device)
            with torch.set_grad_enabled(grad):
                out = model(x, state, return_state=True)
            state = out.state
            yield StreamWindow(index, lo, hi, out.output, out.hidden, state, reader.chunk_reads)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def stream_output(model, store, name: str, window: int = 4096, **options) -> tuple[torch.Tensor, RecurrentState]:
    """All outputs of ``stream`` concatenated (for sequences whose outputs fit in memory) and the final state."""
    outputs, state = [], options.get("state")
    for step in stream(model, store, name, window, **options):
        outputs.append(step.output)
        state = step.state
    if not outputs:
        raise InputError(f"stream of {name!r} covered no elements")
    return torch.cat(outputs, dim=1), state


def stream_bits(model, store, name: str, window: int = 4096, *, start: int = 0, stop: int | None = None,
                warm: int | None = None, sink: Callable[[np.ndarray], None] | None = None) -> tuple[float, int]:
    """Bits (-log2 p) of the next element for inputs ``[start, stop)`` of a stored token sequence (default:
    every prediction, ``stop = length - 1``), streamed with the state carried. ``warm``: begin from a zero
    state at ``warm`` and run ``[warm, start)`` first (default ``start``: a zero state at ``start``). ``sink``
    receives each window's float32 bits in order. Returns (sum of bits, predictions)."""
    store = open_store(store, "r")
    reader = store.reader(name, cache_chunks=2)
    stop = reader.length - 1 if stop is None else stop
    warm = start if warm is None else warm
    state = None
    for step in (stream(model, store, name, window, start=warm, stop=start) if warm < start else ()):
        state = step.state
    total, count = 0.0, 0
    if stop <= start:
        return total, count
    for step in stream(model, store, name, window, state=state, start=start, stop=stop):
        logits = step.output[0].float()
        targets = reader.read(step.start + 1, step.stop + 1).to(logits.device)
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        bits = (-logp / math.log(2)).cpu().numpy().astype(np.float32)
        total += float(bits.astype(np.float64).sum())
        count += bits.shape[0]
        if sink is not None:
            sink(bits)
    return total, count
