"""bench/quant.py --quick runs in-process: its tables and JSON are there and sane (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch


def _bench_module(monkeypatch):
    bench = Path(__file__).resolve().parents[2] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_quant", bench / "quant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quant_quick(tmp_path, monkeypatch, capsys):
    module = _bench_module(monkeypatch)
    threads = torch.get_num_threads()
    try:
        # memory is measured in child processes by default; the child's code runs in-process below (a fresh
        # interpreter per variant would take most of the test's time)
        module.main(["--quick", "--memory", "none", "--repeats", "1", "--tokens", "4", "--out", str(tmp_path)])
        out = capsys.readouterr().out
        module.main(["--child", "decode", "--quick", "--model", str(tmp_path / "2x4g8.safetensors"), "--tokens", "2"])
        child = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert out.startswith("machine:")
    assert "| variant | quantize (s) | file (KiB) | file vs fp32 | bits/param, quantized layers |" in out
    assert "| variant | tokens/s | vs fp32 | ms per token | greedy tokens equal to fp32's |" in out
    assert "| variant | those matmuls (us per step) | vs fp32 | whole eager step (us) |" in out
    assert "| eager step tokens/s | eager vs fp32's eager |" in out  # the fused step and the eager AQLM paths
    assert "| variant | codes | codebooks | scales | embedding + head | other tensors | header |" in out
    assert "| layer | in->out | layers | fp32 | 2x4g8 |" in out and "| in_proj | 32->128 | 2 |" in out
    assert "| 2x4g8 lut_max_rows=0 |" in out and "| 1x6g8 |" in out
    assert "target (issue 20): the 2-bit model's file at most 1/10 of fp32's: 2x4g8 is" in out

    result = json.loads((tmp_path / "quant.json").read_text())
    assert result["machine"].startswith("machine:") and result["parameters"] > 0
    variants = result["variants"]
    assert set(variants) == {
        "fp32",
        "2x4g8",
        "2x4g8 lut_max_rows=0",
        "1x6g8",
        "1x6g8 lut_max_rows=0",
        "1x6g8 lookup table on every layer",  # 64 codewords, x_proj has 18 outputs: path_for says GEMM
    }
    assert variants["fp32"]["file_ratio"] == 1.0
    for name, row in variants.items():
        assert row["decode_tok_s"] > 0 and row["step_us"] > 0 and row["linear_us_per_step"] > 0
        assert row["decode_eager_tok_s"] > 0
        assert 0 <= row["same_tokens"] <= 1
        assert 0 < row["bits_per_byte"] < 9  # bytes: 8 bits/byte is uniform; a few training steps do better
        if name != "fp32":
            assert 0 < row["file_ratio"] < 1
            assert 2 < row["layer_bits_per_parameter"] < 8 and row["quantized_layers"] > 0
            assert row["lut_calls_per_step"] + row["gemm_calls_per_step"] == row["quantized_layers"]
    assert variants["2x4g8"]["lut_calls_per_step"] > 0  # the tiny in_proj (32 -> 128) takes the lookup table
    assert variants["2x4g8 lut_max_rows=0"]["lut_calls_per_step"] == 0
    assert variants["1x6g8 lookup table on every layer"]["gemm_calls_per_step"] == 0
    parts = variants["2x4g8"]["file_parts"]
    assert parts["codes"] > 0 and parts["codebooks"] > 0 and sum(parts.values()) == variants["2x4g8"]["file_bytes"]
    assert variants["fp32"]["file_parts"]["codes"] == 0
    assert result["layer_costs_us"]["in_proj"]["paths"]["2x4g8"] == "lut"

    line = next(line for line in child.splitlines() if line.startswith("CHILD_JSON "))
    memory = json.loads(line.removeprefix("CHILD_JSON "))
    assert memory["model_tensor_bytes"] > 0 and memory["ru_maxrss_kib"] > 0
    if memory["rss_after_load_kib"] is not None:  # Linux: /proc/self/status
        assert memory["peak_load_kib"] >= memory["rss_after_load_kib"] > 0
