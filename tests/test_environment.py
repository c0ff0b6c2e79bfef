"""The test environment and the checkout as an import location (issue 14).

- the suite never has the repository root or a test folder on sys.path (pytest's importlib mode);
- a fresh interpreter started in the repository root (which puts the root first on sys.path) imports transformers
  and seqlab's subpackages, and the bare names of our folders resolve to the installed packages of those names;
- the lock (requirements/dev-lock.txt) pins every requirement of `.[dev]` exactly, inside pyproject's ranges.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "domains", "pipelines")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _same(a, b) -> bool:
    try:
        return Path(a or ".").resolve() == Path(b).resolve()
    except OSError:
        return False


def test_the_suite_has_neither_the_root_nor_a_test_folder_on_sys_path():
    tests = ROOT / "tests"
    assert not [p for p in sys.path if p and Path(p).resolve().is_relative_to(tests)], sys.path
    # `python -m pytest` itself puts the working directory first; `make test` runs the pytest command, which does not
    started_with_m = "-m" in getattr(sys, "orig_argv", [])
    entries = [p for p in sys.path[1 if started_with_m else 0 :] if _same(p, ROOT)]
    assert not entries, f"the repository root is on sys.path: {sys.path}"


PROBE = r"""
import importlib, json, sys
out = {"path0": sys.path[0]}
import transformers
from transformers.models.mamba2 import modeling_mamba2  # noqa: F401  (transformers imports `kernels` from here)
import seqlab, seqlab.kernels, seqlab.domains, seqlab.pipelines
out["seqlab.kernels"] = seqlab.kernels.__file__
out["seqlab.domains"] = seqlab.domains.__file__
out["seqlab.pipelines"] = seqlab.pipelines.__file__
out["selective_scan"] = callable(seqlab.kernels.selective_scan)
for name in ("kernels", "domains", "pipelines"):
    module = importlib.import_module(name)
    if module.__file__ is not None:
        out[name] = module.__file__
    else:  # what a stray folder is to Python; transformers' availability check reads it as "not installed"
        assert getattr(module, "__version__", "N/A") == "N/A"
        try:
            module.anything
        except AttributeError as exc:
            out[name] = "stray folder: " + str(exc)
print(json.dumps(out))
"""


def _probe(prefix: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run(
        [sys.executable, "-c", prefix + PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _installed(name: str) -> str | None:
    """Where the package ``name`` is found on sys.path without the checkout's root: what the root must not hide."""
    spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if not _same(p, ROOT)])
    return None if spec is None or spec.origin is None else spec.origin


def _check_bare_names(out: dict) -> None:
    for name in FOLDERS:
        want = _installed(name)
        if want is None:  # nothing installed: an empty namespace package, as for any folder, that says why
            assert out[name].startswith("stray folder: "), out[name]
            assert str(ROOT / name) in out[name] and f"seqlab.{name}" in out[name], out[name]
        else:
            assert Path(out[name]).resolve() == Path(want).resolve(), (name, out[name], want)
            assert Path(out[name]).resolve() != ROOT / name / "__init__.py", out[name]


def test_a_python_started_in_the_root_imports_transformers_seqlab_and_the_real_kernels_package():
    pytest.importorskip("transformers")
    out = _probe()
    assert _same(out["path0"], ROOT), out["path0"]  # the trap is really set: the root comes first
    for name in FOLDERS:
        assert Path(out[f"seqlab.{name}"]).resolve() == ROOT / name / "__init__.py"
    assert out["selective_scan"]
    _check_bare_names(out)


def test_the_pypi_kernels_package_is_what_import_kernels_gives_when_installed():
    """transformers >= 5.25 depends on the PyPI package `kernels`: with it installed, the root must not hide it."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed here")
    out = _probe()
    files = {str((Path(dist.locate_file(f))).resolve()) for f in dist.files or () if str(f).endswith("__init__.py")}
    assert str(Path(out["kernels"]).resolve()) in files, (out["kernels"], sorted(files)[:3])


def test_a_non_editable_install_run_from_the_root_still_finds_the_subpackages():
    """From the root, `import seqlab` finds the checkout's seqlab/ even when a non-editable copy is installed; the
    subpackages are then found beside it (seqlab/__init__.py). Simulated by taking the editable finder away."""
    pytest.importorskip("transformers")
    prefix = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in repr(h)]\n"
    )
    out = _probe(prefix)
    for name in FOLDERS:
        assert Path(out[f"seqlab.{name}"]).resolve() == ROOT / name / "__init__.py"
    _check_bare_names(out)


def _lock() -> dict[str, str]:
    pins = {}
    for number, line in enumerate((ROOT / "requirements" / "dev-lock.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==" and not req.marker, (
            f"requirements/dev-lock.txt:{number}: not an exact pin: {line!r}"
        )
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def test_the_lock_pins_every_requirement_of_dev_inside_pyprojects_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required by pyproject but not pinned in requirements/dev-lock.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"the lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )
    for tool in ("pip", "setuptools", "wheel"):  # what builds and installs the environment is pinned too
        assert tool in pins, tool
