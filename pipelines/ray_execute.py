"""Running a job's work items through Ray Data's actor pool of ``JobWorker`` (the driver's side): Ray started or
joined, the pool mapped over rows built in the driver, every finished item reported as it arrives, and a failure
raised as the worker's own error with the job's actors released (docs/ray-jobs.md)."""

from __future__ import annotations

import gc
import time
import warnings

from .ray_cluster import check_resources, connect, quiet_ray
from .ray_errors import _fresh, _release_frames, _unwrap
from .ray_plan import MAX_BLOCKS, JobProgress
from .ray_work import JobWorker, _job_marker

__all__: list[str] = []


def _map(ds, concurrency, num_cpus, num_gpus, max_restarts, worker_kwargs):
    """The job's ``map_batches``: an actor pool of ``JobWorker``, one item per call."""
    import ray

    return ds.map_batches(
        JobWorker,
        batch_size=1,
        num_cpus=num_cpus,
        # one item running and one queued per actor: no idle gap between items, and the items left at the end go to
        # whichever actor is free (Ray Data's default queues 4 per actor)
        compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=2),
        num_gpus=num_gpus or None,
        fn_constructor_kwargs=worker_kwargs,
        # a dead actor (its worker process killed, OOM, node lost) is restarted and its task retried, at most
        # max_restarts times (Ray Data's default is without limit). Ray 2.60 warns that remote args passed this way
        # (and ray_remote_args_fn) go away in Ray 2.64, but names no replacement for these two: pyproject caps ray
        # below 2.64.
        max_restarts=max_restarts,
        max_task_retries=max_restarts,
    )


def _execute(
    items,
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
    fault,
    started,
    quiet,
) -> tuple[dict, float]:
    connect(address, quiet=quiet)
    # no more actors than items: each costs a worker start and a model load, and Ray Data warns of the idle ones
    concurrency = min(concurrency, len(items))
    check_resources(num_cpus, num_gpus, concurrency, address)
    with quiet_ray(quiet):
        return _run_items(
            items,
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
            None if quiet and progress is True else progress,
            max_restarts,
            output_chunk_elements,
            fault,
            started,
        )


def _run_items(
    items,
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
    progress,
    max_restarts,
    output_chunk_elements,
    fault,
    started,
) -> tuple[dict, float]:
    """The job's items through the actor pool, each finished item reported as soon as it arrives."""
    import ray

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
        worker_options = {
            **options,
            "output_chunk_elements": output_chunk_elements,
            "device": "cuda" if num_gpus else None,
        }
        with warnings.catch_warnings():  # the deprecation below is known and handled: not the user's business
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            mapped = _map(
                ds,
                concurrency,
                num_cpus,
                num_gpus,
                max_restarts,
                {
                    "model_path": model_path,
                    "output": output,
                    "job": job,
                    "window": window,
                    "job_attrs": job_attrs,
                    "options": worker_options,
                    "input_store": store_path,
                    "num_threads": max(1, int(num_cpus)),
                    "fault": fault,
                    "ended_marker": ended_marker,
                },
            )
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
                progress(
                    JobProgress(
                        done,
                        len(items),
                        str(row["name"]),
                        int(row["segment"]),
                        int(row["elements"]),
                        time.time() - started,
                        float(row["seconds"]),
                    )
                )
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
