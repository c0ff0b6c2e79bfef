"""``seqlab bench`` end to end in a subprocess: --quick prints the machine and one row per peer, with a computed
max difference from the float64 reference; bad settings exit 2 with one line. Timings are never asserted."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "seqlab.cli", "bench", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The text and JSON runs and a refused one, at once (each a fresh interpreter)."""
    cwd = tmp_path_factory.mktemp("bench")
    procs = {
        "text": start("--quick", "--threads", 1, cwd=cwd),
        "json": start("--quick", "--threads", 1, "--ssm", "mamba2", "--length", 100, "--json", cwd=cwd),
        "bad": start("--quick", "--length", 0, cwd=cwd),
    }
    return {name: (*p.communicate(timeout=300), p.returncode) for name, p in procs.items()}


def direct_max_diff(ssm: str, length: int) -> float:
    """torch fast path vs its float64 reference twin on the bench's weights and input, computed here."""
    import torch

    from seqlab import BackboneConfig, LanguageModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = LanguageModel(BackboneConfig(d_model=64, n_layer=2, ssm=ssm), vocab_size=256).eval()
        ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            fast = model.set_backend("chunked")(ids, return_state=False).logits
            ref = copy.deepcopy(model).double().set_backend("ref")(ids, return_state=False).logits
        return float((fast.double() - ref).abs().max())
    finally:
        torch.set_num_threads(threads)


def test_quick_prints_the_machine_and_a_row_per_peer(runs):
    stdout, stderr, code = runs["text"]
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores available" in lines[0] and "torch threads 1" in lines[0]
    assert lines[1].startswith("config: LanguageModel vocab 256, d_model 64, 2 layers; batch 1 x length 256")
    rows = {}
    for line in lines:
        match = re.match(r"^(mamba[12])\s+(.+?)\s{2,}([\d,]+)\s+([\d.]+)x\s+(\S+)$", line)
        if match:
            rows[match[1], match[2]] = (float(match[3].replace(",", "")), float(match[4]), match[5])
    for ssm in ("mamba1", "mamba2"):
        rate, ratio, diff = rows[ssm, "torch (cpu, fp32)"]
        assert rate > 0 and ratio == 1.0 and 0 < float(diff) < 1e-4
        rate, ratio, diff = rows[ssm, "float64 ref (cpu)"]
        assert rate > 0 and ratio > 0 and float(diff) == 0.0
        # the printed difference is the one computed straight from the library on the same weights and input
        assert float(rows[ssm, "torch (cpu, fp32)"][2]) == pytest.approx(direct_max_diff(ssm, 256), rel=0.02)


def test_json_rows_are_consistent(runs):
    stdout, stderr, code = runs["json"]
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["cores"] >= 1
    rows = {r["peer"]: r for r in result["rows"]}
    fast, ref = rows["torch (cpu, fp32)"], rows["float64 ref (cpu)"]
    assert all(r["ssm"] == "mamba2" and r["length"] == 100 and r["batch"] == 1 for r in rows.values())
    for r in rows.values():
        assert r["tokens_per_s"] == pytest.approx(100 / r["seconds"])
        assert r["vs_torch_cpu"] == pytest.approx(fast["seconds"] / r["seconds"])
    assert fast["vs_torch_cpu"] == 1.0 and ref["max_abs_diff_vs_ref"] == 0.0
    assert fast["max_abs_diff_vs_ref"] == pytest.approx(direct_max_diff("mamba2", 100), rel=0.02)


def test_bad_settings_exit_2_with_one_line(runs, capsys):
    stdout, stderr, code = runs["bad"]
    assert (
        code == 2
        and not stdout
        and stderr.strip()
        == (
            "seqlab bench: error: argument --length: must be an integer "
            "in [1, 1073741824], got '0' (see 'seqlab bench --help')"
        )
    )

    from seqlab.cli import main

    for args, message in (
        (("--ssm", "mamba4"), "argument --ssm: invalid choice: 'mamba4'"),
        (("--repeats", "0"), "argument --repeats: must be an integer in [1, 1000], got '0'"),
        (("--threads", "0"), "argument --threads: must be an integer in [1, 1024], got '0'"),
        (("--batch-size", "x"), "argument --batch-size: must be an integer in [1, 1048576], got 'x'"),
        (("--d-model", "1e300"), "argument --d-model: must be an integer in [1, 65536]"),
        (("--quick", "--ssm", "mamba2", "--headdim", "48"), "divisible by --headdim (48)"),
    ):
        assert main(["bench", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("seqlab bench: error: ") and message in err, err
