"""Ragged prompts: one packed prefill (``seqlab.generate.prefill``) against prefilling each prompt alone.

Same weights, one process, the peers taking turns: for each model kind, 8 prompts of mixed lengths (5 to 300
tokens by default) are prefilled (a) as one packed row with ``cu_seqlens`` (what ``generate`` does) and (b) one by
one, ``model(prompt[None])`` each. Both give the same per-prompt states (tests/test_core/test_packed.py); this
prints prompt tokens/s for both and their ratio (median of ``--repeats``). fp32, batch 1 row, torch.no_grad.

    python bench/packed_prefill.py                 # d_model 128, 4 layers, mamba1 / mamba2 / mamba3 / a hybrid
    python bench/packed_prefill.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import machine_line

from seqlab import BackboneConfig, LanguageModel
from seqlab.generate import prefill

LENGTHS = (7, 300, 33, 120, 5, 64, 250, 18)
VOCAB = 256


def configs(d_model: int, n_layer: int) -> dict[str, BackboneConfig]:
    base = dict(d_model=d_model, n_layer=n_layer)
    return {
        "mamba1": BackboneConfig(**base, ssm="mamba1"),
        "mamba2": BackboneConfig(**base, ssm="mamba2", headdim=32, d_state=64, chunk_size=64),
        "mamba3": BackboneConfig(**base, ssm="mamba3", headdim=32, d_state=64, chunk_size=64),
        "hybrid": BackboneConfig(
            **base,
            ssm="mamba2",
            headdim=32,
            d_state=64,
            chunk_size=64,
            attn_heads=4,
            layer_overrides={n_layer // 2: {"mixer": "attention"}},
        ),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="prompt lengths")
    p.add_argument("--repeats", type=int, default=7, help="timings per peer; the median is shown")
    p.add_argument("--models", nargs="+", default=None, choices=("mamba1", "mamba2", "mamba3", "hybrid"))
    p.add_argument("--quick", action="store_true", help="a tiny model, short prompts, one repeat")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.n_layer, args.lengths, args.repeats = 32, 2, [3, 17, 9], 1
    if min(args.lengths) < 1 or args.repeats < 1:
        p.error("every length and --repeats must be at least 1")
    return args


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    tokens = sum(args.lengths)
    print(
        f"prompts: {len(args.lengths)} of lengths {args.lengths} ({tokens} tokens); d_model {args.d_model}, "
        f"{args.n_layer} layers, vocab {VOCAB}, fp32; median of {args.repeats}"
    )
    print("| model | packed prefill tok/s | one by one tok/s | packed / one by one |")
    print("|---|---:|---:|---:|")
    for name, config in configs(args.d_model, args.n_layer).items():
        if args.models and name not in args.models:
            continue
        torch.manual_seed(0)
        model = LanguageModel(config, vocab_size=VOCAB).eval()
        prompts = [torch.randint(0, VOCAB, (n,)) for n in args.lengths]
        peers = {
            "packed": lambda: prefill(model, prompts),
            "alone": lambda: [model(p[None]) for p in prompts],
        }
        for run in peers.values():  # warm-up
            run()
        times: dict[str, list[float]] = {k: [] for k in peers}
        for _ in range(args.repeats):  # the peers take turns, so a slow spell hits both
            for key, run in peers.items():
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
        rate = {k: tokens / statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {rate['packed']:,.0f} | {rate['alone']:,.0f} | {rate['packed'] / rate['alone']:.2f}x |")


if __name__ == "__main__":
    main()
