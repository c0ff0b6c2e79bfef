"""The ``seqlab`` front door (issue 15): a user's mistake (undecodable text, a path of the wrong kind, a full disk,
no memory, a prompt file that never ends, a Ray worker that died for good) is one line on stderr with exit code 2,
and a real bug still shows its traceback; the real commands word their refusals in their flags' terms.

In process (``seqlab.cli.main``); the numeric options and --config values against hostile input are in
tests/test_cli_hostile.py."""

from __future__ import annotations

import argparse
import errno
import os

import pytest

from seqlab import cli
from seqlab.errors import ConfigError
from seqlab.testing import one_line, run_cli

pytest.importorskip("zarr")


run = run_cli


# ------------------------------------------------------------------------------------------------------
# the front door: user mistakes are one line, bugs keep their traceback

WHAT = {}


def _boom(args):
    WHAT["raise"]()
    return 0


def register(sub):  # this module doubles as a command module for the 'hostile-boom' command
    sub.add_parser("hostile-boom").set_defaults(func=_boom)


@pytest.fixture
def boom(monkeypatch):
    monkeypatch.setitem(cli.COMMAND_MODULES, "hostile-boom", __name__)

    def go(exc_factory, capsys, *extra):
        WHAT["raise"] = exc_factory
        return run([*extra, "hostile-boom"], capsys)

    return go


def _raise(exc):
    def f():
        raise exc

    return f


def _decode_in(path):
    def f():
        with open(path, encoding="utf-8") as fh:
            fh.read()

    return f


@pytest.mark.parametrize(
    "number, name",
    [
        (errno.ENOSPC, "ENOSPC"),
        (errno.EROFS, "EROFS"),
        (errno.EACCES, "EACCES"),
        (errno.ELOOP, "ELOOP"),
        (errno.ENAMETOOLONG, "ENAMETOOLONG"),
        (errno.EISDIR, "EISDIR"),
        (errno.ENOTDIR, "ENOTDIR"),
        (errno.EDQUOT, "EDQUOT"),
        (errno.EIO, "EIO"),
    ],
)
def test_os_errors_a_user_causes_are_one_line_naming_the_path(boom, capsys, number, name):
    code, _, err = boom(_raise(OSError(number, os.strerror(number), "/data/out.zarr/c/0")), capsys)
    line = one_line(err)
    assert (
        code == 2
        and line.startswith("seqlab hostile-boom: error: /data/out.zarr/c/0: ")
        and os.strerror(number) in line
    ), line


def test_undecodable_text_names_the_file(boom, capsys, tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"ok \xff\xfe")
    code, _, err = boom(_decode_in(str(tmp_path / "notes.txt")), capsys)
    line = one_line(err)
    assert code == 2 and f"{tmp_path / 'notes.txt'}: cannot decode text as utf-8" in line, line


@pytest.mark.parametrize(
    "exc, shown",
    [
        (MemoryError("Unable to allocate 8.00 EiB for an array with shape (2**60,)"), "Unable to allocate 8.00 EiB"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
                "to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"
            ),
            "you tried to allocate 1099511627776 bytes",
        ),
        (MemoryError(), "out of memory; use a smaller"),
    ],
)
def test_out_of_memory_is_one_line_saying_what(boom, capsys, exc, shown):
    code, _, err = boom(_raise(exc), capsys)
    line = one_line(err)
    assert code == 2 and "out of memory" in line and shown in line, line


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug"),
        RuntimeError("shape mismatch in our code"),
        TypeError("bug"),
        OSError(errno.EBADF, "Bad file descriptor"),
        KeyError("k"),
    ],
)
def test_a_real_bug_still_shows_its_traceback(boom, capsys, exc):
    with pytest.raises(type(exc)):
        boom(_raise(exc), capsys)


def test_debug_shows_the_traceback_of_a_user_mistake_too(boom, capsys):
    with pytest.raises(OSError):
        boom(_raise(OSError(errno.ENOSPC, "No space left on device", "x")), capsys, "--debug")


# ------------------------------------------------------------------------------------------------------
# real commands


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    import torch

    from seqlab import BackboneConfig
    from seqlab.checkpoint import save_model
    from seqlab.domains.bytes import ByteAdapter

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_model(path, ByteAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4)))
    return path


def test_prompt_file_of_the_wrong_kind_is_one_line(tmp_path, capsys, byte_model):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "f.txt").write_text("x")
    for path, reason in [
        (tmp_path / "loop", "Too many levels of symbolic links"),
        (tmp_path / ("n" * 5000), "File name too long"),
        (tmp_path, "Is a directory"),
        (tmp_path / "f.txt" / "x", "Not a directory"),
    ] + ([("/proc/self/mem", "Input/output error")] if os.path.exists("/proc/self/mem") else []):
        code, _, err = run(["generate", "--model", byte_model, "--prompt-file", path], capsys)
        line = one_line(err)
        assert code == 2 and reason in line and str(path)[:100] in line, line
    # a folder given as the model: our FileNotFoundError with its own message (no errno) is one line too
    code, _, err = run(["generate", "--model", tmp_path, "--prompt", "x"], capsys)
    assert code == 2 and f"{tmp_path}: no checkpoint here" in one_line(err)


def test_a_prompt_that_is_not_text_is_one_line(capsys, byte_model):
    code, _, err = run(["generate", "--model", byte_model, "--prompt", "ab\udcff", "--max-new-tokens", "2"], capsys)
    line = one_line(err)
    assert code == 2 and "generate --prompt 1: not valid " in line and "'bytes' adapter" in line, line


def test_generate_passes_the_adapters_generation_options(capsys, byte_model, monkeypatch):
    """seqlab generate --prompt asks for the adapter's options (specials suppressed unless --allow-specials)."""
    from seqlab.domains.bytes import ByteAdapter

    asked = []
    original = ByteAdapter.generation_options

    def spy(self, allow_specials=False):
        asked.append(allow_specials)
        return original(self, allow_specials=allow_specials)

    monkeypatch.setattr(ByteAdapter, "generation_options", spy)
    for extra, expected in [([], False), (["--allow-specials"], True)]:
        code, out, err = run(
            [
                "generate",
                "--model",
                byte_model,
                "--prompt",
                "ab",
                "--max-new-tokens",
                "3",
                "--temperature",
                "0",
                *extra,
            ],
            capsys,
        )
        assert code == 0, err
        assert asked[-1] is expected


def test_generate_takes_the_smallest_temperature_and_top_p_its_ranges_declare(capsys, byte_model):
    """The smallest values --temperature and --top-p accept run (1e-300 overflowed the logits: refused now)."""
    for flag in ("--temperature", "--top-p"):
        code, out, err = run(
            ["generate", "--model", byte_model, "--prompt", "ab", "--max-new-tokens", "3", flag, "0.001"], capsys
        )
        assert code == 0 and out, err
        code, _, err = run(["generate", "--model", byte_model, "--prompt", "ab", flag, "1e-300"], capsys)
        assert code == 2 and f"argument {flag}: must be" in one_line(err)


def test_bench_too_big_for_memory_is_refused_up_front(capsys):
    code, out, err = run(
        ["bench", "--d-model", "1024", "--n-layer", "2", "--length", str(1 << 30), "--no-ref", "--ssm", "mamba1"],
        capsys,
    )
    line = one_line(err)
    assert code == 2 and out == ""
    assert "--length 1073741824 need at least" in line and "GiB of memory" in line and "free" in line, line


@pytest.mark.parametrize(
    "argv, words",
    [
        (["score", "--mode", "segments"], "segment_length (--segment-length; segments mode needs it) must be"),
        (
            ["embed", "--mode", "segments", "--segment-length", "100", "--window", "64"],
            "(--segment-length 100) to be a multiple of window (--window 64)",
        ),
    ],
)
def test_job_settings_are_named_in_cli_terms(tmp_path, capsys, argv, words):
    """Refused before any store, model or cluster is touched; the line names the flags."""
    code, _, err = run(
        [argv[0], tmp_path / "in.zarr", tmp_path / "out.zarr", "--model", tmp_path / "m", *argv[1:]], capsys
    )
    assert code == 2 and words in one_line(err)
    assert not (tmp_path / "out.zarr").exists()


def test_an_endless_prompt_file_is_refused_not_read(capsys, byte_model, monkeypatch):
    from seqlab.cli import generate as cli_generate

    monkeypatch.setattr(cli_generate, "MAX_PROMPT_BYTES", 1 << 16)  # the same check, on a smaller read
    code, _, err = run(["generate", "--model", byte_model, "--prompt-file", "/dev/zero"], capsys)
    assert code == 2 and "generate --prompt-file /dev/zero: larger than 65,536 bytes" in one_line(err)


def test_config_values_for_a_commands_own_types_are_checked_by_them():
    """A flag whose type is its command's own (``--keep-checkpoints N|all``, memory ask's ``--temperature``) takes a
    TOML string or number, which that type then checks: docs/cli.md's example ``temperature = 0.7`` holds."""
    _, parsers = cli.build_parser(["train", "memory"])
    ask = next(a for a in parsers["memory"]._actions if isinstance(a, argparse._SubParsersAction)).choices["ask"]
    assert cli._config_defaults(ask, {"temperature": 0.7}, "run.toml", "memory ask")["temperature"] == 0.7
    train = parsers["train"]
    assert "keep_checkpoints" in cli._config_defaults(train, {"keep-checkpoints": "all"}, "run.toml", "train")
    assert "keep_checkpoints" in cli._config_defaults(train, {"keep-checkpoints": 3}, "run.toml", "train")
    for table in ({"keep-checkpoints": -3}, {"keep-checkpoints": True}, {"keep-checkpoints": [3]}):
        with pytest.raises(
            ConfigError,
            match=r"--config run.toml: setting 'keep-checkpoints' of 'seqlab train' "
            r"\(--keep-checkpoints\)",
        ):
            cli._config_defaults(train, table, "run.toml", "train")
    with pytest.raises(ConfigError, match=r"\(--temperature\).*nan"):
        cli._config_defaults(ask, {"temperature": float("nan")}, "run.toml", "memory ask")


def test_a_config_file_named_like_a_command_is_not_the_command(tmp_path, capsys, stubbed, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").write_text("[score]\nwindow = 5\n")
    code, _, err = run(["--config", "bench", "score", "in.zarr", "out.zarr"], capsys)
    assert code == 0, err
    assert stubbed[-1].command == "score" and stubbed[-1].window == 5


def test_an_endless_config_file_is_refused_not_read(capsys):
    code, _, err = run(["--config", "/dev/zero", "bench"], capsys)
    assert code == 2 and "--config /dev/zero: larger than 1,048,576 bytes" in one_line(err)


def test_a_path_with_a_nul_character_is_one_line(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('[generate]\nprompt-file = ["a\\u0000b"]\nmodel = "m.safetensors"\n')
    code, _, err = run(["--config", tmp_path / "run.toml", "generate"], capsys)
    assert code == 2 and "a path holds a NUL character" in one_line(err)


@pytest.mark.parametrize("command", ["score", "embed", "generate"])
def test_a_worker_that_died_for_good_is_one_line_saying_how_to_resume(tmp_path, capsys, monkeypatch, command):
    """After its retries a job fails with Ray's own error (a worker killed again and again, out of memory, its node
    lost): the CLI says so in one line, and that the same command resumes; the library still raises Ray's error."""
    exceptions = pytest.importorskip("ray.exceptions")
    from seqlab.pipelines import ray_jobs

    def died(*args, **kwargs):
        raise exceptions.ActorDiedError()

    monkeypatch.setattr(ray_jobs, command, died)
    code, _, err = run([command, tmp_path / "in.zarr", tmp_path / "out.zarr", "--model", tmp_path / "m"], capsys)
    line = one_line(err)
    assert code == 2 and "a Ray worker of the job died" in line and "ActorDiedError: The actor died" in line
    assert "run the same command again to resume" in line
