"""Ingest is all or nothing per input file: a gzip whose bases were altered (its CRC is checked only at the end of
the stream), a FASTQ failing part way, a failed replacement, a multi-file ingest, kill -9 in the middle of a file,
any byte flipped or any cut of a gzip FASTA; the range checks of ``seqlab ingest`` and the library."""

from __future__ import annotations

import gzip
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab.cli import main
from seqlab.domains.dna import DNAAdapter
from seqlab.errors import ConfigError, CorruptFileError, SeqlabError
from seqlab.pipelines import SequenceStore, ingest
from seqlab.pipelines.store_staging import _staging

STAGING = "_seqlab_staging"  # where replacements wait for their file to be verified

RNG = random.Random(15)
RECORDS = [(f"chr{k}", "".join(RNG.choice("ACGT") for _ in range(1500))) for k in range(5)]


def fasta(records) -> bytes:
    return "".join(
        f">{rid}\n" + "".join(seq[i : i + 60] + "\n" for i in range(0, len(seq), 60)) for rid, seq in records
    ).encode()


def fastq(records) -> bytes:
    return "".join(f"@{rid}\n{seq}\n+\n{'I' * len(seq)}\n" for rid, seq in records).encode()


def stored(path: Path) -> dict[str, str]:
    """Every sequence of the store (complete or not) as letters; damaged ones and staged leftovers fail the test."""
    store = SequenceStore(path, mode="r")
    assert store.damaged() == {}
    staging = path / STAGING
    assert not staging.exists() or not [p for p in staging.iterdir() if p.is_dir()], "staged leftovers"
    dna = DNAAdapter()
    return {name: dna.decode(store.read(name, allow_incomplete=True)) for name in store.list()}


def complete(path: Path) -> list[str]:
    return SequenceStore(path, mode="r").list(incomplete=False)


def altered_gzip(records, record: int) -> bytes:
    """A gzip (stored blocks, so the text is in it verbatim) in which one base of ``record`` was changed into
    another base: it decodes to valid FASTA, only the CRC at the end of the stream tells."""
    data = bytearray(gzip.compress(fasta(records), compresslevel=0))
    at = data.index(records[record][1][:60].encode()) + 7
    data[at] = ord("C") if data[at] != ord("C") else ord("G")
    return bytes(data)


# ------------------------------------------------------------------------------------------------------


def test_gzip_with_altered_bases_keeps_nothing_from_the_file(tmp_path):
    path = tmp_path / "genome.fa.gz"
    path.write_bytes(altered_gzip(RECORDS, 1))
    with pytest.raises(
        CorruptFileError,
        match=r"genome\.fa\.gz: corrupt gzip stream in record 'chr4' \(#5 in the "
        r"file\), after line \d+: CRC check failed.*ingest of .*genome\.fa\.gz "
        r"was rolled back: the \d sequence\(s\) written from it were removed",
    ):
        ingest(tmp_path / "s.zarr", path, DNAAdapter(), chunk_elements=512)
    assert stored(tmp_path / "s.zarr") == {}  # before: chr0..chr3 stayed, complete, chr1 with a wrong base


def test_fastq_failing_part_way_keeps_nothing_from_the_file(tmp_path):
    path = tmp_path / "reads.fq"
    path.write_bytes(fastq(RECORDS[:3]) + b"@bad\nACGT\n+\nIII\n")
    with pytest.raises(
        CorruptFileError,
        match=r"reads\.fq: malformed FASTQ after record #3 \('chr2'\): line 16, "
        r"record #4 \('bad'\): the quality has 3 characters.*rolled back",
    ):
        ingest(tmp_path / "s.zarr", path, DNAAdapter())
    assert stored(tmp_path / "s.zarr") == {}


def test_failed_replacement_keeps_the_old_sequences(tmp_path):
    path = tmp_path / "genome.fa.gz"
    path.write_bytes(gzip.compress(fasta(RECORDS[:3])))
    ingest(tmp_path / "s.zarr", path, DNAAdapter(), chunk_elements=512)
    new = [(rid, seq[::-1]) for rid, seq in RECORDS[:3]]
    path.write_bytes(altered_gzip(new, 0))
    with pytest.raises(CorruptFileError, match="CRC check failed.*rolled back"):
        ingest(tmp_path / "s.zarr", path, DNAAdapter(), overwrite=True, chunk_elements=512)
    assert stored(tmp_path / "s.zarr") == dict(RECORDS[:3])
    assert complete(tmp_path / "s.zarr") == ["chr0", "chr1", "chr2"]
    # a sound replacement goes through, and leaves nothing staged
    path.write_bytes(gzip.compress(fasta(new)))
    results = ingest(tmp_path / "s.zarr", path, DNAAdapter(), overwrite=True, chunk_elements=512)
    assert [r.action for r in results] == ["replaced"] * 3 and all(r.info.complete for r in results)
    assert stored(tmp_path / "s.zarr") == dict(new)


def test_failed_resume_or_refusal_in_a_later_record_rolls_back_the_file(tmp_path):
    store = tmp_path / "s.zarr"
    ingest(store, _write(tmp_path / "other.fa", fasta([RECORDS[2]])), DNAAdapter())  # chr2 from another file
    path = _write(tmp_path / "genome.fa", fasta(RECORDS[:3]))
    with pytest.raises(SeqlabError, match=r"already holds a complete sequence 'chr2'.*genome\.fa was rolled back"):
        ingest(store, path, DNAAdapter())
    assert stored(store) == {"chr2": RECORDS[2][1]}  # chr0, chr1 of genome.fa gone; the other file's chr2 kept


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_multi_file_ingest_keeps_the_files_before_the_failing_one(tmp_path):
    good = _write(tmp_path / "good.fa", fasta(RECORDS[:2]))
    bad = _write(tmp_path / "bad.fq", fastq(RECORDS[2:4]) + b"@cut\nACGT\n")
    later = _write(tmp_path / "later.fa", fasta(RECORDS[4:]))
    with pytest.raises(
        CorruptFileError,
        match=r"bad\.fq was rolled back: the 2 sequence\(s\) written from it were "
        r"removed; the 1 file\(s\) before it stay ingested",
    ):
        ingest(tmp_path / "s.zarr", [good, bad, later], DNAAdapter())
    assert stored(tmp_path / "s.zarr") == dict(RECORDS[:2])
    assert complete(tmp_path / "s.zarr") == ["chr0", "chr1"]


_GZ = {level: gzip.compress(fasta(RECORDS[:3]), compresslevel=level, mtime=0) for level in (0, 6)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(level=st.sampled_from([0, 6]), fraction=st.floats(0, 1, exclude_max=True), xor=st.integers(0, 255))
def test_any_byte_flip_or_cut_of_a_gzip_fasta_is_all_or_nothing(tmp_path, level, fraction, xor):
    data = bytearray(_GZ[level])
    at = int(fraction * len(data))
    if xor:
        data[at] ^= xor
    else:
        del data[at:]  # cut
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        path = _write(Path(folder) / "g.fa.gz", bytes(data))
        try:
            ingest(Path(folder) / "s.zarr", path, DNAAdapter(), chunk_elements=256)
        except SeqlabError:
            assert stored(Path(folder) / "s.zarr") == {}
        else:  # the damage was in a byte gzip does not check (e.g. its mtime): the data must be whole
            assert stored(Path(folder) / "s.zarr") == dict(RECORDS[:3])
            assert complete(Path(folder) / "s.zarr") == ["chr0", "chr1", "chr2"]


KILLED_INGEST = """
import sys, time
from seqlab.domains.dna import DNAAdapter
from seqlab.pipelines.store import ingest

def progress(p):
    print(p.sequence, p.elements, flush=True)
    time.sleep(0.02)

ingest(sys.argv[1], sys.argv[2], DNAAdapter(), chunk_elements=4096, window=4096, progress=progress)
print("DONE", flush=True)
"""


def test_kill_9_in_the_middle_of_a_file_leaves_nothing_complete_and_the_rerun_finishes(tmp_path):
    records = [(f"r{k}", "".join(RNG.choice("ACGT") for _ in range(20_000))) for k in range(6)]
    path = _write(tmp_path / "genome.fa", fasta(records))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_INGEST, str(tmp_path / "s.zarr"), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while True:
            line = proc.stdout.readline()
            assert line and line != "DONE\n", f"the writer ended early: {proc.stderr.read()}"
            if line.startswith("r3 "):  # r0..r2 are written whole, r3 is being written
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    names = stored(tmp_path / "s.zarr")
    assert {"r0", "r1", "r2"} <= set(names)
    assert complete(tmp_path / "s.zarr") == []  # before: r0..r2 were complete though the file was not verified
    results = ingest(tmp_path / "s.zarr", path, DNAAdapter(), chunk_elements=4096)
    assert {r.action for r in results[:3]} == {"resumed"} and all(r.info.complete for r in results)
    assert stored(tmp_path / "s.zarr") == dict(records)
    assert complete(tmp_path / "s.zarr") == [rid for rid, _ in records]


# ------------------------------------------------------------------------------------------------------
# range checks


BAD_NUMBERS = ["-5", "0", "nan", "inf", "-inf", "1e-300", str(10**30), "abc", ""]


@pytest.mark.parametrize("option", ["--window", "--chunk-mb"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_ingest_refuses_bad_numbers_in_one_line(tmp_path, capsys, option, value):
    path = _write(tmp_path / "g.fa", fasta(RECORDS[:1]))
    code = main(["ingest", str(tmp_path / "s.zarr"), str(path), "--adapter", "dna", "--quiet", f"{option}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and option in err and "Traceback" not in err, err
    assert not (tmp_path / "s.zarr").exists()


def test_ingest_number_limits_that_work(tmp_path, capsys):
    path = _write(tmp_path / "g.fa", fasta(RECORDS[:1]))
    assert (
        main(
            [
                "ingest",
                str(tmp_path / "s.zarr"),
                str(path),
                "--adapter",
                "dna",
                "--quiet",
                "--window=1",
                "--chunk-mb=0.001",
            ]
        )
        == 0
    )
    info = SequenceStore(tmp_path / "s.zarr", "r").describe("chr0")
    assert info.length == 1500 and info.chunk_elements == round(0.001 * (1 << 20))  # uint8: one byte a base
    assert "chr0\twritten\t1500 elements" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options",
    [
        {"window": 0},
        {"window": -1},
        {"window": 2**31},
        {"window": True},
        {"window": 1.5},
        {"chunk_bytes": 1},
        {"chunk_bytes": 10**30},
        {"chunk_bytes": 2.5e6},
        {"chunk_elements": 0},
        {"chunk_elements": 2**40},
        {"shard_chunks": 0},
        {"shard_chunks": 2**40},
    ],
)
def test_ingest_library_refuses_bad_numbers(tmp_path, options):
    path = _write(tmp_path / "g.fa", fasta(RECORDS[:1]))
    with pytest.raises(ConfigError, match=next(iter(options)).split("_")[-1]):
        ingest(tmp_path / "s.zarr", path, DNAAdapter(), **options)
    assert SequenceStore(tmp_path / "s.zarr", "a").list() == []


@pytest.mark.parametrize(
    "options",
    [
        {"chunk_bytes": 0},
        {"chunk_bytes": 10**30},
        {"chunk_bytes": 1e6},
        {"shard_chunks": -1},
        {"compression_level": 99},
        {"compression_level": "3"},
    ],
)
def test_store_options_are_range_checked(tmp_path, options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        SequenceStore(tmp_path / "s.zarr", "a", **options)


def test_replacement_in_a_store_that_cannot_rename(tmp_path):
    import zarr

    memory = SequenceStore(zarr.storage.MemoryStore(), "a")
    path = _write(tmp_path / "g.fa", fasta(RECORDS[:2]))
    ingest(memory, path, DNAAdapter(), chunk_elements=256)
    new = [(rid, seq[::-1]) for rid, seq in RECORDS[:2]]
    _write(path, fasta(new) + b">bad\nAXA\n")
    with pytest.raises(
        SeqlabError,
        match=r"invalid letter 'X'.*2 of them replacements: the sequences they were to "
        "replace are kept",
    ):
        ingest(memory, path, DNAAdapter(), overwrite=True, chunk_elements=256)
    dna = DNAAdapter()
    assert {n: dna.decode(memory.read(n)) for n in memory.list()} == dict(RECORDS[:2])
    _write(path, fasta(new))
    assert [r.action for r in ingest(memory, path, DNAAdapter(), overwrite=True)] == ["replaced"] * 2
    assert {n: dna.decode(memory.read(n)) for n in memory.list()} == dict(new)
    assert _staging(memory).list() == []


def test_a_sequence_left_aside_by_a_kill_during_the_swap_is_put_back(tmp_path):
    path = _write(tmp_path / "g.fa", fasta(RECORDS[:2]))
    ingest(tmp_path / "s.zarr", path, DNAAdapter())
    (tmp_path / "s.zarr" / STAGING).mkdir()
    os.rename(tmp_path / "s.zarr" / "chr0", tmp_path / "s.zarr" / STAGING / "chr0.replaced")  # the first rename
    assert SequenceStore(tmp_path / "s.zarr", "r").list() == ["chr1"]
    assert [r.action for r in ingest(tmp_path / "s.zarr", path, DNAAdapter())] == ["skipped", "skipped"]
    assert stored(tmp_path / "s.zarr") == dict(RECORDS[:2])


def test_a_damaged_staging_group_is_named_and_the_old_sequence_kept(tmp_path):
    path = _write(tmp_path / "g.fa", fasta(RECORDS[:1]))
    ingest(tmp_path / "s.zarr", path, DNAAdapter())
    (tmp_path / "s.zarr" / STAGING).mkdir()
    (tmp_path / "s.zarr" / STAGING / "zarr.json").write_bytes(b"{")
    with pytest.raises(CorruptFileError, match=rf"s\.zarr/{STAGING}/zarr\.json is unreadable"):
        ingest(tmp_path / "s.zarr", path, DNAAdapter(), overwrite=True)
    assert SequenceStore(tmp_path / "s.zarr", "r").read("chr0").numel() == 1500
