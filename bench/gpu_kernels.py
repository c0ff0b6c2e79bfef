"""GPU micro-benchmark of seqlab's kernels: selective scan (Mamba-1), SSD scan (Mamba-2), causal conv1d and the
decode steps, against the memory roofline and, when importable, mamba_ssm / causal-conv1d / flash-linear-attention.

For every op and length it prints, side by side on the same inputs:

- ``seqlab triton``: the dispatcher with ``backend="triton"`` (``kernels/<op>/triton_ops.py``);
- ``seqlab chunked``: the vectorised, chunked PyTorch path (``backend="chunked"``), up to ``--chunked-max-len``;
- ``mamba_ssm``: ``selective_scan_fn`` (Mamba-1, its CUDA kernel), ``mamba_chunk_scan_combined`` (Mamba-2, its
  Triton SSD), ``selective_state_update`` (both decode steps; it updates the state in place), and for the conv
  the ``causal_conv1d`` package mamba_ssm builds on (``causal_conv1d_fn`` / ``causal_conv1d_update``);
- ``fla``: flash-linear-attention's ``chunk_simple_gla`` for the SSD rows (SSD is simple GLA with q = C,
  k = B, v = dt * x, log-decay g = dt * A, scale 1; those inputs, and B / C repeated over the heads, are
  prepared before timing, so fla is timed on the scan alone, without the D skip).

A cell that cannot run says why: "not installed" (the import failed), "n/a" (the library has no such op),
"skipped" (see the flags), or the exception type.

Timing: CUDA events around each call; ``--warmup`` calls first, then the median of ``--repeats`` timed calls,
with a 256 MiB buffer overwritten before each timed call so that no call finds its inputs in L2 (decode steps
too: a model's other layers evict the state between two steps of one layer). Forward runs under no_grad;
forward + backward = one forward with grad + ``torch.autograd.grad`` of y against a fixed random dy.

Roofline: each row has the minimum bytes the op must move (every input read once, every output written
once; element sizes of the actual dtypes), the achieved GB/s = min bytes / time of each peer, and the seqlab
Triton GB/s as a percentage of the device-to-device copy bandwidth measured here (``dst.copy_(src)`` of
``--copy-mib`` MiB, counted as read + write). The formulas (s = bytes per element of the activations, fp32
parameters and states; b batch, l length):

- selective scan (u, delta, z (b, d, l); B, C (b, n, l); A (d, n); D, delta_bias (d,)):
  fwd  = s * (4 b d l + 2 b n l) + 4 (d n + 2 d)                 read u, delta, z, B, C; write y
  f+b  = fwd + s * (7 b d l + 4 b n l) + 4 (d n + 2 d)           read u, delta, z, B, C, dy;
                                                                   write du, ddelta, dz, dB, dC (dA, dD, ddelta_bias)
- SSD scan (x (b, l, h, p); dt (b, l, h); B, C (b, l, g, n); A, D, dt_bias (h,)):
  fwd  = s * (2 b l h p + b l h + 2 b l g n) + 12 h              read x, dt, B, C; write y
  f+b  = fwd + s * (3 b l h p + 2 b l h + 4 b l g n) + 12 h       read x, dt, B, C, dy; write dx, ddt, dB, dC
- causal conv1d (x (b, d, l), weight (d, w), bias (d,)):
  fwd  = s * 2 b d l + s (d w + d)                               read x; write y
  f+b  = fwd + s * 3 b d l + 2 s (d w + d)                        read x, dy; write dx (dweight, dbias)
- decode steps (one token; fp32 state read and written once):
  Mamba-1  = 4 * 2 b d n + s (4 b d + 2 b n) + 4 (d n + 2 d)      state; x, dt, z, y; B, C; A, D, dt_bias
  Mamba-2  = 4 * 2 b h p n + s (2 b h p + b h + 2 b g n) + 12 h  state; x, y, dt; B, C; A, D, dt_bias
  conv     = 2 s_st b d (w - 1) + s 2 b d + s (d w + d)           state; x, y; weight, bias

Decode rows are timed from the state a prefill of each context length produced (the step's cost must not
depend on it: the "flat in context length" target). A decode step moves little data, so its event time also
holds the host-side launch cost whenever the host is slower than the GPU, as it would in a decode loop. On CUDA
the Triton steps are also timed as a captured CUDA graph of 32 steps (the "seqlab triton graph" cells in the
progress lines): the device time of one step, which the flatness target is checked on first.

The Mamba-1 forward rows also time the two Triton forwards one by one (``--scan-forwards``, default both):
"seqlab triton walk" (the sequential walk, the dispatcher's default; ``--walk-block-d`` / ``--walk-chunk`` set
its tiling for a sweep) and "seqlab triton tile" (the chunk-tile associative scan it replaced), in the progress
lines, with the walk's speed-up over the tile kernel printed with the targets.

Targets checked at the end: Mamba-1 scan forward >= 70% of the copy bandwidth at L >= 8k; SSD forward at least
as fast as mamba_ssm's Triton SSD; decode-step latency flat in context length (max / min <= 1.25).

``--smoke`` runs tiny shapes with few repeats. Without CUDA the script switches to it by itself and runs on
the CPU: the chunked path, the Triton column through Triton's interpreter when ``TRITON_INTERPRET=1`` is set (one
call per cell: the interpreter is slow) and "no GPU" otherwise; the table layout is the same and the header
says that no GPU was found. CPU numbers measure nothing about GPU kernels.

    python bench/gpu_kernels.py                             # the full table on a CUDA machine (minutes)
    python bench/gpu_kernels.py --ops ssd_scan --lengths 8192 32768
    python bench/gpu_kernels.py --smoke                     # tiny shapes, seconds; CPU fallback without CUDA
    TRITON_INTERPRET=1 python bench/gpu_kernels.py --smoke  # ... with the Triton kernels in the interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _gpu_measure import Cell, Row, Timer, copy_bandwidth, fmt_bytes, fmt_ms, fmt_pct, triton_note
from _gpu_ops import bench_conv, bench_decode, bench_selective_scan, bench_ssd
from _machine import machine_line  # bench/ is on sys.path when a bench runs

import seqlab.kernels as K

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OPS = ("selective_scan", "ssd_scan", "causal_conv1d", "decode")
PEERS = ("seqlab triton", "seqlab chunked", "mamba_ssm", "fla")
COPY_TARGET = 0.70  # Mamba-1 scan forward, fraction of the copy bandwidth, at L >= 8k
FLAT_TARGET = 1.25  # decode: max / min latency over the context lengths


# ---------------------------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument(
        "--smoke",
        "--quick",
        dest="smoke",
        action="store_true",
        help="tiny shapes, few repeats (the automatic mode without CUDA)",
    )
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 2k 8k 16k 32k 64k)")
    p.add_argument("--contexts", type=int, nargs="+", help="decode context lengths (default 2k 8k 32k 64k)")
    p.add_argument("--batch", type=int, default=1, help="batch of the scans (default 1)")
    p.add_argument("--decode-batch", type=int, default=1, help="batch of the decode steps (default 1)")
    p.add_argument("--mamba1-d", type=int, nargs="+", help="Mamba-1 d_inner values (default 1536 5120)")
    p.add_argument("--mamba1-n", type=int, default=16, help="Mamba-1 d_state (default 16)")
    p.add_argument("--heads", type=int, default=64, help="Mamba-2 heads (default 64)")
    p.add_argument("--headdim", type=int, default=64, help="Mamba-2 head dim (default 64)")
    p.add_argument("--mamba2-n", type=int, default=128, help="Mamba-2 d_state (default 128)")
    p.add_argument("--groups", type=int, default=1, help="Mamba-2 B/C groups (default 1)")
    p.add_argument("--chunk-size", type=int, default=256, help="Mamba-2 chunk size (default 256)")
    p.add_argument("--conv-width", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default 3; smoke 1)")
    p.add_argument("--repeats", type=int, help="timed calls, the median is reported (default 20; smoke 3)")
    p.add_argument("--decode-repeats", type=int, help="timed decode steps (default 200; smoke 5)")
    p.add_argument(
        "--chunked-max-len",
        "--torch-max-len",
        type=int,
        default=16384,
        dest="chunked_max_len",
        help="time the seqlab chunked path up to this length (default 16384; --torch-max-len is its old name)",
    )
    p.add_argument(
        "--scan-forwards",
        nargs="*",
        choices=("walk", "tile"),
        default=["walk", "tile"],
        help="Mamba-1 Triton forwards also timed one by one in the forward rows (progress lines and a ratio at the "
        "end): walk (the default forward) and tile (the chunk-tile scan it replaced); none: only the dispatcher",
    )
    p.add_argument("--walk-block-d", type=int, help="channels per program of the walk cell (default: its plan)")
    p.add_argument("--walk-chunk", type=int, help="positions the walk cell unrolls per step (default: its plan)")
    p.add_argument("--no-backward", action="store_true", help="forward rows only")
    p.add_argument("--no-peers", action="store_true", help="skip mamba_ssm / causal-conv1d / fla")
    p.add_argument(
        "--skip-triton",
        action="store_true",
        help="skip seqlab's Triton column (e.g. a CPU smoke run with TRITON_INTERPRET=1 in the environment)",
    )
    p.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth probe (default 1024 MiB; smoke 64)")
    p.add_argument("--no-flush", action="store_true", help="do not evict L2 between timed calls")
    p.add_argument("--threads", type=int, help="torch intra-op threads (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.cuda = torch.cuda.is_available()
    args.smoke = args.smoke or not args.cuda
    args.interp = not args.cuda and K._triton.interpreting()
    big = not args.smoke
    if args.lengths is None:
        args.lengths = [2048, 8192, 16384, 32768, 65536] if big else [32, 96]
    if args.contexts is None:
        args.contexts = [2048, 8192, 32768, 65536] if big else [16, 64]
    if args.mamba1_d is None:
        args.mamba1_d = [1536, 5120] if big else [32]
    if not big:  # tiny Mamba-2 / conv shapes unless given
        defaults = {"heads": 64, "headdim": 64, "mamba2_n": 128, "chunk_size": 256}
        tiny = {"heads": 4, "headdim": 8, "mamba2_n": 16, "chunk_size": 32}
        for name, value in tiny.items():
            if getattr(args, name) == defaults[name]:
                setattr(args, name, value)
    args.warmup = args.warmup if args.warmup is not None else (3 if big else 1)
    args.repeats = args.repeats if args.repeats is not None else (20 if big else 3)
    args.decode_repeats = args.decode_repeats if args.decode_repeats is not None else (200 if big else 5)
    args.copy_mib = args.copy_mib if args.copy_mib is not None else (1024 if big else 64)
    for name in ("batch", "decode_batch", "repeats", "decode_repeats", "copy_mib", "conv_width", "chunk_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("walk_block_d", "walk_chunk"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(v <= 0 for v in args.lengths + args.contexts + args.mamba1_d):
        p.error("lengths, contexts and widths must be positive")
    if args.heads % args.groups:
        p.error("--heads must be divisible by --groups")
    return args


# ---------------------------------------------------------------------------------------------- report


def print_table(rows: list[Row], copy_gbs: float) -> None:
    print()
    print("| op | shape | L | mode | min bytes | seqlab triton | % of copy BW | seqlab chunked | mamba_ssm | fla |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tri = r.cells.get("seqlab triton", Cell())
        pct = "-" if tri.ms is None else fmt_pct(100 * r.nbytes / (tri.ms * 1e-3) / 1e9 / copy_gbs)
        cells = [r.cells.get(peer, Cell(note="-")).text(r.nbytes) for peer in PEERS]
        print(
            f"| {r.op} | {r.shape} | {r.length} | {r.mode} | {fmt_bytes(r.nbytes)} | {cells[0]} | {pct} | "
            f"{cells[1]} | {cells[2]} | {cells[3]} |"
        )


def print_targets(rows: list[Row], copy_gbs: float, smoke: bool) -> None:
    print()
    print("Targets" + (" (tiny CPU shapes: these verdicts say nothing about a GPU)" if smoke else "") + ":")
    # 1. Mamba-1 forward >= 70% of the copy bandwidth at L >= 8k
    checked = [r for r in rows if r.op == "selective_scan" and r.mode == "fwd" and r.length >= 8192]
    lines = []
    for r in checked:
        tri = r.cells.get("seqlab triton", Cell())
        if tri.ms is None:
            lines.append(f"{r.shape} L={r.length}: not measured ({tri.note})")
            continue
        frac = r.nbytes / (tri.ms * 1e-3) / 1e9 / copy_gbs
        lines.append(f"{r.shape} L={r.length}: {100 * frac:.0f}% {'PASS' if frac >= COPY_TARGET else 'MISS'}")
    print(
        f"- Mamba-1 scan forward >= {100 * COPY_TARGET:.0f}% of copy bandwidth at L >= 8k: "
        + ("; ".join(lines) if lines else "no row with L >= 8192")
    )
    # 2. SSD forward at least as fast as mamba_ssm's Triton SSD
    lines = []
    for r in (r for r in rows if r.op == "ssd_scan" and r.mode == "fwd"):
        tri, ref = r.cells.get("seqlab triton", Cell()), r.cells.get("mamba_ssm", Cell())
        if tri.ms is None or ref.ms is None:
            lines.append(f"L={r.length}: cannot compare ({tri.note or ref.note})")
            continue
        ratio = ref.ms / tri.ms
        lines.append(f"L={r.length}: {ratio:.2f}x mamba_ssm's speed {'PASS' if ratio >= 1 else 'MISS'}")
    print(
        "- SSD forward at least as fast as mamba_ssm's mamba_chunk_scan_combined: "
        + ("; ".join(lines) if lines else "no SSD rows")
    )
    # the Mamba-1 forwards side by side (not a target: which one the dispatcher should keep)
    pairs = []
    for r in (r for r in rows if r.op == "selective_scan" and r.mode == "fwd"):
        walk, tile = r.cells.get("seqlab triton walk", Cell()), r.cells.get("seqlab triton tile", Cell())
        if walk.ms is not None and tile.ms is not None:
            pct = 100 * r.nbytes / (walk.ms * 1e-3) / 1e9 / copy_gbs
            pairs.append(f"{r.shape} L={r.length}: {tile.ms / walk.ms:.2f}x ({pct:.0f}% of copy BW)")
    if pairs:
        print("- Mamba-1 forward, walk vs tile kernel (speed-up of the walk): " + "; ".join(pairs))
    # 3. decode latency flat in context length: the device time per step (CUDA graph) when measured, and the
    # per-call time with the host's launch cost
    for cell, what in (
        ("seqlab triton graph", "device time per step, CUDA graph"),
        ("seqlab triton", "per call, host launch included"),
    ):
        lines = []
        for op in dict.fromkeys(r.op for r in rows if r.op.startswith("decode")):
            times = [r.cells.get(cell, Cell()).ms for r in rows if r.op == op]
            if len(times) < 2 or any(t is None for t in times):
                lines.append(f"{op.split(': ')[1]}: not measured")
                continue
            ratio = max(times) / min(times)
            lines.append(
                f"{op.split(': ')[1]}: {fmt_ms(min(times))}-{fmt_ms(max(times))}, max/min {ratio:.2f} "
                f"{'PASS' if ratio <= FLAT_TARGET else 'MISS'}"
            )
        print(
            f"- decode step latency flat in context length (max/min <= {FLAT_TARGET}; {what}): "
            + ("; ".join(lines) if lines else "no decode rows")
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    dtype = DTYPES[args.dtype]
    print(machine_line())
    if args.cuda:
        props = torch.cuda.get_device_properties(device)
        print(
            f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}" + (", --smoke shapes" if args.smoke else "")
        )
    else:
        interp = (
            "on: the Triton column runs in the interpreter"
            if K._triton.interpreting()
            else "off: the Triton column is skipped"
        )
        print(
            f"device: NO GPU FOUND (torch.cuda.is_available() is False); running tiny shapes on the CPU with "
            f"the chunked path; TRITON_INTERPRET {interp}. These timings say nothing about GPU kernels."
        )
    try:
        import triton

        tver = triton.__version__
    except Exception:
        tver = "not installed"
    print(
        f"triton {tver}, dtype {args.dtype}, batch {args.batch}, decode batch {args.decode_batch}, "
        f"warm-up {args.warmup}, median of {args.repeats} (fwd+bwd: {max(3, args.repeats // 2)}; decode: "
        f"{args.decode_repeats}"
        + ("; the interpreted Triton column: 1 call, no warm-up" if args.interp else "")
        + f"), L2 flushed between calls: {args.cuda and not args.no_flush}"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    timer = Timer(device, flush=not args.no_flush)
    copy_gbs = copy_bandwidth(timer, args.copy_mib, device)
    print(f"device-to-device copy bandwidth ({args.copy_mib} MiB, read + write): {copy_gbs:,.0f} GB/s", flush=True)
    tnote = triton_note(args)
    rows: list[Row] = []
    benches = {
        "selective_scan": bench_selective_scan,
        "ssd_scan": bench_ssd,
        "causal_conv1d": bench_conv,
        "decode": bench_decode,
    }
    for op in args.ops:
        rows += benches[op](args, timer, device, dtype, tnote)
        if args.cuda:
            torch.cuda.empty_cache()
    print_table(rows, copy_gbs)
    print()
    print(
        f"Cells: median time (achieved GB/s = min bytes / time). Copy bandwidth {copy_gbs:,.0f} GB/s. "
        "min bytes: what each op must move at least (formulas in this script's docstring)."
    )
    print_targets(rows, copy_gbs, args.smoke)


if __name__ == "__main__":
    main()
