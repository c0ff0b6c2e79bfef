"""MambaByte vs MambaByte-MoE on real text: held-out bits per byte against steps, and how many fewer steps the
MoE model needs to reach the dense model's loss (issue 17; MoE-Mamba, Pioro et al. 2024, reports 2.2x).

Two byte-level models (vocab 256, ``seqlab.domains.bytes.ByteAdapter``, the data path of train_bytes.py) with
the same active parameters per byte:

- dense: every Mamba mixer followed by a SiLU-gated MLP of width ``--d-ffn`` (``ffn="mlp"``);
- MoE: every Mamba mixer followed by a top-1 mixture of ``--experts`` experts, each a gated MLP of the same
  width (``ffn="moe"``), so one byte uses one expert: the dense layer's parameters plus a router of
  ``d_model * experts`` weights.

Two corpora of the same number of bytes (``--bytes``): the CPython documentation text
(``pydoc_data.topics``, shipped with every interpreter) and Jane Austen's "Pride and Prejudice" (public domain;
``examples/data/pride_and_prejudice.txt.gz``, extracted from Debian's r-cran-janeaustenr 1.0.0-1, see
``examples/data/README.md``). The last 5% of each corpus's bytes is held out; every evaluation scores all of it
(cut into 8 streams, each streamed window by window with the state carried), the same bytes for every model.

Same budget for both models: the same optimiser (AdamW, lr, warmup, cosine decay), steps, batch and window.
A seed sets the initialisation and the data order; the data order is the same for both models of a seed: seed
``s`` starts the training text at byte ``s * len / 3`` (rotated, so every run sees every training byte
equally often) and the Trainer then reads windows in order.

The steps ratio of one seed: the target loss is the worse of the two final held-out losses; each model's steps
to the target is the first step at which its held-out curve is at or below it, interpolated linearly between
evaluation points; ratio = dense steps / MoE steps. Above 1: the MoE model reached the dense model's final loss
that much sooner. Below 1: the MoE model never got as low as the dense model, and it ended where the dense
model already was after ``ratio * steps`` steps.

Run: `.venv/bin/python examples/moe_bytes.py` (3 seeds x 2 models x 2 corpora, 1000 steps each, two runs at a
time, one per core: 17 min measured on 2 cores shared with other work, about 12 min on idle ones). `--quick` is
the tiny version the test suite runs (24 steps, about 5 s). Results and their reading: docs/moe.md.
Writes into --out: moe_bytes.json (settings, every curve, the table) and moe_bytes.png (the curves).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

AUSTEN = Path(__file__).resolve().parent / "data" / "pride_and_prejudice.txt.gz"
HELD_OUT = 0.05
EVAL_STREAMS = 8
MODELS = ("dense", "moe")
LABELS = {"dense": "Mamba + MLP (dense)", "moe": "Mamba + MoE (top-1)"}


@dataclass(frozen=True)
class Settings:
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16
    d_ffn: int = 128
    experts: int = 16
    steps: int = 1000
    batch_size: int = 16
    window: int = 128
    lr: float = 6e-3
    warmup: int = 30
    eval_every: int = 25
    bytes: int = 450_000


QUICK = Settings(d_model=32, n_layer=1, d_ffn=64, experts=4, steps=24, batch_size=8, window=64, warmup=4)
QUICK_BYTES = 40_000
QUICK_EVAL_EVERY = 8


def corpora(size: int) -> dict[str, dict]:
    """{name: {"what", "data" (the first ``size`` bytes, or fewer if a corpus is shorter: then both are cut to the
    shorter), "sha256"}}."""
    import platform

    from seqlab.cli.demo_inputs import python_docs

    texts = {
        "python-docs": (
            f"CPython documentation text (pydoc_data.topics, Python {platform.python_version()})",
            python_docs(),
        ),
        "austen": (
            "Jane Austen, Pride and Prejudice (Debian r-cran-janeaustenr 1.0.0-1)",
            gzip.decompress(AUSTEN.read_bytes()),
        ),
    }
    size = min(size, *(len(data) for _, data in texts.values()))
    return {
        name: {"what": what, "data": data[:size], "sha256": hashlib.sha256(data[:size]).hexdigest()}
        for name, (what, data) in texts.items()
    }


def backbone(s: Settings, model: str):
    from seqlab import BackboneConfig

    ffn = {"ffn": "mlp", "d_ffn": s.d_ffn} if model == "dense" else {"ffn": "moe", "moe_experts": s.experts}
    if model == "moe":
        ffn.update(moe_top_k=1, moe_d_expert=s.d_ffn)
    return BackboneConfig(d_model=s.d_model, n_layer=s.n_layer, d_state=s.d_state, **ffn)


def parameters(s: Settings) -> dict[str, dict[str, int]]:
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.ffn import parameter_counts

    return {m: parameter_counts(ByteAdapter().build_model(backbone(s, m))) for m in MODELS}


def run_one(task: dict) -> dict:
    """Train one model on one corpus with one seed; its held-out curve and router statistics."""
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
    started = time.perf_counter()
    steps, bpb = [0], [trainer.evaluate()["eval_metric"]]
    records = trainer.fit()
    seconds = time.perf_counter() - started
    evals = [r for r in records if "eval_metric" in r]
    steps += [r["step"] for r in evals]
    bpb += [r["eval_metric"] for r in evals]
    out = {
        "corpus": task["corpus"],
        "model": task["model"],
        "seed": seed,
        "steps": steps,
        "bpb": bpb,
        "train_loss": [round(r["loss"], 5) for r in records],
        "seconds": seconds,
        "held_out_bytes": held_out.num_windows * EVAL_STREAMS * s.window,
    }
    if task["model"] == "moe":
        tail = records[-max(1, len(records) // 10) :]  # the last 10% of the steps
        out["router"] = {
            key: statistics.fmean(r[key] for r in tail)
            for key in ("moe_dropped_fraction", "moe_max_expert_fraction", "moe_balance_loss")
        }
        out["router"]["collapse_warning_steps"] = sum(1 for r in records if r.get("warnings"))
        out["router"]["max_expert_fraction_at_evals"] = [r["moe_max_expert_fraction"] for r in evals]
    return out


def steps_to(steps: list[int], values: list[float], target: float) -> float:
    """The first step at which the curve is at or below ``target``, linearly interpolated between the two
    evaluation points around the crossing (inf if it never gets there)."""
    for i, (step, value) in enumerate(zip(steps, values)):
        if value <= target:
            if i == 0:
                return float(step)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
    return math.inf


def steps_ratio(dense: dict, moe: dict) -> dict:
    """dense steps / MoE steps to the worse of the two final held-out losses (see the module docstring)."""
    target = max(dense["bpb"][-1], moe["bpb"][-1])
    d, m = steps_to(dense["steps"], dense["bpb"], target), steps_to(moe["steps"], moe["bpb"], target)
    return {"target_bpb": target, "dense_steps": d, "moe_steps": m, "ratio": d / m if m > 0 else math.inf}


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(runs: list[dict], seeds: list[int], names: list[str]) -> dict:
    table = {}
    for name in names:
        rows = []
        for seed in seeds:
            pair = {r["model"]: r for r in runs if r["corpus"] == name and r["seed"] == seed}
            rows.append(
                {
                    "seed": seed,
                    "dense_bpb": pair["dense"]["bpb"][-1],
                    "moe_bpb": pair["moe"]["bpb"][-1],
                    **steps_ratio(pair["dense"], pair["moe"]),
                }
            )
        table[name] = {
            "rows": rows,
            **{f"{key}_mean": statistics.fmean(r[key] for r in rows) for key in ("dense_bpb", "moe_bpb", "ratio")},
            **{
                f"{key}_std": statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0.0
                for key in ("dense_bpb", "moe_bpb", "ratio")
            },
        }
    return table


def print_table(table: dict, info: dict) -> None:
    for name, t in table.items():
        print(f"\n{name}: {info[name]['what']}; held-out bits per byte after the last step")
        print(f"{'seed':>6} {'dense':>8} {'MoE':>8} {'target':>8} {'dense@':>8} {'MoE@':>8} {'ratio':>7}")
        for r in t["rows"]:
            print(
                f"{r['seed']:>6} {r['dense_bpb']:>8.3f} {r['moe_bpb']:>8.3f} {r['target_bpb']:>8.3f} "
                f"{r['dense_steps']:>8.1f} {r['moe_steps']:>8.1f} {r['ratio']:>7.2f}"
            )
        dense = mean_std([r["dense_bpb"] for r in t["rows"]])
        moe = mean_std([r["moe_bpb"] for r in t["rows"]])
        ratio = mean_std([r["ratio"] for r in t["rows"]])
        print(f"  mean ± std over {len(t['rows'])} seeds: dense {dense}, MoE {moe} bits/byte")
        print(f"  steps ratio (dense steps / MoE steps to the same held-out loss): {ratio}")


def plot(runs: list[dict], table: dict, info: dict, s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.4), squeeze=False)
    colors = {"dense": "#1f77b4", "moe": "#d62728"}
    for ax, name in zip(axes[0], names):
        low, high = math.inf, 0.0
        for model in MODELS:
            curves = [r for r in runs if r["corpus"] == name and r["model"] == model]
            steps = curves[0]["steps"]
            for c in curves:
                ax.plot(c["steps"], c["bpb"], color=colors[model], lw=0.7, alpha=0.45)
            mean = [statistics.fmean(c["bpb"][i] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, color=colors[model], lw=2, label=f"{LABELS[model]}, mean of {len(curves)}")
            low = min(low, min(min(c["bpb"]) for c in curves))
            high = max(high, mean[min(len(mean) - 1, max(2, len(mean) // 8))])
        target = table[name]["dense_bpb_mean"]
        ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"dense final (mean) {target:.3f}")
        ax.set_ylim(low - 0.05, high + 0.05)
        ax.set_xlim(0, s.steps)
        ratio = mean_std([r["ratio"] for r in table[name]["rows"]])
        ax.set_title(f"{info[name]['what']}\nsteps ratio dense/MoE: {ratio}", fontsize=9)
        ax.set_xlabel(f"optimizer step ({s.batch_size} x {s.window} bytes)")
        ax.set_ylabel("held-out bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"MambaByte vs MambaByte-MoE: d_model {s.d_model}, {s.n_layer} layers, MLP/expert width {s.d_ffn}, "
        f"{s.experts} experts top-1\n{s.steps} steps of {s.batch_size} x {s.window} bytes, AdamW lr {s.lr:g}; "
        "thick: mean over seeds, thin: each seed",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    parser.add_argument("--out", default="out/moe_bytes", help="folder for moe_bytes.json and moe_bytes.png")
    parser.add_argument("--quick", action="store_true", help="tiny run (1 seed, few steps, 40 kB per corpus)")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {d.steps})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate of both models (default {d.lr:g})")
    parser.add_argument("--experts", type=int, help=f"MoE experts (default {d.experts})")
    parser.add_argument("--d-model", type=int, help=f"default {d.d_model}")
    parser.add_argument("--n-layer", type=int, help=f"default {d.n_layer}")
    parser.add_argument("--d-ffn", type=int, help=f"dense MLP and expert width (default {d.d_ffn})")
    parser.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    parser.add_argument("--window", type=int, help=f"default {d.window}")
    parser.add_argument("--eval-every", type=int, help=f"default {d.eval_every}")
    parser.add_argument("--bytes", type=int, help=f"bytes taken from each corpus (default {d.bytes:,})")
    parser.add_argument("--corpora", default="python-docs,austen", help="comma-separated: python-docs, austen")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each (default 2)")
    args = parser.parse_args()

    base = QUICK if args.quick else d
    if args.quick:
        base = Settings(**{**asdict(base), "bytes": QUICK_BYTES, "eval_every": QUICK_EVAL_EVERY})
    chosen = {
        k: getattr(args, k)
        for k in ("steps", "lr", "experts", "d_model", "n_layer", "d_ffn", "batch_size", "window", "eval_every")
        if getattr(args, k) is not None
    }
    if args.bytes is not None:
        chosen["bytes"] = args.bytes
    s = Settings(**{**asdict(base), **chosen})
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    jobs = 1 if args.quick else max(1, args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from seqlab.machine import machine_line

    info = corpora(s.bytes)
    names = [n.strip() for n in args.corpora.split(",") if n.strip()]
    unknown = sorted(set(names) - set(info))
    if unknown:
        parser.error(f"--corpora: unknown {', '.join(unknown)} (known: {', '.join(info)})")
    size = len(info[names[0]]["data"])
    split = size - int(size * HELD_OUT)
    counts = parameters(s)
    print(machine_line())
    print(
        f"{len(names)} corpora x {len(seeds)} seeds x 2 models, {jobs} run(s) at a time; each corpus {size:,} bytes: "
        f"train [0, {split:,}), held out the last {size - split:,}"
    )
    for name in names:
        print(f"  {name}: {info[name]['what']}, sha256 {info[name]['sha256'][:16]}...")
    print(
        f"model: d_model {s.d_model}, {s.n_layer} layers (Mamba-1, d_state {s.d_state}), vocab 256 (bytes); "
        f"{s.steps} steps of {s.batch_size} x {s.window} bytes, AdamW lr {s.lr:g} (warmup {s.warmup}, cosine), "
        f"held-out evaluation every {s.eval_every} steps"
    )
    for model in MODELS:
        c = counts[model]
        shape = f"gated MLP width {s.d_ffn}" if model == "dense" else f"{s.experts} experts of width {s.d_ffn}, top-1"
        print(f"  {model:>5}: {shape}: {c['total']:,} parameters in total, {c['active']:,} active per byte")

    tasks = [
        {
            "corpus": name,
            "data": info[name]["data"],
            "model": model,
            "seed": seed,
            "settings": asdict(s),
            "threads": 1 if jobs > 1 else 0,
        }
        for name in names
        for seed in seeds
        for model in MODELS
    ]
    if jobs == 1:
        import torch

        for t in tasks:
            t["threads"] = torch.get_num_threads()
    started = time.perf_counter()
    if jobs == 1:
        runs = []
        for t in tasks:
            runs.append(run_one(t))
            print(f"  {t['corpus']} {t['model']} seed {t['seed']}: {runs[-1]['bpb'][-1]:.3f} bits/byte", flush=True)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = []
            for t, r in zip(tasks, pool.map(run_one, tasks)):
                runs.append(r)
                print(f"  {t['corpus']} {t['model']} seed {t['seed']}: {r['bpb'][-1]:.3f} bits/byte", flush=True)
    wall = time.perf_counter() - started

    table = summarise(runs, seeds, names)
    print_table(table, info)
    for name in names:
        routers = [r["router"] for r in runs if r["corpus"] == name and r["model"] == "moe"]
        busiest = statistics.fmean(r["moe_max_expert_fraction"] for r in routers)
        dropped = statistics.fmean(r["moe_dropped_fraction"] for r in routers)
        print(
            f"  {name} MoE routers over the last 10% of steps: busiest expert {busiest:.0%} of the bytes (uniform "
            f"{1 / s.experts:.0%}), dropped over capacity {dropped:.1%}; collapse warnings on "
            f"{sum(r['collapse_warning_steps'] for r in routers)} steps"
        )
    print(f"\nwall time: {wall:.0f} s for {len(runs)} runs")

    result = {
        "settings": asdict(s),
        "seeds": seeds,
        "held_out_fraction": HELD_OUT,
        "corpora": {n: {k: v for k, v in info[n].items() if k != "data"} | {"bytes": size} for n in names},
        "parameters": counts,
        "machine": machine_line(),
        "wall_seconds": wall,
        "ratio_definition": (
            "target = max(final dense bpb, final MoE bpb); steps to target = first step at which the held-out "
            "curve is <= target, linearly interpolated between evaluation points; ratio = dense steps / MoE steps"
        ),
        "table": table,
        "runs": runs,
    }
    (out / "moe_bytes.json").write_text(json.dumps(result, indent=1))
    plot(runs, table, info, s, out / "moe_bytes.png")
    print(f"wrote {out / 'moe_bytes.json'} and {out / 'moe_bytes.png'}")


if __name__ == "__main__":
    main()
