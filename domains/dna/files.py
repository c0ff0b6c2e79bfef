"""FASTA and FASTQ files (plain or gzip) for ``DNAAdapter``: format detection, record and window streaming, and
writing. ``DnaFiles`` is the adapter's file side (a mixin: it encodes with the adapter's letter policy).

FASTA goes through Biopython's ``SimpleFastaParser`` (plain string tuples, no ``SeqRecord``), except
``iter_windows`` / ``iter_records``, which use a small line reader of our own so that a chromosome-scale record
streams window by window instead of being joined into one string (it is tested to equal the Biopython path).
FASTQ goes through ``fastq_records``. gzip is recognised by its magic bytes, FASTA/FASTQ by the first non-blank
character, never only by the file name.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.io import atomic_write_bytes

from .fastq import after_record, fastq_records, record_name
from .vocab import BOS, EOS, TEXT_ENCODING

__all__ = ["DnaFiles"]

_CHUNK_CHARS = 1 << 16  # the line reader encodes about this many bases at a time


class DnaFiles:
    """The file formats of ``DNAAdapter`` (see its docstring for the letter policy they apply)."""

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
        handle = io.TextIOWrapper(binary, encoding=TEXT_ENCODING, newline=None)
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
        raise CorruptFileError(
            f"{path}: not FASTA or FASTQ: the first line starts with {first!r} (FASTA records "
            "start with '>', FASTQ records with '@')"
        )

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
                for rid, seq in fastq_records(handle, path):
                    count += 1
                    yield rid, seq
            else:
                try:
                    for title, seq in SimpleFastaParser(handle):
                        rid = title.split(None, 1)[0] if title.strip() else ""
                        count, last = count + 1, rid
                        yield rid, seq
                except (OSError, EOFError, zlib.error) as exc:
                    raise CorruptFileError(f"{path}: corrupt gzip stream {after_record(count, last)}: {exc}") from None
        if count == 0:
            raise InputError(f"{path}: empty file (no {fmt.upper()} records)")

    def read(self, path: str | os.PathLike, format: str | None = None) -> list[tuple[str, str]]:
        """All records of a FASTA/FASTQ file as ``[(id, sequence), ...]`` (``encode`` takes this list); every
        letter is checked, an error names the file, record and position."""
        path = os.fspath(path)
        out = []
        for index, (rid, seq) in enumerate(self.records(path, format)):
            self._encode_text(seq, record_name(rid, index), path)
            out.append((rid, seq))
        return out

    def iter_windows(
        self, path: str | os.PathLike, window: int, format: str | None = None, return_soft_mask: bool = False
    ) -> Iterator[torch.Tensor]:
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
                yield self._window_out(
                    all_ids[start : start + window], all_soft[start : start + window], return_soft_mask
                )
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
            yield self._wrap(*self._encode_text(seq, record_name(rid, index), path))

    def iter_records(
        self, path: str | os.PathLike, window: int, format: str | None = None
    ) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
        """Stream ``(record id, windows of that record's encoded ids)`` pairs; a FASTA record is never held
        whole (chromosome-scale records stream through the line reader). Consume each record's windows
        before asking for the next record (``seqlab.pipelines.ingest`` does); ``torch.cat`` of a record's
        windows equals ``encode((id, seq))`` of that record."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be a positive int, got {window!r}")
        path = os.fspath(path)
        fmt = self._format(path, format)
        if fmt == "fastq":
            pieces = (
                (index, rid, self._wrap(*self._encode_text(seq, record_name(rid, index), path))[0])
                for index, (rid, seq) in enumerate(self.records(path, format))
            )
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
                        yield torch.from_numpy(ids[start : start + window].astype(np.int64))
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
                for line in handle:
                    number += 1
                    if line[0] == ">":
                        if index >= 0:
                            yield tag(close_record())
                        title = line[1:].rstrip()
                        index += 1
                        rid = title.split(None, 1)[0] if title.strip() else ""
                        name = record_name(rid, index)
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
                raise CorruptFileError(
                    f"{path}: corrupt gzip stream in record {name or '(none yet)'}, after line "
                    f"{number}: {exc} (bases decoded before it may be wrong too: the gzip "
                    "checksum covers the whole stream)"
                ) from None
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
            self._encode_text(seq, record_name(rid, index), path)
        text = io.StringIO()
        FastaWriter(text, wrap=line_width).write_file(
            SeqRecord(Seq(seq), id=rid, description="") for rid, seq in records
        )
        data = text.getvalue().encode(TEXT_ENCODING)
        if path.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        atomic_write_bytes(path, data)
