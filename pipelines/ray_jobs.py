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
   with carried state (``pipelines.stream``) and writes the result into a staging array of the output store.
   A finished staging array is moved into place by a directory rename, so a finished output is never seen
   half-written and a failed or killed worker never touches finished outputs. Actors are restarted and their
   tasks retried when a worker process dies (``max_restarts`` / ``max_task_retries``).
4. Segments of one sequence are joined by the driver once all are staged; in segments mode the driver then
   measures the deviation from an exact run on a sample.

Output store (a local directory, shared by every node on a real cluster): one array per input sequence, same
name; attrs ``seqlab_job`` (the job's config, model file hash and fingerprint) and ``totals``; the group's
attrs hold ``seqlab_job`` too. Re-running with another config is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import signal
import time
import uuid
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

from seqlab.errors import BackendUnavailableError, ConfigError, InputError, SeqlabError

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

JOBS = ("score", "embed", "generate")
MODES = ("exact", "segments")
STAGING = "_staging"          # subgroup of the output store holding outputs and segments being written
JOB_FORMAT = 1
MAX_BLOCKS = 1024             # rows of work handed to Ray Data in at most this many blocks (one item per block below)


# ------------------------------------------------------------------------------------------------------
# plans and results


@dataclass(frozen=True)
class JobProgress:
    """Passed to a job's ``progress`` callable after every finished work item."""

    done: int              # items finished in this run
    total: int             # items this run had to do
    sequence: str
    segment: int
    elements: int          # elements this item covered
    seconds: float         # wall time since the job started
    work_seconds: float = 0.0  # wall time the worker spent on this item (model forward, reads, output writes)


@dataclass
class JobResult:
    """What a job did: ``outputs`` (sequence -> output description), ``totals`` (sequence -> totals dict),
    ``skipped`` (sequences already finished by an earlier run), ``deviation`` (segments mode: exact vs
    segments on a sample), ``summary`` (job-wide totals, e.g. mean bits for ``score``)."""

    job: str
    output: str
    config: dict
    totals: dict[str, dict] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    deviation: dict | None = None
    summary: dict = field(default_factory=dict)
    workers: dict[str, list[int]] = field(default_factory=dict)  # sequence -> worker pids that finished it
    seconds: float = 0.0
    work_seconds: float = 0.0  # summed over this run's items: time the workers spent on the items themselves


def _check_int(value, what: str, low: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{what} must be an int >= {low}, got {value!r}")


def _check_resource(value, what: str) -> None:
    """A per-actor resource amount Ray can schedule: finite, >= 0, and 0 or at least its unit of 0.0001."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or 0 < value < 1e-4:
        raise ConfigError(f"{what} must be 0 or a finite number >= 0.0001 (Ray's resource unit), got {value!r}")


def _check_resources(num_cpus: float, num_gpus: float, concurrency: int, address: str | None) -> None:
    """Refuse a job whose actors cannot run on the cluster it joined: not even one actor's CPUs or GPUs are
    there (Ray would queue it forever, printing autoscaler lines). A request that fits once but not
    ``concurrency`` times runs with the actors that fit (Ray queues the others): a warning says so."""
    import ray

    have = ray.cluster_resources()
    where = f"the Ray cluster at {address!r}" if address else "this machine's Ray cluster"
    queued = []
    for resource, per_actor, name in (("CPU", num_cpus, "num_cpus"), ("GPU", num_gpus, "num_gpus")):
        if not per_actor:
            continue
        total = float(have.get(resource, 0.0))
        flag = "--" + name.replace("_", "-")
        if per_actor > total + 1e-9:
            raise BackendUnavailableError(
                f"{name}={per_actor:g} ({flag} {per_actor:g}: {resource}s per actor) is more than {where} has: "
                f"{total:g} {resource}s in all; not even one actor could start. Lower {flag}, or join a cluster "
                f"with {resource}s (--address)")
        if per_actor * concurrency > total + 1e-9:
            queued.append(f"{resource}: {per_actor:g} x {concurrency} actors > {total:g}")
    if queued:
        warnings.warn(f"{where} cannot run all {concurrency} actors at once ({'; '.join(queued)}): the others wait "
                      f"for a free slot; lower --concurrency to match", stacklevel=3)


def _check_output(output: str, store_path: str) -> None:
    """Refuse an output that is not a job's own: the input store itself (or a folder inside or around it), a file,
    a folder of other files, or a sequence store that no job wrote. A job replaces ``<output>/<sequence name>``
    folders when it moves finished outputs into place: pointed at anything else it would delete what is there."""
    real_out, real_in = os.path.realpath(output), os.path.realpath(store_path)
    if real_out == real_in or real_out.startswith(real_in + os.sep) or real_in.startswith(real_out + os.sep):
        what = "the input store" if real_out == real_in else "inside the input store" \
            if real_out.startswith(real_in) else "a folder holding the input store"
        raise ConfigError(f"output {output} is {what} {store_path}: choose another output (a job replaces the "
                          "output's sequence folders)")
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output):
        raise InputError(f"output {output} exists and is not a folder: choose a new or empty folder")
    entries = set(os.listdir(output))
    if "zarr.json" not in entries:
        if entries:
            raise InputError(f"output {output} is a folder with other files in it ({', '.join(sorted(entries)[:3])}"
                             f"{' ...' if len(entries) > 3 else ''}), not a job's output store: choose a new or empty "
                             "folder")
        return
    existing = SequenceStore(output, "r")
    if existing.group.attrs.get("seqlab_job") is None and existing.list():
        raise InputError(f"output {output} is a sequence store that no seqlab job wrote (it holds "
                         f"{', '.join(existing.list()[:3])}{' ...' if len(existing.list()) > 3 else ''}): a job would "
                         "replace those sequences; choose another output")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _span(job: str, length: int) -> int:
    """Elements of work (positions of output) a sequence of ``length`` gives: score predicts elements 1..L-1
    (output position i = bits of element i+1 given elements 0..i); embed and generate read all of it."""
    return max(length - 1, 0) if job == "score" else length


def plan_items(store: SequenceStore, names: list[str], job: str, mode: str, segment_length: int | None,
               burn_in: int) -> list[dict]:
    """Work items (names and ranges only): ``name``, ``segment``, ``n_segments``, ``start``, ``stop`` (output
    positions; for embed, element positions that are whole windows) and ``warm`` (where the zero-state
    burn-in starts; == ``start`` for exact items and first segments)."""
    items = []
    for name in names:
        length = _span(job, store.describe(name).length)
        if mode == "exact" or length <= (segment_length or length):
            items.append({"name": name, "segment": 0, "n_segments": 1, "start": 0, "stop": length, "warm": 0})
            continue
        bounds = list(range(0, length, segment_length))
        for k, start in enumerate(bounds):
            stop = min(start + segment_length, length)
            items.append({"name": name, "segment": k, "n_segments": len(bounds), "start": start, "stop": stop,
                          "warm": max(0, start - burn_in)})
    return items


def _part_name(item: dict) -> str:
    if item["n_segments"] == 1:
        return f"{item['name']}.whole"
    return f"{item['name']}.seg-{item['segment']:06d}-of-{item['n_segments']:06d}"


# ------------------------------------------------------------------------------------------------------
# the datasource


class SequenceStoreDatasource(Datasource):
    """Rows of work over a Zarr v3 sequence store: one row per (sequence, segment) with names and ranges only
    (``plan_items``); the workers read the data themselves, a window at a time."""

    def __init__(self, items: list[dict]) -> None:
        super().__init__()
        self.items = list(items)

    def get_name(self) -> str:
        return "SeqlabSequenceStore"

    def estimate_inmemory_data_size(self) -> int | None:
        return 64 * len(self.items)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        import pyarrow as pa

        if not self.items:
            return []
        groups = max(1, min(int(parallelism) if parallelism and parallelism > 0 else len(self.items),
                            len(self.items)))
        tasks = []
        for g in range(groups):
            rows = self.items[g::groups]

            def read(rows=rows):
                yield pa.Table.from_pylist(rows)

            meta = BlockMetadata(num_rows=len(rows), size_bytes=64 * len(rows), exec_stats=None, input_files=None)
            tasks.append(ReadTask(read, meta))
        return tasks


# ------------------------------------------------------------------------------------------------------
# the work of one item (runs in an actor; also used by the driver for the deviation sample)


def _score_range(model, store: SequenceStore, name: str, warm: int, start: int, stop: int, window: int,
                 sink: Callable[[np.ndarray], None]) -> tuple[float, int]:
    """Bits of elements ``start+1 .. stop`` (inputs ``[start, stop)``), warmed up on ``[warm, start)`` from
    a zero state; ``sink`` receives float32 pieces in order. Returns (sum of bits, count)."""
    from .store_stream import stream_bits

    return stream_bits(model, store, name, window, start=start, stop=stop, warm=warm, sink=sink)


def _embed_range(model, store: SequenceStore, name: str, warm: int, start: int, stop: int, window: int,
                 sink: Callable[[np.ndarray], None]) -> tuple[float, int]:
    """Mean-pooled hidden features of each window in ``[start, stop)`` (rows of (d_model,))."""
    from .store_stream import stream

    state = None
    if warm < start:
        for step in stream(model, store, name, window, start=warm, stop=start):
            state = step.state
    count = 0
    if stop <= start:
        return 0.0, 0
    for step in stream(model, store, name, window, state=state, start=start, stop=stop):
        pooled = step.hidden[0].float().mean(dim=0, keepdim=True).cpu().numpy().astype(np.float32)
        sink(pooled)
        count += 1
    return 0.0, count


def _generate_one(model, store: SequenceStore, name: str, window: int, options: dict,
                  sink: Callable[[np.ndarray], None], adapter=None) -> tuple[float, int]:
    """Continue the stored sequence (its last ``prompt_length`` elements, or all of it), prefilled in windows
    with carried state; the continuation's ids go to ``sink``. With the model's ``adapter``, its special tokens
    are never generated (unless ``options["allow_specials"]``) and its end token stops the continuation."""
    from seqlab.generate import generate as _generate

    from .store_stream import stream

    length = store.describe(name).length
    if length == 0:
        raise InputError(f"sequence store {store.where}: sequence {name!r} is empty: there is no prompt")
    first = 0 if options.get("prompt_length") is None else max(0, length - int(options["prompt_length"]))
    state = None
    if first < length - 1:
        for step in stream(model, store, name, window, start=first, stop=length - 1):
            state = step.state
    last = store.read(name, length - 1, length)
    seed = (int(options.get("seed") or 0) + zlib.crc32(name.encode())) % (1 << 31)
    special = {} if adapter is None else adapter.generation_options(allow_specials=bool(options.get("allow_specials")))
    out = _generate(model, last, options["max_new_tokens"], temperature=options.get("temperature", 1.0),
                    top_k=options.get("top_k"), top_p=options.get("top_p"), seed=seed, state=state, **special)
    tokens = np.asarray(out.tokens[0], dtype=np.int64)
    sink(tokens)
    return 0.0, int(tokens.shape[0])


ENDED_POLL_SECONDS = 0.5
JOBS_DIR = "_jobs"  # under STAGING: one empty file per finished job run, the signal for its actors to end


def _end_with_the_job(marker: str) -> None:
    """In a job's actor: end this actor (for good: no restart) once the driver marks the job run as over.

    The driver writes ``marker`` when the job returns or raises. Ray Data then lets its actors go by dropping their
    handles, but a failed job's handles stay reachable from the error's traceback and from cycles inside Ray Data
    (docs/ray-jobs.md), so without this an actor of a failed job kept its CPU until those were gone. Outside an
    actor (a JobWorker built in-process) this does nothing."""
    import threading

    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    me = ray.get_runtime_context().current_actor

    def watch() -> None:
        while not os.path.exists(marker):
            time.sleep(ENDED_POLL_SECONDS)
        ray.kill(me, no_restart=True)

    threading.Thread(target=watch, name="seqlab-job-end", daemon=True).start()


def _job_marker(output: str) -> str:
    """A fresh marker path for one run of a job into ``output``; markers of earlier runs that every actor has had
    time to see are removed."""
    folder = os.path.join(output, STAGING, JOBS_DIR)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            if time.time() - os.path.getmtime(path) > 60 * ENDED_POLL_SECONDS:
                os.remove(path)
        except OSError:  # another driver's cleanup got there first
            pass
    return os.path.join(folder, f"{uuid.uuid4().hex}.ended")


class JobWorker:
    """The callable class of ``map_batches``: loads the model once per actor, then does one item per row.

    Every item's result is written to ``_staging/<part>`` of the output store and marked complete; an exact
    item (a whole sequence) is then moved into place. Rows out: ``name``, ``segment``, ``elements``,
    ``total`` (sum of bits for score), ``count``, ``pid``, ``seconds`` (the item's wall time in this worker).
    """

    def __init__(self, model_path: str, output: str, job: str, window: int, job_attrs: dict,
                 options: dict | None = None, input_store: str = "", num_threads: int | None = None,
                 fault: dict | None = None, ended_marker: str | None = None) -> None:
        if ended_marker:
            _end_with_the_job(ended_marker)
        self.store = SequenceStore(input_store, "r")
        self.output, self.job, self.window = output, job, window
        self.job_attrs, self.options = job_attrs, dict(options or {})
        self.fault = fault
        self._model_path, self._num_threads = model_path, num_threads
        self.model = self.adapter = None

    def _load(self) -> None:
        """Set torch's threads and load the model, on the thread that calls the worker (not in ``__init__``).

        Ray Data builds the class on the actor's main thread but calls it from a thread of its own. torch's OpenMP
        runtime (libgomp) keeps a thread team per thread that runs parallel work: two teams on C cores are more
        threads than cores, so libgomp's barriers sleep instead of spinning, and with 2 torch threads every item took
        about 2x as long in an actor as in-process (bench/ray_scale.py, docs/benchmarks.md). Loading here keeps all of
        a worker's torch work on one thread."""
        from seqlab.domains.base import model_from_checkpoint

        if self._num_threads:
            torch.set_num_threads(int(self._num_threads))
        device = "cuda" if torch.cuda.is_available() and self.options.get("device") == "cuda" else None
        self.model, self.adapter = model_from_checkpoint(self._model_path, device=device)

    def _maybe_fail(self, item: dict, when: str) -> None:
        """Test hook: die for real (SIGKILL of this worker process) or raise, once, at a marked item."""
        fault = self.fault
        if not fault or fault.get("name") != item["name"] or fault.get("segment", item["segment"]) != \
                item["segment"] or fault.get("when", "mid") != when:
            return
        marker = Path(fault["marker"])
        if fault.get("how") == "raise":
            raise RuntimeError(f"injected failure at {item['name']} segment {item['segment']}")
        if marker.exists():
            return
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, batch: dict) -> dict:
        if self.model is None:
            self._load()
        rows = {"name": [], "segment": [], "elements": [], "total": [], "count": [], "pid": [], "seconds": []}
        for i in range(len(batch["name"])):
            item = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
            item["name"] = str(item["name"])
            began = time.perf_counter()
            total, count = self._run(item)
            rows["seconds"].append(time.perf_counter() - began)
            rows["name"].append(item["name"])
            rows["segment"].append(int(item["segment"]))
            rows["elements"].append(int(item["stop"] - item["start"]))
            rows["total"].append(float(total))
            rows["count"].append(int(count))
            rows["pid"].append(os.getpid())
        return {k: np.asarray(v) for k, v in rows.items()}

    def _run(self, item: dict) -> tuple[float, int]:
        staging = SequenceStore(os.path.join(self.output, STAGING), "a")
        part = _part_name(item)
        chunk = self.options.get("output_chunk_elements")
        token_out = self.job == "generate"
        writer = staging.writer(part, adapter=self.adapter if token_out else None, chunk_elements=chunk)
        state = {"pieces": 0}

        def sink(values: np.ndarray) -> None:
            writer.write(values)
            state["pieces"] += 1
            if state["pieces"] == 2:
                self._maybe_fail(item, "mid")

        name, warm, start, stop = item["name"], int(item["warm"]), int(item["start"]), int(item["stop"])
        if self.job == "score":
            total, count = _score_range(self.model, self.store, name, warm, start, stop, self.window, sink)
        elif self.job == "embed":
            total, count = _embed_range(self.model, self.store, name, warm, start, stop, self.window, sink)
        else:
            total, count = _generate_one(self.model, self.store, name, self.window, self.options, sink, self.adapter)
        self._maybe_fail(item, "mid")  # an item too short for two pieces still dies mid-item
        if writer.array is None:  # nothing written (an empty range): an empty output of the right kind
            d = getattr(self.model.config, "d_model", 1)
            writer.write(np.zeros((0, d), np.float32) if self.job == "embed" else
                         np.zeros(0, np.int64 if token_out else np.float32))
        totals = {"sum": total, "count": count, "start": start, "stop": stop, "warm": warm}
        writer.array.update_attributes({"seqlab_job": self.job_attrs, "seqlab_part": totals})
        writer.finish()
        if item["n_segments"] == 1:
            _promote(self.output, part, name, _sequence_totals(self.job, [totals]))
        return total, count


def _sequence_totals(job: str, parts: list[dict]) -> dict:
    total = sum(p["sum"] for p in parts)
    count = sum(p["count"] for p in parts)
    if job == "score":
        return {"bits": total, "positions": count, "mean_bits": total / count if count else None}
    if job == "embed":
        return {"windows": count}
    return {"tokens": count}


def _promote(output: str, part: str, name: str, totals: dict) -> None:
    """Move a complete staging array into place as ``name``: its totals are written first, then the old output
    (if any) is removed and the staging folder renamed (a crash in between leaves the sequence to redo)."""
    staging = SequenceStore(os.path.join(output, STAGING), "a")
    staging._array(part).update_attributes({"totals": totals})
    final = os.path.join(output, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(os.path.join(output, STAGING, part), final)


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


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception linked to it: causes, contexts, and the worker's exception inside a Ray task
    error (Ray wraps user exceptions in its own and keeps the original in ``cause``)."""
    seen, found, stack = set(), [], [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return found


_OUT_OF_MEMORY = ("can't allocate memory", "out of memory")


def _user_error(e: BaseException | None) -> bool:
    """A seqlab error, a worker out of memory (a window too large for the model) or an OSError of the machine (a
    full disk, no permission, a read-only file system: seqlab.errors.USER_OS_ERRORS): raised to the caller as itself
    (the CLI prints one line), not wrapped in Ray's task error."""
    from seqlab.errors import USER_OS_CLASSES, USER_OS_ERRORS

    return isinstance(e, (SeqlabError, MemoryError)) or \
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OUT_OF_MEMORY) or \
        isinstance(e, OSError) and (e.errno in USER_OS_ERRORS or isinstance(e, USER_OS_CLASSES))


def _fresh(e: BaseException) -> BaseException:
    """The same error without Ray's frames and context: an OSError keeps its errno, message and path."""
    if isinstance(e, OSError) and e.errno is not None:
        return type(e)(e.errno, e.strerror, *(p for p in (e.filename,) if p is not None))
    return type(e)(str(e))


def _unwrap(exc: BaseException) -> BaseException | None:
    """The seqlab error (or out-of-memory error) inside a Ray task error."""
    for e in _chain(exc):
        cause = getattr(e, "cause", None)
        if _user_error(cause):
            return cause
        if isinstance(e, SeqlabError) and type(e).__module__.startswith("seqlab"):
            return e
    return None


def _release_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames that ``exc``'s tracebacks reach, callers included (file
    and line stay, so the tracebacks still print).

    A task's failure reaches the driver with tracebacks through Ray Data's scheduling loop and its iterators, whose
    frames (and the frames that called them) hold the executor, its metadata fetcher (which keeps the failed tasks
    after shutdown), the job's blocks and, through each task's done-callback, the handle of the actor that ran it.
    Whoever kept the error (a caller, pytest.raises) kept all of that alive; Ray ends an actor only when its last
    handle goes, so this was half of the "a failed job keeps a CPU" bug (issue 14, found with gc.get_referrers on
    the live handles). The other half is a holder the job cannot reach: Ray Data logs the error with a traceback of
    its own, and a logging handler that keeps records (pytest's log capture does) keeps it. ``_end_with_the_job``
    ends the actors whatever holds them. Frames still executing (this thread's callers) cannot be cleared and are
    left alone; the job's finished generator frames (Ray Data's iterators) are cleared too."""
    seen = set()
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None and id(frame) not in seen:
                seen.add(id(frame))
                try:
                    frame.clear()
                except RuntimeError:  # still executing (or, from Python 3.13, a suspended generator's)
                    pass
                frame = frame.f_back
            tb = tb.tb_next


def run_job(job: str, model_path, store, output, *, names=None, window: int = 4096, mode: str = "exact",
            segment_length: int | None = None, burn_in: int = 4096, concurrency: int = 2, num_cpus: float = 1,
            num_gpus: float = 0, address: str | None = None, overwrite: bool = False,
            deviation_sample: int | None = 4, progress: bool | Callable[[JobProgress], None] | None = None,
            max_restarts: int = 3, output_chunk_elements: int | None = None, options: dict | None = None,
            _fault: dict | None = None) -> JobResult:
    """Run ``job`` ("score", "embed", "generate") of the model file ``model_path`` over sequences of
    ``store``, writing one output array per sequence into the Zarr store ``output`` (a local directory).

    ``mode="exact"``: each sequence streamed whole in windows of ``window`` with carried state (sequences in
    parallel). ``mode="segments"``: sequences longer than ``segment_length`` are cut into segments processed
    in parallel, each warmed up from a zero state on the ``burn_in`` preceding elements; the deviation from
    exact is measured on the first ``deviation_sample`` segment boundaries (None/0: not measured).
    ``concurrency``: actors in the pool; ``num_cpus`` / ``num_gpus``: resources per actor. ``address``: join
    a running Ray cluster (None: use the running one or start a local one). ``progress``: True for a bar, or a
    callable taking ``JobProgress``. ``max_restarts``: how often a dead actor is restarted (its task retried).
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
            raise ConfigError(f"embed in segments mode needs segment_length (--segment-length {segment_length}) to be "
                              f"a multiple of window (--window {window}), so segments hold whole windows")
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
    store_path = os.path.abspath(os.fspath(store)) if isinstance(store, (str, os.PathLike)) and \
        "://" not in os.fspath(store) else os.fspath(store) if isinstance(store, (str, os.PathLike)) else None
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
            raise InputError(f"{job} needs a token model (next-element probabilities); the model in {model_path} "
                             f"(adapter {adapter.name!r}) predicts continuous frames")
        if job == "score" and info.length < 2:
            raise InputError(f"{where} holds {info.length} element(s): score needs at least 2")

    job_attrs = {"format": JOB_FORMAT, "job": job, "mode": mode, "window": window,
                 "segment_length": segment_length if mode == "segments" else None,
                 "burn_in": burn_in if mode == "segments" else None,
                 "model": {"path": model_path, "sha256": _file_sha256(model_path) if os.path.isfile(model_path)
                           else None, "fingerprint": getattr(model, "fingerprint", None),
                           "adapter": adapter.info()},
                 "store": source.where, "options": {k: v for k, v in options.items() if k != "device"}}
    key = _job_key(job_attrs)
    out = SequenceStore(output, "a")
    recorded = out.group.attrs.get("seqlab_job")
    if recorded is not None and _job_key(recorded) != key and not overwrite:
        raise InputError(f"output store {output} holds results of another job config ({recorded}); pass "
                         "overwrite=True (--overwrite) to replace them, or choose another output")
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
            pending, model_path, output, job, window, job_attrs, options, store_path, concurrency, num_cpus,
            num_gpus, address, progress, max_restarts, output_chunk_elements, _fault, started)
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
    out.group.update_attributes({"seqlab_job": {**job_attrs, "summary": result.summary,
                                                "deviation": result.deviation}})
    return result


def _map(ds, concurrency, num_cpus, num_gpus, max_restarts, worker_kwargs):
    """The job's ``map_batches``: an actor pool of ``JobWorker``, one item per call."""
    import ray

    return ds.map_batches(
        JobWorker, batch_size=1, num_cpus=num_cpus,
        # one item running and one queued per actor: no idle gap between items, and the items left at the end go to
        # whichever actor is free (Ray Data's default queues 4 per actor)
        compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=2),
        num_gpus=num_gpus or None, fn_constructor_kwargs=worker_kwargs,
        # a dead actor (its worker process killed, OOM, node lost) is restarted and its task retried, at most
        # max_restarts times (Ray Data's default is without limit). Ray 2.60 warns that remote args passed this way
        # (and ray_remote_args_fn) go away in Ray 2.64, but names no replacement for these two: pyproject caps ray
        # below 2.64.
        max_restarts=max_restarts, max_task_retries=max_restarts)


def _execute(items, model_path, output, job, window, job_attrs, options, store_path, concurrency,
             num_cpus, num_gpus, address, progress, max_restarts, output_chunk_elements, fault,
             started) -> tuple[dict, float]:
    import ray

    if not ray.is_initialized():
        if address:
            try:
                ray.init(address=address)
            except Exception as exc:  # no cluster there, refused, wrong auth token: one clear line
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
                raise InputError(f"cannot join the Ray cluster at {address!r}: {type(exc).__name__}: "
                                 f"{reason[:300]}") from exc
        else:  # an embedded local cluster
            ray.init(include_dashboard=False)
    _check_resources(num_cpus, num_gpus, concurrency, address)
    ended_marker = _job_marker(output)
    context = ray.data.DataContext.get_current()
    original = context.raise_original_map_exception
    context.raise_original_map_exception = True  # a worker's seqlab error reaches the driver as itself
    done, workers, work_seconds = 0, {}, 0.0
    bar = finished = batches = mapped = ds = failure = None
    try:
        # The rows (names and ranges, a few bytes each) are built here in the driver, one block per item (up to
        # MAX_BLOCKS), not by read tasks: every read task needs a worker process of its own, which imports Ray
        # Data, this module and torch (~2 CPU-seconds each, measured in bench/ray_scale.py), CPU taken from the
        # actors on a small machine.
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
        worker_options = {**options, "output_chunk_elements": output_chunk_elements,
                          "device": "cuda" if num_gpus else None}
        with warnings.catch_warnings():  # the deprecation below is known and handled: not the user's business
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            mapped = _map(ds, concurrency, num_cpus, num_gpus, max_restarts, {
                "model_path": model_path, "output": output, "job": job, "window": window, "job_attrs": job_attrs,
                "options": worker_options, "input_store": store_path, "num_threads": max(1, int(num_cpus)),
                "fault": fault, "ended_marker": ended_marker})
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), unit="item", desc=f"seqlab {job}")
        # every finished item as soon as it arrives (iter_rows prefetches a block, holding a finished item back
        # until the next one finishes)
        batches = mapped.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
        finished = (dict(zip(block, values)) for block in batches for values in zip(*block.values()))
        for row in finished:
            done += 1
            workers.setdefault(str(row["name"]), []).append(int(row["pid"]))
            work_seconds += float(row["seconds"])
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(JobProgress(done, len(items), str(row["name"]), int(row["segment"]),
                                     int(row["elements"]), time.time() - started, float(row["seconds"])))
    except Exception as exc:  # Ray may wrap the worker's error: raise ours, which names where
        inner = _unwrap(exc)
        failure = exc if inner is None else _fresh(inner)
        _release_frames(exc)  # what the job held goes with the job, not when the caller drops the error
    finally:
        # close the iteration now, not when the garbage collector gets to it (an exception's traceback keeps it
        # alive): that shuts the actor pool down and frees its CPUs for whatever runs next on the cluster
        try:
            for it in (finished, batches):
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        finally:
            finished = batches = mapped = ds = None  # nothing of the job stays reachable from this frame
            try:
                with open(ended_marker, "wb"):  # the job's actors end themselves now (_end_with_the_job)
                    pass
            except OSError:  # the output folder went away: the actors end when Ray Data lets their handles go
                pass
        if failure is not None:
            # Ray Data's executor, its metadata fetcher and the failed tasks form reference cycles (with the job's
            # blocks and the actors' handles); with the frames above cleared nothing live reaches them, so free them
            # now (once per failed job, well under a second) rather than at some later garbage collection
            gc.collect()
        context.raise_original_map_exception = original
        if bar is not None:
            bar.close()
    if failure is not None:
        raise failure  # raised here, after the except block, so it carries no context back into Ray's frames
    return workers, work_seconds


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
    report = {"segments": len(split), "positions": positions, "max_abs": float(every.max()),
              "mean_abs": float(every.mean()), "what": "bits per position" if job == "score" else
              "pooled hidden, max over features"}
    if job == "score":
        report.update(mean_bits_exact=total_exact / positions, mean_bits_segments=total_seg / positions)
    return report


def score(model_path, store, output, **options) -> JobResult:
    """Bits (-log2 p) of every element after the first, per sequence, with totals; see ``run_job``."""
    return run_job("score", model_path, store, output, **options)


def embed(model_path, store, output, **options) -> JobResult:
    """Mean-pooled hidden features of every window, ``(n_windows, d_model)`` per sequence; see ``run_job``."""
    return run_job("embed", model_path, store, output, **options)


def generate(model_path, store, output, *, max_new_tokens: int = 64, prompt_length: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             allow_specials: bool = False, **options) -> JobResult:
    """Continue every stored sequence (its last ``prompt_length`` elements, default all of it) by up to
    ``max_new_tokens`` tokens; sequence ``name`` samples with seed ``seed + crc32(name)``, so re-runs and
    retries give the same tokens. The model adapter's special tokens are never generated unless
    ``allow_specials=True``; its end token (if it has one) ends a continuation early either way."""
    from seqlab.generate import _check_sampling

    for what, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(allow_specials, bool):
        raise ConfigError(f"allow_specials must be True or False, got {allow_specials!r}")
    try:
        _check_sampling(max_new_tokens, temperature, top_k, top_p, None, 1.0)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    gen = {"max_new_tokens": max_new_tokens, "prompt_length": prompt_length, "temperature": temperature,
           "top_k": top_k, "top_p": top_p, "seed": seed, "allow_specials": allow_specials}
    return run_job("generate", model_path, store, output, options=gen, **options)


def _describe(result: JobResult) -> dict[str, Any]:
    return json.loads(json.dumps({"job": result.job, "output": result.output, "done": result.done,
                                  "skipped": result.skipped, "summary": result.summary,
                                  "deviation": result.deviation, "seconds": round(result.seconds, 2)},
                                 default=str))
