"""Filling a sequence store from files through their domain adapter, a window at a time (``ingest``).

``ingest`` run again on the same source resumes after a killed writer's committed length (a changed source is
replaced). It marks the sequences of an input file complete only after the adapter has read the whole file
(end-of-stream checks such as a gzip CRC included); a failure in the middle of a file removes what it wrote for
that file, and a replacement waits in the ``_seqlab_staging`` group until then, so the old sequence survives a
failed one (docs/stores.md, "Crash semantics").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from seqlab.errors import ConfigError, CorruptFileError, InputError, SeqlabError

from .store import SequenceStore, open_store
from .store_format import (
    DEFAULT_INGEST_WINDOW,
    MAX_ELEMENTS,
    SequenceInfo,
    _check_chunk_bytes,
    _check_name,
    _check_shard_chunks,
    _is_int,
    _jsonable,
    _now,
    _update_attrs,
    sequence_name,
)
from .store_staging import _recover, _staging, _swap_in

__all__ = ["IngestProgress", "IngestResult", "ingest"]


@dataclass(frozen=True)
class IngestProgress:
    """Passed to an ``ingest`` progress callback after every committed chunk and at the end of each sequence."""

    path: str
    sequence: str
    elements: int  # elements committed to the sequence so far
    done: bool


@dataclass(frozen=True)
class IngestResult:
    """One sequence written by ``ingest``: ``action`` is "written", "resumed", "replaced" or "skipped"."""

    name: str
    action: str
    resumed_from: int
    info: SequenceInfo


# ------------------------------------------------------------------------------------------------------
# ingest


def _file_identity(path: str, checksum: bool) -> dict:
    stat = os.stat(path)
    identity = {
        "path": os.path.abspath(path),
        "name": os.path.basename(path),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": None,
    }
    if checksum:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        identity["sha256"] = digest.hexdigest()
    return identity


def _same_source(a: dict | None, b: dict | None) -> bool:
    if not a or not b:
        return False
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return (a.get("bytes"), a.get("mtime_ns")) == (b.get("bytes"), b.get("mtime_ns"))


def _record_windows(adapter, path: str, window: int, split_records: bool | None):
    """``[(record id or None, window iterator), ...]`` lazily: the adapter's own per-record stream when it has
    one (``iter_records(path, window)``), else whole records from ``records(path)`` cut into windows, else
    the whole file as one sequence."""
    if split_records is not False and hasattr(adapter, "iter_records"):
        yield from adapter.iter_records(path, window)
        return
    if split_records is not False and hasattr(adapter, "records"):
        # whole records in memory, one at a time: a stopgap for adapters without a streaming iter_records
        for rid, raw in adapter.records(path):

            def pieces(raw=raw):
                for start in range(0, len(raw), window):
                    yield adapter.encode(raw[start : start + window])

            yield rid, pieces()
        return
    if split_records:
        raise ConfigError(f"adapter {adapter.name!r} cannot split {path} into records (no iter_records/records)")
    yield None, adapter.iter_windows(path, window)


def ingest(
    store,
    paths,
    adapter,
    *,
    names=None,
    window: int = DEFAULT_INGEST_WINDOW,
    sequences: Callable[[str, int], Iterable[tuple[str, Iterator]]] | None = None,
    split_records: bool | None = None,
    overwrite: bool = False,
    checksum: bool = True,
    chunk_elements: int | None = None,
    chunk_bytes: int | None = None,
    shard_chunks: int | None = None,
    progress: bool | Callable[[IngestProgress], None] | None = None,
) -> list[IngestResult]:
    """Encode files with ``adapter`` into ``store``, streaming ``window`` elements at a time.

    ``paths``: one file or a list. Each file gives one sequence named ``names[i]`` (default: the file's
    stem), or, split into records (``split_records``; default: when the adapter can, i.e. has
    ``iter_records(path, window)`` yielding ``(record id, window iterator)`` pairs, or ``records(path)``
    yielding ``(record id, raw)``), one sequence per record named ``<names[i]>.<record id>`` (the record id
    alone without ``names``).
    ``sequences(path, window)`` replaces how a file is split: it yields ``(name, window iterator)`` pairs.

    An existing sequence is: skipped when complete and from the same source (sha256, or size and mtime with
    ``checksum=False``); resumed after its committed length when incomplete and from the same source; replaced
    when ``overwrite`` or when incomplete from another source; otherwise refused (InputError).
    ``progress``: True for a tqdm bar, or a callable taking ``IngestProgress``.
    """
    store = open_store(store, "a")
    store._writable()
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        if len(names) != len(paths):
            raise ConfigError(f"ingest got {len(paths)} paths but {len(names)} names")
    if not _is_int(window) or not 1 <= window <= MAX_ELEMENTS:
        raise ConfigError(f"ingest window must be an int in [1, {MAX_ELEMENTS}], got {window!r}")
    window = int(window)
    if chunk_bytes is not None:
        _check_chunk_bytes(chunk_bytes)
    if chunk_elements is not None and (not _is_int(chunk_elements) or not 1 <= chunk_elements <= MAX_ELEMENTS):
        raise ConfigError(f"ingest chunk_elements must be an int in [1, {MAX_ELEMENTS}], got {chunk_elements!r}")
    _check_shard_chunks(shard_chunks)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(unit="el", unit_scale=True)
    results: list[IngestResult] = []
    seen: set[str] = set()
    try:
        for i, path in enumerate(paths):
            path = os.fspath(path)
            results.extend(
                _ingest_file(
                    store,
                    path,
                    i,
                    names[i] if names is not None else None,
                    adapter,
                    window,
                    sequences,
                    split_records,
                    overwrite,
                    checksum,
                    seen,
                    (chunk_elements, chunk_bytes, shard_chunks),
                    progress,
                    bar,
                )
            )
    finally:
        if bar is not None:
            bar.close()
    return results


def _ingest_file(
    store: SequenceStore,
    path: str,
    index: int,
    base,
    adapter,
    window,
    sequences,
    split_records,
    overwrite,
    checksum,
    seen,
    layout,
    progress,
    bar,
) -> list[IngestResult]:
    """One input file, all or nothing: its sequences stay ``complete: False`` (replacements stay in the staging
    group) until the adapter has read the whole file, end-of-stream checks included (a gzip CRC covers the
    whole member, so bases decoded before it may be wrong); then all are marked complete. On an error, every
    sequence this call wrote for the file is removed (earlier data and replaced sequences are untouched)."""
    touched: list[tuple[str, bool]] = []  # (name, staged) in the order written
    results: list[IngestResult] = []
    try:
        if not os.path.isfile(path):
            raise InputError(f"ingest: {path} does not exist or is not a file")
        identity = _file_identity(path, checksum)
        if sequences is not None:
            pairs = ((_check_name(n), None, it) for n, it in sequences(path, window))
        else:
            pairs = (
                (_sequence_of(base, path, rid), rid, it)
                for rid, it in _record_windows(adapter, path, window, split_records)
            )
        for name, rid, pieces in pairs:
            if name in seen:
                raise InputError(f"ingest: two sequences would be named {name!r} ({path}); pass names=")
            seen.add(name)
            results.append(
                _ingest_one(
                    store, name, rid, pieces, adapter, path, identity, overwrite, layout, progress, bar, touched
                )
            )
        # the adapter has read the file to its end: mark what it gave complete, replacements swapped in
        staging = None
        for name, staged in touched:
            if staged:
                staging = staging or _staging(store)
                _update_attrs(staging._array(name), {"complete": True, "updated": _now()})
                _swap_in(store, staging, name)
            else:
                _update_attrs(store._array(name), {"complete": True, "updated": _now()})
    except Exception as exc:
        kept = _roll_back(store, touched)
        replacements = sum(staged for _, staged in touched)
        note = (
            f"ingest of {path} was rolled back: "
            + (
                f"the {len(touched)} sequence(s) written from it were removed"
                if touched
                else "nothing was written from it"
            )
            + (
                f" ({replacements} of them replacements: the sequences they were to replace are kept)"
                if replacements
                else ""
            )
            + (f" ({kept} could not be removed and stay incomplete)" if kept else "")
            + (f"; the {index} file(s) before it stay ingested" if index else "")
        )
        if isinstance(exc, SeqlabError):
            raise type(exc)(f"{exc}; {note}").with_traceback(exc.__traceback__) from None
        exc.add_note(note)
        raise
    return [
        IngestResult(r.name, r.action, r.resumed_from, store.describe(r.name)) if r.action != "skipped" else r
        for r in results
    ]


def _roll_back(store: SequenceStore, touched: list[tuple[str, bool]]) -> int:
    """Remove what an ingest wrote for one file; returns how many could not be removed."""
    failed = 0
    for name, staged in reversed(touched):
        try:
            (_staging(store) if staged else store)._delete_node(name)
        except Exception:  # noqa: BLE001 - the original error matters more; the sequence stays incomplete
            failed += 1
    return failed


def _sequence_of(base: str | None, path: str, rid: str | None) -> str:
    if rid is None:
        return _check_name(base) if base is not None else sequence_name(Path(path).stem)
    return sequence_name(f"{base}.{rid}" if base is not None else rid)


def _ingest_one(
    store: SequenceStore, name, rid, pieces, adapter, path, identity, overwrite, layout, progress, bar, touched
) -> IngestResult:
    action, resume, target = "written", False, store
    _recover(store, name)
    if name in store:
        try:
            info = store.describe(name)
        except CorruptFileError as exc:
            if not overwrite:
                raise CorruptFileError(f"{exc}; ingest replaces a damaged sequence only with overwrite=True") from None
            info = None
        same = (
            info is not None
            and _same_source(info.source, identity)
            and _jsonable(info.adapter) == _jsonable(adapter.info())
        )
        if info is not None and info.complete and same and not overwrite:
            if rid is not None:  # records come in file order: walk past this one to reach the next
                for _ in pieces:
                    pass
            return IngestResult(name, "skipped", 0, info)
        if info is not None and not info.complete and same and not overwrite:
            action, resume = "resumed", True
        elif info is not None and info.complete and not overwrite:
            raise InputError(
                f"sequence store {store.where} already holds a complete sequence {name!r} from "
                f"{(info.source or {}).get('path')}: pass overwrite=True (seqlab ingest --overwrite) "
                "to replace it"
            )
        else:  # written aside, swapped in once the whole file is verified: a failure leaves the old one
            action, target = "replaced", _staging(store)
    last = [0]

    def report(elements: int, done: bool = False) -> None:
        if bar is not None:
            bar.update(elements - last[0])
        last[0] = elements
        if callable(progress) and progress is not True:
            progress(IngestProgress(path, name, elements, done))

    chunk_elements, chunk_bytes, shard_chunks = layout
    touched.append((name, target is not store))
    writer = target.writer(
        name,
        adapter=adapter,
        source=identity,
        record=rid,
        chunk_elements=chunk_elements,
        chunk_bytes=chunk_bytes,
        shard_chunks=shard_chunks,
        resume=resume,
        progress=report,
    )
    resumed_from = writer.committed
    last[0] = resumed_from
    for piece in pieces:
        writer.write(piece)
    info = writer.finish(complete=False)
    report(info.length, done=True)
    return IngestResult(name, action, resumed_from, info)
