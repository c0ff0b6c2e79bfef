"""Running the ladder: the output folder, the corpus in a Zarr store, the rungs in order with a checkpoint (the
rung's ``row.json``) after each, and ``--resume``.

The folder (default ``./ladder``)::

    .seqlab-ladder      marks a ladder folder (a non-empty folder without it is refused)
    plan.json           the settings, seed and corpus digest of the run (``--resume`` refuses a different plan)
    data/               the corpus cut into train / valid / heldout (raw bytes)
    store.zarr          the same three as sequences of byte ids (``ByteAdapter``), streamed by every rung
    01-moe/ ... 07-distill/   each rung's models, reports and its row.json (written last: the rung's checkpoint)
    summary.json, summary.md, ladder.png

A rung is done when its ``row.json`` exists and the files it names are there. ``--resume`` skips done rungs and
reruns the others, and every rung that reads from a rung that reran (``settings.NEEDS``); an interrupted rung
continues from its own checkpoints where its tool has them (training runs, self-rewarding iterations,
distillation stages). Without ``--resume`` a run starts over: the ladder's own outputs are removed first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from seqlab.errors import ConfigError, InputError
from seqlab.ladder.settings import NEEDS, RUNGS, LadderSettings

MARKER = ".seqlab-ladder"
FORMAT = 1
#: everything a run writes in its folder (removed when a run starts over; other files are left alone)
OUTPUTS = (
    "plan.json",
    "data",
    "store.zarr",
    *(name for _, name, _ in RUNGS),
    "summary.json",
    "summary.md",
    "ladder.png",
)
ROW_FILE = "row.json"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare_out(out, resume: bool) -> Path:
    """The output folder: new or empty, or an earlier ladder folder (its marker file is there); anything else
    is refused before anything is written. Without ``resume`` the ladder's own outputs are removed."""
    from seqlab.cli.demo_inputs import output_folder

    if resume and not (Path(out) / "plan.json").is_file():
        raise InputError(f"--resume: {out} holds no ladder run to resume (no plan.json); run without --resume")
    return output_folder(out, MARKER, OUTPUTS, "seqlab ladder", clear=not resume)


def split_corpus(corpus: bytes) -> dict[str, bytes]:
    """train / valid / heldout: the corpus's tail (``seqlab.cli.demo_inputs.heldout_size``) is cut in a third for
    LASER's choice (valid) and two thirds that nothing is chosen or trained on (heldout)."""
    from seqlab.cli.demo_inputs import heldout_size

    n = len(corpus)
    held = heldout_size(n)
    valid = held // 3
    return {
        "train": corpus[: n - held],
        "valid": corpus[n - held : n - held + valid],
        "heldout": corpus[n - held + valid :],
    }


class Ladder:
    """One run's context: the folder, settings, seed, data and how to report progress."""

    def __init__(
        self, out: Path, settings: LadderSettings, seed: int, corpus: bytes, corpus_what: str, progress: bool,
        resume: bool,
    ) -> None:  # fmt: skip
        self.out = out
        self.settings = settings
        self.seed = seed
        self.corpus = corpus
        self.corpus_what = corpus_what
        self.progress = progress
        self.resume = resume  # the tools a rung runs go on from their own checkpoints in its folder
        self.parts = split_corpus(corpus)
        self.store_path = out / "store.zarr"
        self.bar = None

    # -- the rung's progress bar -----------------------------------------------------------------------------
    def begin(self, number: int, stages: int) -> None:
        """Rung ``number``'s bar over its ``stages`` (training, searching, measuring ...); the tools it runs show
        their own bars below it."""
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=stages, desc=f"rung {number}/7", unit="stage", disable=not self.progress, leave=False)

    @contextmanager
    def stage(self, what: str):
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=True)
        yield
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # -- paths and data --------------------------------------------------------------------------------------
    def folder(self, number: int) -> Path:
        return self.out / RUNGS[number - 1][1]

    def store(self, mode: str = "r"):
        from seqlab.pipelines.store import SequenceStore

        return SequenceStore(self.store_path, mode)

    def plan(self) -> dict:
        return {
            "seqlab_ladder": FORMAT,
            "seed": self.seed,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.settings).items()},
            "corpus": {"what": self.corpus_what, "bytes": len(self.corpus), "sha256": _digest(self.corpus)},
        }

    def ingest(self) -> dict:
        """data/{train,valid,heldout}.bin and store.zarr (skipped when both are there with the same bytes)."""
        from seqlab.domains.bytes import ByteAdapter
        from seqlab.pipelines.store import ingest

        adapter = ByteAdapter()
        data = self.out / "data"
        data.mkdir(exist_ok=True)
        lengths = {}
        paths = []
        for name, part in self.parts.items():
            path = data / f"{name}.bin"
            if not (path.is_file() and path.read_bytes() == part):
                adapter.write(path, part)
            paths.append(path)
            lengths[name] = len(part)
        if self.store_path.exists():
            try:
                store = self.store()
                if all(store.describe(n).length == length for n, length in lengths.items()):
                    return lengths
            except Exception:  # noqa: BLE001 - an unreadable or partial store is written again below
                pass
        ingest(self.store("a"), paths, adapter, names=list(lengths), overwrite=True, progress=self.progress)
        return lengths


OUT = "<out>/"  # how row.json writes a path inside the run's folder, so a moved or copied folder still resumes


def _swap(value, old: str, new: str):
    """``value`` with every string that starts with ``old`` starting with ``new`` instead (dicts, lists)."""
    if isinstance(value, str):
        return new + value[len(old) :] if value.startswith(old) else value
    if isinstance(value, dict):
        return {k: _swap(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap(v, old, new) for v in value]
    return value


def _row_done(out: Path, folder: Path) -> dict | None:
    """The rung's record when it finished and every file it names is still there."""
    path = folder / ROW_FILE
    if not path.is_file():
        return None
    try:
        record = _swap(json.loads(path.read_text()), OUT, f"{out}{os.sep}")
    except ValueError:
        return None
    if not all(Path(f).exists() for f in record.get("files", [])):
        return None
    return record


def run_ladder(
    settings: LadderSettings,
    out,
    *,
    corpus: bytes | None = None,
    corpus_what: str | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    say=print,
) -> dict:
    """Climb the ladder into ``out`` and return the summary (also ``summary.json``, ``summary.md`` and
    ``ladder.png`` there). ``corpus``: the text (default: the CPython documentation text every Python has)."""
    from seqlab.cli.demo_inputs import MIN_CORPUS, python_docs
    from seqlab.io import atomic_write_bytes
    from seqlab.ladder.report import write_report
    from seqlab.ladder.rungs import RUN

    if not isinstance(settings, LadderSettings):
        raise ConfigError(f"settings must be a LadderSettings, got {type(settings).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    if corpus is None:
        corpus, corpus_what = python_docs(), "the CPython documentation text (pydoc_data.topics)"
    if len(corpus) < MIN_CORPUS:
        raise InputError(f"the corpus has {len(corpus):,} bytes; the ladder needs at least {MIN_CORPUS:,}")
    started = time.perf_counter()
    out = prepare_out(out, resume).resolve()
    ladder = Ladder(out, settings, seed, corpus, corpus_what or "the given text", progress, resume)
    plan = ladder.plan()
    plan_path = out / "plan.json"
    if resume:
        before = json.loads(plan_path.read_text())
        if before != plan:
            changed = sorted(k for k in set(before) | set(plan) if before.get(k) != plan.get(k))
            raise InputError(
                f"--resume: {out}'s run was made with other {', '.join(changed)} than this one; resume it with the "
                "same options, or start over without --resume"
            )
    else:
        atomic_write_bytes(plan_path, json.dumps(plan, indent=1).encode() + b"\n")
    say(f"seqlab ladder -> {out}/  ({len(corpus):,} bytes of {ladder.corpus_what})")
    lengths = ladder.ingest()
    say("  store.zarr: " + ", ".join(f"{k} {v:,} bytes" for k, v in lengths.items()))
    records: dict[int, dict] = {}
    reran: set[int] = set()
    for number, name, what in RUNGS:
        folder = ladder.folder(number)
        done = _row_done(out, folder) if resume else None
        stale = any(n in reran for n in NEEDS[number])
        if done is not None and not stale:
            records[number] = done
            say(f"[{number}/7] {what}: done earlier ({done['seconds']:.1f} s), skipped")
            continue
        if folder.exists() and (stale or not resume):  # nothing partial from another run is reused
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ROW_FILE).unlink(missing_ok=True)
        say(f"[{number}/7] {what}")
        t = time.perf_counter()
        try:
            record = RUN[number](ladder, folder, records)
        finally:
            ladder.close()
        record["seconds"] = time.perf_counter() - t
        record["rung"] = number
        record["name"] = name
        saved = _swap(record, f"{out}{os.sep}", OUT)
        atomic_write_bytes(folder / ROW_FILE, json.dumps(saved, indent=1, allow_nan=False).encode() + b"\n")
        records[number] = record
        reran.add(number)
        for r in record["rows"]:
            say("      " + _line(r))
        say(f"      ({record['seconds']:.1f} s)")
    summary = _swap(
        {
            **plan,
            "out": str(out),
            "sequences": lengths,
            "reran": sorted(reran),
            "rows": [r for n in sorted(records) for r in records[n]["rows"]],
            "rungs": {str(n): {k: v for k, v in records[n].items() if k != "rows"} for n in sorted(records)},
            "seconds_this_call": time.perf_counter() - started,
            "seconds_all_rungs": sum(records[n]["seconds"] for n in records),
        },
        f"{out}{os.sep}",
        "",
    )  # paths in the summary are relative to the run's folder
    write_report(summary, out)
    say(f"  {out / 'summary.md'}, {out / 'summary.json'}, {out / 'ladder.png'}")
    return summary


def _line(r: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (
        f"{r['rung']:<3} {r['label']:<22} bpb {num(r['heldout_bpb'], '.3f')}  acc {num(r['task_accuracy'], '.2f')}  "
        f"params {num(r['params_total'], ',')}/{num(r['params_active'], ',')}  {num(r['bytes_on_disk'], ',')} B  "
        f"{num(r['decode_bytes_per_s'], ',.0f')} B/s" + (f"  {r['notes']}" if r["notes"] else "")
    )
