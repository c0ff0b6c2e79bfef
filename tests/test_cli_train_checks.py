"""``seqlab train`` and ``seqlab eval`` in process: other adapters (DNA, continuous audio) train and evaluate
exactly, every numeric option and --config value is range-checked naming it, a run stopped before its first
checkpoint restarts, old checkpoints are pruned, and an edited, bit-flipped or damaged run or store is one line.
(The end-to-end runs in subprocesses are tests/test_cli_train.py.)"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("zarr")

TINY = "--d-model 32 --n-layer 1 --d-state 8 --batch-size 4 --window 64 --lr 3e-3 --threads 1 --quiet".split()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In this process too: several torch threads on a busy 2-core machine are many times slower, and a
    --threads of a command run in process must not outlive its test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_process(capsys, *args) -> tuple[int, str, str]:
    """``seqlab ARGS`` through the same entry point, in this process (for the long catalogue of refusals)."""
    from seqlab.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def corpus_text() -> str:
    from pydoc_data import topics

    return "".join(topics.topics[k] for k in sorted(topics.topics))


def _write_dna(path):
    import random

    rng = random.Random(0)
    path.write_text("".join(f">r{i}\n" + "".join(rng.choice("ACGTN") for _ in range(700)) + "\n" for i in range(3)))


def _write_audio(path):
    import numpy as np
    import soundfile

    t = np.arange(4000) / 8000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)


@pytest.mark.parametrize(
    "domain, settings, write",
    [
        ("dna", '{"add_bos_eos": true}', _write_dna),  # specials in the targets are not counted
        ("audio", '{"sample_rate": 8000, "mode": "continuous"}', _write_audio),
    ],
    ids=["dna", "audio-continuous"],
)
def test_other_domains_train_and_eval_equals_one_pass(tmp_path, capsys, domain, settings, write):
    import torch

    from seqlab.domains import model_from_checkpoint

    path = tmp_path / ("data.fa" if domain == "dna" else "data.wav")
    write(path)
    code, out, err = in_process(
        capsys,
        "train",
        path,
        "--adapter",
        domain,
        "--adapter-settings",
        settings,
        "--eval-fraction",
        0.2,
        "--out",
        tmp_path / "run",
        "--steps",
        4,
        "--json",
        *TINY,
    )
    assert code == 0, err
    assert math.isfinite(json.loads(out)["held_out"])
    code, out, err = in_process(capsys, "eval", "--model", tmp_path / "run", path, "--window", 50, "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    model, adapter = model_from_checkpoint(tmp_path / "run")
    data = torch.cat(list(adapter.iter_windows(path, 1 << 20)))
    with torch.no_grad():
        expected = adapter.metric(model(data[None, :-1], return_state=False), data[None, 1:])
    assert result["metric"] == pytest.approx(expected, abs=1e-5)
    assert result["metric_name"] == adapter.metric_name and result["uniform_baseline"] == adapter.uniform_baseline()


def test_help_of_train_and_eval(capsys):
    from seqlab.cli import main

    for name, words in (
        ("train", ("--resume", "--store", "--d-model", "--eval-fraction", "--checkpoint-every")),
        ("eval", ("--model", "--store", "--json", "uniform baseline")),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(w in text for w in words), text


# ------------------------------------------------------------------------------------------------------
# every numeric option is range-checked, from a flag and from a --config TOML file

HUGE = "1" + "0" * 30
#: option -> values that are in its range (all others of BAD_NUMBERS must be refused)
NUMBER_OPTIONS = {
    "--steps": (),
    "--batch-size": (),
    "--window": (),
    "--lr": (),
    "--min-lr-ratio": ("0", "1e-300"),
    "--weight-decay": ("0", "1e-300"),
    "--warmup": ("0",),
    "--grad-accum": (),
    "--grad-clip": (),
    "--eval-every": ("0",),
    "--eval-windows": (),
    "--checkpoint-every": (),
    "--seed": ("0",),
    "--threads": (),
    "--d-model": (),
    "--n-layer": (),
    "--d-state": (),
    "--d-conv": (),
    "--expand": (),
    "--headdim": (),
    "--chunk-size": (),
    "--eval-fraction": ("1e-300",),
    "--keep-checkpoints": (),
    "--moe-experts": (),
    "--moe-top-k": (),
    "--moe-d-expert": (),
    "--moe-capacity-factor": ("1e-300",),
    "--moe-jitter": ("0", "1e-300"),
    "--moe-balance-weight": ("0", "1e-300"),
    "--moe-z-weight": ("0", "1e-300"),
    "--moe-every": (),
}
BAD_NUMBERS = ("-5", "0", "nan", "inf", "-inf", "1e-300", HUGE, "abc", "", "2.5e400")


@pytest.mark.parametrize("option", sorted(NUMBER_OPTIONS))
def test_every_numeric_train_option_refuses_bad_values_naming_it(tmp_path, capsys, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("some text " * 50)
    for value in BAD_NUMBERS:
        if value in NUMBER_OPTIONS[option]:
            continue
        code, _, err = in_process(capsys, "train", "c.txt", "--adapter", "bytes", "--out", "o", f"{option}={value}")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and f"argument {option}: must be" in lines[0], (option, value, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["--window", "--threads"])
def test_eval_numeric_options_refuse_bad_values(tmp_path, capsys, option):
    for value in BAD_NUMBERS:
        code, _, err = in_process(
            capsys, "eval", "--model", tmp_path / "m.safetensors", tmp_path / "c.txt", f"{option}={value}"
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"argument {option}: must be" in err, err


TOML_BAD = [
    ("steps", "-5", "--steps"),
    ("steps", "1e3", "--steps"),
    ("steps", "nan", "--steps"),
    ("lr", "nan", "--lr"),
    ("lr", "inf", "--lr"),
    ("lr", "1e-300", "--lr"),
    ("lr", '"abc"', "--lr"),
    ("lr", "true", "--lr"),
    ("batch_size", "0", "--batch-size"),
    ("window", HUGE[:19], "--window"),
    ("min-lr-ratio", "2.0", "--min-lr-ratio"),
    ("weight-decay", "-1", "--weight-decay"),
    ("grad-clip", "0", "--grad-clip"),
    ("seed", "-1", "--seed"),
    ("threads", "0", "--threads"),
    ("threads", "100000", "--threads"),
    ("d-model", "0", "--d-model"),
    ("moe-experts", "0", "--moe-experts"),
    ("moe-jitter", "1.0", "--moe-jitter"),
    ("moe-capacity-factor", "nan", "--moe-capacity-factor"),
    ("n-layer", "[1, 2]", "--n-layer"),
    ("keep-checkpoints", "0", "--keep-checkpoints"),
    ("keep-checkpoints", '"some"', "--keep-checkpoints"),
    ("eval-fraction", "1.0", "--eval-fraction"),
    ("checkpoint-every", "0", "--checkpoint-every"),
    ("bf16", '"yes"', "--bf16"),
    ("resume", '"no"', "--resume"),
    ("eval", "5", "--eval"),
    ("device", "[1]", "--device"),
    ("quiet", "1", "--quiet"),
]


@pytest.mark.parametrize("key, value, flag", TOML_BAD)
def test_bad_values_in_a_config_file_exit_2_naming_the_setting(tmp_path, capsys, monkeypatch, key, value, flag):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("some text " * 50)
    (tmp_path / "run.toml").write_text(f'[train]\nadapter = "bytes"\nout = "o"\n{key} = {value}\n')
    code, _, err = in_process(capsys, "--config", "run.toml", "train", "c.txt")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0] or f"'{key}'" in lines[0], err  # the flag, or the key of the file
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------------
# resume before the first checkpoint, keep-last-N checkpoints, run.json checksum

SMALL = [
    "--d-model",
    "16",
    "--n-layer",
    "1",
    "--d-state",
    "4",
    "--batch-size",
    "2",
    "--window",
    "32",
    "--threads",
    "1",
    "--quiet",
]


def test_resume_after_ctrl_c_before_the_first_checkpoint_restarts_the_recorded_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text(corpus_text()[:5000])
    from seqlab.train import Trainer

    real_step = Trainer._train_step

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    code, _, err = in_process(
        capsys,
        "train",
        "c.txt",
        "--adapter",
        "bytes",
        "--out",
        "r",
        "--steps",
        4,
        "--checkpoint-every",
        2,
        "--lr",
        "0.004",
        *SMALL,
    )
    assert code == 130 and (tmp_path / "r" / "run.json").is_file() and not (tmp_path / "r" / "latest").exists()
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    code, out, err = in_process(capsys, "train", "--out", "r", "--resume", "--json", "--threads", "1")
    assert code == 0, err
    assert "no checkpoint in r yet (the run stopped before its first one): starting it again from step 0" in err
    summary = json.loads(out)
    assert summary["steps"] == 4 and summary["steps_this_run"] == 4
    recorded = json.loads((tmp_path / "r" / "run.json").read_text())
    assert recorded["train"]["lr"] == 0.004 and recorded["model"]["d_model"] == 16  # the recorded settings
    assert recorded["data"]["files"] == [str(tmp_path / "c.txt")]
    # the same run straight through gives the same model
    code, out, err = in_process(
        capsys,
        "train",
        "c.txt",
        "--adapter",
        "bytes",
        "--out",
        "s",
        "--steps",
        4,
        "--checkpoint-every",
        2,
        "--lr",
        "0.004",
        *SMALL,
    )
    assert code == 0, err
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "r" / "model.safetensors").read_bytes()


def test_keep_checkpoints_prunes_old_step_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text(corpus_text()[:5000])
    code, _, err = in_process(
        capsys, "train", "c.txt", "--adapter", "bytes", "--out", "r", "--steps", 8, "--checkpoint-every", 1, *SMALL
    )
    assert code == 0, err
    steps = sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-00000006", "step-00000007", "step-00000008"]  # the default keeps 3
    code, _, err = in_process(
        capsys,
        "train",
        "--out",
        "r",
        "--resume",
        "--steps",
        10,
        "--keep-checkpoints",
        "all",
        "--threads",
        "1",
        "--quiet",
    )
    assert code == 0, err
    steps = sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-00000006", "step-00000007", "step-00000008", "step-00000009", "step-00000010"]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["train"]["keep_checkpoints"] is None
    code, _, err = in_process(
        capsys, "train", "--out", "r", "--resume", "--steps", 11, "--keep-checkpoints", 1, "--threads", "1", "--quiet"
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(("step-", ".step"))) == [
        "step-00000011"
    ]


def test_an_edited_run_json_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text(corpus_text()[:5000])
    code, _, err = in_process(
        capsys,
        "train",
        "c.txt",
        "--adapter",
        "bytes",
        "--out",
        "r",
        "--steps",
        2,
        "--checkpoint-every",
        2,
        "--lr",
        "0.004",
        *SMALL,
    )
    assert code == 0, err
    path = tmp_path / "r" / "run.json"
    good = path.read_bytes()
    for old, new in ((b'"lr": 0.004', b'"lr": 0.005'), (b'"d_model": 16', b'"d_model": 17'), (b"{", b"[")):
        assert good.count(old) >= 1
        path.write_bytes(good.replace(old, new, 1))
        code, _, err = in_process(capsys, "train", "--out", "r", "--resume", "--steps", 3, "--threads", "1")
        assert code == 2 and "run.json" in err and len(err.strip().splitlines()) == 1, err
    path.write_bytes(good[:-20])
    code, _, err = in_process(capsys, "train", "--out", "r", "--resume", "--steps", 3, "--threads", "1")
    assert code == 2 and "run.json: not valid JSON" in err, err


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_run")
    (root / "c.txt").write_text(corpus_text()[:5000])
    from seqlab.cli import main

    assert (
        main(
            [
                "train",
                str(root / "c.txt"),
                "--adapter",
                "bytes",
                "--out",
                str(root / "r"),
                "--steps",
                "2",
                "--checkpoint-every",
                "2",
                *SMALL,
            ]
        )
        == 0
    )
    return root


RUN_FILES = [
    "model.safetensors",
    "step-00000002/model.safetensors",
    "step-00000002/trainer.safetensors",
    "step-00000002/state-0.safetensors",
    "latest",
    "run.json",
]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(RUN_FILES), fraction=st.floats(0, 1), bit=st.integers(0, 7))
def test_a_bit_flip_in_any_file_of_a_run_is_one_line_naming_it(small_run, capsys, name, fraction, bit):
    path = small_run / "r" / name
    good = path.read_bytes()
    bad = bytearray(good)
    bad[int(fraction * (len(good) - 1))] ^= 1 << bit
    try:
        path.write_bytes(bytes(bad))
        if name in ("model.safetensors", "latest"):
            target = small_run / "r" / ("model.safetensors" if name == "model.safetensors" else "")
            code, _, err = in_process(capsys, "eval", "--model", target, small_run / "c.txt", "--quiet")
        else:
            code, _, err = in_process(
                capsys, "train", "--out", small_run / "r", "--resume", "--steps", 3, "--threads", 1, "--quiet"
            )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and path.name in lines[0] and "Traceback" not in err, err
    finally:
        path.write_bytes(good)


def test_a_damaged_sequence_in_the_store_is_one_warning_line_and_training_uses_the_rest(tmp_path, capsys):
    text = corpus_text()
    (tmp_path / "a.txt").write_text(text[:20000])
    (tmp_path / "b.txt").write_text(text[20000:40000])
    store = tmp_path / "s.zarr"
    code, _, err = in_process(
        capsys, "ingest", store, tmp_path / "a.txt", tmp_path / "b.txt", "--adapter", "bytes", "--quiet"
    )
    assert code == 0, err
    (store / "b" / "zarr.json").write_bytes(b"")
    code, _, err = in_process(capsys, "train", "--store", store, "--out", tmp_path / "run", "--steps", 2, *TINY)
    assert code == 0, err
    warning = [line for line in err.splitlines() if "damaged" in line]
    assert len(warning) == 1 and warning[0].startswith("seqlab train: warning: sequence store "), err
    assert "left out of the list: b (" in warning[0], err
    assert "warnings.warn" not in err and "DamagedSequenceWarning" not in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["sequences"] == ["a"]
