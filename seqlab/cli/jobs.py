"""``seqlab score``, ``seqlab embed`` and ``seqlab generate STORE OUT``: Ray Data batch jobs over a sequence store
(see docs/ray-jobs.md). ``--address`` joins a running Ray cluster; without it a local one is started. ``--quiet``
silences the progress bar and Ray's own log lines: only the result is printed.

(``seqlab generate --prompt TEXT`` continues prompts in this process instead: seqlab/cli/generate.py, no Ray.)"""

from __future__ import annotations

import argparse
import json

from seqlab.cli._args import (
    MAX_CONCURRENCY,
    add_model,
    add_quiet,
    add_sequences,
    add_window,
    count,
    non_negative,
    resource,
)


def add_job_options(p: argparse.ArgumentParser, segments: bool = True, optional_stores: bool = False) -> None:
    """The flags every Ray job over a store takes (STORE OUT, --model, --sequences, --window, the pool ...)."""
    nargs = "?" if optional_stores else None
    p.add_argument("store", nargs=nargs, help="input sequence store (a Zarr v3 directory written by seqlab ingest)")
    p.add_argument("out", nargs=nargs, metavar="OUT", help="output store directory (created when missing; resumable)")
    add_model(p, "model file written by seqlab.checkpoint.save_model (required)")
    add_sequences(p, "stored sequences to process (default: all)")
    add_window(p, 4096, "elements per streamed window (default 4096)")
    if segments:
        p.add_argument(
            "--mode",
            choices=("exact", "segments"),
            default="exact",
            help="exact: whole sequences with carried state; segments: split long sequences across "
            "workers, each warmed up on --burn-in elements (default exact)",
        )
        p.add_argument("--segment-length", type=count(1), default=None, help="elements per segment (segments mode)")
        p.add_argument(
            "--burn-in", type=non_negative, default=4096, help="warm-up elements before each segment (default 4096)"
        )
        p.add_argument(
            "--deviation-sample",
            type=non_negative,
            default=4,
            help="segment boundaries at which the deviation from exact is measured (default 4; 0: not measured)",
        )
    p.add_argument("--concurrency", type=count(1, MAX_CONCURRENCY), default=2, help="actors in the pool (default 2)")
    p.add_argument("--num-cpus", type=resource, default=1, help="CPUs per actor (default 1)")
    p.add_argument("--num-gpus", type=resource, default=0, help="GPUs per actor (default 0)")
    p.add_argument("--address", default=None, help="Ray cluster address to join (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs of another job config")
    add_quiet(p, "no progress bar and no log lines of Ray's: print only the result")


def job_options(args) -> dict:
    """The keyword arguments of ``seqlab.pipelines.ray_jobs`` jobs from the parsed flags."""
    options = {
        "names": args.sequences,
        "window": args.window,
        "concurrency": args.concurrency,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
        "address": args.address,
        "overwrite": args.overwrite,
        "progress": not args.quiet,
        "quiet": args.quiet,
    }
    if hasattr(args, "mode"):
        options.update(
            mode=args.mode,
            segment_length=args.segment_length,
            burn_in=args.burn_in,
            deviation_sample=args.deviation_sample,
        )
    return options


def run_job(name: str, *args, **kwargs):
    """Run the job ``seqlab.pipelines.ray_jobs.<name>``; a worker that died for good (killed again and again, out of
    memory, its node lost: Ray's own errors, after the retries) is one line: the finished outputs are kept and the
    same command resumes."""
    import ray.exceptions

    from seqlab.errors import BackendUnavailableError
    from seqlab.pipelines import ray_jobs

    died = (
        ray.exceptions.RayActorError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.OutOfMemoryError,
        ray.exceptions.ObjectLostError,
    )
    try:
        return getattr(ray_jobs, name)(*args, **kwargs)
    except died as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise BackendUnavailableError(
            f"a Ray worker of the job died and was not brought back ({type(exc).__name__}: "
            f"{first[:200]}); finished outputs are kept: run the same command again to "
            "resume"
        ) from exc


def report(result) -> int:
    """One line per sequence (done or skipped, its totals), then the job as one JSON object."""
    for name, totals in result.totals.items():
        state = "skipped" if name in result.skipped else "done"
        print(f"{name}\t{state}\t{json.dumps(totals)}")
    print(
        json.dumps(
            {
                "job": result.job,
                "output": result.output,
                "done": result.done,
                "skipped": result.skipped,
                "summary": result.summary,
                "deviation": result.deviation,
                "seconds": round(result.seconds, 2),
            },
            default=str,
        )
    )
    return 0


def _job(name: str):
    def handler(args) -> int:
        from seqlab.cli import require

        require(args, "model")
        return report(run_job(name, args.model, args.store, args.out, **job_options(args)))

    handler.__name__ = f"_{name}"
    return handler


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "score",
        help="per-position bits of every stored sequence under a model (Ray Data)",
        description="Score every element (bits = -log2 p of the next element) of stored sequences "
        "with a model, writing one array per sequence and the totals to an output store.",
    )
    add_job_options(s)
    s.set_defaults(func=_job("score"))

    e = sub.add_parser(
        "embed",
        help="mean-pooled hidden features per window of stored sequences (Ray Data)",
        description="Embed stored sequences: one row of mean-pooled final hidden features per "
        "window, (n_windows, d_model) per sequence, in an output store.",
    )
    add_job_options(e)
    e.set_defaults(func=_job("embed"))
