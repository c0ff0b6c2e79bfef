"""A memory session's current state from its files: the newest snapshot with every later log replayed, one event
per model call through ``seqlab.streaming.stream_pieces`` (the canonical chunking, so a replay repeats exactly the
calls of the original run), and ``replay_state`` for a fresh stream of events."""

from __future__ import annotations

import time as _time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from seqlab.errors import CorruptFileError
from seqlab.state import RecurrentState
from seqlab.streaming import stream_pieces

from .memory import Event, MemoryStreamAdapter
from .session_files import _first_event, _listing, _log_name, _pending_rollback
from .session_log import _check_chain, _open_writer_log
from .session_snapshots import _finish_rollback, _read_snapshot


def _advance(model, adapter, state: RecurrentState | None, events: Sequence[Event]):
    """Feed ``events`` one event per forward call (the canonical chunking; see the module docstring). Returns the
    state after them and the next-byte logits after the last one (None when there are no events)."""
    logits = None
    for step in stream_pieces(model, (adapter.encode(event) for event in events), state=state, adapter=adapter):
        state, logits = step.state, step.output.logits[:, -1].float()
    return state, logits


def replay_state(model, events: Iterable[Event], adapter: MemoryStreamAdapter | None = None) -> RecurrentState:
    """The state a fresh session reaches after observing ``events`` (bit for bit, on the same machine)."""
    adapter = adapter or MemoryStreamAdapter()
    state = model.init_state(1)
    state, _ = _advance(model, adapter, state, list(events))
    return state


@dataclass(eq=False)
class _View:
    """What the files say: the ``state`` after ``events`` events and the next-byte ``logits`` (None before the
    first event), the newest ``snapshot`` (holding ``snapshot_events`` events), the newest log number ``top``,
    the event ranges a repair recorded as ``lost``; for a writer its log open for appending (``log_handle``)
    and the session metadata (``meta``: upgraded when a format-1 log was)."""

    state: RecurrentState
    logits: torch.Tensor | None
    events: int
    snapshot: int
    snapshot_events: int
    top: int
    lost: list
    meta: dict
    log_handle: object = None


def _load_view(path: Path, meta: dict, model, adapter, writer: bool) -> _View:
    """Newest snapshot + the logs after it replayed. A reader retries when a writer moves files under it. A
    writer also finishes a rollback under way, deletes the leftovers of an interrupted log merge and opens its
    log (a torn tail cut off)."""
    for attempt in range(20):
        try:
            return _load_once(path, meta, model, adapter, writer)
        except FileNotFoundError:
            if writer or attempt == 19:
                raise
            _time.sleep(0.01)
    raise AssertionError("unreachable")  # pragma: no cover


def _load_once(path: Path, meta: dict, model, adapter, writer: bool) -> _View:
    target = _pending_rollback(path)
    if target is not None and writer:
        _finish_rollback(path, target, meta)
        target = None
    snaps, logs = _listing(path)
    if target is not None:  # a reader sees the rollback as done: log `target` restarts empty
        snaps = [n for n in snaps if n <= target]
        logs = [n for n in logs if n < target]
    if not snaps:
        raise CorruptFileError(f"{path}: the session has no snapshot file")
    current = snaps[-1]
    state, logits, events = _read_snapshot(path, current, model, adapter)
    top = max([current, *logs])
    # a missing log of the newest snapshot is a crash only while a rollback is under way, or in a session of
    # earlier seqlab (which wrote a snapshot before its log); since format 2 the log is written first
    legacy = target is not None or meta.get("format_version", 0) < 2
    chain, leftovers = _check_chain(path, logs, top, current, events, _first_event(meta), legacy)
    replayed = [e for k in sorted(chain) if k >= current for _, batch in chain[k].batches for e in batch]
    handle = None
    if writer:
        for k in leftovers:  # logs a merge had copied into a merged log when a crash stopped it
            (path / _log_name(k)).unlink(missing_ok=True)
        handle, meta = _open_writer_log(path, top, chain.get(top), events, meta)
    try:
        state, new_logits = _advance(model, adapter, state, replayed)
    except BaseException:
        if handle is not None:
            handle.close()
        raise
    lost = [list(span) for k in sorted(chain) for span in chain[k].lost]
    return _View(
        state, new_logits if replayed else logits, events + len(replayed), current, events, top, lost, meta, handle
    )
