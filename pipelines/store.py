"""Sequence stores: encoded signals (token ids or continuous frames) in a Zarr v3 group, one array per sequence.

Layout (see docs/stores.md)::

    genome.zarr/                 Zarr v3 group; attrs["seqlab_store"] = {"format", "version", "created"}
      chr1/                      one array per sequence: (length,) token ids or (length, *frame) floats
        zarr.json                shape, chunks, codecs (bytes -> zstd with frame checksums) and the attrs below
        c/0  c/1  ...            chunk files (or shard files), written whole, each replace atomic

Per-sequence attrs: ``seqlab_sequence`` (format version), ``seqlab_check`` (CRC32 of these attrs), ``domain``,
``adapter`` (``{"name", "settings"}``), ``kind`` and ``vocab_size``, ``source`` (path, size, mtime, sha256),
``record``, ``length`` (elements committed), ``complete``, ``created``, ``updated``.

Crash semantics: writers fill whole chunks (whole shards when sharded) in order and record the committed
``length`` in the attrs after each one; ``complete`` turns True only after the last chunk and the final
length are written. A killed writer leaves a readable store whose sequence says ``complete: False`` with a
chunk-aligned ``length``; ``ingest`` run again on the same source resumes after that length (a changed source
is replaced). ``ingest`` marks the sequences of an input file complete only after the adapter has read the
whole file (end-of-stream checks such as a gzip CRC included); a failure in the middle of a file removes what
it wrote for that file, and a replacement waits in the ``_seqlab_staging`` group until then, so the old
sequence survives a failed one. Readers trust only ``length``: elements past it (a capacity reserved by the
writer) are never returned. The seqlab attrs carry a CRC32 (``seqlab_check``); a sequence whose metadata is
unreadable is left out of ``list()`` with a warning and named by ``damaged()``. Different sequences are
different folders, so processes writing different sequences at once do not touch each other's files (one
writer per sequence at a time).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from seqlab.errors import ConfigError, CorruptFileError, FormatVersionError, InputError, SeqlabError

STORE_FORMAT = "seqlab.sequence_store"
STORE_VERSION = 1
SEQUENCE_VERSION = 2  # 2: the seqlab attrs carry a checksum (seqlab_check); 1 is still read
DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_INGEST_WINDOW = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: the group holding sequences an ingest is replacing until their source file is verified (never a sequence name)
STAGING = "_seqlab_staging"
#: the smallest chunk ``chunk_bytes`` may ask for (smaller chunks mean thousands of tiny files and slow reads)
MIN_CHUNK_BYTES = 1024
#: the largest chunk (a chunk is decoded whole in memory)
MAX_CHUNK_BYTES = 1 << 30
#: the largest ``window`` / ``chunk_elements``
MAX_ELEMENTS = 1 << 30
#: the most chunks per shard file
MAX_SHARD_CHUNKS = 1 << 16

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DamagedSequenceWarning",
    "IngestProgress",
    "IngestResult",
    "SequenceInfo",
    "SequenceReader",
    "SequenceStore",
    "SequenceWriter",
    "StoreSource",
    "check_model_fits",
    "ingest",
    "open_store",
    "sequence_name",
]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    """What a value becomes after a trip through JSON attrs (tuples -> lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def sequence_name(text: str) -> str:
    """A valid sequence name from free text (a file stem, a FASTA record id): unsafe characters become '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).lstrip("._-")[:200]
    return name or "sequence"


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"sequence name {name!r} is not valid: use letters, digits, '.', '_', '-' (first a letter "
                         "or digit, at most 200); seqlab.pipelines.store.sequence_name(text) makes one")
    return name


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


#: the attrs ``seqlab_check`` covers (others, e.g. a job's, may be added without it)
_CHECKED = ("seqlab_sequence", "domain", "adapter", "kind", "vocab_size", "source", "record", "length", "complete",
            "created", "updated")


def _attrs_check(attrs: dict) -> str:
    """CRC32 of the seqlab attrs: a bit flip that leaves zarr.json valid JSON still shows."""
    core = json.dumps({k: attrs.get(k) for k in _CHECKED}, sort_keys=True, separators=(",", ":"), default=str)
    return f"crc32:{zlib.crc32(core.encode()):08x}"


def _update_attrs(array, updates: dict) -> None:
    """Update seqlab attrs of a sequence array and their checksum, in one metadata write."""
    merged = {**dict(array.attrs), **updates}
    array.update_attributes({**updates, "seqlab_check": _attrs_check(merged)})


def _check_chunk_bytes(value) -> None:
    if not _is_int(value) or not MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES:
        raise ConfigError(f"chunk_bytes must be an int in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {value!r} "
                          "(about 1-4 MB reads well)")


def _check_shard_chunks(value) -> None:
    if value is not None and (not _is_int(value) or not 1 <= value <= MAX_SHARD_CHUNKS):
        raise ConfigError(f"shard_chunks must be None or an int in [1, {MAX_SHARD_CHUNKS}], got {value!r}")


class DamagedSequenceWarning(UserWarning):
    """``SequenceStore.list`` left out sequences whose metadata cannot be read (``SequenceStore.damaged()``)."""


def _token_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.int32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


# ------------------------------------------------------------------------------------------------------
# descriptions


@dataclass(frozen=True)
class SequenceInfo:
    """What ``SequenceStore.describe`` says about one sequence (its attrs plus the array layout)."""

    name: str
    length: int
    complete: bool
    kind: str                      # "tokens" or "continuous"
    dtype: str                     # stored dtype
    frame_shape: tuple[int, ...]   # () for token ids, (width,) or (h, w, c) ... for frames
    chunk_elements: int
    shard_elements: int | None
    domain: str | None
    adapter: dict | None
    vocab_size: int | None
    source: dict | None
    record: str | None
    created: str | None
    updated: str | None
    attrs: dict = field(repr=False, default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.length, *self.frame_shape)


@dataclass(frozen=True)
class IngestProgress:
    """Passed to an ``ingest`` progress callback after every committed chunk and at the end of each sequence."""

    path: str
    sequence: str
    elements: int          # elements committed to the sequence so far
    done: bool


@dataclass(frozen=True)
class IngestResult:
    """One sequence written by ``ingest``: ``action`` is "written", "resumed", "replaced" or "skipped"."""

    name: str
    action: str
    resumed_from: int
    info: SequenceInfo


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

    def __init__(self, store, mode: str = "a", *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 shard_chunks: int | None = None, compression: str | None = "zstd", compression_level: int = 3,
                 storage_options: dict | None = None) -> None:
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
                self.group = zarr.open_group(store, mode="w", zarr_format=3, storage_options=storage_options,
                                             attributes=self._store_attrs())
            elif mode == "a":
                # the marker goes in with the group's creation (one atomic zarr.json), so processes that
                # create the same store at once all find it
                try:
                    self.group = zarr.open_group(store, mode="a", zarr_format=3, storage_options=storage_options,
                                                 attributes=self._store_attrs())
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
            raise CorruptFileError(f"sequence store {self.where}: {self.where}/zarr.json: group metadata is "
                                   f"unreadable: {type(exc).__name__}: {exc}") from None
        try:
            marker = self.group.attrs.get("seqlab_store")
        except Exception as exc:  # noqa: BLE001
            raise CorruptFileError(f"sequence store {self.where}: {self.where}/zarr.json: attributes are unreadable: "
                                   f"{type(exc).__name__}: {exc}") from None
        if not isinstance(marker, dict) or marker.get("format") != STORE_FORMAT:
            raise InputError(f"{self.where} is a Zarr group but not a seqlab sequence store "
                             f"(no attrs['seqlab_store'] in {self.where}/zarr.json)")
        version = marker.get("version")
        if not _is_int(version) or version < 1:
            raise CorruptFileError(f"sequence store {self.where}: {self.where}/zarr.json: attrs['seqlab_store']"
                                   f"['version'] is {version!r}, not a format version")
        if version > STORE_VERSION:
            raise FormatVersionError(f"sequence store {self.where} has format version {version}, "
                                     f"this seqlab reads up to {STORE_VERSION}")

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
            warnings.warn(f"sequence store {self.where}: {len(damaged)} damaged sequence(s) left out of the list: "
                          f"{', '.join(sorted(damaged))} (SequenceStore.damaged() says why)",
                          DamagedSequenceWarning, stacklevel=2)
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
            raise CorruptFileError(f"sequence store {self.where}: sequence {name!r}: metadata is unreadable: {file} "
                                   "is not a JSON array description (empty, cut short or altered): ingest it "
                                   "again with overwrite=True (seqlab ingest --overwrite), or delete it "
                                   "(SequenceStore.delete)")
        try:
            node = self.group[name]
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for a damaged zarr.json
            raise CorruptFileError(f"sequence store {self.where}: sequence {name!r}: metadata is unreadable: {file}: "
                                   f"{type(exc).__name__}: {exc}") from None
        if not isinstance(node, zarr.Array):
            raise InputError(f"sequence store {self.where}: {name!r} is a group, not a sequence")
        return node

    def describe(self, name: str) -> SequenceInfo:
        return self._info(name, self._array(name))

    def _info(self, name: str, array) -> SequenceInfo:
        file = self.metadata_file(name)
        where = f"sequence store {self.where}: sequence {name!r}: {file}"
        try:
            attrs = dict(array.attrs)
            shape, chunks = tuple(int(n) for n in array.shape), tuple(int(n) for n in array.chunks)
            dtype = np.dtype(array.dtype)
            shards = getattr(array, "shards", None)
        except Exception as exc:  # noqa: BLE001
            raise CorruptFileError(f"sequence store {self.where}: sequence {name!r}: metadata is unreadable: {file}: "
                                   f"{type(exc).__name__}: {exc}") from None
        if "seqlab_sequence" not in attrs or "length" not in attrs:
            raise CorruptFileError(f"sequence store {self.where}: sequence {name!r}: {file}: a Zarr array without "
                                   "seqlab sequence attrs (seqlab_sequence, length, complete, ...)")

        def bad(attr: str, what: str) -> CorruptFileError:
            return CorruptFileError(f"{where}: attr {attr!r} is {attrs.get(attr)!r}, {what}")

        version = attrs["seqlab_sequence"]
        if not _is_int(version) or version < 1:
            raise bad("seqlab_sequence", "not a format version")
        if version > SEQUENCE_VERSION:
            raise FormatVersionError(f"{where}: sequence format version {version}, this seqlab reads up to "
                                     f"{SEQUENCE_VERSION}")
        if version >= 2 or "seqlab_check" in attrs:
            if attrs.get("seqlab_check") != _attrs_check(attrs):
                raise CorruptFileError(f"{where}: the seqlab attrs do not match their checksum (seqlab_check "
                                       f"{attrs.get('seqlab_check')!r}): the file was damaged or edited")
        length = attrs["length"]
        if not _is_int(length) or length < 0:
            raise bad("length", "not a count of elements")
        if not shape:
            raise CorruptFileError(f"{where}: the array is 0-dimensional, not a sequence")
        if length > shape[0]:
            raise CorruptFileError(f"sequence store {self.where}: sequence {name!r} records length {length} but its "
                                   f"array holds only {shape[0]} elements ({file})")
        if not isinstance(attrs.get("complete"), bool):
            raise bad("complete", "not true or false")
        kind = attrs.get("kind")
        if kind not in ("tokens", "continuous"):
            raise bad("kind", "not 'tokens' or 'continuous'")
        if dtype.kind not in ("iu" if kind == "tokens" else "f"):
            raise CorruptFileError(f"{where}: a {kind} sequence stored as {dtype}")
        vocab = attrs.get("vocab_size")
        if vocab is not None and (not _is_int(vocab) or vocab < 1):
            raise bad("vocab_size", "not a vocabulary size")
        adapter = attrs.get("adapter")
        if adapter is not None and not (isinstance(adapter, dict) and isinstance(adapter.get("name"), str)):
            raise bad("adapter", "not an adapter description ({'name', 'settings'})")
        for attr in ("domain", "record", "created", "updated"):
            if attrs.get(attr) is not None and not isinstance(attrs[attr], str):
                raise bad(attr, "not a string")
        if attrs.get("source") is not None and not isinstance(attrs["source"], dict):
            raise bad("source", "not a file description")
        return SequenceInfo(
            name=name, length=int(length), complete=attrs["complete"], kind=kind,
            dtype=str(dtype), frame_shape=shape[1:],
            chunk_elements=chunks[0], shard_elements=int(shards[0]) if shards else None,
            domain=attrs.get("domain"), adapter=adapter, vocab_size=vocab,
            source=attrs.get("source"), record=attrs.get("record"), created=attrs.get("created"),
            updated=attrs.get("updated"), attrs=attrs)

    def delete(self, name: str) -> None:
        """Remove a sequence and all its chunks (a damaged one too)."""
        self._writable()
        if name not in self:
            self._array(name)  # the InputError naming what the store holds
        self._delete_node(name)

    def _delete_node(self, name: str) -> None:
        from zarr.core.sync import sync

        sync(self.group.store_path.store.delete_dir(self._key(name)))

    # -- staged replacements (ingest) --------------------------------------------------------------------
    def _staging(self) -> SequenceStore:
        """The same store rooted at its staging group, where ``ingest`` writes a replacement of a sequence
        until its source file is verified (the group's name is not a sequence name: never listed)."""
        sub = object.__new__(SequenceStore)
        sub.__dict__.update(self.__dict__)
        try:
            sub.group = self.group.require_group(STAGING)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged zarr.json of the staging group
            raise CorruptFileError(f"sequence store {self.where}: {self.where}/{STAGING}/zarr.json is unreadable "
                                   f"({type(exc).__name__}: {exc}); the {STAGING} group holds only replacements "
                                   "in progress: remove it if no ingest is running") from None
        sub.where = f"{self.where}/{STAGING}"
        return sub

    def _local_dir(self, *parts: str) -> Path | None:
        from zarr.storage import LocalStore

        store = self.group.store_path.store
        return Path(store.root, self._key(*parts)) if isinstance(store, LocalStore) else None

    def _swap_in(self, staging: SequenceStore, name: str) -> None:
        """Put the staged (verified, complete) sequence ``name`` in place of the stored one.

        Local stores: two renames (the old folder aside, the new one in), then the old one is removed; a kill
        between them leaves the old one in the staging group, put back by the next ingest of that name.
        Other stores: the old keys are deleted and the new ones copied, metadata last."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        final, staged = self._local_dir(name), staging._local_dir(name)
        if final is not None and staged is not None:
            aside = staging._local_dir(f"{name}.replaced")
            if aside.exists():
                shutil.rmtree(aside)
            had = final.exists()
            if had:
                os.rename(final, aside)
            os.rename(staged, final)
            if had:
                shutil.rmtree(aside, ignore_errors=True)
            return
        store = self.group.store_path.store
        source_prefix = staging._key(name) + "/"

        async def keys():
            return [key async for key in store.list_prefix(source_prefix)]

        found = sorted(sync(keys()), key=lambda key: key.endswith("zarr.json"))  # metadata last
        if name in self:
            self._delete_node(name)
        for key in found:
            data = sync(store.get(key, prototype=default_buffer_prototype()))
            sync(store.set(self._key(name, key[len(source_prefix):]), data))
        staging._delete_node(name)

    def _recover(self, name: str) -> None:
        """Put back a sequence left aside by an ingest killed in the middle of ``_swap_in`` (local stores)."""
        final = self._local_dir(name)
        if final is None or final.exists() or not self._local_dir(STAGING).is_dir():
            return
        aside = self._local_dir(STAGING, f"{name}.replaced")
        if aside.is_dir():
            os.rename(aside, final)

    # -- reading -----------------------------------------------------------------------------------------
    def reader(self, name: str, allow_incomplete: bool = False, cache_chunks: int = 2) -> SequenceReader:
        """A reader of one sequence that decodes each chunk once while windows move forward."""
        return SequenceReader(self, name, allow_incomplete=allow_incomplete, cache_chunks=cache_chunks)

    def read(self, name: str, start: int = 0, stop: int | None = None, *, allow_incomplete: bool = False,
             raw: bool = False):
        """Elements ``[start, stop)`` of a sequence: a LongTensor of ids or a float32 tensor of frames
        (``raw=True``: the stored numpy array)."""
        reader = self.reader(name, allow_incomplete=allow_incomplete, cache_chunks=1)
        return reader.read(start, reader.length if stop is None else stop, raw=raw)

    def source(self, names, batch_size: int, window: int, *, model=None, allow_incomplete: bool = False,
               cache_chunks: int | None = None) -> StoreSource:
        """A training source (``Trainer(model, config, store.source(...))``); see ``StoreSource``."""
        return StoreSource(self, names, batch_size, window, model=model, allow_incomplete=allow_incomplete,
                           cache_chunks=cache_chunks)

    # -- writing -----------------------------------------------------------------------------------------
    def _layout(self, dtype: np.dtype, frame_shape: tuple[int, ...], chunk_elements: int | None,
                chunk_bytes: int | None, shard_chunks: int | None) -> tuple[int, int | None]:
        per = max(dtype.itemsize * math.prod(frame_shape), 1)
        if chunk_elements is None:
            if chunk_bytes is not None:
                _check_chunk_bytes(chunk_bytes)
            chunk_elements = max(1, (chunk_bytes or self.chunk_bytes) // per)
        elif not _is_int(chunk_elements) or not 1 <= chunk_elements <= MAX_ELEMENTS:
            raise ConfigError(f"chunk_elements must be an int in [1, {MAX_ELEMENTS}], got {chunk_elements!r}")
        chunk_elements = int(chunk_elements)
        if chunk_elements * per > MAX_CHUNK_BYTES:
            raise ConfigError(f"chunk_elements={chunk_elements} of {per} bytes each make chunks over "
                              f"{MAX_CHUNK_BYTES} bytes (a chunk is decoded whole in memory)")
        shard_chunks = self.shard_chunks if shard_chunks is None else shard_chunks
        _check_shard_chunks(shard_chunks)
        return chunk_elements, (chunk_elements * shard_chunks if shard_chunks else None)

    def _create(self, name: str, dtype: np.dtype, frame_shape: tuple[int, ...], attrs: dict,
                chunk_elements: int | None = None, chunk_bytes: int | None = None,
                shard_chunks: int | None = None):
        from zarr.codecs import Crc32cCodec, ZstdCodec

        chunk, shard = self._layout(dtype, frame_shape, chunk_elements, chunk_bytes, shard_chunks)
        # zstd frames carry a content checksum, so a damaged chunk fails to decode instead of reading wrong
        # values; without compression a crc32c codec does the same job.
        compressors = [ZstdCodec(level=self.compression_level, checksum=True)] if self.compression == "zstd" \
            else [Crc32cCodec()]
        now = _now()
        attrs = _jsonable({"seqlab_sequence": SEQUENCE_VERSION, **attrs, "length": 0, "complete": False,
                           "created": now, "updated": now})
        attrs["seqlab_check"] = _attrs_check(attrs)
        return self.group.create_array(
            name, shape=(0, *frame_shape), dtype=dtype, chunks=(chunk, *frame_shape),
            shards=(shard, *frame_shape) if shard else None, compressors=compressors, fill_value=0,
            attributes=attrs, overwrite=True,
            # every chunk is written even when it is all zeros, so a missing chunk file means damage
            config={"write_empty_chunks": True})

    def writer(self, name: str, *, adapter=None, source: dict | None = None, record: str | None = None,
               chunk_elements: int | None = None, chunk_bytes: int | None = None, shard_chunks: int | None = None,
               resume: bool = False, progress: Callable[[int], None] | None = None) -> SequenceWriter:
        """A chunk-aligned writer of a new sequence (``resume=True``: continue an incomplete one after its
        committed length, skipping that many incoming elements). Use as a context manager or call ``finish``."""
        self._writable()
        _check_name(name)
        return SequenceWriter(self, name, adapter=adapter, source=source, record=record,
                              chunk_elements=chunk_elements, chunk_bytes=chunk_bytes, shard_chunks=shard_chunks,
                              resume=resume, progress=progress)

    def write(self, name: str, windows: Iterable, **options) -> SequenceInfo:
        """Write a whole sequence from an iterable of windows (tensors or arrays); returns its description."""
        with self.writer(name, **options) as w:
            for piece in windows:
                w.write(piece)
        return self.describe(name)

    def append(self, name: str, data, *, adapter=None, chunk_elements: int | None = None,
               chunk_bytes: int | None = None) -> SequenceInfo:
        """Append elements to a growing sequence (created on first use; agent streams). Each call is committed
        when it returns: data first, then the new length (a crash in between leaves the old length)."""
        self._writable()
        _check_name(name)
        values = _as_numpy(data, f"append to {name!r}")
        if name in self:
            array = self._array(name)
            info = self._info(name, array)
            if not info.complete:
                raise InputError(f"sequence store {self.where}: sequence {name!r} is being ingested (incomplete): "
                                 "finish or delete it before appending")
            if adapter is not None and info.adapter is not None and _jsonable(adapter.info()) != info.adapter:
                raise InputError(f"sequence store {self.where}: sequence {name!r} was written by adapter "
                                 f"{info.adapter}, not {adapter.info()}")
        else:
            spec_attrs, dtype = _adapter_attrs(adapter, values)
            frame = tuple(values.shape[1:])
            array = self._create(name, dtype, frame, {**spec_attrs, "source": None, "record": None},
                                 chunk_elements, chunk_bytes)
            _update_attrs(array, {"complete": True})
            info = self._info(name, array)
        values = _fit(values, info, f"sequence store {self.where}: append to {name!r}")
        length = info.length
        new_length = length + values.shape[0]
        if values.shape[0]:
            if array.shape[0] < new_length:
                array.resize((new_length, *info.frame_shape))
            array[length:new_length] = values
        _update_attrs(array, {"length": new_length, "updated": _now()})
        return self._info(name, array)


# ------------------------------------------------------------------------------------------------------
# conversions


def _as_numpy(data, where: str) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        if data.dtype == torch.bfloat16:
            data = data.float()
        data = data.numpy()
    elif not isinstance(data, np.ndarray):
        try:
            data = np.asarray(data)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{where}: expected a tensor or array, got {type(data).__name__} ({exc})") from None
    if data.ndim == 0:
        raise InputError(f"{where}: expected a 1-D sequence of ids or (T, ...) frames, got a scalar")
    if data.dtype.kind not in "iuf" and data.dtype != np.bool_:
        raise InputError(f"{where}: expected integer ids or float frames, got dtype {data.dtype}")
    return data


def _adapter_attrs(adapter, first: np.ndarray | None) -> tuple[dict, np.dtype]:
    """Attrs describing the encoding, and the stored dtype, from the adapter (or the first data seen)."""
    if adapter is not None:
        spec = adapter.input_spec
        attrs = {"domain": adapter.name, "adapter": adapter.info(), "kind": spec.kind,
                 "vocab_size": spec.vocab_size if spec.kind == "tokens" else None}
        dtype = _token_dtype(spec.vocab_size) if spec.kind == "tokens" else np.dtype(np.float32)
        return attrs, dtype
    if first is None:
        raise InputError("a sequence without an adapter needs data to learn its dtype from")
    if first.dtype.kind in "iub":
        return {"domain": None, "adapter": None, "kind": "tokens", "vocab_size": None}, \
            (first.dtype if first.dtype.kind == "u" and first.dtype.itemsize <= 4 else np.dtype(np.int64))
    return {"domain": None, "adapter": None, "kind": "continuous", "vocab_size": None}, np.dtype(np.float32)


def _fit(values: np.ndarray, info_or_kind, where: str, position: int = 0) -> np.ndarray:
    """Check a piece against the sequence (ids in range, frame shape, finite) and cast to its stored dtype."""
    kind, vocab, frame, dtype = (info_or_kind.kind, info_or_kind.vocab_size, info_or_kind.frame_shape,
                                 np.dtype(info_or_kind.dtype))
    if tuple(values.shape[1:]) != tuple(frame):
        raise InputError(f"{where}: a piece at position {position} has element shape {tuple(values.shape[1:])}, "
                         f"the sequence's is {tuple(frame)}")
    if values.size == 0:
        return values.astype(dtype)
    if kind == "tokens":
        if values.dtype.kind == "f":
            raise InputError(f"{where}: token ids must be integers, got dtype {values.dtype} at position {position}")
        if values.dtype == np.bool_:
            values = values.astype(np.uint8)
        # ids are read back as int64: nothing at or above 2**63, whatever the stored dtype
        high = vocab if vocab is not None else min(int(np.iinfo(dtype).max), 2**63 - 1) + 1
        bad = (values < 0) | (values > high - 1)
        if bool(bad.any()):
            first = int(np.flatnonzero(bad)[0])
            raise InputError(f"{where}: id {int(values.reshape(-1)[first])} at position {position + first} is "
                             f"outside [0, {high})")
        return values.astype(dtype, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(dtype, copy=False)
    finite = np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1)
    if not bool(finite.all()):
        first = int(np.flatnonzero(~finite)[0])
        why = "is not finite" if not np.isfinite(values[first]).all() else \
            f"holds a value beyond the range of {dtype} (about +-3.4e38)"
        raise InputError(f"{where}: frame at position {position + first} {why}")
    return out


# ------------------------------------------------------------------------------------------------------
# writer


class SequenceWriter:
    """Streams pieces into one sequence in whole chunks (whole shards when sharded).

    Buffered elements stay under one write unit plus the piece being added; after each unit is on disk the
    committed ``length`` is recorded. ``finish()`` writes the tail, trims the array to the exact length and
    sets ``complete``. Leaving the ``with`` block by an exception leaves the sequence incomplete (resumable).
    """

    def __init__(self, store: SequenceStore, name: str, *, adapter=None, source=None, record=None,
                 chunk_elements=None, chunk_bytes=None, shard_chunks=None, resume=False, progress=None) -> None:
        self.store, self.name, self.adapter = store, name, adapter
        self.source, self.record, self.progress = source, record, progress
        self._layout_args = (chunk_elements, chunk_bytes, shard_chunks)
        self.array = None
        self.info: SequenceInfo | None = None
        self.committed = 0
        self.skip = 0            # incoming elements already on disk (resume)
        self.seen = 0            # incoming elements so far
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
        elif adapter is not None and adapter.input_spec.kind == "tokens":
            self._open(np.zeros(0, dtype=np.int64))  # token layout is known up front: visible at once

    @property
    def unit(self) -> int:
        return self.info.shard_elements or self.info.chunk_elements

    def _open(self, first: np.ndarray) -> None:
        attrs, dtype = _adapter_attrs(self.adapter, first)
        attrs.update({"source": self.source, "record": self.record})
        self.array = self.store._create(self.name, dtype, tuple(first.shape[1:]), attrs, *self._layout_args)
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
                self._put(data[start:start + self.unit])
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
            raise InputError(f"{self.where}: the source ended after {self.seen} elements, but {self.committed} were "
                             "already stored: it is not the source the incomplete sequence was started from")
        if self.array is None:
            self._open(np.zeros((0, self.adapter.input_spec.width) if self.adapter is not None
                                and self.adapter.input_spec.kind == "continuous" else 0, dtype=np.float32))
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
# reader


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
            raise InputError(f"{self.where} is incomplete (its writer stopped after {self.info.length} elements): "
                             "run the ingest again to finish it, or pass allow_incomplete=True")
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
            raise CorruptFileError(f"{self.where}: chunk {index} (positions [{lo}, {hi})) cannot be decoded: "
                                   f"{type(exc).__name__}: {exc}") from None
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
            raise InputError(f"{self.where}: window [{start}, {stop}) is out of range: the sequence holds "
                             f"{self.length} elements")
        if start == stop:
            values = np.zeros((0, *self.info.frame_shape), dtype=self.info.dtype)
        else:
            first, last = start // self.chunk, (stop - 1) // self.chunk
            parts = []
            for index in range(first, last + 1):
                base = index * self.chunk
                parts.append(self._chunk(index)[max(start - base, 0):stop - base])
            values = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return values if raw else self.to_tensor(values)

    def to_tensor(self, values: np.ndarray) -> torch.Tensor:
        if self.info.kind == "tokens":
            return torch.from_numpy(values.astype(np.int64))
        return torch.from_numpy(np.array(values, dtype=np.float32))


# ------------------------------------------------------------------------------------------------------
# model checks and the training source


def check_model_fits(model, info: SequenceInfo, where: str) -> None:
    """Refuse a model built by another adapter than the one that wrote the sequence (or of the wrong kind)."""
    model_info = getattr(model, "adapter_info", None)

    def encoding(adapter_info: dict) -> dict:  # what decides the encoding; the model's build options do not
        return _jsonable({k: adapter_info.get(k) for k in ("name", "settings")})

    if model_info is not None and info.adapter is not None and encoding(model_info) != encoding(info.adapter):
        raise InputError(f"{where} was written by adapter {info.adapter}, but the model was built by adapter "
                         f"{model_info}: encode the data with the model's adapter (or use a model built by "
                         f"{info.adapter.get('name')!r})")
    vocab = getattr(model, "vocab_size", None)
    d_input = getattr(model, "d_input", None)
    if vocab is not None:
        if info.kind != "tokens":
            raise InputError(f"{where} holds continuous frames, the model takes token ids")
        if info.vocab_size is not None and info.vocab_size > vocab:
            raise InputError(f"{where} holds ids in [0, {info.vocab_size}), the model's vocabulary is {vocab}")
    elif d_input is not None:
        if info.kind != "continuous":
            raise InputError(f"{where} holds token ids, the model takes continuous frames of width {d_input}")
        width = math.prod(info.frame_shape)
        if width != d_input:
            raise InputError(f"{where} holds frames of shape {info.frame_shape} ({width} values), the model takes "
                             f"d_input={d_input}")


class StoreSource:
    """Windows of stored sequences for ``seqlab.train.Trainer`` (truncated BPTT, state carried and detached).

    ``names``: one sequence or a list, laid end to end. Like ``SequenceSource``, the whole is cut into
    ``batch_size`` contiguous streams (the tail that does not divide is dropped); window ``i`` holds inputs at
    ``[i*window, (i+1)*window)`` of every stream and targets shifted by one. Only the chunks a window touches
    are read (each stream keeps its last chunks), so memory does not grow with the sequence.
    ``model``: when given, refused unless built by the adapter that wrote the sequences.
    """

    def __init__(self, store, names, batch_size: int, window: int, *, model=None, allow_incomplete: bool = False,
                 cache_chunks: int | None = None) -> None:
        store = open_store(store, "r")
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise InputError(f"sequence store {store.where}: StoreSource needs at least one sequence name")
        for value, what in ((batch_size, "batch_size"), (window, "window")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"StoreSource {what} must be a positive int, got {value!r}")
        self.store, self.names = store, names
        self.batch_size, self.window_size = batch_size, window
        cache = cache_chunks or 2 * batch_size + 2
        self.readers = [store.reader(n, allow_incomplete=allow_incomplete, cache_chunks=cache) for n in names]
        first = self.readers[0].info
        for reader in self.readers[1:]:
            info = reader.info
            if (info.kind, info.frame_shape, _jsonable(info.adapter)) != (first.kind, first.frame_shape,
                                                                          _jsonable(first.adapter)):
                raise InputError(f"sequence store {store.where}: sequences {first.name!r} and {info.name!r} were "
                                 "encoded differently (adapter, kind or frame shape): they cannot be one source")
        if model is not None:
            for reader in self.readers:
                check_model_fits(model, reader.info, reader.where)
        self.offsets = np.cumsum([0] + [r.length for r in self.readers])
        self.total = int(self.offsets[-1])
        self.stream_len = self.total // batch_size
        self.num_windows = max(0, (self.stream_len - 1) // window)
        if self.num_windows == 0:
            raise InputError(f"sequence store {store.where}: sequences {names} hold {self.total} elements, too few "
                             f"for one window of {window}+1 in each of {batch_size} streams")

    def __len__(self) -> int:
        return self.num_windows

    @property
    def chunk_reads(self) -> int:
        return sum(r.chunk_reads for r in self.readers)

    def _span(self, start: int, stop: int) -> np.ndarray:
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for k in range(first, len(self.readers)):
            base = int(self.offsets[k])
            if base >= stop:
                break
            lo, hi = max(start - base, 0), min(stop - base, self.readers[k].length)
            if hi > lo:
                parts.append(self.readers[k].read(lo, hi, raw=True))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} is outside [0, {self.num_windows})")
        start = int(index) * self.window_size
        rows = [self._span(b * self.stream_len + start, b * self.stream_len + start + self.window_size + 1)
                for b in range(self.batch_size)]
        chunk = self.readers[0].to_tensor(np.stack(rows))
        if chunk.dim() > 3:  # (batch, time, *frame) -> (batch, time, features) for a SequenceModel
            chunk = rearrange(chunk, "b t ... -> b t (...)")
        return chunk[:, :-1], chunk[:, 1:]


# ------------------------------------------------------------------------------------------------------
# ingest


def _file_identity(path: str, checksum: bool) -> dict:
    stat = os.stat(path)
    identity = {"path": os.path.abspath(path), "name": os.path.basename(path), "bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns, "sha256": None}
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
                    yield adapter.encode(raw[start:start + window])
            yield rid, pieces()
        return
    if split_records:
        raise ConfigError(f"adapter {adapter.name!r} cannot split {path} into records (no iter_records/records)")
    yield None, adapter.iter_windows(path, window)


def ingest(store, paths, adapter, *, names=None, window: int = DEFAULT_INGEST_WINDOW,
           sequences: Callable[[str, int], Iterable[tuple[str, Iterator]]] | None = None,
           split_records: bool | None = None, overwrite: bool = False, checksum: bool = True,
           chunk_elements: int | None = None, chunk_bytes: int | None = None, shard_chunks: int | None = None,
           progress: bool | Callable[[IngestProgress], None] | None = None) -> list[IngestResult]:
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
            results.extend(_ingest_file(store, path, i, names[i] if names is not None else None, adapter, window,
                                        sequences, split_records, overwrite, checksum, seen,
                                        (chunk_elements, chunk_bytes, shard_chunks), progress, bar))
    finally:
        if bar is not None:
            bar.close()
    return results


def _ingest_file(store: SequenceStore, path: str, index: int, base, adapter, window, sequences, split_records,
                 overwrite, checksum, seen, layout, progress, bar) -> list[IngestResult]:
    """One input file, all or nothing: its sequences stay ``complete: False`` (replacements stay in the staging
    group) until the adapter has read the whole file, end-of-stream checks included (a gzip CRC covers the
    whole member, so bases decoded before it may be wrong); then all are marked complete. On an error, every
    sequence this call wrote for the file is removed (earlier data and replaced sequences are untouched)."""
    touched: list[tuple[str, bool]] = []   # (name, staged) in the order written
    results: list[IngestResult] = []
    try:
        if not os.path.isfile(path):
            raise InputError(f"ingest: {path} does not exist or is not a file")
        identity = _file_identity(path, checksum)
        if sequences is not None:
            pairs = ((_check_name(n), None, it) for n, it in sequences(path, window))
        else:
            pairs = ((_sequence_of(base, path, rid), rid, it)
                     for rid, it in _record_windows(adapter, path, window, split_records))
        for name, rid, pieces in pairs:
            if name in seen:
                raise InputError(f"ingest: two sequences would be named {name!r} ({path}); pass names=")
            seen.add(name)
            results.append(_ingest_one(store, name, rid, pieces, adapter, path, identity, overwrite, layout,
                                       progress, bar, touched))
        # the adapter has read the file to its end: mark what it gave complete, replacements swapped in
        staging = None
        for name, staged in touched:
            if staged:
                staging = staging or store._staging()
                _update_attrs(staging._array(name), {"complete": True, "updated": _now()})
                store._swap_in(staging, name)
            else:
                _update_attrs(store._array(name), {"complete": True, "updated": _now()})
    except Exception as exc:
        kept = _roll_back(store, touched)
        replacements = sum(staged for _, staged in touched)
        note = (f"ingest of {path} was rolled back: "
                + (f"the {len(touched)} sequence(s) written from it were removed" if touched
                   else "nothing was written from it")
                + (f" ({replacements} of them replacements: the sequences they were to replace are kept)"
                   if replacements else "")
                + (f" ({kept} could not be removed and stay incomplete)" if kept else "")
                + (f"; the {index} file(s) before it stay ingested" if index else ""))
        if isinstance(exc, SeqlabError):
            raise type(exc)(f"{exc}; {note}").with_traceback(exc.__traceback__) from None
        exc.add_note(note)
        raise
    return [IngestResult(r.name, r.action, r.resumed_from, store.describe(r.name)) if r.action != "skipped" else r
            for r in results]


def _roll_back(store: SequenceStore, touched: list[tuple[str, bool]]) -> int:
    """Remove what an ingest wrote for one file; returns how many could not be removed."""
    failed = 0
    for name, staged in reversed(touched):
        try:
            (store._staging() if staged else store)._delete_node(name)
        except Exception:  # noqa: BLE001 - the original error matters more; the sequence stays incomplete
            failed += 1
    return failed


def _sequence_of(base: str | None, path: str, rid: str | None) -> str:
    if rid is None:
        return _check_name(base) if base is not None else sequence_name(Path(path).stem)
    return sequence_name(f"{base}.{rid}" if base is not None else rid)


def _ingest_one(store: SequenceStore, name, rid, pieces, adapter, path, identity, overwrite, layout, progress,
                bar, touched) -> IngestResult:
    action, resume, target = "written", False, store
    store._recover(name)
    if name in store:
        try:
            info = store.describe(name)
        except CorruptFileError as exc:
            if not overwrite:
                raise CorruptFileError(f"{exc}; ingest replaces a damaged sequence only with overwrite=True") \
                    from None
            info = None
        same = info is not None and _same_source(info.source, identity) and \
            _jsonable(info.adapter) == _jsonable(adapter.info())
        if info is not None and info.complete and same and not overwrite:
            if rid is not None:  # records come in file order: walk past this one to reach the next
                for _ in pieces:
                    pass
            return IngestResult(name, "skipped", 0, info)
        if info is not None and not info.complete and same and not overwrite:
            action, resume = "resumed", True
        elif info is not None and info.complete and not overwrite:
            raise InputError(f"sequence store {store.where} already holds a complete sequence {name!r} from "
                             f"{(info.source or {}).get('path')}: pass overwrite=True (seqlab ingest --overwrite) "
                             "to replace it")
        else:  # written aside, swapped in once the whole file is verified: a failure leaves the old one
            action, target = "replaced", store._staging()
    last = [0]

    def report(elements: int, done: bool = False) -> None:
        if bar is not None:
            bar.update(elements - last[0])
        last[0] = elements
        if callable(progress) and progress is not True:
            progress(IngestProgress(path, name, elements, done))

    chunk_elements, chunk_bytes, shard_chunks = layout
    touched.append((name, target is not store))
    writer = target.writer(name, adapter=adapter, source=identity, record=rid, chunk_elements=chunk_elements,
                           chunk_bytes=chunk_bytes, shard_chunks=shard_chunks, resume=resume, progress=report)
    resumed_from = writer.committed
    last[0] = resumed_from
    for piece in pieces:
        writer.write(piece)
    info = writer.finish(complete=False)
    report(info.length, done=True)
    return IngestResult(name, action, resumed_from, info)
