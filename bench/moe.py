"""One MoE layer vs a dense gated MLP with the same active parameters per token, on CPU.

Peers: ``MoEFeedForward`` (``ffn="moe"``, top-1, ``moe_d_expert`` = width, the default capacity factor 1.25)
and ``seqlab.blocks.GatedMLP`` (``ffn="mlp"``, ``d_ffn`` = width). With top-1 and equal widths a token meets
the same 3 x d_model x width expert weights in both (the MoE adds its d_model x experts router), so the ratio
MoE / dense is the price of routing: the router, the sort, the gather and scatter, the capacity cut and
running E smaller GEMMs instead of one.

Sizes: d_model 512 (a small Mamba's width) and width 1024 (2 x d_model), so that 32 experts hold 50M
parameters (400 MiB of weights and gradients, comfortable on a small machine) while each expert still gets
GEMMs of a few hundred rows (8192 tokens / 32 experts = 256), the regime a real MoE layer runs in; and batch x
length 16 x 512 and 4 x 4096 (8192 and 16384 tokens in one layer call).

Same weights and inputs: the dense layer's weights are expert 0's, the input is one random (batch, length,
d_model) tensor (unit variance, like the RMS-normed input an FFN sees) and the upstream gradient one random
tensor of the same shape, shared by both peers. A check line compares the MoE output of the tokens expert 0
kept with gate x the dense output.

Timing (time.perf_counter): training mode is forward + backward of the layer (MoE: output and the router's
auxiliary losses, weighted as in training; parameter gradients set to None before each step, as
``zero_grad`` does); eval mode is the forward under torch.no_grad (MoE: no capacity, drop-free, what
generation and evaluation run). The four peers (MoE train, dense train, MoE eval, dense eval) take turns
within every repeat after one warm-up each; the medians are shown, and the ratio's median and range over the
per-repeat ratios. The table also shows the share of pairs dropped by the capacity cut (their tokens skip the
MoE, so a high share would flatter it), the busiest expert's load over the even share, and the row layout the
layer picked (packed: one GEMM per expert; padded: one bmm over blocks padded to the busiest expert's rows;
the choice depends on the imbalance and the device, see ``seqlab.ffn.moe._Layout``).

Threads: on a machine shared with other busy processes, multi-threaded timings of the MoE suffer far more
than the dense layer's: it makes many more, smaller calls, and each is a rendezvous of a thread team some of
whose members are waiting for a core. ``--threads 1`` gives stable numbers there; say which you ran.

Peak memory: each (peer, size, mode) runs in a fresh subprocess that builds the layer, input and upstream
gradient, runs one tiny step (so libraries, thread pools and autograd's engine are paged in), resets its
resident-set high-water mark (VmHWM, via /proc/self/clear_refs), reads its RSS, runs one full step and reads
VmHWM again. "step" is that peak minus the RSS before the step: the activations saved for backward, the
temporaries and the parameter gradients. The subprocess runs with MALLOC_MMAP_THRESHOLD_=131072, so glibc maps
every block of 128 KiB or more on its own and returns it when freed: the RSS follows the live tensors rather
than what the allocator keeps for later. The absolute peak includes about 500 MiB of torch itself. A fresh
process per measurement keeps one peer's leftovers out of another's peak.

    python bench/moe.py                  # experts 8 and 32, 16x512 and 4x4096, 5 repeats
    python bench/moe.py --quick          # tiny sizes, memory of the first size only (smoke test)
    python bench/moe.py --threads 1 --repeats 7 --skip-memory
    python bench/moe.py --layout padded --skip-memory   # force one bmm per GEMM (padded blocks)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from _machine import machine_line, reset_peak, status_kib  # (bench/ is on sys.path when a bench runs)

TARGET = 1.5  # the issue's: the MoE layer costs at most 1.5x the dense layer's time at equal active parameters


def parse_shape(text: str) -> tuple[int, int]:
    try:
        b, l = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH, got {text!r}") from None
    if b <= 0 or l <= 0:
        raise argparse.ArgumentTypeError(f"batch and length must be positive, got {text!r}")
    return b, l


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats, one size's memory (smoke test)")
    p.add_argument("--experts", type=int, nargs="+", help="expert counts (default 8 32)")
    p.add_argument("--shapes", type=parse_shape, nargs="+", help="BATCHxLENGTH (default 16x512 4x4096)")
    p.add_argument("--d-model", type=int, help="model width (default 512)")
    p.add_argument("--width", type=int, help="dense d_ffn = each expert's d_expert (default 1024)")
    p.add_argument("--repeats", type=int, help="timed rounds; medians are reported (default 5)")
    p.add_argument(
        "--layout",
        choices=["auto", "packed", "padded"],
        default="auto",
        help="force the MoE's row layout (default: the layer's own choice; see seqlab.ffn.moe.PAD_SLACK)",
    )
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: "MODE EXPERTS BATCHxLENGTH"
    args = p.parse_args(argv)
    if args.experts is None:
        args.experts = [4, 8] if args.quick else [8, 32]
    if args.shapes is None:
        args.shapes = [(2, 64), (1, 256)] if args.quick else [(16, 512), (4, 4096)]
    if args.d_model is None:
        args.d_model = 64 if args.quick else 512
    if args.width is None:
        args.width = 128 if args.quick else 1024
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    for name in ("d_model", "width", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(e <= 0 for e in args.experts):
        p.error("--experts must be positive")
    return args


# --------------------------------------------------------------------------------------------------
def build_dense(args):
    from seqlab import BackboneConfig
    from seqlab.blocks import GatedMLP

    torch.manual_seed(0)
    return GatedMLP(BackboneConfig(d_model=args.d_model, n_layer=1, ffn="mlp", d_ffn=args.width))


def build_moe(args, experts: int, dense):
    from seqlab import BackboneConfig
    from seqlab.ffn import MoEFeedForward

    torch.manual_seed(experts)
    config = BackboneConfig(
        d_model=args.d_model, n_layer=1, ffn="moe", moe_experts=experts, moe_top_k=1, moe_d_expert=args.width
    )
    moe = MoEFeedForward(config)
    with torch.no_grad():  # expert 0 is the dense layer
        moe.gate_up[0].copy_(dense.gate_up.weight)
        moe.down[0].copy_(dense.down.weight)
    return moe


def build_inputs(args, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(shape[0] * 100_003 + shape[1])
    x = torch.randn(*shape, args.d_model, generator=gen)
    grad = torch.randn(*shape, args.d_model, generator=gen)
    return x, grad


def train_step(layer, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward + backward in training mode; an MoE layer's router losses join the backward as in training."""
    from seqlab.ffn import router_losses

    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    out = layer(x)
    aux = router_losses(layer)
    if aux is None:
        out.backward(grad)
    else:
        torch.autograd.backward([out, aux.loss], [grad, torch.ones_like(aux.loss)])


def eval_step(layer, x: torch.Tensor) -> None:
    with torch.no_grad():
        layer(x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
def check_and_route(moe, dense, x: torch.Tensor) -> dict:
    """The peers compute comparable things (expert 0's kept tokens: MoE = gate x dense), and what the router did."""
    from seqlab.ffn import capacity_for, route

    s = moe.settings
    h = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        _, experts, gates = route(h, moe.router.weight, s.top_k)
        ref = dense(x).reshape(h.shape)
    moe.train()  # (with autograd on: the training path, capacity included)
    out = moe(x).reshape(h.shape).detach()
    assert moe.last_stats is not None
    dropped = moe.last_stats.dropped
    moe.last_stats = None
    capacity = capacity_for(h.shape[0], s)
    mine = (experts[:, 0] == 0).nonzero().squeeze(-1)[:capacity]  # expert 0's first `capacity` tokens are kept
    err = rel_err(out[mine], gates[mine, 0:1] * ref[mine]) if mine.numel() else float("nan")
    counts = torch.bincount(experts[:, 0], minlength=s.experts)
    return {
        "layout_train": layout_of(counts.clamp(max=capacity).tolist()),
        "layout_eval": layout_of(counts.tolist()),
        "err": err,
        "dropped": dropped,
        "busiest": float(counts.max()) / h.shape[0] * s.experts,  # busiest expert's load / the even share
        "capacity": capacity,
    }


def layout_of(sizes: list[int]) -> str:
    """Which row layout the MoE layer picks for these per-expert pair counts at this thread count."""
    from seqlab.ffn.moe import _Layout

    kept = sum(sizes)
    return "padded" if _Layout(sizes, torch.arange(kept), kept, True).padded else "packed"


def time_point(args, experts: int, shape: tuple[int, int], dense) -> dict:
    moe = build_moe(args, experts, dense)
    x, grad = build_inputs(args, shape)
    info = check_and_route(moe, dense, x)

    def train(layer):
        def step():
            layer.train()
            train_step(layer, x, grad)

        return step

    def evaluate(layer):
        def step():
            layer.eval()
            eval_step(layer, x)

        return step

    peers = {
        "moe_train": train(moe),
        "dense_train": train(dense),
        "moe_eval": evaluate(moe),
        "dense_eval": evaluate(dense),
    }
    times: dict[str, list[float]] = {name: [] for name in peers}
    for fn in peers.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in peers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {"experts": experts, "shape": shape, **info}
    for mode in ("train", "eval"):
        m, d = times[f"moe_{mode}"], times[f"dense_{mode}"]
        ratios = [a / b for a, b in zip(m, d)]
        result[mode] = {
            "moe_s": statistics.median(m),
            "dense_s": statistics.median(d),
            "ratio": statistics.median(m) / statistics.median(d),
            "ratio_lo": min(ratios),
            "ratio_hi": max(ratios),
        }
    return result


def run_speed(args) -> list[dict]:
    dense = build_dense(args)
    results = []
    for shape in args.shapes:
        for experts in args.experts:
            r = time_point(args, experts, shape, dense)
            results.append(r)
            tokens = shape[0] * shape[1]
            print(
                f"  E={experts} {shape[0]}x{shape[1]}: train MoE {r['train']['moe_s'] * 1e3:.0f} ms, dense "
                f"{r['train']['dense_s'] * 1e3:.0f} ms ({r['train']['ratio']:.2f}x); eval MoE "
                f"{r['eval']['moe_s'] * 1e3:.0f} ms, dense {r['eval']['dense_s'] * 1e3:.0f} ms "
                f"({r['eval']['ratio']:.2f}x); {tokens} tokens, dropped {r['dropped']:.1%}, expert-0 check "
                f"{r['err']:.1e}",
                flush=True,
            )
    print()
    print(
        "| experts | batch x length | mode | MoE tok/s | dense tok/s | MoE / dense time, median [range] | "
        "dropped | busiest expert / even share | MoE layout |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        tokens = r["shape"][0] * r["shape"][1]
        for mode, label in (("train", "train fwd+bwd"), ("eval", "eval fwd (drop-free)")):
            t = r[mode]
            dropped = f"{r['dropped']:.1%}" if mode == "train" else "0"
            print(
                f"| {r['experts']} | {r['shape'][0]} x {r['shape'][1]} | {label} | {tokens / t['moe_s']:,.0f} | "
                f"{tokens / t['dense_s']:,.0f} | {t['ratio']:.2f} [{t['ratio_lo']:.2f}-{t['ratio_hi']:.2f}] | "
                f"{dropped} | {r['busiest']:.2f} | {r['layout_' + mode]} |"
            )
    print()
    worst = max(r["train"]["ratio"] for r in results)
    verdict = "met" if worst <= TARGET else "NOT met"
    print(
        f"target: MoE train fwd+bwd time <= {TARGET}x dense at equal active parameters: {verdict} "
        f"(worst median ratio {worst:.2f})"
    )
    print(
        "check: expert 0 = the dense layer; its kept tokens' MoE output vs gate x dense output, max rel. error "
        + ", ".join(f"E={r['experts']} {r['shape'][0]}x{r['shape'][1]}: {r['err']:.1e}" for r in results)
    )
    return results


# --------------------------------------------------------------------------------------------------
def memory_child(args) -> None:
    """Runs in its own process: build one peer, its input and upstream gradient, run one step, print its peak."""
    mode, experts_text, shape_text = args.memory_child.split()
    experts = int(experts_text)
    shape = parse_shape(shape_text)
    dense = build_dense(args)
    layer = build_moe(args, experts, dense) if experts else dense
    del dense
    layer.train(mode == "train")
    x, grad = build_inputs(args, shape)

    def step(x, grad):
        train_step(layer, x, grad) if mode == "train" else eval_step(layer, x)

    step(x[:1, :8], grad[:1, :8])  # one tiny step first: libraries, thread pools, autograd's engine paged in
    for p in layer.parameters():
        p.grad = None
    reset = reset_peak()
    before = status_kib("VmRSS")
    step(x, grad)
    peak = status_kib("VmHWM")
    print(json.dumps({"rss_before_kib": before, "vm_hwm_kib": peak, "reset": reset}))


def run_memory(args) -> None:
    shapes = args.shapes[:1] if args.quick else args.shapes
    # glibc then maps every block of 128 KiB or more on its own and unmaps it when freed, so the RSS follows
    # the live tensors instead of what the allocator keeps for later
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    for shape in shapes:
        for mode in ("train", "eval"):
            for experts in [0, *args.experts]:
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--memory-child",
                    f"{mode} {experts} {shape[0]}x{shape[1]}",
                    "--d-model",
                    str(args.d_model),
                    "--width",
                    str(args.width),
                ]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                cmd += ["--layout", args.layout]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit(f"memory subprocess {mode} E={experts} {shape} failed ({proc.returncode})")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append((shape, mode, experts, r))

    print()
    print(
        "Peak memory, one step per fresh subprocess (VmHWM reset before the step and read after it; step = that "
        "peak - VmRSS before it, with the layer, input and upstream gradient already built):"
    )
    print()
    print(
        "| batch x length | mode | layer | peak RSS (MiB) | RSS before the step (MiB) | step (MiB) | step / dense | "
        "of the step: parameter gradients (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    steps: dict = {}
    for shape, mode, experts, r in rows:
        step = (r["vm_hwm_kib"] - r["rss_before_kib"]) / 1024
        steps[(shape, mode, experts)] = step
        dense_step = steps[(shape, mode, 0)]
        name = "dense" if experts == 0 else f"MoE E={experts}"
        ratio = f"{step / dense_step:.2f}" if experts and dense_step > 0 else "-"
        label = "train fwd+bwd" if mode == "train" else "eval fwd"
        params = 3 * args.d_model * args.width * max(experts, 1) + args.d_model * experts
        grads = f"{params * 4 / 2**20:.1f}" if mode == "train" else "0"
        print(
            f"| {shape[0]} x {shape[1]} | {label} | {name} | {r['vm_hwm_kib'] / 1024:.0f} | "
            f"{r['rss_before_kib'] / 1024:.0f} | {step:.1f} | {ratio} | {grads} |"
        )
        if not r["reset"]:
            print("  (could not reset VmHWM: the peak includes building the layer)")


def force_layout(layout: str) -> None:
    import seqlab.ffn.moe as moe

    if layout != "auto":
        moe.PAD_SLACK = moe.PAD_SLACK_CPU = -1.0 if layout == "packed" else float("inf")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    force_layout(args.layout)
    if args.memory_child is not None:
        memory_child(args)
        return
    print(machine_line())
    print(
        f"config: d_model {args.d_model}, width {args.width} (dense d_ffn = d_expert), top-1, capacity factor "
        f"1.25 in training, drop-free in eval, fp32; experts {' '.join(map(str, args.experts))}; median of "
        f"{args.repeats} interleaved repeats after a warm-up; MoE row layout: {args.layout}"
    )
    dense_active = 3 * args.d_model * args.width
    print(
        f"active parameters per token: dense {dense_active:,}; MoE {dense_active:,} + router d_model x experts "
        f"({', '.join(f'E={e}: {args.d_model * e:,}' for e in args.experts)})"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print()
    run_speed(args)
    if not args.skip_memory:
        run_memory(args)


if __name__ == "__main__":
    main()
