"""``seqlab distill`` end to end on a tiny attention teacher file over bytes: the summary, the run folder, the
student model file (loads as a LanguageModel with Mamba-2 layers), --resume of a finished run, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from seqlab.checkpoint import read_model_file, save_model
from seqlab.cli import main
from seqlab.cli.distill import parse_replace
from seqlab.config import BackboneConfig
from seqlab.models import LanguageModel


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    config = BackboneConfig(d_model=32, n_layer=2, ssm="attention", attn_heads=4, attn_kv_heads=2, ffn="mlp", d_ffn=32)
    model = LanguageModel(config, 256)
    save_model(tmp_path / "teacher.safetensors", model)
    text = tmp_path / "text.txt"
    text.write_bytes(("the quick brown fox jumps over the lazy dog. " * 60).encode())
    return tmp_path / "teacher.safetensors", text


def test_cli_distill_runs_and_writes_a_student(files, tmp_path, capsys):
    teacher, text = files
    out = tmp_path / "run"
    args = [
        "distill", str(text), "--teacher", str(teacher), "--replace", "1", "--stages", "1", "--steps", "2",
        "--e2e-steps", "2", "--batch-size", "2", "--window", "32", "--eval-fraction", "0.2", "--out", str(out),
        "--quiet", "--json",
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [1] and [s["name"] for s in summary["stages"]] == ["align1", "e2e"]
    assert summary["eval_kl"] >= 0
    tensors, meta = read_model_file(out / "student.safetensors")
    config = BackboneConfig.from_dict(meta["config"])
    assert [config.layer_spec(i)[0] for i in range(2)] == ["attention", "mamba2"]
    # a teacher without an adapter: the student records the data's (bytes), so the other commands take it
    assert meta["adapter"]["name"] == "bytes"
    gen = ["generate", "--model", str(out / "student.safetensors"), "--prompt", "the ", "--max-new-tokens", "4"]
    assert main(gen) == 0
    capsys.readouterr()
    assert main(["describe", str(out / "student.safetensors")]) == 0
    described = capsys.readouterr().out
    assert "layers       attention, mamba2" in described and "4 heads, 2 key/value heads, head_dim 8" in described
    # a finished run resumed: nothing to do but the summary
    assert main([*args, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"] == []
    # flags left out keep the run's settings; a different one is refused, naming it
    short = ["distill", str(text), "--teacher", str(teacher), "--out", str(out), "--resume", "--quiet", "--json"]
    assert main(short) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == [1]
    assert main([*short, "--steps", "5"]) == 2
    assert "planned with steps=2" in capsys.readouterr().err
    # the same folder without --resume or --overwrite is refused with one line
    assert main(args[:-1]) == 2
    assert "--resume or --overwrite" in capsys.readouterr().err


def test_cli_distill_refusals(files, tmp_path, capsys):
    teacher, text = files
    assert main(["distill", str(text), "--teacher", str(teacher), "--replace", "7", "--out", str(tmp_path / "x")]) == 2
    assert main(["distill", str(text), "--teacher", str(teacher), "--replace", "0.", "--out", str(tmp_path / "x")]) == 2
    assert main(["distill", str(text), "--out", str(tmp_path / "x")]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert parse_replace("0.5") == 0.5 and parse_replace("1.0") == 1.0 and parse_replace("1,3") == [1, 3]


def test_cli_distill_on_two_ray_train_workers(files, tmp_path, capsys):
    """One 2-worker Ray Train run (the end-to-end stage only, 3 steps; a local cluster of 2 CPUs, as the pipelines'
    Ray tests); about 25 s of Ray start-up on 2 cores."""
    pytest.importorskip("ray")
    from seqlab.pipelines.ray_cluster import connect

    started = connect(quiet=True, log_to_driver=False, num_cpus=2)
    try:
        teacher, text = files
        out = tmp_path / "ray-run"
        args = [
            "distill", str(text), "--teacher", str(teacher), "--replace", "1.0", "--stages", "1", "--steps", "0",
            "--e2e-steps", "3", "--batch-size", "2", "--window", "16", "--out", str(out), "--ray-workers", "2",
            "--quiet", "--json",
        ]  # fmt: skip
        assert main(args) == 0
    finally:
        if started:
            import ray

            ray.shutdown()
    summary = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summary["stages"]] == ["e2e"]
    for stage in summary["stages"]:
        sums = stage["weight_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1]  # DDP kept both replicas equal
    lines = [json.loads(line) for line in (out / "distill.jsonl").read_text().splitlines()]
    assert [(line["stage"], line["step"]) for line in lines] == [("e2e", 1), ("e2e", 2), ("e2e", 3)]
    tensors, meta = read_model_file(out / "student.safetensors")
    config = BackboneConfig.from_dict(meta["config"])
    assert all(config.layer_spec(i)[0] == "mamba2" for i in range(2))
    # the workers' training came back: the student is not the attention-initialised one
    fresh = build_student_like(teacher)
    assert any(not torch.equal(tensors[k], v) for k, v in fresh.items() if k in tensors)


def build_student_like(teacher_path):
    from seqlab.distill import build_student
    from seqlab.distill.teacher import load_teacher

    return build_student(load_teacher(teacher_path), [0, 1]).state_dict()
