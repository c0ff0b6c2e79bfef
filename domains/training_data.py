"""Training and held-out data from files, through a domain adapter, and the exact held-out evaluation.

``files_data(spec, batch_size, window)`` turns a run's data spec (training files, held-out files or a held-out
fraction, the adapter's name and settings) into a ``TrainData``: the Trainer's training source, the source of its
periodic evaluation, and the held-out inputs of the final evaluation. Files are encoded in memory with the
adapter's streaming reader (``iter_windows``), except one file the adapter can memory-map (``Adapter.map_file``:
a bytes file), which is never read whole. Where a held-out fraction splits the data, the adapter says where a
split may fall (``Adapter.split_point``: a UTF-8 bytes adapter never cuts a character). The training source is
``adapter.source(...)``; nothing here depends on which adapter it is.

With ``pack=True`` the training source is packed rows (``seqlab.packing.PackedSource``): each file is one
document, or each record of a FASTA/FASTQ file for an adapter that reads records (``iter_records``: DNA); the
documents are laid end to end into full rows, none crossing into another (docs/training.md, "Packing"). Token
adapters only: continuous frames are refused.

``evaluate(model, adapter, inputs)`` streams every held-out input through the model with the state carried
(``seqlab.streaming.stream_metric``: equal to one pass over the whole input, in constant memory) and gives the
adapter's metric per input and in total.

Called by ``seqlab.pipelines.training`` (a whole training run) and the ``seqlab train`` / ``seqlab eval``
commands; data from a sequence store is ``seqlab.pipelines.train_data``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seqlab.errors import ConfigError, InputError

__all__ = [
    "ENCODE_WINDOW",
    "EVAL_WINDOW",
    "HeldOut",
    "TrainData",
    "adapter_for",
    "check_file",
    "check_packable",
    "check_trainable",
    "encode_files",
    "file_documents",
    "evaluate",
    "file_inputs",
    "file_pieces",
    "files_data",
    "tensor_pieces",
    "training_source",
]

ENCODE_WINDOW = 1 << 20  # elements encoded at a time when reading files
EVAL_WINDOW = 8192  # elements per streamed piece of the final held-out evaluation
_HINT = "(use fewer --batch-size streams or a shorter --window)"


@dataclass
class HeldOut:
    """One held-out input: a name and a function giving its encoded pieces in order (``length``: its number of
    elements when known, for a progress bar). ``documents``: for packed runs, a function giving the input's
    documents (encoded tensors) in order; ``evaluate`` then streams each document from a fresh state, as the
    packed model was trained (None: the input is one stream)."""

    name: str
    pieces: Callable[[], Iterator[torch.Tensor]]
    length: int | None = None
    documents: Callable[[], Iterator[torch.Tensor]] | None = None


@dataclass
class TrainData:
    """A run's data: the ``adapter`` that encoded it, the Trainer's ``train`` source over ``train_elements``
    elements, ``eval_source`` for the periodic evaluation inside the Trainer (None: no held-out data), the
    ``held_out`` inputs of the final exact evaluation, the ``spec`` recorded in run.json (a resume reuses it), and
    for packed rows the ``packing`` counts and efficiency."""

    adapter: Any
    train: Any
    train_elements: int
    eval_source: Any | None
    held_out: list[HeldOut]
    spec: dict
    #: packed rows: the training source's ``PackingStats.to_dict()`` (efficiency, the padding baseline's), else None
    packing: dict | None = None


# ------------------------------------------------------------------------------------------------------
# adapters and files


def adapter_for(domain: str, settings: dict | str | None = None):
    """The adapter registered as ``domain``, built with ``settings`` (a dict, or a JSON object as text)."""
    from seqlab.domains.base import get_adapter

    values: Any = {}
    if settings:
        try:
            values = json.loads(settings) if isinstance(settings, str) else settings
        except ValueError as exc:
            raise ConfigError(f"--adapter-settings must be a JSON object, got {settings!r} ({exc})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--adapter-settings must be a JSON object, got {settings!r}")
    cls = get_adapter(domain)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"--adapter-settings {values} do not fit the {domain!r} adapter: {exc}") from None


def check_trainable(adapter) -> None:
    """Refuse an adapter whose model is not a next-element model (a video adapter with ``task='classify'``)."""
    if getattr(adapter, "task", None) == "classify":
        raise ConfigError(
            "seqlab train and eval handle next-element models; a video adapter with task='classify' "
            "needs clip labels: train it with seqlab.domains.video.VideoSource and Trainer"
        )


def check_packable(adapter) -> None:
    """Refuse packing for an adapter whose inputs are continuous frames (the losses of frames have no "predicts
    nothing" target to mark a document's end)."""
    if adapter.continuous:
        raise ConfigError(
            f"--pack packs documents of token ids; the {adapter.name!r} adapter's inputs are continuous frames: "
            "train it without --pack"
        )


def check_file(path: str | os.PathLike) -> str:
    """``path`` as a string; InputError when there is no such file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    return path


def file_pieces(adapter, path: str | os.PathLike, window: int) -> Iterator[torch.Tensor]:
    """The encoded file, ``window`` elements at a time (the adapter's streaming reader)."""
    yield from adapter.iter_windows(check_file(path), window)


def _flat(adapter, piece: torch.Tensor) -> torch.Tensor:
    """(t, *frame) -> (t, features) for continuous inputs; ids stay 1-D."""
    return piece.reshape(piece.shape[0], -1) if adapter.continuous and piece.dim() > 2 else piece


def encode_files(adapter, paths: list[str], progress=None) -> torch.Tensor:
    """All files encoded and laid end to end: a 1-D id tensor or (T, features) float frames. ``progress``: an
    object with ``update(n)`` (a tqdm bar) told each piece's length, or None."""
    pieces = []
    for path in paths:
        for piece in file_pieces(adapter, path, ENCODE_WINDOW):
            pieces.append(_flat(adapter, piece))
            if progress is not None:
                progress.update(piece.shape[0])
    if not pieces:
        raise InputError(f"{', '.join(map(str, paths))}: nothing to encode")
    return torch.cat(pieces)


def file_documents(adapter, path: str | os.PathLike) -> list[torch.Tensor]:
    """The documents of a file, encoded: each record (an adapter that reads records, ``iter_records``: DNA's
    FASTA/FASTQ), else the whole file as one."""
    path = check_file(path)
    if callable(getattr(adapter, "iter_records", None)):
        docs = []
        for _, windows in adapter.iter_records(path, ENCODE_WINDOW):
            pieces = list(windows)
            if pieces:
                docs.append(torch.cat(pieces))
        return docs
    pieces = [_flat(adapter, piece) for piece in file_pieces(adapter, path, ENCODE_WINDOW)]
    return [torch.cat(pieces)] if pieces else []


def _documents(adapter, paths: list[str], progress=None) -> tuple[torch.Tensor, list[int]]:
    """The documents of ``paths`` laid end to end, and their lengths."""
    docs = []
    for path in paths:
        for doc in file_documents(adapter, path):
            docs.append(doc)
            if progress is not None:
                progress.update(doc.shape[0])
    if not docs or not sum(d.shape[0] for d in docs):
        raise InputError(f"{', '.join(map(str, paths))}: nothing to encode")
    return torch.cat(docs), [int(d.shape[0]) for d in docs]


def cut_lengths(lengths: list[int], point: int) -> tuple[list[int], list[int]]:
    """Document lengths of ``data[:point]`` and ``data[point:]`` (a document the cut falls in is two)."""
    head, tail, seen = [], [], 0
    for n in lengths:
        if seen + n <= point:
            head.append(n)
        elif seen >= point:
            tail.append(n)
        else:
            head.append(point - seen)
            tail.append(seen + n - point)
        seen += n
    return head, tail


def split_documents(data, lengths) -> Iterator[torch.Tensor]:
    """The documents of ``data`` (laid end to end, ``lengths`` each), one tensor each (a numpy array or memmap is
    read one document at a time)."""
    start = 0
    for n in lengths:
        piece = data[start : start + n]
        start += n
        yield torch.from_numpy(np.asarray(piece, dtype=np.int64)) if isinstance(piece, np.ndarray) else piece


def packed_source(data, lengths, batch_size: int, window: int, where: str):
    """``PackedSource(data, lengths, batch_size, window)``; bad data raises InputError naming ``where``."""
    from seqlab.packing import PackedSource

    try:
        return PackedSource(data, lengths, batch_size, window)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def tensor_pieces(data, window: int) -> Iterator[torch.Tensor]:
    """Consecutive pieces of ``window`` elements of encoded ``data`` (a tensor, or a numpy array / memmap of ids,
    read one piece at a time)."""
    for start in range(0, data.shape[0], window):
        piece = data[start : start + window]
        yield torch.from_numpy(np.asarray(piece, dtype=np.int64)) if isinstance(piece, np.ndarray) else piece


def training_source(adapter, data, batch_size: int, window: int, where: str):
    """``adapter.source(data, batch_size, window)``; data too short for the batch and window raises InputError
    naming ``where``."""
    try:
        return adapter.source(data, batch_size, window)
    except InputError as exc:
        raise InputError(f"{where}: {exc} {_HINT}") from None


# ------------------------------------------------------------------------------------------------------
# a run's data from files


def _check_fraction(fraction, evals: list[str]):
    if fraction is not None and evals:
        raise ConfigError("give held-out data either as --eval FILE... or as --eval-fraction, not both")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1
    ):
        raise ConfigError(f"--eval-fraction must be a number in (0, 1), got {fraction!r}")
    return fraction


def _split(adapter, data, fraction) -> int:
    """Where the held-out ``fraction`` of ``data`` starts (all of it trains without a fraction)."""
    length = int(data.shape[0])
    if not fraction:
        return length
    return int(adapter.split_point(data, length - int(length * fraction)))


def files_data(spec: dict, batch_size: int, window: int, progress: bool = False, pack: bool = False) -> TrainData:
    """A run's data from files. ``spec``: ``{"files": [...], "domain": name, "adapter_settings": {...} | None,
    "eval": [...], "eval_fraction": F | None}`` (the held-out data: files, or the last F of the encoded data).
    ``pack``: the training (and periodic evaluation) sources are packed rows of the files' documents."""
    from tqdm.auto import tqdm

    adapter = adapter_for(spec["domain"], spec.get("adapter_settings"))
    check_trainable(adapter)
    if pack:
        check_packable(adapter)
        return _packed_files_data(spec, adapter, batch_size, window, progress)
    files = [check_file(f) for f in spec["files"]]
    evals = [check_file(f) for f in spec.get("eval") or []]
    adapter = adapter.fitted(adapter.read(f) for f in files)  # the training files only, never held-out files
    fraction = _check_fraction(spec.get("eval_fraction"), evals)
    mapped = adapter.map_file(files[0]) if len(files) == 1 else None
    if mapped is not None:  # memory-mapped: a file larger than memory is never read whole
        data, where = mapped, files[0]
    else:
        bar = tqdm(unit="el", unit_scale=True, disable=not progress, desc="encode")
        try:
            data = encode_files(adapter, files, bar)
        finally:
            bar.close()
        where = ", ".join(files)
    split = _split(adapter, data, fraction)
    train = training_source(adapter, data[:split], batch_size, window, where)
    eval_data = data[split:] if fraction else None
    held_out: list[HeldOut] = []
    if fraction:
        if eval_data.shape[0] < 2:
            raise InputError(
                f"--eval-fraction {fraction} leaves {eval_data.shape[0]} elements of held-out data: "
                "at least 2 are needed"
            )
        held_out.append(
            HeldOut(
                f"last {fraction:g} of the data", lambda: tensor_pieces(eval_data, EVAL_WINDOW), int(eval_data.shape[0])
            )
        )
    held_out += file_inputs(adapter, evals, EVAL_WINDOW)
    if evals:
        eval_data = encode_files(adapter, evals)
    eval_source = None
    if eval_data is not None:
        if eval_data.shape[0] < 2:
            raise InputError(
                f"held-out data {', '.join(evals)} holds {eval_data.shape[0]} elements: at least 2 are needed"
            )
        eval_source = training_source(adapter, eval_data, 1, min(window, eval_data.shape[0] - 1), "held-out data")
    return TrainData(adapter, train, split, eval_source, held_out, spec)


def _packed_files_data(spec: dict, adapter, batch_size: int, window: int, progress: bool) -> TrainData:
    """``files_data`` with packed rows: the same held-out data (files, or the last F of the encoded data cut
    where the adapter allows), the documents of each side packed."""
    from tqdm.auto import tqdm

    files = [check_file(f) for f in spec["files"]]
    evals = [check_file(f) for f in spec.get("eval") or []]
    adapter = adapter.fitted(adapter.read(f) for f in files)
    fraction = _check_fraction(spec.get("eval_fraction"), evals)
    mapped = adapter.map_file(files[0]) if len(files) == 1 else None
    where = ", ".join(files)
    if mapped is not None:  # one file, one document, memory-mapped: never read whole
        data, lengths = mapped, [int(mapped.shape[0])]
    else:
        bar = tqdm(unit="el", unit_scale=True, disable=not progress, desc="encode")
        try:
            data, lengths = _documents(adapter, files, bar)
        finally:
            bar.close()
    split = _split(adapter, data, fraction)
    train_lengths, held_lengths = cut_lengths(lengths, split)
    train = packed_source(data[:split], train_lengths, batch_size, window, where)
    held_out: list[HeldOut] = []
    eval_data, eval_lengths = None, []
    if fraction:
        eval_data, eval_lengths = data[split:], held_lengths
        if eval_data.shape[0] < 2:
            raise InputError(
                f"--eval-fraction {fraction} leaves {eval_data.shape[0]} elements of held-out data: "
                "at least 2 are needed"
            )
        held, held_lengths = eval_data, eval_lengths
        held_out.append(
            HeldOut(
                f"last {fraction:g} of the data",
                lambda: tensor_pieces(held, EVAL_WINDOW),
                int(held.shape[0]),
                documents=lambda: split_documents(held, held_lengths),
            )
        )
    for item in file_inputs(adapter, evals, EVAL_WINDOW):  # each file's documents from a fresh state
        item.documents = lambda path=item.name: iter(file_documents(adapter, path))
        held_out.append(item)
    if evals:
        eval_data, eval_lengths = _documents(adapter, evals)
    eval_source = None
    if eval_data is not None:
        total = int(eval_data.shape[0])
        if total < 2:
            raise InputError(f"held-out data {', '.join(evals)} holds {total} elements: at least 2 are needed")
        eval_source = packed_source(eval_data, eval_lengths, 1, min(window, total), "held-out data")
    return TrainData(adapter, train, split, eval_source, held_out, spec, packing=train.stats().to_dict())


def file_inputs(adapter, paths: list[str], window: int) -> list[HeldOut]:
    """Held-out inputs of files (each checked to exist), streamed ``window`` elements at a time."""
    return [HeldOut(path, lambda path=path: file_pieces(adapter, path, window)) for path in map(check_file, paths)]


# ------------------------------------------------------------------------------------------------------
# the exact held-out evaluation


def evaluate(model, adapter, inputs: list[HeldOut], device=None, progress: bool = False) -> dict:
    """The adapter's metric of ``model`` per input and in total, each input streamed from a fresh state (exact:
    one pass over it; an input with ``documents``, of a packed run: each document from a fresh state). Returns
    ``{"metric_name", "inputs": [{"name", "metric", "targets"}], "metric", "targets", "uniform_baseline"}``; a
    metric is None where nothing was predicted (an input under 2 elements)."""
    from tqdm.auto import tqdm

    from seqlab.streaming import stream_metric

    total_len = sum(h.length for h in inputs) if all(h.length is not None for h in inputs) else None
    bar = tqdm(total=total_len, unit="el", unit_scale=True, disable=not progress, desc="eval")
    rows = []
    try:
        for item in inputs:
            if item.documents is None:
                value, count = stream_metric(model, adapter, item.pieces(), device=device, progress=bar)
            else:
                value, count = _documents_metric(model, adapter, item.documents(), device, bar)
            rows.append({"name": item.name, "metric": value, "targets": count})
    finally:
        bar.close()
    n = sum(r["targets"] for r in rows)
    total = sum(r["metric"] * r["targets"] for r in rows if r["targets"]) / n if n else None
    return {
        "metric_name": adapter.metric_name,
        "inputs": rows,
        "metric": total,
        "targets": n,
        "uniform_baseline": adapter.uniform_baseline(),
    }


def _documents_metric(model, adapter, documents, device, progress) -> tuple[float | None, int]:
    """``stream_metric`` of each document from a fresh state, combined (weighted by each one's targets)."""
    from seqlab.streaming import stream_metric

    total, count = 0.0, 0
    for doc in documents:
        value, n = stream_metric(model, adapter, tensor_pieces(doc, EVAL_WINDOW), device=device, progress=progress)
        if n:
            total, count = total + value * n, count + n
    return (total / count if count else None), count
