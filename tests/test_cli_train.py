"""``seqlab train`` and ``seqlab eval`` end to end in subprocesses: train a tiny byte model on real text, measure
it, resume it, train from a store, settings from TOML, and one-line errors with exit code 2 on bad input (the
option, --config and run-damage checks are tests/test_cli_train_checks.py).

The numbers the commands print are checked against direct library computations on the same files."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("zarr")

TINY = "--d-model 32 --n-layer 1 --d-state 8 --batch-size 4 --window 64 --lr 3e-3 --threads 1 --quiet".split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In this process too: several torch threads on a busy 2-core machine are many times slower, and a
    --threads of a command run in process must not outlive its test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def command(*args):
    return [sys.executable, "-m", "seqlab.cli", *map(str, args)]


def seqlab(*args, cwd):
    return subprocess.run(command(*args), check=False, cwd=cwd, capture_output=True, text=True, timeout=180, env=ENV)


def in_process(capsys, *args) -> tuple[int, str, str]:
    """``seqlab ARGS`` through the same entry point, in this process (for the long catalogue of refusals)."""
    from seqlab.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def corpus_text() -> str:
    from pydoc_data import topics

    return "".join(topics.topics[k] for k in sorted(topics.topics))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Real text files and one trained run (30 steps, checkpoints every 10, held-out file)."""
    root = tmp_path_factory.mktemp("cli_train")
    text = corpus_text()
    (root / "corpus.txt").write_text(text[:12000])
    (root / "held.txt").write_text(text[12000:14000])
    out = seqlab(
        "train",
        "corpus.txt",
        "--adapter",
        "bytes",
        "--eval",
        "held.txt",
        "--out",
        "run",
        "--steps",
        30,
        "--eval-every",
        10,
        "--checkpoint-every",
        10,
        "--json",
        *TINY,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    return root, json.loads(out.stdout)


def direct_bits(model_path, data: bytes) -> float:
    """The held-out metric computed straight from the library: one pass over the whole file."""
    import torch

    from seqlab.domains import model_from_checkpoint

    model, adapter = model_from_checkpoint(model_path)
    ids = adapter.encode(data)
    with torch.no_grad():
        out = model(ids[None, :-1], return_state=False)
    return adapter.metric(out, ids[None, 1:])


def test_train_writes_checkpoints_model_log_and_a_computed_summary(work):
    root, summary = work
    run = root / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "latest",
        "model.safetensors",
        "run.json",
        "step-00000010",
        "step-00000020",
        "step-00000030",
        "train.jsonl",
    ]
    assert summary["steps"] == 30 and summary["steps_this_run"] == 30 and summary["tokens"] == 30 * 4 * 64
    log = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert summary["train_loss"] == log[-1]["loss"]
    assert log[-1]["loss"] < log[0]["loss"]
    # the held-out number is the library's one-pass metric of the final model on held.txt, below 8 bits
    expected = direct_bits(run / "model.safetensors", (root / "held.txt").read_bytes())
    assert summary["held_out"] == pytest.approx(expected, abs=1e-5)
    assert summary["held_out_targets"] == (root / "held.txt").stat().st_size - 1
    assert summary["uniform_baseline"] == 8.0
    assert 0 < summary["held_out"] < 8.0
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["adapter"] == {"name": "bytes", "settings": {"utf8": False}}
    assert recorded["model"]["d_model"] == 32 and recorded["train"]["max_steps"] == 30
    assert recorded["summary"]["held_out"] == summary["held_out"]


def test_eval_streams_files_exactly_and_generate_runs_from_the_output(work):
    root, summary = work
    procs = [
        subprocess.Popen(command(*args), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for args in (
            (
                "eval",
                "--model",
                "run/model.safetensors",
                "held.txt",
                "corpus.txt",
                "--window",
                100,
                "--json",
                "--quiet",
            ),
            ("eval", "--model", "run", "held.txt", "--quiet"),
        )
    ]  # the checkpoint folder works too
    (out, err), (text, text_err) = (p.communicate(timeout=180) for p in procs)
    assert procs[0].returncode == 0, err
    assert procs[1].returncode == 0, text_err
    result = json.loads(out)
    held, corpus = result["inputs"]
    n_held, n_corpus = (root / "held.txt").stat().st_size - 1, (root / "corpus.txt").stat().st_size - 1
    assert held["name"] == "held.txt" and held["targets"] == n_held and corpus["targets"] == n_corpus
    # windows of 100 with the state carried equal one pass over the file (and the train summary's number)
    assert held["metric"] == pytest.approx(summary["held_out"], abs=1e-5)
    assert corpus["metric"] == pytest.approx(
        direct_bits(root / "run" / "model.safetensors", (root / "corpus.txt").read_bytes()), abs=1e-5
    )
    total = (held["metric"] * n_held + corpus["metric"] * n_corpus) / (n_held + n_corpus)
    assert result["metric"] == pytest.approx(total, abs=1e-9) and result["uniform_baseline"] == 8.0

    lines = text.splitlines()
    assert lines[0] == f"held.txt\t{held['metric']:.4f} bits_per_byte\t{n_held} targets"
    assert lines[1] == f"total\t{held['metric']:.4f} bits_per_byte\t{n_held} targets\tuniform baseline 8.0000"

    from seqlab.domains import model_from_checkpoint

    model, adapter = model_from_checkpoint(root / "run" / "model.safetensors")
    generated = model.generate(adapter.encode("def "), max_new_tokens=24, temperature=0)
    assert len(generated.tokens[0]) == 24 and isinstance(adapter.decode(generated.tokens[0]), bytes)


def test_resume_continues_the_step_count_with_the_runs_own_settings(work, tmp_path):
    root, _ = work
    shutil.copytree(root / "run", tmp_path / "run")
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    # no data or model flags: they come from run.json and the checkpoint
    out = seqlab("train", "--out", tmp_path / "run", "--resume", "--steps", 40, "--quiet", "--json", cwd=root)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["steps"] == 40 and summary["steps_this_run"] == 10
    log = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    assert (tmp_path / "run" / "latest").read_text().split()[0] == "step-00000040"
    assert (tmp_path / "run" / "model.safetensors").read_bytes() != before
    assert summary["held_out"] == pytest.approx(
        direct_bits(tmp_path / "run" / "model.safetensors", (root / "held.txt").read_bytes()), abs=1e-5
    )


def test_train_and_eval_from_a_store_made_by_ingest(work, capsys):
    root, _ = work
    # the store is made by seqlab ingest while the same run trains from the file itself
    ingest, same = (
        subprocess.Popen(command(*args), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for args in (
            ("ingest", "s.zarr", "corpus.txt", "held.txt", "--adapter", "bytes", "--quiet"),
            ("train", "corpus.txt", "--adapter", "bytes", "--out", "frun", "--steps", 12, "--json", *TINY),
        )
    )
    same_out, same_err = same.communicate(timeout=180)
    assert ingest.wait(timeout=180) == 0 and same.returncode == 0, same_err
    out = seqlab(
        "train",
        "--store",
        "s.zarr",
        "--eval-sequences",
        "held",
        "--out",
        "srun",
        "--steps",
        12,
        "--json",
        *TINY,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    recorded = json.loads((root / "srun" / "run.json").read_text())
    assert recorded["data"]["sequences"] == ["corpus"] and recorded["data"]["eval_sequences"] == ["held"]
    assert recorded["adapter"]["name"] == "bytes"
    assert recorded["train_elements"] == (root / "corpus.txt").stat().st_size
    assert summary["steps"] == 12 and summary["held_out_inputs"][0]["name"] == "held"
    assert summary["held_out"] == pytest.approx(
        direct_bits(root / "srun" / "model.safetensors", (root / "held.txt").read_bytes()), abs=1e-5
    )
    # the store's training windows are the file's: the same run from the file ends on the same loss
    assert json.loads(same_out)["train_loss"] == summary["train_loss"]

    code, out, err = in_process(
        capsys,
        "eval",
        "--model",
        root / "srun" / "model.safetensors",
        "--store",
        root / "s.zarr",
        "--sequences",
        "held",
        "--json",
        "--quiet",
    )
    assert code == 0, err
    assert json.loads(out)["metric"] == pytest.approx(summary["held_out"], abs=1e-5)


def test_settings_from_a_toml_file_and_flags_win(work, tmp_path, capsys, monkeypatch):
    root, _ = work
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text(
        '[train]\nadapter = "bytes"\nout = "trun"\nsteps = 50\nd-model = 32\nn_layer = 1\nd-state = 8\n'
        "batch-size = 2\nwindow = 32\nlr = 0.002\neval-fraction = 0.25\nquiet = true\nthreads = 1\n"
    )
    shutil.copy(root / "held.txt", tmp_path / "held.txt")
    code, out, err = in_process(capsys, "--config", "run.toml", "train", "held.txt", "--steps", 6, "--json")
    assert code == 0, err
    summary = json.loads(out)
    recorded = json.loads((tmp_path / "trun" / "run.json").read_text())
    assert summary["steps"] == 6  # the flag won over the file's 50
    assert recorded["train"]["lr"] == 0.002 and recorded["train"]["batch_size"] == 2
    assert recorded["model"]["d_model"] == 32 and recorded["model"]["d_state"] == 8
    # --eval-fraction 0.25: the last quarter of the bytes is held out (memory-mapped), the rest trains
    data = (tmp_path / "held.txt").read_bytes()
    split = len(data) - int(len(data) * 0.25)
    assert recorded["train_elements"] == split and summary["held_out_targets"] == len(data) - split - 1
    assert math.isfinite(summary["held_out"])
    assert summary["held_out"] == pytest.approx(
        direct_bits(tmp_path / "trun" / "model.safetensors", data[split:]), abs=1e-5
    )


@pytest.fixture(scope="module")
def dna_store(work):
    root, _ = work
    (root / "g.fa").write_text(">r1\nACGTACGTAGCTAGCTAGCATCGATCGATCGACTAGCTAGCATCGATCG\n")
    from seqlab.domains.dna import DNAAdapter
    from seqlab.pipelines.store import ingest

    ingest(root / "dna.zarr", root / "g.fa", DNAAdapter())
    return root / "dna.zarr"


BAD = {
    "missing file": (("train", "missing.txt", "--adapter", "bytes", "--out", "o1"), "missing.txt: no such file"),
    "unknown domain": (("train", "corpus.txt", "--adapter", "nope", "--out", "o2"), "no adapter named 'nope'"),
    "out holds a run": (
        ("train", "corpus.txt", "--adapter", "bytes", "--out", "run"),
        "already holds a checkpoint (step-00000030): pass --resume",
    ),
    "not a number": (
        ("train", "corpus.txt", "--adapter", "bytes", "--out", "o3", "--steps", "ten"),
        "argument --steps: must be an integer in [1, 1073741824], got 'ten'",
    ),
    "bad number": (
        ("train", "corpus.txt", "--adapter", "bytes", "--out", "o4", "--steps", "0"),
        "argument --steps: must be an integer in [1, 1073741824], got '0'",
    ),
    "bad fraction": (
        ("train", "corpus.txt", "--adapter", "bytes", "--out", "o5", "--eval-fraction", "1.5"),
        "argument --eval-fraction: must be a finite number in (0, 1), got '1.5'",
    ),
    "bad adapter settings": (
        ("train", "corpus.txt", "--adapter", "bytes", "--adapter-settings", '{"utf9": 1}', "--out", "o7"),
        "do not fit the 'bytes' adapter",
    ),
    "window too long": (
        ("train", "held.txt", "--adapter", "bytes", "--out", "o8", "--window", "4096"),
        "too short for one window",
    ),
    "no out": (("train", "corpus.txt", "--adapter", "bytes"), "missing required setting(s) --out"),
    "model too large": (
        ("train", "corpus.txt", "--adapter", "bytes", "--out", "o3", "--d-model", "65536", "--n-layer", "16"),
        "parameters (--d-model 65536 --n-layer 16) needs over",
    ),
    "warmup over steps": (
        ("train", "corpus.txt", "--adapter", "bytes", "--out", "o3", "--warmup", "10", "--steps", "5"),
        "--warmup (10) must be <= --steps (5)",
    ),
    "batch over accum": (
        ("train", "corpus.txt", "--adapter", "bytes", "--out", "o3", "--batch-size", "6", "--grad-accum", "4"),
        "--batch-size (6) must be divisible by --grad-accum (4)",
    ),
    "no data": (("train", "--out", "o9"), "no training data"),
    "resume with another size": (
        ("train", "--out", "run", "--resume", "--d-model", "64"),
        "--d-model 64 differs from the run being resumed (d_model = 32)",
    ),
    "resume with another batch": (
        ("train", "--out", "run", "--resume", "--batch-size", "2"),
        "--batch-size is 2, the checkpoint in run was made with 4",
    ),
    "resume and overwrite": (("train", "--out", "run", "--resume", "--overwrite"), "give one of them"),
    "store of another adapter": (
        ("eval", "--model", "run/model.safetensors", "--store", "dna.zarr"),
        "was written by adapter {'name': 'dna'",
    ),
    "train domain vs store": (
        ("train", "--store", "dna.zarr", "--adapter", "bytes", "--out", "o6"),
        "encoded by the 'dna' adapter",
    ),
    "eval missing model": (
        ("eval", "--model", "nothing.safetensors", "held.txt"),
        "nothing.safetensors: no such model file",
    ),
    "eval missing file": (("eval", "--model", "run/model.safetensors", "missing.txt"), "missing.txt: no such file"),
    "eval no data": (("eval", "--model", "run/model.safetensors"), "give the held-out data as FILE... or as --store"),
}
IN_SUBPROCESS = ("missing file", "store of another adapter")


def check_one_line(code, stderr, case):
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith(f"seqlab {BAD[case][0][0]}: error: "), stderr
    assert BAD[case][1] in lines[0], stderr
    assert "Traceback" not in stderr


def test_bad_input_in_a_subprocess_exits_2_with_one_line(work, dna_store):
    root, _ = work
    names = sorted(os.listdir(root / "run"))
    procs = {
        case: subprocess.Popen(
            command(*BAD[case][0], "--quiet"),
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for case in IN_SUBPROCESS
    }
    for case, proc in procs.items():
        _, stderr = proc.communicate(timeout=180)
        check_one_line(proc.returncode, stderr, case)
    assert sorted(os.listdir(root / "run")) == names


@pytest.mark.parametrize("case", sorted(set(BAD) - set(IN_SUBPROCESS)))
def test_bad_input_exits_2_with_one_line(work, dna_store, capsys, monkeypatch, case):
    root, _ = work
    monkeypatch.chdir(root)
    before = {p: p.stat().st_mtime_ns for p in (root / "run").rglob("*")}
    code, _, stderr = in_process(capsys, *BAD[case][0], "--quiet")
    check_one_line(code, stderr, case)
    assert {p: p.stat().st_mtime_ns for p in (root / "run").rglob("*")} == before  # the run was not touched
    assert not any((root / f"o{i}").exists() for i in range(1, 10))  # a refused start makes no folder


def test_overwrite_keeps_the_old_run_until_the_new_one_is_done(work, tmp_path, capsys):
    root, _ = work
    shutil.copytree(root / "run", tmp_path / "run")
    # a start that fails on its data does not touch the old run
    code, _, _ = in_process(
        capsys, "train", root / "missing.txt", "--adapter", "bytes", "--out", tmp_path / "run", "--overwrite"
    )
    assert code == 2 and (tmp_path / "run" / "latest").read_text().split()[0] == "step-00000030"
    code, out, err = in_process(
        capsys,
        "train",
        root / "held.txt",
        "--adapter",
        "bytes",
        "--out",
        tmp_path / "run",
        "--overwrite",
        "--steps",
        3,
        "--json",
        *TINY,
    )
    assert code == 0, err
    assert json.loads(out)["steps"] == 3
    assert (tmp_path / "run" / "latest").read_text().split()[0] == "step-00000003"
    assert not (tmp_path / "run" / ".previous-run").exists() and not (tmp_path / "run" / "step-00000030").exists()
