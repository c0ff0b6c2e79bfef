"""DNA: FASTA and FASTQ (plain or gzip) as a character vocabulary of 5 specials and A, C, G, T, N.

FASTA goes through Biopython's ``SimpleFastaParser`` (plain string tuples, no ``SeqRecord``), except
``iter_windows`` / ``iter_records``, which use a small line reader of our own so that a chromosome-scale record
streams window by window instead of being joined into one string (it is tested to equal the Biopython path).
FASTQ goes through ``_fastq_records``, our reader, which refuses what Biopython's ``SeqIO.parse(..., "fastq")``
refuses and names the record and the line. gzip is recognised by its magic bytes, FASTA/FASTQ by the first
non-blank character, never only by the file name.

Letter policy (``DNAAdapter`` settings, see docs/domains/dna.md):

- ``A C G T N`` are bases; ``U`` (RNA) reads as ``T``.
- IUPAC ambiguity codes ``R Y S W K M B D H V`` become ``N`` (``iupac="n"``, the default) or raise
  (``iupac="error"``).
- Any other letter (``X``, ``-``, digits, ...) raises an ``InputError`` naming file, record and position
  (``invalid="error"``, the default), or becomes ``N`` (``invalid="n"``) or ``<unk>`` (``invalid="unk"``).
- Lower case (soft-masked repeats) reads as the upper-case base (``lowercase="upper"``, the default; the mask
  can be returned alongside) or as ``N`` (``lowercase="n"``, hard masking).

Reverse-complement equivariance follows Caduceus (Schiff et al. 2024): a model ``f`` is RC-equivariant when
``f(rc(x)) == rc(f(x))``, where ``rc`` of token ids reverses the sequence and complements each id, and ``rc``
of per-position logits reverses the sequence and permutes the vocabulary channels by the same complement.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, CorruptFileError, InputError, StateError
from seqlab.io import atomic_write_bytes
from seqlab.train import ArraySource, WindowSource

from .base import InputSpec, TokenAdapter, register_adapter, token_bits

__all__ = [
    "BOS", "COMPLEMENT", "EOS", "MASK", "PAD", "UNK", "VOCAB", "A", "C", "DNAAdapter", "G", "MaskedBaseSource",
    "N", "RCAugmentedSource", "RCEquivariantLM", "T", "mask_bases", "reverse_complement",
    "reverse_complement_logits",
]

# The vocabulary is fixed (checkpoints depend on it): ids 0-4 are specials, 5-9 the bases.
VOCAB = ("<pad>", "<mask>", "<unk>", "<bos>", "<eos>", "A", "C", "G", "T", "N")
PAD, MASK, UNK, BOS, EOS, A, C, G, T, N = range(10)
SPECIALS = (PAD, MASK, UNK, BOS, EOS)
# Complement of each id: A<->T, C<->G, N->N, every special is its own complement.
COMPLEMENT = (PAD, MASK, UNK, BOS, EOS, T, G, C, A, N)
IUPAC_AMBIGUOUS = "RYSWKMBDHV"

_BAD_LETTER = -1   # lookup-table codes that stop encoding with an error
_BAD_IUPAC = -2
_TEXT_ENCODING = "latin-1"  # one byte = one character, so string positions are byte positions
_CHUNK_CHARS = 1 << 16      # the line reader encodes about this many bases at a time


# ------------------------------------------------------------------------------------------------------
# reverse complement on token ids and logits


def _complement_table(device=None) -> torch.Tensor:
    return torch.tensor(COMPLEMENT, dtype=torch.long, device=device)


def reverse_complement(ids: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Reverse ``ids`` along ``dim`` and complement each id (A<->T, C<->G, N and specials fixed).

    An involution: ``reverse_complement(reverse_complement(x)) == x``. Specials keep their id but move with
    the reversal (a ``<bos>`` at the start ends up at the end), which is the group action the RC-equivariant
    model is defined by; for augmentation, apply it to windows of bases (``RCAugmentedSource``).
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"reverse_complement needs an integer tensor of token ids, got {getattr(ids, 'dtype', ids)!r}")
    bad = (ids < 0) | (ids >= len(VOCAB))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(f"reverse_complement: id {int(ids[where])} at position {where} is outside [0, {len(VOCAB)})")
    return _complement_table(ids.device)[ids.long()].flip(dim).to(ids.dtype)


def reverse_complement_logits(logits: torch.Tensor) -> torch.Tensor:
    """The reverse complement of per-position vocabulary scores (b, l, vocab): reverse the length axis and
    permute the vocabulary channels by the complement, so that ``argmax`` commutes with ``reverse_complement``."""
    if logits.shape[-1] != len(VOCAB):
        raise InputError(f"reverse_complement_logits needs a last axis of {len(VOCAB)} vocabulary scores, "
                         f"got shape {tuple(logits.shape)}")
    return logits.flip(-2)[..., _complement_table(logits.device)]


# ------------------------------------------------------------------------------------------------------
# the adapter


@register_adapter
class DNAAdapter(TokenAdapter):
    """Nucleotide sequences as ids over ``VOCAB`` (``<pad> <mask> <unk> <bos> <eos> A C G T N``).

    Settings (all JSON-able, recorded in checkpoints):

    - ``iupac``: ``"n"`` maps ambiguity codes R Y S W K M B D H V to N; ``"error"`` refuses them.
    - ``invalid``: letters outside IUPAC: ``"error"`` (InputError naming file, record, position), ``"n"`` or
      ``"unk"``.
    - ``lowercase``: soft-masked (lower-case) bases: ``"upper"`` keeps the base (``encode(...,
      return_soft_mask=True)`` returns the mask too) or ``"n"`` hard-masks them to N.
    - ``add_bos_eos``: wrap every record in ``<bos> ... <eos>`` (recommended for files of many short reads).
    """

    name: ClassVar[str] = "dna"
    metric_name: ClassVar[str] = "bits_per_base"
    vocab: ClassVar[tuple[str, ...]] = VOCAB
    # generation samples bases only (decode drops the specials) and stops at <eos>
    special_ids: ClassVar[tuple[int, ...]] = SPECIALS
    eos_id: ClassVar[int | None] = EOS

    def __init__(self, iupac: str = "n", invalid: str = "error", lowercase: str = "upper",
                 add_bos_eos: bool = False) -> None:
        for field, value, allowed in (("iupac", iupac, ("n", "error")), ("invalid", invalid, ("error", "n", "unk")),
                                      ("lowercase", lowercase, ("upper", "n"))):
            if value not in allowed:
                raise ConfigError(f"DNAAdapter.{field} must be one of {allowed}, got {value!r}")
        if not isinstance(add_bos_eos, bool):
            raise ConfigError(f"DNAAdapter.add_bos_eos must be True or False, got {add_bos_eos!r}")
        self.iupac, self.invalid, self.lowercase, self.add_bos_eos = iupac, invalid, lowercase, add_bos_eos
        self._lut = self._lookup_table()

    def settings(self) -> dict[str, Any]:
        return {"iupac": self.iupac, "invalid": self.invalid, "lowercase": self.lowercase,
                "add_bos_eos": self.add_bos_eos}

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec("tokens", vocab_size=len(VOCAB))

    # -- letters -> ids --------------------------------------------------------------------------------
    def _lookup_table(self) -> np.ndarray:
        """byte -> id, or a negative code that makes encoding raise."""
        fallback = {"error": _BAD_LETTER, "n": N, "unk": UNK}[self.invalid]
        lut = np.full(256, fallback, dtype=np.int16)
        upper = {"A": A, "C": C, "G": G, "T": T, "U": T, "N": N}
        upper.update({code: (N if self.iupac == "n" else _BAD_IUPAC) for code in IUPAC_AMBIGUOUS})
        for letter, value in upper.items():
            lut[ord(letter)] = value
            lower = value if self.lowercase == "upper" or value < 0 else N
            lut[ord(letter.lower())] = lower
        return lut

    def _encode_text(self, text: str, record: str, where: str, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Bases of one record (or a piece of one, starting at base ``offset``) -> (ids uint8, soft-mask bool)."""
        raw = np.frombuffer(text.encode(_TEXT_ENCODING, errors="replace"), dtype=np.uint8)
        ids = self._lut[raw]
        if ids.size and int(ids.min()) < 0:
            pos = int(np.argmax(ids < 0))
            letter = text[pos]
            if ids[pos] == _BAD_IUPAC:
                why = (f"ambiguous IUPAC code {letter!r} (iupac='error'; DNAAdapter(iupac='n') reads it as N)")
            else:
                why = (f"invalid letter {letter!r} (not a nucleotide or IUPAC code; DNAAdapter(invalid='n' or "
                       "'unk') maps such letters instead of raising)")
            raise InputError(f"{where}: record {record}, position {offset + pos + 1} (1-based): {why}")
        soft = (raw >= ord("a")) & (raw <= ord("z"))
        return ids.astype(np.uint8), soft

    def _wrap(self, ids: np.ndarray, soft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.add_bos_eos:
            return ids, soft
        return (np.concatenate([np.array([BOS], np.uint8), ids, np.array([EOS], np.uint8)]),
                np.concatenate([[False], soft, [False]]))

    @staticmethod
    def _as_records(raw) -> list[tuple[str, str]]:
        """A str, an (id, sequence) pair, a SeqRecord, or an iterable of those -> [(id, sequence), ...]."""
        def one(item, index):
            if isinstance(item, str):
                return f"#{index + 1}", item
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
                return str(item[0]), item[1]
            if hasattr(item, "seq") and hasattr(item, "id"):  # a Bio.SeqRecord
                return str(item.id), str(item.seq)
            raise InputError(f"DNA record {index + 1}: expected a str, an (id, sequence) pair or a SeqRecord, "
                             f"got {type(item).__name__}")

        if isinstance(raw, str) or (isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[1], str)) \
                or hasattr(raw, "seq"):
            return [one(raw, 0)]
        try:
            items = list(raw)
        except TypeError:
            raise InputError(f"DNA input must be a str, an (id, sequence) pair, a SeqRecord or an iterable of "
                             f"them, got {type(raw).__name__}") from None
        return [one(item, i) for i, item in enumerate(items)]

    def encode(self, raw, return_soft_mask: bool = False):
        """Sequence(s) -> 1-D int64 ids; records are concatenated (each wrapped in bos/eos if ``add_bos_eos``).

        ``return_soft_mask=True`` also returns a bool tensor, True where the input letter was lower case."""
        ids, soft = [], []
        for rid, seq in self._as_records(raw):
            i, s = self._wrap(*self._encode_text(seq, repr(rid), "sequence"))
            ids.append(i)
            soft.append(s)
        out = torch.from_numpy(np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64))
        if return_soft_mask:
            return out, torch.from_numpy(np.concatenate(soft) if soft else np.zeros(0, bool))
        return out

    def decode(self, tensor: torch.Tensor, soft_mask: torch.Tensor | None = None, specials: bool = False) -> str:
        """ids -> letters. Specials are dropped (``specials=True`` writes them as ``<pad>``, ``<bos>``, ...);
        ``soft_mask`` (from ``encode(..., return_soft_mask=True)``) restores lower case."""
        ids = self.check_ids(torch.as_tensor(tensor).reshape(-1), "DNAAdapter.decode")
        table = np.array(VOCAB if specials else ("",) * len(SPECIALS) + VOCAB[len(SPECIALS):], dtype=object)
        letters = table[ids.numpy()]
        if soft_mask is not None:
            soft_mask = torch.as_tensor(soft_mask).reshape(-1)
            if soft_mask.shape != ids.shape:
                raise InputError(f"DNAAdapter.decode: soft_mask has {soft_mask.numel()} entries, ids {ids.numel()}")
            lower = soft_mask.numpy().astype(bool) & (ids.numpy() >= A)
            letters[lower] = [c.lower() for c in letters[lower]]
        return "".join(letters.tolist())

    def decode_records(self, tensor: torch.Tensor) -> list[str]:
        """ids of ``<bos> seq <eos>`` records (``add_bos_eos=True``) -> one string per record."""
        ids = self.check_ids(torch.as_tensor(tensor).reshape(-1), "DNAAdapter.decode_records").tolist()
        out, current, open_ = [], [], False
        for i in ids:
            if i == BOS:
                current, open_ = [], True
            elif i == EOS:
                out.append("".join(current))
                current, open_ = [], False
            elif i >= A:
                current.append(VOCAB[i])
        if open_ or current:
            out.append("".join(current))
        return out

    # -- files -----------------------------------------------------------------------------------------
    @contextmanager
    def _open_text(self, path: str):
        """Text handle on ``path`` (gzip recognised by its magic bytes), with gzip damage as CorruptFileError."""
        try:
            with open(path, "rb") as probe:
                magic = probe.read(2)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{path}: is a directory, not a FASTA/FASTQ file") from None
        binary = gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
        handle = io.TextIOWrapper(binary, encoding=_TEXT_ENCODING, newline=None)
        try:
            yield handle
        finally:
            handle.close()

    def detect_format(self, path: str | os.PathLike) -> str:
        """``"fasta"`` or ``"fastq"``, from the first character ('>' or '@') of the first line that is not blank
        or a ``;`` / ``#`` comment; gzip or not. Anything else is a CorruptFileError."""
        path = os.fspath(path)
        with self._open_text(path) as handle:
            try:
                for line in handle:
                    # blank lines and ';' / '#' comment lines may precede the first FASTA record
                    if line.strip() and line[0] not in ";#":
                        first = line.lstrip()[0]
                        break
                else:
                    raise InputError(f"{path}: empty file (no FASTA or FASTQ records)")
            except (OSError, EOFError, zlib.error) as exc:
                raise CorruptFileError(f"{path}: corrupt gzip stream before the first record: {exc}") from None
        if first == ">":
            return "fasta"
        if first == "@":
            return "fastq"
        raise CorruptFileError(f"{path}: not FASTA or FASTQ: the first line starts with {first!r} (FASTA records "
                               "start with '>', FASTQ records with '@')")

    def _format(self, path: str, format: str | None) -> str:
        found = self.detect_format(path)
        if format is not None:
            if format not in ("fasta", "fastq"):
                raise ConfigError(f"format must be 'fasta', 'fastq' or None (detect), got {format!r}")
            if format != found:
                raise CorruptFileError(f"{path}: format={format!r} was asked for, but the file is {found.upper()}")
        return found

    def records(self, path: str | os.PathLike, format: str | None = None) -> Iterator[tuple[str, str]]:
        """Stream ``(id, sequence)`` records (the id is the title's first word; letters are not checked here).

        FASTQ is read by ``_fastq_records``, which refuses what Biopython's ``SeqIO.parse(..., "fastq")``
        refuses (structure, titles, qualities: see docs/domains/dna.md) with the record and line named;
        qualities are checked, not returned."""
        from Bio.SeqIO.FastaIO import SimpleFastaParser

        path = os.fspath(path)
        fmt = self._format(path, format)
        count, last = 0, None
        with self._open_text(path) as handle:
            if fmt == "fastq":
                for rid, seq in _fastq_records(handle, path):
                    count += 1
                    yield rid, seq
            else:
                try:
                    for title, seq in SimpleFastaParser(handle):
                        rid = title.split(None, 1)[0] if title.strip() else ""
                        count, last = count + 1, rid
                        yield rid, seq
                except (OSError, EOFError, zlib.error) as exc:
                    raise CorruptFileError(f"{path}: corrupt gzip stream {_after(count, last)}: {exc}") from None
        if count == 0:
            raise InputError(f"{path}: empty file (no {fmt.upper()} records)")

    def read(self, path: str | os.PathLike, format: str | None = None) -> list[tuple[str, str]]:
        """All records of a FASTA/FASTQ file as ``[(id, sequence), ...]`` (``encode`` takes this list); every
        letter is checked, an error names the file, record and position."""
        path = os.fspath(path)
        out = []
        for index, (rid, seq) in enumerate(self.records(path, format)):
            self._encode_text(seq, _record_name(rid, index), path)
            out.append((rid, seq))
        return out

    def iter_windows(self, path: str | os.PathLike, window: int, format: str | None = None,
                     return_soft_mask: bool = False) -> Iterator[torch.Tensor]:
        """Encoded ids of the whole file in windows of ``window`` (the last may be shorter), across records.

        FASTA goes through a line reader that holds about 64 k bases at a time, however long the record;
        FASTQ streams record by record. ``return_soft_mask=True`` yields ``(ids, soft_mask)`` pairs."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be a positive int, got {window!r}")
        path = os.fspath(path)
        fmt = self._format(path, format)
        pieces = self._fasta_pieces(path) if fmt == "fasta" else self._fastq_pieces(path, format)
        buf_ids: list[np.ndarray] = []
        buf_soft: list[np.ndarray] = []
        held = 0
        for ids, soft in pieces:
            buf_ids.append(ids)
            buf_soft.append(soft)
            held += ids.size
            if held < window:
                continue
            all_ids, all_soft = np.concatenate(buf_ids), np.concatenate(buf_soft)
            stop = (held // window) * window
            for start in range(0, stop, window):
                yield self._window_out(all_ids[start:start + window], all_soft[start:start + window],
                                       return_soft_mask)
            buf_ids, buf_soft, held = [all_ids[stop:]], [all_soft[stop:]], held - stop
        if held:
            yield self._window_out(np.concatenate(buf_ids), np.concatenate(buf_soft), return_soft_mask)

    @staticmethod
    def _window_out(ids: np.ndarray, soft: np.ndarray, return_soft_mask: bool):
        # copies: a window must not pin the larger buffer it was cut from
        t = torch.from_numpy(ids.astype(np.int64))
        return (t, torch.from_numpy(soft.copy())) if return_soft_mask else t

    def _fastq_pieces(self, path: str, format: str | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for index, (rid, seq) in enumerate(self.records(path, format)):
            yield self._wrap(*self._encode_text(seq, _record_name(rid, index), path))

    def iter_records(self, path: str | os.PathLike, window: int,
                     format: str | None = None) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
        """Stream ``(record id, windows of that record's encoded ids)`` pairs; a FASTA record is never held
        whole (chromosome-scale records stream through the line reader). Consume each record's windows
        before asking for the next record (``seqlab.pipelines.ingest`` does); ``torch.cat`` of a record's
        windows equals ``encode((id, seq))`` of that record."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be a positive int, got {window!r}")
        path = os.fspath(path)
        fmt = self._format(path, format)
        if fmt == "fastq":
            pieces = ((index, rid, self._wrap(*self._encode_text(seq, _record_name(rid, index), path))[0])
                      for index, (rid, seq) in enumerate(self.records(path, format)))
        else:
            pieces = ((index, rid, ids) for index, rid, ids, _ in self._fasta_pieces(path, with_records=True))
        current: list = [next(pieces, None)]

        def windows(index: int) -> Iterator[torch.Tensor]:
            buf, held = [], 0
            while current[0] is not None and current[0][0] == index:
                buf.append(current[0][2])
                held += current[0][2].size
                current[0] = next(pieces, None)
                if held >= window:
                    ids = np.concatenate(buf)
                    stop = (held // window) * window
                    for start in range(0, stop, window):
                        yield torch.from_numpy(ids[start:start + window].astype(np.int64))
                    buf, held = [ids[stop:]], held - stop
            if held:
                yield torch.from_numpy(np.concatenate(buf).astype(np.int64))

        while current[0] is not None:
            index, rid = current[0][0], current[0][1]
            record = windows(index)
            yield rid, record
            for _ in record:  # the caller skipped (part of) this record: move past it
                pass

    def _fasta_pieces(self, path: str, with_records: bool = False) -> Iterator[tuple]:
        """The line reader: same records and letters as ``SimpleFastaParser`` (text before the first '>' is
        skipped, lines are right-stripped, spaces and stray carriage returns dropped), without joining a
        record into one string."""
        index, name, rid, offset, count, chunk, held = -1, "", "", 0, 0, [], 0

        def tag(piece):
            return (index, rid, *piece) if with_records else piece

        def flush():
            nonlocal offset, chunk, held
            text = "".join(chunk)
            chunk, held = [], 0
            ids, soft = self._encode_text(text, name, path, offset)
            offset += len(text)
            return ids, soft

        def close_record():
            ids, soft = flush()
            if self.add_bos_eos:
                ids = np.concatenate([ids, np.array([EOS], np.uint8)])
                soft = np.concatenate([soft, [False]])
            return ids, soft

        number = 0
        with self._open_text(path) as handle:
            try:
                for number, line in enumerate(handle, 1):
                    if line[0] == ">":
                        if index >= 0:
                            yield tag(close_record())
                        title = line[1:].rstrip()
                        index += 1
                        rid = title.split(None, 1)[0] if title.strip() else ""
                        name = _record_name(rid, index)
                        offset, count = 0, count + 1
                        if self.add_bos_eos:
                            yield tag((np.array([BOS], np.uint8), np.zeros(1, bool)))
                        continue
                    if index < 0:
                        continue
                    piece = line.rstrip().replace(" ", "").replace("\r", "")
                    chunk.append(piece)
                    held += len(piece)
                    if held >= _CHUNK_CHARS:
                        yield tag(flush())
            except (OSError, EOFError, zlib.error) as exc:
                raise CorruptFileError(f"{path}: corrupt gzip stream in record {name or '(none yet)'}, after line "
                                       f"{number}: {exc} (bases decoded before it may be wrong too: the gzip "
                                       "checksum covers the whole stream)") from None
            if index >= 0:
                yield tag(close_record())
        if count == 0:
            raise InputError(f"{path}: empty file (no FASTA records)")

    def write(self, path: str | os.PathLike, raw, line_width: int = 60) -> None:
        """Write records (what ``read`` returns, a str, or SeqRecords) as FASTA, gzip-compressed when the name
        ends in ``.gz``; letters are checked first and the file is replaced atomically."""
        from Bio.Seq import Seq
        from Bio.SeqIO.FastaIO import FastaWriter
        from Bio.SeqRecord import SeqRecord

        path = os.fspath(path)
        plain = os.path.basename(path).lower().removesuffix(".gz")
        if plain.endswith((".fastq", ".fq")):
            raise ConfigError(f"{path}: DNAAdapter.write writes FASTA only (it has no qualities for FASTQ)")
        records = self._as_records(raw)
        for index, (rid, seq) in enumerate(records):
            self._encode_text(seq, _record_name(rid, index), path)
        text = io.StringIO()
        FastaWriter(text, wrap=line_width).write_file(
            SeqRecord(Seq(seq), id=rid, description="") for rid, seq in records)
        data = text.getvalue().encode(_TEXT_ENCODING)
        if path.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        atomic_write_bytes(path, data)

    # -- models ----------------------------------------------------------------------------------------
    def build_model(self, config: BackboneConfig, rc_equivariant: bool | str = False, **options) -> nn.Module:
        """A ``LanguageModel`` over ``VOCAB``; ``rc_equivariant`` wraps it so that ``f(rc(x)) == rc(f(x))``.

        ``rc_equivariant``: False; True or ``"ps"`` (parameter sharing in every layer, as Caduceus-PS);
        ``"conjoin"`` (one shared model run on x and rc(x), outputs combined, as post-hoc conjoining). Both
        see the whole sequence at once (the rc pass runs backwards), so they need
        ``BackboneConfig(bidirectional=True)`` and a masked-LM objective (``mask_bases``), never next-base
        prediction."""
        model = super().build_model(config, **options)
        if rc_equivariant is False:
            return model
        mode = "ps" if rc_equivariant is True else rc_equivariant
        if mode not in ("ps", "conjoin"):
            raise ConfigError(f"rc_equivariant must be False, True, 'ps' or 'conjoin', got {rc_equivariant!r}")
        if not config.bidirectional:
            raise ConfigError("rc_equivariant needs BackboneConfig(bidirectional=True): an RC-equivariant model "
                              "sees both strands, hence the whole sequence, so it is trained as a masked LM; "
                              "a causal next-base model cannot be RC-equivariant")
        wrapped = RCEquivariantLM(model, mode)
        wrapped.adapter_info = {**self.info(), "model": {"rc_equivariant": mode}}
        return wrapped

    # -- objective and metric --------------------------------------------------------------------------
    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (nats) over every target that is not ``<pad>`` or -100 (masked-LM "not asked")."""
        logits = output.logits if hasattr(output, "logits") else output
        targets = targets.masked_fill(targets == PAD, -100)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def bits_per_base(self, output, targets: torch.Tensor) -> float:
        """Mean -log2 p(target) over targets that are bases (A C G T N); specials and -100 are not counted."""
        logits = output.logits if hasattr(output, "logits") else output
        keep = targets >= A
        if not bool(keep.any()):
            raise InputError("bits_per_base: no base among the targets (only specials or -100)")
        logp = torch.log_softmax(logits.float(), -1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return float(-picked[keep].mean()) / math.log(2)

    def metric(self, output, targets: torch.Tensor) -> float:
        """Bits per base (uniform over A/C/G/T: 2.0; lower is better)."""
        return self.bits_per_base(output, targets)

    def position_metric(self, output, targets: torch.Tensor) -> torch.Tensor:
        """-log2 p(target) of every target (b, t); targets that are not bases (specials, -100) are NaN."""
        return token_bits(output, targets.masked_fill(targets < A, -100))

    def metric_weight(self, targets: torch.Tensor) -> int:
        """Bits per base count bases only, not specials or -100."""
        return int((targets >= A).sum())

    def perplexity(self, output, targets: torch.Tensor) -> float:
        """Per-base perplexity, ``2 ** bits_per_base`` (uniform over A/C/G/T: 4.0)."""
        return 2.0 ** self.bits_per_base(output, targets)

    def uniform_baseline(self) -> float:
        return 2.0


def _record_name(rid: str, index: int) -> str:
    return f"{rid!r} (#{index + 1} in the file)"


def _after(count: int, last: str | None) -> str:
    return "before the first record" if count == 0 else f"after record #{count} ({last!r})"


def _fastq_records(handle, path: str) -> Iterator[tuple[str, str]]:
    """``(id, sequence)`` of each FASTQ record; refuses what Biopython's ``SeqIO.parse(handle, "fastq")``
    refuses, naming the record and the line: a record starts with an '@' line with a title; sequence lines
    run to the '+' line, which may repeat the title (then exactly); the sequence holds no space or control
    character; quality lines follow until a line starting with '@' once there are as many quality characters
    as bases; the quality has exactly that many characters, each in '!'..'~' (ASCII 33-126). A gzip stream
    that fails to decode (its checksum is checked at the end) names the record being read."""
    lines = iter(handle)
    number, count, last = 0, 0, None
    rid, start = "", 0

    def read() -> str | None:
        nonlocal number
        try:
            line = next(lines, None)
        except (OSError, EOFError, zlib.error) as exc:
            where = f"in record #{count + 1} ({rid!r}, from line {start})" if start else _after(count, last)
            raise CorruptFileError(f"{path}: corrupt gzip stream {where}, after line {number}: {exc} (bases "
                                   "decoded before it may be wrong too: the gzip checksum covers the whole "
                                   "stream)") from None
        if line is not None:
            number += 1
        return line

    def fail(line: int, what: str) -> CorruptFileError:
        record = f"record #{count + 1}" + (f" ({rid!r})" if rid else "")
        after = f" {_after(count, last)}" if count else ""
        return CorruptFileError(f"{path}: malformed FASTQ{after}: line {line}, {record}: {what}")

    def first_bad(parts: list[tuple[int, str]], bad) -> tuple[int, str] | None:
        for at, text in parts:
            for char in text:
                if bad(char):
                    return at, char
        return None

    line = read()
    while line is not None:
        rid, start = "", number
        if line[0] != "@":
            raise fail(number, f"a record starts with an '@' title line, this line starts with {line[:1]!r}")
        title = line[1:].rstrip()
        if not title.split():
            raise fail(number, "the '@' line has no title (record id)")
        rid = title.split(None, 1)[0]
        sequence: list[tuple[int, str]] = []
        while True:
            line = read()
            if line is None:
                raise fail(number, "the file ends before the record's '+' line (truncated, or the '+' line is "
                                   "missing)")
            if line[0] == "+":
                break
            sequence.append((number, line.rstrip()))
        plus = number
        repeated = line[1:].rstrip()
        if repeated and repeated != title:
            raise fail(plus, f"the '+' line repeats another title ({repeated!r}; the '@' line says {title!r})")
        bad = first_bad(sequence, lambda c: c == " " or not c.isprintable())
        if bad is not None:
            raise fail(bad[0], f"whitespace or control character {bad[1]!r} in the sequence")
        length = sum(len(text) for _, text in sequence)
        quality: list[tuple[int, str]] = []
        held = 0
        line = read()
        if line is None:
            raise fail(plus, "the file ends after the '+' line: the quality line is missing (truncated)")
        while line is not None and not (line[0] == "@" and held >= length):
            text = line.rstrip()
            quality.append((number, text))
            held += len(text)
            line = read()
        bad = first_bad(quality, lambda c: not c.isascii())
        if bad is not None:
            raise fail(bad[0], f"non-ASCII character {bad[1]!r} in the quality")
        if held != length:
            raise fail(quality[0][0] if quality else plus,
                       f"the quality has {held} characters, the sequence {length} (they must be equal; "
                       "truncated or damaged record)")
        bad = first_bad(quality, lambda c: not 33 <= ord(c) <= 126)
        if bad is not None:
            raise fail(bad[0], f"quality character {bad[1]!r} is outside '!'..'~' (ASCII 33-126)")
        count, last = count + 1, rid
        yield rid, "".join(text for _, text in sequence)


# ------------------------------------------------------------------------------------------------------
# reverse-complement equivariant model


def _rc_hidden(h: torch.Tensor) -> torch.Tensor:
    """The group action on hidden states (b, l, d): reverse the sequence and the channels (Caduceus's choice,
    which pairs channel i with channel d-1-i as the 'other strand')."""
    return h.flip(-2, -1)


class RCEquivariantLM(nn.Module):
    """A ``LanguageModel`` made reverse-complement equivariant with shared weights (see ``build_model``).

    ``mode="ps"``: every piece (embedding, each residual block, the final norm, the head) is symmetrised:
    ``g(h) = (f(h) + R(f(R(h)))) / 2`` with ``R`` reversing length and channels; the embedding maps rc of ids to
    ``R`` of hiddens and the head maps ``R`` back to rc of logits. The strands meet in every layer.
    ``mode="conjoin"``: the unchanged model runs on x and rc(x) and the rc output is mapped back.
    Either way ``model(rc(x)).logits == reverse_complement_logits(model(x).logits)`` up to float rounding.
    """

    def __init__(self, model: nn.Module, mode: str = "ps") -> None:
        super().__init__()
        if mode not in ("ps", "conjoin"):
            raise ConfigError(f"RCEquivariantLM mode must be 'ps' or 'conjoin', got {mode!r}")
        if getattr(model, "vocab_size", None) != len(VOCAB):
            raise ConfigError(f"RCEquivariantLM needs a LanguageModel over the {len(VOCAB)}-id DNA vocabulary")
        self.model, self.mode = model, mode
        self.register_buffer("complement", _complement_table(), persistent=False)

    @property
    def config(self) -> BackboneConfig:
        return self.model.config

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def set_backend(self, backend: str) -> RCEquivariantLM:
        self.model.set_backend(backend)
        return self

    def _rc_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.complement[ids].flip(-1)

    @staticmethod
    def _both(fn, h: torch.Tensor) -> torch.Tensor:
        # x and R(x) in one batch: one call, and the same weights by construction
        out = fn(torch.cat([h, _rc_hidden(h)], 0))
        fwd, rev = out.chunk(2, 0)
        return (fwd + _rc_hidden(rev)) / 2

    def forward(self, input_ids: torch.Tensor, state=None, return_state: bool = True):
        from seqlab.models import ModelOutput

        if state is not None:
            raise StateError("an RC-equivariant model sees both strands of the whole sequence and has no streaming "
                             "state: call it with state=None")
        lm = self.model
        input_ids = lm._check_ids(input_ids, 2)
        both_ids = torch.cat([input_ids, self._rc_ids(input_ids)], 0)
        if self.mode == "conjoin":
            out = lm(both_ids, None, return_state=False)
            fwd, rev = out.logits.chunk(2, 0)
            hf, hr = out.hidden.chunk(2, 0)
            logits = (fwd + rev.flip(-2)[..., self.complement]) / 2
            return ModelOutput(logits, None, (hf + _rc_hidden(hr)) / 2)
        fwd, rev = lm.embeddings(both_ids).chunk(2, 0)
        h = (fwd + _rc_hidden(rev)) / 2
        for layer in lm.backbone.layers:
            h = self._both(lambda t, layer=layer: layer(t, None, False)[0], h)
        norm = lm.backbone.norm_f
        h = self._both(lambda t: norm(t.to(norm.weight.dtype)), h)
        logits = (lm.head(h) + lm.head(h.flip(-1))[..., self.complement]) / 2
        return ModelOutput(logits, None, h)


# ------------------------------------------------------------------------------------------------------
# training helpers: masked-LM windows and RC augmentation


def mask_bases(ids: torch.Tensor, rate: float = 0.15, generator: torch.Generator | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM pair: ``(inputs, targets)`` with about ``rate`` of the base positions replaced by ``<mask>``
    in ``inputs``; ``targets`` holds the true id there and -100 elsewhere (ignored by loss and metric)."""
    if not 0 < rate <= 1:
        raise ConfigError(f"mask_bases rate must be in (0, 1], got {rate!r}")
    chosen = (torch.rand(ids.shape, generator=generator) < rate).to(ids.device) & (ids >= A)
    return ids.masked_fill(chosen, MASK), torch.where(chosen, ids, torch.full_like(ids, -100))


class MaskedBaseSource(ArraySource):
    """Trainer source for masked-LM training (``TrainConfig(carry_state=False)``): window ``i`` is
    ``batch_size`` rows of ``window`` ids cut from ``ids`` like ``SequenceSource`` (the same ``ArraySource``
    windows, without the one-element overlap), masked by ``mask_bases`` with a generator seeded by
    ``(seed, i)``, so a resumed run sees the same masks."""

    overlap = 0

    def __init__(self, ids: torch.Tensor, batch_size: int, window: int, rate: float = 0.15, seed: int = 0) -> None:
        ids = torch.as_tensor(ids).reshape(-1).long()
        self.rate, self.seed = rate, int(seed)
        batch_size = int(batch_size)
        length = ids.numel() // batch_size
        self._setup(ids, ids[:length * batch_size].reshape(batch_size, length), batch_size, window)
        if self.num_windows == 0:
            raise InputError(f"MaskedBaseSource: {ids.numel()} ids are too few for one window of {window} in each "
                             f"of {batch_size} rows")

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.span(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return mask_bases(rows, self.rate, generator)


class RCAugmentedSource:
    """Reverse-complement augmentation of a next-element source (e.g. ``SequenceSource``): each row of window
    ``i`` is replaced, with probability ``p``, by the reverse complement of its ``window + 1`` ids (then split
    into inputs and targets again), decided by a generator seeded by ``(seed, i)``. A flipped row is a different
    stretch of the other strand, so train with ``TrainConfig(carry_state=False)``."""

    def __init__(self, source, p: float = 0.5, seed: int = 0) -> None:
        if not 0 <= p <= 1:
            raise ConfigError(f"RCAugmentedSource p must be in [0, 1], got {p!r}")
        if not isinstance(source, WindowSource):
            raise ConfigError(f"RCAugmentedSource wraps a training source (a WindowSource such as SequenceSource), "
                              f"got {type(source).__name__}")
        self.source, self.p, self.seed = source, p, int(seed)
        self.batch_size, self.num_windows = source.batch_size, source.num_windows

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.source.window(index)
        chunk = torch.cat([inputs, targets[:, -1:]], 1)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        flip = torch.rand(chunk.shape[0], generator=generator) < self.p
        chunk = torch.where(flip.unsqueeze(1), reverse_complement(chunk, -1), chunk)
        return chunk[:, :-1], chunk[:, 1:]
