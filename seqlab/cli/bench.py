"""``seqlab bench``: a quick forward-throughput comparison on this machine, in one process, on the same weights.

Peers: the model's fast PyTorch path (``backend="chunked"``, float32), the compiled CPU kernels
(``backend="native"``, float32, where they build on this machine), its float64 twin on the sequential reference
kernels (``backend="ref"``: the truth the fast paths are tested against), and, when a CUDA GPU is present, the
torch path and the Triton kernels on that GPU. Each peer's output is compared with the float64 reference on the
timed input (max absolute difference). Timings are the median of ``--repeats`` forwards after a warm-up, the
peers taking turns within each repeat so that a slow spell of a shared machine falls on all of them alike; the
reference is timed once (it is slow). The fuller benches with HF comparisons and memory tests live in
``bench/`` of the source tree.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from seqlab.cli._args import BIG, MODEL_TYPES, add_json, add_seed, add_threads, count, flag
from seqlab.machine import available_memory, machine, machine_line

VOCAB = 256
FULL = {"d_model": 256, "n_layer": 4, "length": 2048, "repeats": 3}
QUICK = {"d_model": 64, "n_layer": 2, "length": 256, "repeats": 1}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# the kernels each mixer runs (the native peer needs them all to build)
NATIVE_OPS = {
    "mamba1": ("selective_scan", "causal_conv1d"),
    "mamba2": ("ssd_scan", "causal_conv1d"),
    "mamba3": ("mamba3_scan",),
}


def _native_builds(ssm: str) -> bool:
    from seqlab.kernels._dispatch import NATIVE_SOURCES
    from seqlab.kernels._native import native_available

    return all(native_available(NATIVE_SOURCES[op]) for op in NATIVE_OPS.get(ssm, ("selective_scan",)))


def _peers(model, with_ref: bool) -> dict:
    """name -> (model, device) on the same weights."""
    import torch

    from seqlab.kernels import triton_available

    peers = {"torch (cpu, fp32)": (model.set_backend("chunked"), torch.device("cpu"))}
    if _native_builds(model.config.ssm):
        peers["native (cpu, fp32)"] = (copy.deepcopy(model).set_backend("native"), torch.device("cpu"))
    if with_ref:
        peers["float64 ref (cpu)"] = (copy.deepcopy(model).double().set_backend("ref"), torch.device("cpu"))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        peers["torch (cuda, fp32)"] = (copy.deepcopy(model).to(gpu).set_backend("chunked"), gpu)
        if triton_available():
            peers["triton (cuda, fp32)"] = (copy.deepcopy(model).to(gpu).set_backend("triton"), gpu)
    return peers


def _config(ssm: str, args):
    from seqlab import BackboneConfig
    from seqlab.errors import ConfigError

    sizes = {"d_model": args.d_model, "n_layer": args.n_layer, "ssm": ssm}
    for name in ("d_state", "headdim", "chunk_size", "expand"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    try:
        return BackboneConfig(**sizes)
    except ConfigError as exc:  # in the flags' words: "divisible by headdim (48)" -> "divisible by --headdim (48)"
        import re

        message = re.sub(r"\bBackboneConfig\.", "", str(exc))
        message = re.sub(
            r"(?<![\w-])(d_model|n_layer|d_state|headdim|chunk_size|expand)\b",
            lambda m: "--" + m.group(1).replace("_", "-"),
            message,
        )
        raise ConfigError(message) from None


def estimate_bytes(config, args) -> int:
    """A lower bound of the CPU memory a bench of ``config`` takes: the weights (float32, and float64 for the
    reference) and the float64 logits each CPU peer keeps for the comparison (the forwards' activations come on
    top; measured peaks were 1.2 to 2 times this). The weights are counted on PyTorch's meta device (nothing is
    allocated)."""
    import torch

    from seqlab import LanguageModel

    with torch.device("meta"):
        params = sum(p.numel() for p in LanguageModel(config, vocab_size=VOCAB).parameters())
    tokens = args.batch_size * args.length
    # the chunked and native float32 peers, and the float64 reference unless --no-ref
    refs = 0 if args.no_ref else 1
    return params * (8 + 8 * refs) + tokens * (8 + VOCAB * 8 * (2 + refs))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(config, args) -> None:
    """Refuse, up front, a bench that cannot fit in this machine's free memory (a failed allocation deep in torch
    can take the process down, or push the machine into swap, before Python sees a MemoryError)."""
    from seqlab.errors import ConfigError

    need, have = estimate_bytes(config, args), available_memory()
    if have is not None and need > have:
        raise ConfigError(
            f"--d-model {args.d_model}, --n-layer {args.n_layer}, --batch-size {args.batch_size} x "
            f"--length {args.length} need at least {_gib(need)} of memory ({config.ssm}); this machine "
            f"has {_gib(have)} free: lower them{'' if args.no_ref else ', or pass --no-ref'}"
        )


def bench_one(ssm: str, args) -> list[dict]:
    import torch

    from seqlab import LanguageModel

    config = _config(ssm, args)
    check_memory(config, args)
    torch.manual_seed(args.seed)
    model = LanguageModel(config, vocab_size=VOCAB).eval()
    peers = _peers(model, not args.no_ref)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, VOCAB, (args.batch_size, args.length), generator=gen)
    short = ids[:, : min(args.length, 64)]  # the slow reference warms up on a few tokens only
    outputs: dict = {}
    times: dict[str, list[float]] = {name: [] for name in peers}

    def forward(name):
        net, device = peers[name]
        x = ids.to(device)
        _sync(device)
        start = time.perf_counter()
        logits = net(x, return_state=False).logits
        _sync(device)
        return time.perf_counter() - start, logits

    with torch.no_grad():
        for name, (net, device) in peers.items():  # warm-up on the timed shape (kernel compilation, allocator)
            net((short if name.startswith("float64") else ids).to(device), return_state=False)
            _sync(device)
        for repeat in range(args.repeats):
            for name in peers:
                if name.startswith("float64") and repeat > 0:
                    continue  # the sequential reference is timed once
                seconds, logits = forward(name)
                times[name].append(seconds)
                if repeat == 0:
                    outputs[name] = logits.detach().to("cpu", torch.float64)
    truth = outputs.get("float64 ref (cpu)")
    base = statistics.median(times["torch (cpu, fp32)"])
    rows = []
    for name in peers:
        seconds = statistics.median(times[name])
        row = {
            "ssm": ssm,
            "peer": name,
            "length": args.length,
            "batch": args.batch_size,
            "tokens_per_s": args.batch_size * args.length / seconds,
            "seconds": seconds,
            "vs_torch_cpu": base / seconds,
            "max_abs_diff_vs_ref": None,
        }
        if truth is not None:
            row["max_abs_diff_vs_ref"] = float((outputs[name] - truth).abs().max())
        rows.append(row)
    return rows


def _bench(args) -> int:
    import torch

    from seqlab.errors import ConfigError

    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("d_model", "n_layer", "length", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for ssm in args.ssm:  # every refusal before any work
        check_memory(_config(ssm, args), args)
    info = machine()
    rows = []
    for ssm in args.ssm:
        rows.extend(bench_one(ssm, args))
    if args.json:
        print(json.dumps({"machine": info, "config": _config_line(args), "rows": rows}))
        return 0
    print(machine_line(info, with_os=False))
    print(_config_line(args))
    print()
    header = f"{'ssm':<8} {'peer':<20} {'tok/s':>12} {'x torch cpu':>12} {'max|out - float64 ref|':>24}"
    print(header)
    print("-" * len(header))
    for r in rows:
        diff = "-" if r["max_abs_diff_vs_ref"] is None else f"{r['max_abs_diff_vs_ref']:.2e}"
        print(f"{r['ssm']:<8} {r['peer']:<20} {r['tokens_per_s']:>12,.0f} {r['vs_torch_cpu']:>11.2f}x {diff:>24}")
    return 0


def _config_line(args) -> str:
    extra = "".join(
        f", {n} {getattr(args, n)}"
        for n in ("d_state", "headdim", "chunk_size", "expand")
        if getattr(args, n) is not None
    )
    return (
        f"config: LanguageModel vocab {VOCAB}, d_model {args.d_model}, {args.n_layer} layers{extra}; "
        f"batch {args.batch_size} x length {args.length}; forward without state, torch.no_grad; median of "
        f"{args.repeats} after a warm-up (float64 reference: timed once)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="forward tok/s of the fast path vs the float64 reference (and Triton on a GPU) here",
        description="Time the forward pass (tok/s) of a LanguageModel on this machine, in one process and on the "
        "same weights: the fast PyTorch path (float32), its float64 twin on the sequential reference kernels, and, "
        "with a CUDA GPU, the torch path and the Triton kernels on the GPU. Prints the machine, tok/s, the ratio "
        "to the CPU fast path, and each peer's max abs difference from the float64 reference. Median of --repeats "
        "after a warm-up, the peers taking turns; the reference is timed once.",
        epilog="examples: seqlab bench --quick;  seqlab bench --ssm mamba2 --length 8192 --threads 1 --no-ref",
    )
    b.add_argument(
        "--ssm",
        nargs="+",
        choices=("mamba1", "mamba2", "mamba3"),
        default=["mamba1", "mamba2"],
        help="mixer kinds to time (default mamba1 and mamba2)",
    )
    sizes = {
        "d_model": "model width (default 256; --quick 64)",
        "n_layer": "layers (default 4; --quick 2)",
        "d_state": "SSM state size (default the mixer's)",
        "headdim": "Mamba-2/Mamba-3 head size (default 64)",
        "chunk_size": "Mamba-2/Mamba-3 scan chunk (default 256)",
        "expand": "inner width / d_model (default 2)",
    }
    for name, text in sizes.items():
        b.add_argument(flag(name), type=MODEL_TYPES[name], default=None, help=text)
    b.add_argument("--length", type=count(1, BIG), default=None, help="tokens per sequence (default 2048; --quick 256)")
    b.add_argument("--batch-size", type=count(1, 1 << 20), default=1, help="sequences per forward (default 1)")
    b.add_argument(
        "--repeats",
        type=count(1, 1000),
        default=None,
        help="timed forwards; the median is shown (default 3; --quick 1)",
    )
    add_threads(b, None, "torch CPU threads (default torch's; 1 is steadiest on a shared machine)")
    add_seed(b, 0, "seed of the weights and the input (default 0)")
    b.add_argument("--no-ref", action="store_true", help="skip the float64 reference (slow at long lengths)")
    b.add_argument("--quick", action="store_true", help="a small model and a short input: a few seconds")
    add_json(b, "print the machine and the rows as one JSON object")
    b.set_defaults(func=_bench)
