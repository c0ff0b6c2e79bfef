"""The numbers of a ladder row, each through the library's public API: held-out bits per byte streamed from the
store (``seqlab.pipelines.stream_bits``), task accuracy (``seqlab.posttrain.tasks.evaluate_task``), parameters
(``seqlab.ffn.parameter_counts``), bytes on disk (the saved model file) and greedy decode bytes per second
(``seqlab.generate.generate``, the median of repeats)."""

from __future__ import annotations

import os
import statistics
import time

import torch


def heldout_bpb(model, store, sequence: str = "heldout") -> float:
    """Bits per byte of the stored ``sequence``, every prediction, the state carried."""
    from seqlab.pipelines import stream_bits

    model.eval()
    with torch.no_grad():
        bits, n = stream_bits(model, store, sequence)
    return bits / n


def decode(model, prompt: torch.Tensor, tokens: int, repeats: int, **options) -> dict:
    """Greedy (or ``options``) generation of ``tokens`` after ``prompt``, ``repeats`` times: the median rate, the
    last output's tokens and its speculative stats (None without a drafter)."""
    from seqlab.generate import generate

    rates, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = generate(model, prompt, tokens, **options)
        seconds = time.perf_counter() - started
        rates.append(sum(len(t) for t in out.tokens) / seconds)
    assert out is not None
    return {
        "bytes_per_s": statistics.median(rates),
        "tokens": [list(map(int, t)) for t in out.tokens],
        "stats": out.stats,
    }


def row(
    rung: str,
    label: str,
    model_name: str,
    *,
    bpb: float | None,
    accuracy: float | None,
    params: dict | None,
    path=None,
    rate: float | None,
    seconds: float,
    notes: str = "",
    **extra,
) -> dict:
    """One table row (summary.json keeps every field; the markdown table shows the named ones)."""
    return {
        "rung": rung,
        "label": label,
        "model": model_name,
        "heldout_bpb": bpb,
        "task_accuracy": accuracy,
        "params_total": None if params is None else params["total"],
        "params_active": None if params is None else params["active"],
        "file": None if path is None else os.fspath(path),
        "bytes_on_disk": None if path is None else os.path.getsize(path),
        "decode_bytes_per_s": rate,
        "seconds": seconds,
        "notes": notes,
        **extra,
    }
