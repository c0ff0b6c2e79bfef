"""``seqlab demo``: seqlab end to end on text every Python install has, in a few minutes on a laptop CPU.

Five steps, everything written under one output folder (default ``./seqlab-demo``):

1. ingest: the CPython documentation text shipped with the interpreter (``pydoc_data.topics``), split into a
   training part and a held-out tail, plus a 1 MiB sequence (that text followed by the standard library's own
   ``.py`` sources), into a Zarr sequence store (``store.zarr``) through ``ByteAdapter``;
2. train: a small byte-level Mamba (MambaByte) on the training part, streamed from the store
   (``StoreSource`` + ``Trainer``), then bits per byte of the held-out tail against the uniform 8;
3. generate: a sampled continuation of a prompt;
4. score: the Ray ``score`` job on an embedded local Ray cluster over the 1 MiB sequence (per-position bits in
   ``scores.zarr``) and a plot of bits per byte along the position (``bpb.png``);
5. memory: the model is fine-tuned on an agent-memory stream made from the training text (stored in the same
   store by ``MemoryStreamAdapter``), then a memory session observes events, saves, closes, and is reopened
   from disk alone; the restored state and its (seeded, sampled) answer are compared with the live ones.

Every number printed is computed by the run and kept in ``summary.json``. ``--text FILE...`` trains on your own
files and ``--big FILE`` scores your own long sequence; ``--quick`` is a tiny budget (well under two minutes).
Re-running into a demo folder replaces the demo's own outputs and leaves other files alone; a non-empty folder
that is not a demo folder is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from seqlab.cli_args import count, seed, threads
from seqlab.errors import ConfigError, InputError

MARKER = ".seqlab-demo"
#: what a demo run writes in its folder (and replaces when run again there); nothing else is touched
OUTPUTS = ("data", "store.zarr", "train-log.jsonl", "checkpoint", "model.safetensors", "scores.zarr", "bpb.png",
           "memory-model.safetensors", "memory.session", "summary.json")
LONG_BYTES = 1 << 20            # the long sequence scored in step 4 (built from the corpus + stdlib sources)
HELDOUT_FRACTION = 0.05
HELDOUT_MAX = 64 * 1024
MIN_CORPUS = 8 * 1024
EVENT_TIME = 1714564800.0       # the memory events' timestamps (fixed, so a re-run observes the same bytes)
DEFAULT_PROMPT = 'The "with" statement'


@dataclass(frozen=True)
class Budget:
    """Model and training sizes of a run."""

    steps: int
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16
    batch_size: int = 16
    window: int = 128
    lr: float = 4e-3
    new_tokens: int = 200
    memory_steps: int = 150       # fine-tuning on the memory stream before the session
    answer_tokens: int = 120


FULL = Budget(steps=600)
QUICK = Budget(steps=40, new_tokens=80, memory_steps=10, answer_tokens=40)


@dataclass
class Inputs:
    """What the run reads: the corpus (embedded or the user's files) and the long sequence's parts."""

    corpus: bytes
    corpus_what: str
    big: Path | None = None               # the user's long sequence (used as is)
    long_parts: list[dict] = field(default_factory=list)   # {"what", "bytes"} for a built long sequence
    prompt: str = DEFAULT_PROMPT


# ------------------------------------------------------------------------------------------------------
# inputs and the output folder


def python_docs() -> bytes:
    """The CPython documentation text shipped with every interpreter (topics in sorted order)."""
    from pydoc_data import topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def stdlib_sources() -> list[Path]:
    """The standard library's top-level ``.py`` files, sorted by name (real code present on every install)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def _read_user_file(path: str, flag: str) -> bytes:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise InputError(f"{flag} {path}: not a file")
    data = p.read_bytes()
    if not data:
        raise InputError(f"{flag} {path}: file is empty")
    return data


def resolve_inputs(texts: list[str] | None = None, big: str | None = None, prompt: str | None = None) -> Inputs:
    """Check and read the inputs (nothing is written): the corpus from ``texts`` (default the CPython docs text)
    and either the user's ``big`` file or the parts of a 1 MiB sequence made of the corpus and stdlib sources."""
    if texts:
        corpus = b"".join(_read_user_file(t, "--text") for t in texts)
        what = ", ".join(texts) if len(texts) <= 3 else f"{texts[0]} and {len(texts) - 1} more files"
        if len(corpus) < MIN_CORPUS:
            raise InputError(f"--text {what}: {len(corpus):,} bytes in all, the demo needs at least {MIN_CORPUS:,} "
                             "(a training part and a held-out tail)")
        default_prompt = corpus[-_heldout_size(len(corpus)):][:24].decode("utf-8", errors="ignore").strip() or "The"
    else:
        corpus, what, default_prompt = python_docs(), "the CPython documentation text (pydoc_data.topics)", \
            DEFAULT_PROMPT
    inputs = Inputs(corpus, what, prompt=default_prompt if prompt is None else prompt)
    if not inputs.prompt:
        raise ConfigError("--prompt must not be empty")
    if big is not None:
        p = Path(big)
        if not p.is_file():
            raise InputError(f"--big {big}: {'no such file' if not p.exists() else 'not a file'}")
        if p.stat().st_size < 2:
            raise InputError(f"--big {big}: {p.stat().st_size} byte(s), scoring needs at least 2")
        inputs.big = p
        return inputs
    take = min(len(corpus), LONG_BYTES)
    inputs.long_parts.append({"what": "corpus" if texts else "CPython docs text", "bytes": take})
    need = LONG_BYTES - take
    files = []
    for path in stdlib_sources():
        if need <= 0:
            break
        size = min(path.stat().st_size, need)
        if size:
            files.append(path)
            need -= size
    if files:
        inputs.long_parts.append({"what": f"Python stdlib sources ({len(files)} .py files, {files[0].name} .. "
                                          f"{files[-1].name})", "bytes": LONG_BYTES - take - need,
                                  "files": [str(f) for f in files]})
    return inputs


def _heldout_size(n: int) -> int:
    return max(2, min(int(n * HELDOUT_FRACTION), HELDOUT_MAX))


def prepare_out(out: str | os.PathLike) -> Path:
    """The output folder, ready for a run: created when missing; in an earlier demo folder (it holds the marker
    file) the demo's own outputs are removed and other files are left; any other non-empty folder is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(f"--out {out}: the folder is not empty and is not a seqlab demo folder (no {MARKER}); "
                         "choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    (out / MARKER).write_text(json.dumps({"what": "seqlab demo output folder", "outputs": list(OUTPUTS)}) + "\n")
    return out


# ------------------------------------------------------------------------------------------------------
# the steps


def step_ingest(inputs: Inputs, out: Path, progress: bool) -> dict:
    """Write the corpus parts (and the built long sequence) under ``data/`` and ingest them into store.zarr."""
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines.store import SequenceStore, ingest

    adapter = ByteAdapter()
    data = out / "data"
    data.mkdir(exist_ok=True)
    n = len(inputs.corpus)
    held = _heldout_size(n)
    adapter.write(data / "train.bin", inputs.corpus[:n - held])
    adapter.write(data / "heldout.bin", inputs.corpus[n - held:])
    paths, names = [data / "train.bin", data / "heldout.bin"], ["train", "heldout"]
    if inputs.big is None:
        pieces, remaining = [inputs.corpus[:LONG_BYTES]], LONG_BYTES - min(n, LONG_BYTES)
        for path in (inputs.long_parts[1]["files"] if len(inputs.long_parts) > 1 else []):
            piece = Path(path).read_bytes()[:remaining]
            pieces.append(piece)
            remaining -= len(piece)
        adapter.write(data / "long.bin", b"".join(pieces))
        paths.append(data / "long.bin")
    else:
        paths.append(inputs.big)
    names.append("long")
    store_path = out / "store.zarr"
    store = SequenceStore(store_path, "a")
    results = ingest(store, paths, adapter, names=names, overwrite=True, progress=progress)
    # the agent-memory stream of step 5: the training text as question/answer events (JSON Lines)
    from seqlab.domains.memory import MemoryStreamAdapter

    memory = MemoryStreamAdapter()
    events = memory_events(inputs.corpus[:n - held])
    memory.write(data / "memory-events.jsonl", events)
    results += ingest(store, data / "memory-events.jsonl", memory, names="memory", overwrite=True,
                      progress=progress)
    lengths = {r.name: r.info.length for r in results}
    regions = []  # where each kind of text lies in the long sequence (element ranges)
    if inputs.big is None:
        start = 0
        for part in inputs.long_parts:
            if part is inputs.long_parts[0]:  # the corpus: its trained part, then its held-out tail
                cut = min(n - held, part["bytes"])
                regions.append({"what": "trained-on text", "start": 0, "stop": cut})
                if part["bytes"] > cut:
                    regions.append({"what": "held-out text", "start": cut, "stop": part["bytes"]})
            else:
                regions.append({"what": "stdlib .py code (unseen)", "start": start, "stop": start + part["bytes"]})
            start += part["bytes"]
    else:
        regions.append({"what": str(inputs.big), "start": 0, "stop": lengths["long"]})
    return {"store": str(store_path), "sequences": lengths, "corpus_bytes": n, "corpus": inputs.corpus_what,
            "memory_events": len(events),
            "long_source": str(inputs.big) if inputs.big is not None else
            " + ".join(f"{p['what']} ({p['bytes']:,})" for p in inputs.long_parts),
            "long_regions": regions}


def memory_events(text: bytes, limit: int = 600) -> list:
    """Question/answer events from a text, for teaching a byte model the event format: every paragraph (blank
    line separated) becomes a user event holding its first line and an assistant event holding the rest (at
    most ``limit`` characters). Times are fixed, a second apart."""
    from seqlab.domains.memory import Event

    chars = text.decode("utf-8", errors="replace")
    events, covered = [], 0
    for paragraph in chars.split("\n\n"):
        first, _, rest = paragraph.strip("\n").partition("\n")
        first, rest = first.strip(), rest.strip("\n")
        if len(first) < 3 or len(rest) < 20:
            continue
        t = EVENT_TIME - 10_000_000 + 2 * len(events)
        events += [Event("user", first[:120], t), Event("assistant", rest[:limit], t + 1)]
        covered += len(first[:120]) + len(rest[:limit])
    if covered < len(chars) // 2:  # a text with few paragraphs: fixed-size pieces of all of it instead
        events = []
        for i in range(0, len(chars), limit):
            t = EVENT_TIME - 10_000_000 + 2 * len(events)
            events += [Event("user", "Continue.", t), Event("assistant", chars[i:i + limit], t + 1)]
    return events


def step_train(out: Path, budget: Budget, seed: int, progress: bool):
    """Train on ``train`` from the store; held-out bits per byte before and after. Returns (model, report)."""
    import torch

    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines.store import SequenceStore, StoreSource
    from seqlab.pipelines.stream import stream_bits
    from seqlab.train import TrainConfig, Trainer

    adapter = ByteAdapter()
    store = SequenceStore(out / "store.zarr", "r")
    torch.manual_seed(seed)
    model = adapter.build_model(BackboneConfig(d_model=budget.d_model, n_layer=budget.n_layer,
                                               d_state=budget.d_state))
    params = sum(p.numel() for p in model.parameters())
    source = StoreSource(store, "train", budget.batch_size, budget.window, model=model)
    config = TrainConfig(max_steps=budget.steps, batch_size=budget.batch_size, window=budget.window, lr=budget.lr,
                         warmup_steps=min(20, budget.steps), progress=progress, seed=seed,
                         log_path=str(out / "train-log.jsonl"), checkpoint_dir=str(out / "checkpoint"))
    trainer = Trainer(model, config, source, loss_fn=adapter.loss, metric_fn=adapter.metric)
    model.eval()
    bits0, _ = stream_bits(model, store, "heldout")
    started = time.perf_counter()
    records = trainer.fit()
    seconds = time.perf_counter() - started
    trainer.save_checkpoint()
    model.eval()
    bits, scored = stream_bits(model, store, "heldout")
    model_path = save_model(out / "model.safetensors", model)
    tokens = budget.steps * budget.batch_size * budget.window
    last = records[-min(20, len(records)):]
    return model, {
        "model": f"MambaByte ({model.config.ssm}, d_model={budget.d_model}, n_layer={budget.n_layer}, "
                 f"d_state={budget.d_state})",
        "parameters": params, "steps": budget.steps, "batch_size": budget.batch_size, "window": budget.window,
        "epochs": records[-1]["epoch"] + (trainer.pos.window / source.num_windows),
        "train_seconds": seconds, "train_bytes_per_s": tokens / seconds,
        "train_loss_bpb_last20": sum(r["loss"] for r in last) / len(last) / math.log(2),
        "heldout_bpb_untrained": bits0 / scored, "heldout_bpb": bits / scored, "heldout_predictions": scored,
        "uniform_bpb": adapter.uniform_baseline(), "model_file": str(model_path),
        "checkpoint": str(out / "checkpoint"), "log": str(out / "train-log.jsonl")}


def step_generate(model, prompt: str, new_tokens: int, seed: int) -> dict:
    from seqlab.domains.bytes import ByteAdapter

    adapter = ByteAdapter()
    ids = adapter.encode(prompt)
    started = time.perf_counter()
    result = model.generate(ids, new_tokens, temperature=0.7, top_k=20, seed=seed)
    seconds = time.perf_counter() - started
    tokens = result.tokens[0]
    return {"prompt": prompt, "continuation": adapter.decode_text(tokens), "new_bytes": len(tokens),
            "temperature": 0.7, "top_k": 20, "seed": seed, "generate_seconds": seconds,
            "bytes_per_s": len(tokens) / seconds if seconds > 0 else None}


def step_score(out: Path, workers: int, progress: bool, regions: list[dict], deviation_sample: int = 1) -> dict:
    """The Ray ``score`` job over ``long`` on an embedded local cluster, then the plot."""
    import logging

    import numpy as np
    import ray

    from seqlab.pipelines.ray_jobs import score
    from seqlab.pipelines.store import SequenceStore

    store = SequenceStore(out / "store.zarr", "r")
    length = store.describe("long").length
    positions = length - 1
    # segments mode splits the sequence into 4 segments per worker (each warmed up on the 4,096 bytes before it);
    # the job measures its deviation from an exact carried-state run at the first segment boundary
    segments = 4 * workers if workers > 1 and positions >= 8 * 4096 * workers else 1
    segment_length = -(-positions // segments)
    started = time.perf_counter()
    own_cluster = not ray.is_initialized()
    quiet_loggers = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
    with warnings.catch_warnings():
        # Ray's notes about its own settings (auth tokens, deprecated remote args, Ray Data's plan) are not the
        # demo's business; errors still surface as exceptions
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        for name in quiet_loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        backend_level = os.environ.get("RAY_BACKEND_LOG_LEVEL")
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        try:
            if own_cluster:
                # address="local": always a new embedded cluster, even when RAY_ADDRESS names another one
                ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level=logging.ERROR,
                         log_to_driver=False)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # the job's own bar (or none with --quiet)
            ray_seconds = time.perf_counter() - started
            result = score(str(out / "model.safetensors"), str(out / "store.zarr"), str(out / "scores.zarr"),
                           names=["long"], window=4096, mode="segments" if segments > 1 else "exact",
                           segment_length=segment_length if segments > 1 else None, burn_in=4096,
                           deviation_sample=deviation_sample, concurrency=workers, num_cpus=1, progress=progress,
                           overwrite=True)
        finally:
            if own_cluster:
                ray.shutdown()
            if backend_level is None:
                os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
            for name, level in quiet_loggers.items():
                logging.getLogger(name).setLevel(level)
    bits = SequenceStore(out / "scores.zarr", "r").read("long", raw=True).astype(np.float64)
    report = {"output": str(out / "scores.zarr"), "sequence_bytes": length, "positions": int(bits.shape[0]),
              "mean_bpb": result.summary["mean_bits"], "mode": "segments" if segments > 1 else "exact",
              "segments": segments, "workers": workers, "ray_start_seconds": ray_seconds,
              "job_seconds": result.seconds, "bytes_per_s": positions / result.seconds,
              "deviation": result.deviation, "regions": []}
    for region in regions:  # score position i holds the bits of element i + 1
        lo, hi = max(region["start"] - 1, 0), min(region["stop"] - 1, bits.shape[0])
        if hi > lo:
            report["regions"].append({**region, "mean_bpb": float(bits[lo:hi].mean())})
    report["plot"] = plot_bpb(bits, report["regions"], report["mean_bpb"], out / "bpb.png")
    return report


def plot_bpb(bits, regions: list[dict], mean: float, path: Path) -> str:
    """Bits per byte along the position (moving average), the uniform 8-bit line and the mean, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    n = bits.shape[0]
    smooth = max(1, min(4096, n // 64))
    sums = np.concatenate([[0.0], np.cumsum(bits)])
    ends = np.unique(np.linspace(smooth, n, num=min(2000, n - smooth + 1)).astype(np.int64))
    averaged = (sums[ends] - sums[ends - smooth]) / smooth
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    shades = ["#dbe9f6", "#fde3c8", "#e3f1dc", "#eee"]
    for k, region in enumerate(regions):
        ax.axvspan(region["start"], region["stop"], color=shades[k % len(shades)], lw=0,
                   label=f"{region['what']}: {region['mean_bpb']:.2f}")
    ax.plot(ends - smooth / 2, averaged, color="#1f4e9a", lw=1.2, label=f"bits/byte ({smooth:,}-byte moving mean)")
    ax.axhline(8.0, color="#c0392b", ls="--", lw=1, label="uniform baseline 8")
    ax.axhline(mean, color="#2e7d32", ls=":", lw=1.4, label=f"mean {mean:.3f}")
    ax.set_xlim(0, n + 1)
    ax.set_ylim(0, max(9.0, float(averaged.max()) * 1.05))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:,.0f}k" if x else "0"))
    ax.set_xlabel("position (bytes)")
    ax.set_ylabel("bits per byte")
    ax.set_title("seqlab demo: bits per byte along the sequence (Ray score job)", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7.5, ncol=3, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def step_memory(model, out: Path, budget: Budget, seed: int, progress: bool) -> dict:
    """The trained byte model, fine-tuned on the stored memory stream (same 256-byte vocabulary) so that it
    knows the event format, runs a memory session: observe, save, observe more (kept in the write-ahead log),
    ask; close; reopen from disk alone and compare."""
    import torch

    from seqlab.checkpoint import save_model
    from seqlab.domains.memory import Event, MemoryStreamAdapter
    from seqlab.domains.session import MemorySession, model_for_session, replay_state
    from seqlab.pipelines.store import SequenceStore, StoreSource
    from seqlab.train import TrainConfig, Trainer

    adapter = MemoryStreamAdapter()
    memory_model = adapter.build_model(model.config)
    memory_model.load_state_dict(model.state_dict())
    source = StoreSource(SequenceStore(out / "store.zarr", "r"), "memory", budget.batch_size, budget.window,
                         model=memory_model)
    config = TrainConfig(max_steps=budget.memory_steps, batch_size=budget.batch_size, window=budget.window,
                         lr=budget.lr / 2, warmup_steps=min(10, budget.memory_steps), progress=progress, seed=seed)
    started = time.perf_counter()
    records = Trainer(memory_model, config, source, loss_fn=adapter.loss, metric_fn=adapter.metric).fit()
    tune_seconds = time.perf_counter() - started
    last = records[-min(20, len(records)):]
    memory_model.eval()
    model_file = save_model(out / "memory-model.safetensors", memory_model)
    path = out / "memory.session"
    sampling = {"temperature": 0.7, "top_k": 20, "seed": seed}
    events = [Event("system", "You answer questions about Python from its documentation.", EVENT_TIME),
              Event("user", "What does the with statement do?", EVENT_TIME + 1),
              Event("assistant", "It wraps a block in the methods of a context manager.", EVENT_TIME + 2),
              Event("user", "And the return statement?", EVENT_TIME + 3)]
    with torch.no_grad():
        live = MemorySession.open(path, memory_model, create=True, model_file=model_file)
        try:
            live.observe(events[:3])
            snapshot = live.save()
            live.observe(events[3])  # after the snapshot: only in the write-ahead log when the session closes
            answer = live.ask(None, budget.answer_tokens, time=EVENT_TIME + 4, **sampling)
            live_state, live_position, live_events = live.state, live.position, live.event_count
        finally:
            live.close()
        # reopen with a model rebuilt from the file the session recorded (sha256-checked), as a new process would
        restored_model, restored_adapter = model_for_session(path)
        with MemorySession.open(path, restored_model, mode="r", adapter=restored_adapter) as restored:
            again = restored.ask(None, budget.answer_tokens, time=EVENT_TIME + 4, **sampling)
            state = restored.state
            info = restored.info()
            position, count = restored.position, restored.event_count
        replayed = replay_state(restored_model, events, restored_adapter)
    names = sorted(live_state.tensors())
    same_state = names == sorted(state.tensors()) and all(
        torch.equal(live_state.tensors()[k], state.tensors()[k]) for k in names)
    same_replay = all(torch.equal(replayed.tensors()[k], state.tensors()[k]) for k in names)
    return {"finetune_steps": budget.memory_steps, "finetune_seconds": tune_seconds,
            "finetune_loss_bpb_last20": sum(r["loss"] for r in last) / len(last) / math.log(2),
            "session": str(path), "model_file": str(model_file), "events": count, "events_in_snapshot": 3,
            "events_replayed_from_log": count - 3, "snapshot": snapshot, "position": position,
            "state_bytes": live_state.nbytes(), "state_tensors": len(names),
            "sampling": sampling, "answer": answer.text, "answer_bytes": len(answer.tokens),
            "answer_stop": answer.stop_reason,
            "restored_answer": again.text, "restored_answer_identical": again.tokens == answer.tokens,
            "restored_state_identical": bool(same_state and position == live_position and count == live_events),
            "replayed_state_identical": bool(same_replay), "files": sorted(os.listdir(path)),
            "sizes": info.get("sizes")}


# ------------------------------------------------------------------------------------------------------
# the command


def _short(text: str, limit: int = 200) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run(args) -> dict:
    """Run the demo for parsed ``args``; returns the summary (also written to ``summary.json``)."""
    started = time.perf_counter()
    budget = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args.steps}")
        budget = Budget(**{**asdict(budget), "steps": args.steps})
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    inputs = resolve_inputs(args.text, args.big, args.prompt)
    out = prepare_out(args.out)
    import torch

    torch.set_num_threads(args.threads)
    bars = not args.quiet
    def say(text: str = "") -> None:
        print(text, flush=True)

    seconds: dict[str, float] = {}
    summary: dict = {"seqlab_demo": 1, "run": "quick" if args.quick else "full", "seed": args.seed,
                     "threads": args.threads, "workers": args.workers,
                     "out": str(out), "budget": asdict(budget), "seconds": seconds}
    say(f"seqlab demo ({summary['run']} run) -> {out}/")

    t = time.perf_counter()
    say(f"[1/5] ingest: {inputs.corpus_what}, {len(inputs.corpus):,} bytes")
    ing = step_ingest(inputs, out, bars)
    seconds["ingest"] = time.perf_counter() - t
    summary["ingest"] = ing
    seq = ing["sequences"]
    say(f"      {ing['store']}/ (Zarr v3, zstd chunks), sequences of byte ids:")
    say(f"        train   {seq['train']:>9,} bytes  the corpus without its tail")
    say(f"        heldout {seq['heldout']:>9,} bytes  the corpus's tail, never trained on")
    say(f"        long    {seq['long']:>9,} bytes  {ing['long_source']}")
    say(f"        memory  {seq['memory']:>9,} bytes  {ing['memory_events']:,} question/answer events made from the "
        f"training text (for step 5)  ({seconds['ingest']:.1f} s)")

    t = time.perf_counter()
    say(f"[2/5] train: MambaByte d_model={budget.d_model} n_layer={budget.n_layer}, {budget.steps} steps of "
        f"{budget.batch_size}x{budget.window} bytes streamed from the store")
    model, tr = step_train(out, budget, args.seed, bars)
    seconds["train"] = time.perf_counter() - t
    summary["train"] = tr
    say(f"      {tr['parameters']:,} parameters, {tr['train_bytes_per_s']:,.0f} bytes/s, "
        f"{tr['epochs']:.2f} epochs; train loss (last 20 steps) {tr['train_loss_bpb_last20']:.3f} bits/byte")
    say(f"      held-out bits/byte: {tr['heldout_bpb']:.3f} (untrained {tr['heldout_bpb_untrained']:.3f}, "
        f"uniform {tr['uniform_bpb']:.0f}) over {tr['heldout_predictions']:,} predictions  "
        f"({seconds['train']:.1f} s)")

    t = time.perf_counter()
    say(f"[3/5] generate: {budget.new_tokens} bytes after {inputs.prompt!r} (temperature 0.7, top-k 20, "
        f"seed {args.seed})")
    gen = step_generate(model, inputs.prompt, budget.new_tokens, args.seed)
    seconds["generate"] = time.perf_counter() - t
    summary["generate"] = gen
    for line in (inputs.prompt + gen["continuation"]).splitlines():
        say("      | " + "".join(c if c.isprintable() else "\ufffd" for c in line))
    say(f"      ({gen['bytes_per_s']:,.0f} bytes/s, {seconds['generate']:.1f} s)")

    t = time.perf_counter()
    say(f"[4/5] score: Ray score job over long ({seq['long']:,} bytes) on a local Ray cluster of "
        f"{args.workers} CPU(s)")
    sc = step_score(out, args.workers, bars, ing["long_regions"], deviation_sample=0 if args.quick else 1)
    seconds["score"] = time.perf_counter() - t
    summary["score"] = sc
    how = (f"{sc['segments']} segments of {-(-sc['positions'] // sc['segments']):,} bytes, each warmed up on the "
           f"4,096 before it" if sc["mode"] == "segments" else "one pass with carried state")
    say(f"      {sc['positions']:,} positions scored ({how}) in {sc['job_seconds']:.1f} s "
        f"({sc['bytes_per_s']:,.0f} bytes/s; Ray start {sc['ray_start_seconds']:.1f} s)")
    say(f"      mean {sc['mean_bpb']:.3f} bits/byte; " +
        "; ".join(f"{r['what']} {r['mean_bpb']:.3f}" for r in sc["regions"]))
    if sc["deviation"]:
        d = sc["deviation"]
        say(f"      segments vs exact at {d['segments']} boundary ({d['positions']:,} positions): max |diff| "
            f"{d['max_abs']:.2e} bits, mean {d['mean_bits_segments']:.4f} vs {d['mean_bits_exact']:.4f}")
    say(f"      {sc['output']} (per-position bits), {sc['plot']}  ({seconds['score']:.1f} s)")

    t = time.perf_counter()
    say(f"[5/5] memory: the model fine-tuned {budget.memory_steps} steps on the memory stream; a session observes "
        "4 events, saves after 3, answers, closes, and is reopened from disk")
    mem = step_memory(model, out, budget, args.seed, bars)
    seconds["memory"] = time.perf_counter() - t
    summary["memory"] = mem
    say(f"      fine-tune loss (last 20 steps) {mem['finetune_loss_bpb_last20']:.3f} bits/byte "
        f"({mem['finetune_seconds']:.1f} s)")
    say(f"      {mem['events']} events (snapshot {mem['snapshot']} holds {mem['events_in_snapshot']}, "
        f"{mem['events_replayed_from_log']} replayed from the log), position {mem['position']:,}, "
        f"state {mem['state_bytes']:,} bytes")
    ended = "ended by its end-of-event byte" if mem["answer_stop"] == "stop" else "cut at the byte limit"
    say(f"      live answer (sampled, seed {args.seed}; {mem['answer_bytes']} bytes, {ended}): "
        f"{_short(mem['answer'])!r}")
    say(f"      reopened: state identical: {mem['restored_state_identical']}; answer identical: "
        f"{mem['restored_answer_identical']}; state == replay of the events: {mem['replayed_state_identical']}  "
        f"({seconds['memory']:.1f} s)")

    seconds["total"] = time.perf_counter() - started
    summary["paths"] = {"store": ing["store"], "model": tr["model_file"], "checkpoint": tr["checkpoint"],
                        "train_log": tr["log"], "scores": sc["output"], "plot": sc["plot"],
                        "memory_session": mem["session"], "summary": str(out / "summary.json")}
    from seqlab.io import atomic_write_bytes

    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False).encode() + b"\n")
    say()
    say("Summary")
    say(f"  held-out bits/byte   {tr['heldout_bpb']:.3f}  (uniform baseline {tr['uniform_bpb']:.0f}, untrained "
        f"{tr['heldout_bpb_untrained']:.3f})")
    say(f"  long sequence        {sc['mean_bpb']:.3f} bits/byte over {sc['positions']:,} positions (Ray, "
        f"{args.workers} worker(s))")
    say(f"  memory restore       state identical {mem['restored_state_identical']}, answer identical "
        f"{mem['restored_answer_identical']}")
    say("  wall time            " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total")
        + f"; total {seconds['total']:.1f} s")
    say(f"  written under {out}/: " + ", ".join(n for n in OUTPUTS if (out / n).exists()))
    say(f"  next: seqlab describe {ing['store']};  seqlab memory ask {mem['session']} \"What is a generator?\"")
    return summary


def _handler(args) -> int:
    run(args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="seqlab end to end on built-in text: ingest, train, generate, Ray score + plot, memory",
        description="The end-to-end demo on the CPython documentation text (no download): ingest into a Zarr store, "
        "train a byte-level Mamba, generate, score a 1 MiB sequence with Ray (plot), and save/restore an agent "
        "memory session. Everything goes under --out; the numbers go to summary.json.")
    p.add_argument("--out", default="seqlab-demo", help="output folder (default ./seqlab-demo; re-running replaces "
                   "the demo's own outputs there, other files are left alone)")
    p.add_argument("--quick", action="store_true", help=f"tiny budget ({QUICK.steps} training steps): well under "
                   "two minutes on 2 cores")
    p.add_argument("--steps", type=count(1, 1 << 24), default=None, help=f"training steps (default {FULL.steps}, "
                   f"{QUICK.steps} with --quick; the memory fine-tune takes {FULL.memory_steps} more, "
                   f"{QUICK.memory_steps} with --quick)")
    p.add_argument("--text", nargs="+", metavar="FILE", default=None,
                   help="train on these files (concatenated) instead of the CPython docs text")
    p.add_argument("--big", metavar="FILE", default=None,
                   help="score this file as the long sequence (default: 1 MiB of the corpus + stdlib sources)")
    p.add_argument("--prompt", default=None, help=f"prompt to continue (default {DEFAULT_PROMPT!r}, or the start "
                   "of the held-out text with --text)")
    p.add_argument("--workers", type=count(1, 256), default=2, help="Ray workers (CPUs of the local cluster; default 2)")
    p.add_argument("--threads", type=threads, default=1, help="torch threads of the demo process (default 1: a model "
                   "this small trains fastest on one thread, and on a busy machine many times faster)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the model init, training and sampling (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_handler)


if __name__ == "__main__":  # pragma: no cover
    from seqlab.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
