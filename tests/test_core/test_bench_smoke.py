"""The bench scripts run end to end in --quick mode and print their tables (no timing assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_bench(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # One thread: stable on a shared machine. Each takes seconds; the timeout is only a backstop.
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=BENCH,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("machine:")
    return proc.stdout


def test_cpu_forward_quick_runs_and_prints_the_table():
    out = run_bench("cpu_forward.py", "--quick")
    assert "| model | L | seqlab native tok/s | seqlab chunked tok/s | HF tok/s | native / HF | chunked / HF |" in out
    assert "native kernels built here:" in out
    assert "| Mamba-1 | 128 |" in out and "| Mamba-2 | 256 |" in out
    assert "seqlab vs HF logits" in out
    assert "| tokens | peak RSS (MiB) |" in out and "peak RSS 16,384 / 4,096 tokens" in out


def test_train_speed_quick_runs_and_prints_the_table():
    out = run_bench("train_speed.py", "--quick", "--lengths", "64", "--models", "Mamba-2")
    assert "| model | L | seqlab native tok/s | seqlab chunked tok/s | HF tok/s | native / HF |" in out
    assert "| Mamba-2 | 64 |" in out
    assert "Mamba-2: seqlab chunked vs HF on 100 tokens: loss" in out


def test_llamacpp_quick_runs_or_says_why_not():
    """With llama-cpp-python: the agreement line and the table; without: one line saying so, exit status 0."""
    out = run_bench("llamacpp.py", "--quick", "--models", "Mamba-1", "--lengths", "64", "--new-tokens", "4")
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        assert "skipped" in out
        return
    assert "Mamba-1: llama.cpp vs seqlab logits on 48 tokens" in out and "greedy tokens equal: 16/16" in out
    assert "| model | metric | seqlab tok/s | llama.cpp tok/s | seqlab / llama.cpp |" in out
    assert "| Mamba-1 | prompt 64 |" in out and "| Mamba-1 | decode b=1 (4 tokens after 64) |" in out


def test_generate_quick_runs_and_prints_the_table():
    out = run_bench("generate.py", "--quick")
    assert "| model | context | seqlab decode tok/s | HF decode tok/s | seqlab / HF |" in out
    assert "| Mamba-1 | 512 |" in out and "| Mamba-2 | decode tok/s at 512 / at 64 |" in out


def test_generate_quick_on_a_hybrid_prints_fused_and_eager():
    out = run_bench(
        "generate.py", "--quick", "--skip-hf", "--models", "Mamba-2", "--attention", "1", "--batches", "1", "2"
    )
    assert "| Mamba-2, attention in 1 | 512 | 2 |" in out and "| fused tok/s | eager tok/s |" in out
    assert "| in place tok/s | copied tok/s | in place / copied |" in out


def test_generate_quick_bfloat16_prints_its_table():
    out = run_bench(
        "generate.py", "--quick", "--skip-hf", "--skip-eager", "--models", "Mamba-1", "--bf16", "--batches", "1", "2"
    )
    assert "| bf16 fused | fp32 fused | bf16 / fp32 | bf16 fused | bf16 eager | fused / eager |" in out
    assert "| Mamba-1 | 512 | 2 |" in out
    # another width and depth (--shape), the model's label says which; sampled decoding's table (--sampling)
    out = run_bench(
        "generate.py", "--quick", "--skip-hf", "--models", "Mamba-2", "--shape", "64", "3", "--batches", "1",
        "--sampling",
    )  # fmt: skip
    assert "| Mamba-2 (64 x 3) | 512 | 1 |" in out
    assert "| sampled, many steps tok/s | sampled, step by step tok/s | many / step |" in out
    assert len([line for line in out.splitlines() if line.startswith("| Mamba-2 (64 x 3) | 512 | 1 |")]) == 2


def test_sampling_bench_quick_prints_its_table():
    out = run_bench("sampling.py", "--quick", "--vocab", "256", "40")
    assert "| vocab | options | compiled us | PyTorch twin us | filters + multinomial (before) us |" in out
    assert "| 256 | T 0.8, top-k 50, top-p 0.95 |" in out and "| 40 | T 1, top-p 0.9, min-p 0.05 |" in out


def test_decode_modes_bench_quick_prints_its_table():
    out = run_bench("decode_modes.py", "--quick", "--batches", "1", "2")
    assert "| batch | mode | tok/s |" in out and "| 2 | T 0.8, top-k 50, top-p 0.9 |" in out and "| 1 | greedy |" in out


def test_gpu_kernels_bench_runs_without_a_gpu():
    """Without CUDA the GPU kernel bench falls back to its CPU smoke mode, says so, and prints the table; the
    Triton interpreter runs the conv and decode kernels here (the scans take seconds per call interpreted)."""
    out = run_bench(
        "gpu_kernels.py", "--smoke", "--ops", "causal_conv1d", "decode", "--lengths", "32", "--contexts", "8"
    )
    assert "| op | shape | L | mode | min bytes | seqlab triton |" in out
    assert "Targets" in out
    if not os.path.exists("/dev/nvidiactl"):
        assert "NO GPU FOUND" in out


def test_memory_bench_quick_runs_and_prints_the_table():
    out = run_bench("memory.py", "--quick")
    assert "| events observed |" in out and "KV cache" in out


@pytest.mark.parametrize("script", ["stream_scale.py", "ray_scale.py"])
def test_pipeline_scale_benches_quick(script):
    pytest.importorskip("zarr")
    out = run_bench(script, "--quick")
    assert "\n| " in out
    assert ("peak RSS" if script == "stream_scale.py" else "overhead vs in-process") in out


def test_ray_train_bench_quick_runs_and_prints_the_table():
    pytest.importorskip("ray")
    out = run_bench("ray_train.py", "--quick")
    assert "Ray Train poll 0.25 s" in out  # --quick's poll reached the cluster the script started
    assert "both Ray runs end on the same per-step losses: yes" in out
    assert "| run | seconds | steps/s | reports to Ray | every-step time / this run's |" in out
    assert "| Ray Train, a report every step |" in out and "| 6 | 1.00x |" in out  # 6 steps, 6 reports
    assert "| Ray Train, paced reports |" in out


def test_moe_bench_quick_runs_and_prints_the_table():
    out = run_bench("moe.py", "--quick")
    assert "| experts | batch x length | mode | MoE tok/s | dense tok/s | MoE / dense time" in out
    assert "| 8 | 1 x 256 | train fwd+bwd |" in out and "| 4 | 2 x 64 | eval fwd (drop-free) |" in out
    assert "target: MoE train fwd+bwd time <= 1.5x dense" in out
    assert "| batch x length | mode | layer | peak RSS (MiB) |" in out and "| MoE E=8 |" in out


def test_hybrid_bench_quick_runs_and_prints_the_table():
    out = run_bench("hybrid.py", "--quick")
    assert (
        "| model | context | prefill s | decode tok/s | ms / token | state bytes | KV cache part | per token |" in out
    )
    assert "| attention | 32 |" in out and "| hybrid | 256 |" in out and "| mamba2 | 256 |" in out
    assert "| context | hybrid / attention decode tok/s | mamba2 / attention decode tok/s |" in out
    assert "mamba2: decode tok/s at 256 / at 32 = " in out
    row = next(line for line in out.splitlines() if line.startswith("| attention | 256 | "))
    assert "| 2.0 MiB | 2.0 MiB |" in row  # 256 tokens x 2 x 4 heads x 64 x 4 bytes x 4 layers


def test_decoding_bench_quick_runs_and_prints_both_tables():
    """Trains tiny target, byte draft and subword draft for a few steps, then decodes with every method; greedy
    rows must produce the target's own greedy bytes (the script checks and marks them "(same)")."""
    out = run_bench("decoding.py", "--quick")
    assert "| method | bytes/s | target forwards per byte | acceptance | speed vs plain | draft model's level" in out
    assert "greedy" in out and "sampling T=1" in out
    for method in ("plain", "byte draft, k=2", "Max-Gram, k=4", "subword draft", "cascade"):
        assert f"| {method}" in out, method
    assert out.count("(same)") >= 5 and "DIFFERS" not in out
    assert "verified by one forward (same)" in out  # the peer that verifies by a forward, not compiled steps
    assert "| L | one forward (ms) | L steps (ms) | forward / steps |" in out and "| 33 | " in out


def test_packed_prefill_bench_quick_runs_and_prints_the_table():
    out = run_bench("packed_prefill.py", "--quick")
    assert "| model | packed prefill tok/s | one by one tok/s | packed / one by one |" in out
    for model in ("mamba1", "mamba2", "mamba3", "hybrid"):
        assert f"| {model} | " in out, model


def test_trained_decode_quick_runs_on_a_model_file(tmp_path):
    """A byte model with MLP blocks written by save_model, decoded fused and eager: the table, the fused-layer
    count and the same tokens on both paths."""
    import torch

    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter

    torch.manual_seed(0)
    model = ByteAdapter().build_model(BackboneConfig(d_model=16, n_layer=2, d_state=4, ffn="mlp", d_ffn=32))
    path = save_model(tmp_path / "byte-mlp.safetensors", model)
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"The quick brown fox jumps over the lazy dog. " * 2)
    out = run_bench(
        "trained_decode.py", os.fspath(path), "--quick", "--prompt", os.fspath(prompt), "--batches", "1", "3"
    )
    assert "| model | layers fused | batch | fused tok/s | eager tok/s | fused / eager | same tokens |" in out
    assert "| byte-mlp.safetensors | 2/2 | 1 |" in out and "| byte-mlp.safetensors | 2/2 | 3 |" in out
    assert out.count("| yes |") == 2
    # sampled decoding: the compiled many-steps call samples the eager loop's tokens
    out = run_bench(
        "trained_decode.py", os.fspath(path), "--quick", "--prompt", os.fspath(prompt), "--batches", "3", "--sample"
    )
    assert "sampled (temperature 0.8, top_k 50, top_p 0.95, seed 0) decode" in out
    assert "| byte-mlp.safetensors | 2/2 | 3 |" in out and out.count("| yes |") == 1
