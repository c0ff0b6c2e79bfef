"""seqlab.pipelines.train_data and seqlab.pipelines.training: a run's data from a sequence store, and whole
training runs (files or store, resume, restart, overwrite, refusals that leave the run untouched) and the
evaluation of a trained model, on real files and stores written by the tests, with tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from seqlab import runs
from seqlab.errors import ConfigError, InputError

pytest.importorskip("zarr")

from seqlab.domains import model_from_checkpoint  # noqa: E402
from seqlab.domains.bytes import ByteAdapter  # noqa: E402
from seqlab.pipelines.store import ingest  # noqa: E402
from seqlab.pipelines.train_data import reader_pieces, store_data, store_inputs  # noqa: E402
from seqlab.pipelines.training import data_spec, evaluate_model, train_run  # noqa: E402

TEXT = "".join(f"line {i}: the state is carried from window to window, exactly.\n" for i in range(120))
TINY = {
    "d_model": 16,
    "n_layer": 1,
    "d_state": 4,
    "batch_size": 2,
    "window": 32,
    "lr": 4e-3,
    "steps": 3,
    "checkpoint_every": 3,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    (root / "corpus.txt").write_text(TEXT[:5000])
    (root / "held.txt").write_text(TEXT[5000:6500])
    ingest(root / "s.zarr", [root / "corpus.txt", root / "held.txt"], ByteAdapter())
    return root


def one_pass(model_path, data: bytes) -> float:
    model, adapter = model_from_checkpoint(model_path)
    ids = adapter.encode(data)
    with torch.no_grad():
        return adapter.metric(model(ids[None, :-1], return_state=False), ids[None, 1:])


def test_store_data_trains_on_the_files_windows_and_holds_out_sequences(files):
    spec = {"store": str(files / "s.zarr"), "sequences": None, "eval_sequences": ["held"], "domain": None}
    data, model = store_data(spec, batch_size=2, window=32)
    assert model is None and data.adapter == ByteAdapter()
    assert data.spec == {
        "store": str(files / "s.zarr"),
        "sequences": ["corpus"],
        "eval_sequences": ["held"],
        "domain": "bytes",
    }
    assert data.train_elements == 5000
    ids = torch.tensor(list((files / "corpus.txt").read_bytes()))
    inputs, targets = data.train.window(2)
    assert torch.equal(inputs[1], ids[2500 + 64 : 2500 + 96]) and torch.equal(targets[0], ids[65:97])
    (held,) = data.held_out
    assert held.name == "held" and held.length == 1500
    assert bytes(torch.cat(list(held.pieces())).tolist()) == (files / "held.txt").read_bytes()
    reader = data.train.readers[0]
    assert [p.shape[0] for p in reader_pieces(reader, 2000)] == [2000, 2000, 1000]


def _dna_model(root):
    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.domains.dna import DNAAdapter

    model = DNAAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4))
    return save_model(root / "dna.safetensors", model)


def test_store_data_refusals_name_the_setting(files):
    where = str(files / "s.zarr")
    with pytest.raises(ConfigError, match=r"--eval-sequences \['corpus'\] are also training sequences"):
        store_data({"store": where, "sequences": ["corpus"], "eval_sequences": ["corpus"]}, 2, 32)
    with pytest.raises(ConfigError, match="--adapter 'dna', but sequence store .* encoded by the 'bytes' adapter"):
        store_data({"store": where, "domain": "dna"}, 2, 32)
    with pytest.raises(InputError, match="too few for one window.*use fewer --batch-size streams"):
        store_data({"store": where, "sequences": ["held"]}, 2, 4096)
    with pytest.raises(InputError, match="no complete sequence to train on besides --eval-sequences"):
        store_data({"store": where, "eval_sequences": ["corpus", "held"]}, 2, 32)
    ingest(files / "empty.zarr", [], ByteAdapter())
    with pytest.raises(InputError, match="holds no complete sequence"):
        store_inputs(files / "empty.zarr", None, 100)
    model, _ = model_from_checkpoint(_dna_model(files))
    with pytest.raises(InputError, match="was written by adapter {'name': 'bytes'"):
        store_inputs(where, ["held"], 100, model=model)


def test_data_spec_of_files_store_or_the_recorded_run(files):
    spec = data_spec(files=["a.txt"], adapter="bytes", eval_fraction=0.1)
    assert spec["files"][0].endswith("/a.txt") and spec["eval"] == [] and spec["eval_fraction"] == 0.1
    recorded = {"files": ["/x/a.txt"], "domain": "dna", "adapter_settings": {"add_bos_eos": True}}
    assert data_spec(files=["b.txt"], recorded=recorded)["adapter_settings"] == {"add_bos_eos": True}
    assert data_spec(recorded=recorded) == recorded
    for kwargs, message in (
        ({"files": ["a"], "store": "s"}, "either as FILE... or as --store"),
        ({"store": "s", "eval_fraction": 0.1}, "with --store, held-out data comes from"),
        ({"store": "s", "adapter_settings": {"utf8": True}}, "leave out --adapter-settings"),
        ({"files": ["a"], "adapter": "bytes", "sequences": ["x"]}, "go with --store"),
        ({"files": ["a"]}, r"missing required setting\(s\) --adapter"),
        ({}, "no training data"),
    ):
        with pytest.raises(ConfigError, match=message):
            data_spec(**kwargs)


def test_a_run_from_files_then_resumed_and_evaluated(files, tmp_path):
    out = tmp_path / "run"
    summary = train_run(
        out,
        files=[files / "corpus.txt"],
        adapter="bytes",
        eval_files=[files / "held.txt"],
        options={**TINY, "eval_every": 2},
        device="cpu",
        progress=False,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "latest",
        "model.safetensors",
        "run.json",
        "step-00000003",
        "train.jsonl",
    ]
    log = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert summary["steps"] == summary["steps_this_run"] == 3 and summary["tokens"] == 3 * 2 * 32
    assert summary["train_loss"] == log[-1]["loss"] and summary["loss_unit"] == "bits"
    assert summary["held_out"] == pytest.approx(
        one_pass(out / "model.safetensors", (files / "held.txt").read_bytes()), abs=1e-5
    )
    assert summary["held_out_targets"] == 1499 and summary["uniform_baseline"] == 8.0
    record = runs.read_run(out)
    assert record["summary"] == json.loads(json.dumps(summary)) and record["train_elements"] == 5000
    assert record["data"]["files"] == [str(files / "corpus.txt")] and record["train"]["max_steps"] == 3

    with pytest.raises(InputError, match="already holds a checkpoint \\(step-00000003\\): pass --resume"):
        train_run(out, files=[files / "corpus.txt"], adapter="bytes", options=TINY)
    with pytest.raises(ConfigError, match=r"--d-model 64 differs from the run being resumed"):
        train_run(out, resume=True, options={"d_model": 64})
    with pytest.raises(ConfigError, match="the training data now holds 1500 elements"):
        train_run(out, resume=True, files=[files / "held.txt"], adapter="bytes", options={"steps": 4})
    resumed = train_run(out, resume=True, options={"steps": 5}, progress=False)  # data and settings recorded
    assert resumed["steps"] == 5 and resumed["steps_this_run"] == 2
    assert [json.loads(line)["step"] for line in (out / "train.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]

    result = evaluate_model(str(out), files=[str(files / "held.txt")], window=100)
    assert result["model"] == str(out) and result["adapter"] == {"name": "bytes", "settings": {"utf8": False}}
    assert result["metric"] == pytest.approx(resumed["held_out"], abs=1e-5) and result["targets"] == 1499
    stored = evaluate_model(out / "model.safetensors", store=files / "s.zarr", sequences=["held"], window=64)
    assert stored["inputs"][0]["name"] == "held" and stored["metric"] == pytest.approx(result["metric"], abs=1e-5)
    (tmp_path / "one.txt").write_text("x")
    for kwargs, error, message in (
        ({"files": [str(tmp_path / "one.txt")]}, InputError, "one.txt: too short to measure"),
        ({"files": [str(tmp_path / "none.txt")]}, InputError, "none.txt: no such file"),
        ({}, ConfigError, "give the held-out data as FILE... or as --store"),
        ({"files": ["a"], "sequences": ["b"]}, ConfigError, "--sequences goes with --store"),
    ):
        with pytest.raises(error, match=message):
            evaluate_model(out / "model.safetensors", **kwargs)
    with pytest.raises(InputError, match="nothing.safetensors: no such model file"):
        evaluate_model(tmp_path / "nothing.safetensors", files=["a"])


def test_a_store_run_ends_on_the_same_loss_as_the_same_run_from_the_file(files, tmp_path):
    from_store = train_run(
        tmp_path / "s", store=files / "s.zarr", eval_sequences=["held"], options=TINY, progress=False
    )
    from_file = train_run(tmp_path / "f", files=[files / "corpus.txt"], adapter="bytes", options=TINY, progress=False)
    assert from_store["train_loss"] == from_file["train_loss"] and "held_out" not in from_file
    assert runs.read_run(tmp_path / "s")["data"]["sequences"] == ["corpus"]
    assert from_store["held_out_inputs"][0]["name"] == "held"


def test_a_resume_before_the_first_checkpoint_restarts_the_recorded_run_and_overwrite_keeps_the_old_one(
    files, tmp_path, monkeypatch
):
    from seqlab.train import Trainer

    real_step = Trainer._train_step

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "r", files=[files / "corpus.txt"], adapter="bytes", options=TINY, progress=False)
    assert (tmp_path / "r" / "run.json").is_file() and not (tmp_path / "r" / "latest").exists()
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    notices = []
    summary = train_run(tmp_path / "r", resume=True, progress=False, notify=notices.append)
    assert summary["steps_this_run"] == 3
    assert notices == [
        f"no checkpoint in {tmp_path / 'r'} yet (the run stopped before its first one): starting it "
        f"again from step 0 with the data and settings in {tmp_path / 'r' / 'run.json'}"
    ]
    straight = train_run(tmp_path / "s", files=[files / "corpus.txt"], adapter="bytes", options=TINY, progress=False)
    assert straight["train_loss"] == summary["train_loss"]
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "r" / "model.safetensors").read_bytes()

    # a new run in a fresh folder with resume=True says so
    train_run(
        tmp_path / "n",
        resume=True,
        files=[files / "held.txt"],
        adapter="bytes",
        progress=False,
        options={**TINY, "steps": 1, "checkpoint_every": 1},
        notify=notices.append,
    )
    assert notices[-1] == f"no checkpoint in {tmp_path / 'n'} yet: starting a new run"
    # overwrite: a start that fails on its data leaves the old run as it was; one that succeeds replaces it
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="missing.txt: no such file"):
        train_run(tmp_path / "r", overwrite=True, files=[files / "missing.txt"], adapter="bytes", options=TINY)
    assert {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigError, match="give one of them"):
        train_run(tmp_path / "r", overwrite=True, resume=True)
    done = train_run(
        tmp_path / "r",
        overwrite=True,
        files=[files / "held.txt"],
        adapter="bytes",
        progress=False,
        options={**TINY, "steps": 1, "checkpoint_every": 1},
    )
    assert done["steps"] == 1 and not (tmp_path / "r" / runs.PREVIOUS_RUN).exists()
    assert not (tmp_path / "r" / "step-00000003").exists()
