"""Packed training rows: documents laid end to end into rows of a fixed length, with no padding between them and
nothing crossing a document boundary (``PackedSource``, a ``seqlab.windows.WindowSource`` the ``Trainer`` runs
as packed rows). See docs/training.md, "Packing".

The documents (token ids) are concatenated into one stream; row ``r`` holds the stream's positions
``[r * window, (r + 1) * window)``, and window ``i`` the rows ``[i * batch_size, (i + 1) * batch_size)``. A
document longer than the room left in a row is split: its continuation starts the next row as a new sequence
(no state crosses rows). Inside a row every document piece is one sequence of the row's ``cu_seqlens``, so the
model resets its state at every boundary. The target of a position is the next element of the same document;
the last element of a document predicts nothing (target ``-100``, which every token loss ignores). The last
element of a row whose document goes on in the next row does have a target: the first element of the next row
(known from the data; the state still starts fresh there). Only the end of the last window is padding (input
``pad_id``, target ``-100``), less than one window per epoch.

Packing efficiency = positions that carry a trained target / all positions. ``stats()`` gives it, and that of the
padding baseline on the same documents (each document padded to whole rows of ``window``).
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from seqlab.errors import ConfigError, InputError

__all__ = ["IGNORE", "PackedSource", "PackingStats", "efficiency_text", "padded_positions"]

#: the target of a position that predicts nothing (the last element of a document, padding): ignored by the loss
IGNORE = -100


@dataclass(frozen=True)
class PackingStats:
    """Counts of a packed source: ``documents`` (non-empty ones), ``tokens`` (their elements), ``targets`` (the
    positions that carry a trained target: tokens - documents), ``positions`` (rows * window, padding included),
    ``rows``, ``windows``, ``split`` (documents cut across rows), ``window`` (row length), ``batch_size`` and
    ``padded_positions`` (the positions of the padding baseline on the same documents: each document padded
    to whole rows of ``window``, rows grouped into batches of ``batch_size``)."""

    documents: int
    tokens: int
    targets: int
    positions: int
    rows: int
    windows: int
    split: int
    window: int
    batch_size: int
    padded_positions: int

    @property
    def efficiency(self) -> float:
        """Positions that carry a trained target / all positions of the packed rows."""
        return self.targets / self.positions if self.positions else 0.0

    @property
    def padded_efficiency(self) -> float:
        """The same for the padding baseline (one document per row, padded to whole rows)."""
        return self.targets / self.padded_positions if self.padded_positions else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "efficiency": self.efficiency, "padded_efficiency": self.padded_efficiency}


def padded_positions(lengths, window: int, batch_size: int = 1) -> int:
    """Positions of the padding baseline: each document padded to whole rows of ``window`` (a longer document
    fills several rows), the rows grouped into batches of ``batch_size`` (the last batch filled up)."""
    rows = sum(-(-int(n) // window) for n in lengths if n > 0)
    return -(-rows // batch_size) * batch_size * window


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"PackedSource {name} must be a positive int, got {value!r}")
    return int(value)


def _ids(doc, where: str) -> np.ndarray:
    if isinstance(doc, torch.Tensor):
        if doc.dtype.is_floating_point or doc.dtype.is_complex or doc.dtype == torch.bool:
            raise InputError(f"{where}: packing takes integer token ids, got dtype {doc.dtype}")
        doc = doc.detach().cpu().numpy()
    doc = np.asarray(doc)
    if doc.size == 0:  # an empty list comes out float
        doc = doc.astype(np.int64)
    if doc.dtype.kind not in "iu":
        raise InputError(f"{where}: packing takes integer token ids, got dtype {doc.dtype}")
    if doc.ndim != 1:
        raise InputError(f"{where}: a document must be 1-D token ids, got shape {doc.shape}")
    return doc


class PackedSource:
    """Packed rows of documents for the ``Trainer`` (``TrainConfig(carry_state=False)``; see the module doc).

    ``data``: the documents laid end to end, 1-D token ids (a torch tensor, a numpy array or memmap, or any
    object with ``shape`` whose ``data[start:stop]`` gives ids: only the span a window needs is read);
    ``lengths``: each document's number of elements, in order (they must add up to ``data``'s length; empty
    documents are skipped). ``PackedSource.from_documents(docs, ...)`` takes a list of documents instead.

    ``window(i) -> (inputs, targets)``, both ``(batch_size, window)`` int64, targets ``-100`` where nothing is
    predicted. ``cu_seqlens(i, rows=None)``: the boundaries of window ``i``'s rows (all, or a slice of them)
    flattened into one row of ``rows * window`` positions (``[0, ..., rows * window]``, int64), what the model
    takes with the flattened inputs ``inputs[rows].reshape(1, -1)``. ``packed = True`` tells the ``Trainer``.
    """

    packed = True
    data: Any
    lengths: np.ndarray
    starts: np.ndarray
    batch_size: int
    window_size: int
    pad_id: int
    total: int
    num_windows: int
    rows: int

    def __init__(self, data, lengths, batch_size: int, window: int, *, pad_id: int = 0) -> None:
        self.batch_size, self.window_size = _count(batch_size, "batch_size"), _count(window, "window")
        if isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral) or pad_id < 0:
            raise ConfigError(f"PackedSource pad_id must be an int >= 0 (a valid input id), got {pad_id!r}")
        self.pad_id = int(pad_id)
        if isinstance(data, torch.Tensor):
            data = _ids(data, "PackedSource data")
        if not hasattr(data, "shape") or len(data.shape) != 1:
            what = tuple(data.shape) if hasattr(data, "shape") else type(data).__name__
            raise InputError(f"PackedSource data must be 1-D token ids (the documents end to end), got {what}")
        dtype = getattr(data, "dtype", None)
        if dtype is not None and getattr(dtype, "kind", "i") not in "iu":
            raise InputError(f"PackedSource data must hold integer token ids, got dtype {dtype}")
        lengths = np.asarray(list(lengths), dtype=np.int64)
        if lengths.ndim != 1 or (lengths < 0).any():
            raise InputError("PackedSource lengths must be a list of document lengths >= 0")
        lengths = lengths[lengths > 0]
        total = int(lengths.sum())
        if total != int(data.shape[0]):
            raise InputError(
                f"PackedSource lengths add up to {total} elements, the data holds {int(data.shape[0])}: each "
                "document's length, in order"
            )
        if total == 0:
            raise InputError("PackedSource: no document holds any element: nothing to train on")
        self.data, self.lengths = data, lengths
        self.total = total
        #: stream offset of every document's start, and the end
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        per_window = self.batch_size * self.window_size
        self.num_windows = -(-total // per_window)
        self.rows = self.num_windows * self.batch_size
        self._stats: PackingStats | None = None

    @classmethod
    def from_documents(cls, documents, batch_size: int, window: int, *, pad_id: int = 0) -> PackedSource:
        """Packed rows of a list of documents (each 1-D token ids: tensors, numpy arrays or lists)."""
        docs = [_ids(d, f"document {k}") for k, d in enumerate(documents)]
        if not docs:
            raise InputError("PackedSource.from_documents: no documents")
        data = np.concatenate(docs) if len(docs) > 1 else docs[0]
        return cls(data, [d.shape[0] for d in docs], batch_size, window, pad_id=pad_id)

    def __len__(self) -> int:
        return self.num_windows

    def _check(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= int(index) < self.num_windows:
            raise IndexError(f"window {index} is outside [0, {self.num_windows})")
        return int(index)

    def _read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.total)
        if stop <= start:
            return np.zeros(0, np.int64)
        piece = self.data[start:stop]
        if isinstance(piece, torch.Tensor):
            piece = piece.numpy()
        return np.asarray(piece, dtype=np.int64)

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._check(index)
        size = self.batch_size * self.window_size
        start = index * size
        ids = np.full(size + 1, self.pad_id, np.int64)
        read = self._read(start, start + size + 1)
        ids[: read.shape[0]] = read
        positions = np.arange(start, start + size)
        # a position predicts the next element unless it ends its document (or the data, or is padding)
        last = np.zeros(size, bool)
        ends = self.starts[1:] - 1  # the stream position of every document's last element
        inside = ends[(ends >= start) & (ends < start + size)] - start
        last[inside] = True
        last |= positions >= self.total
        targets = np.where(last, IGNORE, ids[1:])
        shape = (self.batch_size, self.window_size)
        return torch.from_numpy(ids[:-1].reshape(shape).copy()), torch.from_numpy(targets.reshape(shape))

    def row_starts(self, index: int) -> list[np.ndarray]:
        """For each row of window ``index``: the offsets in the row where a sequence starts (0 first; the
        padding at the data's end is a sequence of its own)."""
        index = self._check(index)
        out = []
        for r in range(self.batch_size):
            begin = (index * self.batch_size + r) * self.window_size
            end = begin + self.window_size
            inner = self.starts[(self.starts > begin) & (self.starts < end)] - begin
            out.append(np.concatenate([[0], inner]).astype(np.int64))
        return out

    def cu_seqlens(self, index: int, rows: slice | None = None) -> torch.Tensor:
        """The ``cu_seqlens`` of window ``index``'s rows (``rows``: a slice of them; default all) flattened into
        one row, int64 ``[0, ..., n_rows * window]``."""
        starts = self.row_starts(index)[rows if rows is not None else slice(None)]
        if not starts:
            raise IndexError(f"rows {rows} of window {index} select no row")
        parts = [s + r * self.window_size for r, s in enumerate(starts)]
        parts.append(np.array([len(starts) * self.window_size]))
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def stats(self) -> PackingStats:
        """The packing's counts and efficiencies (``PackingStats``), and the padding baseline's."""
        if self._stats is None:
            L = self.window_size
            first_row = self.starts[:-1] // L
            last_row = (self.starts[1:] - 1) // L
            self._stats = PackingStats(
                documents=int(self.lengths.shape[0]),
                tokens=self.total,
                targets=self.total - int(self.lengths.shape[0]),
                positions=self.rows * L,
                rows=self.rows,
                windows=self.num_windows,
                split=int((last_row > first_row).sum()),
                window=L,
                batch_size=self.batch_size,
                padded_positions=padded_positions(self.lengths, L, self.batch_size),
            )
        return self._stats

    @property
    def efficiency(self) -> float:
        return self.stats().efficiency

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"PackedSource({s.documents} documents, {s.tokens} elements, {s.windows} windows of {self.batch_size} x "
            f"{self.window_size}, efficiency {s.efficiency:.3f}, padded {s.padded_efficiency:.3f})"
        )


def efficiency_text(stats: PackingStats | dict) -> str:
    """``packing 98.7% of positions trained (padding to whole rows: 41.2%), 512 documents, 37 split``."""
    s = stats.to_dict() if isinstance(stats, PackingStats) else stats
    return (
        f"packing {100 * s['efficiency']:.1f}% of positions trained (padding each document to whole rows: "
        f"{100 * s['padded_efficiency']:.1f}%), {s['documents']} documents, {s['split']} split across rows"
    )
