"""Ray batch scoring over many sequences vs an in-process loop on the same cores: throughput and Ray's overhead.

Issue 6: ``score`` over many sequences with 1 and 2 Ray workers (torch threads per worker set sensibly) vs an
in-process loop on the same cores; report throughput and Ray's overhead (target: <= 15% at equal cores).

Setup: ``--sequences`` random byte sequences of ``--length`` elements each in a sequence store (written by
``SequenceStore.write`` with ``ByteAdapter``), a small byte model (Mamba-1, d_model 64, 2 layers, random
weights, seed 0) saved with ``seqlab.checkpoint.save_model``. ``C`` = ``--threads`` cores (default: the cores
this process may use).

* in-process: one ``JobWorker`` (the class Ray's actors run, so the per-sequence work is the very same: load the
  model file, stream each sequence exactly with carried state in windows of ``--window`` via
  ``seqlab.pipelines.stream``, score, write each output into a Zarr store) called in a loop in this process, torch
  threads = C. Timed from the worker's construction (model load) to the last output.
* Ray, 1 worker: ``score(..., concurrency=1, num_cpus=C)`` (the worker sets C torch threads);
* Ray, C workers: ``score(..., concurrency=C, num_cpus=1)`` (1 torch thread each); skipped when C = 1.

``ray.init(num_cpus=C, include_dashboard=False)`` is called once, before the Ray runs, and timed on its own.
A Ray run's time is the wall time of its ``score`` call (driver checks, planning, actor start-up and model
loads, the work, the outputs). Throughput = scored positions / seconds. Overhead = 1 - Ray throughput /
in-process throughput; "with ray.init" adds the ``ray.init`` time to each Ray run. The summed bits of each Ray
run are checked against the in-process run's.

``--repeat R`` runs R rounds, each round the in-process loop then every Ray configuration (interleaved, so a
busy spell on a shared machine hits all of them); the table shows the median round of each and the range.
Where the time goes, per Ray run: "start-up" = from the ``score`` call until the first item began in a worker
(driver checks, Ray Data planning, the actor processes' start: Python, ``import ray.data``, torch and seqlab,
and the model load), "item s" = the mean wall time of one item inside the workers (``JobProgress.work_seconds``)
next to the same per-item time of the in-process loop; what is left is Ray's per-job tail and the gaps between
items. Load averages before and after are printed.

    python bench/ray_scale.py                      # 16 x 131072 elements, 3 rounds: a few minutes on 2 idle cores
    python bench/ray_scale.py --quick --threads 1  # a smoke test in under 30 s
    python bench/ray_scale.py --sequences 32 --length 65536 --window 8192 --repeat 5

On a machine shared with other busy processes, multi-threaded torch (the in-process loop and the 1-worker Ray
run with C > 1) becomes erratic: OpenMP threads spin and wait on each other when the cores are
oversubscribed. ``--threads 1`` gives stable numbers there (one core for every configuration, so the
C-worker run is skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from _machine import machine_line  # bench/ is on sys.path when a bench runs

D_MODEL = 64
N_LAYER = 2
TARGET = 0.15


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="few short sequences (smoke test)")
    p.add_argument("--sequences", type=int, help="number of sequences (default 16)")
    p.add_argument("--length", type=int, help="elements per sequence (default 131072)")
    p.add_argument("--window", type=int, default=16384, help="stream window in elements (default 16384)")
    p.add_argument(
        "--threads",
        type=int,
        help="cores C for every configuration: in-process torch threads, ray.init(num_cpus=C) "
        "(default: the cores this process may use)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        help="rounds of (in-process, every Ray configuration), interleaved; the "
        "median round is shown (default 3, --quick 1)",
    )
    p.add_argument("--workdir", help="where the stores go (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.sequences is None:
        args.sequences = 2 if args.quick else 16
    if args.length is None:
        args.length = 8192 if args.quick else 131072
    if args.quick and args.window == 16384:
        args.window = 4096
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.sequences < 1 or args.length < 2 or args.window < 1 or args.threads < 1 or args.repeat < 1:
        p.error("--sequences, --window, --threads and --repeat must be positive and --length at least 2")
    return args


def make_inputs(workdir: str, args) -> tuple[str, str, list[str]]:
    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines import SequenceStore

    adapter = ByteAdapter()
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=D_MODEL, n_layer=N_LAYER)).eval()
    model_path = os.path.join(workdir, "model.safetensors")
    save_model(model_path, model)
    store_path = os.path.join(workdir, "input.zarr")
    store = SequenceStore(store_path, "w")
    gen = np.random.default_rng(0)
    names = [f"seq{i:03d}" for i in range(args.sequences)]
    for name in names:
        store.write(name, [gen.integers(0, 256, args.length, dtype=np.uint8)], adapter=adapter)
    return model_path, store_path, names


def run_in_process(model_path: str, store_path: str, names: list[str], output: str, args) -> dict:
    """The same per-item work as a Ray actor (``JobWorker``), in a loop in this process."""
    from seqlab.pipelines import SequenceStore
    from seqlab.pipelines.ray_plan import _file_sha256
    from seqlab.pipelines.ray_work import JobWorker

    torch.set_num_threads(args.threads)
    job_attrs = {
        "format": 1,
        "job": "score",
        "mode": "exact",
        "window": args.window,
        "segment_length": None,
        "burn_in": None,
        "model": {"path": model_path, "sha256": _file_sha256(model_path)},
        "store": store_path,
        "options": {},
    }
    SequenceStore(output, "w")
    start = time.perf_counter()
    worker = JobWorker(
        model_path,
        output,
        "score",
        args.window,
        job_attrs,
        options={},
        input_store=store_path,
        num_threads=args.threads,
    )
    bits = positions = 0
    items = []
    for name in names:
        length = worker.store.describe(name).length
        began = time.perf_counter()
        row = worker(
            {
                "name": np.asarray([name]),
                "segment": np.asarray([0]),
                "n_segments": np.asarray([1]),
                "start": np.asarray([0]),
                "stop": np.asarray([length - 1]),
                "warm": np.asarray([0]),
            }
        )
        items.append(time.perf_counter() - began)
        bits += float(row["total"][0])
        positions += int(row["count"][0])
    return {
        "seconds": time.perf_counter() - start,
        "bits": bits,
        "positions": positions,
        "item": statistics.mean(items),
    }


def run_ray(model_path: str, store_path: str, output: str, concurrency: int, num_cpus: int, args) -> dict:
    from seqlab.pipelines.ray_jobs import score

    seen = []
    start = time.perf_counter()
    result = score(
        model_path,
        store_path,
        output,
        window=args.window,
        concurrency=concurrency,
        num_cpus=num_cpus,
        deviation_sample=None,
        overwrite=True,
        progress=seen.append,
    )
    seconds = time.perf_counter() - start
    pids = {pid for pids in result.workers.values() for pid in pids}
    # JobProgress.seconds counts from run_job's start (a few ms after ours): the first item began in its worker
    # work_seconds before the driver saw it finish
    startup = min(p.seconds - p.work_seconds for p in seen)
    return {
        "seconds": seconds,
        "bits": result.summary["bits"],
        "positions": result.summary["positions"],
        "pids": len(pids),
        "startup": startup,
        "item": result.work_seconds / len(seen),
    }


def quiet_ray() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    for name in ("ray", "ray.data", "ray._private"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_ray()
    cores = args.threads
    torch.set_num_threads(cores)
    print(machine_line())
    total = args.sequences * (args.length - 1)
    print(
        f"config: score (mode exact) of {args.sequences} sequences x {args.length:,} random bytes "
        f"({total:,} positions), window {args.window}; ByteAdapter model, Mamba-1 d_model {D_MODEL}, "
        f"{N_LAYER} layers, fp32; C = {cores} cores for every configuration"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print()
    workdir = args.workdir or tempfile.mkdtemp(prefix="seqlab-ray-scale-")
    os.makedirs(workdir, exist_ok=True)
    configs = [(1, cores)] + ([(cores, 1)] if cores > 1 else [])
    bases, runs = [], {c: [] for c in configs}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ray_init = None
    try:
        model_path, store_path, names = make_inputs(workdir, args)
        import ray

        for rnd in range(args.repeat):
            base = run_in_process(
                model_path, store_path, names, os.path.join(workdir, f"out-inprocess-{rnd}.zarr"), args
            )
            bases.append(base)
            print(
                f"  round {rnd + 1}: in-process, {cores} torch threads: {base['seconds']:.1f} s, "
                f"{base['positions'] / base['seconds']:,.0f} positions/s, {base['item']:.2f} s per item",
                flush=True,
            )
            if ray_init is None:
                start = time.perf_counter()
                ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
                ray_init = time.perf_counter() - start
                with contextlib.suppress(Exception):  # cosmetic only: quieter Ray Data
                    ctx = ray.data.DataContext.get_current()
                    ctx.enable_progress_bars = False
                    if hasattr(ctx, "print_on_execution_start"):
                        ctx.print_on_execution_start = False
                print(f"  ray.init(num_cpus={cores}): {ray_init:.1f} s", flush=True)
            for concurrency, num_cpus in configs:
                r = run_ray(
                    model_path,
                    store_path,
                    os.path.join(workdir, f"out-ray-{concurrency}-{rnd}.zarr"),
                    concurrency,
                    num_cpus,
                    args,
                )
                if r["positions"] != base["positions"]:
                    raise SystemExit(f"Ray scored {r['positions']} positions, in-process {base['positions']}")
                drift = abs(r["bits"] - base["bits"]) / abs(base["bits"])
                if drift > 1e-4:
                    raise SystemExit(f"Ray's summed bits differ from in-process by {drift:.2e} (relative)")
                r.update(
                    concurrency=concurrency,
                    num_cpus=num_cpus,
                    drift=drift,
                    overhead=1 - (r["positions"] / r["seconds"]) / (base["positions"] / base["seconds"]),
                )
                runs[(concurrency, num_cpus)].append(r)
                print(
                    f"  round {rnd + 1}: Ray {concurrency} worker(s) x {num_cpus} thread(s): {r['seconds']:.1f} s, "
                    f"{r['positions'] / r['seconds']:,.0f} positions/s ({r['pids']} worker process(es) used), "
                    f"start-up {r['startup']:.1f} s, {r['item']:.2f} s per item in the workers; overhead vs this "
                    f"round's in-process run {r['overhead']:+.1%}",
                    flush=True,
                )
        ray.shutdown()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def median_run(rs: list[dict]) -> dict:
        return sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2]

    base = median_run(bases)
    rows = [median_run(runs[c]) for c in configs]
    base_rate = base["positions"] / base["seconds"]
    print()

    def spread(rs: list[dict]) -> str:
        return f"{min(r['seconds'] for r in rs):.1f}-{max(r['seconds'] for r in rs):.1f}"

    print(
        f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after; {args.repeat} round(s), "
        "median round shown"
    )
    print(
        "| configuration | workers x torch threads | seconds (median) | range | elements/s | "
        "overhead vs in-process | per-round overheads | start-up s | s per item in worker | overhead with ray.init |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| in-process loop | 1 x {cores} | {base['seconds']:.1f} | {spread(bases)} | {base_rate:,.0f} | - | - | - | "
        f"{base['item']:.2f} | - |"
    )
    for r, c in zip(rows, configs):
        rate = r["positions"] / r["seconds"]
        with_init = r["seconds"] + ray_init
        per_round = ", ".join(f"{x['overhead']:+.0%}" for x in runs[c])
        print(
            f"| Ray score | {r['concurrency']} x {r['num_cpus']} | {r['seconds']:.1f} | {spread(runs[c])} | "
            f"{rate:,.0f} | {1 - rate / base_rate:+.1%} | {per_round} | {r['startup']:.1f} | {r['item']:.2f} | "
            f"{1 - (r['positions'] / with_init) / base_rate:+.1%} |"
        )
    print()
    print(
        f"ray.init(num_cpus={cores}, include_dashboard=False): {ray_init:.1f} s (once). elements = scored positions "
        f"(length - 1 per sequence). Summed bits agree with in-process to "
        f"{max(r['drift'] for rs in runs.values() for r in rs):.1e} (relative). Overheads compare medians; "
        '"per-round overheads" compare each Ray run with its own round\'s in-process run.'
    )
    for r in rows:
        overhead = 1 - (r["positions"] / r["seconds"]) / base_rate
        verdict = "met" if overhead <= TARGET else "MISSED"
        line = (
            f"Ray {r['concurrency']} x {r['num_cpus']}: overhead {overhead:+.1%} without ray.init "
            f"(target <= {TARGET:.0%}: {verdict})"
        )
        if overhead > 0:
            # a Ray run = a fixed start-up S + the rest, k times the in-process time B of the same items; overhead(B)
            # = 1 - B / (k B + S) <= TARGET  <=>  B >= (1 - TARGET) S / (1 - (1 - TARGET) k)
            startup, k = r["startup"], (r["seconds"] - r["startup"]) / base["seconds"]
            line += (
                f"; {r['seconds'] - base['seconds']:.1f} s more than in-process, of which start-up "
                f"{startup:.1f} s; after start-up Ray runs at {1 / k:.2f}x the in-process speed"
            )
            if (1 - TARGET) * k < 1:
                need = (1 - TARGET) * startup / (1 - (1 - TARGET) * k)
                line += f", so the target holds for jobs of >= {need:.0f} s in-process"
            else:
                line += ", too slow to meet the target at any job size"
        print(line)


if __name__ == "__main__":
    main()
