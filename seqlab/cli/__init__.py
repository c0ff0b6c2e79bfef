"""The ``seqlab`` command line (``seqlab --help``; docs/cli.md).

One module per command group, imported only when its command runs (or when ``--help`` lists the commands), so
``seqlab ingest`` never imports Ray and ``seqlab --help`` imports neither torch nor Ray:

    store.py     ingest, describe            train.py   train, eval         generate.py  generate (--prompt)
    jobs.py      score, embed, generate over a store (Ray Data)             memory.py    memory ACTION
    bench.py     bench                       demo.py    demo (its inputs and steps: demo_inputs.py, demo_steps.py)
    distill.py   distill                     quantize.py  quantize
    laser.py     laser                       self_reward.py  self-reward    export.py  export gguf
    _args.py     the flags' vocabulary       _config.py --config TOML          _errors.py   one-line errors

Modules here import the library (even ``seqlab.errors``, which loads torch through ``seqlab.kernels``) inside
functions only, so that building the parser stays light (tests/test_cli.py checks it). A command module exposes
``register(subparsers)``, which adds its parser(s) with ``set_defaults(func=handler)``; a handler takes the
parsed arguments, calls public library functions, prints, and returns an exit code.

Settings come from flags or from a TOML file (``--config run.toml``, before or after the command; ``_config.py``).
Bad input gives exit code 2 and one line on stderr naming what is wrong (``_errors.py``); ``--debug`` shows the
traceback instead. seqlab's own warnings print as one line ``seqlab CMD: warning: ...``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from seqlab.cli._config import (  # noqa: F401
    MAX_CONFIG_BYTES,
    _apply_config,
    _config_defaults,
    _load_toml,
    _toml_value,
    _type_name,
    config_path,
)
from seqlab.cli._errors import user_message

#: command -> module with ``register(subparsers)`` (the module may register several commands)
COMMAND_MODULES: dict[str, str] = {
    "ingest": "seqlab.cli.store",
    "describe": "seqlab.cli.store",
    "memory": "seqlab.cli.memory",
    "score": "seqlab.cli.jobs",
    "embed": "seqlab.cli.jobs",
    "generate": "seqlab.cli.generate",
    "train": "seqlab.cli.train",
    "eval": "seqlab.cli.train",
    "distill": "seqlab.cli.distill",
    "quantize": "seqlab.cli.quantize",
    "laser": "seqlab.cli.laser",
    "self-reward": "seqlab.cli.self_reward",
    "export": "seqlab.cli.export",
    "bench": "seqlab.cli.bench",
    "demo": "seqlab.cli.demo",
    "ladder": "seqlab.cli.ladder",
}

EXIT_BAD_INPUT = 2
CONFIG_HELP = "read settings from a TOML file (flags win); before or after the command"


def register_command(name: str, module: str) -> None:
    """Add a subcommand provided by ``module``'s ``register(subparsers)``."""
    COMMAND_MODULES[name] = module


class _Parser(argparse.ArgumentParser):
    """argparse's own complaints (an unknown flag, a bad number, a missing value) become a one-line ConfigError
    with exit code 2, like every other bad input; subcommand parsers inherit the class."""

    def error(self, message: str):
        from seqlab.errors import ConfigError

        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _version() -> str:
    from seqlab import __version__

    return f"seqlab {__version__}"


def _parsers_below(parser: argparse.ArgumentParser):
    """``parser`` and every action parser below it (``seqlab memory ask``)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers_below(sub)


def build_parser(commands: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The ``seqlab`` parser with the given commands (None: all of them) and {command: its parser}."""
    parser = _Parser(prog="seqlab", description="Mamba state space models for long signals.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--config", metavar="TOML", help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parsers: dict[str, argparse.ArgumentParser] = {}
    wanted = COMMAND_MODULES if commands is None else commands
    modules = dict.fromkeys(COMMAND_MODULES[c] for c in wanted if c in COMMAND_MODULES)
    for module in modules:
        before = set(sub.choices)
        importlib.import_module(module).register(sub)
        for name in set(sub.choices) - before:
            parsers[name] = sub.choices[name]
    for command_parser in parsers.values():  # --config after the command too (read by config_path first)
        for p in _parsers_below(command_parser):
            p.add_argument("--config", metavar="TOML", default=argparse.SUPPRESS, help=CONFIG_HELP)
    return parser, parsers


def _command_index(argv: list[str]) -> int | None:
    """Where the command is in ``argv``: the first word that is not a top-level option or the --config value (a
    config file named ``bench`` is not the command)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            i += 2
            continue
        if arg in COMMAND_MODULES:
            return i
        if not arg.startswith("-"):
            return None  # not a command: argparse says so
        i += 1
    return None


def _ours(filename: str) -> bool:
    """Whether a warning was issued from seqlab's own code (its four packages, wherever they are installed)."""
    roots = [
        os.path.dirname(path) + os.sep
        for module in map(sys.modules.get, ("seqlab", "seqlab.domains", "seqlab.pipelines", "seqlab.kernels"))
        if module is not None and (path := getattr(module, "__file__", None))
    ]
    return any(os.path.abspath(filename).startswith(root) for root in roots)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. seqlab's own warnings (a damaged sequence left out, old checkpoints not removed, actors that
    must queue) print as one line ``seqlab CMD: warning: ...``; other libraries' warnings keep Python's format."""
    argv = list(sys.argv[1:] if argv is None else argv)
    at = _command_index(argv)
    prefix = f"seqlab {argv[at]}" if at is not None else "seqlab"
    with warnings.catch_warnings():
        python_format = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if _ours(filename):
                print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)
            else:
                python_format(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return _main(argv)


def _main(argv: list[str]) -> int:
    at = _command_index(argv)
    debug = "--debug" in argv[:at]
    # import only the module of the command asked for (all of them for a bare --help, none for --version)
    wanted: list[str] | None = [argv[at]] if at is not None else [] if "--version" in argv else None
    command = f" {wanted[0]}" if wanted else ""
    try:
        parser, parsers = build_parser(wanted)
        config = config_path(argv)
        if config and wanted:
            _apply_config(parsers[wanted[0]], wanted[0], _load_toml(config), config, argv[at:], COMMAND_MODULES)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("seqlab: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a user's mistake is one line, a bug re-raised with its traceback
        message = None if debug else user_message(exc)
        if message is None:
            raise
        print(f"seqlab{command}: error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_BAD_INPUT


def require(args, *names: str) -> None:
    """Refuse a run whose required settings came neither from flags nor from --config (argparse's own
    ``required=True`` would ignore the TOML defaults)."""
    from seqlab.errors import ConfigError

    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) in (None, "")]
    if missing:
        raise ConfigError(f"missing required setting(s) {', '.join(missing)} (a flag, or a key in --config)")
