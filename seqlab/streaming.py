"""The one streaming routine: a model run over consecutive pieces of one stream with its state carried.

``stream_pieces(model, pieces)`` calls the model once per piece (batch of one), threads the ``RecurrentState`` from
each call into the next and yields one ``StreamStep`` per call. By the state contract (docs/architecture.md)
concatenating the outputs equals one pass of the model over the whole stream, whatever the piece sizes, and memory
stays that of one piece. Every streaming user goes through it: the eval command's metric (``stream_metric``),
``seqlab.pipelines``' store streams and Ray score job, and the memory session's replay.

- ``targets=False``: every element is an input; the model sees exactly the pieces given (one call per non-empty
  piece, so a replay repeats the calls of the original run bit for bit).
- ``targets=True``: next-element prediction. The inputs are every element but the last, the targets the element
  after each input; the last element of each piece is carried into the next call (a one-element tail), so the
  steps together predict every element after the first exactly once, as one pass over the whole stream would.

This module is core: it takes the adapter as an argument and imports nothing from ``seqlab.domains``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from seqlab.errors import InputError
from seqlab.state import RecurrentState

if TYPE_CHECKING:  # pragma: no cover
    from seqlab.models import ModelOutput

__all__ = ["StreamStep", "stream_metric", "stream_pieces"]


@dataclass(eq=False)
class StreamStep:
    """One model call of a stream: inputs ``[start, stop)`` (absolute positions in the stream), the model's
    ``output`` for them (batch of one), the ``state`` after input ``stop - 1``; with ``targets=True`` the
    next-element ``targets`` (1, stop - start, ...) and, given an adapter, ``metric``: the adapter's
    ``position_metric`` per input, float32 of shape (stop - start,)."""

    index: int
    start: int
    stop: int
    output: ModelOutput
    state: RecurrentState
    targets: torch.Tensor | None = None
    metric: torch.Tensor | None = None


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _is_continuous(model, adapter) -> bool:
    if adapter is not None:
        return bool(adapter.continuous)
    return getattr(model, "d_input", None) is not None


def _check_start(start) -> int:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise InputError(f"stream start must be an int >= 0, got {start!r}")
    return start


def stream_pieces(
    model,
    pieces: Iterable[torch.Tensor],
    *,
    state: RecurrentState | None = None,
    start: int = 0,
    adapter=None,
    targets: bool = False,
    device=None,
    grad: bool = False,
    progress=None,
) -> Iterator[StreamStep]:
    """Run ``model`` over ``pieces``, consecutive encoded pieces of one stream (1-D token ids, or continuous
    frames ``(t, *frame)``, flattened to ``(t, features)``), with the state carried; yield a ``StreamStep`` per
    model call. ``state``: continue a stream from it (batch of one). ``start``: the absolute position of the first
    input element (``StreamStep.start`` counts from it). ``targets``: next-element prediction (module docstring);
    with an ``adapter`` each step also holds ``adapter.position_metric`` per input. ``device``: where the model
    runs (default: the model's). Runs under ``torch.no_grad()`` unless ``grad=True``. ``progress``: an object with
    ``update(n)`` (a tqdm bar) told the length of each piece as it is consumed, or None.

    The arguments are checked here (a bad state or model raises before anything runs); a bad piece raises
    ``InputError`` naming ``pieces[i]`` when the stream reaches it."""
    if getattr(getattr(model, "config", None), "bidirectional", False):
        raise InputError("a bidirectional model cannot stream with carried state")
    device = _model_device(model) if device is None else torch.device(device)
    if state is not None:
        if not isinstance(state, RecurrentState):
            raise InputError(f"stream state must be a RecurrentState, got {type(state).__name__}")
        state.check_compatible(model, batch_size=1, device=device)
    start = _check_start(start)
    return _steps(model, pieces, state, start, adapter, bool(targets), device, bool(grad), progress)


def _piece(model, piece, i: int, continuous: bool, device) -> torch.Tensor:
    """``pieces[i]`` checked and shaped for the model: ids 1-D, frames (t, features)."""
    if not isinstance(piece, torch.Tensor):
        raise InputError(f"stream pieces[{i}] must be a torch.Tensor, got {type(piece).__name__}")
    if continuous:
        if piece.dim() < 2:
            raise InputError(
                f"stream pieces[{i}] must hold continuous frames (t, *frame), got shape {tuple(piece.shape)}"
            )
        if piece.dim() > 2:
            piece = piece.flatten(1)
        width = getattr(model, "d_input", None)
        if width is not None and piece.shape[0] and piece.shape[1] != width:
            raise InputError(f"stream pieces[{i}] has {piece.shape[1]} features per element, the model takes {width}")
    elif piece.dim() != 1:
        raise InputError(f"stream pieces[{i}] must be 1-D token ids, got shape {tuple(piece.shape)}")
    return piece.to(device)


def _steps(model, pieces, state, start, adapter, targets, device, grad, progress) -> Iterator[StreamStep]:
    continuous = _is_continuous(model, adapter)
    index, position, tail = 0, start, None
    for i, piece in enumerate(pieces):
        piece = _piece(model, piece, i, continuous, device)
        length = piece.shape[0]
        if targets:
            seq = piece if tail is None else torch.cat([tail, piece]) if length else tail
            tail = seq[-1:] if seq.shape[0] else None
            inputs, next_elements = seq[:-1], seq[1:]
        else:
            inputs, next_elements = piece, None
        if inputs.shape[0]:
            with torch.set_grad_enabled(grad):
                out = model(inputs[None], state, return_state=True)
            state = out.state
            n = inputs.shape[0]
            metric = None
            if next_elements is not None:
                next_elements = next_elements[None]
                if adapter is not None:
                    with torch.no_grad():
                        metric = adapter.position_metric(out, next_elements).detach().float().reshape(-1)
                    if metric.shape[0] != n:
                        raise InputError(
                            f"{type(adapter).__name__}.position_metric gave {metric.shape[0]} values "
                            f"for {n} predicted positions"
                        )
            yield StreamStep(index, position, position + n, out, state, next_elements, metric)
            index += 1
            position += n
        if progress is not None and length:
            progress.update(length)


def stream_metric(
    model, adapter, pieces: Iterable[torch.Tensor], *, state: RecurrentState | None = None, device=None, progress=None
) -> tuple[float | None, int]:
    """The adapter's metric of ``model`` over one stream given as encoded ``pieces``, streamed with the state
    carried (exact: equals one pass over the whole stream): ``(metric averaged over every predicted position,
    number of positions)``; ``(None, 0)`` when nothing is predicted. A position whose ``position_metric`` is NaN
    is one the metric does not count (e.g. a target that is not a base, for bits per base)."""
    if adapter is None:
        raise InputError("stream_metric needs the adapter whose position_metric it averages, got None")
    total, count = 0.0, 0
    for step in stream_pieces(
        model, pieces, state=state, adapter=adapter, targets=True, device=device, progress=progress
    ):
        assert step.metric is not None  # targets=True with an adapter
        values = step.metric.double()
        counted = ~torch.isnan(values)
        total += float(values[counted].sum())
        count += int(counted.sum())
    if count == 0:
        return None, 0
    return total / count, count
