"""Mamba-3 scan on CPU: the compiled kernels ("native") against the chunked PyTorch path, side by side.

Same inputs for both, one process, best of ``--repeats`` timings; forward and forward + backward (a sum of y and
the final state as the loss), tokens/s and the native / chunked ratio; and the one-token decode step (the state
update alone, batch ``--batch``, best of ``--steps`` single steps). The shape is the Mamba-3 mixer's at
d_model 256 with the config defaults (expand 2, headdim 64: 8 heads, d_state 128, rope_fraction 0.5: 32 angles,
ngroups 1, chunk_size 256), SISO unless ``--rank`` > 1. Run it with the thread count to measure, e.g.

    OMP_NUM_THREADS=2 .venv/bin/python bench/kernels_cpu_mamba3.py
"""

from __future__ import annotations

import argparse
import time

import torch

from seqlab.kernels.mamba3.chunked import mamba3_scan_chunked, mamba3_state_update_chunked
from seqlab.kernels.mamba3.native_ops import mamba3_scan_native, mamba3_state_update_native


def inputs(b: int, l: int, h: int, p: int, r: int, g: int, n: int, a: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    out = dict(
        x=rnd(b, l, h, p),
        dt=torch.rand(b, l, h, generator=gen) * 0.1 + 0.001,
        A=-(torch.rand(b, l, h, generator=gen) + 0.5),
        B=rnd(b, l, r, g, n, scale=0.3),
        C=rnd(b, l, r, g, n, scale=0.3),
        trap=rnd(b, l, h),
        angles=rnd(b, l, a),
        B_bias=torch.ones(h, r, n),
        C_bias=torch.ones(h, r, n),
        D=torch.ones(h),
        z=rnd(b, l, h, p),
    )
    if r > 1:
        w = torch.full((h, r, p), 1.0 / r)
        out.update(mimo_x=w, mimo_z=torch.ones(h, r, p), mimo_o=w.clone())
    return out


def call(fn, inp: dict, chunk: int):
    args = dict(inp)
    pos = [args.pop(k) for k in ("x", "dt", "A", "B", "C", "trap", "angles", "B_bias", "C_bias")]
    return fn(*pos, chunk, return_final_state=True, **args)


def best(fn, repeats: int) -> float:
    fn()  # warm-up (the native library builds on first use)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=1, help="MIMO rank (1: SISO)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="decode steps timed (best single step)")
    args = ap.parse_args()
    h, p, n, a, g = 8, 64, 128, 32, 1
    print(f"threads {torch.get_num_threads()}, b {args.batch}, h {h}, p {p}, n {n}, a {a}, r {args.rank}, fp32")
    print(f"{'L':>6} {'pass':>8} {'chunked tok/s':>14} {'native tok/s':>13} {'ratio':>6}")
    for l in args.lengths:
        inp = inputs(args.batch, l, h, p, args.rank, g, n, a)
        tokens = args.batch * l
        for mode in ("fwd", "fwd+bwd"):
            rates = {}
            for name, fn in (("chunked", mamba3_scan_chunked), ("native", mamba3_scan_native)):
                if mode == "fwd":

                    def run(fn=fn):
                        with torch.no_grad():
                            call(fn, inp, args.chunk)

                else:
                    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}

                    def run(fn=fn, leaves=leaves):
                        for leaf in leaves.values():  # a fresh gradient each time, as in a training step
                            leaf.grad = None
                        y, s = call(fn, leaves, args.chunk)
                        (y.sum() + s[1].sum()).backward()

                rates[name] = tokens / best(run, args.repeats)
            report(str(l), mode, rates)
    step_inputs = inputs(args.batch, 1, h, p, args.rank, g, n, a, seed=1)
    kw = {k: (v[:, 0] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in step_inputs.items()}
    r = args.rank
    state = (torch.rand(args.batch, h, a), torch.randn(args.batch, h, p, n), torch.randn(args.batch, r, h, n))
    state = (*state, torch.randn(args.batch, h, p))
    rates = {}
    for name, fn in (("chunked", mamba3_state_update_chunked), ("native", mamba3_state_update_native)):

        def one(fn=fn):
            with torch.no_grad():
                fn(state, **kw)

        rates[name] = args.batch / best(one, args.steps)
    report("1", "step", rates)


def report(length: str, mode: str, rates: dict) -> None:
    print(
        f"{length:>6} {mode:>8} {rates['chunked']:>14.0f} {rates['native']:>13.0f} "
        f"{rates['native'] / rates['chunked']:>6.2f}"
    )


if __name__ == "__main__":
    main()
