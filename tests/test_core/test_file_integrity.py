"""Files seqlab writes for states, models and checkpoints: every byte is checksummed, a damaged file is a
CorruptFileError naming it (never a silent load, never a raw json/struct/safetensors error), atomic writes clean up
after killed writers and respect the umask."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqlab.io
from seqlab.errors import CorruptFileError
from seqlab.io import atomic_write_bytes, remove_stale_temps


def _temps(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------------
# atomic writes


def test_stale_temps_of_dead_writers_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".a.bin.{dead}.abcd1234.tmp"
        held = tmp_path / f".a.bin.{live.pid}.efgh5678.tmp"
        old_style = tmp_path / ".a.bin.zz99yy88.tmp"      # an older seqlab's temp name (no pid), an hour old
        fresh_old_style = tmp_path / ".a.bin.qq11rr22.tmp"  # ... and one just made: perhaps a live old writer
        other = tmp_path / f".a.bin.x.{dead}.abcd1234.tmp"  # a temp of another target, a.bin.x
        for p in (stale, held, old_style, fresh_old_style, other):
            p.write_bytes(b"partial")
        os.utime(old_style, (time.time() - 3600, time.time() - 3600))
        atomic_write_bytes(target, b"new")
        assert target.read_bytes() == b"new"
        assert not stale.exists() and not old_style.exists()
        assert held.exists() and fresh_old_style.exists() and other.exists()
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(target) == [held]  # its writer is gone now


_WRITER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("seqlab_io", sys.argv[3])  # seqlab.io alone: no torch import
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    path, n = sys.argv[1], int(sys.argv[2])
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        io.atomic_write_bytes(path, bytes([i % 251]) * n)
""")


def test_kill_9_mid_write_leaves_a_whole_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "big.bin"
    n = 4 << 20
    atomic_write_bytes(target, b"\x00" * n)
    for delay in (0.02, 0.1, 0.25):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(n), seqlab.io.__file__], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == n and data == data[:1] * n  # the old file or a new one, whole
    atomic_write_bytes(target, b"done")
    assert target.read_bytes() == b"done"
    assert _temps(tmp_path, "big.bin") == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_follows_the_umask_like_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "new.bin", b"x")
        with open(tmp_path / "plain.bin", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777
    os.chmod(tmp_path / "new.bin", 0o640)  # an existing file keeps its mode, as with open(path, "wb")
    atomic_write_bytes(tmp_path / "new.bin", b"y")
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_write_into_a_read_only_folder_fails_and_keeps_the_old_file(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    atomic_write_bytes(folder / "f", b"old")
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            atomic_write_bytes(folder / "f", b"new")
    finally:
        folder.chmod(0o700)
    assert (folder / "f").read_bytes() == b"old" and _temps(folder, "f") == []
