"""The ``seqlab`` command line against a hostile user (issue 15): every numeric option of every command and action
refuses out-of-range, non-finite and non-numeric values with one line and exit code 2, and accepts what its range
declares; --config values are checked like flags (the front door's one-line errors: tests/test_cli_front_door.py).

In process (``seqlab.cli.main``) and parse-only: every command's handler is replaced by a stub, so a value that
slips through is seen (exit 0) without any work running."""

from __future__ import annotations

import argparse
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab import cli
from seqlab.cli._args import count, number
from seqlab.errors import ConfigError
from seqlab.testing import one_line, run_cli, walk_parsers

pytest.importorskip("zarr")

HOSTILE = ["-1", "0", "nan", "inf", "-inf", "1e-300", "1e300", str(10**30), "abc", ""]


def _all_parsers():
    _, parsers = cli.build_parser()
    for name, parser in parsers.items():
        yield from walk_parsers(parser, (name,))


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


run = run_cli


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
        ('[bench]\nssm = ["mamba4"]\n', "(--ssm) item 1 must be one of 'mamba1', 'mamba2', 'mamba3', got 'mamba4'"),
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
