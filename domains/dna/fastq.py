"""FASTQ records, read by our own parser: it refuses what Biopython's ``SeqIO.parse(..., "fastq")`` refuses and
names the record and the line."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from seqlab.errors import CorruptFileError

__all__ = ["fastq_records"]


def record_name(rid: str, index: int) -> str:
    return f"{rid!r} (#{index + 1} in the file)"


def after_record(count: int, last: str | None) -> str:
    return "before the first record" if count == 0 else f"after record #{count} ({last!r})"


def fastq_records(handle, path: str) -> Iterator[tuple[str, str]]:
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
            where = f"in record #{count + 1} ({rid!r}, from line {start})" if start else after_record(count, last)
            raise CorruptFileError(
                f"{path}: corrupt gzip stream {where}, after line {number}: {exc} (bases "
                "decoded before it may be wrong too: the gzip checksum covers the whole "
                "stream)"
            ) from None
        if line is not None:
            number += 1
        return line

    def fail(line: int, what: str) -> CorruptFileError:
        record = f"record #{count + 1}" + (f" ({rid!r})" if rid else "")
        after = f" {after_record(count, last)}" if count else ""
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
                raise fail(number, "the file ends before the record's '+' line (truncated, or the '+' line is missing)")
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
            raise fail(
                quality[0][0] if quality else plus,
                f"the quality has {held} characters, the sequence {length} (they must be equal; "
                "truncated or damaged record)",
            )
        bad = first_bad(quality, lambda c: not 33 <= ord(c) <= 126)
        if bad is not None:
            raise fail(bad[0], f"quality character {bad[1]!r} is outside '!'..'~' (ASCII 33-126)")
        count, last = count + 1, rid
        yield rid, "".join(text for _, text in sequence)
