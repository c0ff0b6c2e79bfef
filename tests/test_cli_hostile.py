"""The ``seqlab`` command line against a hostile user (issue 15): every numeric option of every command and action
refuses out-of-range, non-finite and non-numeric values with one line and exit code 2, and accepts what its range
declares; --config values are checked like flags; the front door turns user mistakes (undecodable text, a path of
the wrong kind, a full disk, no memory) into one line, and still shows the traceback of a real bug.

In process (``seqlab.cli.main``) and parse-only: every command's handler is replaced by a stub, so a value that
slips through is seen (exit 0) without any work running."""

from __future__ import annotations

import argparse
import errno
import math
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab import cli
from seqlab.cli._args import count, number
from seqlab.errors import ConfigError

pytest.importorskip("zarr")

HOSTILE = ["-1", "0", "nan", "inf", "-inf", "1e-300", "1e300", str(10**30), "abc", ""]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    """(command path, parser) of ``parser`` and every action parser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _all_parsers():
    _, parsers = cli.build_parser()
    for name, parser in parsers.items():
        yield from _walk(parser, (name,))


def _numeric(action: argparse.Action) -> bool:
    """An option taking a number: an int/float type, or a type of its command's own that says it wants a number."""
    if not action.option_strings:
        return False
    if cli._type_name(action) in ("int", "float"):
        return True
    if cli._type_name(action) != "scalar":
        return False
    try:
        action.type("abc")
    except argparse.ArgumentTypeError as exc:
        return re.search(r"\b(number|integer)\b", str(exc)) is not None
    except (TypeError, ValueError):
        return True
    return False


def numeric_options() -> list[tuple[tuple[str, ...], str, argparse.Action]]:
    return [
        (path, action.option_strings[-1], action)
        for path, parser in _all_parsers()
        for action in parser._actions
        if _numeric(action)
    ]


_INTERVAL = re.compile(r"([\[(])\s*(-inf|-?[0-9.e+-]+),\s*(inf|-?[0-9.e+-]+)\s*([\])])")


def declared_range(action: argparse.Action):
    """The range the option's type declares in its message for a non-number: (kind, low, high, low_open,
    high_open, zero_too), or None when it declares none (a plain ``int``/``float``)."""
    try:
        action.type("abc")
    except argparse.ArgumentTypeError as exc:
        return _declared(str(exc), cli._type_name(action))
    except (TypeError, ValueError):
        return None
    return None


def _declared(message: str, kind: str):
    found = _INTERVAL.search(message)
    if not found:
        return None
    left, low, high, right = found.groups()
    zero = re.search(r"\b0\b[^\[(]*\bor\b", message[: found.start()]) is not None  # "0 (greedy) or a number in"
    return (kind, float(low), float(high), left == "(", right == ")", zero)


def inside(text: str, declared) -> bool:
    if declared is None:
        return False
    kind, low, high, low_open, high_open, zero = declared
    try:
        value = int(text, 10) if kind == "int" else float(text)
    except ValueError:
        return False
    if not math.isfinite(value):
        return False
    if zero and value == 0:
        return True
    return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)


@pytest.fixture
def stubbed(monkeypatch):
    """Every command's handler records its arguments instead of running."""
    seen = []
    build = cli.build_parser

    def stub(args):
        seen.append(args)
        return 0

    def build_stubbed(commands=None):
        parser, parsers = build(commands)
        for name, p in parsers.items():
            for _, q in _walk(p, (name,)):
                if q.get_default("func") is not None:
                    q.set_defaults(func=stub)
        return parser, parsers

    monkeypatch.setattr(cli, "build_parser", build_stubbed)
    return seen


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_the_probe_covers_every_command():
    """The table is not vacuous: it holds the numeric options of every command that has any."""
    found = {(path[0], flag) for path, flag, _ in numeric_options()}
    for expected in [
        ("score", "--window"),
        ("score", "--num-gpus"),
        ("embed", "--burn-in"),
        ("generate", "--max-new-tokens"),
        ("generate", "--top-p"),
        ("bench", "--d-model"),
        ("bench", "--threads"),
        ("demo", "--workers"),
        ("ingest", "--window"),
        ("train", "--steps"),
        ("memory", "--max-new-tokens"),
    ]:
        assert expected in found, expected
    assert len(found) > 40


def test_every_numeric_option_refuses_hostile_values(stubbed, capsys):
    """Each numeric option of each command and action: a hostile value outside its declared range exits 2 with one
    line naming the option and no traceback (no work runs); a value inside the range is accepted by its type.
    Options of every command are probed; those still failing are listed together."""
    failures = []
    for path, flag, action in numeric_options():
        declared = declared_range(action)
        for value in HOSTILE:
            argv = [*path, f"{flag}={value}"]
            if inside(value, declared):
                try:
                    action.type(value)
                except argparse.ArgumentTypeError as exc:  # fine if its own message declares a range without it
                    narrower = _declared(str(exc), cli._type_name(action))
                    if narrower is None or inside(value, narrower):
                        failures.append(f"{' '.join(path)} {flag} {value!r}: inside the declared range, refused: {exc}")
                continue
            try:
                code, _, err = run(argv, capsys)
            except BaseException as exc:  # noqa: BLE001 - a traceback is the failure being looked for
                failures.append(f"{' '.join(path)} {flag} {value!r}: raised {type(exc).__name__}: {exc}")
                continue
            lines = err.strip().splitlines()
            if (
                code != 2
                or len(lines) != 1
                or "Traceback" in err
                or not any(
                    f"argument {s}" in lines[0] or f"{s}:" in lines[0] or f"{s} " in lines[0]
                    for s in action.option_strings
                )
            ):
                failures.append(f"{' '.join(path)} {flag} {value!r}: exit {code}, stderr {err.strip()[:200]!r}")
    assert not failures, f"{len(failures)} hostile values not refused properly:\n" + "\n".join(failures)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=12))
def test_numeric_types_raise_only_argparse_errors(text):
    """Whatever the text, an option's type accepts it or raises ArgumentTypeError (argparse's one line), never an
    OverflowError or a TypeError that would escape as a traceback."""
    for _, _, action in numeric_options():
        if declared_range(action) is None:
            continue  # a plain int/float: reported by the table above
        try:
            value = action.type(text)
        except argparse.ArgumentTypeError:
            continue
        assert isinstance(value, (int, float)) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------------
# --config values go through the same checks


def _toy(path="run.toml"):
    p = argparse.ArgumentParser()
    p.add_argument("--window", type=count(1, 100))
    p.add_argument("--rate", type=number(0.0, 1.0, low_open=True))
    p.add_argument("--mode", choices=("a", "b"))
    p.add_argument("--name", action="append")
    p.add_argument("--quiet", action="store_true")
    return p


@settings(max_examples=40, deadline=None)
@given(
    st.one_of(
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(max_size=5),
        st.lists(st.integers(0, 200), max_size=3),
        st.none(),
    )
)
def test_config_values_are_checked_like_flags(value):
    """A TOML value for a flag is accepted only when the flag would accept it (type of TOML value, range, choices);
    otherwise a ConfigError names the file, the key and the flag."""
    parser = _toy()
    for key, ok in [
        ("window", isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100),
        (
            "rate",
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= 1,
        ),
        ("mode", value in ("a", "b")),
        ("quiet", isinstance(value, bool)),
        ("name", isinstance(value, str) or isinstance(value, list) and not value),
    ]:
        if ok:
            assert key in cli._config_defaults(parser, {key: value}, "run.toml", "toy")
        else:
            with pytest.raises(ConfigError) as err:
                cli._config_defaults(parser, {key: value}, "run.toml", "toy")
            assert "--config run.toml" in str(err.value) and repr(key) in str(err.value)
            assert f"--{key}" in str(err.value)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[bench]\nlength = -5\n", "'length' of 'seqlab bench' (--length): must be an integer in [1,"),
        ('[bench]\nthreads = "4"\n', "'threads' of 'seqlab bench' (--threads) must be an integer, got str '4'"),
        ("[bench]\nlength = 1.5\n", "(--length) must be an integer, got float 1.5"),
        ("[bench]\nlength = [1, 2]\n", "(--length) takes one value, got a list"),
        ('[bench]\nssm = ["mamba3"]\n', "(--ssm) item 1 must be one of 'mamba1', 'mamba2', got 'mamba3'"),
        ('[bench]\nno-ref = "yes"\n', "(--no-ref) must be true or false"),
        ("[score]\nnum-cpus = nan\n", "(--num-cpus): must be 0 or a number in [0.0001, 1024]"),
        ("[score]\nnum-gpus = 1e-300\n", "(--num-gpus): must be 0 or a number in [0.0001, 1024]"),
        ("[generate]\ntemperature = inf\n", "(--temperature): must be a finite number"),
        ("seed = -1\n[generate]\n", "'seed' of 'seqlab generate' (--seed): must be a seed"),
        ("[bench]\nlength = {a = 1}\n", "(--length) must be an integer, got dict {'a': 1}"),
        ("[bench]\nrepeats = 2\n[bnech]\nlength = 5\n", "unknown table [bnech] (tables are named after commands"),
        ("[bench]\n[bench.fast]\nlength = 5\n", "unknown table [bench.fast] ('seqlab bench' has no actions)"),
    ],
)
def test_bad_config_values_exit_2_naming_file_and_key(tmp_path, capsys, stubbed, toml, message):
    (tmp_path / "run.toml").write_text(toml)
    command = re.search(r"\[(\w+)\]", toml).group(1)
    code, _, err = run(["--config", tmp_path / "run.toml", command], capsys)
    line = one_line(err)
    assert code == 2 and f"--config {tmp_path / 'run.toml'}" in line and message in line, line
    assert not stubbed


def test_good_config_values_become_typed_defaults(tmp_path, capsys, stubbed):
    (tmp_path / "run.toml").write_text(
        '[bench]\nlength = 100\nno-ref = true\nssm = ["mamba2"]\n'
        '[generate]\ntemperature = 0\ntop-p = 1\nprompt = ["a", "b"]\n'
    )
    assert run(["--config", tmp_path / "run.toml", "bench"], capsys)[0] == 0
    args = stubbed[-1]
    assert (args.length, args.no_ref, args.ssm) == (100, True, ["mamba2"])
    assert run(["--config", tmp_path / "run.toml", "generate", "--temperature", "0.5"], capsys)[0] == 0
    args = stubbed[-1]
    assert (args.temperature, args.top_p, args.prompt) == (0.5, 1.0, ["a", "b"])  # the flag wins


def test_undecodable_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run.toml").write_bytes(b"[bench]\nlength = 5 # \xff\xfe\n")
    code, _, err = run(["--config", tmp_path / "run.toml", "bench"], capsys)
    assert code == 2 and "not valid TOML (not UTF-8 text" in one_line(err)


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
