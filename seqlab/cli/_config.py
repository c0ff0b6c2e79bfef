"""``--config run.toml``: settings from a TOML file become the defaults of a command's flags.

Keys of the file's top level and of the table named after the command (``[train]``) set that command's flags
(dashes or underscores); a command with actions also reads its action's table (``[memory.ask]``). Every value is
checked as its flag would check it on the command line (TOML type, then the flag's ``type`` and ``choices``), so
--config cannot bypass a range check. Unknown keys and tables are refused, naming the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

#: the largest --config file read
MAX_CONFIG_BYTES = 1 << 20
#: dests that are not settings (the parser's own)
_NOT_SETTINGS = ("help", "func", "config", "version")


def _load_toml(path: str) -> dict:
    from seqlab.errors import SeqlabError

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
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


_TOML_KIND = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "scalar": "a string or a number",
}
_TOML_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "scalar": (str, int, float)}


def _toml_value(action: argparse.Action, value, where: str):
    """One TOML value for ``action``, checked like a command-line value: its TOML type must match the flag's kind,
    then it goes through the flag's ``type`` (range checks) and ``choices``. Returns the converted value."""
    from seqlab.errors import ConfigError

    kind = _type_name(action)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be {_TOML_KIND[kind]}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, _TOML_TYPES[kind]):
        raise ConfigError(f"{where} must be {_TOML_KIND[kind]}, got {type(value).__name__} {value!r}")
    if action.type is not None and callable(action.type):
        try:
            value = action.type(
                value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
            )
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"invalid value {value!r}"
            raise ConfigError(f"{where}: {reason}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, action.choices))}, got {value!r}")
    return value


def _config_defaults(parser: argparse.ArgumentParser, table: dict, path: str, command: str) -> dict:
    """Defaults for ``parser`` from a TOML table (unknown keys are refused, naming the file). Each value is checked
    as its flag would check it on the command line (``type``, ``choices``): --config cannot bypass a range check."""
    from seqlab.errors import ConfigError, SeqlabError

    known = {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTINGS}
    out = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if isinstance(value, dict) and dest not in known:
            continue  # another command's or an action's table (checked by _apply_config)
        if dest not in known:
            raise SeqlabError(
                f"--config {path}: unknown setting {key!r} for 'seqlab {command}' (known: {', '.join(sorted(known))})"
            )
        action = known[dest]
        if isinstance(action, argparse._SubParsersAction):
            raise ConfigError(
                f"--config {path}: setting {key!r} of 'seqlab {command}' names an action: give it "
                f"on the command line ({', '.join(action.choices)})"
            )
        flag = action.option_strings[-1] if action.option_strings else action.dest.upper()
        where = f"--config {path}: setting {key!r} of 'seqlab {command}' ({flag})"
        many = (
            action.nargs in ("+", "*")
            or isinstance(action.nargs, int)
            and action.nargs > 1
            or isinstance(action, argparse._AppendAction)
        )
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


def _action(parser: argparse.ArgumentParser, argv: list[str], command: str):
    """(name, parser) of the action chosen after ``command`` (``seqlab memory observe``), or (None, None)."""
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            rest = argv[argv.index(command) + 1 :]
            for arg in rest:
                if arg in act.choices:
                    return arg, act.choices[arg]
    return None, None


def _apply_config(
    parser: argparse.ArgumentParser, command: str, table: dict, path: str, argv: list[str], commands: Iterable[str]
) -> None:
    """TOML settings become flag defaults: top-level keys and ``[command]`` for the command, and for a command
    with actions (``seqlab memory observe``) also the ``[command.action]`` table for the action's flags."""
    from seqlab.errors import ConfigError, SeqlabError

    own = table.get(command, {})
    if not isinstance(own, dict):
        raise SeqlabError(f"--config {path}: {command!r} must be a table ([{command}]), got {own!r}")
    # a table nothing reads is a typo, not a setting to drop without a word
    commands = sorted(commands)
    for key, value in table.items():
        if isinstance(value, dict) and key not in commands:
            raise ConfigError(
                f"--config {path}: unknown table [{key}] (tables are named after commands: {', '.join(commands)})"
            )
    actions = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    for key, value in own.items():
        if (
            isinstance(value, dict)
            and key not in actions
            and key.replace("-", "_") not in {a.dest for a in parser._actions}
        ):
            raise ConfigError(
                f"--config {path}: unknown table [{command}.{key}]"
                + (f" (actions: {', '.join(actions)})" if actions else f" ('seqlab {command}' has no actions)")
            )
    parser.set_defaults(**_config_defaults(parser, {**table, **own}, path, command))
    name, action_parser = _action(parser, argv, command)
    if action_parser is not None and isinstance(own.get(name), dict):
        action_parser.set_defaults(**_config_defaults(action_parser, own[name], path, f"{command} {name}"))


def config_path(argv: list[str]) -> str | None:
    """The --config value, before the command (``seqlab --config run.toml train``) or after it (``seqlab train
    --config run.toml``), read first so that its settings become the flags' defaults. Arguments after ``--`` are
    not looked at; --config given twice is refused."""
    found = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(argv):
            found.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
        i += 1
    if len(found) > 1:
        from seqlab.errors import ConfigError

        raise ConfigError(f"--config is given {len(found)} times ({', '.join(found)}): give one settings file")
    return found[0] if found else None
