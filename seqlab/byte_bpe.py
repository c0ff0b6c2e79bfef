"""A byte-level BPE tokenizer (Hugging Face ``tokenizers``) whose tokens are exact byte strings.

Every byte ``b`` is the character ``chr(b)`` (Latin-1), so any byte string, valid UTF-8 or not, is a ``str`` the
BPE model reads, and every token is a string of such characters: its bytes are ``token.encode("latin-1")``. The
256 single bytes are always in the vocabulary (the trainer's initial alphabet), so no byte is ever unknown and
``decode(encode(data)) == data`` for every ``data``. A GPT-2-like regex splits the text into pieces (words with
their leading space, digit groups, punctuation, spaces; bytes >= 0x80 count as letters, so UTF-8 text keeps its
words whole) before merges are applied: merges never cross a piece.

The tokenizer is kept as its JSON (``to_json`` / ``ByteBPE.from_json``): the subword domain adapter stores it in
the model file's metadata, so one model file is self-contained. Loading parses JSON only (nothing is unpickled)
and refuses a JSON that would not give exact bytes back: another model kind, a normalizer, a pre-tokenizer that
is not a Split, dropout, byte fallback, added tokens, a token that is not a byte string, a missing byte.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable

from seqlab.errors import ConfigError

__all__ = ["MAX_VOCAB", "MIN_VOCAB", "SPLIT_PATTERN", "ByteBPE"]

#: the vocabulary sizes a ByteBPE may be trained to: the 256 bytes, up to 2**16 tokens
MIN_VOCAB, MAX_VOCAB = 256, 1 << 16
_HIGH = "\u0080-\u00ff"
#: how text is cut before merges (on the Latin-1 view of the bytes)
SPLIT_PATTERN = f" ?[A-Za-z{_HIGH}]+| ?[0-9]{{1,3}}| ?[^\\sA-Za-z0-9{_HIGH}]+|\\s+"


def _tokenizers():
    from seqlab._deps import require_module

    return require_module("tokenizers", "the byte-level BPE tokenizer (subword models)")


class ByteBPE:
    """Byte strings <-> subword ids. ``token_bytes[i]``: the bytes of token ``i`` (built once)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        table: list[bytes | None] = [None] * size
        vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: (item[1], item[0]))
        for token, index in vocab:  # strings first, then ids: the same complaint whatever the vocabulary's order
            if any(ord(c) > 0xFF for c in token):
                raise ConfigError(f"byte-level BPE: token {token!r} (id {index}) is not a byte string")
        for token, index in vocab:
            if not 0 <= index < size or table[index] is not None:
                raise ConfigError(f"byte-level BPE: token id {index} is out of range or used twice")
            table[index] = token.encode("latin-1")
        if any(t is None or not t for t in table):
            raise ConfigError("byte-level BPE: the token ids are not 0..n-1 with a non-empty byte string each")
        self.token_bytes: list[bytes] = [t for t in table if t is not None]
        single = {t[0] for t in self.token_bytes if len(t) == 1}
        missing = sorted(set(range(256)) - single)
        if missing:
            raise ConfigError(f"byte-level BPE: byte 0x{missing[0]:02X} has no token ({len(missing)} bytes missing)")
        self.vocab_size = size
        # tokens sorted by their bytes: the ones starting with a given byte string form one contiguous run
        self._order = sorted(range(size), key=lambda i: self.token_bytes[i])
        self._sorted = [self.token_bytes[i] for i in self._order]
        probe = bytes(range(256)) + b"the quick brown fox \xff\xfe\x00 caf\xc3\xa9 12345\r\n\t"
        if self.decode(self.encode(probe)) != probe:
            raise ConfigError("byte-level BPE: encoding does not give the bytes back exactly")

    # -- making one ------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[bytes], vocab_size: int) -> ByteBPE:
        """Learn merges on ``texts`` (byte strings) up to ``vocab_size`` tokens (the 256 bytes included)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
            raise ConfigError(f"subword vocab_size must be an int in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size!r}")
        tk = _tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(SPLIT_PATTERN), behavior="isolated")
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=[chr(i) for i in range(256)], show_progress=False
        )
        tokenizer.train_from_iterator((bytes(t).decode("latin-1") for t in texts), trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> ByteBPE:
        """A tokenizer from ``to_json``'s text; ConfigError when it is not a byte-level BPE of this kind."""
        if not isinstance(text, str):
            raise ConfigError(f"byte-level BPE: the tokenizer must be JSON text, got {type(text).__name__}")
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"byte-level BPE: the tokenizer is not valid JSON ({exc})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise ConfigError("byte-level BPE: the tokenizer JSON has no model")
        model, pre = spec["model"], spec.get("pre_tokenizer")
        problems = []
        if model.get("type") != "BPE":
            problems.append(f"model type {model.get('type')!r} (a BPE is needed)")
        if model.get("dropout") not in (None, 0, 0.0):
            problems.append("BPE dropout (encoding would be random)")
        if model.get("byte_fallback"):
            problems.append("byte fallback")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            problems.append("subword prefixes or suffixes")
        if spec.get("normalizer") is not None:
            problems.append("a normalizer (it would change the bytes)")
        if pre is not None and (not isinstance(pre, dict) or pre.get("type") != "Split"):
            problems.append("a pre-tokenizer that is not a Split")
        if spec.get("added_tokens"):
            problems.append("added tokens")
        if spec.get("post_processor") is not None or spec.get("truncation") or spec.get("padding"):
            problems.append("a post-processor, truncation or padding")
        if problems:
            raise ConfigError(f"byte-level BPE: the tokenizer JSON has {', '.join(problems)}")
        try:
            tokenizer = _tokenizers().Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise ConfigError(f"byte-level BPE: the tokenizer JSON does not load ({exc})") from None
        return cls(tokenizer)

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    # -- bytes <-> ids ---------------------------------------------------------------------------------------
    def encode(self, data: bytes) -> list[int]:
        return self._tokenizer.encode(bytes(data).decode("latin-1")).ids

    def encode_spans(self, data: bytes) -> tuple[list[int], list[int]]:
        """(ids, start byte of each token) of ``data``."""
        encoding = self._tokenizer.encode(bytes(data).decode("latin-1"))
        return encoding.ids, [start for start, _ in encoding.offsets]

    def encode_many(self, texts: list[bytes]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch([bytes(t).decode("latin-1") for t in texts])]

    def decode(self, ids: Iterable[int]) -> bytes:
        table = self.token_bytes
        return b"".join(table[int(i)] for i in ids)

    def starting_with(self, prefix: bytes) -> list[int]:
        """The ids of every token whose bytes start with ``prefix`` (never empty for a token's own bytes)."""
        lo = bisect.bisect_left(self._sorted, prefix)
        hi = lo
        while hi < len(self._sorted) and self._sorted[hi].startswith(prefix):
            hi += 1
        return self._order[lo:hi]
