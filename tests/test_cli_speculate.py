"""``seqlab train --adapter subword`` and ``seqlab generate --draft DRAFT --speculate K`` in this process: a tiny
byte model and a tiny subword drafter trained for a few steps on real text (from files and from a byte store), the
drafted output equal to plain greedy output, the stats line, and the refusals (one line, exit code 2)."""

from __future__ import annotations

import json

import pytest

from seqlab.testing import one_line, run_cli

pytest.importorskip("tokenizers")

TINY = "--d-model 16 --n-layer 1 --d-state 8 --batch-size 2 --window 32 --steps 3 --eval-every 0 --threads 1 --quiet"


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus_text() -> str:
    from pydoc_data import topics

    return "".join(topics.topics[k] for k in sorted(topics.topics))[:6000]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A byte model, a subword drafter (vocabulary 300) and a DNA model, each trained for 3 steps."""
    import torch

    from seqlab import cli

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("speculate")
    text = root / "corpus.txt"
    text.write_text(corpus_text())
    fasta = root / "seq.fa"
    fasta.write_text(">s\n" + "ACGT" * 200 + "\n")
    for out, extra in (
        ("byte", ["--adapter", "bytes"]),
        ("sub", ["--adapter", "subword", "--subword-vocab", "300"]),
    ):
        assert cli.main(["train", str(text), *extra, "--out", str(root / out), *TINY.split()]) == 0
    assert cli.main(["train", str(fasta), "--adapter", "dna", "--out", str(root / "dna"), *TINY.split()]) == 0
    return root


def _generate(capsys, work, *extra):
    return run_cli(
        ["generate", "--model", work / "byte", "--prompt", "The ", "--prompt", "x", "--max-new-tokens", "24", *extra],
        capsys,
    )


def test_subword_run_records_its_tokenizer(work):
    from seqlab.domains import model_from_checkpoint
    from seqlab.domains.subword import SubwordAdapter

    model, adapter = model_from_checkpoint(work / "sub" / "model.safetensors")
    assert isinstance(adapter, SubwordAdapter) and adapter.vocab_size == model.vocab_size == 300
    data = corpus_text().encode()
    assert adapter.decode(adapter.encode(data)) == data
    run = json.loads((work / "sub" / "run.json").read_text())
    assert run["adapter"]["name"] == "subword" and run["data"]["adapter_settings"] == {"vocab_size": 300}


@pytest.mark.parametrize("draft", ["sub", "byte", "maxgram"])
@pytest.mark.parametrize("k", [1, 3])
def test_generate_with_a_draft_prints_plain_greedy_output(capsys, work, draft, k):
    code, plain, err = _generate(capsys, work)
    assert code == 0 and not err
    target = "maxgram" if draft == "maxgram" else work / draft
    code, out, err = _generate(capsys, work, "--draft", target, "--speculate", k)
    assert code == 0, err
    assert out == plain
    line = one_line(err)
    assert line.startswith("seqlab generate: speculative: ") and "bytes per target forward" in line, line


def test_quiet_drops_the_stats_line_and_k_defaults_to_4(capsys, work):
    code, plain, _ = _generate(capsys, work)
    code, out, err = _generate(capsys, work, "--draft", work / "sub" / "model.safetensors", "--quiet")
    assert code == 0 and out == plain and err == ""


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--draft", "dna"], ["'dna' model (vocabulary", "cannot draft for a 'bytes' model (vocabulary 256)"]),
        (["--draft", "nowhere"], ["no such model file or run folder"]),
        (["--draft", "maxgram", "--speculate", "0"], ["--speculate", "must be an integer in [1, 1024], got '0'"]),
        (["--draft", "maxgram", "--speculate", "-2"], ["--speculate", "got '-2'"]),
        (["--speculate", "3"], ["--speculate K goes with --draft"]),
    ],
)
def test_bad_drafts_are_one_line(capsys, work, extra, words):
    extra = [str(work / e) if e in ("dna", "nowhere") else e for e in extra]
    code, out, err = _generate(capsys, work, *extra)
    assert code == 2 and out == ""
    line = one_line(err)
    for word in words:
        assert word in line, line


def test_a_byte_model_cannot_be_drafted_by_a_subword_model_of_another_target(capsys, work):
    """A subword model drafts only for a byte model: not for itself through the plain path."""
    code, out, err = run_cli(
        ["generate", "--model", work / "dna", "--prompt", "ACGT", "--draft", work / "sub", "--max-new-tokens", "4"],
        capsys,
    )
    assert code == 2 and "cannot draft for a 'dna' model" in one_line(err)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--adapter", "bytes", "--subword-vocab", "300"], ["--subword-vocab goes with --adapter subword"]),
        (["--adapter", "subword", "--subword-vocab", "255"], ["--subword-vocab", "[256, 65536]", "'255'"]),
        (["--adapter", "subword", "--subword-vocab", "1e3"], ["--subword-vocab", "'1e3'"]),
    ],
)
def test_bad_subword_vocab_is_one_line(capsys, work, tmp_path, extra, words):
    code, out, err = run_cli(["train", work / "corpus.txt", *extra, "--out", tmp_path / "r", *TINY.split()], capsys)
    assert code == 2
    line = one_line(err)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "r").exists()


def test_subword_vocab_from_toml_is_range_checked(capsys, work, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[train]\nadapter = "subword"\nsubword-vocab = 70000\n')
    code, _, err = run_cli(
        ["train", "--config", config, work / "corpus.txt", "--out", tmp_path / "r", *TINY.split()], capsys
    )
    assert code == 2 and "70000" in one_line(err)


def test_train_a_subword_drafter_on_a_byte_store(capsys, work, tmp_path):
    pytest.importorskip("zarr")
    store = tmp_path / "store.zarr"
    code, _, err = run_cli(["ingest", store, work / "corpus.txt", "--adapter", "bytes", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run_cli(
        ["train", "--store", store, "--adapter", "subword", "--subword-vocab", "280", "--out", tmp_path / "sub"]
        + TINY.split(),
        capsys,
    )
    assert code == 0, err
    from seqlab.domains import model_from_checkpoint

    model, adapter = model_from_checkpoint(tmp_path / "sub")
    assert adapter.name == "subword" and model.vocab_size == 280
    # a resume learns the same tokenizer again (deterministic) and continues
    code, out, err = run_cli(["train", "--out", tmp_path / "sub", "--resume", "--steps", "5", "--quiet"], capsys)
    assert code == 0 and out.startswith("steps       5 (2 in this run"), err
    code, plain, _ = _generate(capsys, work)
    code, out, err = _generate(capsys, work, "--draft", tmp_path / "sub", "--speculate", "2")
    assert code == 0 and out == plain, err
    # a store's own adapter takes no settings
    code, _, err = run_cli(
        ["train", "--store", store, "--adapter-settings", "{}", "--out", tmp_path / "x", *TINY.split()], capsys
    )
    assert code == 2
