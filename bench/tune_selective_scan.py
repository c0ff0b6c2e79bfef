"""Tile sweep for the Triton Mamba-1 selective-scan forward (and forward+backward) on a CUDA GPU.

For each tiling (positions per chunk ``block_l``, channels per program ``block_d``, warps) it first checks the
forward against the chunked path on fresh random inputs (relative error of y and of the final state, fp32), then
times the bf16 forward (and, with ``--backward``, forward+backward) at the shapes of ``bench/gpu_kernels.py``
(b=1, d=1536 / 5120, n=16, D, z, delta_bias, softplus), with CUDA events, the median of ``--repeats`` calls,
L2 flushed before each. Prints one row per tiling and shape with GB/s against the minimum bytes and the
measured copy bandwidth. Used to choose ``_plan``'s defaults; see docs/benchmarks.md for the recorded runs.

    python bench/tune_selective_scan.py                  # the default sweep (a few minutes on an H100)
    python bench/tune_selective_scan.py --block-d 1 2 --block-l 64 --warps 4 --lengths 8192
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[1536, 5120])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--block-d", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--block-l", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--max-tile", type=int, default=8192, help="skip tilings with more tile elements")
    p.add_argument("--backward", action="store_true", help="also time forward+backward (default tiling only)")
    p.add_argument("--backward-sweep", action="store_true", help="sweep the backward's tiling (fwd+bwd times)")
    p.add_argument("--bwd-block-d", type=int, nargs="+", default=[1, 2])
    p.add_argument("--bwd-warps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("NO GPU FOUND: this sweep times CUDA kernels only")
        return 0

    from seqlab.kernels.scan import triton_ops as sst  # noqa: F401 (the module, not the function)
    from seqlab.kernels.scan.chunked import selective_scan_chunked
    from seqlab.kernels.scan.ref import compute_dtype

    dev = torch.device("cuda")
    from _gpu_measure import Timer  # the same event timing, median and L2 flush as the kernel bench

    timer = Timer(dev, flush=True)

    def timed(fn, warmup=2, repeats=args.repeats):
        return timer(fn, warmup, repeats)

    src = torch.randn(256 * 2**20, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (timed(lambda: dst.copy_(src)) * 1e-3) / 1e9
    print(
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {copy_gbs:,.0f} GB/s",
        flush=True,
    )

    def inputs(d, l, dtype, seed, n=16, b=1):
        g = torch.Generator(device="cpu").manual_seed(seed)
        r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dev, dtype)  # noqa: E731
        return dict(
            u=r(b, d, l),
            delta=r(b, d, l, scale=0.5),
            A=-torch.rand(d, n, generator=g).to(dev) - 0.1,
            B=r(b, n, l),
            C=r(b, n, l),
            D=r(d).float(),
            z=r(b, d, l),
            delta_bias=r(d).float() * 0.1,
            delta_softplus=True,
        )

    def plan_for(bd, bl, w, b=1, n=16):
        return sst._Plan(
            NP=triton_np(n), BLOCK_L=bl, fwd_bd=bd, fwd_sub=1, fwd_warps=w, bwd_bd=bd, bwd_sub=1, bwd_warps=w
        )

    def triton_np(n):
        import triton

        return triton.next_power_of_2(n)

    def fwd(kw, plan, store_states=False):
        cdt = compute_dtype(*(kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")))
        B4, C4 = sst._bcl(kw["B"]), sst._bcl(kw["C"])
        geo = sst._Geometry(kw["u"], kw["A"], B4, C4)
        return sst._scan_forward(
            kw["u"],
            kw["delta"],
            kw["A"],
            B4,
            C4,
            kw["D"],
            kw["z"],
            kw["delta_bias"],
            None,
            True,
            cdt,
            plan,
            geo,
            store_states,
        )

    rows = []
    configs = [
        c for c in itertools.product(args.block_d, args.block_l, args.warps) if c[0] * 16 * c[1] <= args.max_tile
    ]
    check = inputs(96, 1000, torch.float32, seed=1)
    y_ref, s_ref = selective_scan_chunked(**check, return_final_state=True)
    for bd, bl, w in configs:
        plan = plan_for(bd, bl, w)
        try:
            t0 = time.perf_counter()
            y, s, _ = fwd(check, plan)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
        except Exception as exc:  # a tiling the compiler refuses (e.g. out of resources)
            print(f"block_d {bd} block_l {bl} warps {w}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        ey = ((y - y_ref).norm() / y_ref.norm()).item()
        es = ((s - s_ref).norm() / s_ref.norm()).item()
        ok = ey < 1e-3 and es < 1e-3
        for d, l in itertools.product(args.d, args.lengths):
            kw = inputs(d, l, torch.bfloat16, seed=2)
            ms = timed(lambda: fwd(kw, plan))
            nbytes = 2 * (4 * d * l + 2 * 16 * l) + 2 * 4 * d * 16  # u, delta, z, y; B, C; h0 + final
            rows.append((bd, bl, w, d, l, ms, nbytes / (ms * 1e-3) / 1e9, ok))
            print(
                f"block_d {bd} block_l {bl} warps {w} d {d} L {l}: fwd {ms * 1e3:8.1f} us "
                f"({nbytes / (ms * 1e-3) / 1e9:6.0f} GB/s, {100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs:4.1f}% "
                f"of copy)  check y {ey:.1e} state {es:.1e} {'ok' if ok else 'WRONG'}  compile {compile_s:.1f}s",
                flush=True,
            )
    print("\nbest forward tiling per shape:")
    for d, l in itertools.product(args.d, args.lengths):
        cand = [r for r in rows if r[3] == d and r[4] == l and r[7]]
        if cand:
            bd, bl, w, _, _, ms, gbs, _ = min(cand, key=lambda r: r[5])
            print(
                f"  d {d} L {l}: block_d {bd} block_l {bl} warps {w}: {ms * 1e3:.1f} us, {gbs:.0f} GB/s "
                f"({100 * gbs / copy_gbs:.1f}% of copy)"
            )
    if args.backward_sweep:
        bwd_rows = []
        for bl, bbd, bw in itertools.product(args.block_l, args.bwd_block_d, args.bwd_warps):
            fbest = [r for r in rows if r[1] == bl and r[7]]
            fbd, _, fw = min(fbest, key=lambda r: r[5])[:3] if fbest else (1, bl, 2)
            for d, l in itertools.product(args.d, args.lengths):
                plan = sst._Plan(
                    NP=16,
                    BLOCK_L=bl,
                    fwd_bd=fbd,
                    fwd_sub=1,
                    fwd_warps=fw,
                    bwd_bd=bbd,
                    bwd_sub=sst._sub_for(1, 1, -(-d // bbd), max(1, 32 // bbd), 4 * sst._sm_count(dev)),
                    bwd_warps=bw,
                )
                kw = inputs(d, l, torch.bfloat16, seed=3)
                names = ("u", "delta", "B", "C", "z")
                for k in names:
                    kw[k].requires_grad_(True)
                gy = torch.randn_like(kw["u"])
                B4, C4 = sst._bcl(kw["B"]), sst._bcl(kw["C"])
                geo = sst._Geometry(kw["u"], kw["A"], B4, C4)

                def fb():
                    y, _ = sst._SelectiveScanFn.apply(
                        kw["u"],
                        kw["delta"],
                        kw["A"],
                        B4,
                        C4,
                        kw["D"],
                        kw["z"],
                        kw["delta_bias"],
                        None,
                        True,
                        torch.float32,
                        plan,
                        geo,
                    )
                    torch.autograd.grad(y, [kw[k] for k in names], gy)

                try:
                    ms = timed(fb, repeats=5)
                except Exception as exc:
                    print(f"bwd block_l {bl} block_d {bbd} warps {bw}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                    break
                bwd_rows.append((bl, bbd, bw, d, l, ms))
                print(
                    f"fwd+bwd block_l {bl} (fwd block_d {fbd} warps {fw}) bwd block_d {bbd} sub {plan.bwd_sub} "
                    f"warps {bw} d {d} L {l}: {ms * 1e3:8.1f} us",
                    flush=True,
                )
        print("\nbest fwd+bwd tiling per shape:")
        for d, l in itertools.product(args.d, args.lengths):
            cand = [r for r in bwd_rows if r[3] == d and r[4] == l]
            if cand:
                bl, bbd, bw, _, _, ms = min(cand, key=lambda r: r[5])
                print(f"  d {d} L {l}: block_l {bl} bwd block_d {bbd} warps {bw}: {ms * 1e3:.1f} us")
    if args.backward:
        from seqlab.kernels.scan.triton_ops import selective_scan_triton

        for d, l in itertools.product(args.d, args.lengths):
            kw = inputs(d, l, torch.bfloat16, seed=3)
            for k in ("u", "delta", "B", "C", "z"):
                kw[k].requires_grad_(True)
            gy = torch.randn_like(kw["u"])

            def fb():
                y = selective_scan_triton(**kw)
                torch.autograd.grad(y, [kw[k] for k in ("u", "delta", "B", "C", "z")], gy)

            print(
                f"default tiling d {d} L {l}: fwd+bwd {timed(fb, repeats=max(3, args.repeats // 2)) * 1e3:.1f} us",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
