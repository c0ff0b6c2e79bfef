"""MoE models (``--moe-experts N``) through the command line: ``seqlab train`` builds and logs them (router fields in
train.jsonl, collapse warnings on stderr, total and active parameters), their model file round-trips through
``model_from_checkpoint``, ``seqlab eval`` streams them exactly, ``seqlab generate --prompt`` continues with them,
``seqlab describe`` summarises them, a resumed run keeps its MoE settings, and bad MoE values are one line naming
the flag. In process, on a tiny byte model (a few seconds in all)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from seqlab.testing import one_line, run_cli

pytest.importorskip("zarr")

#: d_model 16, 2 layers, 4 experts of width 32: about 20k parameters
TINY = "--d-model 16 --n-layer 2 --d-state 4 --batch-size 2 --window 32 --lr 3e-3 --threads 1".split()
EXPERTS, TOP_K, D_EXPERT, D_MODEL, N_LAYER = 4, 2, 32, 16, 2


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus_text() -> str:
    from pydoc_data import topics

    return "".join(topics.topics[k] for k in sorted(topics.topics))


def main(*args) -> tuple[int, str, str]:
    """``seqlab ARGS`` in this process, outside a test (a module fixture has no capsys)."""
    from seqlab.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A 6-step MoE run from a text file: --moe-experts on the command line, top-k and d_expert from --config."""
    root = tmp_path_factory.mktemp("cli_moe")
    text = corpus_text()
    (root / "corpus.txt").write_text(text[:8000])
    (root / "held.txt").write_text(text[8000:9000])
    (root / "moe.toml").write_text(f"[train]\nmoe-top-k = {TOP_K}\nmoe_d_expert = {D_EXPERT}\n")
    torch.set_num_threads(1)
    code, out, err = main(
        "--config",
        root / "moe.toml",
        "train",
        root / "corpus.txt",
        "--adapter",
        "bytes",
        "--eval",
        root / "held.txt",
        "--out",
        root / "run",
        "--steps",
        6,
        "--eval-every",
        3,
        "--checkpoint-every",
        3,
        "--moe-experts",
        EXPERTS,
        *TINY,
    )
    assert code == 0, err
    return root, out, err


def expected_counts(model) -> dict:
    """Total and active parameters counted here from the weights: each MoE layer's experts beyond top_k are idle
    for a token (an expert: a gated MLP, 3 * d_model * d_expert weights)."""
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * D_MODEL * D_EXPERT
    return {"total": total, "active": total - N_LAYER * (EXPERTS - TOP_K) * per_expert}


def test_train_builds_an_moe_model_and_logs_its_router(moe_run):
    from seqlab.domains import model_from_checkpoint
    from seqlab.ffn import MoEFeedForward

    root, out, err = moe_run
    run = root / "run"
    recorded = json.loads((run / "run.json").read_text())["model"]
    assert recorded["ffn"] == "moe" and recorded["moe_experts"] == EXPERTS
    assert recorded["moe_top_k"] == TOP_K and recorded["moe_d_expert"] == D_EXPERT  # from the TOML file
    model, _ = model_from_checkpoint(run / "model.safetensors")
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == N_LAYER and all(m.gate_up.shape == (EXPERTS, 2 * D_EXPERT, D_MODEL) for m in layers)

    # every step of the log holds the router's fields; the expert shares of each layer sum to 1
    log = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    for r in log:
        assert r["moe_balance_loss"] > 0 and r["moe_z_loss"] > 0 and 0 <= r["moe_dropped_fraction"] < 1
        assert sorted(r["moe_expert_fraction"]) == ["0", "1"]
        for shares in r["moe_expert_fraction"].values():
            assert len(shares) == EXPERTS and sum(shares) == pytest.approx(1.0)
        assert r["moe_max_expert_fraction"] == pytest.approx(
            max(max(s) for s in r["moe_expert_fraction"].values())  # one micro-batch: the max of its shares
        )

    # total and active parameters: on stderr when training starts and in the summary, counted right
    counts = expected_counts(model)
    assert counts["active"] < counts["total"]
    words = f"{counts['total']:,} total, {counts['active']:,} active per token"
    start = [line for line in err.splitlines() if line.startswith("seqlab train: training LanguageModel")]
    assert len(start) == 1 and words in start[0] and f"{EXPERTS} experts, top-{TOP_K}" in start[0], err
    assert f"parameters  {words}" in out.splitlines()


def test_the_model_file_round_trips_streams_exactly_and_generates(moe_run, capsys):
    from seqlab.domains import model_from_checkpoint

    root, _, _ = moe_run
    path = root / "run" / "model.safetensors"
    model, adapter = model_from_checkpoint(path)
    folder_model, _ = model_from_checkpoint(root / "run")  # the run folder: its latest checkpoint, the same step
    ids = adapter.encode((root / "held.txt").read_bytes())
    with torch.no_grad():
        logits = model(ids[None, :-1], return_state=False).logits
        assert torch.equal(logits, folder_model(ids[None, :-1], return_state=False).logits)
    assert not model.training  # eval mode: no capacity, token-local routing

    # seqlab eval streams windows of 50 with the state carried: equal to one pass over the file
    one_pass = adapter.metric(logits, ids[None, 1:])
    code, out, err = run_cli(["eval", "--model", path, root / "held.txt", "--window", 50, "--json", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out)["metric"] == pytest.approx(one_pass, abs=1e-5)

    # seqlab generate --prompt: the library's greedy continuation
    code, out, err = run_cli(["generate", "--model", path, "--prompt", "The ", "--max-new-tokens", 16], capsys)
    assert code == 0, err
    expected = model.generate(adapter.encode("The "), 16, **adapter.generation_options())
    text = adapter.decode(expected.tokens[0]).decode("utf-8", errors="replace")
    assert len(expected.tokens[0]) > 0 and out == text + "\n"


def test_describe_shows_total_and_active_parameters(moe_run, capsys, tmp_path):
    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.domains import model_from_checkpoint
    from seqlab.domains.bytes import ByteAdapter

    root, _, _ = moe_run
    path = root / "run" / "model.safetensors"
    model, _ = model_from_checkpoint(path)
    counts = expected_counts(model)
    code, out, err = run_cli(["describe", path], capsys)
    assert code == 0, err
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["model"] == f"{path} (step 6)"
    assert lines["class"] == "LanguageModel, adapter bytes, vocabulary 256"
    assert lines["config"] == f"mamba1, d_model {D_MODEL}, n_layer {N_LAYER}, d_state 4, expand 2, ffn moe"
    assert lines["moe"].startswith(f"{EXPERTS} experts, top-{TOP_K}, d_expert {D_EXPERT}, every layer; while ")
    assert "capacity factor 1.25, jitter 0, balance weight 0.01, z weight 0.001" in lines["moe"]
    assert lines["parameters"] == f"{counts['total']:,} total, {counts['active']:,} active per token"
    assert lines["fingerprint"] == model.fingerprint
    # the run folder reads its latest checkpoint
    code, out, err = run_cli(["describe", root / "run"], capsys)
    assert code == 0 and "step-00000006" in out and lines["parameters"] in out, err

    # a dense model: every parameter active, said compactly
    dense = ByteAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4))
    save_model(tmp_path / "dense.safetensors", dense)
    code, out, err = run_cli(["describe", tmp_path / "dense.safetensors"], capsys)
    total = sum(p.numel() for p in dense.parameters())
    assert code == 0 and f"parameters   {total:,} (dense: all active)" in out.splitlines(), out
    assert "ffn none" in out and "moe " not in out

    # not a model, a damaged model, --sequences with a model: one line naming the file
    (tmp_path / "notes.txt").write_text("just some text, not a model " * 20)
    code, _, err = run_cli(["describe", tmp_path / "notes.txt"], capsys)
    assert code == 2 and f"{tmp_path / 'notes.txt'}: not a seqlab model file" in one_line(err)
    bad = bytearray(path.read_bytes())
    bad[len(bad) // 2] ^= 1
    (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
    code, _, err = run_cli(["describe", tmp_path / "bad.safetensors"], capsys)
    assert code == 2 and "bad.safetensors" in one_line(err) and "checksum mismatch" in err
    code, _, err = run_cli(["describe", path, "--sequences", "a"], capsys)
    assert code == 2 and "--sequences goes with a store" in one_line(err)


def test_a_resumed_run_keeps_its_moe_settings(moe_run, tmp_path, capsys):
    import shutil

    root, _, _ = moe_run
    shutil.copytree(root / "run", tmp_path / "run")
    for flags, words in (
        (("--moe-experts", 8), "--moe-experts 8 differs from the run being resumed (moe_experts = 4)"),
        (("--moe-top-k", 1), "--moe-top-k 1 differs from the run being resumed (moe_top_k = 2)"),
        (("--moe-jitter", 0.1), "--moe-jitter 0.1 differs from the run being resumed (moe_jitter = 0.0)"),
    ):
        code, _, err = run_cli(["train", "--out", tmp_path / "run", "--resume", "--steps", 8, *flags], capsys)
        assert code == 2 and words in one_line(err), err
    # no MoE flag, or one equal to the run's (a default included): it continues with its own settings
    code, out, err = run_cli(
        ["train", "--out", tmp_path / "run", "--resume", "--steps", 7, "--moe-capacity-factor", 1.25, "--json"],
        capsys,
    )
    assert code == 0, err
    assert json.loads(out)["steps_this_run"] == 1
    assert "from step 6" in err and "active per token" in err
    log = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 7 and "moe_expert_fraction" in log[-1]


def test_a_dense_run_refuses_moe_flags_on_resume(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(corpus_text()[:3000])
    tiny = ["--d-model", 16, "--n-layer", 1, "--d-state", 4, "--batch-size", 2, "--window", 32, "--quiet"]
    code, out, err = run_cli(
        ["train", tmp_path / "c.txt", "--adapter", "bytes", "--out", tmp_path / "r", "--steps", 1, *tiny], capsys
    )
    assert code == 0, err
    assert "parameters  " in out and "(dense: all active)" in out
    code, _, err = run_cli(["train", "--out", tmp_path / "r", "--resume", "--steps", 2, "--moe-experts", 4], capsys)
    assert code == 2 and "--moe-experts 4: the run being resumed has no MoE layers" in one_line(err)


def test_a_collapsed_router_is_one_warning_line_and_in_the_log(tmp_path, capsys):
    # one byte repeated: every token's hidden state is the same after the first few, so one expert takes them all
    (tmp_path / "same.txt").write_text("a" * 3000)
    code, _, err = run_cli(
        [
            "train",
            tmp_path / "same.txt",
            "--adapter",
            "bytes",
            "--out",
            tmp_path / "r",
            "--steps",
            3,
            "--moe-experts",
            4,
            "--moe-d-expert",
            16,
            *TINY,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / "r" / "train.jsonl").read_text().splitlines()]
    assert all(r["moe_max_expert_fraction"] > 0.9 and r["warnings"] for r in log), log
    warned = [line for line in err.splitlines() if "MoE router collapse" in line]
    # one line when a layer collapses, not again every step it stays collapsed
    expected, before = [], set()
    for r in log:
        now = {line.split(":")[0] for line in r["warnings"]}
        expected += [
            f"seqlab train: warning: step {r['step']}: {line}"
            for line in r["warnings"]
            if line.split(":")[0] not in before
        ]
        before = now
    assert warned == expected and len(warned) >= 1, err
    assert "RuntimeWarning" not in err and "warnings.warn" not in err


BAD_FLAGS = [
    (("--moe-experts", 0), "argument --moe-experts: must be an integer in [1, 4096], got '0'"),
    (("--moe-experts", 2.5), "argument --moe-experts: must be an integer"),
    (("--moe-experts", 4, "--moe-top-k", 0), "argument --moe-top-k: must be an integer"),
    (("--moe-experts", 4, "--moe-capacity-factor", 0), "argument --moe-capacity-factor: must be a finite number"),
    (("--moe-experts", 4, "--moe-capacity-factor", "nan"), "argument --moe-capacity-factor: must be a finite"),
    (("--moe-experts", 4, "--moe-jitter", 1), "argument --moe-jitter: must be a finite number in [0, 1)"),
    (("--moe-experts", 4, "--moe-balance-weight", -1), "argument --moe-balance-weight: must be a finite number"),
    (("--moe-experts", 4, "--moe-z-weight", "inf"), "argument --moe-z-weight: must be a finite number"),
    (("--moe-experts", 4, "--moe-every", 0), "argument --moe-every: must be an integer"),
    (("--moe-experts", 4, "--moe-d-expert", 1 << 20), "argument --moe-d-expert: must be an integer"),
    # a model too large for this machine is refused before anything is allocated, naming the MoE flags
    (
        ("--d-model", 1024, "--moe-experts", 4096, "--moe-d-expert", 65536),
        "--moe-experts 4096 --moe-d-expert 65536) needs over",
    ),
    # checked against the other settings
    (("--moe-experts", 4, "--moe-top-k", 5), "--moe-top-k is 5, more than moe_experts (4)"),
    (("--moe-experts", 4, "--moe-every", 3), "--moe-every is 3, more than n_layer (2)"),
    (
        (
            "--moe-top-k",
            2,
        ),
        "--moe-top-k sets the MoE layers: give --moe-experts N too",
    ),
    (
        (
            "--moe-jitter",
            0.1,
        ),
        "--moe-jitter sets the MoE layers: give --moe-experts N too",
    ),
]


@pytest.mark.parametrize("flags, words", BAD_FLAGS, ids=[" ".join(map(str, f)) for f, _ in BAD_FLAGS])
def test_bad_moe_values_are_one_line_naming_the_flag(tmp_path, capsys, flags, words):
    (tmp_path / "c.txt").write_text("some text " * 50)
    code, _, err = run_cli(
        ["train", tmp_path / "c.txt", "--adapter", "bytes", "--out", tmp_path / "o", *TINY, *flags], capsys
    )
    assert code == 2 and words in one_line(err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("moe-experts", "0", "(--moe-experts): must be an integer in [1, 4096]"),
        ("moe_top_k", '"two"', "(--moe-top-k) must be an integer"),
        ("moe-jitter", "1.5", "(--moe-jitter): must be a finite number in [0, 1)"),
        ("moe-every", "true", "(--moe-every) must be an integer"),
    ],
)
def test_bad_moe_values_in_a_config_file_name_the_setting(tmp_path, capsys, key, value, words):
    (tmp_path / "c.txt").write_text("some text " * 50)
    (tmp_path / "run.toml").write_text(f'[train]\nadapter = "bytes"\nout = "{tmp_path / "o"}"\n{key} = {value}\n')
    code, _, err = run_cli(["--config", tmp_path / "run.toml", "train", tmp_path / "c.txt"], capsys)
    assert code == 2 and words in one_line(err), err
    assert not (tmp_path / "o").exists()


def test_help_lists_the_moe_flags(capsys):
    from seqlab.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    for name in ("experts", "top-k", "d-expert", "capacity-factor", "jitter", "balance-weight", "z-weight", "every"):
        assert f"--moe-{name}" in text, name
