"""One AQLM quantized linear layer (``seqlab.quant.linear.AQLMLinear``) vs the fp32 linear layer, on CPU (issue 20).

Shapes: the projections of a d_model=768 Mamba (in_proj 768 -> 3072, out_proj 1536 -> 768) and a larger layer
(2048 -> 8192); at 1 row (one token: decode at batch 1) and 64 rows (a short prefill). Peers, on the same
weights in one process:
- fp32: ``F.linear`` with the dense fp32 weight (the AQLM layer's own dequantised weight, so all peers compute
  the same function);
- AQLM 2x8g8 and 1x16g8 (two 256-word codebooks / one 65,536-word codebook, groups of 8: about 2 bits per
  weight), each by its lookup-table path (``forward_lut``: tabulate the input against every codeword, then
  gather and sum by code) and by dequantise-then-GEMM (``forward_gemm``). ``forward`` picks the lookup table up
  to ``lut_max_rows`` (8) rows, the GEMM above.
Codes, codebooks and scales are random (speed does not depend on their values; the gather pattern of random
codes is the worst case for the cache, and trained codes are close to uniform anyway). The lookup table is
skipped where it would exceed ``--max-table-mib`` (1x16 at 64 rows: 64 rows x G x 65,536 floats).

Hot and cold weights: "hot" rows call one layer again and again, so a small layer's fp32 weight (9 MiB for
768 -> 3072) stays in the CPU's last-level cache and fp32 runs at cache bandwidth; in a model's decode step every
layer's weight is read once per token and most come from DRAM. "cold xN" rows cycle each peer through N
independent weight sets holding ``--cold-mib`` (256) MiB of fp32 weights in all, call by call, which is closer to
what a model's layers see. The AQLM sets cycle the same way (their gather indices are 1/4 of the fp32 bytes at 2x8).

Timing (time.perf_counter, under torch.no_grad): the peers of one (shape, rows) take turns within every repeat,
after one warm-up call each (which also builds the layer's cached gather index); each repeat times ``--iters``
calls; the table shows the median microseconds per call and the ratio to fp32 (< 1: faster than fp32). Timings
on a shared machine vary by tens of percent; ``--threads 1`` is the stable setting.

    python bench/quant_linear.py --threads 1       # the three shapes, 1 and 64 rows
    python bench/quant_linear.py --quick           # tiny shapes, a few iterations (smoke test)
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from _machine import machine_line  # (bench/ is on sys.path when a bench runs)

from seqlab.quant.linear import AQLMLinear

SHAPES = [("Mamba-768 in_proj", 768, 3072), ("Mamba-768 out_proj", 1536, 768), ("large", 2048, 8192)]
QUICK_SHAPES = [("tiny in_proj", 64, 256), ("tiny out_proj", 128, 64)]
CONFIGS = [("2x8g8", 2, 8, 8), ("1x16g8", 1, 16, 8)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few iterations (smoke test)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64], help="input rows (tokens) per call")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds; the median is shown (default 5)")
    p.add_argument("--iters", type=int, default=None, help="calls per round (default: about 0.1 s of fp32 work)")
    p.add_argument(
        "--cold-mib", type=float, default=None, help="fp32 MiB of weight sets cycled in the cold rows (256; 0: none)"
    )
    p.add_argument("--max-table-mib", type=float, default=None, help="skip a lookup table larger than this (512)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.max_table_mib = args.max_table_mib or (16.0 if args.quick else 512.0)
    if args.cold_mib is None:
        args.cold_mib = 1.0 if args.quick else 256.0
    return args


def random_layer(in_features: int, out_features: int, m: int, bits: int, g: int, seed: int) -> AQLMLinear:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features // g, m), generator=gen)
    # codewords of the size a quantizer finds for unit-variance weights split over m codebooks
    codebooks = torch.randn(m, 1 << bits, g, generator=gen) / m**0.5
    scales = torch.rand(out_features, generator=gen) * 0.02 + 0.01
    return AQLMLinear.from_parts(codes, codebooks, scales, torch.zeros(out_features))


def time_peers(peers: dict, repeats: int, iters: int) -> dict[str, float]:
    """Median microseconds per call of each peer; the peers take turns within every repeat."""
    for call in peers.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(repeats):
        for name, call in peers.items():
            started = time.perf_counter()
            for _ in range(iters):
                call()
            samples[name].append((time.perf_counter() - started) / iters * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(label: str, n_in: int, n_out: int, copies: int, args, check_lines: list[str]) -> None:
    """Print the rows of one layer shape with ``copies`` independent weight sets per peer, cycled call by call."""
    weights_label = "hot" if copies == 1 else f"cold x{copies}"
    sets = []  # per copy: {config: layer}, the fp32 weight (the 2x8 layer's own), its bias
    for copy in range(copies):
        layers = {
            name: random_layer(n_in, n_out, m, b, g, seed=100 * copy + i) for i, (name, m, b, g) in enumerate(CONFIGS)
        }
        sets.append((layers, layers["2x8g8"].dequantize().contiguous(), layers["2x8g8"].bias))
    turn = itertools.count()

    def pick():
        return sets[next(turn) % copies]

    for rows in args.rows:
        x = torch.randn(rows, n_in)
        peers = {"fp32 F.linear": lambda: F.linear(x, *pick()[1:])}
        bits = {"fp32 F.linear": 32.0}
        path = {"fp32 F.linear": ""}
        for name, layer in sets[0][0].items():
            table_mib = rows * layer.groups * layer.num_codebooks * layer.codebook_size * 4 / 2**20
            if table_mib <= args.max_table_mib:
                peers[f"AQLM {name} LUT"] = lambda name=name: pick()[0][name].forward_lut(x)
            elif copies == 1:
                skipped = f"AQLM {name} LUT skipped (table {table_mib:,.0f} MiB)"
                check_lines.append(f"{label}, {rows} rows: {skipped}")
            peers[f"AQLM {name} dequant+GEMM"] = lambda name=name: pick()[0][name].forward_gemm(x)
            for key in (f"AQLM {name} LUT", f"AQLM {name} dequant+GEMM"):
                bits[key] = layer.bits_per_parameter()
                path[key] = layer.path_for(x)
        if args.iters:
            iters = args.iters
        elif args.quick:
            iters = 3
        else:  # about 0.1 s of fp32 work per round, at least 3 calls, a whole number of turns over the copies
            started = time.perf_counter()
            peers["fp32 F.linear"]()
            iters = max(3, int(0.1 / max(time.perf_counter() - started, 1e-6)))
            iters = -(-iters // copies) * copies
        us = time_peers(peers, args.repeats, iters)
        if copies == 1:
            layer, weight, bias = sets[0]
            ref = F.linear(x, weight, bias)
            err = (layer["2x8g8"].forward_lut(x) - ref).abs().max().item() / (ref.abs().max().item() + 1e-30)
            check_lines.append(f"{label}, {rows} rows: 2x8g8 LUT vs fp32 of its weight, max rel. diff {err:.1e}")
        for name, value in us.items():
            print(
                f"| {label} | {n_in} -> {n_out} | {weights_label} | {rows} | {name} | {bits[name]:.3f} "
                f"| {value:,.0f} | {value / us['fp32 F.linear']:.2f} | {path[name]} |",
                flush=True,
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print()
    print("| layer | in -> out | weights | rows | peer | bits/weight | us per call | vs fp32 | forward() path |")
    print("|---|---|---|---:|---|---:|---:|---:|---|")
    check_lines: list[str] = []
    with torch.no_grad():
        for label, n_in, n_out in shapes:
            measure(label, n_in, n_out, 1, args, check_lines)
            if args.cold_mib:
                copies = max(2, math.ceil(args.cold_mib * 2**20 / (n_in * n_out * 4)))
                measure(label, n_in, n_out, copies, args, check_lines)
    print()
    for line in check_lines:
        print(line)
    print(
        "\nweights: hot = one weight set per peer, called again and again (a small layer's fp32 weight then stays in "
        "the CPU's caches); cold xN = N independent weight sets per peer holding "
        f"{args.cold_mib:g} MiB of fp32 weights, cycled call by call, as a model's layers are during decode"
    )
    print(
        "target (issue 20): a 2-bit model decodes at least as fast as fp32 on CPU at batch 1: "
        "see the 1-row LUT rows' 'vs fp32' (<= 1.00 meets it per layer)"
    )


if __name__ == "__main__":
    main()
