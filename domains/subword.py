"""Subword tokens of bytes: a byte-level BPE (``seqlab.byte_bpe.ByteBPE``, Hugging Face ``tokenizers``) learned
on the training text and saved with the model.

The adapter's settings hold the tokenizer itself (its JSON), so a model file built by the adapter records it in
its metadata and ``model_from_checkpoint`` rebuilds the same tokenizer: one model file is self-contained, and
loading it parses JSON only. A new adapter has only a ``vocab_size``: ``fitted(texts)`` learns the merges on
training text (``seqlab train --adapter subword --subword-vocab N`` calls it on the training files, or on the
bytes of a byte store's sequences) and returns the adapter that encodes.

Any byte string encodes (every byte has a token) and ``decode`` gives the exact bytes back. The main use is a
small drafter for a byte-level target (MambaByte): ``seqlab.decoding.SubwordDrafter(model, adapter)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from seqlab.byte_bpe import MAX_VOCAB, MIN_VOCAB, ByteBPE
from seqlab.errors import ConfigError, InputError

from .base import InputSpec, TokenAdapter, register_adapter
from .bytes import open_input, to_bytes

__all__ = ["DEFAULT_SUBWORD_VOCAB", "FIT_BYTES", "SubwordAdapter"]

DEFAULT_SUBWORD_VOCAB = 512
#: the most training bytes the merges are learned on (the first ones of the training data)
FIT_BYTES = 32 << 20
_READ = 1 << 20  # bytes read at a time by iter_windows
#: every byte the split pattern's \\s may match, as a Latin-1 character (a superset: Python's and Unicode's)
_SPACES = frozenset(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0")


@register_adapter
class SubwordAdapter(TokenAdapter):
    """Byte strings as byte-level BPE ids. ``tokenizer``: the BPE as JSON (``ByteBPE.to_json``), or None for an
    adapter not fitted yet (``fitted`` learns one of ``vocab_size`` tokens; ``vocab_size`` is then the
    tokenizer's own)."""

    name = "subword"

    def __init__(self, vocab_size: int = DEFAULT_SUBWORD_VOCAB, tokenizer: str | None = None) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
            raise ConfigError(
                f"SubwordAdapter.vocab_size must be an int in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size!r}"
            )
        self.bpe: ByteBPE | None = None
        if tokenizer is not None:
            self.bpe = ByteBPE.from_json(tokenizer)
            vocab_size = self.bpe.vocab_size
        self.vocab_size = vocab_size
        self._json = tokenizer

    def settings(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "tokenizer": self._json}

    def __repr__(self) -> str:
        state = "fitted" if self.bpe is not None else "not fitted"
        return f"SubwordAdapter(vocab_size={self.vocab_size}, {state})"

    # -- the tokenizer -----------------------------------------------------------------------------------
    def fitted(self, texts: Iterable) -> SubwordAdapter:
        """An adapter whose BPE is learned on ``texts`` (str or bytes-like values, the first ``FIT_BYTES`` bytes
        of them); an adapter that already has a tokenizer returns itself."""
        if self.bpe is not None:
            return self

        def limited() -> Iterator[bytes]:
            left = FIT_BYTES
            for text in texts:
                data = to_bytes(text, "subword training text")[:left]
                left -= len(data)
                if data:
                    yield data
                if left <= 0:
                    return

        bpe = ByteBPE.train(limited(), self.vocab_size)
        return SubwordAdapter(self.vocab_size, bpe.to_json())

    def _require(self) -> ByteBPE:
        if self.bpe is None:
            raise ConfigError(
                "this subword adapter has no tokenizer yet: learn one on training text with "
                "adapter.fitted(texts) (seqlab train --adapter subword does)"
            )
        return self.bpe

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=self._require().vocab_size)

    def uniform_baseline(self) -> float | None:
        return math.log2(self.vocab_size)

    # -- values <-> ids ------------------------------------------------------------------------------------
    def encode(self, raw) -> torch.Tensor:
        """``str`` (UTF-8) or bytes-like -> 1-D int64 subword ids."""
        return torch.tensor(self._require().encode(to_bytes(raw, "encode")), dtype=torch.long)

    def decode(self, tensor) -> bytes:
        """Subword ids (a 1-D tensor or a sequence of ints) -> the exact bytes."""
        bpe = self._require()
        ids = tensor.reshape(-1).tolist() if isinstance(tensor, torch.Tensor) else [int(i) for i in tensor]
        for position, i in enumerate(ids):
            if not 0 <= i < bpe.vocab_size:
                raise InputError(f"decode: id {i} at position {position} is outside [0, {bpe.vocab_size})")
        return bpe.decode(ids)

    # -- files ---------------------------------------------------------------------------------------------
    def read(self, path: str | os.PathLike, **options) -> bytes:
        path = os.fspath(path)
        with open_input(path) as handle:
            data = handle.read()
        if not data:
            raise InputError(f"{path}: file is empty (0 bytes): nothing to encode")
        return data

    def iter_windows(self, path: str | os.PathLike, window: int, **options) -> Iterator[torch.Tensor]:
        """The file's ids ``window`` at a time. The bytes are read 1 MiB at a time and encoded up to the last
        space that follows a non-space byte (no BPE piece crosses one), so the windows equal ``encode(read())``."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be an int >= 1 (tokens per window), got {window!r}")
        bpe = self._require()
        path = os.fspath(path)
        return self._windows(bpe, path, window)

    def _windows(self, bpe: ByteBPE, path: str, window: int) -> Iterator[torch.Tensor]:
        pending: list[int] = []
        carry = b""
        empty = True
        with open_input(path) as handle:
            while True:
                chunk = handle.read(_READ)
                data = carry + chunk
                if not chunk:
                    pending += bpe.encode(data) if data else []
                    carry = b""
                else:
                    empty = False
                    cut = _cut_point(data)
                    pending += bpe.encode(data[:cut]) if cut else []
                    carry = data[cut:]
                while len(pending) >= window or (not chunk and pending):
                    yield torch.tensor(pending[:window], dtype=torch.long)
                    pending = pending[window:]
                if not chunk:
                    break
        if empty:
            raise InputError(f"{path}: file is empty (0 bytes): nothing to encode")

    def write(self, path: str | os.PathLike, raw) -> None:
        """Write bytes (or a str as UTF-8, or subword ids) to ``path`` atomically."""
        from seqlab.io import atomic_write_bytes

        path = os.fspath(path)
        data = to_bytes(raw, path) if isinstance(raw, (str, bytes, bytearray, memoryview)) else self.decode(raw)
        if not data:
            raise InputError(f"{path}: refusing to write an empty file (reading it back would fail)")
        atomic_write_bytes(path, data)


def _cut_point(data: bytes) -> int:
    """The last index i with data[i] == b" " and data[i-1] not a space of any kind (a boundary of every BPE
    piece), or 0."""
    at = len(data)
    while True:
        at = data.rfind(b" ", 0, at)
        if at <= 0:
            return 0
        if data[at - 1] not in _SPACES:
            return at
