"""Every training example runs end to end with a tiny budget (the docs quote their full-budget output)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = {
    "train_bytes.py": (["--steps", "3", "--out", "{out}"], "bits"),
    "train_dna.py": (["--steps", "3"], "held-out bits/base"),
    "train_audio.py": (["--steps", "3", "--seconds", "0.05", "--out", "{out}"], "continuation.wav"),
    "train_video.py": (["--steps", "3", "--out", "{out}"], "classify (bidirectional)"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path):
    args, expect = CASES[script]
    args = [a.format(out=tmp_path / "out") for a in args]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-2000:]
