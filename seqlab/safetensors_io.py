"""Reading and writing safetensors files with JSON metadata, checksums and clear errors on bad files.

Shared by recurrent states, model files, training checkpoints and memory-session snapshots. Files are parsed
from bytes, never unpickled; a truncated, altered or foreign file raises ``CorruptFileError`` naming the file.

The checksum covers every byte of the file: ``file_sha256`` in the seqlab metadata is the SHA-256 of the whole
file as written with those 64 hex digits set to ``0`` (the 8-byte header length, the JSON header with the
tensors' dtypes, shapes and offsets and all the metadata, the padding, the tensor bytes; appended bytes change it
too). Files of older format versions carry ``checksum``, a SHA-256 over the tensor names, dtypes, shapes and
bytes only; they are read with that older check where the caller allows it (``full_checksum_since``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from seqlab.errors import CorruptFileError, FormatVersionError
from seqlab.io import atomic_write_bytes, tensors_checksum

_META_KEY = "seqlab"
FILE_CHECKSUM = "file_sha256"
LEGACY_CHECKSUM = "checksum"
_PLACEHOLDER = b"0" * 64
# how the key and the start of its value look in the raw header: the seqlab metadata is a JSON string inside
# the safetensors JSON header, so its quotes are escaped
_MARKER = b'"' + FILE_CHECKSUM.encode() + b'\\": \\"'
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _file_digest(data: bytes | bytearray | memoryview, start: int) -> str:
    """SHA-256 of ``data`` with the 64 bytes at ``start`` read as ``0`` digits."""
    view = memoryview(data)
    digest = hashlib.sha256()
    digest.update(view[:start])
    digest.update(_PLACEHOLDER)
    digest.update(view[start + 64 :])
    return digest.hexdigest()


def check_weight_names(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], present, expected
) -> None:
    """CorruptFileError naming ``path`` unless the file's plain weights ``present`` (names in ``tensors``) are
    exactly the model's ``expected`` ones (names in ``own``, its state dict) with the model's shapes. Shared by the
    loaders of files whose other entries replace some of the model's weights (quantized codes, low-rank factors);
    each checks dtypes by its own rule."""
    missing, unexpected = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
    if missing or unexpected:
        raise CorruptFileError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    for name in present:
        if tuple(tensors[name].shape) != tuple(own[name].shape):
            raise CorruptFileError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model's is {tuple(own[name].shape)}"
            )


def encode_tensors(
    tensors: Mapping[str, torch.Tensor], *, kind: str, version: int, meta: Mapping[str, Any]
) -> bytearray:
    """The bytes ``write_tensors`` writes: safetensors with the seqlab metadata and a whole-file checksum."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    body = {k: v for k, v in meta.items() if k not in (FILE_CHECKSUM, LEGACY_CHECKSUM)}
    header = {**body, "format": kind, "format_version": version, FILE_CHECKSUM: _PLACEHOLDER.decode()}
    data = bytearray(st_save(flat, metadata={_META_KEY: json.dumps(header, sort_keys=True)}))
    (header_len,) = struct.unpack("<Q", data[:8])
    raw = bytes(data[8 : 8 + header_len])
    if raw.count(_MARKER) != 1:  # pragma: no cover - json.dumps escapes every quote inside a value
        raise RuntimeError("seqlab metadata: cannot place the file checksum")
    start = 8 + raw.index(_MARKER) + len(_MARKER)
    data[start : start + 64] = _file_digest(data, start).encode()
    return data  # not copied into bytes: a model file can be large


def write_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, kind: str, version: int, meta: Mapping[str, Any]
) -> Path:
    """Atomically write ``tensors`` with ``meta`` (JSON-able) and a checksum over every byte of the file."""
    return atomic_write_bytes(path, encode_tensors(tensors, kind=kind, version=version, meta=meta))


def decode_tensors(
    data: bytes, where: str | os.PathLike, *, kind: str, version: int, full_checksum_since: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Check and parse the bytes of a file written by ``write_tensors``; ``where`` names it in errors.

    ``version``: the newest format version this reader knows (a newer file is a ``FormatVersionError``).
    ``full_checksum_since``: files of this format version or newer must carry the whole-file checksum; older
    ones may carry only the older tensor checksum (None: any file may)."""
    if len(data) < 8:
        raise CorruptFileError(f"{where}: file is {len(data)} bytes, too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CorruptFileError(
            f"{where}: truncated or damaged (header length says {header_len} bytes, the file "
            f"has {len(data) - 8} after it)"
        )
    raw = data[8 : 8 + header_len]
    try:
        header = json.loads(raw)
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        raise CorruptFileError(
            f"{where}: not a readable {kind} file (its header or seqlab metadata is damaged, "
            "or it is another program's file)"
        ) from None
    if not isinstance(meta, dict) or not isinstance(header, dict):
        raise CorruptFileError(f"{where}: not a readable {kind} file (its seqlab metadata is not a JSON object)")
    if meta.get("format") != kind:
        raise CorruptFileError(f"{where}: holds a {meta.get('format')!r}, expected a {kind!r}")
    file_version = meta.get("format_version")
    if isinstance(file_version, bool) or not isinstance(file_version, int) or file_version < 1:
        raise CorruptFileError(f"{where}: format_version is missing or not a positive integer")
    digest = meta.get(FILE_CHECKSUM)
    if digest is not None:  # checked first: a damaged version number is damage, not a newer seqlab's file
        if (
            not isinstance(digest, str)
            or not _HEX64.fullmatch(digest)
            or raw.count(_MARKER) != 1
            or raw.count(_MARKER + digest.encode()) != 1
        ):
            raise CorruptFileError(f"{where}: checksum field is damaged")
        start = 8 + raw.index(_MARKER) + len(_MARKER)
        if _file_digest(data, start) != digest:
            raise CorruptFileError(f"{where}: checksum mismatch, the file was altered or damaged")
    if file_version > version:
        raise FormatVersionError(
            f"{where}: written in {kind} format version {file_version}; this seqlab reads up to version {version}"
            " (upgrade seqlab)"
        )
    if digest is None:
        if full_checksum_since is not None and file_version >= full_checksum_since:
            raise CorruptFileError(
                f"{where}: no file checksum (format version {file_version} files carry one): "
                "the file was altered or damaged"
            )
        if LEGACY_CHECKSUM not in meta:
            raise CorruptFileError(f"{where}: no checksum: the file was altered or damaged")
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CorruptFileError(f"{where}: tensor data is unreadable ({' '.join(str(exc).split())})") from None
    if digest is None and tensors_checksum(sorted(tensors.items())) != meta.get(LEGACY_CHECKSUM):
        raise CorruptFileError(f"{where}: checksum mismatch, the file was altered or damaged")
    return tensors, meta


def read_tensors(
    path: str | os.PathLike, *, kind: str, version: int, full_checksum_since: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by ``write_tensors``; check format name, version and checksum (``decode_tensors``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    return decode_tensors(data, path, kind=kind, version=version, full_checksum_since=full_checksum_since)
