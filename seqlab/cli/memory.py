"""``seqlab memory observe|ask|info|rollback|compact|repair SESSION ...``: an agent memory session from the command
line.

A session remembers its model file (path and sha256, recorded by ``observe --create --model FILE``), so later
commands need no ``--model``. Events come as JSON Lines files (``--events``, one ``{"role", "content", "time",
"metadata"}`` object per line, ``-`` for stdin) or one event from flags (``--role``, ``--content``, ``--time``).
Errors whose advice names an API argument are reworded in terms of the flags (``_cli_errors``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from seqlab.cli._args import add_json, add_model, add_sampling, count, event_time, snapshot_number, timeout


def _cli_errors(func):
    """Give the command-line wording of an error when it has one (``--timeout``, not ``timeout=``)."""

    @functools.wraps(func)
    def run(args) -> int:
        from seqlab.errors import SeqlabError

        try:
            return func(args)
        except (SeqlabError, OSError) as exc:
            text = getattr(exc, "cli_message", None)
            if text is None:
                raise
            if isinstance(exc, OSError):
                raise type(exc)(exc.errno, text, exc.filename) from None
            raise type(exc)(text) from None

    return run


def _open(args, mode: str, create: bool = False):
    from seqlab.domains.memory import MemoryStreamAdapter
    from seqlab.domains.session import MemorySession, model_for_session
    from seqlab.errors import ConfigError

    if create:
        from seqlab.cli import require

        require(args, "model")
    model, adapter = model_for_session(args.session, args.model)
    if not isinstance(adapter, MemoryStreamAdapter):
        raise ConfigError(
            f"--model {args.model}: the model was built for the {adapter.name!r} adapter, "
            "a memory session needs a 'memory' model"
        )
    return MemorySession.open(
        args.session,
        model,
        create=create,
        mode=mode,
        adapter=adapter,
        timeout=getattr(args, "timeout", None),
        model_file=args.model if create else None,
    )


def _read_events(args) -> list:
    import time

    from seqlab.domains.memory import Event
    from seqlab.errors import ConfigError, InputError

    events = []
    for name in args.events or []:
        if name == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(name, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        for number_, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                events.append(Event.from_json(json.loads(line)))
            except (ValueError, InputError) as exc:
                raise InputError(f"{name}: line {number_}: not an event record ({exc})") from None
    if args.content is not None:
        events.append(Event(args.role, args.content, time.time() if args.time is None else args.time))
    if not events:
        raise ConfigError("no events: give --events FILE.jsonl or --content TEXT (with --role)")
    return events


@_cli_errors
def _observe(args) -> int:
    from pathlib import Path

    from seqlab.errors import SeqlabError

    create = args.create and not (Path(args.session) / "session.json").exists()
    events = _read_events(args)
    with _open(args, "w", create=create) as session:
        total = session.observe(events)
        snapshot = None
        if not args.no_save:
            try:
                snapshot = session.save()
            except (SeqlabError, OSError) as exc:
                # the events are logged (fsynced) and will be replayed: a retry must not observe them again
                reason = " ".join(str(exc).split())
                raise SeqlabError(
                    f"{args.session}: the {len(events)} events were observed and are kept in the "
                    f"log ({total} in all; do not observe them again), but the snapshot failed: "
                    f"{reason}"
                ) from None
        print(
            f"observed {len(events)} events ({total} in all, position {session.position})"
            + ("" if snapshot is None else f"; snapshot {snapshot}")
        )
    return 0


@_cli_errors
def _ask(args) -> int:
    with _open(args, "r") as session:
        answer = session.ask(
            args.prompt,
            args.max_new_tokens,
            role=args.role,
            prompt_role=args.prompt_role,
            time=args.time,
            temperature=args.temperature if args.do_sample else 0.0,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            allow_specials=args.allow_specials,
        )
    if args.json:
        print(json.dumps({"event": answer.event.to_json(), "stop_reason": answer.stop_reason}, ensure_ascii=False))
    else:
        print(answer.text)
    return 0


@_cli_errors
def _info(args) -> int:
    with _open(args, "r") as session:
        info = session.info()
        info["snapshot_list"] = session.snapshots()
    print(json.dumps(info, indent=1, sort_keys=True))
    return 0


@_cli_errors
def _rollback(args) -> int:
    with _open(args, "w") as session:
        session.rollback(args.snapshot)
        print(f"rolled back to snapshot {args.snapshot} ({session.event_count} events, position {session.position})")
    return 0


@_cli_errors
def _compact(args) -> int:
    with _open(args, "w") as session:
        done = session.compact(args.keep)
    print(
        f"removed {len(done['removed_snapshots'])} snapshots ({done['bytes_freed']} bytes) and "
        f"{len(done['removed_temp_files'])} temporary files; merged logs {done['merged_logs'] or 'none'}; kept "
        f"snapshots {done['kept_snapshots']}; every event is still in the logs"
    )
    return 0


@_cli_errors
def _repair(args) -> int:
    from seqlab.domains.session import MemorySession

    report = MemorySession.repair(args.session, timeout=args.timeout)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    elif not report["repaired"]:
        print(f"{args.session}: nothing to repair ({report['events']} events)")
    else:
        for note in report["notes"]:
            print(note)
        lost = ", ".join(f"{a}..{b - 1}" if b > a + 1 else str(a) for a, b in report["lost_events"]) or "none"
        print(
            f"repaired {args.session}: {report['events']} events follow from snapshot {report['snapshot']}; "
            f"events recorded as lost: {lost}; the original bytes are in {args.session}/{report['aside']} "
            "(with report.json); see repair.log"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory",
        help="agent memory sessions: observe events, ask, inspect, roll back, repair",
        description="Persistent agent memory sessions (see docs/agent-memory.md).",
    )
    commands = p.add_subparsers(dest="memory_command", metavar="ACTION")
    commands.required = True

    def common(q, writer: bool, model: bool = True) -> None:
        q.add_argument("session", help="session directory")
        if model:
            add_model(q, "model file (save_model); default: the one recorded in the session")
        if writer:
            q.add_argument(
                "--timeout",
                type=timeout,
                default=None,
                metavar="SECONDS",
                help="seconds to wait for another writer to finish, 0 to 86400 (default: fail at once)",
            )

    o = commands.add_parser("observe", help="log events and advance the session's state (then save a snapshot)")
    common(o, True)
    o.add_argument("--create", action="store_true", help="create the session when missing (needs --model)")
    o.add_argument("--events", action="append", metavar="JSONL", help="JSON Lines file of events ('-': stdin)")
    o.add_argument("--role", default="user", help="role of the --content event (default user)")
    o.add_argument("--content", help="content of one event to observe")
    o.add_argument("--time", type=event_time, help="time of the --content event in Unix seconds (default now)")
    o.add_argument("--no-save", action="store_true", help="do not write a snapshot (the log keeps the events)")
    o.set_defaults(func=_observe)

    a = commands.add_parser("ask", help="generate the next event on a copy of the state (the session is unchanged)")
    common(a, False)
    a.add_argument("prompt", nargs="?", default=None, help="text of a prompt event read first (optional)")
    a.add_argument("--role", default="assistant", help="role of the generated event (default assistant)")
    a.add_argument("--prompt-role", default="user", help="role of the prompt event (default user)")
    a.add_argument("--time", type=event_time, help="time of the prompt and reply events (default now)")
    add_sampling(a, 256, "bytes of the reply, 1 to 1048576 (default 256; fewer when the event ends first)", vocab=256)
    add_json(a, "print the reply event as JSON")
    a.set_defaults(func=_ask)

    i = commands.add_parser("info", help="position, events, snapshots, model and sizes (JSON)")
    common(i, False)
    i.set_defaults(func=_info)

    r = commands.add_parser("rollback", help="return to snapshot N, dropping later events and snapshots")
    common(r, True)
    r.add_argument("snapshot", type=snapshot_number, help="snapshot number (see 'info')")
    r.set_defaults(func=_rollback)

    c = commands.add_parser("compact", help="delete old snapshots (the logs keep every event) and stale temp files")
    common(c, True)
    c.add_argument(
        "--keep",
        type=count(1, 1_000_000),
        default=None,
        help="newest snapshots to keep besides snapshot 0, 1 to 1000000 (default 8)",
    )
    c.set_defaults(func=_compact)

    f = commands.add_parser("repair", help="keep every verifiable event of a damaged session; damaged bytes go aside")
    common(f, True, model=False)
    add_json(f, "print the repair report as JSON")
    f.set_defaults(func=_repair)
