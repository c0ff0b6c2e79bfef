"""Hostile files for agent memory sessions: bit flips and truncations at any offset of any log, garbage tails,
format-1 logs, damaged snapshots, repair, retention and compaction, permission and disk failures, CLI wording and
ranges. Sessions are built once per module and copied for each case."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab import cli
from seqlab.domains import model_from_checkpoint
from seqlab.domains import session as session_module
from seqlab.domains.memory import Event, MemoryStreamAdapter
from seqlab.domains.session import MemorySession, replay_state
from seqlab.errors import ConfigError, CorruptFileError, InputError, SessionLockedError
from seqlab.testing import memory_model_file

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FRAME = 44  # format-2 record header: magic, length, sha256, crc32


def make_event(i: int) -> Event:
    return Event(
        "user" if i % 2 else "assistant", f"event {i} " + "xyz" * (i % 4), float(i), None if i % 3 else {"i": i}
    )


EVENTS = [make_event(i) for i in range(7)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return memory_model_file(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model(model_file):
    return model_from_checkpoint(model_file)[0]


@pytest.fixture(scope="module")
def flat(model, model_file, tmp_path_factory) -> Path:
    """One log: the header and five records, one per observe call (never saved)."""
    path = tmp_path_factory.mktemp("flat") / "s"
    with MemorySession.open(path, model, create=True, model_file=model_file) as s:
        for e in EVENTS[:5]:
            s.observe(e)
    return path


@pytest.fixture(scope="module")
def chain(model, model_file, tmp_path_factory) -> Path:
    """Three logs: log 0 holds events 0-1, log 1 event 2 (both history: snapshot 2 has them all), log 2 events 3,
    4-5 and 6 in three records after snapshot 2."""
    path = tmp_path_factory.mktemp("chain") / "s"
    with MemorySession.open(path, model, create=True, model_file=model_file) as s:
        s.observe(EVENTS[:2])
        s.save()
        s.observe(EVENTS[2])
        s.save()
        s.observe(EVENTS[3])
        s.observe(EVENTS[4:6])
        s.observe(EVENTS[6])
    return path


def copy_of(session: Path, where: Path) -> Path:
    target = where / "s"
    shutil.copytree(session, target)
    return target


def records(data: bytes) -> list[tuple[int, int, dict]]:
    """(offset, end, payload) of each format-2 record."""
    out, at = [], 0
    while at < len(data):
        length = struct.unpack_from("<I", data, at + 4)[0]
        end = at + FRAME + length
        out.append((at, end, json.loads(data[at + FRAME : end])))
        at = end
    return out


def same_state(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return a.position == b.position and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def refused(path: Path, model, log: Path) -> None:
    """Readers and writers both refuse, naming the file and a byte; the bytes are left as they were."""
    before = log.read_bytes()
    for mode in ("w", "r"):
        with pytest.raises(CorruptFileError) as info:
            MemorySession.open(path, model, mode=mode)
        assert str(log) in str(info.value) and "byte" in str(info.value), str(info.value)
        assert "MemorySession.repair" in str(info.value)
        assert log.read_bytes() == before  # a writer never cuts what a checksum does not prove torn


# ------------------------------------------------------------------------------------------------------
# damage is never taken for a tear


@FUZZ
@given(which=st.integers(0, 2), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_one_bit_flip_anywhere_is_refused_and_repair_keeps_every_event_before_it(chain, model, which, where, bit):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy_of(chain, Path(tmp))
        log = path / f"log-{which:08d}.wal"
        data = bytearray(log.read_bytes())
        at = int(where * len(data))
        hit = next((first, end, payload) for first, end, payload in records(bytes(data)) if first <= at < end)
        data[at] ^= 1 << bit
        log.write_bytes(bytes(data))
        refused(path, model, log)

        report = MemorySession.repair(path)
        assert report["repaired"] and (path / report["aside"] / log.name).read_bytes() == bytes(data)
        # the damaged record's events (all of the log's when its header is hit) and, in the state's own log,
        # everything after it are gone; all else stays
        start = {0: 0, 1: 2, 2: 3}[which]
        first = hit[2].get("first", start)
        with MemorySession.open(path, model) as s:
            if which < 2:  # history: the state (snapshot 2 and its log) stays; the damaged stretch is recorded
                end = {0: 2, 1: 3}[which]
                assert s.event_count == 7 and s.info()["lost_events"] == [[first, end]]
                assert s.events() == [e for i, e in enumerate(EVENTS) if not first <= i < end]
                assert same_state(s.state, replay_state(model, EVENTS))
            else:
                assert s.event_count == first and s.info()["lost_events"] == []
                assert s.events() == EVENTS[:first]
                assert same_state(s.state, replay_state(model, EVENTS[:first]))
            s.observe(EVENTS[6])  # the repaired session takes new events
        assert MemorySession.repair(path)["repaired"] is False


@FUZZ
@given(where=st.floats(0, 1, exclude_max=True))
def test_truncating_the_last_log_anywhere(flat, model, where):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy_of(flat, Path(tmp))
        log = path / "log-00000000.wal"
        whole = log.read_bytes()
        spans = records(whole)
        cut = int(where * len(whole))
        log.write_bytes(whole[:cut])
        if cut < spans[0][1]:  # inside the header record: a log is written whole with it, so not a tear
            refused(path, model, log)
            return
        kept = [payload for _, end, payload in spans[1:] if end <= cut]
        boundary = max(end for _, end, _ in spans if end <= cut)
        events = [Event.from_json(e) for p in kept for e in p["events"]]
        with MemorySession.open(path, model, mode="r") as r:  # a reader sees the whole records, changes nothing
            assert r.events() == events and r.event_count == len(events)
        assert log.read_bytes() == whole[:cut]
        with MemorySession.open(path, model) as s:  # a writer drops the proven torn record
            assert s.events() == events and same_state(s.state, replay_state(model, events))
        assert log.read_bytes() == whole[:boundary]


@FUZZ
@given(which=st.integers(0, 1), where=st.floats(0, 1, exclude_max=True))
def test_truncating_an_older_log_anywhere_is_refused(chain, model, which, where):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy_of(chain, Path(tmp))
        log = path / f"log-{which:08d}.wal"
        whole = log.read_bytes()
        cut = whole[: int(where * len(whole))]
        log.write_bytes(cut)  # even at a record boundary: the next log's first event says what is missing
        for mode in ("w", "r"):
            with pytest.raises(CorruptFileError, match="log-0000000"):
                MemorySession.open(path, model, mode=mode)
        assert log.read_bytes() == cut


@FUZZ
@given(tail=st.binary(min_size=1, max_size=80))
def test_bytes_after_the_last_record_are_damage_unless_a_torn_header(flat, model, tail):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy_of(flat, Path(tmp))
        log = path / "log-00000000.wal"
        whole = log.read_bytes()
        log.write_bytes(whole + tail)
        if len(tail) < FRAME and b"SQW2".startswith(tail[:4]):
            with MemorySession.open(path, model) as s:  # a partial record header at the very end: torn
                assert s.event_count == 5
            assert log.read_bytes() == whole
        else:
            refused(path, model, log)


def test_the_users_cases_in_the_current_format(flat, model, tmp_path):
    """Early record's length field: every bit. The last record: every byte of its header and a payload byte."""
    path = copy_of(flat, tmp_path)
    log = path / "log-00000000.wal"
    whole = log.read_bytes()
    spans = records(whole)
    hits = [spans[1][0] + 4 + k // 8 for k in range(32)] + list(range(spans[-1][0], spans[-1][0] + FRAME))
    hits.append(spans[-1][1] - 1)
    for i, at in enumerate(hits):
        data = bytearray(whole)
        data[at] ^= 1 << (i % 8)
        log.write_bytes(bytes(data))
        with pytest.raises(CorruptFileError, match=f"byte {spans[1][0] if at < spans[1][1] else spans[-1][0]}"):
            MemorySession.open(path, model)
        assert log.read_bytes() == bytes(data)


# ------------------------------------------------------------------------------------------------------
# format 1 (written by earlier seqlab): still read, upgraded by a writer, its damage no longer taken for a tear


def to_format_1(path: Path) -> None:
    for log in sorted(path.glob("log-*.wal")):
        out = b""
        for _, _, payload in records(log.read_bytes()):
            if "format" in payload:
                payload = {**payload, "format_version": 1}
            body = json.dumps(payload, ensure_ascii=False, allow_nan=False, sort_keys=True).encode()
            out += struct.pack("<4sI32s", b"SQWL", len(body), hashlib.sha256(body).digest()) + body
        log.write_bytes(out)
    meta = json.loads((path / "session.json").read_text())
    meta["format_version"] = 1
    meta["checksum"] = session_module._json_checksum(meta)
    (path / "session.json").write_text(json.dumps(meta))


def test_format_1_session_opens_and_a_writer_upgrades_its_log(chain, model, tmp_path):
    path = copy_of(chain, tmp_path)
    to_format_1(path)
    current = path / "log-00000002.wal"
    old = current.read_bytes()
    with MemorySession.open(path, model, mode="r") as r:
        assert r.events() == EVENTS and r.info()["format_version"] == 1
    assert current.read_bytes() == old
    with MemorySession.open(path, model) as s:
        assert s.events() == EVENTS and same_state(s.state, replay_state(model, EVENTS))
        s.observe(make_event(7))
    assert current.read_bytes()[:4] == b"SQW2" and (path / "log-00000000.wal").read_bytes()[:4] == b"SQWL"
    assert json.loads((path / "session.json").read_text())["format_version"] == 2
    with MemorySession.open(path, model) as s:
        assert s.events() == EVENTS + [make_event(7)]


def format_1_flat(flat, tmp_path) -> tuple[Path, Path, bytes, list[int]]:
    path = copy_of(flat, tmp_path)
    to_format_1(path)
    log = path / "log-00000000.wal"
    data = log.read_bytes()
    starts, at = [], 0
    while at < len(data):
        starts.append(at)
        at += 40 + struct.unpack_from("<I", data, at + 4)[0]
    return path, log, data, starts


def test_format_1_last_record_flip_is_damage_not_a_tear(flat, model, tmp_path):
    """Failed before: a flip in the last record of a log was taken for a torn write and the event dropped."""
    path, log, data, starts = format_1_flat(flat, tmp_path)
    bad = bytearray(data)
    bad[-3] ^= 0x10
    log.write_bytes(bytes(bad))
    refused(path, model, log)


def test_format_1_early_length_flip_is_damage_not_a_tear(flat, model, tmp_path):
    """Failed before: a length bit flipped so that an early record seemed to run past the end: the session
    opened with 1 of 5 events and the writer cut the log there."""
    path, log, data, starts = format_1_flat(flat, tmp_path)
    bad = bytearray(data)
    bad[starts[2] + 6] ^= 0x01  # length += 65536: past the end of the file
    log.write_bytes(bytes(bad))
    refused(path, model, log)
    log.write_bytes(data[:-5])  # a real tear of the last record is still dropped
    with MemorySession.open(path, model) as s:
        assert s.events() == EVENTS[:4]


def test_format_1_damage_in_an_older_log_is_seen(chain, model, tmp_path):
    """Failed before: only the newest snapshot's log was read, so damage in older logs went unnoticed until
    events() (and a writer could go on)."""
    path = copy_of(chain, tmp_path)
    to_format_1(path)
    log = path / "log-00000000.wal"
    data = bytearray(log.read_bytes())
    data[-2] ^= 0x04
    log.write_bytes(bytes(data))
    refused(path, model, log)


# ------------------------------------------------------------------------------------------------------
# files gone, snapshots damaged, repair's record


def test_a_missing_log_or_snapshot(chain, model, tmp_path):
    path = copy_of(chain, tmp_path)
    (path / "log-00000001.wal").unlink()
    with pytest.raises(CorruptFileError, match="log-00000001.wal: missing"):
        MemorySession.open(path, model, mode="r")
    report = MemorySession.repair(path)
    assert report["lost_events"] == [[2, 3]]
    with MemorySession.open(path, model) as s:
        assert s.event_count == 7 and s.events() == EVENTS[:2] + EVENTS[3:]
    # the newest snapshot's log deleted: its events are gone, and open says so (failed before: it opened
    # without them)
    path = copy_of(chain, tmp_path / "c")
    (path / "log-00000002.wal").unlink()
    with pytest.raises(CorruptFileError, match="log-00000002.wal: missing"):
        MemorySession.open(path, model)
    report = MemorySession.repair(path)
    assert report["rewritten"] == ["log-00000002.wal"] and "started it empty" in report["notes"][0]
    with MemorySession.open(path, model) as s:
        assert s.events() == EVENTS[:3]
    # a deleted newest snapshot: the logs are the truth, the state is replayed from the one before, exactly
    path = copy_of(chain, tmp_path / "b")
    (path / "snapshot-00000002.safetensors").unlink()
    with MemorySession.open(path, model) as s:
        assert s.events() == EVENTS and same_state(s.state, replay_state(model, EVENTS))


def test_damaged_newest_snapshot_is_refused_then_set_aside_by_repair(chain, model, tmp_path):
    path = copy_of(chain, tmp_path)
    snap = path / "snapshot-00000002.safetensors"
    data = bytearray(snap.read_bytes())
    data[len(data) - 10] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="snapshot-00000002"):
        MemorySession.open(path, model)
    report = MemorySession.repair(path)
    assert report["set_aside"] == ["snapshot-00000002.safetensors"] and report["snapshot"] == 1
    assert (path / report["aside"] / snap.name).read_bytes() == bytes(data) and not snap.exists()
    lines = (path / "repair.log").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["aside"] == report["aside"]
    assert json.loads((path / report["aside"] / "report.json").read_text())["set_aside"] == report["set_aside"]
    with MemorySession.open(path, model) as s:
        assert s.events() == EVENTS and same_state(s.state, replay_state(model, EVENTS))
        assert s.save() == 3  # numbers go on after the newest log


def test_a_damaged_rollback_intent_rolls_nothing_back(chain, model, tmp_path):
    """A rollback record is checksummed: a flipped digit must not send a writer to another snapshot."""
    path = copy_of(chain, tmp_path)
    with MemorySession.open(path, model) as s:
        s.rollback(2)  # writes and finishes a checksummed intent
    intent = {"to": 1, "checksum": session_module._json_checksum({"to": 2})}  # a rollback to 2, digit flipped
    (path / "rollback.json").write_text(json.dumps(intent))
    for mode in ("w", "r"):
        with pytest.raises(CorruptFileError, match="rollback.json"):
            MemorySession.open(path, model, mode=mode)
    report = MemorySession.repair(path)
    assert report["set_aside"] == ["rollback.json"]
    with MemorySession.open(path, model) as s:
        assert s.event_count == 3 and [x["number"] for x in s.snapshots()] == [0, 1, 2]


def test_repair_needs_the_lock_and_a_sound_session_json(chain, model, tmp_path):
    path = copy_of(chain, tmp_path)
    with MemorySession.open(path, model):
        with pytest.raises(SessionLockedError):
            MemorySession.repair(path)
    meta = path / "session.json"
    meta.write_text(meta.read_text().replace('"d_state": 4', '"d_state": 5'))
    with pytest.raises(CorruptFileError, match="session.json"):
        MemorySession.repair(path)
    with pytest.raises(ConfigError, match="timeout"):
        MemorySession.repair(path, timeout=float("nan"))


# ------------------------------------------------------------------------------------------------------
# retention and compaction


def test_retention_keeps_newest_snapshots_and_every_event(model, tmp_path):
    path = tmp_path / "s"
    with MemorySession.open(path, model, create=True, keep_snapshots=3) as s:
        for i in range(6):
            s.observe(make_event(i))
            assert s.save() == i + 1
        assert [x["number"] for x in s.snapshots()] == [0, 4, 5, 6]
        assert s.events() == [make_event(i) for i in range(6)]
        with pytest.raises(InputError, match="no snapshot 2"):
            s.rollback(2)
        s.rollback(5)
        assert s.event_count == 5 and s.events() == [make_event(i) for i in range(5)]
        junk = path / ".snapshot-00000009.safetensors.99999999.abcdefgh.tmp"
        junk.write_bytes(b"x" * 10)
        done = s.compact(keep=1)
        assert done["removed_snapshots"] == [4] and done["kept_snapshots"] == [0, 5]
        assert done["removed_temp_files"] == [junk.name] and done["bytes_freed"] > 0
        with pytest.raises(ConfigError, match="keep"):
            s.compact(keep=0)
    with MemorySession.open(path, model) as s:
        assert same_state(s.state, replay_state(model, [make_event(i) for i in range(5)]))
    with pytest.raises(ConfigError, match="keep_snapshots"):
        MemorySession.open(path, model, keep_snapshots=0)
    junk.write_bytes(b"x")
    MemorySession.open(path, model).close()  # a writer clears what killed atomic writes left
    assert not junk.exists()


def test_old_logs_are_merged_and_every_event_stays(model, tmp_path, monkeypatch):
    monkeypatch.setattr(session_module, "MERGE_LOGS_AT", 3)
    path = tmp_path / "s"
    events = [make_event(i) for i in range(12)]
    with MemorySession.open(path, model, create=True, keep_snapshots=2) as s:
        for i in range(10):
            s.observe(events[i])
            s.save()
        # snapshots 0, 9, 10; logs 0 (0-2), 3 (3-5), 6 (6-8), 9, 10: a file per three saves, not one per save
        assert sorted(p.name for p in path.glob("log-*.wal")) == [f"log-{k:08d}.wal" for k in (0, 3, 6, 9, 10)]
        assert s.events() == events[:10]
        s.observe(events[10])
    with MemorySession.open(path, model, mode="r") as r:
        assert r.events() == events[:11] and same_state(r.state, replay_state(model, events[:11]))
    with MemorySession.open(path, model) as s:
        done = s.compact(keep=1)  # snapshots 0 and 10 stay; everything before 10 becomes one log
        assert done["removed_snapshots"] == [9] and done["merged_logs"] == [[0, 9]]
        s.observe(events[11])
    assert sorted(p.name for p in path.glob("log-*.wal")) == ["log-00000000.wal", "log-00000010.wal"]
    with MemorySession.open(path, model) as s:
        assert s.events() == events and same_state(s.state, replay_state(model, events))
        s.rollback(0)  # snapshot 0 is always kept
        assert s.event_count == 0 and s.events() == []
    # a merge a crash stopped: the merged log is written, one log it replaced is still there
    path = tmp_path / "t"
    monkeypatch.setattr(session_module, "MERGE_LOGS_AT", 64)
    with MemorySession.open(path, model, create=True, keep_snapshots=1) as s:
        for i in range(4):
            s.observe(events[i])
            s.save()
        leftover = (path / "log-00000001.wal").read_bytes()
        s.compact()
    (path / "log-00000001.wal").write_bytes(leftover)
    with MemorySession.open(path, model, mode="r") as r:
        assert r.events() == events[:4]
    with MemorySession.open(path, model) as s:
        assert s.events() == events[:4]
    assert not (path / "log-00000001.wal").exists()
    # damage in a merged log is found and repaired like any other
    log = path / "log-00000000.wal"
    data = bytearray(log.read_bytes())
    data[-2] ^= 0x08
    log.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="log-00000000.wal: byte"):
        MemorySession.open(path, model, mode="r")
    report = MemorySession.repair(path)
    with MemorySession.open(path, model) as s:
        assert s.event_count == 4 and s.info()["lost_events"] == report["lost_events"] == [[3, 4]]
        assert s.events() == events[:3] and same_state(s.state, replay_state(model, events[:4]))


KILL_CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)
from seqlab.domains import model_from_checkpoint
from seqlab.domains.memory import Event
from seqlab.domains.session import MemorySession
model, _ = model_from_checkpoint(sys.argv[1])
s = MemorySession.open(sys.argv[2], model, create=True, keep_snapshots=1)
n = s.event_count
print(json.dumps({"ready": n}), flush=True)
while True:
    n = s.observe([Event("user", f"event {i}", float(i)) for i in range(n, n + 1 + n % 3)])
    print(json.dumps({"acked": n}), flush=True)
    if n % 2:
        s.save()
"""


def test_kill_9_while_observing_saving_and_pruning_loses_nothing(model_file, model, tmp_path):
    rng = random.Random(5)
    path = tmp_path / "s"
    for _trial in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(model_file), str(path)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        first = json.loads(proc.stdout.readline() or "{}")
        assert "ready" in first, proc.stderr.read()
        time.sleep(rng.uniform(0.2, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        acked = max([json.loads(x)["acked"] for x in stdout.splitlines() if "acked" in x], default=first["ready"])
        with MemorySession.open(path, model) as s:
            events = s.events()
            assert s.event_count == len(events) >= acked
            assert events == [Event("user", f"event {i}", float(i)) for i in range(len(events))]
            assert same_state(s.state, replay_state(model, events))
            assert len(s.snapshots()) <= 3  # 0, the newest, and one a kill may have left before its pruning
    assert acked > 2


# ------------------------------------------------------------------------------------------------------
# failures that leave no trace, or say exactly what was kept


def seqlab(capsys, *args) -> tuple[int, str, str]:
    try:
        code = cli.main(["memory", *map(str, args)])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_writer_checks_the_folder_before_logging(flat, model, tmp_path, monkeypatch, capsys):
    path = copy_of(flat, tmp_path)
    log = path / "log-00000000.wal"
    before = log.read_bytes()
    real = os.access
    monkeypatch.setattr(session_module.os, "access", lambda p, m: False if Path(p) == path else real(p, m))
    with pytest.raises(PermissionError, match="not writable"):
        MemorySession.open(path, model)
    code, _, err = seqlab(capsys, "observe", path, "--content", "hi")
    assert code == 2 and "not writable" in err and "mode='r'" not in err and len(err.strip().splitlines()) == 1
    assert log.read_bytes() == before
    with MemorySession.open(path, model, mode="r") as r:  # reading still works
        assert r.event_count == 5


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_observe_into_a_read_only_folder_logs_nothing(flat, tmp_path, capsys):
    path = copy_of(flat, tmp_path)
    log = path / "log-00000000.wal"
    before = log.read_bytes()
    os.chmod(path, 0o555)
    try:
        code, _, err = seqlab(capsys, "observe", path, "--content", "hi")
    finally:
        os.chmod(path, 0o755)
    assert code == 2 and log.read_bytes() == before, err


def test_a_failed_snapshot_after_logging_says_the_events_were_kept(flat, model, tmp_path, monkeypatch, capsys):
    """Failed before: the disk error escaped as a traceback, and a retry observed the events twice."""
    path = copy_of(flat, tmp_path)

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(session_module, "_write_snapshot", full)
    code, out, err = seqlab(capsys, "observe", path, "--content", "remember me", "--time", "9")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "kept in the log (6 in all; do not observe them again)" in err and "No space left" in err
    monkeypatch.undo()
    with MemorySession.open(path, model) as s:
        assert s.events() == EVENTS[:5] + [Event("user", "remember me", 9.0)]
        assert s.save() == 2  # the failed save's log is there, empty: numbers go on


# ------------------------------------------------------------------------------------------------------
# the command line


def test_cli_speaks_cli_and_repairs(flat, model, tmp_path, capsys):
    path = copy_of(flat, tmp_path)
    with MemorySession.open(path, model):
        code, _, err = seqlab(capsys, "observe", path, "--content", "hi")
    assert code == 2 and "--timeout SECONDS" in err and "timeout=" not in err  # failed before: "pass timeout="
    code, _, err = seqlab(capsys, "observe", tmp_path / "nothing", "--model", session_model(path), "--content", "x")
    assert code == 2 and "--create" in err and "create=True" not in err
    log = path / "log-00000000.wal"
    data = bytearray(log.read_bytes())
    data[-1] ^= 0x20
    log.write_bytes(bytes(data))
    code, _, err = seqlab(capsys, "info", path)
    assert code == 2 and "seqlab memory repair SESSION" in err and "MemorySession" not in err
    code, out, err = seqlab(capsys, "repair", path)
    assert code == 0 and "4 events follow from snapshot 0" in out and "damaged-" in out, err
    code, out, _ = seqlab(capsys, "info", path)
    assert code == 0 and json.loads(out)["events"] == 4
    code, out, _ = seqlab(capsys, "repair", path, "--json")
    assert code == 0 and json.loads(out)["repaired"] is False
    code, out, _ = seqlab(capsys, "compact", path, "--keep", "2")
    assert code == 0 and "removed 0 snapshots" in out


def session_model(path: Path) -> str:
    return json.loads((path / "session.json").read_text())["model_file"]["path"]


BAD_NUMBERS = [
    (["observe", "s", "--content", "x", "--time"], ["nan", "inf", "-inf", "1e300", "abc"]),
    (["observe", "s", "--content", "x", "--timeout"], ["-1", "nan", "inf", "1e30", "abc"]),
    (["ask", "s", "--max-new-tokens"], ["0", "-1", "1e-300", str(10**30), "abc", "2.5"]),
    (["ask", "s", "--temperature"], ["-1", "nan", "inf", "1e-300", "1e30", "abc"]),
    (["ask", "s", "--top-k"], ["0", "-3", "257", str(10**30), "abc"]),
    (["ask", "s", "--top-p"], ["0", "-0.5", "1.5", "nan", "1e30", "abc"]),
    (["ask", "s", "--seed"], ["-1", str(10**30), "1e3", "abc"]),
    (["ask", "s", "--time"], ["nan", "-1e300"]),
    (["rollback", "s", "--timeout", "1"], ["-1", str(10**30), "1.5", "abc"]),
    (["compact", "s", "--keep"], ["0", "-1", "1e-300", str(10**30), "abc"]),
    (["repair", "s", "--timeout"], ["-5", "nan", "inf", "1e30"]),
]


@pytest.mark.parametrize("argv,values", BAD_NUMBERS, ids=[f"{a[0]} {a[-1]}" for a, _ in BAD_NUMBERS])
def test_cli_numbers_out_of_range_exit_2_in_one_line(argv, values, capsys):
    for value in values:
        code, _, err = seqlab(capsys, *(argv + ["--", value] if argv[0] == "rollback" else argv + [value]))
        option = "snapshot" if argv[0] == "rollback" else argv[-1]
        assert code == 2 and option in err and "Traceback" not in err, (argv, value, err)
        assert len(err.strip().splitlines()) == 1, err


def test_ask_generates_only_content_and_stops_at_the_end_byte(flat, model):
    """Failed before: sampling could give the framing bytes (an empty or undecodable reply)."""
    specials = set(MemoryStreamAdapter.special_ids) - {MemoryStreamAdapter.eos_id}
    sampled = []
    with MemorySession.open(flat, model, mode="r") as r:
        for seed in range(4):
            answer = r.ask("?", 48, temperature=1.5, seed=seed, time=1.0)
            assert not specials & set(answer.tokens), answer.tokens
            assert MemoryStreamAdapter.eos_id not in answer.tokens[:-1]
            sampled += r.ask("?", 48, temperature=1.5, seed=seed, time=1.0, allow_specials=True).tokens
    assert specials & set(sampled)  # allow_specials lets them through (the test can tell the two apart)
