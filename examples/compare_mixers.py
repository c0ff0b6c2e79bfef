"""Mamba-1 vs Mamba-2 vs Mamba-3 on the demo corpus at (near) equal parameter counts: held-out bits per byte.

Three byte-level models (vocab 256, ``seqlab.domains.bytes.ByteAdapter``, the data path of train_bytes.py), the
same width and depth, one mixer kind each, their state sizes picked so the parameter counts agree within a few
percent (printed): Mamba-1 (d_state 16), Mamba-2 (d_state ``--d-state``, headdim ``--headdim``) and Mamba-3 SISO
(the same d_state and headdim; no conv, data-dependent decay, trapezoid rule, rotary state).

Corpus: the CPython documentation text (``pydoc_data.topics``, shipped with every interpreter; the text the demo
trains on), its first ``--bytes`` bytes; the last 5% is held out and every evaluation scores all of it (cut into
8 streams, each streamed window by window with the state carried), the same bytes for every model.

Same budget for every model: AdamW, lr, warmup, cosine decay, steps, batch, window. A seed sets the
initialisation and the data order (seed ``s`` starts the training text at byte ``s * len / 3``, rotated); the
order is the same for the three models of a seed. tokens/s is training bytes per second of the whole run
(forward, backward, optimizer, the periodic evaluations excluded), on the chunked CPU kernels, one torch thread
per run.

Run: `.venv/bin/python examples/compare_mixers.py` (2 seeds x 3 models, two runs at a time, one per core).
`--quick` is the tiny version the test suite runs. Results and their reading: docs/backbone.md.
Writes into --out: compare_mixers.json (settings, every curve, the table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HELD_OUT = 0.05
EVAL_STREAMS = 8
MODELS = ("mamba1", "mamba2", "mamba3")
LABELS = {"mamba1": "Mamba-1", "mamba2": "Mamba-2", "mamba3": "Mamba-3 (SISO)"}


@dataclass(frozen=True)
class Settings:
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 32  # Mamba-2 and Mamba-3 (Mamba-1: 16)
    headdim: int = 16
    steps: int = 200
    batch_size: int = 16
    window: int = 128
    lr: float = 4e-3
    warmup: int = 20
    eval_every: int = 40
    bytes: int = 400_000


QUICK = Settings(d_model=32, n_layer=1, d_state=16, headdim=8, steps=6, batch_size=4, window=32, warmup=2, eval_every=3)
QUICK_BYTES = 20_000


def backbone(s: Settings, kind: str):
    from seqlab import BackboneConfig

    if kind == "mamba1":
        return BackboneConfig(d_model=s.d_model, n_layer=s.n_layer, ssm="mamba1", d_state=16)
    return BackboneConfig(
        d_model=s.d_model, n_layer=s.n_layer, ssm=kind, d_state=s.d_state, headdim=s.headdim, chunk_size=64
    )


def parameters(s: Settings) -> dict[str, int]:
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.ffn import parameter_counts

    return {kind: parameter_counts(ByteAdapter().build_model(backbone(s, kind)))["total"] for kind in MODELS}


def run_one(task: dict) -> dict:
    """Train one model with one seed; its held-out curve and training speed."""
    import torch

    from seqlab.domains.bytes import ByteAdapter
    from seqlab.train import TrainConfig, Trainer

    torch.set_num_threads(task["threads"])
    s = Settings(**task["settings"])
    data, seed = task["data"], task["seed"]
    split = len(data) - int(len(data) * HELD_OUT)
    train_bytes = data[:split]
    start = seed * split // 3 % split
    train_bytes = train_bytes[start:] + train_bytes[:start]
    adapter = ByteAdapter()
    train = adapter.source(train_bytes, batch_size=s.batch_size, window=s.window)
    held_out = adapter.source(data, batch_size=EVAL_STREAMS, window=s.window, start=split)
    torch.manual_seed(seed)
    model = adapter.build_model(backbone(s, task["model"]))
    config = TrainConfig(
        lr=s.lr,
        warmup_steps=s.warmup,
        max_steps=s.steps,
        batch_size=s.batch_size,
        window=s.window,
        eval_every=s.eval_every,
        eval_windows=held_out.num_windows,
        seed=seed,
        progress=False,
    )
    trainer = Trainer(model, config, train, eval_data=held_out, loss_fn=adapter.loss, metric_fn=adapter.metric)
    steps, bpb = [0], [trainer.evaluate()["eval_metric"]]
    eval_seconds = 0.0
    original = trainer.evaluate

    def timed_evaluate(*args, **kwargs):
        nonlocal eval_seconds
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            eval_seconds += time.perf_counter() - began

    trainer.evaluate = timed_evaluate  # type: ignore[method-assign]
    started = time.perf_counter()
    records = trainer.fit()
    seconds = time.perf_counter() - started
    evals = [r for r in records if "eval_metric" in r]
    steps += [r["step"] for r in evals]
    bpb += [r["eval_metric"] for r in evals]
    train_seconds = max(seconds - eval_seconds, 1e-9)
    return {
        "model": task["model"],
        "seed": seed,
        "steps": steps,
        "bpb": bpb,
        "train_loss": [round(r["loss"], 5) for r in records],
        "seconds": seconds,
        "train_seconds": train_seconds,
        "tokens_per_s": s.steps * s.batch_size * s.window / train_seconds,
        "held_out_bytes": held_out.num_windows * EVAL_STREAMS * s.window,
    }


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    table = {}
    for kind in MODELS:
        mine = {r["seed"]: r for r in runs if r["model"] == kind}
        finals = [mine[seed]["bpb"][-1] for seed in seeds]
        table[kind] = {
            "bpb": finals,
            "bpb_mean": statistics.fmean(finals),
            "tokens_per_s_mean": statistics.fmean(mine[seed]["tokens_per_s"] for seed in seeds),
        }
    return table


def print_table(table: dict, counts: dict, s: Settings, seeds: list[int]) -> None:
    print(f"\nheld-out bits per byte after {s.steps} steps ({len(seeds)} seeds)")
    print("| model | parameters | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean | train tokens/s |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|")
    for kind in MODELS:
        t = table[kind]
        seeds_cells = " | ".join(f"{v:.3f}" for v in t["bpb"])
        print(
            f"| {LABELS[kind]} | {counts[kind]:,} | {seeds_cells} | {t['bpb_mean']:.3f} | "
            f"{t['tokens_per_s_mean']:,.0f} |"
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    parser.add_argument("--out", default="out/compare_mixers", help="folder for compare_mixers.json")
    parser.add_argument("--quick", action="store_true", help="tiny run (1 seed, 6 steps, 20 kB)")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 2; 1 with --quick)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {d.steps})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr:g})")
    parser.add_argument("--d-model", type=int, help=f"default {d.d_model}")
    parser.add_argument("--n-layer", type=int, help=f"default {d.n_layer}")
    parser.add_argument("--d-state", type=int, help=f"Mamba-2 and Mamba-3 state size (default {d.d_state})")
    parser.add_argument("--headdim", type=int, help=f"Mamba-2 and Mamba-3 head dim (default {d.headdim})")
    parser.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    parser.add_argument("--window", type=int, help=f"default {d.window}")
    parser.add_argument("--eval-every", type=int, help=f"default {d.eval_every}")
    parser.add_argument("--bytes", type=int, help=f"bytes of the corpus used (default {d.bytes:,})")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each (default 2)")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else d
    if args.quick:
        base = Settings(**{**asdict(base), "bytes": QUICK_BYTES})
    names = ("steps", "lr", "d_model", "n_layer", "d_state", "headdim", "batch_size", "window", "eval_every", "bytes")
    chosen = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    s = Settings(**{**asdict(base), **chosen})
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 2)))
    jobs = 1 if args.quick else max(1, args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import platform

    from seqlab.cli.demo_inputs import python_docs
    from seqlab.machine import machine_line

    data = python_docs()[: s.bytes]
    split = len(data) - int(len(data) * HELD_OUT)
    counts = parameters(s)
    print(machine_line())
    print(
        f"corpus: CPython documentation text (pydoc_data.topics, Python {platform.python_version()}), "
        f"{len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}...: train [0, {split:,}), held out "
        f"the last {len(data) - split:,}"
    )
    print(
        f"models: d_model {s.d_model}, {s.n_layer} layers, vocab 256 (bytes); Mamba-1 d_state 16; Mamba-2 and "
        f"Mamba-3 d_state {s.d_state}, headdim {s.headdim}; {s.steps} steps of {s.batch_size} x {s.window} bytes, "
        f"AdamW lr {s.lr:g} (warmup {s.warmup}, cosine); {len(seeds)} seeds, {jobs} run(s) at a time"
    )
    for kind in MODELS:
        print(f"  {LABELS[kind]}: {counts[kind]:,} parameters")

    tasks = [
        {"data": data, "model": kind, "seed": seed, "settings": asdict(s), "threads": 1}
        for seed in seeds
        for kind in MODELS
    ]
    started = time.perf_counter()
    if jobs == 1:
        runs = [run_one(t) for t in tasks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = []
            for t, r in zip(tasks, pool.map(run_one, tasks)):
                runs.append(r)
                print(
                    f"  {LABELS[t['model']]} seed {t['seed']}: {r['bpb'][-1]:.3f} bits/byte, "
                    f"{r['tokens_per_s']:,.0f} tokens/s, {r['seconds']:.0f} s",
                    flush=True,
                )
    wall = time.perf_counter() - started
    table = summarise(runs, seeds)
    print_table(table, counts, s, seeds)
    print(f"\nwall time: {wall:.0f} s for {len(runs)} runs")
    result = {
        "settings": asdict(s),
        "seeds": seeds,
        "held_out_fraction": HELD_OUT,
        "corpus_bytes": len(data),
        "corpus_sha256": hashlib.sha256(data).hexdigest(),
        "parameters": counts,
        "machine": machine_line(),
        "wall_seconds": wall,
        "table": table,
        "runs": runs,
    }
    (out / "compare_mixers.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
