"""docs/cli.md's walkthrough runs as written: its ```bash blocks, in order, in an empty folder, with this
environment's `seqlab` and `python` first on the PATH. Then the files it promises are checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("zarr")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)


def test_cli_walkthrough_runs_as_written(tmp_path):
    if not (BIN / "seqlab").exists():
        pytest.skip(f"no seqlab command beside {sys.executable} (install the project: make install)")
    blocks = bash_blocks(ROOT / "docs" / "cli.md")
    assert len(blocks) >= 7
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "RAY_DEDUP_LOGS": "0",
    }
    outputs = []
    for i, block in enumerate(blocks):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"block {i + 1}:\n{block}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        outputs.append(result.stdout)

    # what the walkthrough promises
    assert re.search(r"^corpus\t60\d\d\d\ttokens\tuint8\tbytes\tcomplete$", outputs[0], re.M), outputs[0]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["summary"]["steps"] == 80  # train, then --resume to 80
    assert (tmp_path / "run" / "model.safetensors").is_file()
    eval_line = next(line for line in outputs[2].splitlines() if line.startswith("held_out"))
    bits = float(re.search(r"(\d+\.\d+)", eval_line.split("\t", 1)[1]).group(1))
    assert 0 < bits < 8.0, eval_line  # below the uniform baseline
    assert (tmp_path / "scores.zarr").is_dir() and "corpus" in outputs[3]  # score job output
    info = json.loads(outputs[4][outputs[4].index("{\n") if "{\n" in outputs[4] else outputs[4].rindex("{") :])
    assert info["events"] == 1  # one observed event; `ask` works on a copy of the state
    # the MoE model: its summary counts fewer active parameters than total ones
    moe = dict(line.split(None, 1) for line in outputs[5].splitlines() if line.strip() and " " in line)
    assert moe["config"].endswith("ffn moe") and moe["moe"].startswith("4 experts, top-1, d_expert 64"), outputs[5]
    total, active = re.fullmatch(r"([\d,]+) total, ([\d,]+) active per token", moe["parameters"]).groups()
    assert int(active.replace(",", "")) < int(total.replace(",", "")), moe["parameters"]
    assert "tok/s" in outputs[6]
