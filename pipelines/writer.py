"""Writing one sequence in whole chunks, its committed length recorded after each (``SequenceStore.writer``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from seqlab.errors import ConfigError, InputError

from .store_format import (
    MAX_CHUNK_BYTES,
    MAX_ELEMENTS,
    SEQUENCE_VERSION,
    SequenceInfo,
    _adapter_attrs,
    _as_numpy,
    _attrs_check,
    _check_chunk_bytes,
    _check_shard_chunks,
    _fit,
    _is_int,
    _jsonable,
    _now,
    _update_attrs,
)

if TYPE_CHECKING:
    from .store import SequenceStore

__all__ = ["SequenceWriter", "append_to", "create_array"]


class SequenceWriter:
    """Streams pieces into one sequence in whole chunks (whole shards when sharded).

    Buffered elements stay under one write unit plus the piece being added; after each unit is on disk the
    committed ``length`` is recorded. ``finish()`` writes the tail, trims the array to the exact length and
    sets ``complete``. Leaving the ``with`` block by an exception leaves the sequence incomplete (resumable).
    """

    def __init__(
        self,
        store: SequenceStore,
        name: str,
        *,
        adapter=None,
        source=None,
        record=None,
        chunk_elements=None,
        chunk_bytes=None,
        shard_chunks=None,
        resume=False,
        progress=None,
    ) -> None:
        self.store, self.name, self.adapter = store, name, adapter
        self.source, self.record, self.progress = source, record, progress
        self._layout_args = (chunk_elements, chunk_bytes, shard_chunks)
        self.array = None
        self.info: SequenceInfo | None = None
        self.committed = 0
        self.skip = 0  # incoming elements already on disk (resume)
        self.seen = 0  # incoming elements so far
        self._buffer: list[np.ndarray] = []
        self._held = 0
        self.finished = False
        self.where = f"sequence store {store.where}: sequence {name!r}"
        if resume:
            array = store._array(name)
            info = store._info(name, array)
            if info.complete:
                raise InputError(f"{self.where} is complete: nothing to resume")
            unit = info.shard_elements or info.chunk_elements
            self.committed = self.skip = (info.length // unit) * unit
            self.array, self.info = array, info
        elif adapter is not None and not adapter.continuous:
            self._open(np.zeros(0, dtype=np.int64))  # token layout is known up front: visible at once

    @property
    def unit(self) -> int:
        return self.info.shard_elements or self.info.chunk_elements

    def _open(self, first: np.ndarray) -> None:
        attrs, dtype = _adapter_attrs(self.adapter, first)
        attrs.update({"source": self.source, "record": self.record})
        self.array = create_array(self.store, self.name, dtype, tuple(first.shape[1:]), attrs, *self._layout_args)
        self.info = self.store._info(self.name, self.array)

    def __enter__(self) -> SequenceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()

    def write(self, piece) -> None:
        if self.finished:
            raise InputError(f"{self.where}: the writer has finished")
        values = _as_numpy(piece, self.where)
        if self.array is None:
            self._open(values)
        values = _fit(values, self.info, self.where, self.seen)
        self.seen += values.shape[0]
        if self.skip:
            drop = min(self.skip, values.shape[0])
            values, self.skip = values[drop:], self.skip - drop
        if values.shape[0] == 0:
            return
        self._buffer.append(values)
        self._held += values.shape[0]
        if self._held >= self.unit:
            data = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            whole = (self._held // self.unit) * self.unit
            for start in range(0, whole, self.unit):
                self._put(data[start : start + self.unit])
            rest = data[whole:]
            self._buffer, self._held = ([rest.copy()] if rest.shape[0] else []), rest.shape[0]

    def _put(self, values: np.ndarray) -> None:
        start, stop = self.committed, self.committed + values.shape[0]
        if self.array.shape[0] < stop:
            # grow the capacity geometrically: few metadata rewrites; readers only trust attrs["length"]
            capacity = max(stop, min(2 * self.array.shape[0], self.array.shape[0] + 256 * self.unit))
            capacity = -(-capacity // self.unit) * self.unit
            self.array.resize((capacity, *self.info.frame_shape))
        self.array[start:stop] = values
        self.committed = stop
        _update_attrs(self.array, {"length": stop, "updated": _now()})
        if self.progress is not None:
            self.progress(stop)

    def finish(self, complete: bool = True) -> SequenceInfo:
        """Write what is buffered, trim to the exact length and mark the sequence complete (``complete=False``:
        leave that to the caller, e.g. ``ingest`` once the whole source file has been read and verified)."""
        if self.finished:
            return self.info
        if self.skip:
            raise InputError(
                f"{self.where}: the source ended after {self.seen} elements, but {self.committed} were "
                "already stored: it is not the source the incomplete sequence was started from"
            )
        if self.array is None:
            self._open(
                np.zeros(
                    (0, self.adapter.input_spec.width) if self.adapter is not None and self.adapter.continuous else 0,
                    dtype=np.float32,
                )
            )
        if self._held:
            data = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._put(data)
            self._buffer, self._held = [], 0
        if self.array.shape[0] != self.committed:
            self.array.resize((self.committed, *self.info.frame_shape))
        _update_attrs(self.array, {"length": self.committed, "complete": complete, "updated": _now()})
        self.finished = True
        self.info = self.store._info(self.name, self.array)
        return self.info


# ------------------------------------------------------------------------------------------------------
# new arrays and appends


def _layout(
    store: SequenceStore,
    dtype: np.dtype,
    frame_shape: tuple[int, ...],
    chunk_elements: int | None,
    chunk_bytes: int | None,
    shard_chunks: int | None,
) -> tuple[int, int | None]:
    """(chunk elements, shard elements or None) of a new sequence: the options given, else the store's."""
    per = max(dtype.itemsize * math.prod(frame_shape), 1)
    if chunk_elements is None:
        if chunk_bytes is not None:
            _check_chunk_bytes(chunk_bytes)
        chunk_elements = max(1, (chunk_bytes or store.chunk_bytes) // per)
    elif not _is_int(chunk_elements) or not 1 <= chunk_elements <= MAX_ELEMENTS:
        raise ConfigError(f"chunk_elements must be an int in [1, {MAX_ELEMENTS}], got {chunk_elements!r}")
    chunk_elements = int(chunk_elements)
    if chunk_elements * per > MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunk_elements={chunk_elements} of {per} bytes each make chunks over "
            f"{MAX_CHUNK_BYTES} bytes (a chunk is decoded whole in memory)"
        )
    shard_chunks = store.shard_chunks if shard_chunks is None else shard_chunks
    _check_shard_chunks(shard_chunks)
    return chunk_elements, (chunk_elements * shard_chunks if shard_chunks else None)


def create_array(
    store: SequenceStore,
    name: str,
    dtype: np.dtype,
    frame_shape: tuple[int, ...],
    attrs: dict,
    chunk_elements: int | None = None,
    chunk_bytes: int | None = None,
    shard_chunks: int | None = None,
):
    """A new empty sequence array of ``store`` (length 0, incomplete) with the seqlab ``attrs`` and checksum."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    chunk, shard = _layout(store, dtype, frame_shape, chunk_elements, chunk_bytes, shard_chunks)
    # zstd frames carry a content checksum, so a damaged chunk fails to decode instead of reading wrong
    # values; without compression a crc32c codec does the same job.
    compressors = (
        [ZstdCodec(level=store.compression_level, checksum=True)] if store.compression == "zstd" else [Crc32cCodec()]
    )
    now = _now()
    attrs = _jsonable(
        {"seqlab_sequence": SEQUENCE_VERSION, **attrs, "length": 0, "complete": False, "created": now, "updated": now}
    )
    attrs["seqlab_check"] = _attrs_check(attrs)
    return store.group.create_array(
        name,
        shape=(0, *frame_shape),
        dtype=dtype,
        chunks=(chunk, *frame_shape),
        shards=(shard, *frame_shape) if shard else None,
        compressors=compressors,
        fill_value=0,
        attributes=attrs,
        overwrite=True,
        # every chunk is written even when it is all zeros, so a missing chunk file means damage
        config={"write_empty_chunks": True},
    )


def append_to(
    store: SequenceStore,
    name: str,
    data,
    *,
    adapter=None,
    chunk_elements: int | None = None,
    chunk_bytes: int | None = None,
) -> SequenceInfo:
    """``SequenceStore.append``: data first, then the new length (a crash in between leaves the old length)."""
    values = _as_numpy(data, f"append to {name!r}")
    if name in store:
        array = store._array(name)
        info = store._info(name, array)
        if not info.complete:
            raise InputError(
                f"sequence store {store.where}: sequence {name!r} is being ingested (incomplete): "
                "finish or delete it before appending"
            )
        if adapter is not None and info.adapter is not None and _jsonable(adapter.info()) != info.adapter:
            raise InputError(
                f"sequence store {store.where}: sequence {name!r} was written by adapter "
                f"{info.adapter}, not {adapter.info()}"
            )
    else:
        spec_attrs, dtype = _adapter_attrs(adapter, values)
        frame = tuple(values.shape[1:])
        array = create_array(
            store, name, dtype, frame, {**spec_attrs, "source": None, "record": None}, chunk_elements, chunk_bytes
        )
        _update_attrs(array, {"complete": True})
        info = store._info(name, array)
    values = _fit(values, info, f"sequence store {store.where}: append to {name!r}")
    length = info.length
    new_length = length + values.shape[0]
    if values.shape[0]:
        if array.shape[0] < new_length:
            array.resize((new_length, *info.frame_shape))
        array[length:new_length] = values
    _update_attrs(array, {"length": new_length, "updated": _now()})
    return store._info(name, array)
