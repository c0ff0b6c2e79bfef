"""Self-rewarding fine-tuning (issue 21) on the program-checkable byte task of ``seqlab.posttrain.tasks``.

Per seed: train M0 (a byte Mamba) with ``sft`` on the seed corpus (instructions with their answers, and judge
examples for correct and corrupted answers), then run ``self_reward`` for ``--iterations`` rounds twice from the
same M0: the self-rewarding arm, and the control whose DPO pairs have chosen/rejected exchanged on a fair coin
(``shuffle_pairs=True``). The program checker only measures: task accuracy (greedy answers on held-out test
prompts) and judge agreement (greedy judge scores on held-out correct and corrupted answers, agreeing with the
checker) of M0..MT, through ``measure``. Prints a markdown table (mean and spread over seeds), writes
``self_reward.json`` and ``self_reward.png`` under ``--out``, and every loop's JSONL records under
``--out/<arm>-seed<k>/``.

Run: ``.venv/bin/python examples/self_reward.py`` (3 seeds); ``--quick`` is a tiny form for the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from seqlab.config import BackboneConfig
from seqlab.models import LanguageModel
from seqlab.posttrain import tasks as T
from seqlab.posttrain.dpo import DPOConfig
from seqlab.posttrain.self_reward import self_reward


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="the first seed (seeds seed..seed+seeds-1)")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="train nothing: one table and figure from the runs of several self_reward.json files (e.g. one seed "
        "per process, run side by side)",
    )
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--sft-steps", type=int, default=900)
    parser.add_argument("--train", type=int, default=2000, help="seed instructions (half also as judge examples)")
    parser.add_argument("--prompts", type=int, default=96, help="self-reward prompts per iteration")
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--judge-samples", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--dpo-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="out/self_reward")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds) for the tests")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.iterations, args.d_model, args.n_layer, args.sft_steps = 1, 2, 16, 2, 20
        args.train, args.prompts, args.test, args.candidates, args.judge_samples = 40, 6, 8, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merged = [json.loads(Path(p).read_text()) for p in args.merge]
        iterations = {m["settings"]["iterations"] for m in merged}
        if len(iterations) != 1:
            parser.error(f"--merge: the files ran different numbers of iterations ({sorted(iterations)})")
        args.iterations = iterations.pop()
        write_report([r for m in merged for r in m["runs"]], args, out, sum(m["seconds"] for m in merged))
        return
    started = time.perf_counter()
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        splits = T.make_splits(args.train, args.prompts, args.test, seed=seed, min_len=3, max_len=5)
        docs = T.seed_corpus(splits.train, T.judge_examples(splits.train[: args.train // 2], seed=seed), seed=seed)
        judge_test = T.judge_examples(splits.test, seed=seed + 1000)
        torch.manual_seed(seed)
        m0 = LanguageModel(BackboneConfig(d_model=args.d_model, n_layer=args.n_layer, ssm="mamba1"), vocab_size=256)
        t0 = time.perf_counter()
        T.sft(m0, docs, steps=args.sft_steps, batch_size=32, lr=3e-3, seed=seed)
        sft_seconds = time.perf_counter() - t0

        def measure(model, test=splits.test, judges=judge_test):
            got = T.evaluate_task(model, test)
            got.update({f"judge_{k}": v for k, v in T.judge_agreement(model, judges).items()})
            return got

        for arm, shuffle in (("self-reward", False), ("shuffled", True)):
            t0 = time.perf_counter()
            report = self_reward(
                m0,
                [i.prompt for i in splits.prompts],
                iterations=args.iterations,
                candidates=args.candidates,
                judge_samples=args.judge_samples,
                temperature=args.temperature,
                max_new_tokens=8,
                dpo=DPOConfig(beta=args.dpo_beta, lr=args.dpo_lr, epochs=args.dpo_epochs, batch_size=8, seed=seed),
                out=out / f"{arm}-seed{seed}",
                seed=seed,
                shuffle_pairs=shuffle,
                measure=measure,
            )
            runs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "accuracy": [m["accuracy"] for m in report.measures],
                    "agreement": [m["judge_agreement"] for m in report.measures],
                    "measures": report.measures,
                    "iterations": report.to_dict()["iterations"],
                    "sft_seconds": sft_seconds,
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(f"seed {seed} {arm}: accuracy {runs[-1]['accuracy']} agreement {runs[-1]['agreement']}", flush=True)
    write_report(runs, args, out, time.perf_counter() - started)


def write_report(runs: list[dict], args, out: Path, total: float) -> None:
    """The markdown table (mean ± spread over seeds), self_reward.json and self_reward.png of ``runs``."""
    lines = ["| arm | model | task accuracy | judge agreement | pairs |", "|---|---|---|---|---|"]
    for arm in ("self-reward", "shuffled"):
        mine = [r for r in runs if r["arm"] == arm]
        for t in range(args.iterations + 1):
            acc = spread([r["accuracy"][t] for r in mine])
            agr = spread([r["agreement"][t] for r in mine])
            pairs = "" if t == 0 else f"{statistics.fmean(r['iterations'][t - 1]['pairs'] for r in mine):.1f}"
            lines.append(f"| {arm} | M{t} | {acc[0]:.3f} ± {acc[1]:.3f} | {agr[0]:.3f} ± {agr[1]:.3f} | {pairs} |")
    table = "\n".join(lines)
    print(table)
    seeds = sorted({r["seed"] for r in runs})
    print(f"wall time {total:.0f} s over {len(seeds)} seed(s) {seeds}")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
    (out / "self_reward.json").write_text(
        json.dumps({"settings": settings, "runs": runs, "table": table, "seconds": total}, indent=1)
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "accuracy", "task accuracy"), (axes[1], "agreement", "judge agreement")):
        for arm, color in (("self-reward", "C0"), ("shuffled", "C1")):
            mine = [r for r in runs if r["arm"] == arm]
            xs = list(range(args.iterations + 1))
            mean = [spread([r[key][t] for r in mine]) for t in xs]
            ax.errorbar(xs, [m for m, _ in mean], yerr=[s for _, s in mean], label=arm, color=color, capsize=3)
        ax.set_xlabel("iteration (M_t)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "self_reward.png", dpi=100)


if __name__ == "__main__":
    main()
