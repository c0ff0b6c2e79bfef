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
import errno
import importlib
import os
import sys
import warnings
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
#: the largest --config file read
MAX_CONFIG_BYTES = 1 << 20

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
            text = fh.read(MAX_CONFIG_BYTES + 1)  # not /dev/zero until memory runs out
        if len(text) > MAX_CONFIG_BYTES:
            raise SeqlabError(f"--config {path}: larger than {MAX_CONFIG_BYTES:,} bytes: not a settings file")
        return tomllib.loads(text.decode("utf-8"))
    except FileNotFoundError:
        raise SeqlabError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SeqlabError(f"--config {path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text
        raise SeqlabError(f"--config {path}: not valid TOML (not UTF-8 text: byte {exc.start})") from None


def _type_name(action: argparse.Action) -> str:
    """What a TOML value for ``action`` must be: "bool", "int", "float", "str", or "scalar" for a type of the
    command's own (a string or a number, which the type then checks, e.g. ``--keep-checkpoints 3|all``)."""
    if action.nargs == 0:  # store_true / store_false / store_const
        return "bool"
    kind = action.type
    name = getattr(kind, "__name__", "")
    if kind is int or name == "count":
        return "int"
    if kind is float or name == "number":
        return "float"
    if kind is None or kind is str:
        return "str"
    return "scalar"


_TOML_KIND = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
              "scalar": "a string or a number"}
_TOML_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "scalar": (str, int, float)}


def _toml_value(action: argparse.Action, value, where: str):
    """One TOML value for ``action``, checked like a command-line value: its TOML type must match the flag's kind,
    then it goes through the flag's ``type`` (range checks) and ``choices``. Returns the converted value."""
    kind = _type_name(action)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be {_TOML_KIND[kind]}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, _TOML_TYPES[kind]):
        raise ConfigError(f"{where} must be {_TOML_KIND[kind]}, got {type(value).__name__} {value!r}")
    if action.type is not None and callable(action.type):
        try:
            value = action.type(value if isinstance(value, str) else repr(value) if isinstance(value, float)
                                else str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"invalid value {value!r}"
            raise ConfigError(f"{where}: {reason}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, action.choices))}, got {value!r}")
    return value


def _config_defaults(parser: argparse.ArgumentParser, table: dict, path: str, command: str) -> dict:
    """Defaults for ``parser`` from a TOML table (unknown keys are refused, naming the file). Each value is checked
    as its flag would check it on the command line (``type``, ``choices``): --config cannot bypass a range check."""
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "func")}
    out = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if isinstance(value, dict) and dest not in known:
            continue  # another command's or an action's table (checked by _apply_config)
        if dest not in known:
            raise SeqlabError(f"--config {path}: unknown setting {key!r} for 'seqlab {command}' "
                              f"(known: {', '.join(sorted(known))})")
        action = known[dest]
        if isinstance(action, argparse._SubParsersAction):
            raise ConfigError(f"--config {path}: setting {key!r} of 'seqlab {command}' names an action: give it "
                              f"on the command line ({', '.join(action.choices)})")
        flag = action.option_strings[-1] if action.option_strings else action.dest.upper()
        where = f"--config {path}: setting {key!r} of 'seqlab {command}' ({flag})"
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1 or \
            isinstance(action, argparse._AppendAction)
        if many:
            values = value if isinstance(value, list) else [value]
            if action.nargs == "+" and not values:
                raise ConfigError(f"{where} needs at least one value, got an empty list")
            out[dest] = [_toml_value(action, v, f"{where} item {i + 1}") for i, v in enumerate(values)]
        elif isinstance(value, list):
            raise ConfigError(f"{where} takes one value, got a list {value!r}")
        else:
            out[dest] = _toml_value(action, value, where)
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
    # a table nothing reads is a typo, not a setting to drop without a word
    for key, value in table.items():
        if isinstance(value, dict) and key not in COMMAND_MODULES:
            raise ConfigError(f"--config {path}: unknown table [{key}] (tables are named after commands: "
                              f"{', '.join(sorted(COMMAND_MODULES))})")
    actions = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    for key, value in own.items():
        if isinstance(value, dict) and key not in actions and key.replace("-", "_") not in \
                {a.dest for a in parser._actions}:
            raise ConfigError(f"--config {path}: unknown table [{command}.{key}]" + (
                f" (actions: {', '.join(actions)})" if actions else f" ('seqlab {command}' has no actions)"))
    parser.set_defaults(**_config_defaults(parser, {**table, **own}, path, command))
    name, action_parser = _action(parser, argv, command)
    if action_parser is not None and isinstance(own.get(name), dict):
        action_parser.set_defaults(**_config_defaults(action_parser, own[name], path, f"{command} {name}"))


#: OSError kinds a user or the machine causes (a path of the wrong kind, no permission, a full or read-only disk, a
#: device that fails to read ...): one line naming the path, not a traceback. Others (EBADF, EINVAL, a broken
#: pipe ...) point at our code: their traceback shows.
USER_OS_ERRORS = frozenset(getattr(errno, name) for name in (
    "ENOENT", "EACCES", "EPERM", "EISDIR", "ENOTDIR", "ENOSPC", "EDQUOT", "EROFS", "ELOOP", "ENAMETOOLONG",
    "EEXIST", "ENOTEMPTY", "EFBIG", "EMLINK", "EXDEV", "ETXTBSY", "EBUSY", "EIO", "ENXIO", "ENODEV", "ESTALE")
    if hasattr(errno, name))
#: raised by our own code with a message and no errno (``FileNotFoundError("x: no checkpoint here")``)
USER_OS_CLASSES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

#: what torch says when an allocation fails (CPU: RuntimeError from DefaultCPUAllocator; CUDA: OutOfMemoryError,
#: a RuntimeError subclass)
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Cannot allocate memory")


def _os_message(exc: OSError) -> str:
    """``PATH: what went wrong`` (both paths of a rename or link)."""
    if exc.errno is None:  # raised by our code with its own message
        return str(exc)
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason += " (free space, then run the command again)"
    where = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if p is not None]
    if not where:  # a read or write on an open file: the file our code had in hand
        where = [p for p in [_path_in_traceback(exc)] if p]
    return f"{' -> '.join(where)}: {reason}" if where else f"{reason} ({exc})"


def _decode_message(exc: UnicodeError) -> str:
    """Undecodable (or unencodable) text, naming the file being read when our code had one in hand."""
    kind = "decode" if isinstance(exc, UnicodeDecodeError) else "encode"
    position = getattr(exc, "start", None)
    text = f"cannot {kind} text as {exc.encoding}: {exc.reason}" + (
        f" at position {position}" if position is not None else "")
    path = _path_in_traceback(exc)
    return f"{path}: {text}" if path else f"{text} (input text must be {exc.encoding})"


def _path_in_traceback(exc: BaseException) -> str | None:
    """The innermost file path (a local ``path``/``filename``/``file`` naming an existing file) of the frames
    ``exc`` went through, if any."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        for name in ("path", "filename", "file", "source"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
                try:
                    if os.path.isfile(value):
                        found = os.fspath(value)
                        break
                except (OSError, ValueError, TypeError):
                    pass
        tb = tb.tb_next
    return found


def _memory_message(exc: BaseException) -> str:
    detail = " ".join(str(exc).split())
    detail = detail.split(" (Triggered internally", 1)[0][:300]
    return ("out of memory" + (f": {detail}" if detail else "") +
            "; use a smaller model, batch, window or length (or more memory)")


def _ours(filename: str) -> bool:
    """Whether a warning was issued from seqlab's own code (its four packages, wherever they are installed)."""
    roots = [os.path.dirname(module.__file__) + os.sep
             for module in map(sys.modules.get, ("seqlab", "seqlab.domains", "seqlab.pipelines", "seqlab.kernels"))
             if module is not None and getattr(module, "__file__", None)]
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
    # import only the module of the command asked for (all of them for a bare --help)
    wanted = None if at is None else [argv[at]]
    command = f" {wanted[0]}" if wanted else ""

    def fail(message: str) -> int:
        message = " ".join(message.split())  # one line
        print(f"seqlab{command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        parser, parsers = build_parser(wanted)
        config = _config_path(argv)
        if config and wanted:
            _apply_config(parsers[wanted[0]], wanted[0], _load_toml(config), config, argv[at:])
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SeqlabError as exc:
        if debug:
            raise
        return fail(str(exc))
    except OSError as exc:  # FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ENOSPC ...
        if debug or not (exc.errno in USER_OS_ERRORS or isinstance(exc, USER_OS_CLASSES)):
            raise
        return fail(_os_message(exc))
    except UnicodeError as exc:  # undecodable input text, or a command-line argument that is not valid text
        if debug:
            raise
        return fail(_decode_message(exc))
    except ValueError as exc:  # a path with a NUL character (from --config: TOML strings may hold one)
        if debug or "embedded null" not in str(exc):
            raise
        return fail(f"a path holds a NUL character ({exc}): {_path_in_traceback(exc) or 'check the paths given'}")
    except MemoryError as exc:  # numpy's "Unable to allocate ..." is one
        if debug:
            raise
        return fail(_memory_message(exc))
    except RuntimeError as exc:  # torch's failed allocations; any other RuntimeError is a bug: its traceback shows
        if debug or not any(marker in str(exc) for marker in _OUT_OF_MEMORY):
            raise
        return fail(_memory_message(exc))
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if debug or top not in EXTRAS:
            raise
        return fail(f"this needs the optional package {top!r}: pip install 'seqlab[{EXTRAS[top]}]'")
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
