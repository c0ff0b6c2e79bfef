"""Ray Train data-parallel training (``train_data_parallel``): reports paced to Ray's poll vs a report every step,
next to the same steps in one process.

Ray Train's controller collects one report per worker each time it polls them (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``,
2 s by default), and ``ray.train.report`` waits while a worker's previous report is uncollected. seqlab reported
every step until issue 24's seventh sitting, which held a run to one step per poll whatever the model. Now a step
reports when ``report_seconds`` (default: the poll interval) passed since the last report, and always at a
checkpoint step and the last step.

Peers, on the same data (the bytes of the CPython docs, ``pydoc_data.topics``), the same model (random weights,
seed 0) and the same steps; the Ray cluster is started once (``ray.init(num_cpus=W)``, timed on its own):

* one process: seqlab's ``Trainer`` with batch ``W x --batch-size`` (what one step of W workers sees), torch
  threads ``--threads`` (default W);
* Ray Train, every step: ``train_data_parallel(..., num_workers=W, report_seconds=0)``, the old behaviour;
* Ray Train, paced: ``train_data_parallel(..., num_workers=W)`` (the default ``report_seconds``).

A run's time is the wall time of the call (Ray: the worker group's start, the training, the reports, the final
checkpoint). Steps/s = steps / that time; the ratio column compares each Ray run with the every-step one. Both Ray
runs must end on the same per-step losses (the pacing changes only when Ray hears of them).

    python bench/ray_train.py                    # 2 workers, 60 steps, d_model 64 x 2 layers
    python bench/ray_train.py --quick            # a smoke test: 6 steps, Ray's poll set to 0.25 s
    python bench/ray_train.py --steps 200 --workers 2 --d-model 128
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

import torch
from _machine import machine_line  # bench/ is on sys.path when a bench runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="6 tiny steps and a 0.25 s poll (smoke test)")
    p.add_argument("--steps", type=int, help="training steps per run (default 60, --quick 6)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers W (default 2)")
    p.add_argument("--threads", type=int, help="torch threads of the one-process run (default W)")
    p.add_argument("--batch-size", type=int, default=4, help="streams per worker and step (default 4)")
    p.add_argument("--window", type=int, default=128, help="tokens per stream and step (default 128)")
    p.add_argument("--d-model", type=int, help="model width (default 64, --quick 16)")
    p.add_argument("--n-layer", type=int, help="layers (default 2, --quick 1)")
    p.add_argument(
        "--poll",
        type=float,
        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the cluster this script starts (default: Ray's, 2 s; --quick 0.25)",
    )
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 6 if args.quick else 60
    if args.d_model is None:
        args.d_model = 16 if args.quick else 64
    if args.n_layer is None:
        args.n_layer = 1 if args.quick else 2
    if args.poll is None and args.quick:
        args.poll = 0.25
    if args.threads is None:
        args.threads = args.workers
    if min(args.steps, args.workers, args.threads, args.batch_size, args.window, args.d_model, args.n_layer) < 1:
        p.error("--steps, --workers, --threads, --batch-size, --window, --d-model and --n-layer must be positive")
    if args.poll is not None and not args.poll > 0:
        p.error("--poll must be a positive number of seconds")
    return args


def corpus_tokens(n: int) -> torch.Tensor:
    from seqlab.cli.demo_inputs import python_docs

    return torch.tensor(list(python_docs()[:n]), dtype=torch.long)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.poll is not None:  # read by Ray Train's controller, which starts from this process's environment
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = repr(args.poll)
    print(machine_line())
    from seqlab.config import BackboneConfig
    from seqlab.models import LanguageModel
    from seqlab.pipelines.ray_cluster import connect
    from seqlab.pipelines.ray_train import _ray_poll_seconds, train_data_parallel
    from seqlab.train import TrainConfig, Trainer
    from seqlab.windows import SequenceSource

    w = args.workers
    # each worker's shard must hold steps x batch x window tokens (plus the targets' one)
    tokens = corpus_tokens(w * (args.steps * args.batch_size * args.window + 1))
    backbone = BackboneConfig(d_model=args.d_model, n_layer=args.n_layer)
    config = TrainConfig(
        lr=1e-3, max_steps=args.steps, batch_size=args.batch_size, window=args.window, progress=False, seed=0
    )
    print(
        f"model d_model {args.d_model} x {args.n_layer} layers (vocab 256); {args.steps} steps of {w} workers x "
        f"{args.batch_size} x {args.window} tokens; Ray Train poll {_ray_poll_seconds():g} s"
    )

    rows = []
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = LanguageModel(backbone, 256)
    one = replace(config, batch_size=w * args.batch_size)
    start = time.perf_counter()
    Trainer(model, one, SequenceSource(tokens, one.batch_size, one.window)).fit()
    rows.append(
        (
            f"one process (Trainer, batch {one.batch_size}, {args.threads} threads)",
            time.perf_counter() - start,
            None,
            None,
        )
    )

    started = time.perf_counter()
    connect(quiet=True, log_to_driver=False, num_cpus=w)
    print(f"ray.init: {time.perf_counter() - started:.1f} s")
    storage = tempfile.mkdtemp(prefix="seqlab-ray-train-bench-")
    losses = {}
    try:
        for label, seconds in (("Ray Train, a report every step", 0.0), ("Ray Train, paced reports", None)):
            start = time.perf_counter()
            result = train_data_parallel(
                (backbone.to_dict(), 256),
                config,
                tokens,
                num_workers=w,
                storage_path=storage,
                name=f"run{len(rows)}",
                checkpoint_every=0,
                report_seconds=seconds,
                quiet=True,
            )
            took = time.perf_counter() - start
            if result.error is not None:
                raise SystemExit(f"{label}: the run failed: {result.error}")
            losses[label] = result.metrics["losses"]
            rows.append((label, took, result.metrics["reports"], result.metrics["loss"]))
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    same = len({tuple(v) for v in losses.values()}) == 1
    print(f"both Ray runs end on the same per-step losses: {'yes' if same else 'NO'}")

    every = rows[1][1]
    print()
    print("| run | seconds | steps/s | reports to Ray | every-step time / this run's |")
    print("|---|---|---|---|---|")
    for label, took, reports, _ in rows:
        shown = "-" if reports is None else str(reports)
        print(f"| {label} | {took:.2f} | {args.steps / took:.2f} | {shown} | {every / took:.2f}x |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
