"""Reading one stored sequence a chunk at a time (``SequenceStore.reader``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from seqlab.errors import CorruptFileError, InputError

if TYPE_CHECKING:
    from .store import SequenceStore

__all__ = ["SequenceReader"]


class SequenceReader:
    """Reads windows of one sequence chunk by chunk, keeping the last ``cache_chunks`` decoded chunks, so a
    forward walk decodes every chunk once and holds at most ``cache_chunks`` of them. ``chunk_reads`` counts
    decoded chunks. Errors name the store, the sequence and the position range."""

    def __init__(self, store: SequenceStore, name: str, allow_incomplete: bool = False, cache_chunks: int = 2):
        self.store, self.name = store, name
        self.array = store._array(name)
        self.info = store._info(name, self.array)
        self.where = f"sequence store {store.where}: sequence {name!r}"
        if not self.info.complete and not allow_incomplete:
            raise InputError(
                f"{self.where} is incomplete (its writer stopped after {self.info.length} elements): "
                "run the ingest again to finish it, or pass allow_incomplete=True"
            )
        self.length = self.info.length
        self.chunk = self.info.chunk_elements
        self.cache_chunks = max(1, int(cache_chunks))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.chunk_reads = 0
        self.max_cached = 0

    def _storage_key(self, index: int) -> str:
        per_file = (self.info.shard_elements or self.chunk) // self.chunk
        coords = (index // per_file,) + (0,) * len(self.info.frame_shape)
        prefix = self.array.store_path.path
        key = self.array.metadata.encode_chunk_key(coords)
        return f"{prefix}/{key}" if prefix else key

    def _missing(self, index: int) -> bool:
        try:
            from zarr.core.sync import sync

            return not sync(self.array.store_path.store.exists(self._storage_key(index)))
        except Exception:  # noqa: BLE001 - a store without exists(): cannot tell, trust the data
            return False

    def _chunk(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        lo, hi = index * self.chunk, min((index + 1) * self.chunk, self.length)
        try:
            values = np.asarray(self.array[lo:hi])
        except Exception as exc:  # noqa: BLE001 - the codecs raise RuntimeError, ValueError, ...
            raise CorruptFileError(
                f"{self.where}: chunk {index} (positions [{lo}, {hi})) cannot be decoded: {type(exc).__name__}: {exc}"
            ) from None
        if not values.any() and self._missing(index):
            raise CorruptFileError(f"{self.where}: chunk {index} (positions [{lo}, {hi})) is missing from the store")
        self.chunk_reads += 1
        self._cache[index] = values
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        self.max_cached = max(self.max_cached, len(self._cache))
        return values

    def read(self, start: int, stop: int, raw: bool = False):
        """Elements ``[start, stop)``: LongTensor ids / float32 frames (``raw=True``: the stored numpy array)."""
        for value, what in ((start, "start"), (stop, "stop")):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"{self.where}: {what} must be an int, got {value!r}")
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.length:
            raise InputError(
                f"{self.where}: window [{start}, {stop}) is out of range: the sequence holds {self.length} elements"
            )
        if start == stop:
            values = np.zeros((0, *self.info.frame_shape), dtype=self.info.dtype)
        else:
            first, last = start // self.chunk, (stop - 1) // self.chunk
            parts = []
            for index in range(first, last + 1):
                base = index * self.chunk
                parts.append(self._chunk(index)[max(start - base, 0) : stop - base])
            values = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return values if raw else self.to_tensor(values)

    def to_tensor(self, values: np.ndarray) -> torch.Tensor:
        if self.info.kind == "tokens":
            return torch.from_numpy(values.astype(np.int64))
        return torch.from_numpy(np.array(values, dtype=np.float32))
