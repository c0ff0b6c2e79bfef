"""``seqlab demo --quick`` end to end in a subprocess (once per module), then every promised output checked
against what the run printed and wrote: the store holds the real corpus, the scores hold one value per position
of the 1 MiB sequence and their mean is the printed one, the model file reproduces the held-out number and the
sample, the reopened memory session answers like the live one. Plus --text/--big at unit level and bad input."""

from __future__ import annotations

import json
import math
from argparse import Namespace

import pytest

pytest.importorskip("zarr")
pytest.importorskip("ray")
pytest.importorskip("matplotlib")
pytest.importorskip("PIL")


def seqlab(*args, cwd, timeout=600):
    from seqlab.testing import seqlab_process

    return seqlab_process(*args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One ``seqlab demo --quick`` run per test session, whatever pytest-xdist does: the first worker to get here
    runs it under a file lock in the session's shared temporary folder, and every later setup (another worker, or
    the same worker after xdist tore the module fixture down between work chunks: it did, 70 s each time) reads
    that run's record. The tests only read the run's outputs."""
    from seqlab.testing import once_per_session

    cwd, run = once_per_session(tmp_path_factory, "seqlab-demo-quick", "demo", "--quick", "--out", "demo-out")
    out = cwd / "demo-out"
    summary = json.loads((out / "summary.json").read_text())
    print(f"seqlab demo --quick: {run['seconds']:.1f} s wall in the test")
    return Namespace(
        cwd=cwd, out=out, stdout=run["stdout"], stderr=run["stderr"], summary=summary, seconds=run["seconds"]
    )


@pytest.fixture
def one_thread():
    """The demo computes on one torch thread; recomputing its numbers here exactly needs the same."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _numbers(value, where="summary"):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")


def test_the_run_prints_each_step_and_a_summary(demo):
    lines = demo.stdout.splitlines()
    for step in ("[1/5] ingest", "[2/5] train", "[3/5] generate", "[4/5] score", "[5/5] memory", "Summary"):
        assert any(line.startswith(step) for line in lines), (step, demo.stdout)
    s = demo.summary
    assert f"held-out bits/byte: {s['train']['heldout_bpb']:.3f}" in demo.stdout
    assert f"mean {s['score']['mean_bpb']:.3f} bits/byte" in demo.stdout
    assert f"total {s['seconds']['total']:.1f} s" in demo.stdout
    assert "Traceback" not in demo.stderr


def test_every_promised_file_exists_and_is_valid(demo):
    from PIL import Image

    out = demo.out
    for name in (
        "store.zarr",
        "scores.zarr",
        "model.safetensors",
        "memory-model.safetensors",
        "bpb.png",
        "summary.json",
        "train-log.jsonl",
        "checkpoint/latest",
        "memory.session/session.json",
        ".seqlab-demo",
    ):
        assert (out / name).exists(), name
    for key, path in demo.summary["paths"].items():  # as given on the command line: relative to its cwd
        assert (demo.cwd / path).exists(), (key, path)
    assert (out / "bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "bpb.png") as image:
        image.verify()
    with Image.open(out / "bpb.png") as image:
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 250
    assert (out / "bpb.png").stat().st_size < 150_000
    log = [json.loads(line) for line in (out / "train-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, demo.summary["budget"]["steps"] + 1))


def test_the_store_holds_the_real_corpus_and_a_1mib_sequence(demo):
    from seqlab.cli.demo_inputs import LONG_BYTES, python_docs, stdlib_sources
    from seqlab.pipelines.store import SequenceStore

    store = SequenceStore(demo.out / "store.zarr", "r")
    assert store.list() == ["heldout", "long", "memory", "train"]
    docs = python_docs()
    train = store.read("train", raw=True).tobytes()
    heldout = store.read("heldout", raw=True).tobytes()
    assert train + heldout == docs and len(heldout) == demo.summary["ingest"]["sequences"]["heldout"]
    long = store.read("long", raw=True).tobytes()
    assert len(long) == LONG_BYTES >= 1_000_000
    assert long[: len(docs)] == docs  # the docs text, then the stdlib's own sources
    first_source = stdlib_sources()[0].read_bytes()
    assert long[len(docs) : len(docs) + 200] == first_source[:200]
    assert all(
        store.describe(n).complete and store.describe(n).adapter["name"] == "bytes"
        for n in ("train", "heldout", "long")
    )
    # the memory stream: the events file written by the run, encoded by the memory adapter
    from seqlab.domains.memory import MemoryStreamAdapter

    memory = MemoryStreamAdapter()
    events = memory.read(demo.out / "data" / "memory-events.jsonl")
    assert len(events) == demo.summary["ingest"]["memory_events"] > 100
    assert store.read("memory", raw=True).tobytes() == memory.encode_bytes(events)
    assert store.describe("memory").adapter["name"] == "memory"


def test_scores_hold_one_value_per_position_and_the_printed_mean(demo):
    import numpy as np

    from seqlab.pipelines.store import SequenceStore

    s = demo.summary["score"]
    long = SequenceStore(demo.out / "store.zarr", "r").describe("long").length
    bits = SequenceStore(demo.out / "scores.zarr", "r").read("long", raw=True).astype(np.float64)
    assert bits.shape == (long - 1,) and s["positions"] == long - 1 >= 1_000_000
    assert np.isfinite(bits).all() and (bits >= 0).all()
    assert abs(bits.mean() - s["mean_bpb"]) < 1e-6
    for region in s["regions"]:
        assert abs(bits[max(region["start"] - 1, 0) : region["stop"] - 1].mean() - region["mean_bpb"]) < 1e-6
    assert [r["what"] for r in s["regions"]] == ["trained-on text", "held-out text", "stdlib .py code (unseen)"]
    assert s["mode"] == "segments" and s["segments"] == 8 and s["workers"] == 2


def test_summary_numbers_are_finite_and_the_model_file_reproduces_them(demo, one_thread):
    from seqlab.domains import model_from_checkpoint
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines import stream_bits
    from seqlab.pipelines.store import SequenceStore

    numbers = list(_numbers(demo.summary))
    assert len(numbers) > 30 and all(math.isfinite(v) for _, v in numbers), numbers
    t = demo.summary["train"]
    assert t["heldout_bpb"] < t["heldout_bpb_untrained"] and t["heldout_bpb"] < t["uniform_bpb"] == 8.0
    model, _ = model_from_checkpoint(demo.out / "model.safetensors")
    bits, count = stream_bits(model, SequenceStore(demo.out / "store.zarr", "r"), "heldout")
    assert count == t["heldout_predictions"] and abs(bits / count - t["heldout_bpb"]) < 1e-6
    g = demo.summary["generate"]
    again = model.generate(
        ByteAdapter().encode(g["prompt"]),
        g["new_bytes"],
        do_sample=True,
        temperature=g["temperature"],
        top_k=g["top_k"],
        seed=g["seed"],
    )
    assert bytes(again.tokens[0]).decode("utf-8", errors="replace") == g["continuation"]


def test_the_reopened_memory_session_answers_like_the_live_one(demo, one_thread):
    from seqlab.cli.demo_inputs import EVENT_TIME
    from seqlab.domains.session import MemorySession, model_for_session

    m = demo.summary["memory"]
    assert m["restored_state_identical"] is True and m["restored_answer_identical"] is True
    assert m["replayed_state_identical"] is True and m["answer"] == m["restored_answer"]
    assert m["events"] == 4 and m["events_replayed_from_log"] == 1
    # a third opening, in this process: the same answer again from what is on disk
    model, adapter = model_for_session(demo.out / "memory.session")
    with MemorySession.open(demo.out / "memory.session", model, mode="r", adapter=adapter) as session:
        assert session.event_count == 4 and session.position == m["position"]
        answer = session.ask(None, m["answer_bytes"], time=EVENT_TIME + 4, **m["sampling"])
    assert answer.text == m["answer"]


def test_text_and_big_options_use_the_users_files(tmp_path):
    from seqlab.cli.demo_inputs import LONG_BYTES, prepare_out, resolve_inputs
    from seqlab.cli.demo_steps import step_ingest
    from seqlab.pipelines.store import SequenceStore

    text = tmp_path / "mine.txt"
    text.write_bytes(b"".join(b"note %05d: state space models\n" % i for i in range(1000)))
    more = tmp_path / "more.txt"
    more.write_bytes(b"second file\n" * 100)
    inputs = resolve_inputs([str(text), str(more)])
    out = prepare_out(tmp_path / "run")
    report = step_ingest(inputs, out, progress=False)
    store = SequenceStore(out / "store.zarr", "r")
    corpus = text.read_bytes() + more.read_bytes()
    assert store.read("train", raw=True).tobytes() + store.read("heldout", raw=True).tobytes() == corpus
    long = store.read("long", raw=True).tobytes()
    assert len(long) == LONG_BYTES and long.startswith(corpus)
    assert report["corpus"] == f"{text}, {more}" and "stdlib" in report["long_source"]
    assert inputs.prompt and corpus[-report["sequences"]["heldout"] :].decode().strip().startswith(inputs.prompt)

    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 64)
    inputs = resolve_inputs([str(text)], str(big))
    report = step_ingest(inputs, prepare_out(tmp_path / "run"), progress=False)
    assert SequenceStore(out / "store.zarr", "r").read("long", raw=True).tobytes() == big.read_bytes()
    assert report["long_regions"] == [{"what": str(big), "start": 0, "stop": big.stat().st_size}]


def test_a_rerun_replaces_only_the_demos_own_outputs(tmp_path):
    from seqlab.cli.demo_inputs import MARKER, prepare_out

    out = prepare_out(tmp_path / "d")
    (out / "store.zarr").mkdir()
    (out / "store.zarr" / "zarr.json").write_text("{}")
    (out / "summary.json").write_text("{}")
    (out / "mine.txt").write_text("keep me")
    prepare_out(out)
    assert not (out / "store.zarr").exists() and not (out / "summary.json").exists()
    assert (out / "mine.txt").read_text() == "keep me" and (out / MARKER).is_file()


def test_a_missing_text_file_exits_2_with_one_line_in_a_subprocess(tmp_path):
    proc = seqlab("demo", "--quick", "--text", "missing.txt", "--out", "fresh", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines == ["seqlab demo: error: --text missing.txt: no such file"], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--big", "absent.bin"), "--big absent.bin: no such file"),
        (("--text", "tiny.txt"), "the demo needs at least"),
        (("--steps", "0"), "argument --steps: must be an integer in [1, 16777216], got '0'"),
        (("--workers", "0"), "argument --workers: must be an integer in [1, 256], got '0'"),
        (("--out", "users-folder"), "is not a seqlab demo folder"),
        (("--out", "users-folder/thesis.tex"), "exists and is not a folder"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    from seqlab.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text("too short")
    (tmp_path / "users-folder").mkdir()
    (tmp_path / "users-folder" / "thesis.tex").write_text("precious")
    if "--out" not in args:
        args = (*args, "--out", "fresh")
    assert main(["demo", "--quick", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqlab demo: error:") and message in lines[0], lines
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in (tmp_path / "users-folder").iterdir()) == ["thesis.tex"]
    assert (tmp_path / "users-folder" / "thesis.tex").read_text() == "precious"


def test_memory_events_cover_a_text_without_paragraphs():
    from seqlab.cli.demo_inputs import memory_events

    text = b"short line\n\n" * 2000
    events = memory_events(text)
    assert "".join(e.content for e in events if e.role == "assistant") == text.decode()
    paragraphs = b"A title\nand a body that is long enough to keep.\n\n" * 50
    events = memory_events(paragraphs)
    assert [e.role for e in events[:2]] == ["user", "assistant"] and len(events) == 100
    assert events[0].content == "A title" and events[1].content == "and a body that is long enough to keep."
