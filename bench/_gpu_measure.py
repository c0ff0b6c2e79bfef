"""Timing, result cells, peers' imports, inputs and minimum byte counts of ``gpu_kernels.py``."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import seqlab.kernels as K

# ---------------------------------------------------------------------------------------------- timing


class Timer:
    """Median time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, flush: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush_buf = (
            torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device) if flush and self.cuda else None
        )

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
    leaves = {
        k: (v.detach().clone().requires_grad_() if k in grad_names and v is not None else v) for k, v in inputs.items()
    }
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
    return dict(
        u=rand(gen, b, d, l, device=device, dtype=dtype),
        delta=rand(gen, b, d, l, device=device, dtype=dtype, scale=0.5, shift=-1.0),
        A=-torch.exp(rand(gen, d, n, device=device, dtype=f32, scale=0.5)),
        B=rand(gen, b, n, l, device=device, dtype=dtype),
        C=rand(gen, b, n, l, device=device, dtype=dtype),
        D=rand(gen, d, device=device, dtype=f32),
        z=rand(gen, b, d, l, device=device, dtype=dtype),
        delta_bias=rand(gen, d, device=device, dtype=f32, scale=0.1),
    )


def mamba2_inputs(b, l, h, p, g, n, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = torch.float32
    dt_bias = torch.log(
        torch.expm1(
            torch.exp(torch.rand(h, generator=gen, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        )
    )
    return dict(
        x=rand(gen, b, l, h, p, device=device, dtype=dtype),
        dt=rand(gen, b, l, h, device=device, dtype=dtype, scale=0.5),
        A=-torch.empty(h, device=device).uniform_(1, 16, generator=gen),
        B=rand(gen, b, l, g, n, device=device, dtype=dtype),
        C=rand(gen, b, l, g, n, device=device, dtype=dtype),
        D=rand(gen, h, device=device, dtype=f32),
        dt_bias=dt_bias.to(f32),
    )


def conv_inputs(b, d, l, w, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    # position-major (the transpose of a contiguous (b, l, d)), as a Mamba mixer hands it to the conv
    x = rand(gen, b, l, d, device=device, dtype=dtype).transpose(1, 2)
    return dict(
        x=x,
        weight=rand(gen, d, w, device=device, dtype=dtype, scale=0.5),
        bias=rand(gen, d, device=device, dtype=dtype, scale=0.1),
    )


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


def print_progress(row: Row) -> None:
    cells = ", ".join(f"{k} {v.text(row.nbytes)}" for k, v in row.cells.items())
    print(f"  {row.op} {row.shape} L={row.length} {row.mode}: {cells}", flush=True)
