"""CPU micro-benchmark of the Mamba-1 selective scan (and the causal conv1d in front of it).

Peers, run side by side in one process on the same inputs:

- ``chunked``: seqlab's vectorised path (``kernels/scan/chunked.py``), forward under ``no_grad`` and
  forward + backward;
- ``native``: seqlab's compiled C kernels (``kernels/csrc/scan.c``, ``conv1d.c``), the same two modes, with the
  chunked / native time ratio in the last column (``--no-native`` leaves them out; they need a C compiler);
- ``naive``: the textbook / HF "slow path" way: materialise exp(delta A) and delta B u as full (b, d, l, n)
  tensors, then a Python loop over time (forward + backward only up to ``--naive-bwd-max``);
- ``ref``: the float64-capable sequential reference (run in float32 here; only up to ``--ref-max``, it is slow).

Default shape: the Mamba-1 mixer of a d_model 256 model (b = 1, d = 512, n = 16, fp32) with softplus(delta +
bias), D and z, at l = 2k / 8k / 32k. Prints ms (best of ``--repeats``), Mtok/s (b * l per second) and the
speed-up over the naive baseline. Machines here are shared and noisy: the load average is printed with the
table; compare only numbers taken in one run.

    python bench/kernels_cpu_scan.py                      # the default table (~1-2 minutes)
    python bench/kernels_cpu_scan.py --layout channels_last --lengths 8192
    python bench/kernels_cpu_scan.py --d 1536 --n 16 --lengths 2048 --no-backward
    THP_MEM_ALLOC_ENABLE=1 python bench/kernels_cpu_scan.py   # huge pages: fewer page faults on outputs

Every fresh (b, d, l) output costs page faults (~2 us per 4 KiB page on these VMs, ~7 ms per 16 MiB single-
threaded); torch reads THP_MEM_ALLOC_ENABLE once, before its first allocation.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from seqlab.kernels._native import native_available
from seqlab.kernels.conv1d.chunked import causal_conv1d_chunked
from seqlab.kernels.conv1d.native_ops import causal_conv1d_native
from seqlab.kernels.scan.chunked import selective_scan_chunked
from seqlab.kernels.scan.native_ops import selective_scan_native
from seqlab.kernels.scan.ref import selective_scan_ref


def make_inputs(b, d, n, l, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    def bdl():
        x = r(b, d, l)
        return x.transpose(1, 2).contiguous().transpose(1, 2) if layout == "channels_last" else x

    return dict(
        u=bdl(),
        delta=bdl() * 0.5 - 1.0,
        A=-torch.exp(r(d, n) * 0.5),
        B=r(b, n, l),
        C=r(b, n, l),
        D=r(d),
        z=bdl(),
        delta_bias=r(d) * 0.1,
    )


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """Materialise (b, d, l, n), then loop over time (what HF's slow Mamba path does)."""
    delta = torch.nn.functional.softplus(delta + delta_bias[:, None])
    dA = torch.exp(delta[..., None] * A[:, None, :])  # (b, d, l, n)
    dBu = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # (b, d, l, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(2), dBu.unbind(2), C.unbind(2)):
        h = dA_t * h + dBu_t
        ys.append(torch.matmul(h, C_t[:, :, None])[..., 0])
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return y * torch.nn.functional.silu(z)


def fast_scan(**kw):
    return selective_scan_chunked(**kw, delta_softplus=True)


def native_scan(**kw):
    return selective_scan_native(**kw, delta_softplus=True)


def ref_scan(**kw):
    return selective_scan_ref(**kw, delta_softplus=True)


#: the clock best_ms reads: wall time, or (``--cpu-time``) this process's CPU time, summed over its threads
CLOCK = time.perf_counter


def best_ms(fn, repeats, warmup=True):
    if warmup:
        fn()  # warm-up (workspace, first-touch page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best * 1e3


def run_forward(fn, inputs):
    def go():
        with torch.no_grad():
            fn(**inputs)

    return go


def run_backward(fn, inputs):
    def go():
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        fn(**leaves).sum().backward()

    return go


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--w", type=int, default=4, help="conv width for the conv1d rows")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument(
        "--layout",
        choices=["standard", "channels_last", "both"],
        default="both",
        help="(b, d, l) contiguous, or the transpose of a contiguous (b, l, d) as a mixer makes it",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--ref-max", type=int, default=2048, help="longest l for the sequential reference")
    p.add_argument("--naive-max", type=int, default=32768, help="longest l for the naive forward")
    p.add_argument("--naive-bwd-max", type=int, default=2048, help="longest l for the naive backward")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--no-conv", action="store_true")
    p.add_argument("--no-native", action="store_true", help="leave out the compiled C kernels")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time (summed over threads) instead of wall time: on an oversubscribed "
        "machine the wall time of a many-op path is dominated by waiting for descheduled OpenMP threads",
    )
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    layouts = ["standard", "channels_last"] if args.layout == "both" else [args.layout]
    print(f"# selective scan, b={args.b} d={args.d} n={args.n} fp32, softplus(delta + bias), D, z")
    print(f"# clock: {'process CPU time (all threads)' if args.cpu_time else 'wall time'}")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f} at start"
    )
    native = not args.no_native and native_available("scan.c") and native_available("conv1d.c")
    header = (
        f"{'l':>6} {'layout':<13} {'impl':<11} {'mode':<8} {'ms':>10} {'Mtok/s':>9} {'vs naive':>9} {'chunked/x':>9}"
    )
    print(header)
    print("-" * len(header))
    per_token = {}
    for l in args.lengths:
        for layout in layouts:
            inputs = make_inputs(args.b, args.d, args.n, l, layout)
            tok = args.b * l
            rows = []
            naive_fwd = naive_bwd = None
            if l <= args.naive_max and layout == layouts[0]:
                # the slow peers run once (it takes seconds): their own noise is small next to their cost
                naive_fwd = best_ms(run_forward(naive_scan, inputs), 1, warmup=l <= 2048)
                rows.append(("naive", "fwd", naive_fwd, naive_fwd))
                if not args.no_backward and l <= args.naive_bwd_max:
                    naive_bwd = best_ms(run_backward(naive_scan, inputs), 1, warmup=False)
                    rows.append(("naive", "fwd+bwd", naive_bwd, naive_bwd))
            if l <= args.ref_max and layout == layouts[0]:
                ms = best_ms(run_forward(ref_scan, inputs), 1, warmup=False)
                rows.append(("ref", "fwd", ms, naive_fwd))
            ms = best_ms(run_forward(fast_scan, inputs), args.repeats)
            per_token[(l, layout)] = ms / tok
            rows.append(("chunked", "fwd", ms, naive_fwd))
            if native:
                rows.append(("native", "fwd", best_ms(run_forward(native_scan, inputs), args.repeats), naive_fwd, ms))
            if not args.no_backward:
                ms = best_ms(run_backward(fast_scan, inputs), max(1, args.repeats - 1))
                rows.append(("chunked", "fwd+bwd", ms, naive_bwd))
                if native:
                    nat = best_ms(run_backward(native_scan, inputs), max(1, args.repeats - 1))
                    rows.append(("native", "fwd+bwd", nat, naive_bwd, ms))
            if not args.no_conv:
                gen = torch.Generator().manual_seed(1)
                conv_in = dict(
                    x=inputs["u"],
                    weight=torch.randn(args.d, args.w, generator=gen),
                    bias=torch.randn(args.d, generator=gen),
                )
                conv = lambda **kw: causal_conv1d_chunked(**kw, activation="silu")  # noqa: E731
                conv_nat = lambda **kw: causal_conv1d_native(**kw, activation="silu")  # noqa: E731
                ms = best_ms(run_forward(conv, conv_in), args.repeats)
                rows.append(("conv1d", "fwd", ms, None))
                if native:
                    rows.append(("conv1d-nat", "fwd", best_ms(run_forward(conv_nat, conv_in), args.repeats), None, ms))
                if not args.no_backward:
                    ms = best_ms(run_backward(conv, conv_in), args.repeats)
                    rows.append(("conv1d", "fwd+bwd", ms, None))
                    if native:
                        nat = best_ms(run_backward(conv_nat, conv_in), args.repeats)
                        rows.append(("conv1d-nat", "fwd+bwd", nat, None, ms))
            for impl, mode, ms, base, *peer in rows:
                ratio = f"{base / ms:8.1f}x" if base else f"{'':>9}"
                vs = f"{peer[0] / ms:8.1f}x" if peer else f"{'':>9}"
                print(
                    f"{l:>6} {layout:<13} {impl:<11} {mode:<8} {ms:>10.1f} {tok / ms / 1e3:>9.3f} {ratio} {vs}",
                    flush=True,
                )
    if len(args.lengths) > 1:
        first, last = min(args.lengths), max(args.lengths)
        for layout in layouts:
            a, z = per_token.get((first, layout)), per_token.get((last, layout))
            if a and z:
                print(f"# chunked fwd, {layout}: tok/s at l={last} = {a / z:.2f} x tok/s at l={first}")


if __name__ == "__main__":
    main()
