"""bench/cpu_forward.py --quick runs end to end and prints its tables (no timing assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cpu_forward.py"


def test_cpu_forward_quick_runs_and_prints_the_table():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # One thread: stable on a shared machine. About 20-30 s on 2 idle cores; the timeout is only a backstop.
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("machine:")
    assert "| model | L | seqlab tok/s | HF tok/s | seqlab / HF |" in out
    assert "| Mamba-1 | 128 |" in out and "| Mamba-2 | 256 |" in out
    assert "seqlab vs HF logits" in out
    assert "| tokens | peak RSS (MiB) |" in out and "peak RSS 16,384 / 4,096 tokens" in out
