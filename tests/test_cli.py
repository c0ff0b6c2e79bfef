"""The ``seqlab`` command line, end to end in a subprocess: happy paths, TOML settings, and one-line errors with
exit code 2 on bad input (a traceback only with --debug)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("zarr")


def seqlab(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "seqlab.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


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

    stored = SequenceStore(tmp_path / "s.zarr", "r").read("chr1").tolist()
    assert stored == DNAAdapter().encode("ACGTACGTNNACGT").tolist()


def test_settings_from_a_toml_file_and_flags_win(tmp_path, fasta):
    (tmp_path / "run.toml").write_text('[ingest]\nadapter = "dna"\nquiet = true\nwhole-file = true\n')
    out = seqlab("--config", "run.toml", "ingest", "s.zarr", fasta, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["g\twritten\t18 elements"]  # one sequence for the whole file
    (tmp_path / "bad.toml").write_text('[ingest]\ncolour = "red"\n')
    bad = seqlab("--config", "bad.toml", "ingest", "s.zarr", fasta, "--adapter", "dna", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown setting 'colour'" in bad.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("ingest", "s.zarr", "missing.fa", "--adapter", "dna", "--quiet"), "missing.fa does not exist"),
        (("ingest", "s.zarr", "g.fa", "--adapter", "nope", "--quiet"), "no adapter named 'nope'"),
        (
            ("ingest", "s.zarr", "g.fa", "--adapter", "dna", "--adapter-settings", "{oops", "--quiet"),
            "--adapter-settings must be a JSON object",
        ),
        (("describe", "absent.zarr"), "absent.zarr"),
        (("ingest", "s.zarr", "g.fa", "--quiet"), "missing required setting(s) --adapter"),
        (
            ("ingest", "s.zarr", "g.fa", "--adapter", "dna", "--window", "x"),
            "argument --window: must be an integer in [1, 1073741824], got 'x'",
        ),
        (("nothing",), "invalid choice: 'nothing'"),
    ],
)
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
        "sys.meta_path.insert(0, _Hide())\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide")}
    out = subprocess.run(
        [sys.executable, "-m", "seqlab.cli", "ingest", "s.zarr", str(fasta), "--adapter", "dna"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
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
    expected = [
        adapter.decode(t).decode("utf-8", errors="replace")
        for t in model.generate([adapter.encode("def f"), adapter.encode("abc")], 6, temperature=0).tokens
    ]

    out = seqlab(
        "generate",
        "--model",
        "m.safetensors",
        "--prompt",
        "def f",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected[0] + "\n"
    (tmp_path / "p.txt").write_bytes(b"abc")
    out = seqlab(
        "generate",
        "--model",
        "m.safetensors",
        "--prompt",
        "def f",
        "--prompt-file",
        "p.txt",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == expected

    for args, message in [
        (("--prompt", "x", "s.zarr", "o.zarr"), "not both"),
        ((), "give STORE and OUT "),
        (("--prompt", ""), "prompt 1 is empty"),
        (("--prompt-file", "missing.txt"), "missing.txt"),
    ]:
        bad = seqlab("generate", "--model", "m.safetensors", *args, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


# ------------------------------------------------------------------------------------------------------
# one vocabulary, the front door's own flags


def _walk(parser, path):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _every_option():
    """(command path, action) of every argument of every command and action of the real parser."""
    from seqlab.cli import build_parser

    parser, parsers = build_parser()
    yield from (((), a) for a in parser._actions)
    for name, sub in parsers.items():
        for path, p in _walk(sub, (name,)):
            yield from ((path, a) for a in p._actions)


def test_one_vocabulary_across_every_command():
    """Walks every parser: each dest is a declared idea of seqlab.cli._args.VOCABULARY; each idea has one option
    spelling in every command, and each option string one idea; a dest keeps its kind (switch or value) and its
    choices everywhere; numeric options use the range-checked types of seqlab.cli._args; the old spellings are
    gone."""
    import argparse

    from seqlab.cli import _args

    spellings, owners, kinds, choices, problems = {}, {}, {}, {}, []
    commands = set()
    for path, action in _every_option():
        commands.add(path[:1])
        where = " ".join(path) or "seqlab"
        if action.dest not in _args.VOCABULARY:
            problems.append(f"{where}: dest {action.dest!r} ({action.option_strings}) is not in VOCABULARY")
        if action.option_strings:
            spellings.setdefault(action.dest, set()).add(tuple(action.option_strings))
            for option in action.option_strings:
                owners.setdefault(option, set()).add(action.dest)
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        kinds.setdefault(action.dest, set()).add("switch" if action.nargs == 0 else "value")
        if action.choices is not None:
            choices.setdefault(action.dest, set()).add(tuple(action.choices))
        if action.option_strings and action.nargs != 0 and action.type not in (None, str):
            if getattr(action.type, "__module__", None) != _args.__name__:
                problems.append(
                    f"{where} {action.option_strings[-1]}: type {action.type!r} is not one of "
                    "seqlab.cli._args's range-checked types"
                )
    problems += [f"dest {d!r} is spelled {sorted(s)}" for d, s in spellings.items() if len(s) > 1]
    problems += [f"option {o} means {sorted(d)}" for o, d in owners.items() if len(d) > 1]
    problems += [f"dest {d!r} is both a switch and a value" for d, k in kinds.items() if len(k) > 1]
    problems += [f"dest {d!r} has choices {sorted(c)}" for d, c in choices.items() if len(c) > 1]
    for old in ("--name", "--domain", "--batch", "--names"):
        if old in owners:
            problems.append(f"the old spelling {old} is still there")
    assert not problems, "\n".join(problems)
    # the probe is not vacuous: every command was walked, and the shared ideas are where they belong
    assert len(commands) == 17  # the front door + 16 commands
    assert spellings["sequences"] == {("--sequences",)} and spellings["model"] == {("--model",)}
    assert spellings["adapter"] == {("--adapter",)} and spellings["batch_size"] == {("--batch-size",)}
    assert spellings["config"] == {("--config",)}


def test_the_vocabulary_test_catches_a_flag_spelled_two_ways(monkeypatch):
    """The walk above fails on a command that spells an idea another way (a stub command with --name)."""
    from seqlab import cli

    def register(sub):
        p = sub.add_parser("vocab-probe")
        p.add_argument("--name", action="append", dest="sequences")

    import types

    module = types.ModuleType("vocab_probe")
    module.register = register
    monkeypatch.setitem(sys.modules, "vocab_probe", module)
    monkeypatch.setitem(cli.COMMAND_MODULES, "vocab-probe", "vocab_probe")
    with pytest.raises(AssertionError, match=r"dest 'sequences' is spelled .*--name"):
        test_one_vocabulary_across_every_command()


def test_version_and_python_dash_m_seqlab(tmp_path):
    from seqlab import __version__
    from seqlab.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = subprocess.run(
        [sys.executable, "-m", "seqlab", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "usage: seqlab" in out.stdout and "ingest" in out.stdout, out.stderr
    version = subprocess.run(
        [sys.executable, "-m", "seqlab", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0 and version.stdout.strip() == f"seqlab {__version__}", version


def test_config_after_the_command(tmp_path, fasta, capsys, monkeypatch):
    """`seqlab ingest --config run.toml ...` reads the file like `seqlab --config run.toml ingest ...`; given twice
    it is refused."""
    from seqlab.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text('[ingest]\nadapter = "dna"\nquiet = true\nwhole-file = true\n')
    assert main(["ingest", "s.zarr", str(fasta), "--config", "run.toml"]) == 0
    assert capsys.readouterr().out.splitlines() == ["g\twritten\t18 elements"]
    assert main(["ingest", "t.zarr", str(fasta), "--config=run.toml", "--sequence-names", "genome"]) == 0
    assert capsys.readouterr().out.splitlines() == ["genome\twritten\t18 elements"]
    assert main(["--config", "run.toml", "describe", "s.zarr", "--config", "run.toml"]) == 2
    assert "--config is given 2 times" in capsys.readouterr().err
    # seqlab train --config run.toml: its [train] table is read (and checked) like before the command
    (tmp_path / "train.toml").write_text('[train]\nadapter = "bytes"\nout = "run"\nsteps = 0\n')
    assert main(["train", "notes.txt", "--config", "train.toml"]) == 2
    err = capsys.readouterr().err
    assert "--config train.toml: setting 'steps' of 'seqlab train' (--steps): must be an integer in [1," in err, err
    assert not (tmp_path / "run").exists()


def test_in_process_generate_never_imports_ray(tmp_path):
    """`seqlab generate --prompt` runs without Ray: not even imported (a subprocess, so nothing else loaded it)."""
    import torch

    from seqlab import BackboneConfig
    from seqlab.checkpoint import save_model
    from seqlab.domains.bytes import ByteAdapter

    torch.manual_seed(0)
    save_model(tmp_path / "m.safetensors", ByteAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4)))
    script = (
        "import sys\nfrom seqlab.cli import main\n"
        "code = main(['generate', '--model', 'm.safetensors', '--prompt', 'ab', '--max-new-tokens', '3'])\n"
        "print('RAY' if 'ray' in sys.modules else 'NO-RAY', code)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "NO-RAY 0", out.stdout


def test_a_quiet_ray_job_prints_nothing_but_its_result(tmp_path):
    """`seqlab score ... --quiet` in a fresh process (Ray started by the job): stdout holds the result only (a line
    per sequence and the job's JSON), stderr nothing at all: no progress bar, no Ray log lines."""
    import json

    pytest.importorskip("ray")
    import torch

    from seqlab import BackboneConfig
    from seqlab.checkpoint import save_model
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines import ingest

    torch.manual_seed(0)
    save_model(tmp_path / "m.safetensors", ByteAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4)))
    (tmp_path / "a.txt").write_text("quiet please " * 40)
    ingest(tmp_path / "s.zarr", tmp_path / "a.txt", ByteAdapter(), progress=False)
    out = seqlab(
        "score",
        "s.zarr",
        "scores.zarr",
        "--model",
        "m.safetensors",
        "--window",
        "128",
        "--concurrency",
        "1",
        "--num-cpus",
        "0.5",
        "--quiet",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("a\tdone\t{"), out.stdout
    assert json.loads(lines[1])["job"] == "score"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"], ["memory", "ask", "--help"]])
def test_help_and_version_import_neither_torch_nor_ray(tmp_path, argv):
    """The front door and every command's parser are light: heavy imports happen in the handlers."""
    script = (
        "import sys\nfrom seqlab.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'ray', 'zarr', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]", out.stdout[-500:]
