"""Sequence stores: encoded signals (token ids or continuous frames) in a Zarr v3 group, one array per sequence.

Layout (see docs/stores.md)::

    genome.zarr/                 Zarr v3 group; attrs["seqlab_store"] = {"format", "version", "created"}
      chr1/                      one array per sequence: (length,) token ids or (length, *frame) floats
        zarr.json                shape, chunks, codecs (bytes -> zstd with frame checksums) and the attrs below
        c/0  c/1  ...            chunk files (or shard files), written whole, each replace atomic

Per-sequence attrs and their checks: ``store_format``. The store itself is ``SequenceStore`` (this module);
``SequenceWriter`` (writer.py) and ``SequenceReader`` (reader.py) move data in and out a chunk at a time,
``ingest`` (store_ingest.py) fills a store from files, ``StoreSource`` (sources.py) trains from one.

Crash semantics: writers fill whole chunks (whole shards when sharded) in order and record the committed
``length`` in the attrs after each one; ``complete`` turns True only after the last chunk and the final
length are written. A killed writer leaves a readable store whose sequence says ``complete: False`` with a
chunk-aligned ``length``. Readers trust only ``length``: elements past it (a capacity reserved by the
writer) are never returned. The seqlab attrs carry a CRC32 (``seqlab_check``); a sequence whose metadata is
unreadable is left out of ``list()`` with a warning and named by ``damaged()``. Different sequences are
different folders, so processes writing different sequences at once do not touch each other's files (one
writer per sequence at a time).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seqlab.errors import ConfigError, CorruptFileError, FormatVersionError, InputError, SeqlabError

from .reader import SequenceReader
from .store_format import (
    _NAME,
    DEFAULT_CHUNK_BYTES,
    STORE_FORMAT,
    STORE_VERSION,
    DamagedSequenceWarning,
    SequenceInfo,
    _check_chunk_bytes,
    _check_name,
    _check_shard_chunks,
    _is_int,
    _now,
    sequence_info,
    sequence_name,
)
from .writer import SequenceWriter, append_to

if TYPE_CHECKING:
    from .sources import StoreSource

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DamagedSequenceWarning",
    "SequenceInfo",
    "SequenceReader",
    "SequenceStore",
    "SequenceWriter",
    "open_store",
    "sequence_name",
]

#: names this module held before it was split by job (docs/architecture.md), still importable from it
_MOVED = {
    "StoreSource": "sources",
    "check_model_fits": "sources",
    "ingest": "store_ingest",
    "IngestResult": "store_ingest",
    "IngestProgress": "store_ingest",
}


def __getattr__(name: str):
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __package__), name)


# ------------------------------------------------------------------------------------------------------
# the store


def open_store(store, mode: str = "r", **options) -> SequenceStore:
    """``store`` itself when it is a SequenceStore, else ``SequenceStore(store, mode, **options)``."""
    if isinstance(store, SequenceStore):
        return store
    return SequenceStore(store, mode=mode, **options)


class SequenceStore:
    """A Zarr v3 group of sequences.

    ``store``: a local directory path (the default kind), or anything ``zarr.open_group`` accepts (a
    ``zarr.storage.ZipStore``, ``MemoryStore``, an fsspec URL with ``storage_options``). ``mode``: ``"r"`` the
    store must exist, read only; ``"a"`` open or create; ``"w"`` create, deleting what was there.
    ``chunk_bytes`` (about 1-4 MB is good), ``shard_chunks`` (chunks per shard file, None: no sharding),
    ``compression`` (``"zstd"`` or None) and ``compression_level`` are the defaults for new sequences.
    """

    def __init__(
        self,
        store,
        mode: str = "a",
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        shard_chunks: int | None = None,
        compression: str | None = "zstd",
        compression_level: int = 3,
        storage_options: dict | None = None,
    ) -> None:
        import zarr
        from zarr.errors import ContainsGroupError

        if mode not in ("r", "a", "w"):
            raise ConfigError(f"SequenceStore mode must be 'r', 'a' or 'w', got {mode!r}")
        _check_chunk_bytes(chunk_bytes)
        _check_shard_chunks(shard_chunks)
        if compression not in ("zstd", None):
            raise ConfigError(f"compression must be 'zstd' or None, got {compression!r}")
        if not _is_int(compression_level) or not 1 <= compression_level <= 22:
            raise ConfigError(f"compression_level must be an int in [1, 22] (zstd levels), got {compression_level!r}")
        self.chunk_bytes, self.shard_chunks = chunk_bytes, shard_chunks
        self.compression, self.compression_level = compression, int(compression_level)
        self.mode = mode
        if isinstance(store, (str, os.PathLike)):
            self.where = os.fspath(store)
            local = "://" not in self.where
        else:
            self.where = getattr(store, "path", None) or getattr(store, "root", None) or repr(store)
            self.where = os.fspath(self.where) if isinstance(self.where, (os.PathLike,)) else str(self.where)
            local = False
        if isinstance(store, (str, os.PathLike)) and self.where.startswith("file://"):
            # fsspec's local filesystem does not create parent folders unless asked; local paths do
            storage_options = {"auto_mkdir": True, **(storage_options or {})}
        if local and mode == "r" and not Path(self.where, "zarr.json").is_file():
            what = "does not exist" if not Path(self.where).exists() else "is not a Zarr v3 group (no zarr.json)"
            raise InputError(f"sequence store {self.where} {what}")
        try:
            if mode == "w":
                self.group = zarr.open_group(
                    store, mode="w", zarr_format=3, storage_options=storage_options, attributes=self._store_attrs()
                )
            elif mode == "a":
                # the marker goes in with the group's creation (one atomic zarr.json), so processes that
                # create the same store at once all find it
                try:
                    self.group = zarr.open_group(
                        store, mode="a", zarr_format=3, storage_options=storage_options, attributes=self._store_attrs()
                    )
                except ContainsGroupError:  # another process created it between zarr's look and its create
                    self.group = zarr.open_group(store, mode="r+", storage_options=storage_options)
                if "seqlab_store" not in self.group.attrs and not any(True for _ in self._member_names()):
                    self.group.update_attributes(self._store_attrs())  # an empty plain group: adopt it
            else:
                self.group = zarr.open_group(store, mode="r", storage_options=storage_options)
        except (FileNotFoundError, KeyError) as exc:
            raise InputError(f"sequence store {self.where} does not exist or cannot be opened: {exc}") from None
        except (SeqlabError, OSError):
            raise  # PermissionError and the like: the CLI names them
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds (JSON, validation, TypeError ...)
            raise CorruptFileError(
                f"sequence store {self.where}: {self.where}/zarr.json: group metadata is "
                f"unreadable: {type(exc).__name__}: {exc}"
            ) from None
        try:
            marker = self.group.attrs.get("seqlab_store")
        except Exception as exc:  # noqa: BLE001
            raise CorruptFileError(
                f"sequence store {self.where}: {self.where}/zarr.json: attributes are unreadable: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(marker, dict) or marker.get("format") != STORE_FORMAT:
            raise InputError(
                f"{self.where} is a Zarr group but not a seqlab sequence store "
                f"(no attrs['seqlab_store'] in {self.where}/zarr.json)"
            )
        version = marker.get("version")
        if not _is_int(version) or version < 1:
            raise CorruptFileError(
                f"sequence store {self.where}: {self.where}/zarr.json: attrs['seqlab_store']"
                f"['version'] is {version!r}, not a format version"
            )
        if version > STORE_VERSION:
            raise FormatVersionError(
                f"sequence store {self.where} has format version {version}, this seqlab reads up to {STORE_VERSION}"
            )

    @staticmethod
    def _store_attrs() -> dict:
        return {"seqlab_store": {"format": STORE_FORMAT, "version": STORE_VERSION, "created": _now()}}

    def __repr__(self) -> str:
        return f"SequenceStore({self.where!r}, mode={self.mode!r})"

    def _writable(self) -> None:
        if self.mode == "r":
            raise InputError(f"sequence store {self.where} was opened read-only (mode='r')")

    # -- raw keys --------------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.group.store_path.path, *parts) if p)

    def _get_bytes(self, *parts: str) -> bytes | None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        try:
            buffer = sync(self.group.store_path.store.get(self._key(*parts), prototype=default_buffer_prototype()))
        except (IsADirectoryError, NotADirectoryError):
            return None
        return None if buffer is None else buffer.to_bytes()

    def _children(self) -> list[str]:
        from zarr.core.sync import sync

        store, prefix = self.group.store_path.store, self._key()

        async def collect():
            return [child async for child in store.list_dir(prefix)]

        return sorted(set(sync(collect())))

    def metadata_file(self, name: str | None = None) -> str:
        """Where the metadata of a sequence (or, without a name, of the store) lives."""
        return f"{self.where}/{name}/zarr.json" if name else f"{self.where}/zarr.json"

    def _node_type(self, name: str) -> str | None:
        """``"array"``, ``"group"``, ``"damaged"`` (metadata that is not a JSON node description) or None (no
        metadata: not a node, e.g. a folder left by a writer killed before its first metadata write)."""
        raw = self._get_bytes(name, "zarr.json")
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, absurd nesting
            return "damaged"
        kind = meta.get("node_type") if isinstance(meta, dict) else None
        return kind if kind in ("array", "group") else "damaged"

    # -- listing -----------------------------------------------------------------------------------------
    def _member_names(self) -> Iterator[str]:
        """Names of the sequences, healthy or damaged (not validated)."""
        for child in self._children():
            if _NAME.match(child) and self._node_type(child) in ("array", "damaged"):
                yield child

    def _scan(self) -> tuple[dict[str, SequenceInfo], dict[str, str]]:
        healthy, damaged = {}, {}
        for name in self._member_names():
            try:
                healthy[name] = self.describe(name)
            except (CorruptFileError, InputError) as exc:
                damaged[name] = str(exc)
        return healthy, damaged

    def list(self, incomplete: bool = True) -> list[str]:
        """Sorted sequence names; ``incomplete=False`` leaves out sequences whose writer has not finished.

        Sequences whose metadata is damaged are left out with a ``DamagedSequenceWarning`` naming them;
        ``damaged()`` says what is wrong with each."""
        healthy, damaged = self._scan()
        if damaged:
            warnings.warn(
                f"sequence store {self.where}: {len(damaged)} damaged sequence(s) left out of the list: "
                f"{', '.join(sorted(damaged))} (SequenceStore.damaged() says why)",
                DamagedSequenceWarning,
                stacklevel=2,
            )
        return sorted(n for n, info in healthy.items() if incomplete or info.complete)

    def damaged(self) -> dict[str, str]:
        """``{name: what is wrong}`` for every sequence whose metadata cannot be read (``list`` leaves them out;
        ``describe``/``read`` raise CorruptFileError naming the file; ``delete`` removes them)."""
        return self._scan()[1]

    def __contains__(self, name: str) -> bool:
        """True when a sequence of that name is stored (damaged or not)."""
        return isinstance(name, str) and bool(_NAME.match(name)) and self._node_type(name) in ("array", "damaged")

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def _array(self, name: str):
        import zarr

        _check_name(name)
        node_type = self._node_type(name)
        if node_type is None:
            held = sorted(self._member_names())
            shown = ", ".join(held[:10]) + (f", ... ({len(held)} in all)" if len(held) > 10 else "")
            raise InputError(f"sequence store {self.where} has no sequence {name!r} (it holds: {shown or 'none'})")
        if node_type == "group":
            raise InputError(f"sequence store {self.where}: {name!r} is a group, not a sequence")
        file = self.metadata_file(name)
        if node_type == "damaged":
            raise CorruptFileError(
                f"sequence store {self.where}: sequence {name!r}: metadata is unreadable: {file} "
                "is not a JSON array description (empty, cut short or altered): ingest it "
                "again with overwrite=True (seqlab ingest --overwrite), or delete it "
                "(SequenceStore.delete)"
            )
        try:
            node = self.group[name]
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for a damaged zarr.json
            raise CorruptFileError(
                f"sequence store {self.where}: sequence {name!r}: metadata is unreadable: {file}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(node, zarr.Array):
            raise InputError(f"sequence store {self.where}: {name!r} is a group, not a sequence")
        return node

    def describe(self, name: str) -> SequenceInfo:
        return self._info(name, self._array(name))

    def _info(self, name: str, array) -> SequenceInfo:
        file = self.metadata_file(name)
        try:
            attrs = dict(array.attrs)
            shape, chunks = tuple(int(n) for n in array.shape), tuple(int(n) for n in array.chunks)
            dtype = np.dtype(array.dtype)
            shards = getattr(array, "shards", None)
        except Exception as exc:  # noqa: BLE001
            raise CorruptFileError(
                f"sequence store {self.where}: sequence {name!r}: metadata is unreadable: {file}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        return sequence_info(name, attrs, shape, chunks, dtype, shards, store=self.where, file=file)

    def delete(self, name: str) -> None:
        """Remove a sequence and all its chunks (a damaged one too)."""
        self._writable()
        if name not in self:
            self._array(name)  # the InputError naming what the store holds
        self._delete_node(name)

    def _delete_node(self, name: str) -> None:
        from zarr.core.sync import sync

        sync(self.group.store_path.store.delete_dir(self._key(name)))

    # -- reading -----------------------------------------------------------------------------------------
    def reader(self, name: str, allow_incomplete: bool = False, cache_chunks: int = 2) -> SequenceReader:
        """A reader of one sequence that decodes each chunk once while windows move forward."""
        return SequenceReader(self, name, allow_incomplete=allow_incomplete, cache_chunks=cache_chunks)

    def read(
        self, name: str, start: int = 0, stop: int | None = None, *, allow_incomplete: bool = False, raw: bool = False
    ):
        """Elements ``[start, stop)`` of a sequence: a LongTensor of ids or a float32 tensor of frames
        (``raw=True``: the stored numpy array)."""
        reader = self.reader(name, allow_incomplete=allow_incomplete, cache_chunks=1)
        return reader.read(start, reader.length if stop is None else stop, raw=raw)

    def source(
        self,
        names,
        batch_size: int,
        window: int,
        *,
        model=None,
        allow_incomplete: bool = False,
        cache_chunks: int | None = None,
    ) -> StoreSource:
        """A training source (``Trainer(model, config, store.source(...))``); see ``StoreSource``."""
        from .sources import StoreSource

        return StoreSource(
            self, names, batch_size, window, model=model, allow_incomplete=allow_incomplete, cache_chunks=cache_chunks
        )

    # -- writing -----------------------------------------------------------------------------------------
    def writer(
        self,
        name: str,
        *,
        adapter=None,
        source: dict | None = None,
        record: str | None = None,
        chunk_elements: int | None = None,
        chunk_bytes: int | None = None,
        shard_chunks: int | None = None,
        resume: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> SequenceWriter:
        """A chunk-aligned writer of a new sequence (``resume=True``: continue an incomplete one after its
        committed length, skipping that many incoming elements). Use as a context manager or call ``finish``."""
        self._writable()
        _check_name(name)
        return SequenceWriter(
            self,
            name,
            adapter=adapter,
            source=source,
            record=record,
            chunk_elements=chunk_elements,
            chunk_bytes=chunk_bytes,
            shard_chunks=shard_chunks,
            resume=resume,
            progress=progress,
        )

    def write(self, name: str, windows: Iterable, **options) -> SequenceInfo:
        """Write a whole sequence from an iterable of windows (tensors or arrays); returns its description."""
        with self.writer(name, **options) as w:
            for piece in windows:
                w.write(piece)
        return self.describe(name)

    def append(
        self, name: str, data, *, adapter=None, chunk_elements: int | None = None, chunk_bytes: int | None = None
    ) -> SequenceInfo:
        """Append elements to a growing sequence (created on first use; agent streams). Each call is committed
        when it returns: data first, then the new length (a crash in between leaves the old length)."""
        self._writable()
        _check_name(name)
        return append_to(self, name, data, adapter=adapter, chunk_elements=chunk_elements, chunk_bytes=chunk_bytes)
