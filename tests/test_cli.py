"""The ``seqlab`` command line, end to end in a subprocess: happy paths, TOML settings, and one-line errors with
exit code 2 on bad input (a traceback only with --debug)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("zarr")


def seqlab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "seqlab.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "g.fa"
    path.write_text(">chr1 first\nACGTACGTNN\nacgt\n>chr2\nGGGG\n")
    return path


def test_ingest_then_describe(tmp_path, fasta):
    out = seqlab("ingest", "s.zarr", fasta, "--adapter", "dna", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["chr1\twritten\t14 elements", "chr2\twritten\t4 elements"]
    again = seqlab("ingest", "s.zarr", fasta, "--adapter", "dna", "--quiet", cwd=tmp_path)
    assert "chr1\tskipped" in again.stdout
    desc = seqlab("describe", "s.zarr", cwd=tmp_path)
    assert desc.returncode == 0, desc.stderr
    assert desc.stdout.splitlines()[0].split("\t")[:2] == ["chr1", "14"]
    assert "dna\tcomplete" in desc.stdout

    from seqlab.domains.dna import DNAAdapter
    from seqlab.pipelines import SequenceStore

    assert SequenceStore(tmp_path / "s.zarr", "r").read("chr1").tolist() == DNAAdapter().encode("ACGTACGTNNACGT").tolist()


def test_settings_from_a_toml_file_and_flags_win(tmp_path, fasta):
    (tmp_path / "run.toml").write_text('[ingest]\nadapter = "dna"\nquiet = true\nwhole-file = true\n')
    out = seqlab("--config", "run.toml", "ingest", "s.zarr", fasta, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["g\twritten\t18 elements"]  # one sequence for the whole file
    (tmp_path / "bad.toml").write_text('[ingest]\ncolour = "red"\n')
    bad = seqlab("--config", "bad.toml", "ingest", "s.zarr", fasta, "--adapter", "dna", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown setting 'colour'" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (("ingest", "s.zarr", "missing.fa", "--adapter", "dna", "--quiet"), "missing.fa does not exist"),
    (("ingest", "s.zarr", "g.fa", "--adapter", "nope", "--quiet"), "no adapter named 'nope'"),
    (("ingest", "s.zarr", "g.fa", "--adapter", "dna", "--adapter-settings", "{oops", "--quiet"),
     "--adapter-settings must be a JSON object"),
    (("describe", "absent.zarr"), "absent.zarr"),
    (("ingest", "s.zarr", "g.fa", "--quiet"), "missing required setting(s) --adapter"),
    (("ingest", "s.zarr", "g.fa", "--adapter", "dna", "--window", "x"),
     "argument --window: must be an integer in [1, 1073741824], got 'x'"),
    (("nothing",), "invalid choice: 'nothing'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, fasta, args, message):
    out = seqlab(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("seqlab ", "seqlab: ")) and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = seqlab("--debug", "ingest", "s.zarr", "missing.fa", "--adapter", "dna", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_invalid_dna_letter_is_named_in_the_one_line_error(tmp_path):
    (tmp_path / "bad.fa").write_text(">r1\nACGTXACGT\n")
    out = seqlab("ingest", "s.zarr", "bad.fa", "--adapter", "dna", "--quiet", cwd=tmp_path)
    assert out.returncode == 2 and "record 'r1' (#1 in the file), position 5" in out.stderr, out.stderr


def test_help_lists_commands(tmp_path):
    out = seqlab("--help", cwd=tmp_path)
    assert out.returncode == 0 and "ingest" in out.stdout and "describe" in out.stdout


def test_a_missing_optional_package_names_its_extra(tmp_path, fasta):
    # a sitecustomize that hides zarr, as on an install without the [store] extra
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(
        "import sys\nclass _Hide:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'zarr' or name.startswith('zarr.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'zarr'\", name='zarr')\n"
        "sys.meta_path.insert(0, _Hide())\n")
    import os

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide")}
    out = subprocess.run([sys.executable, "-m", "seqlab.cli", "ingest", "s.zarr", str(fasta), "--adapter", "dna"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "pip install 'seqlab[store]'" in out.stderr, out.stderr


def test_generate_from_prompts_in_process(tmp_path):
    """`seqlab generate --model M --prompt TEXT` continues prompts without a store or Ray; greedy output equals the
    library's own generation with the same model file."""
    import json

    import torch

    from seqlab import BackboneConfig
    from seqlab.checkpoint import save_model
    from seqlab.domains import model_from_checkpoint
    from seqlab.domains.bytes import ByteAdapter

    torch.manual_seed(0)
    save_model(tmp_path / "m.safetensors", ByteAdapter().build_model(BackboneConfig(d_model=32, n_layer=1, d_state=8)))
    model, adapter = model_from_checkpoint(tmp_path / "m.safetensors")
    expected = [adapter.decode(t).decode("utf-8", errors="replace") for t in
                model.generate([adapter.encode("def f"), adapter.encode("abc")], 6, temperature=0).tokens]

    out = seqlab("generate", "--model", "m.safetensors", "--prompt", "def f", "--max-new-tokens", "6",
                 "--temperature", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected[0] + "\n"
    (tmp_path / "p.txt").write_bytes(b"abc")
    out = seqlab("generate", "--model", "m.safetensors", "--prompt", "def f", "--prompt-file", "p.txt",
                 "--max-new-tokens", "6", "--temperature", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == expected

    for args, message in [(("--prompt", "x", "s.zarr", "o.zarr"), "not both"),
                          ((), "give STORE and OUTPUT"),
                          (("--prompt", ""), "prompt 1 is empty"),
                          (("--prompt-file", "missing.txt"), "missing.txt")]:
        bad = seqlab("generate", "--model", "m.safetensors", *args, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
