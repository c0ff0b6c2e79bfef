"""Data-parallel training with Ray Train: 2 CPU workers, gloo, DDP-averaged gradients, seqlab checkpoints."""

import gc
import os
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from seqlab.config import BackboneConfig  # noqa: E402 (after the skip: ray_train imports ray)
from seqlab.models import LanguageModel  # noqa: E402
from seqlab.pipelines.ray_train import load_trained_model, train_data_parallel  # noqa: E402
from seqlab.train import TrainConfig  # noqa: E402


def test_two_workers_train_average_gradients_and_checkpoint(ray_cluster, tmp_path):
    backbone = BackboneConfig(d_model=16, n_layer=1)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2], dtype=torch.long)
    tokens = pattern.repeat(343)  # 2401 tokens: 1200 per worker (the last one dropped)
    # The period does not divide the shard size, so the two ranks see different windows and gradients.
    assert not torch.equal(tokens[:1200], tokens[1200:2400])
    config = TrainConfig(lr=1e-2, weight_decay=0.0, max_steps=20, batch_size=4, window=32, progress=False, seed=0)
    # the two workers need both of the shared cluster's CPUs: an actor another test left alive would make Ray
    # Train wait forever, so say so instead
    deadline = time.time() + 60
    while ray_cluster.available_resources().get("CPU", 0) < 2:
        assert time.time() < deadline, (
            f"2 CPUs never came free on the shared cluster: {ray_cluster.available_resources()}"
        )
        gc.collect()
        time.sleep(0.5)
    result = train_data_parallel(
        (backbone.to_dict(), 16),
        config,
        tokens,
        num_workers=2,
        storage_path=os.fspath(tmp_path / "ray"),
        name="ddp-smoke",
        checkpoint_every=10,
        report_seconds=3600,  # no report but the checkpoint steps' within the hour
    )

    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 20 and metrics["world_size"] == 2
    assert metrics["reports"] == 2  # steps 10 and 20
    losses = metrics["losses"]  # every step's, reported or not
    assert len(losses) == 20 and losses[-1] < losses[0]
    # Each rank trained on its own shard, yet the weights are the same: DDP averaged the gradients.
    sums = metrics["weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]

    assert result.checkpoint is not None
    model = load_trained_model(result)
    assert isinstance(model, LanguageModel)
    assert model.config == backbone and model.vocab_size == 16
    fresh = LanguageModel(backbone, 16)
    assert model.fingerprint == fresh.fingerprint
    assert not torch.equal(model.lm_head.weight, fresh.lm_head.weight)
    # The loaded weights are the trained ones, and they predict the pattern better than chance.
    with torch.no_grad():
        out = model(tokens[None, :240])
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], tokens[1:240])
    assert float(loss) < float(torch.log(torch.tensor(16.0)))


def test_packed_rows_are_refused_before_any_worker_starts(tmp_path):
    """Ray Train shards one token stream; a packed config would let state and targets run across documents, so it
    is refused up front (no cluster is started: the check comes first)."""
    from seqlab.errors import ConfigError

    config = TrainConfig(max_steps=1, batch_size=1, window=8, pack=True, carry_state=False)
    with pytest.raises(ConfigError, match="packed rows"):
        train_data_parallel(lambda: None, config, torch.zeros(64, dtype=torch.int64), storage_path=tmp_path)


def test_reports_are_paced_so_ray_never_holds_a_step_back():
    """Ray Train's controller takes one report per worker each time it polls them (every 2 s by default), and a
    worker that reports again before that waits: reporting every step held training to one step per poll. A step
    reports when ``report_seconds`` passed since the last report, and always at a checkpoint step and the last."""
    from seqlab.pipelines.ray_train import _ReportPace

    now = [100.0]
    pace = _ReportPace(2.0, 10, 25, lambda: now[0])
    chosen = []
    for step in range(1, 26):
        now[0] += 0.3  # a step takes 0.3 s
        if pace.wants(step):
            chosen.append(step)
            pace.reported()
    # 0.3 s steps: 2 s have passed at every 7th step after a report; 10, 20 (checkpoints) and 25 (last) always
    assert chosen == [7, 10, 17, 20, 25]
    every_step = _ReportPace(0.0, 0, 5, lambda: now[0])
    assert [s for s in range(1, 6) if every_step.wants(s)] == [1, 2, 3, 4, 5]
    never = _ReportPace(float("inf"), 0, 5, lambda: now[0])
    assert [s for s in range(1, 6) if never.wants(s)] == [5]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "2", True])
def test_a_bad_report_interval_is_refused_before_any_worker_starts(bad, tmp_path):
    from seqlab.errors import ConfigError

    config = TrainConfig(max_steps=1, batch_size=1, window=8)
    with pytest.raises(ConfigError, match="report_seconds must be a finite number of seconds >= 0"):
        train_data_parallel(
            (BackboneConfig(d_model=8, n_layer=1).to_dict(), 4),
            config,
            torch.zeros(64, dtype=torch.int64),
            storage_path=tmp_path,
            report_seconds=bad,
        )
