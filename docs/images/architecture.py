"""Draws docs/images/architecture.png, the picture of docs/architecture.md: the rooms, the arrows between them and
the data flow. Run it after changing either: `.venv/bin/python docs/images/architecture.py`."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# (x, y, width, height, title, contents), top to bottom: a room may import the rooms below it, never above
ROOMS = [
    (
        0.5,
        8.3,
        10.6,
        1.3,
        "seqlab.cli  (seqlab/cli/)   beside it: seqlab.ladder  (seqlab/ladder/)",
        "parse flags and TOML, show progress, print; call public library functions; import anything below, lazily;\n"
        "the ladder composes every room's public pieces into one run (`seqlab ladder`)",
    ),
    (
        0.5,
        6.3,
        10.6,
        1.5,
        "seqlab.pipelines  (pipelines/)",
        "Zarr v3 sequence stores (format, reader, writer, ingest), store streaming, training data from stores,\n"
        "Ray jobs (score, embed, generate) and Ray Train",
    ),
    (
        0.5,
        4.3,
        10.6,
        1.5,
        "seqlab.domains  (domains/)",
        "one Adapter per modality (bytes, audio, DNA, video, memory events): encode, files, source, metrics;\n"
        "training data and evaluation from files; MemorySession (log, snapshots, repair)",
    ),
    (
        0.5,
        1.9,
        10.6,
        1.9,
        "seqlab  (seqlab/)",
        "config, mixers and blocks, backbone, RecurrentState, models and heads, streaming (the one carried-state\n"
        "loop), generate, Trainer and window sources, checkpoints, HF interop, runs, errors",
    ),
    (
        0.5,
        0.2,
        10.6,
        1.2,
        "seqlab.kernels  (kernels/)",
        "selective scan, SSD, causal conv1d, decode steps: ref (float64 truth), chunked (CPU), triton (GPU);\n"
        "one backend table read by the dispatcher",
    ),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 7.4))
    ax.set_xlim(0, 14.2)
    ax.set_ylim(0, 10.1)
    ax.axis("off")
    for x, y, w, h, title, body in ROOMS:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc="#eef3fb", ec="#33507a", lw=1.4))
        ax.text(x + 0.15, y + h - 0.3, title, fontsize=11, fontweight="bold", va="top", color="#1d3557")
        ax.text(x + 0.15, y + h - 0.72, body, fontsize=9, va="top", color="#222222")
    for (_, y0, _, _, _, _), (_, y1, _, h1, _, _) in zip(ROOMS, ROOMS[1:]):
        ax.add_patch(
            FancyArrowPatch((5.8, y0), (5.8, y1 + h1), arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#33507a")
        )
    ax.text(0.6, 10.05, "imports point down only", fontsize=8.5, color="#33507a", style="italic", va="top")
    flow = (
        "data flow\n\nraw signal\n-> adapter.encode\n-> tensor\n-> model(x, state)\n-> (output, new_state)\n"
        "-> head\n-> adapter.decode\n   / metric"
    )
    ax.text(
        11.5,
        7.4,
        flow,
        fontsize=8.5,
        va="top",
        family="monospace",
        bbox={"boxstyle": "round", "fc": "#fff7e6", "ec": "#b07d2b"},
    )
    out = Path(__file__).with_name("architecture.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
