"""Trainer: learning, schedule, grad accumulation, TBPTT carried state, logs, checkpoints and exact resume."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from seqlab.checkpoint import latest_checkpoint
from seqlab.errors import ConfigError, CorruptFileError, InputError, StateMismatchError
from seqlab.testing import tiny_lm
from seqlab.train import FrameSource, SequenceSource, TrainConfig, Trainer, WindowSource

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pattern_data(n: int) -> torch.Tensor:
    return torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * (n // 8))


def cfg(**kw) -> TrainConfig:
    base = {
        "lr": 1e-2,
        "max_steps": 20,
        "warmup_steps": 2,
        "batch_size": 4,
        "window": 16,
        "progress": False,
        "weight_decay": 0.0,
    }
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_on_a_repeating_pattern():
    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    records = Trainer(model, cfg(max_steps=40), pattern_data(4 * 400)).fit()
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first > 2.0 and last < 0.5 * first, (first, last)


def test_schedule_warmup_then_cosine():
    c = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1, progress=False)
    assert [c.lr_at(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert c.lr_at(4) == pytest.approx(1.0)
    assert c.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert c.lr_at(14) == pytest.approx(0.1)
    # the trainer's optimizer follows it
    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    records = Trainer(
        model,
        TrainConfig(lr=1e-2, warmup_steps=4, max_steps=14, min_lr_ratio=0.1, batch_size=2, window=8, progress=False),
        pattern_data(2 * 200),
    ).fit()
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * c.lr_factor(s) for s in range(14)])


def test_weight_decay_groups():
    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    trainer = Trainer(model, cfg(weight_decay=0.1), pattern_data(4 * 100))
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) for p in decay["params"])
    assert any(getattr(p, "_no_weight_decay", False) for p in no_decay["params"])


def test_grad_accumulation_matches_the_big_batch():
    data = torch.randint(0, 16, (4 * 100,), generator=torch.Generator().manual_seed(0))
    finals = []
    for accum in (1, 2):
        model = tiny_lm(vocab=16, d_model=16, n_layer=1)
        Trainer(model, cfg(max_steps=3, grad_accum=accum, grad_clip=None), data).fit()
        finals.append(model.state_dict())
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-4, atol=1e-5)


def keyed_noise(n_segments: int, seed: int, length: int = 128) -> torch.Tensor:
    """Each 128-token segment has a key token (one of 8); every token is the key with p=0.5, else noise.
    Knowing the key (seen up to 128 tokens back) saves ~1 nat per token; a window of 4 rarely holds it."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 8, (n_segments, 1), generator=g).expand(n_segments, length)
    noise = torch.randint(8, 24, (n_segments, length), generator=g)
    return torch.where(torch.rand(n_segments, length, generator=g) < 0.5, keys, noise).reshape(-1)


def test_carried_state_beats_reset_state_on_long_range_data():
    losses = {}
    for carry in (True, False):
        model = tiny_lm(vocab=32, d_model=32, n_layer=2)
        trainer = Trainer(
            model,
            cfg(max_steps=300, warmup_steps=5, batch_size=8, window=4, carry_state=carry, seed=0),
            keyed_noise(8 * 20, 0),
            keyed_noise(8 * 4, 1),
        )
        trainer.fit()
        losses[carry] = trainer.evaluate(windows=100)["eval_loss"]
    assert losses[True] < losses[False] - 0.1, losses


def test_sequence_source_batchify_and_memmap(tmp_path):
    data = np.arange(4 * 50, dtype=np.int32)
    np.save(tmp_path / "tokens.npy", data)
    source = SequenceSource(np.load(tmp_path / "tokens.npy", mmap_mode="r"), batch_size=4, window=8)
    assert source.num_windows == 6
    x, y = source.window(1)
    assert x.dtype == torch.long and x.shape == (4, 8)
    assert torch.equal(x[2], torch.arange(100 + 8, 100 + 16)) and torch.equal(y[2], x[2] + 1)
    assert torch.equal(SequenceSource(torch.from_numpy(data).long(), 4, 8).window(1)[0], x)


def test_epoch_wraps_and_state_resets():
    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    trainer = Trainer(model, cfg(max_steps=5, window=8), pattern_data(4 * 24))  # 2 windows per epoch
    trainer.fit()
    assert (trainer.pos.epoch, trainer.pos.window) == (2, 1)
    assert trainer.states[0] is not None and trainer.states[0].position == 8


def test_jsonl_log_has_the_fields(tmp_path):
    log = tmp_path / "log.jsonl"
    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    Trainer(
        model,
        cfg(max_steps=4, eval_every=2, eval_windows=2, log_path=str(log)),
        pattern_data(4 * 100),
        pattern_data(4 * 40),
    ).fit()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        assert {"step", "loss", "loss_unit", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
        assert r["loss_unit"] == "bits"
    assert "eval_metric" in lines[1] and "eval_metric" not in lines[0]
    # the loss is reported in bits, like the metric (bits per token): the two are the same number here
    assert lines[1]["eval_metric"] == pytest.approx(lines[1]["eval_loss"])


def test_loss_unit_bits_divides_nats_by_ln2_and_mse_reports_as_is():
    """The same run (same seed) logged in bits and in the loss's own unit: bits = nats / ln 2."""
    records = {}
    for unit in ("bits", "mse"):
        model = tiny_lm(vocab=16, d_model=16, n_layer=1, seed=0)
        records[unit] = Trainer(
            model,
            cfg(max_steps=3, eval_every=3, eval_windows=2),
            pattern_data(4 * 100),
            pattern_data(4 * 40),
            loss_unit=unit,
        ).fit()
    for bits, raw in zip(records["bits"], records["mse"]):
        assert (bits["loss_unit"], raw["loss_unit"]) == ("bits", "mse")
        assert bits["loss"] == pytest.approx(raw["loss"] / math.log(2))
    assert records["bits"][-1]["eval_loss"] == pytest.approx(records["mse"][-1]["eval_loss"] / math.log(2))
    with pytest.raises(ConfigError, match="loss_unit"):
        Trainer(tiny_lm(vocab=16, d_model=16, n_layer=1), cfg(), pattern_data(4 * 100), loss_unit="nats")


def test_window_sources_satisfy_the_protocol_and_frames_match_ids():
    """SequenceSource and FrameSource are WindowSources with one window implementation: frames holding the
    ids as floats give the same windows, as float32."""
    ids = torch.arange(103) % 13
    seq, frames = SequenceSource(ids, 3, 8), FrameSource(ids[:, None].float(), 3, 8)
    assert isinstance(seq, WindowSource) and isinstance(frames, WindowSource)
    assert not isinstance(ids, WindowSource)
    assert (seq.num_windows, frames.num_windows) == (4, 4)
    for i in range(seq.num_windows):
        (x, y), (fx, fy) = seq.window(i), frames.window(i)
        assert x.dtype == torch.int64 and fx.dtype == torch.float32 and fx.shape == (3, 8, 1)
        assert torch.equal(fx[..., 0], x.float()) and torch.equal(fy[..., 0], y.float())
    # a memmap-like numpy array is read window by window, with the same windows as the tensor
    array = SequenceSource(ids.numpy().astype(np.uint8), 3, 8)
    assert all(torch.equal(array.window(i)[1], seq.window(i)[1]) for i in range(4))
    with pytest.raises(IndexError):
        frames.window(4)

    class NoBatch:  # a source of the old kind, without batch_size: refused by name, not taken for token data
        num_windows = 2

        def window(self, index):
            return seq.window(index)

    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    with pytest.raises(InputError, match="eval_data: a NoBatch is not a training source .*no batch_size"):
        Trainer(model, cfg(batch_size=3, window=8), seq, NoBatch())
    for bad in ({"batch_size": 0}, {"window": 0}, {"window": -3}, {"batch_size": True}):
        with pytest.raises(InputError, match=next(iter(bad))):
            SequenceSource(ids, **{"batch_size": 3, "window": 8, **bad})


def test_bf16_autocast_trains_with_fp32_params():
    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    records = Trainer(model, cfg(max_steps=3, bf16=True), pattern_data(4 * 100)).fit()
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _run_worker(out: Path, *args: str) -> int:
    return subprocess.run(
        [sys.executable, str(HERE / "_train_worker.py"), str(out), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    ).returncode


def test_exact_resume_after_kill_9(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    assert _run_worker(straight, "fresh") == 0
    assert _run_worker(crashed, "fresh", "6") == -9  # SIGKILL after step 6; latest checkpoint is step 4
    assert latest_checkpoint(crashed / "ckpt").name == "step-00000004"
    assert not (crashed / "final.safetensors").exists()
    assert _run_worker(crashed, "resume") == 0
    a, b = load_file(straight / "final.safetensors"), load_file(crashed / "final.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (crashed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # the resumed run dropped the log lines of steps it redid


def _checkpointed(tmp_path) -> tuple[Path, TrainConfig]:
    config = cfg(max_steps=2, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
    Trainer(tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100)).fit()
    return tmp_path / "ckpt", config


def test_resume_via_fit_continues(tmp_path):
    ckpt, config = _checkpointed(tmp_path)
    from dataclasses import replace

    trainer = Trainer(tiny_lm(vocab=16, d_model=16, n_layer=1), replace(config, max_steps=4), pattern_data(4 * 100))
    records = trainer.fit(resume=True)
    assert [r["step"] for r in records] == [3, 4]
    assert latest_checkpoint(ckpt).name == "step-00000004"


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
@pytest.mark.parametrize("name", ["model.safetensors", "trainer.safetensors", "state-0.safetensors"])
def test_damaged_checkpoint_files_are_refused(tmp_path, damage, name):
    ckpt, config = _checkpointed(tmp_path)
    path = ckpt / "step-00000002" / name
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 7]
    else:
        data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=name):
        Trainer.resume(ckpt, tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100))


def test_missing_latest_and_foreign_model(tmp_path):
    ckpt, config = _checkpointed(tmp_path)
    with pytest.raises(StateMismatchError, match="fingerprint"):
        Trainer.resume(ckpt, tiny_lm(vocab=16, d_model=24, n_layer=1), config, pattern_data(4 * 100))
    with pytest.raises(ConfigError, match="window"):
        from dataclasses import replace

        Trainer.resume(ckpt, tiny_lm(vocab=16, d_model=16, n_layer=1), replace(config, window=8), pattern_data(4 * 100))
    (ckpt / "latest").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer.resume(ckpt, tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100))
    (ckpt / "latest").write_text("step-00000099\n")
    with pytest.raises(CorruptFileError, match="latest"):
        Trainer.resume(ckpt, tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100))


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", 0.0),
        ("lr", float("nan")),
        ("weight_decay", -1.0),
        ("betas", (0.9,)),
        ("betas", (0.9, 1.5)),
        ("warmup_steps", -1),
        ("max_steps", 0),
        ("min_lr_ratio", 2.0),
        ("grad_clip", 0.0),
        ("grad_accum", 0),
        ("batch_size", 0),
        ("window", 0),
        ("carry_state", 1),
        ("bf16", "yes"),
        ("eval_every", -1),
        ("eval_windows", 0),
        ("checkpoint_every", -1),
        ("seed", -1),
        ("progress", None),
        ("log_path", 3),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{field: value})


def test_config_cross_field_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(warmup_steps=10, max_steps=5)


# ------------------------------------------------------------------------------------------------------
# keep-last-N checkpoints

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import seqlab.checkpoint  # noqa: E402
from seqlab.checkpoint import prune_checkpoints  # noqa: E402


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in folder.iterdir() if p.name.startswith("step-"))


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(keep=st.one_of(st.none(), st.integers(1, 3)), steps=st.integers(1, 5), every=st.integers(1, 2))
def test_keep_checkpoints_keeps_the_newest_n_and_resume_works(tmp_path_factory, keep, steps, every):
    ckpt = tmp_path_factory.mktemp("keep") / "ckpt"
    config = cfg(
        max_steps=steps, warmup_steps=0, checkpoint_dir=str(ckpt), checkpoint_every=every, keep_checkpoints=keep
    )
    Trainer(tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100)).fit()
    written = [s for s in range(1, steps + 1) if s % every == 0 or s == steps]
    assert _steps(ckpt) == (written if keep is None else written[-keep:])
    assert latest_checkpoint(ckpt).name == f"step-{steps:08d}"
    Trainer.resume(ckpt, tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100))


def test_a_crash_while_pruning_leaves_a_loadable_latest(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    config = cfg(max_steps=4, checkpoint_dir=str(ckpt), checkpoint_every=1, keep_checkpoints=None)
    Trainer(tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100)).fit()
    assert _steps(ckpt) == [1, 2, 3, 4]
    calls = []

    def dies_on_the_second_rmtree(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a crash between removing one folder and the next
        return real_rmtree(path, *args, **kwargs)

    real_rmtree = seqlab.checkpoint.shutil.rmtree
    monkeypatch.setattr(seqlab.checkpoint.shutil, "rmtree", dies_on_the_second_rmtree)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(ckpt, 1)
    monkeypatch.undo()
    # folders are renamed out of the way before they are removed: what keeps a step name is whole
    assert _steps(ckpt) == [4] and latest_checkpoint(ckpt).name == "step-00000004"
    assert any(p.name.endswith(".deleting") for p in ckpt.iterdir())
    trainer = Trainer.resume(
        ckpt, tiny_lm(vocab=16, d_model=16, n_layer=1), replace_cfg(config, max_steps=5), pattern_data(4 * 100)
    )
    assert trainer.step == 4
    trainer.fit()
    assert not any(p.name.endswith(".deleting") for p in ckpt.iterdir())  # the next prune finished the job
    assert _steps(ckpt) == [4, 5]


def test_pruning_never_removes_what_latest_names(tmp_path):
    ckpt = tmp_path / "ckpt"
    config = cfg(max_steps=3, checkpoint_dir=str(ckpt), checkpoint_every=1, keep_checkpoints=None)
    Trainer(tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100)).fit()
    from seqlab.checkpoint import set_latest

    set_latest(ckpt, "step-00000001")  # e.g. a repair pointed latest back at an older checkpoint
    prune_checkpoints(ckpt, 1)
    assert _steps(ckpt) == [1, 2, 3]  # later folders are left for the resumed run to rewrite
    (ckpt / "latest").write_bytes(b"garbage")
    prune_checkpoints(ckpt, 1)  # a damaged latest: nothing is removed
    assert _steps(ckpt) == [1, 2, 3]
    with pytest.raises(CorruptFileError, match="latest: damaged.*step-00000001, step-00000002, step-00000003"):
        latest_checkpoint(ckpt)


def replace_cfg(config, **kw):
    from dataclasses import replace

    return replace(config, **kw)


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", 1e-300),
        ("lr", 1e30),
        ("grad_clip", 1e-300),
        ("max_steps", 10**30),
        ("window", 2**40),
        ("seed", 2**64),
        ("keep_checkpoints", 0),
        ("keep_checkpoints", "all"),
        ("weight_decay", float("inf")),
    ],
)
def test_config_ranges_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("edit", ["one param group", "scheduler step", "rng"])
def test_a_restore_that_does_not_fit_changes_nothing(tmp_path, edit):
    """A trainer file with a right checksum whose optimizer, scheduler or RNG state does not fit: CorruptFileError
    naming it, and the model, optimizer, scheduler and RNGs are as they were."""
    from seqlab.checkpoint import FORMAT_VERSION, TRAINER_FORMAT, read_trainer_file
    from seqlab.safetensors_io import write_tensors

    ckpt, config = _checkpointed(tmp_path)
    path = ckpt / "step-00000002" / "trainer.safetensors"
    tensors, meta = read_trainer_file(path)
    body = {k: v for k, v in meta.items() if k not in ("format", "format_version", "file_sha256")}
    if edit == "one param group":
        body["optimizer"]["param_groups"] = body["optimizer"]["param_groups"][:1]
    elif edit == "scheduler step":
        body["scheduler"]["last_epoch"] = "two"
    else:
        body["rng"]["python"] = [3, [1, 2, 3], None]
    write_tensors(path, tensors, kind=TRAINER_FORMAT, version=FORMAT_VERSION, meta=body)
    trainer = Trainer(tiny_lm(vocab=16, d_model=16, n_layer=1), config, pattern_data(4 * 100))
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    sched, rng = trainer.scheduler.state_dict(), torch.get_rng_state()
    import random

    py_rng = random.getstate()
    with pytest.raises(CorruptFileError, match="trainer.safetensors"):
        trainer.load_checkpoint()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in weights.items())
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.scheduler.state_dict() == sched
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert trainer.step == 0
