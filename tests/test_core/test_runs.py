"""seqlab.runs: the run directory of a training run (run.json with its checksum, what a resume reads from the
latest checkpoint, setting a previous run aside, merging given and recorded settings, the model-size check)."""

from __future__ import annotations

import json

import pytest
import torch

from seqlab import runs
from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, CorruptFileError
from seqlab.testing import tiny_lm
from seqlab.train import SequenceSource, TrainConfig, Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RECORD = {
    "seqlab": "train",
    "adapter": {"name": "bytes", "settings": {"utf8": False}},
    "model": {"d_model": 16},
    "train": {"lr": 0.004},
    "data": {"files": ["/x/c.txt"]},
    "train_elements": 5000,
}


def test_run_json_round_trips_with_a_checksum_and_an_edit_is_refused(tmp_path):
    assert runs.read_run(tmp_path) == {}
    runs.write_run(tmp_path, {**RECORD, "checksum": "stale"})
    path = tmp_path / runs.RUN_FILE
    stored = json.loads(path.read_text())
    assert stored["format_version"] == runs.RUN_FORMAT_VERSION == 2
    assert stored["checksum"] == runs.run_checksum(stored) != "stale"
    assert runs.read_run(tmp_path) == stored
    good = path.read_bytes()
    for old, new in ((b'"lr": 0.004', b'"lr": 0.005'), (b'"d_model": 16', b'"d_model": 17')):
        path.write_bytes(good.replace(old, new, 1))
        with pytest.raises(CorruptFileError, match="run.json: checksum mismatch"):
            runs.read_run(tmp_path)
    path.write_bytes(good[:-20])
    with pytest.raises(CorruptFileError, match="run.json: not valid JSON"):
        runs.read_run(tmp_path)
    path.write_bytes(b"[1, 2]")
    with pytest.raises(CorruptFileError, match="not a JSON object"):
        runs.read_run(tmp_path)


def test_a_version_1_run_json_has_no_checksum_but_its_parts_are_still_checked(tmp_path):
    path = tmp_path / runs.RUN_FILE
    path.write_text(json.dumps(RECORD))
    assert runs.read_run(tmp_path) == RECORD
    path.write_text(json.dumps({**RECORD, "train": [1]}))
    with pytest.raises(CorruptFileError, match="run.json: train is not a JSON object"):
        runs.read_run(tmp_path)


@pytest.fixture
def checkpointed(tmp_path):
    """A real run directory: two Trainer steps of a tiny model stamped with an adapter, checkpointed at step 2."""
    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    model.adapter_info = {"name": "bytes", "settings": {"utf8": False}}
    config = TrainConfig(
        max_steps=2,
        batch_size=2,
        window=8,
        checkpoint_every=2,
        checkpoint_dir=str(tmp_path),
        log_path=str(tmp_path / runs.LOG_FILE),
        progress=False,
        lr=4e-3,
    )
    records = Trainer(model, config, SequenceSource(torch.arange(400) % 16, 2, 8)).fit()
    return tmp_path, model, records


def test_a_checkpoint_gives_its_adapter_model_and_training_settings(checkpointed):
    out, model, _ = checkpointed
    assert runs.holds_run(out) == "a checkpoint (step-00000002)"
    adapter, config, train = runs.checkpoint_settings(out)
    assert adapter == {"name": "bytes", "settings": {"utf8": False}}
    assert BackboneConfig.from_dict(config) == model.config
    assert train["lr"] == 4e-3 and train["max_steps"] == 2 and train["batch_size"] == 2


def test_a_checkpoint_of_a_model_without_an_adapter_cannot_be_resumed(tmp_path):
    model = tiny_lm(vocab=16, d_model=16, n_layer=1)
    config = TrainConfig(
        max_steps=1, batch_size=2, window=8, checkpoint_every=1, checkpoint_dir=str(tmp_path), progress=False
    )
    Trainer(model, config, SequenceSource(torch.arange(400) % 16, 2, 8)).fit()
    with pytest.raises(Exception, match="records no adapter or model config"):
        runs.checkpoint_settings(tmp_path)


def test_what_a_folder_holds_and_setting_a_previous_run_aside(checkpointed):
    out, _, _ = checkpointed
    (out / runs.MODEL_FILE).write_bytes(b"model")
    runs.write_run(out, RECORD)
    (out / "notes.txt").write_text("mine")
    runs.set_aside_previous_run(out)
    previous = out / runs.PREVIOUS_RUN
    assert sorted(p.name for p in previous.iterdir()) == [
        "latest",
        "model.safetensors",
        "run.json",
        "step-00000002",
        "train.jsonl",
    ]
    assert sorted(p.name for p in out.iterdir()) == [".previous-run", "notes.txt"]  # not a run file: it stays
    assert runs.holds_run(out) is None
    runs.write_run(out, RECORD)
    assert runs.holds_run(out) == "a training run (run.json)"
    runs.remove_previous_run(out)
    assert not previous.exists() and (out / "notes.txt").read_text() == "mine"
    runs.remove_previous_run(out)  # nothing set aside: nothing to do


def test_last_loss_is_this_calls_last_record_else_the_logs_last_valid_line(checkpointed):
    out, _, records = checkpointed
    log = out / runs.LOG_FILE
    assert runs.last_loss(records, log) == records[-1]["loss"]
    assert runs.last_loss([], log) == pytest.approx(records[-1]["loss"])
    log.write_text(log.read_text() + '{"loss": true}\nnot json\n{"step": 3}\n')
    assert runs.last_loss([], log) == pytest.approx(records[-1]["loss"])
    assert runs.last_loss([], out / "missing.jsonl") is None


def test_settings_merge_defaults_then_recorded_then_given_options():
    recorded = TrainConfig(lr=0.004, max_steps=30, batch_size=4, eval_every=10, progress=False).to_dict()
    fresh = runs.train_settings({"steps": 5, "lr": None}, recorded, resuming=False)
    assert fresh == {"checkpoint_every": 100, "eval_every": 100, "max_steps": 5}
    resumed = runs.train_settings({"steps": 40}, recorded, resuming=True)
    assert resumed["max_steps"] == 40 and resumed["lr"] == 0.004 and resumed["eval_every"] == 10


def test_the_train_config_of_a_run_names_options_at_fault(tmp_path):
    config = runs.run_train_config(
        {"max_steps": 5, "checkpoint_every": 2, "eval_every": 3, "keep_checkpoints": "all"},
        tmp_path,
        progress=False,
        has_eval=False,
    )
    assert config.checkpoint_dir == str(tmp_path) and config.log_path == str(tmp_path / "train.jsonl")
    assert config.eval_every == 0 and config.keep_checkpoints is None and config.progress is False
    with pytest.raises(ConfigError, match=r"^--warmup \(10\) must be <= --steps \(5\)"):
        runs.run_train_config({"max_steps": 5, "warmup_steps": 10, "checkpoint_every": 1}, tmp_path, False, True)
    with pytest.raises(ConfigError, match="--checkpoint-every must be >= 1"):
        runs.run_train_config({"checkpoint_every": 0}, tmp_path, False, True)
    with pytest.raises(ConfigError, match="run.json: recorded training settings do not fit"):
        runs.run_train_config({"checkpoint_every": 1, "no_such_field": 1}, tmp_path, False, True)


def test_backbone_config_of_a_new_and_of_a_resumed_run():
    new = runs.backbone_config({"d_model": 32, "n_layer": 1, "d_state": None}, None)
    assert (new.d_model, new.n_layer, new.ssm, new.d_conv) == (32, 1, "mamba1", 4)
    assert runs.backbone_config({"d_model": 32}, new.to_dict()) == new
    with pytest.raises(ConfigError, match=r"--d-model 64 differs from the run being resumed \(d_model = 32\)"):
        runs.backbone_config({"d_model": 64}, new.to_dict())
    with pytest.raises(ConfigError, match="--ssm"):
        runs.backbone_config({"ssm": "mamba9"}, None)


def test_devices_and_a_model_too_large_for_the_machine():
    assert runs.resolve_device("cpu") == torch.device("cpu")
    assert runs.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert runs.resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="--device 'nonsense' is not a device"):
        runs.resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available here"):
            runs.resolve_device("cuda")
    huge = BackboneConfig(d_model=65536, n_layer=16)
    assert runs.memory_bytes(torch.device("cpu")) > 0
    with pytest.raises(ConfigError, match=r"parameters \(--d-model 65536 --n-layer 16\) needs over"):
        runs.check_model_fits(huge, torch.device("cpu"))
    runs.check_model_fits(BackboneConfig(d_model=16, n_layer=1), torch.device("cpu"))
