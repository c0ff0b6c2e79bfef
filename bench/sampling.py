"""The cost of choosing one sampled token from logits: seqlab's compiled sampler against its PyTorch twin and
against the filters + ``torch.multinomial`` that ``generate`` sampled with before (``seqlab.generate``'s
``_filter_logits``, still what speculative decoding's law uses), on the same logits, per vocabulary size and
option set. One row of logits per call (batch 1), the peers taking turns; median microseconds per call.

The decode loops call the compiled sampler once per row and step (inside the many-steps C call it runs between
steps without a Python call), so this is the part of a sampled token's time that is not the model's step.

    python bench/sampling.py                               # vocabularies 256, 32000, 50257
    python bench/sampling.py --vocab 256 --quick           # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import machine_line

from seqlab.generate import _filter_logits
from seqlab.sampling import SamplingOptions, sample, sample_reference

SETTINGS = {
    "T 0.8": SamplingOptions(0.8),
    "T 0.8, top-k 50, top-p 0.95": SamplingOptions(0.8, 50, 0.95),
    "T 0.8, top-p 0.95": SamplingOptions(0.8, None, 0.95),
    "T 1, top-p 0.9, min-p 0.05": SamplingOptions(1.0, None, 0.9, 0.05),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[256, 32000, 50257])
    p.add_argument("--calls", type=int, default=200, help="calls per timing (default 200)")
    p.add_argument("--repeats", type=int, default=5, help="timings per peer; the median is shown")
    p.add_argument("--scale", type=float, default=3.0, help="logits are standard normal times this (default 3)")
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="few calls, one repeat (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.repeats = 5, 1
    if min(args.vocab) < 2 or args.calls < 1 or args.repeats < 1:
        p.error("every --vocab must be at least 2, --calls and --repeats at least 1")
    return args


def peers(logits: torch.Tensor, options: SamplingOptions) -> dict:
    u = torch.rand(1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)

    def before():
        filtered = _filter_logits(logits, None, options.temperature, options.top_k, options.top_p, options.min_p, 1.0)
        return torch.multinomial(torch.softmax(filtered, dim=-1)[0], 1, generator=generator)

    return {
        "compiled": lambda: sample(logits, u, options),
        "PyTorch twin": lambda: sample_reference(logits, u, options),
        "filters + multinomial (before)": before,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"one row of logits (N(0, 1) x {args.scale}) per call; median of {args.repeats} timings of {args.calls}")
    rows = []
    for vocab in args.vocab:
        logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(vocab)) * args.scale
        for label, options in SETTINGS.items():
            fns = peers(logits, options)
            times: dict = {name: [] for name in fns}
            for fn in fns.values():
                fn()  # warm-up (builds the compiled library once)
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times[name].append((time.perf_counter() - start) / args.calls * 1e6)
            us = {name: statistics.median(t) for name, t in times.items()}
            c, twin, old = us.values()
            rows.append(f"| {vocab:,} | {label} | {c:,.0f} | {twin:,.0f} | {old:,.0f} | {old / c:.1f}x |")
            print(f"  V={vocab} {label}: compiled {c:,.0f} us, before {old:,.0f} us", flush=True)
    print()
    print("| vocab | options | compiled us | PyTorch twin us | filters + multinomial (before) us | before / compiled |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
