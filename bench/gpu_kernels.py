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
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from _machine import machine_line  # noqa: E402  (bench/ is on sys.path when a bench runs)

import seqlab.kernels as K  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OPS = ("selective_scan", "ssd_scan", "causal_conv1d", "decode")
PEERS = ("seqlab triton", "seqlab chunked", "mamba_ssm", "fla")
COPY_TARGET = 0.70     # Mamba-1 scan forward, fraction of the copy bandwidth, at L >= 8k
FLAT_TARGET = 1.25     # decode: max / min latency over the context lengths


# ---------------------------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--smoke", "--quick", dest="smoke", action="store_true",
                   help="tiny shapes, few repeats (the automatic mode without CUDA)")
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
    p.add_argument("--chunked-max-len", "--torch-max-len", type=int, default=16384, dest="chunked_max_len",
                   help="time the seqlab chunked path up to this length (default 16384; --torch-max-len is its old "
                        "name)")
    p.add_argument("--no-backward", action="store_true", help="forward rows only")
    p.add_argument("--no-peers", action="store_true", help="skip mamba_ssm / causal-conv1d / fla")
    p.add_argument("--skip-triton", action="store_true",
                   help="skip seqlab's Triton column (e.g. a CPU smoke run with TRITON_INTERPRET=1 in the environment)")
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
    if any(v <= 0 for v in args.lengths + args.contexts + args.mamba1_d):
        p.error("lengths, contexts and widths must be positive")
    if args.heads % args.groups:
        p.error("--heads must be divisible by --groups")
    return args


# ---------------------------------------------------------------------------------------------- timing


class Timer:
    """Median time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, flush: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush_buf = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device) \
            if flush and self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], warmup: int, repeats: int) -> float:
        """Median milliseconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(timer: Timer, mib: int, device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), 2, 10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Cell:
    ms: float | None = None
    note: str = ""

    def text(self, nbytes: int) -> str:
        if self.ms is None:
            return self.note or "-"
        return f"{fmt_ms(self.ms)} ({fmt_gbs(nbytes / (self.ms * 1e-3) / 1e9)})"


@dataclass
class Row:
    op: str
    shape: str
    length: int
    mode: str
    nbytes: int
    cells: dict = field(default_factory=dict)


def fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_gbs(gbs: float) -> str:
    return f"{gbs:,.0f} GB/s" if gbs >= 100 else f"{gbs:.3g} GB/s"


def fmt_pct(pct: float) -> str:
    return f"{pct:.0f}%" if pct >= 1 else f"{pct:.2g}%"


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}" + (f" ({text[:60]})" if text else "")


def measure(timer: Timer, fn: Callable[[], object], warmup: int, repeats: int) -> Cell:
    try:
        return Cell(timer(fn, warmup, repeats))
    except Exception as exc:  # one peer failing (OOM, unsupported shape) must not stop the table
        if timer.cuda:
            torch.cuda.empty_cache()
        return Cell(note=short_error(exc))


GRAPH_STEPS = 32  # decode steps per captured CUDA graph


def graph_measure(timer: Timer, fn: Callable[[], object], warmup: int, repeats: int) -> Cell:
    """Device time of one decode step without the host: ``GRAPH_STEPS`` calls captured in a CUDA graph, its replay
    timed like any call, divided by the steps (the steps reuse their inputs, so the state is L2-resident after the
    first, as in a decode loop)."""
    if not timer.cuda:
        return Cell(note="needs CUDA")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_STEPS):
                fn()
        return Cell(timer(graph.replay, warmup, repeats) / GRAPH_STEPS)
    except Exception as exc:  # a step that syncs with the host cannot be captured
        torch.cuda.synchronize()
        return Cell(note="graph: " + short_error(exc))


# ---------------------------------------------------------------------------------------------- peers


def tri_reps(args, repeats: int) -> tuple[int, int]:
    """(warm-up, repeats) of the seqlab Triton cells: one untimed-free call in the (slow) interpreter."""
    return (0, 1) if args.interp else (args.warmup, repeats)


def triton_note(args) -> str | None:
    """None when seqlab's Triton kernels can run here, else what the cell says."""
    if args.skip_triton:
        return "skipped (--skip-triton)"
    if K.triton_available():
        return None
    from seqlab.kernels._triton import triton_import_error

    if triton_import_error():
        return "triton not installed"
    return "no GPU (set TRITON_INTERPRET=1 for the interpreter)"


def optional_import(what: str):
    """(object, None) or (None, "not installed")."""
    module_name, _, attr = what.rpartition(".")
    try:
        import importlib

        return getattr(importlib.import_module(module_name), attr), None
    except Exception:  # ImportError, or a broken CUDA extension raising something else
        return None, "not installed"


def forward_fn(fn: Callable, inputs: dict, **fixed) -> Callable[[], object]:
    def go():
        with torch.no_grad():
            return fn(**inputs, **fixed)
    return go


def backward_fn(fn: Callable, inputs: dict, grad_names, seed: int, **fixed) -> Callable[[], object]:
    """One forward with grad and the gradients of ``grad_names`` against a fixed random dy."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in grad_names and v is not None else v)
              for k, v in inputs.items()}
    wrt = [leaves[k] for k in grad_names if leaves.get(k) is not None]
    state = {}

    def go():
        out = fn(**leaves, **fixed)
        y = out[0] if isinstance(out, tuple) else out
        if "dy" not in state:
            gen = torch.Generator(device=y.device).manual_seed(seed)
            state["dy"] = torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32).to(y.dtype)
        return torch.autograd.grad(y, wrt, state["dy"])
    return go


def maker(bwd: bool, inputs: dict, grad_names, seed: int, **fixed) -> Callable[[Callable], Callable[[], object]]:
    """f -> the timed callable: ``f(**inputs, **fixed)`` under no_grad, or forward + backward."""
    if bwd:
        return lambda f: backward_fn(f, inputs, grad_names, seed, **fixed)
    return lambda f: forward_fn(f, inputs, **fixed)


def seqlab_op(op: str, backend: str) -> Callable:
    fn = getattr(K, op)

    def call(**kw):
        return fn(**kw, backend=backend)
    return call


# ---------------------------------------------------------------------------------------------- inputs


def rand(gen, *shape, device, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale + shift).to(dtype)


def mamba1_inputs(b, d, n, l, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = torch.float32
    return dict(u=rand(gen, b, d, l, device=device, dtype=dtype),
                delta=rand(gen, b, d, l, device=device, dtype=dtype, scale=0.5, shift=-1.0),
                A=-torch.exp(rand(gen, d, n, device=device, dtype=f32, scale=0.5)),
                B=rand(gen, b, n, l, device=device, dtype=dtype), C=rand(gen, b, n, l, device=device, dtype=dtype),
                D=rand(gen, d, device=device, dtype=f32), z=rand(gen, b, d, l, device=device, dtype=dtype),
                delta_bias=rand(gen, d, device=device, dtype=f32, scale=0.1))


def mamba2_inputs(b, l, h, p, g, n, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = torch.float32
    dt_bias = torch.log(torch.expm1(torch.exp(torch.rand(h, generator=gen, device=device)
                                              * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))))
    return dict(x=rand(gen, b, l, h, p, device=device, dtype=dtype),
                dt=rand(gen, b, l, h, device=device, dtype=dtype, scale=0.5),
                A=-torch.empty(h, device=device).uniform_(1, 16, generator=gen),
                B=rand(gen, b, l, g, n, device=device, dtype=dtype),
                C=rand(gen, b, l, g, n, device=device, dtype=dtype),
                D=rand(gen, h, device=device, dtype=f32), dt_bias=dt_bias.to(f32))


def conv_inputs(b, d, l, w, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    # position-major (the transpose of a contiguous (b, l, d)), as a Mamba mixer hands it to the conv
    x = rand(gen, b, l, d, device=device, dtype=dtype).transpose(1, 2)
    return dict(x=x, weight=rand(gen, d, w, device=device, dtype=dtype, scale=0.5),
                bias=rand(gen, d, device=device, dtype=dtype, scale=0.1))


# ---------------------------------------------------------------------------------------------- minimum bytes


def bytes_mamba1(b, d, n, l, s, backward):
    fwd = s * (4 * b * d * l + 2 * b * n * l) + 4 * (d * n + 2 * d)
    return fwd + (s * (7 * b * d * l + 4 * b * n * l) + 4 * (d * n + 2 * d) if backward else 0)


def bytes_ssd(b, l, h, p, g, n, s, backward):
    fwd = s * (2 * b * l * h * p + b * l * h + 2 * b * l * g * n) + 12 * h
    return fwd + (s * (3 * b * l * h * p + 2 * b * l * h + 4 * b * l * g * n) + 12 * h if backward else 0)


def bytes_conv(b, d, l, w, s, backward):
    fwd = s * 2 * b * d * l + s * (d * w + d)
    return fwd + (s * 3 * b * d * l + 2 * s * (d * w + d) if backward else 0)


# ---------------------------------------------------------------------------------------------- the ops


def bench_selective_scan(args, timer, device, dtype, tnote) -> list[Row]:
    rows = []
    s = torch.finfo(dtype).bits // 8
    mamba_fn, mamba_note = (None, "skipped") if args.no_peers else \
        optional_import("mamba_ssm.ops.selective_scan_interface.selective_scan_fn")
    fixed = dict(delta_softplus=True)
    grads = ("u", "delta", "B", "C", "z", "A", "D", "delta_bias")
    b, n = args.batch, args.mamba1_n
    for d in args.mamba1_d:
        for l in args.lengths:
            inputs = mamba1_inputs(b, d, n, l, device, dtype, args.seed)
            for mode in ("fwd",) if args.no_backward else ("fwd", "fwd+bwd"):
                bwd = mode == "fwd+bwd"
                row = Row("selective_scan", f"b{b} d{d} n{n}", l, mode, bytes_mamba1(b, d, n, l, s, bwd))
                make = maker(bwd, inputs, grads, args.seed, **fixed)
                reps = max(3, args.repeats // 2) if bwd else args.repeats
                row.cells["seqlab triton"] = Cell(note=tnote) if tnote else \
                    measure(timer, make(seqlab_op("selective_scan", "triton")), *tri_reps(args, reps))
                row.cells["seqlab chunked"] = Cell(note="skipped") if l > args.chunked_max_len else \
                    measure(timer, make(seqlab_op("selective_scan", "chunked")), min(args.warmup, 1), max(1, reps // 4))
                if mamba_fn is None or not timer.cuda:
                    row.cells["mamba_ssm"] = Cell(note=mamba_note or "needs CUDA")
                else:
                    row.cells["mamba_ssm"] = measure(timer, make(mamba_fn), args.warmup, reps)
                row.cells["fla"] = Cell(note="n/a")
                rows.append(row)
                print_progress(row)
            del inputs
    return rows


def fla_ssd_inputs(inputs, h):
    """SSD as simple GLA: q = C, k = B (repeated over the heads of a group), v = dt * x, g = dt * A, scale 1."""
    import torch.nn.functional as F

    dt = F.softplus(inputs["dt"].float() + inputs["dt_bias"])
    g = inputs["B"].shape[2]
    rep = h // g
    return dict(q=inputs["C"].repeat_interleave(rep, dim=2).contiguous(),
                k=inputs["B"].repeat_interleave(rep, dim=2).contiguous(),
                v=(inputs["x"].float() * dt[..., None]).to(inputs["x"].dtype),
                g=(dt * inputs["A"]).contiguous())


def fla_call(fn):
    def call(q, k, v, g):
        try:
            return fn(q=q, k=k, v=v, g=g, scale=1.0, output_final_state=False, head_first=False)
        except TypeError:  # newer fla dropped head_first ([B, T, H, K] is the only layout)
            return fn(q=q, k=k, v=v, g=g, scale=1.0, output_final_state=False)
    return call


def bench_ssd(args, timer, device, dtype, tnote) -> list[Row]:
    rows = []
    s = torch.finfo(dtype).bits // 8
    b, h, p, g, n, q = args.batch, args.heads, args.headdim, args.groups, args.mamba2_n, args.chunk_size
    if args.no_peers:
        mamba_fn = fla_fn = None
        mamba_note = fla_note = "skipped"
    else:
        mamba_fn, mamba_note = optional_import("mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined")
        fla_fn, fla_note = optional_import("fla.ops.simple_gla.chunk_simple_gla")
    grads = ("x", "dt", "A", "B", "C", "D", "dt_bias")
    for l in args.lengths:
        inputs = mamba2_inputs(b, l, h, p, g, n, device, dtype, args.seed)
        fixed = dict(chunk_size=q, dt_softplus=True)
        for mode in ("fwd",) if args.no_backward else ("fwd", "fwd+bwd"):
            bwd = mode == "fwd+bwd"
            row = Row("ssd_scan", f"b{b} h{h} p{p} g{g} n{n} q{q}", l, mode, bytes_ssd(b, l, h, p, g, n, s, bwd))
            reps = max(3, args.repeats // 2) if bwd else args.repeats
            make = maker(bwd, inputs, grads, args.seed, **fixed)
            row.cells["seqlab triton"] = Cell(note=tnote) if tnote else \
                measure(timer, make(seqlab_op("ssd_scan", "triton")), *tri_reps(args, reps))
            row.cells["seqlab chunked"] = Cell(note="skipped") if l > args.chunked_max_len else \
                measure(timer, make(seqlab_op("ssd_scan", "chunked")), min(args.warmup, 1), max(1, reps // 4))
            if mamba_fn is None or not timer.cuda:
                row.cells["mamba_ssm"] = Cell(note=mamba_note or "needs CUDA")
            else:
                row.cells["mamba_ssm"] = measure(timer, make(mamba_fn), args.warmup, reps)
            if fla_fn is None or not timer.cuda:
                row.cells["fla"] = Cell(note=fla_note or "needs CUDA")
            else:
                try:
                    fla_in = fla_ssd_inputs(inputs, h)
                    make_fla = maker(bwd, fla_in, ("q", "k", "v", "g"), args.seed)
                    row.cells["fla"] = measure(timer, make_fla(fla_call(fla_fn)), args.warmup, reps)
                    del fla_in
                except Exception as exc:
                    row.cells["fla"] = Cell(note=short_error(exc))
            rows.append(row)
            print_progress(row)
        del inputs
    return rows


def bench_conv(args, timer, device, dtype, tnote) -> list[Row]:
    rows = []
    s = torch.finfo(dtype).bits // 8
    w, b = args.conv_width, args.batch
    # Mamba-1 convolves d_inner channels, Mamba-2 d_inner + 2 g n (x, B and C share the conv)
    widths = list(args.mamba1_d) + [args.heads * args.headdim + 2 * args.groups * args.mamba2_n]
    if args.no_peers:
        conv_fn, conv_note = None, "skipped"
    else:
        conv_fn, conv_note = optional_import("causal_conv1d.causal_conv1d_fn")
    fixed = dict(activation="silu")
    for d in dict.fromkeys(widths):
        for l in args.lengths:
            inputs = conv_inputs(b, d, l, w, device, dtype, args.seed)
            for mode in ("fwd",) if args.no_backward else ("fwd", "fwd+bwd"):
                bwd = mode == "fwd+bwd"
                row = Row("causal_conv1d", f"b{b} d{d} w{w} silu, (b,l,d) layout", l, mode,
                          bytes_conv(b, d, l, w, s, bwd))
                make = maker(bwd, inputs, ("x", "weight", "bias"), args.seed, **fixed)
                reps = max(3, args.repeats // 2) if bwd else args.repeats
                row.cells["seqlab triton"] = Cell(note=tnote) if tnote else \
                    measure(timer, make(seqlab_op("causal_conv1d", "triton")), *tri_reps(args, reps))
                row.cells["seqlab chunked"] = Cell(note="skipped") if l > args.chunked_max_len else \
                    measure(timer, make(seqlab_op("causal_conv1d", "chunked")), min(args.warmup, 1), max(1, reps // 2))
                if conv_fn is None or not timer.cuda:
                    row.cells["mamba_ssm"] = Cell(note=conv_note or "needs CUDA")
                else:
                    row.cells["mamba_ssm"] = measure(timer, make(conv_fn), args.warmup, reps)
                row.cells["fla"] = Cell(note="n/a")
                rows.append(row)
                print_progress(row)
            del inputs
    return rows


def _prefill_state(op: str, inputs: dict, fixed: dict, fallback: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The final state of a prefill over the context (auto backend), or ``fallback`` with a note."""
    try:
        with torch.no_grad():
            _, state = getattr(K, op)(**inputs, **fixed, return_final_state=True)
        return state, ""
    except Exception as exc:
        return fallback, f"random state ({type(exc).__name__} in the prefill)"


def bench_decode(args, timer, device, dtype, tnote) -> list[Row]:
    rows = []
    s = torch.finfo(dtype).bits // 8
    b = args.decode_batch
    f32 = torch.float32
    if args.no_peers:
        sel_fn = conv_fn = None
        sel_note = conv_note = "skipped"
    else:
        sel_fn, sel_note = optional_import("mamba_ssm.ops.triton.selective_state_update.selective_state_update")
        conv_fn, conv_note = optional_import("causal_conv1d.causal_conv1d_update")
    d1, n1 = max(args.mamba1_d), args.mamba1_n
    h, p, g, n2 = args.heads, args.headdim, args.groups, args.mamba2_n
    w = args.conv_width
    dconv = h * p + 2 * g * n2
    reps = args.decode_repeats
    for ctx in args.contexts:
        gen = torch.Generator(device=device).manual_seed(args.seed + ctx)
        notes = []
        # ---- Mamba-1 step
        pre = mamba1_inputs(b, d1, n1, ctx, device, dtype, args.seed)
        state1, note = _prefill_state("selective_scan", pre, dict(delta_softplus=True),
                                      torch.randn(b, d1, n1, device=device, generator=gen))
        notes.append(note)
        step1 = dict(state=state1.float(), x=rand(gen, b, d1, device=device, dtype=dtype),
                     dt=rand(gen, b, d1, device=device, dtype=dtype, scale=0.5, shift=-1.0), A=pre["A"],
                     B=rand(gen, b, n1, device=device, dtype=dtype), C=rand(gen, b, n1, device=device, dtype=dtype),
                     D=pre["D"], z=rand(gen, b, d1, device=device, dtype=dtype), dt_bias=pre["delta_bias"])
        del pre
        nbytes = 4 * 2 * b * d1 * n1 + s * (4 * b * d1 + 2 * b * n1) + 4 * (d1 * n1 + 2 * d1)
        row = Row("decode: selective_state_update", f"b{b} d{d1} n{n1}", ctx, "step", nbytes)
        row.cells["seqlab triton"] = Cell(note=tnote) if tnote else measure(
            timer, forward_fn(seqlab_op("selective_state_update", "triton"), step1, dt_softplus=True),
            *tri_reps(args, reps))
        row.cells["seqlab triton graph"] = Cell(note=tnote) if tnote else graph_measure(
            timer, forward_fn(seqlab_op("selective_state_update", "triton"), step1, dt_softplus=True),
            args.warmup, max(3, reps // 10))
        row.cells["seqlab chunked"] = measure(
            timer, forward_fn(seqlab_op("selective_state_update", "chunked"), step1, dt_softplus=True),
            args.warmup, reps)
        if sel_fn is None or not timer.cuda:
            row.cells["mamba_ssm"] = Cell(note=sel_note or "needs CUDA")
        else:
            buf = dict(step1, state=step1["state"].clone())  # mamba_ssm updates its state in place
            row.cells["mamba_ssm"] = measure(timer, forward_fn(sel_fn, buf, dt_softplus=True), args.warmup, reps)
        row.cells["fla"] = Cell(note="n/a")
        rows.append(row)
        print_progress(row)
        # ---- Mamba-2 step
        pre = mamba2_inputs(b, ctx, h, p, g, n2, device, dtype, args.seed)
        state2, note = _prefill_state("ssd_scan", pre, dict(chunk_size=args.chunk_size, dt_softplus=True),
                                      torch.randn(b, h, p, n2, device=device, generator=gen))
        notes.append(note)
        step2 = dict(state=state2.float(), x=rand(gen, b, h, p, device=device, dtype=dtype),
                     dt=rand(gen, b, h, device=device, dtype=dtype, scale=0.5), A=pre["A"],
                     B=rand(gen, b, g, n2, device=device, dtype=dtype),
                     C=rand(gen, b, g, n2, device=device, dtype=dtype),
                     D=pre["D"], dt_bias=pre["dt_bias"])
        del pre
        nbytes = 4 * 2 * b * h * p * n2 + s * (2 * b * h * p + b * h + 2 * b * g * n2) + 12 * h
        row = Row("decode: ssd_state_update", f"b{b} h{h} p{p} g{g} n{n2}", ctx, "step", nbytes)
        row.cells["seqlab triton"] = Cell(note=tnote) if tnote else measure(
            timer, forward_fn(seqlab_op("ssd_state_update", "triton"), step2, dt_softplus=True),
            *tri_reps(args, reps))
        row.cells["seqlab triton graph"] = Cell(note=tnote) if tnote else graph_measure(
            timer, forward_fn(seqlab_op("ssd_state_update", "triton"), step2, dt_softplus=True),
            args.warmup, max(3, reps // 10))
        row.cells["seqlab chunked"] = measure(
            timer, forward_fn(seqlab_op("ssd_state_update", "chunked"), step2, dt_softplus=True), args.warmup, reps)
        if sel_fn is None or not timer.cuda:
            row.cells["mamba_ssm"] = Cell(note=sel_note or "needs CUDA")
        else:
            # mamba_ssm's Mamba2.step: per-(head, p) views of dt, A, D, dt_bias (stride 0), state in place
            m2 = dict(state=step2["state"].clone(), x=step2["x"], dt=step2["dt"][..., None].expand(b, h, p),
                      A=step2["A"][:, None, None].expand(h, p, n2).to(f32), B=step2["B"], C=step2["C"],
                      D=step2["D"][:, None].expand(h, p), dt_bias=step2["dt_bias"][:, None].expand(h, p))
            row.cells["mamba_ssm"] = measure(timer, forward_fn(sel_fn, m2, dt_softplus=True), args.warmup, reps)
        row.cells["fla"] = Cell(note="n/a")
        rows.append(row)
        print_progress(row)
        # ---- conv step (the Mamba-2 conv width: x, B and C)
        pre = conv_inputs(b, dconv, ctx, w, device, dtype, args.seed)
        cstate, note = _prefill_state("causal_conv1d", pre, dict(activation="silu"),
                                      rand(gen, b, dconv, w - 1, device=device, dtype=dtype))
        notes.append(note)
        stepc = dict(x=rand(gen, b, dconv, device=device, dtype=dtype), conv_state=cstate.contiguous(),
                     weight=pre["weight"], bias=pre["bias"])
        del pre
        nbytes = 2 * s * b * dconv * (w - 1) + s * 2 * b * dconv + s * (dconv * w + dconv)
        row = Row("decode: causal_conv1d_update", f"b{b} d{dconv} w{w} silu", ctx, "step", nbytes)
        row.cells["seqlab triton"] = Cell(note=tnote) if tnote else measure(
            timer, forward_fn(seqlab_op("causal_conv1d_update", "triton"), stepc, activation="silu"),
            *tri_reps(args, reps))
        row.cells["seqlab triton graph"] = Cell(note=tnote) if tnote else graph_measure(
            timer, forward_fn(seqlab_op("causal_conv1d_update", "triton"), stepc, activation="silu"),
            args.warmup, max(3, reps // 10))
        row.cells["seqlab chunked"] = measure(
            timer, forward_fn(seqlab_op("causal_conv1d_update", "chunked"), stepc, activation="silu"),
            args.warmup, reps)
        if conv_fn is None or not timer.cuda:
            row.cells["mamba_ssm"] = Cell(note=conv_note or "needs CUDA")
        else:
            # updated in place; mamba_ssm keeps w inputs per channel (older causal-conv1d requires exactly w)
            buf = dict(stepc, conv_state=torch.cat([stepc["conv_state"][..., :1], stepc["conv_state"]], dim=-1))
            row.cells["mamba_ssm"] = measure(timer, forward_fn(conv_fn, buf, activation="silu"), args.warmup, reps)
        row.cells["fla"] = Cell(note="n/a")
        rows.append(row)
        print_progress(row)
        for text in filter(None, notes):
            print(f"  note: context {ctx}: {text}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report


def print_progress(row: Row) -> None:
    cells = ", ".join(f"{k} {v.text(row.nbytes)}" for k, v in row.cells.items())
    print(f"  {row.op} {row.shape} L={row.length} {row.mode}: {cells}", flush=True)


def print_table(rows: list[Row], copy_gbs: float) -> None:
    print()
    print("| op | shape | L | mode | min bytes | seqlab triton | % of copy BW | seqlab chunked | mamba_ssm | fla |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tri = r.cells.get("seqlab triton", Cell())
        pct = "-" if tri.ms is None else fmt_pct(100 * r.nbytes / (tri.ms * 1e-3) / 1e9 / copy_gbs)
        cells = [r.cells.get(peer, Cell(note="-")).text(r.nbytes) for peer in PEERS]
        print(f"| {r.op} | {r.shape} | {r.length} | {r.mode} | {fmt_bytes(r.nbytes)} | {cells[0]} | {pct} | "
              f"{cells[1]} | {cells[2]} | {cells[3]} |")


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
    print(f"- Mamba-1 scan forward >= {100 * COPY_TARGET:.0f}% of copy bandwidth at L >= 8k: "
          + ("; ".join(lines) if lines else "no row with L >= 8192"))
    # 2. SSD forward at least as fast as mamba_ssm's Triton SSD
    lines = []
    for r in (r for r in rows if r.op == "ssd_scan" and r.mode == "fwd"):
        tri, ref = r.cells.get("seqlab triton", Cell()), r.cells.get("mamba_ssm", Cell())
        if tri.ms is None or ref.ms is None:
            lines.append(f"L={r.length}: cannot compare ({tri.note or ref.note})")
            continue
        ratio = ref.ms / tri.ms
        lines.append(f"L={r.length}: {ratio:.2f}x mamba_ssm's speed {'PASS' if ratio >= 1 else 'MISS'}")
    print("- SSD forward at least as fast as mamba_ssm's mamba_chunk_scan_combined: "
          + ("; ".join(lines) if lines else "no SSD rows"))
    # 3. decode latency flat in context length: the device time per step (CUDA graph) when measured, and the
    # per-call time with the host's launch cost
    for cell, what in (("seqlab triton graph", "device time per step, CUDA graph"),
                       ("seqlab triton", "per call, host launch included")):
        lines = []
        for op in dict.fromkeys(r.op for r in rows if r.op.startswith("decode")):
            times = [r.cells.get(cell, Cell()).ms for r in rows if r.op == op]
            if len(times) < 2 or any(t is None for t in times):
                lines.append(f"{op.split(': ')[1]}: not measured")
                continue
            ratio = max(times) / min(times)
            lines.append(f"{op.split(': ')[1]}: {fmt_ms(min(times))}-{fmt_ms(max(times))}, max/min {ratio:.2f} "
                         f"{'PASS' if ratio <= FLAT_TARGET else 'MISS'}")
        print(f"- decode step latency flat in context length (max/min <= {FLAT_TARGET}; {what}): "
              + ("; ".join(lines) if lines else "no decode rows"))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    dtype = DTYPES[args.dtype]
    print(machine_line())
    if args.cuda:
        props = torch.cuda.get_device_properties(device)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
              f"CUDA {torch.version.cuda}" + (", --smoke shapes" if args.smoke else ""))
    else:
        interp = "on: the Triton column runs in the interpreter" if K._triton.interpreting() else \
            "off: the Triton column is skipped"
        print(f"device: NO GPU FOUND (torch.cuda.is_available() is False); running tiny shapes on the CPU with "
              f"the chunked path; TRITON_INTERPRET {interp}. These timings say nothing about GPU kernels.")
    try:
        import triton

        tver = triton.__version__
    except Exception:
        tver = "not installed"
    print(f"triton {tver}, dtype {args.dtype}, batch {args.batch}, decode batch {args.decode_batch}, "
          f"warm-up {args.warmup}, median of {args.repeats} (fwd+bwd: {max(3, args.repeats // 2)}; decode: "
          f"{args.decode_repeats}" + ("; the interpreted Triton column: 1 call, no warm-up" if args.interp else "")
          + f"), L2 flushed between calls: {args.cuda and not args.no_flush}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    timer = Timer(device, flush=not args.no_flush)
    copy_gbs = copy_bandwidth(timer, args.copy_mib, device)
    print(f"device-to-device copy bandwidth ({args.copy_mib} MiB, read + write): {copy_gbs:,.0f} GB/s", flush=True)
    tnote = triton_note(args)
    rows: list[Row] = []
    benches = {"selective_scan": bench_selective_scan, "ssd_scan": bench_ssd, "causal_conv1d": bench_conv,
               "decode": bench_decode}
    for op in args.ops:
        rows += benches[op](args, timer, device, dtype, tnote)
        if args.cuda:
            torch.cuda.empty_cache()
    print_table(rows, copy_gbs)
    print()
    print(f"Cells: median time (achieved GB/s = min bytes / time). Copy bandwidth {copy_gbs:,.0f} GB/s. "
          "min bytes: what each op must move at least (formulas in this script's docstring).")
    print_targets(rows, copy_gbs, args.smoke)


if __name__ == "__main__":
    main()
