"""Compiled CPU kernels: C sources in ``csrc/``, built on first use with the machine's C compiler and cached.

Why plain C through ctypes, and not the other mechanisms issue 24 lists (measured on the 2-core VM, see
docs/benchmarks.md, "Compiled CPU kernels"):

- A torch C++ extension (``torch.utils.cpp_extension``) compiles against torch's headers: about a minute per
  extension on 2 cores, on first use in every fresh environment (and in every CI run). These kernels need no
  torch API at all (pointers, sizes, strides), so a C file that compiles in about a second does the same job.
- numba would add a second compiler stack (llvmlite) to the install, JIT-compiles each kernel in every new
  process, and brings its own thread pool beside torch's.
- torch.compile / inductor needs the same C compiler on CPU, and it does not turn a recurrence over positions
  into one loop with the state in registers: the scan stays a sequence of passes over memory.

The library links ``-fopenmp``. torch's wheel already loaded its ``libgomp.so.1`` into the process, and the
dynamic linker resolves our library's ``libgomp.so.1`` to that same copy, so the kernels share torch's OpenMP
thread pool instead of starting a second team that would fight it for the cores.

Where no compiler works (or ``SEQLAB_NATIVE=0``), :func:`native_library` returns None, the ``"auto"`` backend
picks the vectorised PyTorch path, and a one-line :class:`NativeFallbackWarning` says why, once per process.

The cache (``$SEQLAB_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/seqlab/native``, else ``~/.cache/seqlab/native``)
holds one shared library per source, named by a hash of the source, the shared header, the compiler's version
and flags and this CPU's feature flags (the build uses ``-march=native``), so a changed source or another CPU
never reuses a stale build. Builds are written to a temporary name and renamed into place, so two processes
building at once (pytest-xdist workers) both end with a complete library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = [
    "NativeFallbackWarning",
    "native_available",
    "native_library",
    "native_unavailable_reason",
    "num_threads",
    "ptr",
]

CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = ("seqlab_native.h", "seqlab_gemm.h", "seqlab_mamba3_head.h", "seqlab_sample.h")
BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-Wall")
ARCH_FLAGS = ("-march=native",)

_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}
_warned = False


class NativeFallbackWarning(RuntimeWarning):
    """The compiled CPU kernels cannot be built or loaded here; the vectorised PyTorch path runs instead."""


def _disabled() -> str | None:
    value = os.environ.get("SEQLAB_NATIVE", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "SEQLAB_NATIVE=0 is set"
    return None


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, else Python's own build compiler, else ``cc``/``gcc``/``clang`` on PATH."""
    candidates = []
    if os.environ.get("CC"):
        candidates.append(os.environ["CC"])
    cfg = sysconfig.get_config_var("CC")
    if cfg:
        candidates.append(cfg)
    candidates += ["cc", "gcc", "clang"]
    for cand in candidates:
        argv = shlex.split(cand)
        if argv and shutil.which(argv[0]):
            return argv
    return None


def cache_dir() -> Path:
    if os.environ.get("SEQLAB_NATIVE_CACHE"):
        return Path(os.environ["SEQLAB_NATIVE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "seqlab" / "native"


@functools.cache
def _compiler_identity(cc: tuple[str, ...]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cc[0]
    except Exception:  # a compiler that cannot say its version is caught when it builds
        return cc[0]


@functools.cache
def _cpu_identity() -> str:
    """This CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(name: str, cc: list[str]) -> Path:
    source = CSRC / name
    parts = [source.read_bytes()] + [(CSRC / h).read_bytes() for h in HEADERS if (CSRC / h).exists()]
    errors = []
    for flags in (BASE_FLAGS + ARCH_FLAGS, BASE_FLAGS):
        key = hashlib.sha256()
        for p in parts:
            key.update(p)
        for s in (_compiler_identity(tuple(cc)), " ".join(flags), platform.machine(), _cpu_identity(), sys.platform):
            key.update(s.encode())
        target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            cmd = [*cc, *flags, "-I", str(CSRC), str(source), "-o", tmp, "-lm"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                errors.append(f"{' '.join(cmd)}: {res.stderr.strip()[-2000:]}")
                continue
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors) or "the compiler failed")


def native_library(name: str) -> ctypes.CDLL | None:
    """The compiled library of ``csrc/<name>`` (built on first use), or None where it cannot be built or loaded
    (the reason: :func:`native_unavailable_reason`)."""
    with _lock:
        if name in _libraries:
            return _libraries[name]
        lib = None
        reason = _disabled()
        if reason is None:
            cc = compiler()
            if cc is None:
                reason = "no C compiler found (set CC, or install gcc or clang)"
            else:
                try:
                    lib = ctypes.CDLL(str(_build(name, cc)))
                except Exception as exc:  # a build or load failure means: run the PyTorch path
                    reason = f"building csrc/{name} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        _libraries[name] = lib
        if lib is None:
            _reasons[name] = reason or "unknown"
            _notice(reason or "unknown")
        return lib


def _notice(reason: str) -> None:
    global _warned
    if _warned or _disabled():
        return
    _warned = True
    warnings.warn(
        f"seqlab: compiled CPU kernels unavailable ({reason}); using the vectorised PyTorch path",
        NativeFallbackWarning,
        stacklevel=3,
    )


def native_available(name: str = "scan.c") -> bool:
    """True when the compiled library of ``csrc/<name>`` builds and loads here."""
    return native_library(name) is not None


def native_unavailable_reason(name: str = "scan.c") -> str | None:
    """Why :func:`native_library` gave None for ``name`` (None when it loads, or was not tried yet)."""
    return _reasons.get(name)


def num_threads() -> int:
    """The thread count the kernels use: torch's, so ``torch.set_num_threads`` governs both."""
    return max(1, torch.get_num_threads())


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's data pointer for a ctypes call (NULL for None)."""
    return ctypes.c_void_p(0 if t is None else t.data_ptr())
