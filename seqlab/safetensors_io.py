"""Reading and writing safetensors files with JSON metadata, checksums and clear errors on bad files.

Shared by recurrent states (and later checkpoints and memory sessions). Files are parsed from bytes, never
unpickled; a truncated, altered or foreign file raises ``CorruptFileError`` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from seqlab.errors import CorruptFileError, FormatVersionError
from seqlab.io import atomic_write_bytes, tensors_checksum

_META_KEY = "seqlab"


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, kind: str, version: int,
                  meta: Mapping[str, Any]) -> Path:
    """Atomically write ``tensors`` with ``meta`` (JSON-able) and a checksum over the tensor bytes."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = {"format": kind, "format_version": version, **meta,
              "checksum": tensors_checksum(sorted(flat.items()))}
    data = st_save(flat, metadata={_META_KEY: json.dumps(header, sort_keys=True)})
    return atomic_write_bytes(path, data)


def read_tensors(path: str | os.PathLike, *, kind: str, version: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by ``write_tensors``; check format name, version and checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if len(data) < 8:
        raise CorruptFileError(f"{path}: file is {len(data)} bytes, too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CorruptFileError(f"{path}: truncated (header says {header_len} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError):
        raise CorruptFileError(f"{path}: not a seqlab {kind} file (no readable seqlab metadata)") from None
    if meta.get("format") != kind:
        raise CorruptFileError(f"{path}: holds a {meta.get('format')!r}, expected a {kind!r}")
    file_version = meta.get("format_version")
    if not isinstance(file_version, int):
        raise CorruptFileError(f"{path}: format_version is missing or not an integer")
    if file_version > version:
        raise FormatVersionError(
            f"{path}: written in {kind} format version {file_version}; this seqlab reads up to version {version}"
            " (upgrade seqlab)"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CorruptFileError(f"{path}: tensor data is unreadable ({exc})") from None
    if tensors_checksum(sorted(tensors.items())) != meta.get("checksum"):
        raise CorruptFileError(f"{path}: checksum mismatch, the file was altered or damaged")
    return tensors, meta
