"""Training throughput on mixed-length documents: packed rows (``seqlab.packing.PackedSource``, the model's
``cu_seqlens``) against padded batches, in useful (trained-target) tokens per second.

Corpus: real documents of very different lengths, all bytes (UTF-8, the byte adapter's ids): CPython's pydoc
topics (``pydoc_data.topics.topics``: the language reference's sections, 79 documents here) and the docstrings
of the public functions, classes and methods of 40 standard-library modules (``inspect.getdoc``), each one
document. Both ship with the Python that runs the bench, so the corpus is the same wherever that Python is.

Three ways to batch the same documents, each a training step (forward, backward, AdamW step) from the same
initial weights, ``--batch`` rows a step, every row starting from a fresh state and no state or target crossing
a document:

- ``pad to L``: each document cut into rows of ``--window`` L, each row padded to L (a longer document fills
  several rows);
- ``pad to longest``: the same rows, each batch padded only to its longest row (dynamic padding);
- ``packed``: documents laid end to end into full rows of L (a document cut at a row's end goes on in the next
  row as a new sequence), the batch flattened into one row with its ``cu_seqlens``.

Useful tokens: the positions with a target (each document's elements but its last); tokens/s counts those over
the CPU time of this process over the timed steps (on a machine shared with other jobs, wall time measures the
neighbours; with one torch thread CPU time is what the steps cost; the wall figure is printed too). Efficiency:
useful tokens / positions computed, over the timed batches and over the whole epoch. By default every batch of
the epoch is timed (``--batches N``: N batches spread evenly over it, the epoch's partly empty tail batch left
out), after 2 untimed warm-up steps.

    python bench/packing.py                       # the full corpus, L = 512, batch 8, Mamba-1 and Mamba-2
    python bench/packing.py --quick               # a smoke test (a few batches of a small corpus)
    nice -n 10 python bench/packing.py --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import statistics
import sys
import time

import numpy as np
import torch
from _machine import machine_line  # noqa: E402  (bench/ is on sys.path when a bench runs)

from seqlab.config import BackboneConfig
from seqlab.models import LanguageModel
from seqlab.packing import IGNORE, PackedSource

MODULES = (
    "argparse asyncio.tasks base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal "
    "difflib email.message enum fractions functools gzip hashlib heapq html.parser http.client inspect io "
    "ipaddress itertools json logging math operator os pathlib pickle random re shutil statistics string "
    "subprocess textwrap"
).split()
MODELS = {
    "Mamba-1": dict(ssm="mamba1", d_state=16),
    "Mamba-2": dict(ssm="mamba2", d_state=32, headdim=32, chunk_size=64),
}


def corpus() -> list[bytes]:
    """The documents: pydoc topics, then the docstrings of the modules' public members (in a fixed order)."""
    from pydoc_data import topics

    docs = [topics.topics[k].encode() for k in sorted(topics.topics)]
    seen: set[str] = set()
    for name in MODULES:
        module = importlib.import_module(name)
        members = [(n, getattr(module, n, None)) for n in sorted(dir(module)) if not n.startswith("_")]
        for _, obj in members:
            parts = [obj]
            if inspect.isclass(obj):
                parts += [getattr(obj, m, None) for m in sorted(vars(obj)) if not m.startswith("_")]
            for part in parts:
                if not (inspect.isroutine(part) or inspect.isclass(part) or inspect.ismodule(part)):
                    continue
                doc = inspect.getdoc(part)
                if doc and len(doc) >= 2 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc.encode())
    return docs


def padded_batches(docs: list[np.ndarray], batch: int, window: int, to_longest: bool):
    """(inputs, targets) batches of one document piece per row, padded to ``window`` or to the batch's longest."""
    rows = []  # (ids of the piece plus the next element when the document goes on)
    for d in docs:
        for start in range(0, len(d), window):
            rows.append(d[start : start + window + 1])
    out = []
    for b in range(0, len(rows), batch):
        group = rows[b : b + batch]
        width = max(len(r) for r in group) if to_longest else window + 1
        width = min(width, window + 1)
        inputs = np.zeros((batch, width - 1 if to_longest else window), np.int64)
        targets = np.full(inputs.shape, IGNORE, np.int64)
        for k, r in enumerate(group):
            n = min(len(r), inputs.shape[1] + 1)
            inputs[k, : min(len(r), inputs.shape[1])] = r[: inputs.shape[1]]
            targets[k, : n - 1] = r[1:n]
        out.append((torch.from_numpy(inputs), torch.from_numpy(targets), None))
    return out


def packed_batches(docs: list[np.ndarray], batch: int, window: int):
    source = PackedSource.from_documents(docs, batch, window)
    return [(*source.window(i), source.cu_seqlens(i)) for i in range(source.num_windows)], source.stats()


def run(model, batches, lr: float = 1e-3):
    """One training step per batch: forward (packed: one flattened row with cu_seqlens), loss over the real
    targets, backward, AdamW step. Returns (CPU seconds of this process, wall seconds, useful tokens, positions,
    mean loss in bits)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, useful, positions = [], 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    for inputs, targets, cu in batches:
        optimizer.zero_grad(set_to_none=True)
        if cu is None:
            logits = model(inputs, None, return_state=False).logits
        else:
            logits = model(inputs.reshape(1, -1), None, return_state=False, cu_seqlens=cu).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()) / np.log(2))
        useful += int((targets != IGNORE).sum())
        positions += targets.numel()
    return time.process_time() - cpu, time.perf_counter() - start, useful, positions, statistics.fmean(losses)


def spread(items: list, n: int | None) -> list:
    """``n`` items spread evenly over ``items`` but the last (the epoch's tail batch, partly empty), or all."""
    if n is None or n >= len(items) - 1:
        return items
    body = items[:-1]
    return [body[round(k * (len(body) - 1) / max(1, n - 1))] for k in range(n)]


def efficiency(batches) -> float:
    """Useful tokens / positions over every batch of the epoch."""
    return sum(int((t != IGNORE).sum()) for _, t, _ in batches) / sum(t.numel() for _, t, _ in batches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=512, help="row length L (default 512)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--batches", type=int, default=None, help="time N batches spread over the epoch (default all)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: both (--quick: Mamba-1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke test: 60 documents, L = 128, 2 batches each")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    docs = [np.frombuffer(d, np.uint8).astype(np.int64) for d in corpus()]
    if args.quick:
        docs, args.batches, args.window = docs[::25][:60], 2, min(args.window, 128)
    args.models = args.models or (["Mamba-1"] if args.quick else list(MODELS))
    lengths = np.array([len(d) for d in docs])
    print(machine_line())
    print(
        f"corpus: {len(docs)} documents, {lengths.sum():,} bytes; length min {lengths.min()}, median "
        f"{int(np.median(lengths))}, mean {lengths.mean():.0f}, max {lengths.max()}; L = {args.window}, batch "
        f"{args.batch}, {args.threads} thread(s), torch {torch.__version__}"
    )
    packed, stats = packed_batches(docs, args.batch, args.window)
    ways = {
        "pad to L": padded_batches(docs, args.batch, args.window, to_longest=False),
        "pad to longest": padded_batches(docs, args.batch, args.window, to_longest=True),
        "packed": packed,
    }
    results = []
    for model_name in args.models:
        torch.manual_seed(0)
        config = BackboneConfig(d_model=args.d_model, n_layer=args.n_layer, **MODELS[model_name])
        base = LanguageModel(config, vocab_size=256)
        rows = {}
        for way, batches in ways.items():
            model = copy.deepcopy(base)  # the same initial weights for every way
            run(model, batches[:2])  # warm-up (not timed)
            model = copy.deepcopy(base)
            timed = spread(batches, args.batches)
            seconds, wall, useful, positions, bits = run(model, timed)
            rows[way] = {
                "model": model_name,
                "way": way,
                "batches": len(timed),
                "epoch_batches": len(batches),
                "epoch_efficiency": efficiency(batches),
                "useful": useful,
                "positions": positions,
                "efficiency": useful / positions,
                "cpu_seconds": seconds,
                "wall_seconds": wall,
                "useful_per_s": useful / seconds,
                "positions_per_s": positions / seconds,
                "useful_per_wall_s": useful / wall,
                "mean_loss_bits": bits,
            }
        for way in ways:
            rows[way]["speedup_vs_pad_to_L"] = rows[way]["useful_per_s"] / rows["pad to L"]["useful_per_s"]
            rows[way]["speedup_vs_pad_to_longest"] = rows[way]["useful_per_s"] / rows["pad to longest"]["useful_per_s"]
        results += rows.values()
    print(f"packing: {stats.to_dict()}")
    print()
    print(
        "| model | batching | batches timed (of epoch) | efficiency (epoch) | useful tokens/s | positions/s | "
        "useful tokens/wall s | packed gain |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gain = (
            ""
            if r["way"] != "packed"
            else (
                f"**{r['speedup_vs_pad_to_L']:.2f}x** vs pad to L, **{r['speedup_vs_pad_to_longest']:.2f}x** vs longest"
            )
        )
        print(
            f"| {r['model']} | {r['way']} | {r['batches']} ({r['epoch_batches']}) | {100 * r['efficiency']:.1f}% "
            f"({100 * r['epoch_efficiency']:.1f}%) | {r['useful_per_s']:,.0f} | {r['positions_per_s']:,.0f} | "
            f"{r['useful_per_wall_s']:,.0f} | {gain} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine_line(), "args": vars(args), "packing": stats.to_dict(), "results": results}, f
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
