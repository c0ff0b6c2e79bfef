"""``seqlab memory observe|ask|info|rollback SESSION ...``: an agent memory session from the command line.

A session remembers its model file (path and sha256, recorded by ``observe --create --model FILE``), so later
commands need no ``--model``. Events come as JSON Lines files (``--events``, one ``{"role", "content", "time",
"metadata"}`` object per line, ``-`` for stdin) or one event from flags (``--role``, ``--content``, ``--time``).
"""

from __future__ import annotations

import argparse
import json
import sys

from seqlab.errors import ConfigError, InputError


def _open(args, mode: str, create: bool = False):
    from .session import MemorySession, model_for_session

    if create:
        from seqlab.cli import require

        require(args, "model")
    model, adapter = model_for_session(args.session, args.model)
    if type(adapter).__name__ != "MemoryStreamAdapter":
        raise ConfigError(f"--model {args.model}: the model was built for the {adapter.name!r} adapter, "
                          "a memory session needs a 'memory' model")
    return MemorySession.open(args.session, model, create=create, mode=mode, adapter=adapter,
                              timeout=getattr(args, "timeout", None), model_file=args.model if create else None)


def _read_events(args) -> list:
    import time

    from .memory import Event

    events = []
    for name in args.events or []:
        if name == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(name, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                events.append(Event.from_json(json.loads(line)))
            except (ValueError, InputError) as exc:
                raise InputError(f"{name}: line {number}: not an event record ({exc})") from None
    if args.content is not None:
        events.append(Event(args.role, args.content, time.time() if args.time is None else args.time))
    if not events:
        raise ConfigError("no events: give --events FILE.jsonl or --content TEXT (with --role)")
    return events


def _observe(args) -> int:
    from pathlib import Path

    create = args.create and not (Path(args.session) / "session.json").exists()
    events = _read_events(args)
    with _open(args, "w", create=create) as session:
        total = session.observe(events)
        snapshot = None if args.no_save else session.save()
        print(f"observed {len(events)} events ({total} in all, position {session.position})"
              + ("" if snapshot is None else f"; snapshot {snapshot}"))
    return 0


def _ask(args) -> int:
    with _open(args, "r") as session:
        answer = session.ask(args.prompt, args.max_new_tokens, role=args.role, prompt_role=args.prompt_role,
                             time=args.time, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed)
    if args.json:
        print(json.dumps({"event": answer.event.to_json(), "stop_reason": answer.stop_reason}, ensure_ascii=False))
    else:
        print(answer.text)
    return 0


def _info(args) -> int:
    with _open(args, "r") as session:
        info = session.info()
        info["snapshot_list"] = session.snapshots()
    print(json.dumps(info, indent=1, sort_keys=True))
    return 0


def _rollback(args) -> int:
    with _open(args, "w") as session:
        session.rollback(args.snapshot)
        print(f"rolled back to snapshot {args.snapshot} ({session.event_count} events, position {session.position})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="agent memory sessions: observe events, ask, inspect, roll back",
                       description="Persistent agent memory sessions (see docs/agent-memory.md).")
    commands = p.add_subparsers(dest="memory_command", metavar="ACTION")
    commands.required = True

    def common(q, writer: bool) -> None:
        q.add_argument("session", help="session directory")
        q.add_argument("--model", help="model file (save_model); default: the one recorded in the session")
        if writer:
            q.add_argument("--timeout", type=float, default=None,
                           help="seconds to wait for another writer to finish (default: fail at once)")

    o = commands.add_parser("observe", help="log events and advance the session's state (then save a snapshot)")
    common(o, True)
    o.add_argument("--create", action="store_true", help="create the session when missing (needs --model)")
    o.add_argument("--events", action="append", metavar="JSONL", help="JSON Lines file of events ('-': stdin)")
    o.add_argument("--role", default="user", help="role of the --content event (default user)")
    o.add_argument("--content", help="content of one event to observe")
    o.add_argument("--time", type=float, help="time of the --content event in Unix seconds (default now)")
    o.add_argument("--no-save", action="store_true", help="do not write a snapshot (the log keeps the events)")
    o.set_defaults(func=_observe)

    a = commands.add_parser("ask", help="generate the next event on a copy of the state (the session is unchanged)")
    common(a, False)
    a.add_argument("prompt", nargs="?", default=None, help="text of a prompt event read first (optional)")
    a.add_argument("--max-new-tokens", type=int, default=256)
    a.add_argument("--role", default="assistant", help="role of the generated event (default assistant)")
    a.add_argument("--prompt-role", default="user", help="role of the prompt event (default user)")
    a.add_argument("--time", type=float, help="time of the prompt and reply events (default now)")
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a.add_argument("--top-k", type=int)
    a.add_argument("--top-p", type=float)
    a.add_argument("--seed", type=int)
    a.add_argument("--json", action="store_true", help="print the reply event as JSON")
    a.set_defaults(func=_ask)

    i = commands.add_parser("info", help="position, events, snapshots, model and sizes (JSON)")
    common(i, False)
    i.set_defaults(func=_info)

    r = commands.add_parser("rollback", help="return to snapshot N, dropping later events and snapshots")
    common(r, True)
    r.add_argument("snapshot", type=int, help="snapshot number (see 'info')")
    r.set_defaults(func=_rollback)
