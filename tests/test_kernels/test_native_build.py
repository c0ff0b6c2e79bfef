"""The compiled CPU kernels' build: cached by content, shared between processes, and a clean fallback to the
vectorised PyTorch path (with one notice) where no compiler works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import seqlab.kernels as K
from seqlab.kernels import _native

# The probe runs in a fresh interpreter (the build state is per process) and prints what it saw as JSON.
PROBE = textwrap.dedent(
    """
    import json, warnings
    import torch
    import seqlab.kernels as K
    from seqlab.kernels import _native
    from seqlab.testing import scan_inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picked = K.resolve_backend("auto", torch.zeros(1), op="selective_scan")
        inputs = scan_inputs(l=9, seed=1)
        y = K.selective_scan(**inputs)
        want = K.selective_scan(**inputs, backend="chunked")
        K.resolve_backend("auto", torch.zeros(1), op="ssd_scan")
    notices = [str(w.message) for w in caught if issubclass(w.category, _native.NativeFallbackWarning)]
    print(json.dumps({"picked": picked, "notices": notices, "close": bool(torch.allclose(y, want, atol=1e-5)),
                      "reason": _native.native_unavailable_reason("scan.c")}))
    """
)


def _probe(tmp_path, **env_changes) -> dict:
    # SEQLAB_NATIVE dropped unless a test sets it: `SEQLAB_NATIVE=0 make test` must not leak into these probes
    env = {**os.environ, "SEQLAB_NATIVE": None, "SEQLAB_NATIVE_CACHE": str(tmp_path / "cache"), **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_a_compiler_auto_runs_the_chunked_path_and_says_so_once(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    seen = _probe(tmp_path, PATH=str(empty), CC=None)
    assert seen["picked"] == "chunked"
    assert seen["close"]
    assert len(seen["notices"]) == 1, seen["notices"]
    assert "no C compiler found" in seen["notices"][0] and "vectorised PyTorch path" in seen["notices"][0]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.so"))


def test_a_compiler_that_fails_is_a_fallback_with_the_reason(tmp_path):
    seen = _probe(tmp_path, CC="false")
    assert seen["picked"] == "chunked"
    assert "building csrc/scan.c failed" in seen["reason"]
    assert len(seen["notices"]) == 1


def test_seqlab_native_0_turns_the_compiled_path_off_without_a_notice(tmp_path):
    seen = _probe(tmp_path, SEQLAB_NATIVE="0")
    assert seen["picked"] == "chunked" and seen["notices"] == [] and seen["close"]
    assert "SEQLAB_NATIVE=0" in seen["reason"]


needs_compiler = pytest.mark.skipif(_native.compiler() is None, reason="no C compiler on this machine")


@needs_compiler
def test_the_build_is_cached_by_content_and_reused_by_the_next_process(tmp_path):
    first = _probe(tmp_path)
    assert first["picked"] == "native" and first["notices"] == [] and first["close"]
    built = sorted((tmp_path / "cache").glob("scan-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = _probe(tmp_path)
    assert second["picked"] == "native"
    assert sorted((tmp_path / "cache").glob("scan-*.so")) == built and built[0].stat().st_mtime_ns == stamp
    # no temporary files are left behind
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


@needs_compiler
def test_two_processes_building_at_once_both_get_a_working_library(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SEQLAB_NATIVE"}
    env["SEQLAB_NATIVE_CACHE"] = str(tmp_path / "cache")
    procs = [
        subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        seen = json.loads(out.decode().strip().splitlines()[-1])
        assert seen["picked"] == "native" and seen["close"]


@needs_compiler
def test_a_changed_source_gets_its_own_build(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "seqlab_native.h").write_text((_native.CSRC / "seqlab_native.h").read_text())
    (csrc / "probe.c").write_text('#include "seqlab_native.h"\nSL_EXPORT int probe(void) { return 1; }\n')
    monkeypatch.setattr(_native, "CSRC", csrc)
    monkeypatch.delenv("SEQLAB_NATIVE", raising=False)
    monkeypatch.setenv("SEQLAB_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_libraries", {})
    assert _native.native_library("probe.c").probe() == 1
    (csrc / "probe.c").write_text('#include "seqlab_native.h"\nSL_EXPORT int probe(void) { return 2; }\n')
    monkeypatch.setattr(_native, "_libraries", {})
    assert _native.native_library("probe.c").probe() == 2
    assert len(list((tmp_path / "cache").glob("probe-*.so"))) == 2


def test_backend_native_is_refused_on_other_devices_and_where_it_cannot_build(monkeypatch):
    with pytest.raises(K.KernelBackendError, match="CPU tensors only"):
        K.resolve_backend("native", torch.zeros(1, device="meta"), op="selective_scan")
    monkeypatch.setattr(_native, "_libraries", {"scan.c": None})
    monkeypatch.setattr(_native, "_reasons", {"scan.c": "no C compiler found"})
    with pytest.raises(K.KernelBackendError, match="no C compiler found.*backend='chunked'"):
        K.resolve_backend("native", torch.zeros(1), op="selective_scan")
    assert K.resolve_backend("auto", torch.zeros(1), op="selective_scan") == "chunked"
