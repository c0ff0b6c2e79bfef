"""The five steps of ``seqlab demo`` (ingest, train, generate, a Ray score job with its plot, an agent memory
session), each with seqlab's public library; seqlab/cli/demo.py runs them and prints what they return."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from seqlab.cli.demo_inputs import EVENT_TIME, LONG_BYTES, Budget, Inputs, heldout_size, memory_events


def step_ingest(inputs: Inputs, out: Path, progress: bool) -> dict:
    """Write the corpus parts (and the built long sequence) under ``data/`` and ingest them into store.zarr."""
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines.store import SequenceStore, ingest

    adapter = ByteAdapter()
    data = out / "data"
    data.mkdir(exist_ok=True)
    n = len(inputs.corpus)
    held = heldout_size(n)
    adapter.write(data / "train.bin", inputs.corpus[: n - held])
    adapter.write(data / "heldout.bin", inputs.corpus[n - held :])
    paths, names = [data / "train.bin", data / "heldout.bin"], ["train", "heldout"]
    if inputs.big is None:
        pieces, remaining = [inputs.corpus[:LONG_BYTES]], LONG_BYTES - min(n, LONG_BYTES)
        for path in inputs.long_parts[1]["files"] if len(inputs.long_parts) > 1 else []:
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
    events = memory_events(inputs.corpus[: n - held])
    memory.write(data / "memory-events.jsonl", events)
    results += ingest(store, data / "memory-events.jsonl", memory, names="memory", overwrite=True, progress=progress)
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
    return {
        "store": str(store_path),
        "sequences": lengths,
        "corpus_bytes": n,
        "corpus": inputs.corpus_what,
        "memory_events": len(events),
        "long_source": str(inputs.big)
        if inputs.big is not None
        else " + ".join(f"{p['what']} ({p['bytes']:,})" for p in inputs.long_parts),
        "long_regions": regions,
    }


def step_train(out: Path, budget: Budget, seed: int, progress: bool):
    """Train on ``train`` from the store; held-out bits per byte before and after. Returns (model, report)."""
    import torch

    from seqlab.checkpoint import save_model
    from seqlab.config import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.pipelines import stream_bits
    from seqlab.pipelines.store import SequenceStore, StoreSource
    from seqlab.train import TrainConfig, Trainer

    adapter = ByteAdapter()
    store = SequenceStore(out / "store.zarr", "r")
    torch.manual_seed(seed)
    model = adapter.build_model(BackboneConfig(d_model=budget.d_model, n_layer=budget.n_layer, d_state=budget.d_state))
    params = sum(p.numel() for p in model.parameters())
    source = StoreSource(store, "train", budget.batch_size, budget.window, model=model)
    config = TrainConfig(
        max_steps=budget.steps,
        batch_size=budget.batch_size,
        window=budget.window,
        lr=budget.lr,
        warmup_steps=min(20, budget.steps),
        progress=progress,
        seed=seed,
        log_path=str(out / "train-log.jsonl"),
        checkpoint_dir=str(out / "checkpoint"),
    )
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
    last = records[-min(20, len(records)) :]
    return model, {
        "model": f"MambaByte ({model.config.ssm}, d_model={budget.d_model}, n_layer={budget.n_layer}, "
        f"d_state={budget.d_state})",
        "parameters": params,
        "steps": budget.steps,
        "batch_size": budget.batch_size,
        "window": budget.window,
        "epochs": records[-1]["epoch"] + (trainer.pos.window / source.num_windows),
        "train_seconds": seconds,
        "train_bytes_per_s": tokens / seconds,
        "train_loss_bpb_last20": sum(r["loss"] for r in last) / len(last),
        "heldout_bpb_untrained": bits0 / scored,
        "heldout_bpb": bits / scored,
        "heldout_predictions": scored,
        "uniform_bpb": adapter.uniform_baseline(),
        "model_file": str(model_path),
        "checkpoint": str(out / "checkpoint"),
        "log": str(out / "train-log.jsonl"),
    }


def step_generate(model, prompt: str, new_tokens: int, seed: int) -> dict:
    from seqlab.domains.bytes import ByteAdapter

    adapter = ByteAdapter()
    ids = adapter.encode(prompt)
    started = time.perf_counter()
    result = model.generate(ids, new_tokens, do_sample=True, temperature=0.7, top_k=20, seed=seed)
    seconds = time.perf_counter() - started
    tokens = result.tokens[0]
    return {
        "prompt": prompt,
        "continuation": adapter.decode_text(tokens),
        "new_bytes": len(tokens),
        "temperature": 0.7,
        "top_k": 20,
        "seed": seed,
        "generate_seconds": seconds,
        "bytes_per_s": len(tokens) / seconds if seconds > 0 else None,
    }


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
                ray.init(
                    address="local",
                    num_cpus=workers,
                    include_dashboard=False,
                    logging_level=logging.ERROR,
                    log_to_driver=False,
                )
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # the job's own bar (or none with --quiet)
            ray_seconds = time.perf_counter() - started
            result = score(
                str(out / "model.safetensors"),
                str(out / "store.zarr"),
                str(out / "scores.zarr"),
                names=["long"],
                window=4096,
                mode="segments" if segments > 1 else "exact",
                segment_length=segment_length if segments > 1 else None,
                burn_in=4096,
                deviation_sample=deviation_sample,
                concurrency=workers,
                num_cpus=1,
                progress=progress,
                overwrite=True,
            )
        finally:
            if own_cluster:
                ray.shutdown()
            if backend_level is None:
                os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
            for name, level in quiet_loggers.items():
                logging.getLogger(name).setLevel(level)
    bits = SequenceStore(out / "scores.zarr", "r").read("long", raw=True).astype(np.float64)
    report = {
        "output": str(out / "scores.zarr"),
        "sequence_bytes": length,
        "positions": int(bits.shape[0]),
        "mean_bpb": result.summary["mean_bits"],
        "mode": "segments" if segments > 1 else "exact",
        "segments": segments,
        "workers": workers,
        "ray_start_seconds": ray_seconds,
        "job_seconds": result.seconds,
        "bytes_per_s": positions / result.seconds,
        "deviation": result.deviation,
        "regions": [],
    }
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
        ax.axvspan(
            region["start"],
            region["stop"],
            color=shades[k % len(shades)],
            lw=0,
            label=f"{region['what']}: {region['mean_bpb']:.2f}",
        )
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
    source = StoreSource(
        SequenceStore(out / "store.zarr", "r"), "memory", budget.batch_size, budget.window, model=memory_model
    )
    config = TrainConfig(
        max_steps=budget.memory_steps,
        batch_size=budget.batch_size,
        window=budget.window,
        lr=budget.lr / 2,
        warmup_steps=min(10, budget.memory_steps),
        progress=progress,
        seed=seed,
    )
    started = time.perf_counter()
    records = Trainer(memory_model, config, source, loss_fn=adapter.loss, metric_fn=adapter.metric).fit()
    tune_seconds = time.perf_counter() - started
    last = records[-min(20, len(records)) :]
    memory_model.eval()
    model_file = save_model(out / "memory-model.safetensors", memory_model)
    path = out / "memory.session"
    sampling = {"temperature": 0.7, "top_k": 20, "seed": seed}
    events = [
        Event("system", "You answer questions about Python from its documentation.", EVENT_TIME),
        Event("user", "What does the with statement do?", EVENT_TIME + 1),
        Event("assistant", "It wraps a block in the methods of a context manager.", EVENT_TIME + 2),
        Event("user", "And the return statement?", EVENT_TIME + 3),
    ]
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
        torch.equal(live_state.tensors()[k], state.tensors()[k]) for k in names
    )
    same_replay = all(torch.equal(replayed.tensors()[k], state.tensors()[k]) for k in names)
    return {
        "finetune_steps": budget.memory_steps,
        "finetune_seconds": tune_seconds,
        "finetune_loss_bpb_last20": sum(r["loss"] for r in last) / len(last),
        "session": str(path),
        "model_file": str(model_file),
        "events": count,
        "events_in_snapshot": 3,
        "events_replayed_from_log": count - 3,
        "snapshot": snapshot,
        "position": position,
        "state_bytes": live_state.nbytes(),
        "state_tensors": len(names),
        "sampling": sampling,
        "answer": answer.text,
        "answer_bytes": len(answer.tokens),
        "answer_stop": answer.stop_reason,
        "restored_answer": again.text,
        "restored_answer_identical": again.tokens == answer.tokens,
        "restored_state_identical": bool(same_state and position == live_position and count == live_events),
        "replayed_state_identical": bool(same_replay),
        "files": sorted(os.listdir(path)),
        "sizes": info.get("sizes"),
    }
