"""The ``seqlab`` command line.

Each subcommand lives in the room that owns its work and is registered here by name; the module is imported
only when its command runs (or when ``--help`` lists the commands), so ``seqlab ingest`` never imports Ray.
A command module exposes ``register(subparsers)``, which adds its parser(s) with ``set_defaults(func=handler)``;
a handler takes the parsed arguments and returns an exit code.

Settings come from flags or from a TOML file (``--config run.toml``): keys of its top level and of the table
named after the command (``[ingest]``) become the defaults of that command's flags (dashes or underscores),
a command with actions reads its action's table too (``[memory.ask]`` for ``seqlab memory ask``), and flags on
the command line win. Bad input gives exit code 2 and one line on stderr naming what is wrong;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from seqlab.errors import ConfigError, SeqlabError

#: command -> module with ``register(subparsers)`` (the module may register several commands)
COMMAND_MODULES: dict[str, str] = {
    "ingest": "seqlab.pipelines.cli",
    "describe": "seqlab.pipelines.cli",
    "memory": "seqlab.domains.cli_memory",
    "score": "seqlab.pipelines.cli_jobs",
    "embed": "seqlab.pipelines.cli_jobs",
    "generate": "seqlab.pipelines.cli_jobs",
    "train": "seqlab.cli_train",
    "eval": "seqlab.cli_train",
    "bench": "seqlab.cli_bench",
    "demo": "seqlab.demo",
}

EXIT_BAD_INPUT = 2

#: optional top-level package -> the seqlab extra that installs it
EXTRAS = {"zarr": "store", "ray": "ray", "soundfile": "audio", "torchaudio": "audio", "Bio": "dna",
          "PIL": "video", "triton": "triton", "transformers": "hf", "matplotlib": "demo"}


def register_command(name: str, module: str) -> None:
    """Add a subcommand provided by ``module``'s ``register(subparsers)``."""
    COMMAND_MODULES[name] = module


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SeqlabError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SeqlabError(f"--config {path}: not valid TOML ({exc})") from None


def _config_defaults(parser: argparse.ArgumentParser, table: dict, path: str, command: str) -> dict:
    """Defaults for ``parser`` from a TOML table (unknown keys are refused, naming the file)."""
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "func")}
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            continue  # another command's table
        dest = key.replace("-", "_")
        if dest not in known:
            raise SeqlabError(f"--config {path}: unknown setting {key!r} for 'seqlab {command}' "
                              f"(known: {', '.join(sorted(known))})")
        out[dest] = value
    return out


class _Parser(argparse.ArgumentParser):
    """argparse's own complaints (an unknown flag, a bad number, a missing value) become a one-line ConfigError
    with exit code 2, like every other bad input; subcommand parsers inherit the class."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def build_parser(commands: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="seqlab", description="Mamba state space models for long signals.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--config", metavar="TOML", help="read settings from a TOML file (flags win)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parsers: dict[str, argparse.ArgumentParser] = {}
    modules = dict.fromkeys(COMMAND_MODULES[c] for c in (commands or COMMAND_MODULES) if c in COMMAND_MODULES)
    for module in modules:
        before = set(sub.choices)
        importlib.import_module(module).register(sub)
        for name in set(sub.choices) - before:
            parsers[name] = sub.choices[name]
    return parser, parsers


def _config_path(argv: list[str]) -> str | None:
    """The --config value (before the command), read first so that its settings become the flags' defaults."""
    for i, arg in enumerate(argv):
        if arg in COMMAND_MODULES:
            return None
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _action(parser: argparse.ArgumentParser, argv: list[str], command: str):
    """(name, parser) of the action chosen after ``command`` (``seqlab memory observe``), or (None, None)."""
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            rest = argv[argv.index(command) + 1:]
            for arg in rest:
                if arg in act.choices:
                    return arg, act.choices[arg]
    return None, None


def _apply_config(parser: argparse.ArgumentParser, command: str, table: dict, path: str, argv: list[str]) -> None:
    """TOML settings become flag defaults: top-level keys and ``[command]`` for the command, and for a command
    with actions (``seqlab memory observe``) also the ``[command.action]`` table for the action's flags."""
    own = table.get(command, {})
    if not isinstance(own, dict):
        raise SeqlabError(f"--config {path}: {command!r} must be a table ([{command}]), got {own!r}")
    parser.set_defaults(**_config_defaults(parser, {**table, **own}, path, command))
    name, action_parser = _action(parser, argv, command)
    if action_parser is not None and isinstance(own.get(name), dict):
        action_parser.set_defaults(**_config_defaults(action_parser, own[name], path, f"{command} {name}"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # import only the module of the command asked for (all of them for a bare --help)
    wanted = [a for a in argv if a in COMMAND_MODULES][:1] or None
    try:
        parser, parsers = build_parser(wanted)
        config = _config_path(argv)
        if config and wanted:
            _apply_config(parsers[wanted[0]], wanted[0], _load_toml(config), config, argv)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except (SeqlabError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        if debug:
            raise
        command = f" {wanted[0]}" if wanted else ""
        message = " ".join(str(exc).split())  # one line
        print(f"seqlab{command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if debug or top not in EXTRAS:
            raise
        command = f" {wanted[0]}" if wanted else ""
        print(f"seqlab{command}: error: this needs the optional package {top!r}: "
              f"pip install 'seqlab[{EXTRAS[top]}]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("seqlab: interrupted", file=sys.stderr)
        return 130


def require(args, *names: str) -> None:
    """Refuse a run whose required settings came neither from flags nor from --config (argparse's own
    ``required=True`` would ignore the TOML defaults)."""
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) in (None, "")]
    if missing:
        raise ConfigError(f"missing required setting(s) {', '.join(missing)} (a flag, or a key in --config)")


if __name__ == "__main__":  # python -m seqlab.cli
    sys.exit(main())
