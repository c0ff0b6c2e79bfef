"""CPU micro-benchmark of the Mamba-2 SSD scan: compiled C kernels ("native") against the chunked path, no_grad
forward and forward + backward, on the same inputs in one process; the sequential reference for scale.

Default shape: the Mamba-2 mixer of a d_model 256 model (b=1, h=16, p=32, n=64, g=1, chunk_size=64, float32,
dt_bias + softplus + D), parameters initialised as mamba_ssm does (A = -uniform(1, 16), dt in [1e-3, 1e-1]).
The reference is timed at the first length only (it is a Python loop over time steps).

    python bench/kernels_cpu_ssd.py                      # l = 2048, 8192, 32768
    python bench/kernels_cpu_ssd.py --lengths 4096 --repeats 5 --no-backward
    OMP_NUM_THREADS=2 python bench/kernels_cpu_ssd.py --lengths 8192 --no-ref   # native vs chunked only

Timings are the minimum over --repeats runs (machines here are shared and noisy; the median is printed too).
"native vs chunked" is the chunked time over the native time at the same length (above 1: native is faster).
Where the C kernels cannot be built (no compiler, SEQLAB_NATIVE=0) the native rows are left out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from _machine import machine_line  # noqa: E402  (bench/ is on sys.path when a bench runs)

from seqlab.kernels._native import native_available
from seqlab.kernels.ssd.chunked import ssd_scan_chunked
from seqlab.kernels.ssd.native_ops import ssd_scan_native
from seqlab.kernels.ssd.ref import ssd_scan_ref

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", "-b", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--headdim", "-p", type=int, default=32)
    ap.add_argument("--dstate", "-n", type=int, default=64)
    ap.add_argument("--groups", "-g", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per forward measurement")
    ap.add_argument("--backward-repeats", type=int, default=2, help="timed runs per forward+backward measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-backward", action="store_true", help="skip forward+backward")
    ap.add_argument("--no-ref", action="store_true", help="skip the reference")
    ap.add_argument("--no-native", action="store_true", help="skip the compiled C kernels")
    ap.add_argument("--no-z", dest="z", action="store_false", help="(default) no z gate")
    ap.add_argument("--z", dest="z", action="store_true", help="also pass a z gate")
    ap.set_defaults(z=False)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def make_inputs(args, l: int):
    gen = torch.Generator().manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    b, h, p, n, g = args.batch, args.heads, args.headdim, args.dstate, args.groups
    dt_init = torch.exp(torch.rand(h, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt_init + torch.log(-torch.expm1(-dt_init))  # inverse softplus, as mamba_ssm initialises it
    A = -(torch.rand(h, generator=gen) * 15 + 1)  # -exp(A_log), A_log = log(uniform(1, 16))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    return dict(
        x=rnd(b, l, h, p),
        dt=rnd(b, l, h, scale=0.5),
        A=A,
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
        D=torch.randn(h, generator=gen),
        z=rnd(b, l, h, p) if args.z else None,
        dt_bias=dt_bias,
    )


def call(fn, inp, chunk_size):
    return fn(
        inp["x"],
        inp["dt"],
        inp["A"],
        inp["B"],
        inp["C"],
        chunk_size,
        D=inp["D"],
        z=inp["z"],
        dt_bias=inp["dt_bias"],
        dt_softplus=True,
    )


def time_runs(f, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        f()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        runs.append(time.perf_counter() - t0)
    return min(runs) * 1e3, statistics.median(runs) * 1e3


def bench_forward(fn, inp, chunk_size, repeats, warmup=1):
    def run():
        with torch.no_grad():
            call(fn, inp, chunk_size)

    return time_runs(run, repeats, warmup)


def bench_forward_backward(inp, chunk_size, repeats, fn=ssd_scan_chunked):
    leaves = {
        k: (v.detach().clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v)
        for k, v in inp.items()
    }
    grad_y = torch.randn_like(leaves["x"])

    def run():
        for v in leaves.values():
            if isinstance(v, torch.Tensor):
                v.grad = None
        y = call(fn, leaves, chunk_size)
        y.backward(grad_y)

    return time_runs(run, repeats)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    print(
        f"shape: b={args.batch} h={args.heads} p={args.headdim} n={args.dstate} g={args.groups} "
        f"chunk_size={args.chunk_size} dtype={args.dtype} dt_bias+softplus, D{', z' if args.z else ''}"
    )
    print(
        f"timings: min over {args.repeats} runs (forward), {args.backward_repeats} (forward+backward); "
        "median in brackets\n"
    )
    native = not args.no_native and native_available("ssd.c")
    rows = []
    base_fwd = None
    ref_ms = None
    t_start = time.perf_counter()
    for i, l in enumerate(args.lengths):
        inp = make_inputs(args, l)
        fwd, fwd_med = bench_forward(ssd_scan_chunked, inp, args.chunk_size, args.repeats)
        tok_s = l * args.batch / fwd * 1e3
        base_fwd = base_fwd or tok_s
        rows.append((l, "chunked forward (no_grad)", fwd, fwd_med, tok_s, tok_s / base_fwd, None))
        if native:
            nf, nf_med = bench_forward(ssd_scan_native, inp, args.chunk_size, args.repeats)
            rows.append((l, "native forward (no_grad)", nf, nf_med, l * args.batch / nf * 1e3, None, fwd / nf))
        if not args.no_backward:
            fb, fb_med = bench_forward_backward(inp, args.chunk_size, args.backward_repeats)
            rows.append((l, "chunked forward+backward", fb, fb_med, l * args.batch / fb * 1e3, None, None))
            if native:
                nb, nb_med = bench_forward_backward(inp, args.chunk_size, args.backward_repeats, ssd_scan_native)
                rows.append((l, "native forward+backward", nb, nb_med, l * args.batch / nb * 1e3, None, fb / nb))
        if i == 0 and not args.no_ref:
            ref_ms, ref_med = bench_forward(ssd_scan_ref, inp, args.chunk_size, repeats=1, warmup=0)
            rows.append((l, "ref forward (no_grad)", ref_ms, ref_med, l * args.batch / ref_ms * 1e3, None, None))
            ref_fwd = fwd
        del inp
    print("| L | path | ms | Mtok/s | tok/s vs first L | native vs chunked |")
    print("|---|---|---|---|---|---|")
    for l, path, ms, med, tok_s, vs, ratio in rows:
        vs_s = f"{vs:.2f}" if vs is not None else ""
        ratio_s = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"| {l} | {path} | {ms:.1f} ({med:.1f}) | {tok_s / 1e6:.3f} | {vs_s} | {ratio_s} |")
    if ref_ms is not None:
        print(f"\nchunked forward is {ref_ms / ref_fwd:.0f}x faster than the reference at L={args.lengths[0]}")
    print(f"total bench time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
