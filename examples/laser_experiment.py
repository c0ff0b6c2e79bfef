"""LASER on trained MambaByte models (issue 21): where rank reduction helps, and what it does elsewhere.

Two cases, each a model trained here on the CPython documentation (the demo's corpus):

* ``--case noisy`` (the controlled case): a byte model trained far past memorising a *corrupted* copy of a small
  slice of the text (``--noise``: the share of training bytes replaced, once, by uniformly random bytes; the
  corruption is fixed, so the model can and does learn it by heart over the epochs). Rank reduction is known to
  remove what a layer memorised while keeping what generalises (LASER's finding). The search scores every (layer,
  matrix, rho) on a clean validation slice; the chosen intervention, and a random-truncation control of the same
  size (the same layer and rank, random singular directions instead of the top ones), are then scored on a clean
  test slice the search never saw. The control is drawn ``--random-draws`` times (3) and its mean reported: one
  draw can land on the top component by chance.
* ``--case demo`` / ``--case small``: the demo's model size (d_model 64, 2 layers, 600 steps) and a larger one
  (d_model 192, 4 layers, 1000 steps: bench/decoding.py's target), trained on the clean text; the best
  intervention's effect and size, whatever it is.

Every score is held-out bits per byte streamed with the state carried (``seqlab.posttrain.laser.stream_scorer``).
Prints a markdown table, writes ``laser_<case>.json``, the search's report and heatmap, and with ``--plot`` a figure.
``--seeds N`` repeats training (and the random control) with seeds seed..seed+N-1.

    python examples/laser_experiment.py --case noisy --seeds 3 --out out/laser
    python examples/laser_experiment.py --case demo --out out/laser
    python examples/laser_experiment.py --quick --out /tmp/laser      # a tiny model, a few steps (the test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# (d_model, n_layer, ssm, steps, batch, window, lr)
SIZES = {
    "quick": (32, 2, "mamba1", 30, 8, 128, 3e-3),
    "noisy": (128, 4, "mamba1", 800, 16, 128, 3e-3),
    "demo": (64, 2, "mamba1", 600, 16, 128, 4e-3),
    "small": (192, 4, "mamba1", 1000, 16, 256, 3e-3),
}
RHOS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
QUICK_RHOS = (0.05, 0.5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=("noisy", "demo", "small"), default="noisy")
    p.add_argument("--noise", type=float, default=0.2, help="share of training bytes corrupted (--case noisy)")
    p.add_argument("--train-bytes", type=int, default=16_000, help="training slice of the noisy case")
    p.add_argument("--steps", type=int, help="training steps (default: the case's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--compose", type=int, default=3, help="greedy composition of the best N interventions")
    p.add_argument("--random-draws", type=int, default=3, help="draws of the random control per seed (mean)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny model, few steps and rhos")
    p.add_argument("--out", type=Path, default=Path("out/laser"))
    p.add_argument("--plot", type=Path, help="write a figure of the per-seed results (PNG)")
    args = p.parse_args(argv)
    if args.random_draws < 1:
        p.error("--random-draws must be at least 1")
    return args


def splits(case: str, noise: float, train_bytes: int, seed: int, quick: bool) -> tuple[bytes, bytes, bytes]:
    """(training text, validation text, test text). The noisy case: ``train_bytes`` of the corpus with a share
    ``noise`` of its bytes replaced by random bytes (drawn with ``seed``); validation and test are clean slices
    taken from the end of the corpus, never trained on. The clean cases: all but the last 10% for training, then
    5% validation, 5% test."""
    from seqlab.cli.demo_inputs import python_docs

    data = python_docs()
    if quick:
        data = data[:30_000]
    if case == "noisy":
        n = min(train_bytes, len(data) // 2) if not quick else 8_000
        held = min(24_000, len(data) // 4) if not quick else 4_000
        g = torch.Generator().manual_seed(10_000 + seed)
        train = torch.tensor(list(data[:n]), dtype=torch.uint8)
        hit = torch.rand(n, generator=g) < noise
        train[hit] = torch.randint(0, 256, (int(hit.sum()),), generator=g, dtype=torch.uint8)
        return bytes(train.tolist()), data[-2 * held : -held], data[-held:]
    tenth = len(data) // 20
    return data[: -2 * tenth], data[-2 * tenth : -tenth], data[-tenth:]


def train_model(text: bytes, size: str, steps: int | None, seed: int):
    """A MambaByte model of ``SIZES[size]`` trained on ``text`` from seed ``seed``; returns (model, seconds)."""
    from seqlab import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.train import TrainConfig, Trainer

    d_model, n_layer, ssm, default_steps, batch, window, lr = SIZES[size]
    steps = steps or default_steps
    adapter = ByteAdapter()
    torch.manual_seed(seed)
    model = adapter.build_model(BackboneConfig(d_model=d_model, n_layer=n_layer, d_state=16, ssm=ssm))
    ids = torch.tensor(list(text), dtype=torch.uint8)
    config = TrainConfig(lr=lr, warmup_steps=max(1, steps // 20), max_steps=steps, batch_size=batch, window=window,
                         seed=seed)  # fmt: skip
    started = time.perf_counter()
    Trainer(model, config, adapter.source(ids, batch_size=batch, window=window), loss_fn=adapter.loss).fit()
    return model.eval(), time.perf_counter() - started


def scorer(text: bytes):
    """Held-out bits per byte of ``text`` as one stream (pieces of 2048 bytes, state carried)."""
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.posttrain.laser import stream_scorer

    ids = torch.tensor(list(text))
    return stream_scorer(ByteAdapter(), lambda: ids.split(2048))


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_seed(args, seed: int) -> dict:
    """Train one model, search, score the chosen intervention and its random control on the test text."""
    from seqlab.checkpoint import save_model
    from seqlab.posttrain.laser import apply_interventions, laser_search, plot_heatmap

    size = "quick" if args.quick else args.case
    train, val, test = splits(args.case, args.noise, args.train_bytes, seed, args.quick)
    model, train_seconds = train_model(train, size, args.steps, seed)
    on_val, on_test, on_train = scorer(val), scorer(test), scorer(train[: len(test)])
    folder = args.out / f"{args.case}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = laser_search(model, on_val, rhos=QUICK_RHOS if args.quick else RHOS, compose=args.compose,
                          progress=True)  # fmt: skip
    search_seconds = time.perf_counter() - started
    (folder / "laser_report.json").write_text(json.dumps(report.to_json(), indent=1))
    plot_heatmap(report, folder / "laser_heatmap.png")
    row = {"seed": seed, "train_seconds": train_seconds, "search_seconds": search_seconds,
           "parameters": parameters(model), "train_bits": on_train(model), "val_bits": report.baseline,
           "test_bits": on_test(model), "cells": len(report.cells)}  # fmt: skip
    best = report.best
    row["best"] = None if best is None else {"layer": best.layer, "kind": best.kind, "rho": best.rho,
                                               "rank": best.rank, "val_bits": best.score}  # fmt: skip
    if best is not None:
        chosen = [best.intervention()]
        with apply_interventions(model, chosen, method="svd") as applied:
            row["laser_test_bits"], row["laser_train_bits"] = on_test(applied), on_train(applied)
            row["laser_parameters"] = parameters(applied)
            save_model(folder / "laser_model.safetensors", applied)
        # The control: as many singular components of the same matrix, drawn at random; several draws (one draw
        # can land on the top component by chance), their mean reported and each kept in the JSON.
        draws = []
        for draw in range(args.random_draws):
            with apply_interventions(model, chosen, method="random", seed=seed * 1000 + draw) as applied:
                draws.append((on_test(applied), on_train(applied)))
                row["random_parameters"] = parameters(applied)
        row["random_test_draws"] = [t for t, _ in draws]
        row["random_test_bits"] = statistics.mean(t for t, _ in draws)
        row["random_train_bits"] = statistics.mean(t for _, t in draws)
        if report.composed:
            with apply_interventions(model, report.composed, method="svd") as applied:
                row["composed"] = [vars(i) for i in report.composed]
                row["composed_test_bits"] = on_test(applied)
                row["composed_parameters"] = parameters(applied)
    save_model(folder / "model.safetensors", model)
    print(json.dumps({k: v for k, v in row.items()}, indent=None), flush=True)
    return row


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n={len(values)})"


def print_table(result: dict) -> None:
    rows = result["rows"]
    print(f"\n### {result['case']}: {result['model']}\n")
    print("| model | test bits/byte | train-slice bits/byte | parameters |")
    print("|---|---|---|---|")
    for label, key, train_key, params in (
        ("trained", "test_bits", "train_bits", "parameters"),
        ("LASER (best on validation)", "laser_test_bits", "laser_train_bits", "laser_parameters"),
        ("random truncation, same size (mean of draws)", "random_test_bits", "random_train_bits", "random_parameters"),
        ("LASER composed", "composed_test_bits", None, "composed_parameters"),
    ):
        have = [r for r in rows if r.get(key) is not None]
        if not have:
            continue
        train = spread([r[train_key] for r in have]) if train_key else "-"
        print(f"| {label} | {spread([r[key] for r in have])} | {train} | "
              f"{', '.join(f'{r[params]:,}' for r in have)} |")  # fmt: skip
    for r in rows:
        print(f"- seed {r['seed']}: best {r['best']}; search {r['search_seconds']:.0f} s over {r['cells']} cells, "
              f"training {r['train_seconds']:.0f} s")  # fmt: skip


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("laser_test_bits") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ("trained", "LASER", "random, same size")
    for r in rows:
        ax.plot(labels, [r["test_bits"], r["laser_test_bits"], r["random_test_bits"]], "o-", label=f"seed {r['seed']}")
    ax.set_ylabel("held-out test bits/byte")
    ax.set_title(f"LASER, {result['case']} case")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    d_model, n_layer, ssm, steps, *_ = SIZES["quick" if args.quick else args.case]
    what = f"MambaByte {ssm}, d_model {d_model}, {n_layer} layers, {args.steps or steps} steps"
    if args.case == "noisy":
        what += f", {args.noise:.0%} of {args.train_bytes:,} training bytes corrupted"
    result = {"case": args.case, "model": what, "rhos": list(QUICK_RHOS if args.quick else RHOS), "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seed, args.seed + args.seeds):
        result["rows"].append(run_seed(args, seed))
        (args.out / f"laser_{args.case}.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    if args.plot:
        plot(args.plot, result)
    return result


if __name__ == "__main__":
    main()
