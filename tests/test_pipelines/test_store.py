"""Zarr v3 sequence stores: ingest through adapters, windows, append, list/describe/delete, crash semantics
(a writer killed with SIGKILL, then resumed), concurrent writers, bounded memory, corrupt chunks, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from seqlab.domains import register_adapter
from seqlab.domains.testing import FramesTestAdapter
from seqlab.errors import CorruptFileError, InputError, SeqlabError
from seqlab.pipelines import SequenceStore, ingest, sequence_name

# The same small streaming adapter, as source text, so that the writer subprocesses below use it too.
ADAPTER_SOURCE = '''
import numpy as np
import torch
from seqlab.domains import InputSpec, TokenAdapter, register_adapter


@register_adapter
class BlockBytes(TokenAdapter):
    """Raw bytes (shifted by ``offset``) as tokens, read ``window`` bytes at a time."""

    name = "test-store-bytes"

    def __init__(self, offset: int = 0):
        self.offset = offset

    def settings(self):
        return {"offset": self.offset}

    @property
    def input_spec(self):
        return InputSpec("tokens", vocab_size=256)

    def encode(self, raw):
        return torch.from_numpy((np.frombuffer(bytes(raw), np.uint8).astype(np.int64) + self.offset) % 256)

    def decode(self, tensor):
        return bytes(((tensor.numpy() - self.offset) % 256).astype(np.uint8))

    def read(self, path, **options):
        return open(path, "rb").read()

    def iter_windows(self, path, window, **options):
        with open(path, "rb") as handle:
            while block := handle.read(window):
                yield self.encode(block)

    def write(self, path, raw):
        open(path, "wb").write(bytes(raw))
'''
exec(compile(ADAPTER_SOURCE, "<test-store-adapter>", "exec"))  # noqa: S102 - our own text: defines BlockBytes
BlockBytes = globals()["BlockBytes"]


@register_adapter
class _Frames(FramesTestAdapter):
    """Continuous frames of width 3 (multichannel sequences), in .npy files."""

    name = "test-store-frames"


def _random_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def _ids(data: bytes, offset: int = 0) -> np.ndarray:
    return (np.frombuffer(data, np.uint8).astype(np.int64) + offset) % 256


# ------------------------------------------------------------------------------------------------------


def test_ingest_round_trip_attrs_and_layout(tmp_path):
    data = _random_file(tmp_path / "page.txt", 10_500)
    calls = []
    results = ingest(
        tmp_path / "s.zarr",
        tmp_path / "page.txt",
        BlockBytes(offset=3),
        window=777,
        chunk_elements=1000,
        progress=calls.append,
    )
    assert [(r.name, r.action, r.resumed_from) for r in results] == [("page", "written", 0)]
    store = SequenceStore(tmp_path / "s.zarr", mode="r")
    info = store.describe("page")
    assert info.length == 10_500 and info.complete and info.kind == "tokens" and info.dtype == "uint8"
    assert info.domain == "test-store-bytes" and info.adapter == {"name": "test-store-bytes", "settings": {"offset": 3}}
    assert info.vocab_size == 256 and info.chunk_elements == 1000 and info.shard_elements is None
    assert info.source["name"] == "page.txt" and info.source["bytes"] == 10_500
    import hashlib

    assert info.source["sha256"] == hashlib.sha256(data).hexdigest()
    assert info.created and info.updated
    # progress: after every committed chunk, then once at the end
    assert [c.elements for c in calls] == [*range(1000, 10_001, 1000), 10_500, 10_500]
    assert calls[-1].done and not calls[0].done and calls[0].sequence == "page"

    expected = _ids(data, 3)
    whole = store.read("page")
    assert whole.dtype == torch.int64 and np.array_equal(whole.numpy(), expected)
    for start, stop in [(0, 1), (999, 1001), (2500, 7321), (10_499, 10_500), (4000, 4000)]:
        assert np.array_equal(store.read("page", start, stop).numpy(), expected[start:stop])
    raw = store.read("page", 10, 20, raw=True)
    assert raw.dtype == np.uint8 and np.array_equal(raw, expected[10:20])

    # on disk: a Zarr v3 group, one array folder, one compressed chunk file per 1000 elements
    group_meta = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert group_meta["zarr_format"] == 3 and group_meta["attributes"]["seqlab_store"]["version"] == 1
    array_meta = json.loads((tmp_path / "s.zarr" / "page" / "zarr.json").read_text())
    assert array_meta["shape"] == [10_500] and array_meta["attributes"]["complete"] is True
    assert any(c["name"] == "zstd" for c in array_meta["codecs"])
    chunk_files = sorted(p.name for p in (tmp_path / "s.zarr" / "page" / "c").iterdir())
    assert chunk_files == sorted(str(i) for i in range(11))
    assert sum(p.stat().st_size for p in (tmp_path / "s.zarr" / "page" / "c").iterdir()) < 10_500 + 11 * 64


def test_default_chunks_are_megabytes_and_frames_are_multichannel(tmp_path):
    store = SequenceStore(tmp_path / "s.zarr")
    frames = np.random.default_rng(1).normal(size=(5000, 3)).astype(np.float32)
    np.save(tmp_path / "clip.npy", frames)
    ingest(store, tmp_path / "clip.npy", _Frames(), window=333)
    info = store.describe("clip")
    assert info.shape == (5000, 3) and info.kind == "continuous" and info.dtype == "float32"
    assert 1 << 20 <= info.chunk_elements * 3 * 4 <= 4 << 20  # default chunk: about 1-4 MB
    got = store.read("clip", 100, 4100)
    assert got.shape == (4000, 3) and torch.equal(got, torch.from_numpy(frames[100:4100]))

    # sharded, and a different chunk size per sequence
    ingest(store, tmp_path / "clip.npy", _Frames(), names="sharded", window=400, chunk_elements=128, shard_chunks=4)
    info = store.describe("sharded")
    assert (info.chunk_elements, info.shard_elements) == (128, 512)
    shard_files = [p for p in (tmp_path / "s.zarr" / "sharded" / "c").rglob("*") if p.is_file()]
    assert len(shard_files) == -(-5000 // 512)  # one file per shard of 4 chunks
    assert torch.equal(store.read("sharded", 500, 1600), torch.from_numpy(frames[500:1600]))
    assert torch.equal(store.read("sharded"), torch.from_numpy(frames))


def test_ingest_again_skips_refuses_or_replaces(tmp_path):
    path = tmp_path / "a.bin"
    _random_file(path, 3000, seed=1)
    store = SequenceStore(tmp_path / "s.zarr")
    ingest(store, path, BlockBytes(), chunk_elements=512)
    assert ingest(store, path, BlockBytes(), chunk_elements=512)[0].action == "skipped"
    new = _random_file(path, 2000, seed=2)
    with pytest.raises(InputError, match=r"already holds a complete sequence 'a'.*overwrite=True"):
        ingest(store, path, BlockBytes())
    result = ingest(store, path, BlockBytes(), overwrite=True, chunk_elements=512)[0]
    assert result.action == "replaced" and result.info.length == 2000
    assert np.array_equal(store.read("a").numpy(), _ids(new))
    # another adapter's settings is another encoding: never mixed into the old sequence
    with pytest.raises(InputError, match="already holds"):
        ingest(store, path, BlockBytes(offset=1))


def test_append_list_describe_delete(tmp_path):
    store = SequenceStore(tmp_path / "s.zarr")
    store.append("agent", torch.tensor([1, 2, 3]), adapter=BlockBytes(), chunk_elements=4)
    store.append("agent", np.array([4, 5, 6, 7, 8]))
    store.append("agent", torch.tensor([], dtype=torch.long))
    info = store.append("agent", [9])
    assert info.length == 9 and info.complete and info.dtype == "uint8" and info.domain == "test-store-bytes"
    assert store.read("agent").tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(InputError, match=r"id 300 at position 1 is outside \[0, 256\)"):
        store.append("agent", [1, 300])
    with pytest.raises(InputError, match="written by adapter"):
        store.append("agent", [1], adapter=BlockBytes(offset=2))
    assert store.describe("agent").length == 9  # a refused append wrote nothing

    frames = np.ones((4, 3), np.float32)
    store.append("sensor", frames)
    with pytest.raises(InputError, match=r"element shape \(2,\).*\(3,\)"):
        store.append("sensor", np.ones((2, 2), np.float32))
    with pytest.raises(InputError, match="not finite"):
        store.append("sensor", np.full((1, 3), np.nan, np.float32))
    assert store.list() == ["agent", "sensor"] and "agent" in store and len(store) == 2
    store.delete("sensor")
    assert store.list() == ["agent"] and not (tmp_path / "s.zarr" / "sensor").exists()
    with pytest.raises(InputError, match="has no sequence 'sensor'"):
        store.delete("sensor")


def test_bad_input_names_store_sequence_and_position(tmp_path):
    with pytest.raises(InputError, match=r"sequence store .*nowhere.zarr does not exist"):
        SequenceStore(tmp_path / "nowhere.zarr", mode="r")
    import zarr

    zarr.open_group(tmp_path / "plain.zarr", mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(InputError, match="not a seqlab sequence store"):
        SequenceStore(tmp_path / "plain.zarr")

    _random_file(tmp_path / "f.bin", 100)
    ingest(tmp_path / "s.zarr", tmp_path / "f.bin", BlockBytes(), names="seq-1")
    store = SequenceStore(tmp_path / "s.zarr", mode="r")
    with pytest.raises(InputError, match=r"s.zarr has no sequence 'seq-2' \(it holds: seq-1\)"):
        store.read("seq-2")
    with pytest.raises(InputError, match=r"s.zarr: sequence 'seq-1': window \[90, 120\) is out of range: .* 100"):
        store.read("seq-1", 90, 120)
    with pytest.raises(InputError, match=r"window \[-1, 5\)"):
        store.read("seq-1", -1, 5)
    with pytest.raises(InputError, match="read-only"):
        store.append("seq-1", [1])
    with pytest.raises(InputError, match="not valid"):
        store.read("../etc")
    with pytest.raises(InputError, match="does not exist or is not a file"):
        ingest(tmp_path / "s.zarr", tmp_path / "missing.bin", BlockBytes())
    assert sequence_name("gi|123|ref NC_1.1") == "gi_123_ref_NC_1.1" and sequence_name("..") == "sequence"


def test_corrupt_chunks_name_sequence_and_positions(tmp_path):
    _random_file(tmp_path / "f.bin", 5000)
    store = SequenceStore(tmp_path / "s.zarr")
    ingest(store, tmp_path / "f.bin", BlockBytes(), names="genome", chunk_elements=1000)
    chunks = tmp_path / "s.zarr" / "genome" / "c"
    damaged = bytearray((chunks / "2").read_bytes())
    damaged[len(damaged) // 2] ^= 0x5A
    (chunks / "2").write_bytes(bytes(damaged))
    assert store.read("genome", 0, 2000).shape == (2000,)  # the chunks around it still read
    with pytest.raises(CorruptFileError, match=r"sequence 'genome': chunk 2 \(positions \[2000, 3000\)\) cannot be"):
        store.read("genome", 1500, 2500)
    (chunks / "3").write_bytes(b"\x00" * 7)  # truncated
    with pytest.raises(CorruptFileError, match=r"s.zarr: sequence 'genome': chunk 3 \(positions \[3000, 4000\)\)"):
        store.read("genome", 3000, 3001)
    (chunks / "4").unlink()  # lost: would otherwise read back as zeros
    with pytest.raises(CorruptFileError, match=r"chunk 4 \(positions \[4000, 5000\)\) is missing"):
        store.read("genome", 4990, 5000)
    (tmp_path / "s.zarr" / "genome" / "zarr.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="sequence 'genome': metadata is unreadable"):
        store.read("genome")


def test_all_zero_chunks_are_kept_not_mistaken_for_missing(tmp_path):
    store = SequenceStore(tmp_path / "s.zarr")
    store.write("silence", [np.zeros(2500, np.int64)], adapter=BlockBytes(), chunk_elements=1000)
    assert len(list((tmp_path / "s.zarr" / "silence" / "c").iterdir())) == 3
    assert store.read("silence").sum() == 0 and store.read("silence").shape == (2500,)


def test_zip_store_reads(tmp_path):
    import shutil

    import zarr

    data = _random_file(tmp_path / "f.bin", 3000)
    ingest(tmp_path / "s.zarr", tmp_path / "f.bin", BlockBytes(), chunk_elements=700)
    shutil.make_archive(str(tmp_path / "s"), "zip", tmp_path / "s.zarr")
    store = SequenceStore(zarr.storage.ZipStore(tmp_path / "s.zip", mode="r"), mode="r")
    assert store.list() == ["f"] and np.array_equal(store.read("f", 650, 2100).numpy(), _ids(data)[650:2100])


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_url_stores_ingest_append_and_read(tmp_path, scheme):
    """A store named by an fsspec URL (any filesystem fsspec knows: file://, memory://, s3://, ...) works like a
    local folder: ingest, append, windows, reopen read-only; a missing one is refused naming the URL."""
    pytest.importorskip("fsspec")
    data = _random_file(tmp_path / "f.bin", 3000)
    url = f"file://{tmp_path}/u.zarr" if scheme == "file" else f"memory://{tmp_path.name}/u.zarr"
    ingest(url, tmp_path / "f.bin", BlockBytes(), chunk_elements=700)
    store = SequenceStore(url)
    store.append("f", _ids(data)[:10], adapter=BlockBytes())
    back = SequenceStore(url, "r")
    assert back.list() == ["f"] and back.describe("f").length == 3010
    assert np.array_equal(back.read("f", 650, 2100).numpy(), _ids(data)[650:2100])
    assert np.array_equal(back.read("f", 3000, 3010).numpy(), _ids(data)[:10])
    if scheme == "file":
        assert (tmp_path / "u.zarr" / "zarr.json").is_file()  # the same bytes as a local store
        assert SequenceStore(tmp_path / "u.zarr", "r").read("f", 0, 5).tolist() == _ids(data)[:5].tolist()
    with pytest.raises(InputError, match="missing.zarr"):
        SequenceStore(url.replace("u.zarr", "missing.zarr"), "r")


def test_multi_record_files_give_one_sequence_per_record(tmp_path):
    store = SequenceStore(tmp_path / "s.zarr")

    def records(path, window):  # the "sequences of a file" hook: here, lines of a text file
        for i, line in enumerate(Path(path).read_bytes().splitlines()):
            yield f"line{i}", (BlockBytes().encode(line[s : s + window]) for s in range(0, len(line), window))

    (tmp_path / "lines.txt").write_bytes(b"alpha\nbeta gamma\nz\n")
    results = ingest(store, tmp_path / "lines.txt", BlockBytes(), sequences=records, window=3)
    assert [r.name for r in results] == ["line0", "line1", "line2"]
    assert BlockBytes().decode(store.read("line1")) == b"beta gamma"

    dna = pytest.importorskip("seqlab.domains.dna")
    pytest.importorskip("Bio")
    adapter = dna.DNAAdapter()
    (tmp_path / "g.fa").write_text(">chr1 first\nACGTNN\nACG\n>chr2\nTTTT\n>scaffold|7\nGATTACA\n")
    results = ingest(store, tmp_path / "g.fa", adapter, window=4)
    assert [r.name for r in results] == ["chr1", "chr2", "scaffold_7"]
    assert [r.info.record for r in results] == ["chr1", "chr2", "scaffold|7"]
    assert torch.equal(store.read("chr1"), adapter.encode("ACGTNNACG"))
    assert torch.equal(store.read("scaffold_7"), adapter.encode("GATTACA"))
    assert [r.action for r in ingest(store, tmp_path / "g.fa", adapter, window=4)] == ["skipped"] * 3
    # or one sequence for the whole file
    whole = ingest(store, tmp_path / "g.fa", adapter, window=4, split_records=False)[0]
    assert whole.name == "g"
    assert torch.equal(store.read("g"), torch.cat(list(adapter.iter_windows(tmp_path / "g.fa", 5))))


def test_ingest_memory_is_bounded_by_window_not_file(tmp_path):
    size = 12 << 20
    _random_file(tmp_path / "big.bin", size)
    store = SequenceStore(tmp_path / "s.zarr")
    tracemalloc.start()
    try:
        ingest(store, tmp_path / "big.bin", BlockBytes(), window=64 << 10, chunk_elements=256 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.describe("big").length == size
    assert peak < size / 4, f"ingest peaked at {peak} bytes for a {size}-byte file"
    # and reading a window decodes only the chunks it touches
    reader = store.reader("big")
    reader.read(300 << 10, (300 << 10) + 100)
    assert reader.chunk_reads == 1


WRITER_SCRIPT = (
    ADAPTER_SOURCE
    + """
import sys, time
from seqlab.pipelines.store import ingest

store, path, name, pause, go = sys.argv[1:6]
print("READY", flush=True)  # imports done: the parent starts both writers together
while go != "-" and not __import__("os").path.exists(go):
    time.sleep(0.005)

def progress(p):
    print(p.elements, flush=True)
    time.sleep(float(pause))

ingest(store, path, BlockBytes(), names=name, window=50_000, chunk_elements=int(sys.argv[6]), progress=progress)
print("DONE", flush=True)
"""
)


def _writer(tmp_path, store, path, name, pause, go="-", chunk=64 << 10):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(store), str(path), name, str(pause), str(go), str(chunk)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def _ready(proc) -> None:
    assert proc.stdout.readline() == "READY\n", proc.stderr.read()


def test_killed_ingest_leaves_a_readable_store_and_resumes(tmp_path):
    data = _random_file(tmp_path / "big.bin", 4 << 20, seed=5)
    proc = _writer(tmp_path, tmp_path / "s.zarr", tmp_path / "big.bin", "big", pause=0.05)
    try:
        _ready(proc)
        committed = 0
        while committed < 6 * (64 << 10):
            line = proc.stdout.readline()
            assert line, f"writer ended early: {proc.stderr.read()}"
            committed = int(line)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    store = SequenceStore(tmp_path / "s.zarr", mode="r")
    info = store.describe("big")
    assert not info.complete and 0 < info.length < len(data) and info.length % (64 << 10) == 0
    assert store.list() == ["big"] and store.list(incomplete=False) == []
    with pytest.raises(InputError, match=r"sequence 'big' is incomplete .*allow_incomplete=True"):
        store.read("big", 0, 10)
    assert np.array_equal(store.read("big", allow_incomplete=True).numpy(), _ids(data)[: info.length])

    result = ingest(tmp_path / "s.zarr", tmp_path / "big.bin", BlockBytes(), names="big", window=50_000)
    assert result[0].action == "resumed" and result[0].resumed_from == info.length
    done = SequenceStore(tmp_path / "s.zarr", mode="r")
    assert done.describe("big").complete and done.describe("big").length == len(data)
    assert np.array_equal(done.read("big").numpy(), _ids(data))


def test_concurrent_writers_of_different_sequences(tmp_path):
    sources = {name: _random_file(tmp_path / f"{name}.bin", 1 << 20, seed=i) for i, name in enumerate(["a", "b"])}
    go = tmp_path / "go"
    procs = [
        _writer(tmp_path, tmp_path / "shared.zarr", tmp_path / f"{n}.bin", n, 0.005, go, chunk=32 << 10)
        for n in sources
    ]
    for proc in procs:
        _ready(proc)
    go.touch()  # both have imported everything and wait for this: their writes overlap
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.endswith("DONE\n"), err
        assert out.splitlines()[-2] == str(1 << 20)  # the last progress line: every element committed
    store = SequenceStore(tmp_path / "shared.zarr", mode="r")
    assert store.list(incomplete=False) == ["a", "b"]
    for name, data in sources.items():
        assert np.array_equal(store.read(name).numpy(), _ids(data))


# ------------------------------------------------------------------------------------------------------
# damaged metadata: the damaged sequence is named, listing and the healthy sequences keep working

_SEQUENCES = {"a": [1, 2, 3, 4, 5], "b": [7, 8, 9], "c": [250, 0, 13, 13]}


def _small_store(path: Path) -> Path:
    store = SequenceStore(path, mode="w")
    for name, values in _SEQUENCES.items():
        store.append(name, torch.tensor(values), adapter=BlockBytes(), chunk_elements=2)
    return path


def _edit_attr(raw: bytes, attr: str, value) -> bytes:
    meta = json.loads(raw)
    meta["attributes"][attr] = value
    return json.dumps(meta).encode()


_DAMAGES = st.one_of(
    st.just(("empty",)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("bytes"), st.binary(max_size=40)),
    st.tuples(
        st.just("attr"),
        st.sampled_from(
            [
                "length",
                "complete",
                "kind",
                "adapter",
                "seqlab_sequence",
                "vocab_size",
                "source",
                "record",
                "seqlab_check",
            ]
        ),
        st.sampled_from([None, -1, 2, 10**20, 1.5, True, "x", [], {}, {"name": 5}]),
    ),
)


def _damage(raw: bytes, damage) -> bytes:
    kind = damage[0]
    if kind == "empty":
        return b""
    if kind == "cut":
        return raw[: int(damage[1] * len(raw))]
    if kind == "flip":
        at = int(damage[1] * len(raw))
        return raw[:at] + bytes([raw[at] ^ (1 << damage[2])]) + raw[at + 1 :]
    if kind == "bytes":
        return damage[1]
    return _edit_attr(raw, damage[1], damage[2])


@pytest.fixture(scope="module")
def template_store(tmp_path_factory):
    return _small_store(tmp_path_factory.mktemp("template") / "s.zarr")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=_DAMAGES)
# found by hypothesis: this bit turns the chunk shape into 0, which zarr accepts (reads divided by it)
@example(damage=("flip", 0.150390625, 1))
def test_a_damaged_sequence_metadata_is_named_and_the_others_still_work(template_store, tmp_path, damage):
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        path = Path(folder) / "s.zarr"
        shutil.copytree(template_store, path)
        meta = path / "b" / "zarr.json"
        meta.write_bytes(_damage(meta.read_bytes(), damage))
        store = SequenceStore(path, mode="r")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            listed = store.list()
        damaged = store.damaged()
        assert {"a", "c"} <= set(listed) and set(listed) | set(damaged) == set(_SEQUENCES)
        assert "a" in store and "b" in store and "c" in store and "d" not in store
        for name in ("a", "c"):
            assert store.read(name).tolist() == _SEQUENCES[name]
        if "b" in listed:  # harmless damage (e.g. a byte zarr does not use): the data reads back whole or not at all
            try:
                assert store.read("b").tolist() == _SEQUENCES["b"]
            except SeqlabError as exc:
                assert "'b'" in str(exc)
        else:
            assert "'b'" in damaged["b"] and "b/zarr.json" in damaged["b"]
            with pytest.raises(CorruptFileError, match=r"sequence 'b'.*b/zarr\.json"):
                store.describe("b")
            with pytest.raises(CorruptFileError, match=r"sequence 'b'.*b/zarr\.json"):
                store.read("b")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=_DAMAGES.filter(lambda d: d[0] != "attr"))
def test_a_damaged_store_metadata_is_named_and_never_overwritten(template_store, tmp_path, damage):
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        path = Path(folder) / "s.zarr"
        shutil.copytree(template_store, path)
        meta = path / "zarr.json"
        broken = _damage(meta.read_bytes(), damage)
        meta.write_bytes(broken)
        for mode in ("r", "a"):
            try:
                store = SequenceStore(path, mode=mode)
            except SeqlabError as exc:  # named: the store, and the file when its content is at fault
                assert str(path) in str(exc)
                assert meta.read_bytes() == broken  # mode "a" did not "repair" it by starting a new store
                continue
            assert store.list() == sorted(_SEQUENCES)
            assert all(store.read(n).tolist() == v for n, v in _SEQUENCES.items())


def test_seqlab_attrs_carry_a_checksum(tmp_path):
    path = _small_store(tmp_path / "s.zarr")
    meta = path / "a" / "zarr.json"
    meta.write_bytes(_edit_attr(meta.read_bytes(), "length", 4))  # valid JSON, a plausible length: still caught
    store = SequenceStore(path, mode="r")
    with pytest.warns(UserWarning, match=r"1 damaged sequence\(s\) left out of the list: a"):
        assert store.list() == ["b", "c"]
    with pytest.raises(
        CorruptFileError,
        match=r"sequence 'a': .*a/zarr\.json: the seqlab attrs do not match their "
        "checksum",
    ):
        store.read("a")


def test_damaged_sequences_in_describe_ingest_and_delete(tmp_path, capsys):
    from seqlab.cli import main

    path = _small_store(tmp_path / "s.zarr")
    (path / "b" / "zarr.json").write_bytes(b"")
    assert main(["describe", str(path)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["a", "b", "c"]
    assert lines[0].split("\t")[1:3] == ["5", "tokens"] and lines[2].endswith("complete")
    assert "DAMAGED" in lines[1] and "b/zarr.json" in lines[1]
    assert err.count("\n") == 1 and "damaged sequence 'b'" in err and "Traceback" not in err
    assert main(["describe", str(path), "--sequences", "a"]) == 0
    capsys.readouterr()
    # ingest does not replace a damaged sequence unless asked; delete removes it
    source = tmp_path / "b.bin"
    source.write_bytes(b"xyz")
    with pytest.raises(CorruptFileError, match=r"sequence 'b'.*replaces a damaged sequence only with overwrite=True"):
        ingest(path, source, BlockBytes())
    assert ingest(path, source, BlockBytes(), overwrite=True)[0].action == "replaced"
    assert SequenceStore(path).read("b").tolist() == list(b"xyz")
    (path / "c" / "zarr.json").write_bytes(b"{")
    store = SequenceStore(path)
    store.delete("c")
    assert store.list() == ["a", "b"] and store.damaged() == {}


@pytest.mark.parametrize(
    "content",
    [
        b"null",
        b"[1, 2]",
        b"\xff\xfe",
        b'{"zarr_format": 3, "node_type": "group", "attributes": {"seqlab_store": {"format": "seqlab.sequence_store", '
        b'"version": "x"}}}',
        b'{"zarr_format": 3, "node_type": "group", "attributes": {"seqlab_store": {"format": "seqlab.sequence_store", '
        b'"version": [1]}}}',
    ],
)
def test_store_metadata_of_the_wrong_shape_names_the_file(tmp_path, content):
    path = _small_store(tmp_path / "s.zarr")
    (path / "zarr.json").write_bytes(content)
    for mode in ("r", "a"):
        with pytest.raises(CorruptFileError, match=r"s\.zarr/zarr\.json"):
            SequenceStore(path, mode=mode)
    assert (path / "zarr.json").read_bytes() == content


@pytest.mark.parametrize(
    "values,error",
    [
        (
            np.array([2**63 + 5], np.uint64),
            r"id 9223372036854775813 at position 0 is outside \[0, 9223372036854775808\)",
        ),
        (np.array([[1.0], [1e300]]), r"frame at position 1 holds a value beyond the range of float32"),
        (np.array([[1.0], [np.nan]]), r"frame at position 1 is not finite"),
        (np.array([-3], np.int8), r"id -3 at position 0 is outside"),
        (np.array([1j]), r"expected integer ids or float frames, got dtype complex128"),
    ],
)
def test_odd_dtypes_and_numbers_are_refused_by_append(tmp_path, values, error):
    store = SequenceStore(tmp_path / "s.zarr")
    with pytest.raises(InputError, match=error):
        store.append("odd", values)
    assert "odd" not in store or store.read("odd").numel() == 0


@pytest.mark.parametrize(
    "values,expected",
    [
        (np.array([True, False, True]), [1, 0, 1]),
        (np.array([2**63 - 1, 0], np.uint64), [2**63 - 1, 0]),
        (np.array([[0.5], [-2.0]], np.float16), [[0.5], [-2.0]]),
    ],
)
def test_odd_dtypes_that_fit_read_back_equal(tmp_path, values, expected):
    store = SequenceStore(tmp_path / "s.zarr")
    store.append("odd", values)
    assert store.read("odd").tolist() == expected
