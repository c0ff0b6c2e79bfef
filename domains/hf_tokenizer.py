"""Text as the ids of a Hugging Face ``tokenizers`` tokenizer (a ``tokenizer.json``), instead of raw bytes.

The adapter a transformers Mamba / Mamba-2 directory comes with: ``seqlab.domains.registry.from_pretrained(dir)``
loads the model and wraps the directory's ``tokenizer.json`` in this adapter, and ``seqlab generate --model DIR
--prompt ...`` encodes the prompt and decodes the continuation with it. The tokenizer is kept as its JSON text in
the adapter's settings, so a model file (``seqlab.checkpoint.save_model``) records it whole; in a pretrained
directory it is its own ``tokenizer.json`` (``pretrained_files``), which transformers reads as well.

``vocab_size`` is the model's: an HF model's embedding is often padded past the tokenizer's vocabulary (rows
no token uses), never smaller than it. Generation never samples the padding ids (they decode to nothing) nor,
unless asked, the tokenizer's special tokens; ``eos_id`` (config.json's ``eos_token_id``) ends a row. Parsing
only reads JSON (``tokenizers.Tokenizer.from_str``); nothing is unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from seqlab.errors import ConfigError, CorruptFileError, InputError

from .base import InputSpec, TokenAdapter, register_adapter

__all__ = ["TOKENIZER_FILE", "HFTokenizerAdapter"]

TOKENIZER_FILE = "tokenizer.json"
_READ = 1 << 20  # characters read at a time by iter_windows


def _parse(text: str, where: str):
    """A ``tokenizers.Tokenizer`` from its JSON text; ``CorruptFileError`` naming ``where`` when it does not parse."""
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:  # pragma: no cover - tokenizers is a dependency of the subword extra
        raise ConfigError(
            f"{where}: reading a tokenizer.json needs the 'tokenizers' package (pip install tokenizers)"
        ) from None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # the Rust parser raises its own exception type
        reason = " ".join(str(exc).split())[:200]
        raise CorruptFileError(f"{where}: not a tokenizers tokenizer.json ({reason})") from None


@register_adapter
class HFTokenizerAdapter(TokenAdapter):
    """Text <-> the ids of an HF ``tokenizers`` tokenizer. ``tokenizer``: its JSON (a ``tokenizer.json``'s text);
    ``vocab_size``: the model's vocabulary (default: the tokenizer's; a padded embedding is larger, never
    smaller); ``eos_id``: the id that ends a generated row (None: none); ``add_special_tokens``: let the
    tokenizer's post-processor add its special tokens (a BOS) when encoding, as transformers does."""

    name = "hf_tokenizer"
    metric_name: ClassVar[str] = "bits_per_token"
    #: settings a pretrained directory keeps as files of their own (setting -> file name)
    pretrained_files: ClassVar[dict[str, str]] = {"tokenizer": TOKENIZER_FILE}

    def __init__(
        self,
        tokenizer: str,
        vocab_size: int | None = None,
        eos_id: int | None = None,
        add_special_tokens: bool = True,
        where: str = "tokenizer",
    ) -> None:
        if not isinstance(tokenizer, str):
            raise ConfigError(f"HFTokenizerAdapter.tokenizer must be a tokenizer.json's text, got {type(tokenizer)}")
        self._json = tokenizer
        self.tokenizer = _parse(tokenizer, where)
        self.tokenizer_vocab = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        if self.tokenizer_vocab < 2:
            raise ConfigError(f"{where}: the tokenizer has {self.tokenizer_vocab} tokens; a model needs at least 2")
        if vocab_size is None:
            vocab_size = self.tokenizer_vocab
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < self.tokenizer_vocab:
            raise ConfigError(
                f"{where}: the tokenizer has {self.tokenizer_vocab} tokens but the model's embedding has "
                f"{vocab_size!r} rows; a tokenizer needs a model with at least as many"
            )
        if eos_id is not None and (
            isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size
        ):
            raise ConfigError(f"{where}: eos_id must be an id in [0, {vocab_size}) or None, got {eos_id!r}")
        self.vocab_size = vocab_size
        self.eos_id = eos_id  # type: ignore[misc]
        self.add_special_tokens = bool(add_special_tokens)
        specials = [i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special]
        self.special_ids = tuple(sorted(int(i) for i in specials))  # type: ignore[misc]

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        vocab_size: int | None = None,
        eos_id: int | None = None,
        add_special_tokens: bool = True,
    ) -> HFTokenizerAdapter:
        """The adapter of a ``tokenizer.json`` file (errors name the file)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            raise CorruptFileError(f"{path}: no such file") from None
        except (OSError, UnicodeError) as exc:
            raise CorruptFileError(f"{path}: not a readable tokenizer.json ({exc})") from None
        return cls(text, vocab_size=vocab_size, eos_id=eos_id, add_special_tokens=add_special_tokens, where=path)

    @classmethod
    def from_pretrained_files(cls, settings: dict[str, Any], paths: dict[str, str]) -> HFTokenizerAdapter:
        """The adapter of a pretrained directory's adapter.json: ``settings`` without the tokenizer, ``paths`` the
        files of the kept-apart settings (``{"tokenizer": ".../tokenizer.json"}``)."""
        if "tokenizer" not in paths:
            raise CorruptFileError("adapter.json: the hf_tokenizer adapter names no tokenizer file")
        return cls.from_file(paths["tokenizer"], **settings)

    def settings(self) -> dict[str, Any]:
        return {
            "tokenizer": self._json,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "add_special_tokens": self.add_special_tokens,
        }

    def __repr__(self) -> str:
        return f"HFTokenizerAdapter(tokenizer of {self.tokenizer_vocab} tokens, vocab_size={self.vocab_size})"

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=self.vocab_size)

    def generation_options(self, allow_specials: bool = False) -> dict[str, Any]:
        """As ``TokenAdapter``'s, and the padding ids past the tokenizer's vocabulary are never generated (no
        token has them, so they have no text)."""
        options = super().generation_options(allow_specials)
        padding = list(range(self.tokenizer_vocab, self.vocab_size))
        if padding:
            options["suppress_tokens"] = list(options.get("suppress_tokens", [])) + padding
        return options

    # -- values <-> ids ------------------------------------------------------------------------------------
    def _text(self, raw, where: str) -> str:
        if isinstance(raw, str):
            return raw
        if isinstance(raw, (bytes, bytearray, memoryview)):
            return bytes(raw).decode("utf-8")  # a UnicodeDecodeError names the bad byte (the CLI reports it)
        raise InputError(f"{where}: expected str or UTF-8 bytes, got {type(raw).__name__}")

    def encode(self, raw, add_special_tokens: bool | None = None) -> torch.Tensor:
        """Text (str, or UTF-8 bytes) -> 1-D int64 ids."""
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer.encode(self._text(raw, "encode"), add_special_tokens=special).ids
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, tensor) -> str:
        """Ids (a 1-D tensor or a sequence of ints) -> text, special tokens and padding ids left out."""
        ids = tensor.reshape(-1).tolist() if isinstance(tensor, torch.Tensor) else [int(i) for i in tensor]
        for position, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise InputError(f"decode: id {i} at position {position} is outside [0, {self.vocab_size})")
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer_vocab], skip_special_tokens=True)

    # -- files ---------------------------------------------------------------------------------------------
    def read(self, path: str | os.PathLike, **options) -> str:
        path = os.fspath(path)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if not text:
            raise InputError(f"{path}: file is empty: nothing to encode")
        return text

    def iter_windows(self, path: str | os.PathLike, window: int, **options) -> Iterator[torch.Tensor]:
        """The file's ids ``window`` at a time, the text read 1 Mi characters at a time and encoded up to the last
        line start (a newline followed by a non-space): equal to ``encode(read())`` for tokenizers whose
        pre-tokenizer splits there (byte-level BPE, whitespace splits)."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be an int >= 1 (tokens per window), got {window!r}")
        return self._windows(os.fspath(path), window)

    def _windows(self, path: str, window: int) -> Iterator[torch.Tensor]:
        pending: list[int] = []
        carry, first, empty = "", True, True
        with open(path, encoding="utf-8") as handle:
            while True:
                chunk = handle.read(_READ)
                text = carry + chunk
                cut = len(text) if not chunk else _line_start(text)
                if cut:
                    pending += self.encode(text[:cut], add_special_tokens=self.add_special_tokens and first).tolist()
                    first = False
                carry = text[cut:]
                empty = empty and not chunk
                while len(pending) >= window or (not chunk and pending):
                    yield torch.tensor(pending[:window], dtype=torch.long)
                    pending = pending[window:]
                if not chunk:
                    break
        if empty:
            raise InputError(f"{path}: file is empty: nothing to encode")

    def write(self, path: str | os.PathLike, raw) -> None:
        """Write text (a str, UTF-8 bytes, or ids) to ``path`` atomically, as UTF-8."""
        from seqlab.io import atomic_write_bytes

        text = raw if isinstance(raw, (str, bytes, bytearray, memoryview)) else self.decode(raw)
        data = self._text(text, os.fspath(path)).encode("utf-8")
        if not data:
            raise InputError(f"{path}: refusing to write an empty file (reading it back would fail)")
        atomic_write_bytes(path, data)


def _line_start(text: str) -> int:
    """The last index i with text[i - 1] == "\\n" and text[i] not a space, or 0."""
    at = len(text) - 1
    while True:
        at = text.rfind("\n", 0, at)
        if at < 0:
            return 0
        if not text[at + 1].isspace():
            return at + 1
