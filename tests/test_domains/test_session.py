"""Agent memory sessions: exactness across processes, crash safety under kill -9, one writer, bad files, CLI.

Real processes and real files. Children run a small script (CHILD below) with one torch thread.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqlab.config import BackboneConfig
from seqlab.domains import model_from_checkpoint
from seqlab.domains.memory import Event, MemoryStreamAdapter
from seqlab.domains.session import MemorySession, SessionLockedError, replay_state
from seqlab.errors import CorruptFileError, FormatVersionError, StateError, StateMismatchError
from seqlab.safetensors_io import read_tensors, write_tensors
from seqlab.testing import memory_model_file

CHILD = r"""
import json, os, random, sys, time
import torch
torch.set_num_threads(1)
from seqlab.domains import model_from_checkpoint
from seqlab.domains.memory import Event
from seqlab.domains.session import MemorySession, SessionLockedError, replay_state

def make_event(i):
    role = "user" if i % 2 else "assistant"
    return Event(role, f"event {i} " + "xyz" * (i % 5), float(i), None if i % 3 else {"i": i})

action, model_file, session = sys.argv[1], sys.argv[2], sys.argv[3]
args = sys.argv[4:]
model, _ = model_from_checkpoint(model_file)

def out(**kw):
    print(json.dumps(kw), flush=True)

if action == "observe":  # observe events [a, b) in calls of `step` events; optionally save; dump state; ask
    a, b, step, save, dump = int(args[0]), int(args[1]), int(args[2]), args[3] == "1", args[4]
    s = MemorySession.open(session, model, create=True, model_file=model_file)
    for i in range(a, b, step):
        s.observe([make_event(k) for k in range(i, min(b, i + step))])
    if save:
        s.save()
    if dump != "-":
        s.state.save(dump)
        answer = s.ask("what happened?", 24, temperature=0, time=1e6)
        out(tokens=answer.tokens, events=s.event_count)
    s.close()
elif action == "writer_loop":  # observe random batches forever, saving now and then; print what was acknowledged
    rng = random.Random(int(args[0]))
    s = MemorySession.open(session, model, create=True, model_file=model_file)
    out(ready=True, events=s.event_count)
    n = s.event_count
    while True:
        k = rng.randint(1, 4)
        n = s.observe([make_event(i) for i in range(n, n + k)])
        out(acked=n)
        if rng.random() < 0.3:
            s.save()
elif action == "hold":  # take the writer lock, hold it for a while
    try:
        s = MemorySession.open(session, model, timeout=float(args[1]) if args[1] != "-" else None)
    except SessionLockedError as exc:
        out(won=False, error=str(exc))
        sys.exit(0)
    out(won=True)
    s.observe([make_event(s.event_count)])
    time.sleep(float(args[0]))
    s.close()
elif action == "reader_loop":  # read-only opens while a writer works: each view is a consistent prefix
    checked = 0
    start = time.time()
    # at least the given seconds and at least 3 views, whatever the machine's load (hard cap: 60 s)
    while (checked < 3 or time.time() < start + float(args[0])) and time.time() < start + 60:
        r = MemorySession.open(session, model, mode="r")
        events = r.events()
        assert len(events) == r.event_count, (len(events), r.event_count)
        assert all(e == make_event(i) for i, e in enumerate(events))
        ref = replay_state(model, events)
        assert all(torch.equal(x, y) for x, y in zip(ref.tensors().values(), r.state.tensors().values()))
        assert ref.position == r.position
        r.close()
        checked += 1
    out(checked=checked)
"""


def make_event(i: int) -> Event:
    return Event(
        "user" if i % 2 else "assistant", f"event {i} " + "xyz" * (i % 5), float(i), None if i % 3 else {"i": i}
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return memory_model_file(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model(model_file):
    return model_from_checkpoint(model_file)[0]


def child(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def run_child(*args) -> list[dict]:
    proc = child(*args)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def same_state(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return a.position == b.position and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------------------------------------------------------
# exactness


def test_observe_save_reopen_in_new_process_is_bit_exact(model_file, model, tmp_path):
    run_child("observe", model_file, tmp_path / "s", 0, 7, 3, 1, "-")  # A, in calls of 3, saved
    split = run_child("observe", model_file, tmp_path / "s", 7, 12, 5, 0, tmp_path / "split.safetensors")  # B
    whole = run_child("observe", model_file, tmp_path / "w", 0, 12, 12, 0, tmp_path / "whole.safetensors")
    from seqlab.state import RecurrentState

    s_split = RecurrentState.load(tmp_path / "split.safetensors", model)
    s_whole = RecurrentState.load(tmp_path / "whole.safetensors", model)
    assert same_state(s_split, s_whole)
    assert same_state(s_whole, replay_state(model, [make_event(i) for i in range(12)]))
    assert split[0]["tokens"] == whole[0]["tokens"] and len(split[0]["tokens"]) == 24
    assert split[0]["events"] == whole[0]["events"] == 12


def test_unsaved_events_are_replayed_and_ask_score_change_nothing(model, tmp_path):
    events = [make_event(i) for i in range(6)]
    with MemorySession.open(tmp_path / "s", model, create=True) as s:
        s.observe(events[:2])
        assert s.save() == 1
        s.observe(events[2:])  # never saved: lives in the log only
        before = s.state
        a1 = s.ask("hi", 16, temperature=0, time=100.0)
        sc = s.score(make_event(6))
        a2 = s.ask("hi", 16, temperature=0, time=100.0)
        assert a1 == a2 and same_state(before, s.state) and s.event_count == 6
        assert sc.bytes == len(MemoryStreamAdapter().encode(make_event(6))) and sc.bits > 0
        sampled = [s.ask("hi", 8, temperature=1.0, seed=3, time=1.0).tokens for _ in range(2)]
        assert sampled[0] == sampled[1]
    with MemorySession.open(tmp_path / "s", model) as s:
        assert s.event_count == 6 and s.events() == events
        assert same_state(s.state, replay_state(model, events))
        assert s.ask("hi", 16, temperature=0, time=100.0) == a1
        assert s.score(make_event(6)) == sc


# ------------------------------------------------------------------------------------------------------
# crash safety


def test_kill_9_during_observe_and_save_loses_nothing(model_file, model, tmp_path):
    rng = random.Random(1234)
    session = tmp_path / "s"
    total_acked = 0
    for trial in range(10):
        proc = child("writer_loop", model_file, session, trial)
        first = json.loads(proc.stdout.readline())
        assert first.get("ready"), proc.stderr.read()
        time.sleep(rng.uniform(0.02, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        acked = [json.loads(line)["acked"] for line in stdout.splitlines() if '"acked"' in line]
        last_acked = max(acked, default=first["events"])
        with MemorySession.open(session, model) as s:  # every reopen succeeds
            events = s.events()
            assert s.event_count == len(events) >= last_acked  # nothing acknowledged is lost
            assert all(e == make_event(i) for i, e in enumerate(events))  # the log holds exactly what was sent
            assert same_state(s.state, replay_state(model, events))  # the state equals the replayed log
        total_acked = last_acked
    assert total_acked > 10  # the trials did real work


def test_torn_log_tail_is_dropped_and_a_rollback_interrupted_is_finished(model, tmp_path):
    with MemorySession.open(tmp_path / "s", model, create=True) as s:
        s.observe([make_event(0), make_event(1)])
        s.save()
        s.observe([make_event(2)])
    log = tmp_path / "s" / "log-00000001.wal"
    whole = log.read_bytes()
    from seqlab.domains.session import _frame

    record = _frame({"first": 3, "events": [make_event(3).to_json()]})
    for cut in (5, 40, len(record) - 1):  # a record torn anywhere inside it: never acknowledged
        log.write_bytes(whole + record[:cut])
        with MemorySession.open(tmp_path / "s", model) as s:
            assert s.event_count == 3
        assert log.read_bytes() == whole
    # a rollback that died after writing its intent is finished by the next writer, seen as done by readers
    (tmp_path / "s" / "rollback.json").write_text(json.dumps({"to": 0}))
    with MemorySession.open(tmp_path / "s", model, mode="r") as r:
        assert r.event_count == 0
    with MemorySession.open(tmp_path / "s", model) as s:
        assert s.event_count == 0 and [x["number"] for x in s.snapshots()] == [0]
    assert not (tmp_path / "s" / "rollback.json").exists()


# ------------------------------------------------------------------------------------------------------
# concurrency


def test_two_writer_processes_exactly_one_wins(model_file, model, tmp_path):
    with MemorySession.open(tmp_path / "s", model, create=True, model_file=model_file):
        pass
    procs = [child("hold", model_file, tmp_path / "s", 3, "-") for _ in range(2)]
    results = [json.loads(p.communicate(timeout=120)[0].splitlines()[0]) for p in procs]
    assert sorted(r["won"] for r in results) == [False, True]
    loser = next(r for r in results if not r["won"])
    assert "another process has this session open for writing" in loser["error"]
    # waiting with a timeout: the second writer gets the session once the first has closed it
    first = child("hold", model_file, tmp_path / "s", 1, "-")
    assert json.loads(first.stdout.readline())["won"]
    second = run_child("hold", model_file, tmp_path / "s", 0, 30)
    first.communicate(timeout=60)
    assert second[0]["won"]
    with MemorySession.open(tmp_path / "s", model) as s:
        assert s.event_count == 3  # each winner observed one event


def test_in_process_lock_and_read_only(model, tmp_path):
    with MemorySession.open(tmp_path / "s", model, create=True) as s:
        with pytest.raises(SessionLockedError, match="open it with mode='r'"):
            MemorySession.open(tmp_path / "s", model)
        t0 = time.monotonic()
        with pytest.raises(SessionLockedError, match="waited"):
            MemorySession.open(tmp_path / "s", model, timeout=0.2)
        assert time.monotonic() - t0 >= 0.2
        s.observe(make_event(0))
        with MemorySession.open(tmp_path / "s", model, mode="r") as r:
            assert r.event_count == 1
            for call in (lambda: r.observe(make_event(1)), r.save, lambda: r.rollback(0)):
                with pytest.raises(StateError, match="read-only"):
                    call()
    with MemorySession.open(tmp_path / "s", model):  # the lock went with the close
        pass


def test_readers_see_consistent_snapshots_while_a_writer_works(model_file, model, tmp_path):
    with MemorySession.open(tmp_path / "s", model, create=True):
        pass
    writer = child("writer_loop", model_file, tmp_path / "s", 7)
    assert json.loads(writer.stdout.readline())["ready"]
    try:
        result = run_child("reader_loop", model_file, tmp_path / "s", 3)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.communicate()
    assert result[0]["checked"] >= 3


# ------------------------------------------------------------------------------------------------------
# snapshots, rollback, fork


def test_rollback_and_fork(model, tmp_path):
    with MemorySession.open(tmp_path / "s", model, create=True) as s:
        s.observe([make_event(0), make_event(1)])
        assert s.save() == 1
        s.observe(make_event(2))
        assert s.save() == 2 and s.save() == 2  # nothing new: no new snapshot
        s.observe(make_event(3))
        assert [(x["number"], x["events"]) for x in s.snapshots()] == [(0, 0), (1, 2), (2, 3)]
        s.rollback(1)
        assert s.event_count == 2 and same_state(s.state, replay_state(model, [make_event(0), make_event(1)]))
        assert [x["number"] for x in s.snapshots()] == [0, 1]
        with pytest.raises(Exception, match="no snapshot 5"):
            s.rollback(5)
        s.observe(make_event(9))
        fork = s.fork(tmp_path / "f")
        fork.observe(make_event(10))
        info = fork.info()
        assert info["events"] == 4 and info["forked_from"]["events"] == 3
        assert same_state(fork.state, replay_state(model, [make_event(i) for i in (0, 1, 9, 10)]))
        assert s.event_count == 3  # the parent is untouched
        fork.close()
        info = s.info()
        assert info["position"] == s.position and info["unsaved_events"] == 1 and info["snapshot"] == 1
        assert info["sizes"]["state_bytes"] == s.state.nbytes() and info["model"]["fingerprint"] == model.fingerprint
    with MemorySession.open(tmp_path / "s", model) as s:
        assert s.events() == [make_event(0), make_event(1), make_event(9)]


# ------------------------------------------------------------------------------------------------------
# bad files


@pytest.fixture
def saved_session(model, tmp_path):
    with MemorySession.open(tmp_path / "s", model, create=True) as s:
        s.observe([make_event(0), make_event(1)])
        s.save()
    return tmp_path / "s"


def test_truncated_and_bit_flipped_snapshots_are_refused_untouched(model, saved_session):
    snap = saved_session / "snapshot-00000001.safetensors"
    good = snap.read_bytes()
    rng = random.Random(0)
    damaged = [good[:n] for n in (0, 7, 100, len(good) // 2, len(good) - 1)]
    for _ in range(12):
        at = rng.randrange(len(good))
        damaged.append(good[:at] + bytes([good[at] ^ (1 << rng.randrange(8))]) + good[at + 1 :])
    damaged.append(good[:-200] + bytes(b ^ 0xFF for b in good[-200:]))  # the tensor data itself
    for bad in damaged:
        snap.write_bytes(bad)
        for mode in ("w", "r"):
            with pytest.raises((CorruptFileError, StateMismatchError)) as info:
                MemorySession.open(saved_session, model, mode=mode)
            assert str(snap) in str(info.value) or "session.json" not in str(info.value)
        assert snap.read_bytes() == bad  # left as it was
    snap.write_bytes(good)
    with MemorySession.open(saved_session, model) as s:
        assert s.event_count == 2


def test_wrong_model_and_future_versions_are_refused(model, saved_session):
    other = MemoryStreamAdapter().build_model(BackboneConfig(d_model=16, n_layer=2, d_state=4)).eval()
    with pytest.raises(StateMismatchError, match="fingerprint"):
        MemorySession.open(saved_session, other)
    snap = saved_session / "snapshot-00000001.safetensors"
    good = snap.read_bytes()
    tensors, meta = read_tensors(snap, kind="seqlab.memory_session.snapshot", version=1)
    body = {k: v for k, v in meta.items() if k not in ("format", "format_version", "checksum")}
    write_tensors(snap, tensors, kind="seqlab.memory_session.snapshot", version=2, meta=body)
    with pytest.raises(FormatVersionError, match="version 2"):
        MemorySession.open(saved_session, model)
    snap.write_bytes(good)
    # a snapshot copied in from a session of another model
    with MemorySession.open(saved_session.parent / "o", other, create=True) as o:
        o.observe(make_event(0))
        o.save()
    snap.write_bytes((saved_session.parent / "o" / "snapshot-00000001.safetensors").read_bytes())
    with pytest.raises(StateMismatchError, match="snapshot-00000001"):
        MemorySession.open(saved_session, model)
    snap.write_bytes(good)
    # session.json and the log from the future, and an altered session.json
    meta_file = saved_session / "session.json"
    original = meta_file.read_text()
    meta = json.loads(original)
    meta["format_version"] = 7
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match="version 7"):
        MemorySession.open(saved_session, model)
    meta_file.write_text(original.replace('"d_state": 4', '"d_state": 5'))
    with pytest.raises(CorruptFileError, match="checksum"):
        MemorySession.open(saved_session, model)
    meta_file.write_text(original)
    from seqlab.domains.session import _frame

    log = saved_session / "log-00000001.wal"
    log_good = log.read_bytes()
    log.write_bytes(
        _frame(
            {
                "format": "seqlab.memory_session.log",
                "format_version": 3,
                "snapshot": 1,
                "first_event": 2,
                "fingerprint": model.fingerprint,
            }
        )
    )
    with pytest.raises(FormatVersionError, match="version 3"):
        MemorySession.open(saved_session, model)
    log.write_bytes(log_good)
    with MemorySession.open(saved_session, model) as s:
        s.observe([make_event(2)])
        s.observe([make_event(3)])
    data = bytearray(log.read_bytes())
    data[len(log_good) + 50] ^= 0x01  # inside the first appended record, with another record after it
    log.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        MemorySession.open(saved_session, model)
    assert log.read_bytes() == bytes(data)


# ------------------------------------------------------------------------------------------------------
# the command line


def test_cli_observe_ask_info_rollback(model_file, tmp_path):
    script = "import sys\nfrom seqlab import cli\nsys.exit(cli.main())\n"

    def seqlab(*args, stdin=None):
        return subprocess.run(
            [sys.executable, "-c", script, "memory", *map(str, args)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    r = seqlab("observe", "s", "--create", "--content", "hi")
    assert r.returncode == 2 and "--model" in r.stderr
    r = seqlab("observe", "s", "--create", "--model", model_file, "--content", "hello", "--time", "1")
    assert r.returncode == 0, r.stderr
    lines = "".join(json.dumps(make_event(i).to_json()) + "\n" for i in range(3))
    r = seqlab("observe", "s", "--events", "-", stdin=lines)  # the model file comes from the session
    assert r.returncode == 0 and "4 in all" in r.stdout, r.stderr
    r = seqlab("ask", "s", "what now?", "--max-new-tokens", "8", "--time", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["event"]["role"] == "assistant"
    # settings of an action from a TOML table [memory.ask]; flags win; unknown keys are refused
    (tmp_path / "m.toml").write_text(
        '[memory.ask]\nrole = "tool"\nmax-new-tokens = 4\n[memory.observe]\nrole = "system"\n'
    )

    def with_config(*args):
        return subprocess.run(
            [sys.executable, "-c", script, "--config", "m.toml", "memory", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    r = with_config("ask", "s", "and now?", "--time", "6", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["event"]["role"] == "tool", r.stderr
    r = with_config("ask", "s", "and now?", "--time", "6", "--json", "--role", "assistant")
    assert json.loads(r.stdout)["event"]["role"] == "assistant", r.stderr
    (tmp_path / "m.toml").write_text('[memory.ask]\ncolour = "red"\n')
    r = with_config("ask", "s", "--json")
    assert r.returncode == 2 and "unknown setting 'colour' for 'seqlab memory ask'" in r.stderr
    r = seqlab("info", "s")
    info = json.loads(r.stdout)
    assert info["events"] == 4 and info["snapshot"] == 2 and len(info["snapshot_list"]) == 3
    r = seqlab("rollback", "s", "1")
    assert r.returncode == 0 and "1 events" in r.stdout, r.stderr
    assert json.loads(seqlab("info", "s").stdout)["events"] == 1
