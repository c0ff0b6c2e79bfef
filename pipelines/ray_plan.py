"""A Ray job's plan and results: settings checks, the output check, work items (names and ranges only) and the
``JobResult`` / ``JobProgress`` a job returns and reports (docs/ray-jobs.md)."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

from seqlab.errors import ConfigError, InputError

from .store import SequenceStore

__all__ = ["JobProgress", "JobResult", "plan_items"]

JOBS = ("score", "embed", "generate")
MODES = ("exact", "segments")
STAGING = "_staging"  # subgroup of the output store holding outputs and segments being written
JOB_FORMAT = 1
MAX_BLOCKS = 1024  # rows of work handed to Ray Data in at most this many blocks (one item per block below)


# ------------------------------------------------------------------------------------------------------
# plans and results


@dataclass(frozen=True)
class JobProgress:
    """Passed to a job's ``progress`` callable after every finished work item."""

    done: int  # items finished in this run
    total: int  # items this run had to do
    sequence: str
    segment: int
    elements: int  # elements this item covered
    seconds: float  # wall time since the job started
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
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or 0 < value < 1e-4
    ):
        raise ConfigError(f"{what} must be 0 or a finite number >= 0.0001 (Ray's resource unit), got {value!r}")


def _check_output(output: str, store_path: str) -> None:
    """Refuse an output that is not a job's own: the input store itself (or a folder inside or around it), a file,
    a folder of other files, or a sequence store that no job wrote. A job replaces ``<output>/<sequence name>``
    folders when it moves finished outputs into place: pointed at anything else it would delete what is there."""
    real_out, real_in = os.path.realpath(output), os.path.realpath(store_path)
    if real_out == real_in or real_out.startswith(real_in + os.sep) or real_in.startswith(real_out + os.sep):
        what = (
            "the input store"
            if real_out == real_in
            else "inside the input store"
            if real_out.startswith(real_in)
            else "a folder holding the input store"
        )
        raise ConfigError(
            f"output {output} is {what} {store_path}: choose another output (a job replaces the "
            "output's sequence folders)"
        )
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output):
        raise InputError(f"output {output} exists and is not a folder: choose a new or empty folder")
    entries = set(os.listdir(output))
    if "zarr.json" not in entries:
        if entries:
            raise InputError(
                f"output {output} is a folder with other files in it ({', '.join(sorted(entries)[:3])}"
                f"{' ...' if len(entries) > 3 else ''}), not a job's output store: choose a new or empty "
                "folder"
            )
        return
    existing = SequenceStore(output, "r")
    if existing.group.attrs.get("seqlab_job") is None and existing.list():
        raise InputError(
            f"output {output} is a sequence store that no seqlab job wrote (it holds "
            f"{', '.join(existing.list()[:3])}{' ...' if len(existing.list()) > 3 else ''}): a job would "
            "replace those sequences; choose another output"
        )


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


def plan_items(
    store: SequenceStore, names: list[str], job: str, mode: str, segment_length: int | None, burn_in: int
) -> list[dict]:
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
            items.append(
                {
                    "name": name,
                    "segment": k,
                    "n_segments": len(bounds),
                    "start": start,
                    "stop": stop,
                    "warm": max(0, start - burn_in),
                }
            )
    return items


def _part_name(item: dict) -> str:
    if item["n_segments"] == 1:
        return f"{item['name']}.whole"
    return f"{item['name']}.seg-{item['segment']:06d}-of-{item['n_segments']:06d}"
