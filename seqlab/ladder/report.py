"""A ladder run's report: ``summary.json`` (every number), ``summary.md`` (one table, a row per rung's model or
decoding strategy) and ``ladder.png`` (held-out bits per byte against bytes on disk and against decode speed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = (
    ("rung", "rung"),
    ("label", "what"),
    ("heldout_bpb", "held-out bits/byte"),
    ("task_accuracy", "task accuracy"),
    ("params", "params (total / active)"),
    ("bytes_on_disk", "bytes on disk"),
    ("decode_bytes_per_s", "decode bytes/s"),
    ("seconds", "wall s"),
    ("notes", "notes"),
)


def _cell(r: dict, key: str) -> str:
    if key == "params":
        if r["params_total"] is None:
            return "-"
        return f"{r['params_total']:,} / {r['params_active']:,}"
    value = r.get(key)
    if value is None:
        return "-"
    if key == "heldout_bpb":
        return f"{value:.3f}"
    if key == "task_accuracy":
        return f"{value:.3f}"
    if key == "bytes_on_disk":
        return f"{value:,}"
    if key == "decode_bytes_per_s":
        return f"{value:,.0f}"
    if key == "seconds":
        return f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows``."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, key) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(summary: dict) -> str:
    s = summary["settings"]
    seconds = summary["rungs"]
    head = (
        f"# seqlab ladder\n\n{summary['corpus']['bytes']:,} bytes of {summary['corpus']['what']} "
        f"(train {summary['sequences']['train']:,}, valid {summary['sequences']['valid']:,}, held-out "
        f"{summary['sequences']['heldout']:,}); byte models d_model {s['d_model']}, {s['n_layer']} layers, "
        f"{s['steps']} steps of {s['batch_size']}x{s['window']}; seed {summary['seed']}.\n\n"
        "Held-out bits/byte: the held-out tail streamed with the state carried (no rung trains or chooses on it). "
        "Task accuracy: greedy answers to the program-checked instruction task's test split. Decode bytes/s: "
        "greedy, batch 1 (rung 6: the sampled batch).\n\n"
    )
    wall = ", ".join(f"{n}: {r['seconds']:.1f} s" for n, r in seconds.items())
    return (
        head
        + table(summary["rows"])
        + f"\nWall time per rung: {wall}; all rungs {summary['seconds_all_rungs']:.1f} s.\n"
    )


def _points(rows: list[dict], key: str) -> list[tuple[float, float, str]]:
    """(x, bits per byte, labels) with rows at the same point (one model file, several decoders) merged."""
    points: dict[tuple[float, float], list[str]] = {}
    for r in rows:
        x, y = r.get(key), r["heldout_bpb"]
        if x is None or y is None or not math.isfinite(y):
            continue
        points.setdefault((x, y), []).append(r["rung"])
    return [(x, y, ",".join(labels)) for (x, y), labels in points.items()]


def plot(rows: list[dict], path: Path) -> Path:
    """Two panels: held-out bits/byte against bytes on disk (log) and against greedy batch-1 decode bytes/s, one
    labelled point per model (rows of one model file share a point; rung 6's sampled batches are left out of the
    speed panel). The ladder's rows in blue, rung 7 (beside it) in orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, title in (
        (axes[0], "bytes_on_disk", "bytes on disk (log)"),
        (axes[1], "decode_bytes_per_s", "greedy decode bytes/s, batch 1"),
    ):
        for side, color, name in (
            ("ladder", "tab:blue", "the ladder (rungs 1-6)"),
            ("beside", "tab:orange", "distillation (rung 7)"),
        ):
            mine = [r for r in rows if r["rung"].startswith("7") == (side == "beside")]
            if key == "decode_bytes_per_s":
                mine = [r for r in mine if not r["rung"].startswith("6")]
            points = _points(mine, key)
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", color=color, label=name)
            for x, y, label in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(title)
        ax.set_ylabel("held-out bits per byte (lower is better)")
        ax.grid(alpha=0.3)
        if key == "bytes_on_disk":
            ax.set_xscale("log")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle("seqlab ladder: quality against size and speed (labels: the rows of summary.md)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(summary: dict, out: Path) -> None:
    from seqlab.io import atomic_write_bytes

    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False, default=str).encode())
    atomic_write_bytes(out / "summary.md", markdown(summary).encode())
    plot(summary["rows"], out / "ladder.png")
