"""Ingest and stream long byte sequences through a small model: elements/s and peak RSS at two sizes.

Issue 6: ingest a 10M-element sequence into a sequence store and stream it through a small model; report
elements/s and peak RSS at 1M vs 10M elements (target: the 10M peak within 10% of the 1M peak).

Model: ``ByteAdapter().build_model(BackboneConfig(d_model=64, n_layer=2))`` (Mamba-1, d_state 16, expand 2,
vocab 256), fp32, random weights (seed 0). Data: random bytes (seed = size) in a file, written by the parent.

Each size runs two fresh subprocesses, one per phase, so neither phase's peak hides the other's:

* ingest: ``pipelines.store.ingest(store, file, ByteAdapter())`` into a new Zarr v3 store (default chunking:
  2 MB chunks, zstd; ingest window 1 Mi bytes; sha256 of the source included);
* stream: ``seqlab.pipelines.stream(model, store, name, window=...)`` over the whole sequence, threading the
  state, dropping each window's logits (the next window is prefetched in a background thread as usual); the
  final ``state.position`` is checked against the size.

Each subprocess reports its own peak RSS (getrusage ru_maxrss; /proc VmHWM as a cross-check) and its RSS
before the phase (torch, zarr and the model loaded). A small launcher sits between this process and the
measured one, so the measured ru_maxrss does not inherit this process's high-water mark.

    python bench/stream_scale.py                   # 1M vs 10M elements: about 2-4 minutes on 2 idle cores
    python bench/stream_scale.py --quick           # 50k vs 200k, a smoke test in well under 30 s
    python bench/stream_scale.py --sizes 1000000 4000000 --window 8192 --threads 1

On a machine shared with other busy processes, multi-threaded torch timings become erratic (a 2-thread run
next to another busy process did 116k el/s at 1M, then had not finished 10M after 5 minutes: under 35k el/s);
``--threads 1`` gives stable numbers there (about 3 minutes for the default sizes at ~50-65k el/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from _machine import machine_line, vm_hwm_kib  # bench/ is on sys.path when a bench runs

D_MODEL = 64
N_LAYER = 2
TARGET = 1.10  # peak RSS at the larger size / at the smaller size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        metavar=("SMALL", "LARGE"),
        help="sequence lengths in elements (default 1000000 10000000)",
    )
    p.add_argument("--window", type=int, default=16384, help="stream window in elements (default 16384)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--workdir", help="where the files and stores go (default: a temporary directory, removed)")
    p.add_argument("--child", nargs=3, metavar=("PHASE", "FILE", "STORE"), help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [50_000, 200_000] if args.quick else [1_000_000, 10_000_000]
    if args.quick and args.window == 16384:
        args.window = 8192
    if args.window <= 0 or any(n < 2 for n in args.sizes):
        p.error("--window must be positive and sizes at least 2")
    return args


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# --------------------------------------------------------------------------------------------------
# the measured subprocesses


def child(phase: str, path: str, store_path: str, window: int) -> None:
    from seqlab.config import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines import stream
    from seqlab.pipelines.store import SequenceStore, ingest

    adapter = ByteAdapter()
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=D_MODEL, n_layer=N_LAYER)).eval()
    size = os.path.getsize(path)
    result = {"phase": phase, "elements": size}
    if phase == "ingest":
        store = SequenceStore(store_path, "w")
        result["before_kib"] = _peak_kib()
        start = time.perf_counter()
        (done,) = ingest(store, path, adapter, names=["seq"])
        result["seconds"] = time.perf_counter() - start
        if done.info.length != size or not done.info.complete:
            raise SystemExit(
                f"ingest stored {done.info.length} elements (complete={done.info.complete}), expected {size}"
            )
    else:
        store = SequenceStore(store_path, "r")
        with torch.no_grad():  # one warm-up window, outside the timing (stream runs under no_grad itself)
            model(torch.randint(0, 256, (1, min(window, size))), return_state=True)
        result["before_kib"] = _peak_kib()
        state, windows = None, 0
        start = time.perf_counter()
        for step in stream(model, store, "seq", window=window):
            state = step.state  # the logits (step.output) are dropped here
            windows += 1
        result["seconds"] = time.perf_counter() - start
        if state is None or state.position != size:
            raise SystemExit(f"stream ended at position {getattr(state, 'position', None)}, expected {size}")
        result["windows"] = windows
    result["peak_kib"] = _peak_kib()
    result["vm_hwm_kib"] = vm_hwm_kib()
    print(json.dumps(result))


# Linux carries the high-water mark of the memory a process had before exec into its ru_maxrss, and a child
# made by fork/vfork starts from its parent's: a tiny launcher in between makes the measured process a
# grandchild whose ru_maxrss starts from the launcher's few MiB (as in bench/cpu_forward.py).
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def run_child(args, phase: str, path: str, store_path: str) -> dict:
    cmd = [
        sys.executable,
        "-S",
        "-c",
        _LAUNCHER,
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        phase,
        path,
        store_path,
        "--window",
        str(args.window),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{phase} subprocess for {path} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_random_bytes(path: str, size: int) -> None:
    gen = np.random.default_rng(size)
    with open(path, "wb") as handle:
        left = size
        while left:
            n = min(left, 1 << 22)
            handle.write(gen.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n


def mib(kib) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        child(*args.child, window=args.window)
        return
    print(machine_line())
    print(
        f"config: ByteAdapter model, Mamba-1 d_model {D_MODEL}, {N_LAYER} layers, d_state 16, expand 2, vocab 256, "
        f"fp32, batch 1; random bytes; store: default chunks (2 MB, zstd); stream window {args.window}; "
        f"each phase of each size in a fresh subprocess"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print()
    workdir = args.workdir or tempfile.mkdtemp(prefix="seqlab-stream-scale-")
    os.makedirs(workdir, exist_ok=True)
    results = []
    try:
        for size in args.sizes:
            path = os.path.join(workdir, f"bytes-{size}.bin")
            store_path = os.path.join(workdir, f"store-{size}.zarr")
            write_random_bytes(path, size)
            ing = run_child(args, "ingest", path, store_path)
            print(
                f"  {size:,} elements: ingest {ing['seconds']:.2f} s ({size / ing['seconds']:,.0f} el/s), "
                f"peak RSS {mib(ing['peak_kib'])} MiB",
                flush=True,
            )
            st = run_child(args, "stream", path, store_path)
            print(
                f"  {size:,} elements: stream {st['seconds']:.1f} s ({size / st['seconds']:,.0f} el/s), "
                f"peak RSS {mib(st['peak_kib'])} MiB",
                flush=True,
            )
            results.append((size, ing, st))
            os.remove(path)
            shutil.rmtree(store_path, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("| elements | phase | seconds | elements/s | peak RSS (MiB) | VmHWM (MiB) | RSS before the phase (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for size, ing, st in results:
        for name, r in (("ingest", ing), ("stream", st)):
            print(
                f"| {size:,} | {name} | {r['seconds']:.2f} | {size / r['seconds']:,.0f} | {mib(r['peak_kib'])} | "
                f"{mib(r['vm_hwm_kib'])} | {mib(r['before_kib'])} |"
            )
    (small, ing_s, st_s), (large, ing_l, st_l) = results
    print()
    for name, a, b in (("ingest", ing_s, ing_l), ("stream", st_s, st_l)):
        ratio = b["peak_kib"] / a["peak_kib"]
        verdict = "met" if ratio <= TARGET else "MISSED"
        print(
            f"{name}: peak RSS {large:,} / {small:,} elements = {ratio:.3f} (target <= {TARGET:.2f}: {verdict}); "
            f"elements/s {large:,} / {small:,} = {(large / b['seconds']) / (small / a['seconds']):.2f}"
        )


if __name__ == "__main__":
    main()
