"""Mamba in the Llama on bytes: does starting the Mamba-2 layers from the attention weights help? (issue 18)

A small Llama-style teacher (attention with GQA and rotary positions, gated MLPs, RMSNorms; vocab 256) is trained
here on the bytes of the CPython documentation text (``pydoc_data.topics``, shipped with every interpreter, as in
moe_bytes.py). It is saved as a Hugging Face Llama directory when ``seqlab.interop.hf.save`` can write one (else
a seqlab model file) and loaded back the way ``seqlab distill --teacher`` does (``seqlab.distill.teacher``).

Students: 50% and 100% of its attention layers replaced by Mamba-2 layers, each initialised from the attention
weights (``init="attention"``: V->x, K->B, Q->C, O->out_proj) or by Mamba-2's own initialisation
(``init="random"``). Every student gets the same budget: 2 progressive alignment stages of ``--align-steps``
steps, then ``--e2e-steps`` of KL(teacher || student), with the same optimiser and data order for a seed; 3 seeds.

Measured on the held-out last 5% of the bytes (the same for every model): KL(teacher || student) in nats per
byte and the student's bits per byte (the teacher's for reference), before any training and after each run.

Run: `.venv/bin/python examples/distill.py` (defaults below); `--quick` is the tiny version (a few steps).
Writes into --out: distill.json (settings, every run, the table) and distill.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HELD_OUT = 0.05
FRACTIONS = (0.5, 1.0)
INITS = ("attention", "random")


@dataclass(frozen=True)
class Settings:
    d_model: int = 64
    n_layer: int = 4
    heads: int = 4
    kv_heads: int = 2
    d_ffn: int = 128
    bytes: int = 400_000
    batch_size: int = 8
    window: int = 128
    teacher_steps: int = 800
    teacher_lr: float = 3e-3
    align_steps: int = 60
    e2e_steps: int = 150
    lr: float = 1e-3
    seeds: int = 3
    eval_windows: int = 40


def corpus(size: int) -> bytes:
    from seqlab.cli.demo_inputs import python_docs

    return python_docs()[:size]


def train_teacher(s: Settings, train, out: Path):
    import torch

    from seqlab.config import BackboneConfig
    from seqlab.models import LanguageModel
    from seqlab.train import TrainConfig, Trainer

    torch.manual_seed(0)
    config = BackboneConfig(
        d_model=s.d_model,
        n_layer=s.n_layer,
        ssm="attention",
        attn_heads=s.heads,
        attn_kv_heads=s.kv_heads,
        ffn="mlp",
        d_ffn=s.d_ffn,
    )
    model = LanguageModel(config, 256, tie_embeddings=False)
    cfg = TrainConfig(
        lr=s.teacher_lr,
        max_steps=s.teacher_steps,
        warmup_steps=min(50, s.teacher_steps // 10),
        batch_size=s.batch_size,
        window=s.window,
        carry_state=False,
        progress=False,
    )
    Trainer(model, cfg, train).fit()
    try:  # an HF Llama directory when the interop can write one
        from seqlab.interop.hf import save

        where = out / "teacher-hf"
        save(model.eval(), where)
        kind = "hf-llama-directory"
    except Exception as exc:  # noqa: BLE001 - any refusal: fall back to seqlab's own format
        from seqlab.checkpoint import save_model

        where = save_model(out / "teacher.safetensors", model)
        kind = f"seqlab-model-file ({type(exc).__name__}: {exc})"
    return where, kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/distill", help="folder for distill.json and distill.png")
    parser.add_argument("--quick", action="store_true", help="tiny run (1 seed, a few steps, 60 kB)")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--align-steps", type=int)
    parser.add_argument("--e2e-steps", type=int)
    parser.add_argument("--teacher-steps", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decay", type=float, default=None, help="mapped layers' per-step decay (default 0.9)")
    parser.add_argument("--no-calibrate", action="store_true", help="mapped layers keep norm weight 1")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    s = Settings()
    if args.quick:
        s = Settings(bytes=60_000, teacher_steps=20, align_steps=2, e2e_steps=3, seeds=1, eval_windows=4, batch_size=4)
    for name in ("seeds", "align_steps", "e2e_steps", "teacher_steps"):
        if getattr(args, name) is not None:
            s = Settings(**{**asdict(s), name: getattr(args, name)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from seqlab.distill import build_student, calibrate_norms, choose_layers, distill, evaluate_distillation
    from seqlab.distill.mapping import DEFAULT_DECAY
    from seqlab.distill.teacher import load_teacher

    decay = DEFAULT_DECAY if args.decay is None else args.decay
    from seqlab.windows import SequenceSource

    data = torch.tensor(list(corpus(s.bytes)), dtype=torch.long)
    split = int(len(data) * (1 - HELD_OUT))
    train, held = data[:split], data[split:]
    train_source = SequenceSource(train, s.batch_size, s.window)
    held_source = SequenceSource(held, 1, s.window)

    started = time.perf_counter()
    where, kind = train_teacher(s, train_source, out)
    teacher = load_teacher(where)
    teacher_seconds = time.perf_counter() - started
    print(f"teacher: {kind}, {teacher_seconds:.0f} s")

    runs = []
    for fraction in FRACTIONS:
        for init in INITS:
            for seed in range(s.seeds):
                t0 = time.perf_counter()
                rotated = torch.roll(train, -seed * len(train) // 3)  # a seed's data order (same for both inits)
                source = SequenceSource(rotated, s.batch_size, s.window)
                layers = choose_layers(teacher.config, fraction)
                start = build_student(teacher, layers, init, decay, seed=seed)
                if init == "attention" and not args.no_calibrate:  # as distill() does before its first stage
                    calibrate_norms(teacher, start, layers, source.window(0)[0])
                before = evaluate_distillation(teacher, start, held_source, s.eval_windows)
                summary = distill(
                    teacher,
                    source,
                    out / "runs" / f"f{fraction}-{init}-s{seed}",
                    replace=fraction,
                    stages=2,
                    steps=s.align_steps,
                    e2e_steps=s.e2e_steps,
                    init=init,
                    decay=decay,
                    train_options={"lr": s.lr, "seed": seed, "warmup_steps": 10 if not args.quick else 0},
                    eval_data=held_source,
                    overwrite=True,
                    progress=False,
                    calibrate=not args.no_calibrate,
                )
                from seqlab.checkpoint import load_model

                student = build_student(teacher, summary["layers"], init, seed=seed)
                load_model(summary["student"], student)
                after = evaluate_distillation(teacher, student, held_source, s.eval_windows)
                run = {
                    "fraction": fraction,
                    "init": init,
                    "seed": seed,
                    "layers": summary["layers"],
                    "kl_before": before["eval_kl"],
                    "bpb_before": before["eval_bits_per_token"],
                    "kl": after["eval_kl"],
                    "bpb": after["eval_bits_per_token"],
                    "teacher_bpb": after["teacher_bits_per_token"],
                    "stages": summary["stages"],
                    "seconds": time.perf_counter() - t0,
                }
                runs.append(run)
                print(
                    f"{fraction:.0%} {init:9s} seed {seed}: KL {run['kl_before']:.3f} -> {run['kl']:.4f} nats/byte, "
                    f"bpb {run['bpb_before']:.3f} -> {run['bpb']:.3f} (teacher {run['teacher_bpb']:.3f}), "
                    f"{run['seconds']:.0f} s"
                )
    table = {}
    for fraction in FRACTIONS:
        for init in INITS:
            rows = [r for r in runs if r["fraction"] == fraction and r["init"] == init]
            table[f"{fraction:.0%} {init}"] = {
                key: statistics.fmean(r[key] for r in rows) for key in ("kl_before", "kl", "bpb_before", "bpb")
            } | {f"{key}_std": statistics.pstdev(r[key] for r in rows) for key in ("kl", "bpb")}
    teacher_bpb = runs[0]["teacher_bpb"]
    result = {
        "settings": asdict(s),
        "calibrate": not args.no_calibrate,
        "decay": decay,
        "teacher": {"saved_as": kind, "bpb": teacher_bpb, "seconds": teacher_seconds},
        "held_out_bytes": len(held),
        "eval_bytes": min(s.eval_windows, held_source.num_windows) * s.window,
        "runs": runs,
        "table": table,
        "seconds": time.perf_counter() - started,
    }
    (out / "distill.json").write_text(json.dumps(result, indent=1))
    print(f"teacher {teacher_bpb:.3f} bits/byte")
    for name, row in table.items():
        print(
            f"{name:14s} KL {row['kl_before']:.3f} -> {row['kl']:.4f} +- {row['kl_std']:.4f}  "
            f"bpb {row['bpb_before']:.3f} -> {row['bpb']:.3f} +- {row['bpb_std']:.3f}"
        )
    plot(table, teacher_bpb, s, out / "distill.png")


def plot(table: dict, teacher_bpb: float, s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    colors = ["#1f77b4" if "attention" in n else "#d62728" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "kl", "held-out KL(teacher || student), nats/byte"),
        (axes[1], "bpb", "held-out bits per byte"),
    ):
        values = [table[n][key] for n in names]
        errors = [table[n][f"{key}_std"] for n in names]
        ax.bar(names, values, yerr=errors, color=colors, capsize=4)
        ax.set_ylabel(label)
        if key == "bpb":
            ax.axhline(teacher_bpb, color="gray", ls="--", lw=1, label=f"teacher {teacher_bpb:.3f}")
            ax.set_ylim(min(values + [teacher_bpb]) * 0.95, max(values) * 1.02)
            ax.legend(fontsize=8)
        else:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"Distilling a {s.n_layer}-layer byte Llama (d_model {s.d_model}) into Mamba-2: attention init (blue) vs "
        f"random init (red)\n2 x {s.align_steps} alignment + {s.e2e_steps} KL steps each, mean +- std over "
        f"{s.seeds} seed(s)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
