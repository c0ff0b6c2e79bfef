"""Greedy and sampled ``generate`` tokens/s on a bench model, through the public API only (``generate``,
``LanguageModel``, ``set_backend``), so the same file times an older seqlab checkout as well as this one.

The model is bench/cpu_forward.py's (d_model 256, 4 layers, vocab 256, fp32, seeded random weights) on the
compiled kernels; a random 64-token prompt (seed 1) per row; ``--new-tokens`` tokens per timed call after an
untimed 8-token call; the modes take turns within every repeat (median). This is how docs/benchmarks.md compares
sampled decoding before and after sampling moved into C (issue 24, sixth sitting), one process per version:

    python bench/decode_modes.py                                  # this checkout
    git worktree add /tmp/old d1c5025 && ln -s ../kernels /tmp/old/seqlab/kernels
    cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/this/bench/decode_modes.py   # the older checkout

(the symlink makes ``seqlab.kernels`` resolve inside the old checkout rather than through this checkout's
editable install; run from the old checkout's folder so its ``seqlab`` comes first).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import machine_line
from cpu_forward import build_pair

MODES = {
    "greedy": {},
    "T 1": dict(do_sample=True, seed=0),
    "T 0.8, top-k 50, top-p 0.9": dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["Mamba-1", "Mamba-2"], default="Mamba-1")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timings per mode and batch; the median is shown")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="few tokens, one repeat (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 8, 1
    if args.new_tokens < 1 or args.repeats < 1 or min(args.batches) < 1:
        p.error("--new-tokens, --repeats and every batch must be at least 1")
    return args


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import seqlab

    print(machine_line())
    model, _ = build_pair(args.model, False)
    model.set_backend("native")
    print(f"seqlab from {seqlab.__file__}, {args.model}, {args.threads} threads, median of {args.repeats}")
    times: dict = {}
    for _ in range(args.repeats):
        for batch in args.batches:
            ids = torch.randint(0, 256, (batch, 64), generator=torch.Generator().manual_seed(1))
            for name, options in MODES.items():
                model.generate(ids, 8, **options)
                start = time.perf_counter()
                out = model.generate(ids, args.new_tokens, **options)
                times.setdefault((batch, name), []).append(time.perf_counter() - start)
                assert len(out.tokens[0]) == args.new_tokens
    print()
    print("| batch | mode | tok/s |")
    print("|---|---|---|")
    for (batch, name), spent in times.items():
        print(f"| {batch} | {name} | {batch * args.new_tokens / statistics.median(spent):,.0f} |")


if __name__ == "__main__":
    main()
