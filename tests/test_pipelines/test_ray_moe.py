"""MoE models on the Ray paths: the Ray Data jobs (score, embed, generate) load an MoE model file and equal the
model run directly; data-parallel Ray Train averages the router's ``moe_*`` fields over the workers; DDP trains
an MoE model (experts that get no token have zero, not missing, gradients). Tiny byte models; the Ray Train test
takes about a minute on 2 cores, the others seconds."""

from __future__ import annotations

import gc
import json
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from seqlab.config import BackboneConfig
from seqlab.ffn import MoEFeedForward, parameter_counts, router_losses
from seqlab.models import LanguageModel

MOE = {"ffn": "moe", "moe_experts": 4, "moe_d_expert": 16}


# ------------------------------------------------------------------------------------------------------
# DDP with MoE layers (the precondition of Ray Train's data parallelism), in this process


def test_ddp_trains_an_moe_model_whose_idle_experts_get_zero_gradients(tmp_path):
    """Each expert is a slice of one Parameter, so an expert that gets no token still has a gradient (zero):
    DDP's reducer sees every parameter used, every step. (A module with a truly unused parameter makes DDP fail
    on its next forward: the negative control.)"""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        config = BackboneConfig(d_model=16, n_layer=1, d_state=4, ffn="moe", moe_experts=8, moe_d_expert=16)
        model = LanguageModel(config, 32)
        ddp = DistributedDataParallel(model)
        layer = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
        idle_seen = False
        for _ in range(3):  # 2 tokens a step, top-1 of 8 experts: at least 6 experts idle every step
            ddp.zero_grad(set_to_none=True)
            out = ddp(torch.randint(0, 32, (1, 2)))
            router = router_losses(ddp)  # found through the DDP wrapper
            assert router is not None
            (out.logits.float().logsumexp(-1).mean() + router.loss).backward()
            for param in (layer.gate_up, layer.down, layer.router.weight):
                assert param.grad is not None and param.grad.shape == param.shape
            shares = router.expert_fraction[0]
            idle = [e for e, share in enumerate(shares) if share == 0]
            busy = [e for e, share in enumerate(shares) if share > 0]
            assert len(idle) >= 6
            assert all(float(layer.gate_up.grad[e].abs().sum()) == 0 for e in idle)
            assert all(float(layer.gate_up.grad[e].abs().sum()) > 0 for e in busy)
            idle_seen = True
        assert idle_seen

        class Unused(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.used, self.unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

            def forward(self, x):
                return self.used(x)

        control = DistributedDataParallel(Unused())
        with pytest.raises(RuntimeError, match="finished reduction"):
            for _ in range(2):
                control(torch.ones(1, 2)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_moe_fields_are_averaged_over_ranks_and_collapse_recomputed():
    """``_average_moe`` with a stand-in all-reduce that adds a second rank's record."""
    from seqlab.pipelines.ray_train import _average_moe

    def record(balance, dropped, shares):
        return {
            "loss": 1.0,
            "moe_balance_loss": balance,
            "moe_z_loss": 2 * balance,
            "moe_dropped_fraction": dropped,
            "moe_max_expert_fraction": max(max(s) for s in shares.values()),
            "moe_expert_fraction": shares,
        }

    rank0 = record(1.0, 0.1, {"1": [1.0, 0.0], "3": [0.5, 0.5]})
    rank1 = record(3.0, 0.3, {"1": [0.9, 0.1], "3": [0.25, 0.75]})

    def add_rank1(values):
        other = [rank1[k] for k in ("moe_balance_loss", "moe_z_loss", "moe_dropped_fraction")]
        other += [rank1["moe_max_expert_fraction"], 0.9, 0.1, 0.25, 0.75]
        values += torch.tensor(other, dtype=torch.float64)

    out = _average_moe(rank0, 2, add_rank1)
    assert out["moe_balance_loss"] == pytest.approx(2.0) and out["moe_z_loss"] == pytest.approx(4.0)
    assert out["moe_dropped_fraction"] == pytest.approx(0.2)
    assert out["moe_max_expert_fraction"] == pytest.approx((1.0 + 0.9) / 2)
    assert out["moe_expert_fraction"] == {"1": pytest.approx([0.95, 0.05]), "3": pytest.approx([0.375, 0.625])}
    # rank 0 alone collapsed in layer 1 (100%); so did the global batch (95%); layer 3 did not
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("MoE router collapse in layer 1: expert 0")
    assert _average_moe({"loss": 1.0}, 2, add_rank1) == {}  # a dense model's record


# ------------------------------------------------------------------------------------------------------
# the Ray Data jobs


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    """An MoE byte model file (2 layers, the second one an MoE layer: moe_every=2) and a store of two texts."""
    pytest.importorskip("zarr")
    from seqlab.checkpoint import save_model
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines import SequenceStore

    root = tmp_path_factory.mktemp("ray_moe")
    torch.manual_seed(0)
    adapter = ByteAdapter()
    config = BackboneConfig(d_model=16, n_layer=2, d_state=4, moe_every=2, **MOE)
    model = adapter.build_model(config).eval()
    assert [config.layer_spec(i)[1] for i in range(2)] == ["mlp", "moe"]
    save_model(root / "model.safetensors", model)
    text = (Path(__file__).resolve().parents[2] / "docs" / "ray-jobs.md").read_bytes()
    store = SequenceStore(root / "in.zarr", "w")
    store.write("a", [adapter.encode(text[:900])], adapter=adapter, chunk_elements=256)
    store.write("b", [adapter.encode(text[900:1400])], adapter=adapter, chunk_elements=256)
    return {"root": root, "model": model, "model_path": str(root / "model.safetensors"), "store": str(root / "in.zarr")}


def test_ray_jobs_score_embed_and_generate_with_an_moe_model(ray_cluster, moe_files, capsys):
    from seqlab.pipelines import SequenceStore
    from seqlab.pipelines.ray_jobs import embed, score
    from seqlab.testing import run_cli

    root, model = moe_files["root"], moe_files["model"]
    store = SequenceStore(moe_files["store"], "r")
    result = score(moe_files["model_path"], moe_files["store"], root / "bits.zarr", window=100, concurrency=1)
    bits = SequenceStore(root / "bits.zarr", "r")
    for name in ("a", "b"):
        ids = store.read(name)
        with torch.no_grad():
            logits = model(ids[None]).logits[0, :-1].float()
        expected = (-torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0] / math.log(2)).numpy()
        # windows of 100 with the state carried: the one pass (MoE routing is per token at evaluation)
        np.testing.assert_allclose(bits.read(name, raw=True), expected, rtol=0, atol=1e-4)
        assert result.totals[name]["positions"] == ids.shape[0] - 1
    info = bits.describe("a").attrs["seqlab_job"]
    assert info["model"]["fingerprint"] == model.fingerprint

    embed(moe_files["model_path"], moe_files["store"], root / "embed.zarr", window=100, concurrency=1)
    ids = store.read("b")
    with torch.no_grad():
        hidden = model(ids[None]).hidden[0]
    expected = np.stack([hidden[s : s + 100].mean(0).numpy() for s in range(0, ids.shape[0], 100)])
    np.testing.assert_allclose(SequenceStore(root / "embed.zarr", "r").read("b", raw=True), expected, atol=1e-4)

    # generate over the store through the command line
    argv = ["generate", moe_files["store"], root / "gen.zarr", "--model", moe_files["model_path"]]
    argv += ["--max-new-tokens", 8, "--prompt-length", 64, "--concurrency", 1, "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    out = SequenceStore(root / "gen.zarr", "r")
    for name in ("a", "b"):
        direct = model.generate(store.read(name)[-64:], 8, temperature=0, seed=zlib.crc32(name.encode()))
        assert out.read(name).tolist() == direct.tokens[0]


# ------------------------------------------------------------------------------------------------------
# data-parallel Ray Train


def _wait_for_cpus(ray, n: int = 2) -> None:
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < n:
        assert time.time() < deadline, f"{n} CPUs never came free on the shared cluster: {ray.available_resources()}"
        gc.collect()
        time.sleep(0.5)


def test_ray_train_averages_moe_fields_over_two_workers(ray_cluster, tmp_path):
    from seqlab.domains import describe_model
    from seqlab.pipelines.ray_train import load_trained_model, train_data_parallel
    from seqlab.train import TrainConfig

    backbone = BackboneConfig(d_model=16, n_layer=2, d_state=4, moe_every=2, **MOE)
    # random tokens: the two shards (350 tokens each) differ, so the ranks route differently
    tokens = torch.randint(0, 16, (700,), generator=torch.Generator().manual_seed(1))
    window, batch = 16, 4
    log = tmp_path / "rank0.jsonl"  # rank 0 writes its own (not averaged) step records here
    config = TrainConfig(lr=1e-2, max_steps=3, batch_size=batch, window=window, progress=False, log_path=str(log))
    _wait_for_cpus(ray_cluster)
    result = train_data_parallel(
        (backbone.to_dict(), 16),
        config,
        tokens,
        num_workers=2,
        storage_path=os.fspath(tmp_path / "ray"),
        name="moe-ddp",
        quiet=True,
    )
    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 3 and metrics["world_size"] == 2
    sums = metrics["weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # DDP averaged every gradient, the experts' included

    own = json.loads(log.read_text().splitlines()[-1])  # rank 0's last record
    assert own["step"] == 3
    shares = metrics["moe_expert_fraction"]
    assert sorted(shares) == ["1"]  # layer 1 is the MoE layer (moe_every=2)
    # rank 1's shares, recovered from the mean: a real routing of its own batch (each share a multiple of
    # 1/tokens, the shares summing to 1), and not rank 0's (the ranks train on different shards)
    pairs = batch * window
    rank1 = [2 * mean - mine for mean, mine in zip(shares["1"], own["moe_expert_fraction"]["1"])]
    assert sum(rank1) == pytest.approx(1.0) and all(-1e-9 <= s <= 1 + 1e-9 for s in rank1)
    assert all(abs(s * pairs - round(s * pairs)) < 1e-6 for s in rank1)
    assert rank1 != pytest.approx(own["moe_expert_fraction"]["1"])
    for key in ("moe_balance_loss", "moe_z_loss", "moe_dropped_fraction", "moe_max_expert_fraction"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
        rank1_value = 2 * metrics[key] - own[key]
        assert rank1_value >= -1e-9, key  # a mean of two non-negative numbers, one of them rank 0's
    assert metrics["moe_balance_loss"] != pytest.approx(own["moe_balance_loss"])

    model = load_trained_model(result)
    assert model.config == backbone and isinstance(model.backbone.layers[1].ffn, MoEFeedForward)
    # seqlab describe reads the Ray checkpoint too (no adapter recorded: rebuilt as a LanguageModel)
    with result.checkpoint.as_directory() as directory:
        summary = describe_model(directory)
    assert summary["class"] == "LanguageModel" and summary["adapter"] is None and summary["vocab_size"] == 16
    assert summary["parameters"] == parameter_counts(model) and summary["moe"]["layers"] == [1]
