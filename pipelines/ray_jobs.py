"""Ray Data batch jobs over sequence stores: ``score``, ``embed`` and ``generate`` (see docs/ray-jobs.md).

How a job runs:

1. The driver checks the input (store, sequences, the model's adapter against the store's) and plans work
   items: one per sequence (``mode="exact"``), or one per segment of ``segment_length`` elements
   (``mode="segments"``). Items whose output is already complete for the same job key are skipped (resume).
2. The items become a Ray Data dataset built in the driver (``ray.data.from_items``, one block per item): rows
   holding only names and ranges, never data. No read tasks: each would cost a worker process of its own.
   (``SequenceStoreDatasource``, a ``ray.data.Datasource`` over the same rows, is there for pipelines of your
   own; Ray's ``read_zarr`` reads only Zarr v2.)
3. ``ds.map_batches(JobWorker, concurrency=N, num_cpus=..., num_gpus=...)``: an actor pool; each actor loads the
   model once from the model file (``model_from_checkpoint``), and per item streams its range from the store
   with carried state (``seqlab.pipelines.stream``, on ``seqlab.streaming``) and writes the result into a
   staging array of the output store (ray_work.py). A finished staging array is moved into place by a directory
   rename, so a finished output is never seen half-written and a failed or killed worker never touches finished
   outputs. Actors are restarted and their
   tasks retried when a worker process dies (``max_restarts`` / ``max_task_retries``).
4. Segments of one sequence are joined by the driver once all are staged; in segments mode the driver then
   measures the deviation from an exact run on a sample.

Modules: ray_plan.py (settings, items, results), ray_cluster.py (starting or joining Ray, ``quiet``),
ray_execute.py (the items through the actor pool), ray_work.py (one item, in an actor), ray_errors.py (what a
failed job raises), this one (the job: checks, plan, resume, joins, deviation).

Output store (a local directory, shared by every node on a real cluster): one array per input sequence, same
name; attrs ``seqlab_job`` (the job's config, model file hash and fingerprint) and ``totals``; the group's
attrs hold ``seqlab_job`` too. Re-running with another config is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from seqlab.errors import ConfigError, InputError, SeqlabError

from .ray_datasource import SequenceStoreDatasource
from .ray_execute import _execute
from .ray_plan import (
    JOB_FORMAT,
    JOBS,
    MODES,
    STAGING,
    JobProgress,
    JobResult,
    _check_int,
    _check_output,
    _check_resource,
    _file_sha256,
    _part_name,
    plan_items,
)
from .ray_work import JobWorker, _embed_range, _promote, _score_range, _sequence_totals
from .sources import check_model_fits
from .store import SequenceStore

__all__ = [
    "JobProgress",
    "JobResult",
    "JobWorker",
    "SequenceStoreDatasource",
    "embed",
    "generate",
    "plan_items",
    "run_job",
    "score",
]

# ------------------------------------------------------------------------------------------------------
# the driver


def _job_key(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in ("started", "summary", "deviation")}


def _finished(out: SequenceStore, name: str, key: dict) -> bool:
    if name not in out:
        return False
    try:
        info = out.describe(name)
    except SeqlabError:
        return False
    return info.complete and _job_key(info.attrs.get("seqlab_job") or {}) == key and "totals" in info.attrs


def run_job(
    job: str,
    model_path,
    store,
    output,
    *,
    names=None,
    window: int = 4096,
    mode: str = "exact",
    segment_length: int | None = None,
    burn_in: int = 4096,
    concurrency: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    address: str | None = None,
    overwrite: bool = False,
    deviation_sample: int | None = 4,
    progress: bool | Callable[[JobProgress], None] | None = None,
    max_restarts: int = 3,
    output_chunk_elements: int | None = None,
    options: dict | None = None,
    quiet: bool = False,
    _fault: dict | None = None,
) -> JobResult:
    """Run ``job`` ("score", "embed", "generate") of the model file ``model_path`` over sequences of
    ``store``, writing one output array per sequence into the Zarr store ``output`` (a local directory).

    ``mode="exact"``: each sequence streamed whole in windows of ``window`` with carried state (sequences in
    parallel). ``mode="segments"``: sequences longer than ``segment_length`` are cut into segments processed
    in parallel, each warmed up from a zero state on the ``burn_in`` preceding elements; the deviation from
    exact is measured on the first ``deviation_sample`` segment boundaries (None/0: not measured).
    ``concurrency``: actors in the pool (at most one per work item); ``num_cpus`` / ``num_gpus``: resources per
    actor. ``address``: join a running Ray cluster (None: use the running one or start a local one).
    ``progress``: True for a bar, or a callable taking ``JobProgress``. ``max_restarts``: how often a dead actor
    is restarted (its task retried).
    ``quiet``: Ray's own log lines off (progress log and bars, start-up notices, workers' output: ``ray_cluster``),
    and no progress bar of ours (a ``progress`` callable is still called).
    """
    started = time.time()
    if job not in JOBS:
        raise ConfigError(f"job must be one of {JOBS}, got {job!r}")
    if mode not in MODES:
        raise ConfigError(f"mode must be 'exact' or 'segments', got {mode!r}")
    _check_int(window, "window")
    _check_int(concurrency, "concurrency")
    _check_int(burn_in, "burn_in", low=0)
    _check_int(output_chunk_elements, "output_chunk_elements", allow_none=True)
    _check_resource(num_cpus, "num_cpus")
    _check_resource(num_gpus, "num_gpus")
    if mode == "segments":
        if job == "generate":
            raise ConfigError("generate continues each sequence from its end: it has no segments mode")
        _check_int(segment_length, "segment_length (--segment-length; segments mode needs it)")
        if job == "embed" and segment_length % window:
            raise ConfigError(
                f"embed in segments mode needs segment_length (--segment-length {segment_length}) to be "
                f"a multiple of window (--window {window}), so segments hold whole windows"
            )
    options = dict(options or {})
    if job == "generate":
        _check_int(options.get("max_new_tokens"), "max_new_tokens", low=0)
        _check_int(options.get("prompt_length"), "prompt_length", allow_none=True)

    model_path = os.path.abspath(os.fspath(model_path))
    if not os.path.isfile(model_path) and not os.path.isdir(model_path):
        raise InputError(f"model file {model_path} does not exist")
    if not isinstance(output, (str, os.PathLike)) or "://" in os.fspath(output):
        raise ConfigError(f"output must be a local directory (shared by all nodes on a cluster), got {output!r}")
    output = os.path.abspath(os.fspath(output))
    store_path = (
        os.path.abspath(os.fspath(store))
        if isinstance(store, (str, os.PathLike)) and "://" not in os.fspath(store)
        else os.fspath(store)
        if isinstance(store, (str, os.PathLike))
        else None
    )
    if store_path is None:
        raise ConfigError("store must be a path (workers open it themselves)")
    source = SequenceStore(store_path, "r")
    _check_output(output, store_path)
    names = source.list() if names is None else ([names] if isinstance(names, str) else list(names))
    if not names:
        raise InputError(f"sequence store {source.where} holds no sequences")

    from seqlab.domains.base import model_from_checkpoint

    model, adapter = model_from_checkpoint(model_path)
    for name in names:
        info = source.describe(name)  # a missing sequence: InputError naming the store and what it holds
        where = f"sequence store {source.where}: sequence {name!r}"
        if not info.complete:
            raise InputError(f"{where} is incomplete ({info.length} elements committed): finish its ingest first")
        check_model_fits(model, info, where)
        if job in ("score", "generate") and getattr(model, "vocab_size", None) is None:
            raise InputError(
                f"{job} needs a token model (next-element probabilities); the model in {model_path} "
                f"(adapter {adapter.name!r}) predicts continuous frames"
            )
        if job == "score" and info.length < 2:
            raise InputError(f"{where} holds {info.length} element(s): score needs at least 2")

    job_attrs = {
        "format": JOB_FORMAT,
        "job": job,
        "mode": mode,
        "window": window,
        "segment_length": segment_length if mode == "segments" else None,
        "burn_in": burn_in if mode == "segments" else None,
        "model": {
            "path": model_path,
            "sha256": _file_sha256(model_path) if os.path.isfile(model_path) else None,
            "fingerprint": getattr(model, "fingerprint", None),
            "adapter": adapter.info(),
        },
        "store": source.where,
        "options": {k: v for k, v in options.items() if k != "device"},
    }
    key = _job_key(job_attrs)
    out = SequenceStore(output, "a")
    recorded = out.group.attrs.get("seqlab_job")
    if recorded is not None and _job_key(recorded) != key and not overwrite:
        raise InputError(
            f"output store {output} holds results of another job config ({recorded}); pass "
            "overwrite=True (--overwrite) to replace them, or choose another output"
        )
    out.group.update_attributes({"seqlab_job": {**job_attrs, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}})

    replace = overwrite and recorded is not None and _job_key(recorded) != key
    todo = list(names) if replace else [n for n in names if not _finished(out, n, key)]
    skipped = [n for n in names if n not in todo]
    items = plan_items(source, todo, job, mode, segment_length, burn_in)
    staging = SequenceStore(os.path.join(output, STAGING), "a")
    staged = set(staging.list())
    pending = []
    for item in items:  # segments finished by an earlier run of the same job are kept
        part = _part_name(item)
        if item["n_segments"] > 1 and part in staged:
            info = staging.describe(part)
            if info.complete and _job_key(info.attrs.get("seqlab_job") or {}) == key:
                continue
        pending.append(item)

    result = JobResult(job, output, job_attrs, skipped=skipped)
    if pending:
        result.workers, result.work_seconds = _execute(
            pending,
            model_path,
            output,
            job,
            window,
            job_attrs,
            options,
            store_path,
            concurrency,
            num_cpus,
            num_gpus,
            address,
            progress,
            max_restarts,
            output_chunk_elements,
            _fault,
            started,
            quiet,
        )
    for name in todo:  # join the segments of split sequences
        parts = [i for i in items if i["name"] == name]
        if len(parts) > 1:
            _join(output, job, name, parts, job_attrs)
    if mode == "segments" and deviation_sample and todo:
        result.deviation = _deviation(model, source, out, job, todo, items, window, int(deviation_sample))
    for name in names:
        info = out.describe(name)
        result.totals[name] = dict(info.attrs.get("totals") or {})
    result.done = list(todo)
    if job == "score":
        bits = sum(t.get("bits", 0.0) for t in result.totals.values())
        positions = sum(t.get("positions", 0) for t in result.totals.values())
        result.summary = {"bits": bits, "positions": positions, "mean_bits": bits / positions if positions else None}
    result.seconds = time.time() - started
    out.group.update_attributes({"seqlab_job": {**job_attrs, "summary": result.summary, "deviation": result.deviation}})
    return result


def _join(output: str, job: str, name: str, parts: list[dict], job_attrs: dict) -> None:
    """Concatenate a sequence's staged segments into one staging array, then move it into place."""
    staging = SequenceStore(os.path.join(output, STAGING), "a")
    joined = f"{name}.joined"
    totals, writer = [], None
    for item in sorted(parts, key=lambda i: i["segment"]):
        part = _part_name(item)
        info = staging.describe(part)
        if writer is None:
            writer = staging.writer(joined, chunk_elements=info.chunk_elements)
        reader = staging.reader(part)
        for lo in range(0, reader.length, info.chunk_elements):
            writer.write(reader.read(lo, min(lo + info.chunk_elements, reader.length), raw=True))
        totals.append(info.attrs["seqlab_part"])
    writer.array.update_attributes({"seqlab_job": job_attrs})
    writer.finish()
    _promote(output, joined, name, _sequence_totals(job, totals))
    for item in parts:
        staging.delete(_part_name(item))


def _deviation(model, source, out, job, todo, items, window, sample: int) -> dict | None:
    """Exact vs segments at the first ``sample`` segment boundaries: the exact run streams the sequence from
    its start (state carried) through each sampled segment, on the driver."""
    split = [i for i in items if i["n_segments"] > 1 and i["segment"] > 0][:sample]
    if not split:
        return None
    diffs, positions, total_exact, total_seg = [], 0, 0.0, 0.0
    for item in split:
        name, start, stop = item["name"], item["start"], item["stop"]
        lo, hi = (start // window, -(-stop // window)) if job == "embed" else (start, stop)
        got = out.read(name, lo, hi, raw=True).astype(np.float64)
        pieces: list[np.ndarray] = []
        runner = _score_range if job == "score" else _embed_range
        # exact: warm up on everything before the segment (start == warm means no burn-in limit)
        runner(model, source, name, 0, start, stop, window, pieces.append)
        exact = np.concatenate(pieces).astype(np.float64)
        diffs.append(np.abs(got - exact).reshape(got.shape[0], -1).max(axis=-1))
        positions += got.shape[0]
        total_exact += float(exact.sum())
        total_seg += float(got.sum())
    every = np.concatenate(diffs)
    report = {
        "segments": len(split),
        "positions": positions,
        "max_abs": float(every.max()),
        "mean_abs": float(every.mean()),
        "what": "bits per position" if job == "score" else "pooled hidden, max over features",
    }
    if job == "score":
        report.update(mean_bits_exact=total_exact / positions, mean_bits_segments=total_seg / positions)
    return report


def score(model_path, store, output, **options) -> JobResult:
    """Bits (-log2 p) of every element after the first, per sequence, with totals; see ``run_job``."""
    return run_job("score", model_path, store, output, **options)


def embed(model_path, store, output, **options) -> JobResult:
    """Mean-pooled hidden features of every window, ``(n_windows, d_model)`` per sequence; see ``run_job``."""
    return run_job("embed", model_path, store, output, **options)


def generate(
    model_path,
    store,
    output,
    *,
    max_new_tokens: int = 64,
    prompt_length: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    allow_specials: bool = False,
    **options,
) -> JobResult:
    """Continue every stored sequence (its last ``prompt_length`` elements, default all of it) by up to
    ``max_new_tokens`` tokens; sequence ``name`` samples with seed ``seed + crc32(name)``, so re-runs and
    retries give the same tokens. The model adapter's special tokens are never generated unless
    ``allow_specials=True``; its end token (if it has one) ends a continuation early either way."""
    from seqlab.generate import _check_sampling

    for what, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(allow_specials, bool):
        raise ConfigError(f"allow_specials must be True or False, got {allow_specials!r}")
    try:
        _check_sampling(max_new_tokens, temperature, top_k, top_p, None, 1.0)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    gen = {
        "max_new_tokens": max_new_tokens,
        "prompt_length": prompt_length,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "allow_specials": allow_specials,
    }
    return run_job("generate", model_path, store, output, options=gen, **options)


def _describe(result: JobResult) -> dict[str, Any]:
    return json.loads(
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
