"""The work of one item of a Ray job, run in an actor (``JobWorker``) and by the driver for the deviation sample:
score, embed or generate one range of a stored sequence, streamed with carried state, into a staging array of the
output store; a finished array is moved into place (docs/ray-jobs.md)."""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from seqlab.errors import InputError

from .ray_plan import STAGING, _part_name
from .store import SequenceStore

__all__ = ["JobWorker"]


def _score_range(
    model,
    store: SequenceStore,
    name: str,
    warm: int,
    start: int,
    stop: int,
    window: int,
    sink: Callable[[np.ndarray], None],
) -> tuple[float, int]:
    """Bits of elements ``start+1 .. stop`` (inputs ``[start, stop)``), warmed up on ``[warm, start)`` from
    a zero state; ``sink`` receives float32 pieces in order. Returns (sum of bits, count)."""
    from .store_stream import stream_bits

    return stream_bits(model, store, name, window, start=start, stop=stop, warm=warm, sink=sink)


def _embed_range(
    model,
    store: SequenceStore,
    name: str,
    warm: int,
    start: int,
    stop: int,
    window: int,
    sink: Callable[[np.ndarray], None],
) -> tuple[float, int]:
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


def _generate_one(
    model, store: SequenceStore, name: str, window: int, options: dict, sink: Callable[[np.ndarray], None], adapter=None
) -> tuple[float, int]:
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
    # the job samples (seeded per sequence); temperature 0 still picks the argmax
    out = _generate(
        model,
        last,
        options["max_new_tokens"],
        do_sample=True,
        temperature=options.get("temperature", 1.0),
        top_k=options.get("top_k"),
        top_p=options.get("top_p"),
        seed=seed,
        state=state,
        **special,
    )
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

    def __init__(
        self,
        model_path: str,
        output: str,
        job: str,
        window: int,
        job_attrs: dict,
        options: dict | None = None,
        input_store: str = "",
        num_threads: int | None = None,
        fault: dict | None = None,
        ended_marker: str | None = None,
    ) -> None:
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
        if (
            not fault
            or fault.get("name") != item["name"]
            or fault.get("segment", item["segment"]) != item["segment"]
            or fault.get("when", "mid") != when
        ):
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
            writer.write(
                np.zeros((0, d), np.float32)
                if self.job == "embed"
                else np.zeros(0, np.int64 if token_out else np.float32)
            )
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
