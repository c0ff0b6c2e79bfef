"""``seqlab laser`` and ``seqlab self-reward`` in process (``seqlab.pipelines.posttrain``): what they write loads
like any model, ``--json`` parses, the choice of interventions follows the score, and bad input is one line with
exit code 2 that writes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from seqlab.checkpoint import save_model
from seqlab.testing import one_line, run_cli, tiny_config

DNA = Path(__file__).parent.parent / "data" / "dna" / "NC_005816.fna"
FAST = ["--window", "256", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A small byte model file, a DNA model file and a held-out text (this repository's own source)."""
    from seqlab.domains.base import get_adapter
    from seqlab.domains.bytes import ByteAdapter

    folder = tmp_path_factory.mktemp("posttrain_cli")
    torch.manual_seed(0)
    save_model(folder / "model.safetensors", ByteAdapter().build_model(tiny_config(d_model=32)).eval())
    save_model(folder / "dna.safetensors", get_adapter("dna")().build_model(tiny_config()).eval())
    text = (Path(__file__).parents[2] / "seqlab" / "posttrain" / "laser.py").read_bytes()[:600]
    (folder / "valid.txt").write_bytes(text)
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shift(monkeypatch, bonus):
    """Score models by the real held-out metric plus ``bonus(model.low_rank)`` (the choice logic, made certain)."""
    from seqlab.pipelines import posttrain

    real = posttrain.evaluate

    def evaluate(model, adapter, inputs, device=None, progress=False):
        result = real(model, adapter, inputs, device, progress)
        result["metric"] += bonus(getattr(model, "low_rank", None) or {})
        return result

    monkeypatch.setattr(posttrain, "evaluate", evaluate)


# ------------------------------------------------------------------------------------------------------
# seqlab laser


def test_laser_keep_best_writes_a_smaller_model_that_loads_and_scores_as_reported(work, tmp_path, capsys):
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.pipelines.training import evaluate_model
    from seqlab.posttrain.laser import LaserReport, LowRankLinear

    source, before = work / "model.safetensors", _digest(work / "model.safetensors")
    out = tmp_path / "l.safetensors"
    argv = ["laser", work / "valid.txt", "--model", source, "--out", out, "--layers", "1", "--kinds", "mixer.in_proj"]
    code, stdout, _ = run_cli([*argv, "--rhos", "0.1", "0.5", "--keep-best", "--json", *FAST], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["written"] and summary["cells"] == summary["cells_scored"] == 2
    [chosen] = summary["chosen"]
    assert (chosen["layer"], chosen["kind"]) == (1, "mixer.in_proj") and chosen["rho"] in (0.1, 0.5)
    assert summary["file_bytes"] == out.stat().st_size < summary["source_bytes"] == source.stat().st_size
    assert summary["params_after"] < summary["params_before"]
    assert _digest(source) == before  # the source model is never touched
    model, _ = model_from_checkpoint(out)
    assert isinstance(model.backbone.layers[1].mixer.in_proj, LowRankLinear)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 1
    assert sum(p.numel() for p in model.parameters()) == summary["params_after"]
    again = evaluate_model(out, files=[str(work / "valid.txt")], window=256)
    assert again["metric"] == pytest.approx(summary["metric"], rel=1e-5)
    assert summary["metric"] == pytest.approx(chosen["score"], rel=1e-5)
    report = LaserReport.from_json((tmp_path / "l.laser_report.json").read_text())
    assert report.baseline == pytest.approx(summary["baseline"]) and len(report.cells) == 2
    assert (tmp_path / "l.laser_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing --out is replaced only with --overwrite
    code, _, err = run_cli([*argv, "--rhos", "0.1", "--keep-best", *FAST], capsys)
    assert code == 2 and "exists; pass --overwrite" in one_line(err)
    code, stdout, _ = run_cli([*argv, "--rhos", "0.1", "--keep-best", "--overwrite", *FAST], capsys)
    assert code == 0 and f"wrote {out}" in stdout and "parameters " in stdout and "file bytes " in stdout


def test_laser_with_no_improvement_writes_no_model_but_the_report(work, tmp_path, capsys, monkeypatch):
    _shift(monkeypatch, lambda layout: 1.0 if layout else 0.0)  # every reduction is worse
    out, reports = tmp_path / "l.safetensors", tmp_path / "reports"
    argv = ["laser", work / "valid.txt", "--model", work / "model.safetensors", "--out", out, "--layers", "0"]
    code, stdout, _ = run_cli([*argv, "--kinds", "mixer.out_proj", "--rhos", "0.25", "--report-dir", reports, *FAST],
                              capsys)  # fmt: skip
    assert code == 0
    assert "no intervention beats the unmodified model: wrote no model" in stdout
    assert not out.exists()
    assert json.loads((reports / "laser_report.json").read_text())["best"]["kind"] == "mixer.out_proj"
    assert (reports / "laser_heatmap.png").exists()


def test_laser_writes_the_composition_when_it_beats_the_best_cell(work, tmp_path, capsys, monkeypatch):
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.posttrain.laser import LowRankLinear

    _shift(monkeypatch, lambda layout: -0.5 * len(layout))  # each reduced matrix helps: two beat one
    out = tmp_path / "l.safetensors"
    argv = ["laser", work / "valid.txt", "--model", work / "model.safetensors", "--out", out, "--compose", "2"]
    code, stdout, _ = run_cli([*argv, "--kinds", "mixer.out_proj", "--rhos", "0.5", *FAST], capsys)
    assert code == 0
    assert "chosen: the composition of 2 cells" in stdout and f"wrote {out}" in stdout
    model, _ = model_from_checkpoint(out)
    assert all(isinstance(layer.mixer.out_proj, LowRankLinear) for layer in model.backbone.layers)
    assert sorted(model.low_rank) == [f"backbone.layers.{i}.mixer.out_proj" for i in range(2)]


def test_laser_scores_a_store_as_it_scores_the_same_file(work, tmp_path, capsys):
    code, _, _ = run_cli(["ingest", tmp_path / "text.zarr", work / "valid.txt", "--adapter", "bytes", "--quiet"],
                         capsys)  # fmt: skip
    assert code == 0
    argv = ["laser", "--model", work / "model.safetensors", "--layers", "0", "--kinds", "mixer.out_proj"]
    argv += ["--rhos", "0.5", "--keep-best", "--json", *FAST]
    summaries = []
    for data, out in (([work / "valid.txt"], "a.safetensors"), (["--store", tmp_path / "text.zarr"], "b.safetensors")):
        code, stdout, _ = run_cli([*argv, *data, "--out", tmp_path / out], capsys)
        assert code == 0
        summaries.append(json.loads(stdout))
    a, b = summaries
    assert b["baseline"] == pytest.approx(a["baseline"], rel=1e-6) and b["metric"] == pytest.approx(
        a["metric"], rel=1e-6
    )
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    code, _, _ = run_cli(["ingest", tmp_path / "dna.zarr", DNA, "--adapter", "dna", "--quiet"], capsys)
    assert code == 0
    code, _, err = run_cli([*argv, "--store", tmp_path / "dna.zarr", "--out", tmp_path / "c.safetensors"], capsys)
    assert code == 2 and "written by adapter" in one_line(err) and not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "{model}"], "is the source model file"),
        (["--out", "{work}/valid.txt"], "exists; pass --overwrite"),
        (["--out", "{work}"], "is a folder"),
        (["--out", "{tmp}/l.safetensors", "--no-files"], "as FILE... or as --store"),
        (["--out", "{tmp}/l.safetensors", "--store", "{tmp}/s.zarr"], "as FILE... or as --store"),
        (["--out", "{tmp}/l.safetensors", "--sequences", "a"], "--sequences goes with --store"),
        (["--out", "{tmp}/l.safetensors", "--rhos", "0"], "argument --rhos: must be a finite number in (0.0, 1.0]"),
        (["--out", "{tmp}/l.safetensors", "--kinds", "mixer.nothing"], "name no reducible matrix"),
        (["--no-model", "--out", "{tmp}/l.safetensors"], "missing required setting(s) --model"),
    ],
)
def test_laser_refusals_are_one_line_and_write_nothing(work, tmp_path, capsys, extra, message):
    model = work / "model.safetensors"
    fill = {"model": model, "work": work, "tmp": tmp_path}
    extra = [str(a).format(**fill) for a in extra]
    files = [] if "--no-files" in extra else [work / "valid.txt"]
    head = [] if "--no-model" in extra else ["--model", model]
    extra = [a for a in extra if a not in ("--no-files", "--no-model")]
    before = {p.name: _digest(p) for p in work.iterdir()}
    code, stdout, err = run_cli(["laser", *files, *head, *extra, *FAST], capsys)
    assert code == 2 and stdout == ""
    assert message in one_line(err) and one_line(err).startswith("seqlab laser: error: ")
    assert list(tmp_path.iterdir()) == []
    assert {p.name: _digest(p) for p in work.iterdir()} == before


# ------------------------------------------------------------------------------------------------------
# seqlab self-reward

LOOP = ["--candidates", "2", "--judge-samples", "1", "--max-new-tokens", "4", "--threads", "1", "--quiet"]


def test_self_reward_on_task_prompts_measures_writes_and_resumes(work, tmp_path, capsys, monkeypatch):
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.pipelines import posttrain

    monkeypatch.setattr(posttrain, "TASK_TEST", 4)  # a tiny held-out split: the measure's cost is its generations
    out = tmp_path / "run"
    argv = ["self-reward", "--model", work / "model.safetensors", "--out", out, "--task-prompts", "3", "--measure"]
    code, stdout, _ = run_cli([*argv, "--iterations", "1", "--json", *LOOP], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["prompts"] == 3 and summary["prompt_source"] == "task" and summary["measure"]
    [row] = summary["iterations"]
    assert row["iteration"] == 1 and row["judgements"] == 3 * 2 * 1 and row["candidates"] == 6
    assert 0 <= row["unparseable"] <= row["judgements"] and row["pairs"] <= 3
    assert len(summary["measures"]) == 2
    for m in summary["measures"]:
        assert 0 <= m["accuracy"] <= 1 and m["n"] == 4 and 0 <= m["judge_agreement"] <= 1 and m["judge_n"] == 8
    assert row["measure"] == summary["measures"][1]
    lines = (out / "iteration-1" / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["prompt"].endswith("=") for x in lines)
    assert json.loads((out / "report.json").read_text())["settings"]["prompts"] == 3
    model, adapter = model_from_checkpoint(summary["final_model"])
    assert adapter.name == "bytes" and summary["final_model"] == str(out / "iteration-1" / "model.safetensors")
    # a run folder is continued only with --resume, which keeps the finished iteration as it was
    first = _digest(out / "iteration-1" / "candidates.jsonl")
    code, _, err = run_cli([*argv, "--iterations", "2", *LOOP], capsys)
    assert code == 2 and "pass --resume" in one_line(err) and not (out / "iteration-2").exists()
    code, stdout, _ = run_cli([*argv, "--iterations", "2", "--resume", *LOOP], capsys)
    assert code == 0
    assert stdout.splitlines()[0].startswith("| iteration | pairs | unparseable / judgements |")
    assert "task accuracy | judge agreement |" in stdout.splitlines()[0]
    assert [line.split("|")[1].strip() for line in stdout.splitlines()[2:5]] == ["0 (the model given)", "1", "2"]
    assert _digest(out / "iteration-1" / "candidates.jsonl") == first
    assert (out / "iteration-2" / "iteration.json").exists() and (out / "iteration-2" / "model.safetensors").exists()
    # ... and only on the prompts the run started with
    other = [a if a != "3" else "4" for a in argv]
    code, _, err = run_cli([*other, "--iterations", "3", "--resume", *LOOP], capsys)
    assert code == 2 and "was started on other prompts (3 of them)" in one_line(err)
    assert not (out / "iteration-3").exists()


def test_self_reward_on_a_prompts_file(work, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"reverse abc=\r\n\nsort cab=\n  \nadd 1+2=")
    out = tmp_path / "run"
    argv = ["self-reward", "--model", work / "model.safetensors", "--out", out, "--prompts", prompts]
    code, stdout, _ = run_cli([*argv, "--iterations", "1", "--beta", "0.5", "--lr", "1e-3", "--epochs", "2", *LOOP],
                              capsys)  # fmt: skip
    assert code == 0
    assert "task accuracy" not in stdout and "3 prompts (file)" in stdout
    rows = [json.loads(x) for x in (out / "iteration-1" / "candidates.jsonl").read_text().splitlines()]
    assert sorted({r["prompt"] for r in rows}) == ["add 1+2=", "reverse abc=", "sort cab="]
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["dpo"]["beta"] == 0.5 and settings["dpo"]["lr"] == 1e-3 and settings["dpo"]["epochs"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "{work}/dna.safetensors", "--task-prompts", "2"], "needs a byte model (adapter 'bytes')"),
        (["--prompts", "{empty}"], "no prompt (give one prompt per line)"),
        (["--prompts", "{tmp}/missing.txt"], "no such file"),
        (["--prompts", "{empty}", "--task-prompts", "2"], "--prompts FILE or as --task-prompts N (one of them)"),
        ([], "--prompts FILE or as --task-prompts N (one of them)"),
        (["--prompts", "{prompts}", "--measure"], "--measure needs --task-prompts"),
        (["--task-prompts", "2", "--out", "{prompts}"], "is a file; give a folder"),
        (["--task-prompts", "2", "--candidates", "1"], "argument --candidates: must be"),
        (["--task-prompts", "2", "--temperature", "0"], "temperature must be a number > 0"),
    ],
)
def test_self_reward_refusals_are_one_line_and_write_nothing(work, tmp_path, capsys, extra, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "empty.txt").write_bytes(b"\n \r\n\n")
    (inputs / "prompts.txt").write_bytes(b"reverse abc=\n")
    fill = {"work": work, "tmp": tmp_path, "empty": inputs / "empty.txt", "prompts": inputs / "prompts.txt"}
    extra = [str(a).format(**fill) for a in extra]
    head = [] if "--model" in extra else ["--model", work / "model.safetensors"]
    out = [] if "--out" in extra else ["--out", tmp_path / "run"]
    code, stdout, err = run_cli(["self-reward", *head, *out, *extra, *LOOP], capsys)
    assert code == 2 and stdout == ""
    assert message in one_line(err) and one_line(err).startswith("seqlab self-reward: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
    assert (inputs / "prompts.txt").read_bytes() == b"reverse abc=\n"
