"""``seqlab quantize`` and ``calibration_windows``: calibrate on files or a store (the adapter checked), write a
quantized model file that loads like any model, never touch the source, refuse bad input with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seqlab.checkpoint import save_model
from seqlab.errors import ConfigError, InputError
from seqlab.pipelines.calibration import calibration_windows
from seqlab.quant import AQLMLinear
from seqlab.testing import one_line, run_cli, tiny_config

DNA = Path(__file__).parent.parent / "data" / "dna" / "NC_005816.fna"
FAST = ["--aqlm", "2x4g8", "--max-rounds", "1", "--calib-windows", "6", "--window", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A small byte model file and a calibration text (this repository's own source: real text)."""
    from seqlab.domains.bytes import ByteAdapter

    folder = tmp_path_factory.mktemp("quantize")
    torch.manual_seed(0)
    model = ByteAdapter().build_model(tiny_config(d_model=32)).eval()
    save_model(folder / "model.safetensors", model)
    text = (Path(__file__).parents[2] / "seqlab" / "quant" / "aqlm.py").read_bytes()[:6000]
    (folder / "calib.txt").write_bytes(text)
    return folder


def test_quantize_writes_a_model_file_that_eval_and_generate_load(work, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, stdout, _ = run_cli(["quantize", work / "calib.txt", "--model", work / "model.safetensors", "--out", out,
                               *FAST, "--quiet"], capsys)  # fmt: skip
    assert code == 0
    assert "| layer | shape | bits/param | calibration error |" in stdout and "total (aqlm 2x4g8)" in stdout
    assert f"wrote {out}" in stdout and "6 calibration windows of 64" in stdout
    assert out.stat().st_size < (work / "model.safetensors").stat().st_size / 2
    from seqlab.domains.registry import model_from_checkpoint

    model, _ = model_from_checkpoint(out)
    assert sum(isinstance(m, AQLMLinear) for m in model.modules()) == 6  # in/x/out of two layers; dt_proj is 2 wide
    code, stdout, _ = run_cli(["eval", work / "calib.txt", "--model", out, "--quiet"], capsys)
    assert code == 0 and "bits_per_byte" in stdout
    code, stdout, _ = run_cli(["generate", "--model", out, "--prompt", "def ", "--max-new-tokens", "5"], capsys)
    assert code == 0


def test_json_summary_and_fine_tune(work, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    argv = ["quantize", work / "calib.txt", "--model", work / "model.safetensors", "--out", out, *FAST, "--json"]
    code, stdout, _ = run_cli([*argv, "--fine-tune-steps", "3", "--fine-tune-lr", "1e-3", "--quiet"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["config"] == "2x4g8" and summary["calibration_windows"] == 6
    assert summary["file_bytes"] == out.stat().st_size < summary["source_bytes"]
    assert summary["full_precision_layers"] == [f"backbone.layers.{i}.mixer.dt_proj" for i in range(2)]
    tune = summary["fine_tune"]
    assert tune["steps"] == 3 and tune["kl_after"] <= tune["kl_before"]


def test_store_calibration_checks_the_adapter(work, tmp_path, capsys):
    code, _, _ = run_cli(
        ["ingest", tmp_path / "text.zarr", work / "calib.txt", "--adapter", "bytes", "--quiet"], capsys
    )
    assert code == 0
    out = tmp_path / "q.safetensors"
    argv = ["quantize", "--model", work / "model.safetensors", "--out", out, *FAST, "--quiet"]
    code, stdout, _ = run_cli([*argv, "--store", tmp_path / "text.zarr"], capsys)
    assert code == 0 and out.exists()
    code, _, _ = run_cli(["ingest", tmp_path / "dna.zarr", DNA, "--adapter", "dna", "--quiet"], capsys)
    assert code == 0
    code, _, err = run_cli([*argv, "--overwrite", "--store", tmp_path / "dna.zarr"], capsys)
    assert code == 2 and "written by adapter" in one_line(err)


def test_the_source_and_an_existing_out_are_never_overwritten(work, tmp_path, capsys):
    source = work / "model.safetensors"
    before = source.read_bytes()
    code, _, err = run_cli(["quantize", work / "calib.txt", "--model", source, "--out", source, "--overwrite", *FAST],
                           capsys)  # fmt: skip
    assert code == 2 and "is the source model file" in one_line(err)
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(["quantize", work / "calib.txt", "--model", source, "--out", out, *FAST], capsys)
    assert code == 2 and "exists; pass --overwrite" in one_line(err)
    short = tmp_path / "short.txt"
    short.write_bytes(b"too short")  # a failure after the checks (no full window): --out stays as it was
    code, _, err = run_cli(["quantize", short, "--model", source, "--out", out, "--overwrite", *FAST], capsys)
    assert code == 2 and "holds no window of 64 elements" in one_line(err)
    assert out.read_bytes() == b"keep me" and source.read_bytes() == before


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--aqlm", "2x17g8"], "codebook_bits must be in 1..16"),
        (["--aqlm", "two"], "--aqlm"),
        (["--window", "0"], "--window"),
    ],
)
def test_bad_settings_are_one_line(work, tmp_path, capsys, extra, words):
    argv = ["quantize", work / "calib.txt", "--model", work / "model.safetensors", "--out", tmp_path / "q.st"]
    code, _, err = run_cli([*argv, *extra], capsys)
    assert code == 2 and words in one_line(err)
    assert not (tmp_path / "q.st").exists()


def test_calibration_windows_are_a_seeded_uniform_choice_of_full_windows(work, tmp_path):
    from seqlab.domains.registry import model_from_checkpoint

    model, adapter = model_from_checkpoint(work / "model.safetensors")
    data = (work / "calib.txt").read_bytes()
    files = [work / "calib.txt"]
    every = calibration_windows(model, adapter, files=files, count=1000, window=100)
    assert len(every) == len(data) // 100 and all(w.shape == (1, 100) for w in every)
    assert [bytes(w[0].tolist()) for w in every] == [data[i * 100 : (i + 1) * 100] for i in range(len(every))]
    some = calibration_windows(model, adapter, files=files, count=5, window=100, seed=1)
    again = calibration_windows(model, adapter, files=files, count=5, window=100, seed=1)
    other = calibration_windows(model, adapter, files=files, count=5, window=100, seed=2)
    pool = {bytes(w[0].tolist()) for w in every}
    assert len(some) == 5 and all(bytes(w[0].tolist()) in pool for w in some)
    assert all(torch.equal(a, b) for a, b in zip(some, again))
    assert not all(torch.equal(a, b) for a, b in zip(some, other))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        calibration_windows(model, adapter, files=[empty])
    with pytest.raises(InputError, match="no such file"):
        calibration_windows(model, adapter, files=[tmp_path / "nope.txt"])
    with pytest.raises(ConfigError, match="files or as a store"):
        calibration_windows(model, adapter)
    with pytest.raises(ConfigError, match="count must be a positive integer"):
        calibration_windows(model, adapter, files=files, count=0)


def test_head_flag_quantizes_the_lm_head_and_the_tied_embedding_stays(work, tmp_path, capsys):
    from seqlab.domains.registry import model_from_checkpoint

    out = tmp_path / "q.safetensors"
    argv = ["quantize", work / "calib.txt", "--model", work / "model.safetensors", "--out", out, *FAST, "--quiet"]
    code, stdout, _ = run_cli([*argv, "--head"], capsys)
    assert code == 0 and "| lm_head | 256x32 |" in stdout
    model, _ = model_from_checkpoint(out)
    assert isinstance(model.lm_head, AQLMLinear) and model.embeddings.weight.shape == (256, 32)
    ids = torch.tensor([list(b"def quantize")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_describe_names_the_quantization_and_counts_the_weights_it_stands_for(work, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, _, _ = run_cli(["quantize", work / "calib.txt", "--model", work / "model.safetensors", "--out", out,
                          *FAST, "--quiet"], capsys)  # fmt: skip
    assert code == 0
    code, quantized, _ = run_cli(["describe", out], capsys)
    assert code == 0
    assert "quantized    AQLM 2x4g8: 6 layers at 3.0" in quantized and "the rest at 16 bits" in quantized
    code, plain, _ = run_cli(["describe", work / "model.safetensors"], capsys)
    assert "quantized" not in plain
    params = [line for line in plain.splitlines() if line.startswith("parameters")]
    assert params and params == [line for line in quantized.splitlines() if line.startswith("parameters")]
