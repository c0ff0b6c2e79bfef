"""``seqlab ladder --quick`` end to end in a subprocess (once per test session), then what it promises: a row per
rung's model with finite numbers, every model file giving back the held-out bits per byte recorded for it, the
MoE model with the dense model's active parameters, drafted decoding identical to plain greedy, LASER and AQLM
shrinking what they promise, the table and the plot; ``--resume`` skipping finished rungs and rerunning exactly
a deleted rung and the ones that read from it; bad input refused before anything is written.

The quick run's numbers come from models trained for a few dozen steps: they check the plumbing, not quality
(docs/ladder.md has the full run)."""

from __future__ import annotations

import json
import math
import os
import shutil
from argparse import Namespace

import pytest

pytest.importorskip("zarr")
pytest.importorskip("matplotlib")

ROWS = ["1a", "1b", "2a", "2b", "3", "4a", "4b", "5a", "5b", "5c", "6a", "6b", "7a", "7b", "7c"]


def seqlab(*args, cwd, timeout=600):
    from seqlab.testing import seqlab_process

    return seqlab_process(*args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """One ``seqlab ladder --quick`` per test session whatever pytest-xdist does (the first worker runs it under a
    file lock in the session's shared folder; later setups read its record). The tests only read its outputs;
    the ones that resume work on a copy."""
    from seqlab.testing import once_per_session

    args = ("ladder", "--quick", "--out", "ladder-out", "--threads", "1", "--quiet")
    cwd, run = once_per_session(tmp_path_factory, "seqlab-ladder-quick", *args)
    out = cwd / "ladder-out"
    summary = json.loads((out / "summary.json").read_text())
    print(f"seqlab ladder --quick: {run['seconds']:.1f} s wall in the test")
    return Namespace(
        cwd=cwd, out=out, stdout=run["stdout"], summary=summary, rows={r["rung"]: r for r in summary["rows"]}
    )


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_rung_has_its_rows_with_finite_numbers(ladder):
    assert [r["rung"] for r in ladder.summary["rows"]] == ROWS
    assert ladder.summary["reran"] == [1, 2, 3, 4, 5, 6, 7]
    for r in ladder.summary["rows"]:
        for key in ("heldout_bpb", "params_total", "params_active", "bytes_on_disk", "decode_bytes_per_s", "seconds"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["rung"], key)
        assert r["params_active"] <= r["params_total"]
        assert os.path.getsize(ladder.out / r["file"]) == r["bytes_on_disk"]
        if r["rung"].startswith("7"):
            assert r["task_accuracy"] is None  # the distilled models never saw the task
        else:
            assert 0 <= r["task_accuracy"] <= 1
        assert 0 < r["heldout_bpb"] < 9  # bits per byte of a trained byte model (uniform: 8)
    for number in range(1, 8):
        assert (ladder.out / ladder.summary["rungs"][str(number)]["name"] / "row.json").is_file()


def test_the_table_and_the_plot(ladder):
    table = (ladder.out / "summary.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| rung | what | held-out bits/byte | task accuracy | params (total / active) |")
    assert [line.split("|")[1].strip() for line in lines[1:]] == ROWS
    for r in ladder.summary["rows"]:  # the printed table is the same as the file's
        assert f"| {r['rung']} | {r['label']} | {r['heldout_bpb']:.3f} |" in table
        assert f"| {r['rung']} | {r['label']} | {r['heldout_bpb']:.3f} |" in ladder.stdout
    png = (ladder.out / "ladder.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_model_files_give_back_the_recorded_bits_per_byte(ladder, one_thread):
    """Every distinct model file in the table, loaded from disk alone (AQLM, LASER'd and hybrid ones included),
    reproduces its row's held-out number."""
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.ladder.measure import heldout_bpb
    from seqlab.pipelines.store import SequenceStore

    store = SequenceStore(ladder.out / "store.zarr", "r")
    seen = set()
    for r in ladder.summary["rows"]:
        if r["file"] in seen:
            continue
        seen.add(r["file"])
        model, _ = model_from_checkpoint(ladder.out / r["file"])
        assert heldout_bpb(model, store) == pytest.approx(r["heldout_bpb"], rel=1e-5, abs=1e-6), r["rung"]
    assert len(seen) == 10  # 1a 1b 2a 2b 3 4a 4b 7a 7b 7c; rows 5 and 6 decode 4b's file
    rows = ladder.rows
    assert rows["5a"]["file"] == rows["6b"]["file"] == rows["4b"]["file"]


def test_moe_has_the_dense_models_active_parameters(ladder):
    s = ladder.summary["settings"]
    dense, moe = ladder.rows["1a"], ladder.rows["1b"]
    router = s["n_layer"] * s["d_model"] * s["experts"]
    assert moe["params_active"] - dense["params_active"] == router  # the same expert width, plus the router
    assert moe["params_total"] > dense["params_total"] * 1.5
    assert dense["train"]["steps"] == moe["train"]["steps"] == s["steps"]


def test_the_ladder_goes_on_from_one_model(ladder):
    rungs = ladder.summary["rungs"]
    assert rungs["1"]["final"] == rungs["1"]["moe"]
    r = ladder.rows
    assert r["2b"]["params_total"] == r["1b"]["params_total"]  # fine-tuning keeps the architecture
    assert r["3"]["params_total"] < r["2b"]["params_total"]  # LASER drops parameters
    assert r["3"]["laser"]["written"] and r["3"]["laser"]["chosen"]
    assert r["4a"]["bytes_on_disk"] < r["4b"]["bytes_on_disk"] < r["3"]["bytes_on_disk"]
    assert r["4a"]["bits_per_parameter"] < r["4b"]["bits_per_parameter"]
    assert rungs["4"]["final"] == r["4b"]["file"]
    assert len(r["2b"]["accuracy_per_iteration"]) == ladder.summary["settings"]["sr_iterations"] + 1
    assert r["2a"]["task_accuracy"] == r["2b"]["accuracy_per_iteration"][0]


def test_drafted_decoding_is_the_plain_greedy_output(ladder):
    for rung in ("5b", "5c"):
        row = ladder.rows[rung]
        assert row["identical_to_plain"] is True, rung
        assert 0 <= row["acceptance_rate"] <= 1
        assert row["tokens_per_round"] >= 1
    samples = json.loads((ladder.out / "06-drugs" / "samples.json").read_text())
    n = ladder.summary["settings"]["samples"]
    assert len(samples["temperature"]) == len(samples["drugs"]) == n
    for rung in ("6a", "6b"):
        assert 1 <= ladder.rows[rung]["distinct_samples"] <= n
        assert 0 <= ladder.rows[rung]["distinct_4grams"] <= 1
        assert math.isfinite(ladder.rows[rung]["judge_bpb"])


def test_the_distilled_hybrid(ladder):
    student = ladder.rows["7b"]
    assert len(student["stages"]) == 3  # two alignment stages and the end-to-end one
    assert student["eval_kl"] >= 0
    assert ladder.rows["7c"]["laser"]["written"]


def test_resume_skips_finished_rungs_and_reruns_what_depends_on_a_deleted_one(ladder, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(ladder.out, copy)  # a moved folder resumes: row.json paths are relative to it
    proc = seqlab("ladder", "--quick", "--out", copy, "--threads", "1", "--resume", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["reran"] == []
    assert [r["heldout_bpb"] for r in summary["rows"]] == [r["heldout_bpb"] for r in ladder.summary["rows"]]

    (copy / "04-aqlm" / "row.json").unlink()
    proc = seqlab("ladder", "--quick", "--out", copy, "--threads", "1", "--resume", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["reran"] == [4, 5, 6]
    for line in ("[1/7]", "[2/7]", "[3/7]", "[7/7]"):
        assert any(x.startswith(line) and x.endswith("skipped") for x in proc.stdout.splitlines()), line
    rerun = {r["rung"]: r for r in summary["rows"]}
    for rung in ("4a", "4b"):  # the same seed and inputs: the same model again
        assert rerun[rung]["heldout_bpb"] == pytest.approx(ladder.rows[rung]["heldout_bpb"], rel=1e-6)
    assert rerun["5b"]["identical_to_plain"] and rerun["5c"]["identical_to_plain"]

    proc = seqlab("ladder", "--quick", "--out", copy, "--resume", "--seed", "1", cwd=tmp_path)
    assert proc.returncode == 2 and "seed" in proc.stderr and "--resume" in proc.stderr
    proc = seqlab("ladder", "--out", copy, "--resume", cwd=tmp_path)  # the full budget is another plan
    assert proc.returncode == 2 and "settings" in proc.stderr


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    proc = seqlab("ladder", "--quick", "--out", other, cwd=tmp_path)
    assert proc.returncode == 2 and "not a seqlab ladder folder" in proc.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    proc = seqlab("ladder", "--quick", "--out", tmp_path / "new", "--resume", cwd=tmp_path)
    assert proc.returncode == 2 and "no ladder run to resume" in proc.stderr

    proc = seqlab("ladder", "--quick", "--out", tmp_path / "a", "--text", tmp_path / "missing.txt", cwd=tmp_path)
    assert proc.returncode == 2 and "missing.txt: no such file" in proc.stderr
    small = tmp_path / "small.txt"
    small.write_text("too short")
    proc = seqlab("ladder", "--quick", "--out", tmp_path / "b", "--text", small, cwd=tmp_path)
    assert proc.returncode == 2 and "at least 8,192" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_settings_and_split():
    from seqlab.errors import ConfigError, InputError
    from seqlab.ladder import FULL, QUICK, run_ladder, split_corpus

    parts = split_corpus(bytes(range(256)) * 400)
    assert b"".join(parts.values()) == bytes(range(256)) * 400
    assert len(parts["valid"]) * 2 <= len(parts["heldout"]) <= len(parts["valid"]) * 2 + 2
    assert QUICK.with_changes(steps=5).steps == 5 and FULL.steps > QUICK.steps
    with pytest.raises(ConfigError, match="unknown ladder setting"):
        QUICK.with_changes(stepz=5)
    with pytest.raises(ConfigError, match="LadderSettings"):
        run_ladder({"steps": 1}, "x")
    with pytest.raises(ConfigError, match="seed must be an int >= 0"):
        run_ladder(QUICK, "x", seed=-1)
    with pytest.raises(InputError, match="at least 8,192"):
        run_ladder(QUICK, "x", corpus=b"short")


def test_the_users_own_text(tmp_path):
    """``--text FILE...``: the ladder runs on the files given (two standard-library sources here), split and
    stored as the plan records."""
    import hashlib
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / "textwrap.py", stdlib / "shlex.py"]
    corpus = b"".join(f.read_bytes() for f in files)
    proc = seqlab("ladder", "--quick", "--out", "mine", "--threads", "1", "--text", *files, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["corpus"]["bytes"] == len(corpus)
    assert summary["corpus"]["sha256"] == hashlib.sha256(corpus).hexdigest()
    assert "textwrap.py" in summary["corpus"]["what"]
    assert sum(summary["sequences"].values()) == len(corpus)
    assert (tmp_path / "mine" / "data" / "heldout.bin").read_bytes() == corpus[-summary["sequences"]["heldout"] :]
    assert [r["rung"] for r in summary["rows"]] == ROWS
