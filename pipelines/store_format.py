"""The sequence store's format: versions, limits, the seqlab attrs and their checksum, validation of a
sequence's metadata (``sequence_info``) and of the pieces written into it (``_fit``).

Per-sequence attrs: ``seqlab_sequence`` (format version), ``seqlab_check`` (CRC32 of these attrs), ``domain``,
``adapter`` (``{"name", "settings"}``), ``kind`` and ``vocab_size``, ``source`` (path, size, mtime, sha256),
``record``, ``length`` (elements committed), ``complete``, ``created``, ``updated``. See docs/stores.md.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from seqlab.errors import ConfigError, CorruptFileError, FormatVersionError, InputError

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
    "SequenceInfo",
    "sequence_info",
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
        raise InputError(
            f"sequence name {name!r} is not valid: use letters, digits, '.', '_', '-' (first a letter "
            "or digit, at most 200); seqlab.pipelines.sequence_name(text) makes one"
        )
    return name


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


#: the attrs ``seqlab_check`` covers (others, e.g. a job's, may be added without it)
_CHECKED = (
    "seqlab_sequence",
    "domain",
    "adapter",
    "kind",
    "vocab_size",
    "source",
    "record",
    "length",
    "complete",
    "created",
    "updated",
)


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
        raise ConfigError(
            f"chunk_bytes must be an int in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {value!r} "
            "(about 1-4 MB reads well)"
        )


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
    kind: str  # "tokens" or "continuous"
    dtype: str  # stored dtype
    frame_shape: tuple[int, ...]  # () for token ids, (width,) or (h, w, c) ... for frames
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


def sequence_info(
    name: str,
    attrs: dict,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: np.dtype,
    shards,
    *,
    store: str,
    file: str,
) -> SequenceInfo:
    """Check a sequence's seqlab attrs against its array (``store``: where the store is, ``file``: its
    ``zarr.json``, both for the messages) and describe it; CorruptFileError / FormatVersionError name the file."""
    where = f"sequence store {store}: sequence {name!r}: {file}"
    if "seqlab_sequence" not in attrs or "length" not in attrs:
        raise CorruptFileError(
            f"{where}: a Zarr array without seqlab sequence attrs (seqlab_sequence, length, complete, ...)"
        )

    def bad(attr: str, what: str) -> CorruptFileError:
        return CorruptFileError(f"{where}: attr {attr!r} is {attrs.get(attr)!r}, {what}")

    version = attrs["seqlab_sequence"]
    if not _is_int(version) or version < 1:
        raise bad("seqlab_sequence", "not a format version")
    if version > SEQUENCE_VERSION:
        raise FormatVersionError(
            f"{where}: sequence format version {version}, this seqlab reads up to {SEQUENCE_VERSION}"
        )
    if version >= 2 or "seqlab_check" in attrs:
        if attrs.get("seqlab_check") != _attrs_check(attrs):
            raise CorruptFileError(
                f"{where}: the seqlab attrs do not match their checksum (seqlab_check "
                f"{attrs.get('seqlab_check')!r}): the file was damaged or edited"
            )
    length = attrs["length"]
    if not _is_int(length) or length < 0:
        raise bad("length", "not a count of elements")
    if not shape:
        raise CorruptFileError(f"{where}: the array is 0-dimensional, not a sequence")
    # a flipped bit can leave zarr a chunk (or shard) shape of 0, which it accepts and every read divides by
    if not chunks or chunks[0] < 1 or (shards and int(shards[0]) < chunks[0]):
        raise CorruptFileError(f"{where}: chunk shape {chunks} (shards {shards}) holds no elements per chunk")
    if length > shape[0]:
        raise CorruptFileError(
            f"sequence store {store}: sequence {name!r} records length {length} but its "
            f"array holds only {shape[0]} elements ({file})"
        )
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
        name=name,
        length=int(length),
        complete=attrs["complete"],
        kind=kind,
        dtype=str(dtype),
        frame_shape=shape[1:],
        chunk_elements=chunks[0],
        shard_elements=int(shards[0]) if shards else None,
        domain=attrs.get("domain"),
        adapter=adapter,
        vocab_size=vocab,
        source=attrs.get("source"),
        record=attrs.get("record"),
        created=attrs.get("created"),
        updated=attrs.get("updated"),
        attrs=attrs,
    )


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
        attrs = {
            "domain": adapter.name,
            "adapter": adapter.info(),
            "kind": spec.kind,
            "vocab_size": spec.vocab_size if spec.kind == "tokens" else None,
        }
        dtype = _token_dtype(spec.vocab_size) if spec.kind == "tokens" else np.dtype(np.float32)
        return attrs, dtype
    if first is None:
        raise InputError("a sequence without an adapter needs data to learn its dtype from")
    if first.dtype.kind in "iub":
        return {"domain": None, "adapter": None, "kind": "tokens", "vocab_size": None}, (
            first.dtype if first.dtype.kind == "u" and first.dtype.itemsize <= 4 else np.dtype(np.int64)
        )
    return {"domain": None, "adapter": None, "kind": "continuous", "vocab_size": None}, np.dtype(np.float32)


def _fit(values: np.ndarray, info_or_kind, where: str, position: int = 0) -> np.ndarray:
    """Check a piece against the sequence (ids in range, frame shape, finite) and cast to its stored dtype."""
    kind, vocab, frame, dtype = (
        info_or_kind.kind,
        info_or_kind.vocab_size,
        info_or_kind.frame_shape,
        np.dtype(info_or_kind.dtype),
    )
    if tuple(values.shape[1:]) != tuple(frame):
        raise InputError(
            f"{where}: a piece at position {position} has element shape {tuple(values.shape[1:])}, "
            f"the sequence's is {tuple(frame)}"
        )
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
            raise InputError(
                f"{where}: id {int(values.reshape(-1)[first])} at position {position + first} is outside [0, {high})"
            )
        return values.astype(dtype, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(dtype, copy=False)
    finite = np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1)
    if not bool(finite.all()):
        first = int(np.flatnonzero(~finite)[0])
        why = (
            "is not finite"
            if not np.isfinite(values[first]).all()
            else f"holds a value beyond the range of {dtype} (about +-3.4e38)"
        )
        raise InputError(f"{where}: frame at position {position + first} {why}")
    return out
