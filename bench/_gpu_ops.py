"""The rows of ``gpu_kernels.py``: each op timed on seqlab's backends and its peers (one function per op)."""

from __future__ import annotations

import torch
from _gpu_measure import (
    Cell,
    Row,
    bytes_conv,
    bytes_mamba1,
    bytes_ssd,
    conv_inputs,
    forward_fn,
    graph_measure,
    maker,
    mamba1_inputs,
    mamba2_inputs,
    measure,
    optional_import,
    print_progress,
    rand,
    seqlab_op,
    short_error,
    tri_reps,
)

import seqlab.kernels as K

# ---------------------------------------------------------------------------------------------- the ops


def bench_selective_scan(args, timer, device, dtype, tnote) -> list[Row]:
    rows = []
    s = torch.finfo(dtype).bits // 8
    mamba_fn, mamba_note = (
        (None, "skipped")
        if args.no_peers
        else optional_import("mamba_ssm.ops.selective_scan_interface.selective_scan_fn")
    )
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
                row.cells["seqlab triton"] = (
                    Cell(note=tnote)
                    if tnote
                    else measure(timer, make(seqlab_op("selective_scan", "triton")), *tri_reps(args, reps))
                )
                if not bwd and not tnote:
                    # the Triton forwards one by one (walk: the default; tile: the one it replaced)
                    for kernel in args.scan_forwards:
                        row.cells[f"seqlab triton {kernel}"] = measure(
                            timer, make(scan_forward(kernel, args)), *tri_reps(args, reps)
                        )
                row.cells["seqlab chunked"] = (
                    Cell(note="skipped")
                    if l > args.chunked_max_len
                    else measure(
                        timer, make(seqlab_op("selective_scan", "chunked")), min(args.warmup, 1), max(1, reps // 4)
                    )
                )
                if mamba_fn is None or not timer.cuda:
                    row.cells["mamba_ssm"] = Cell(note=mamba_note or "needs CUDA")
                else:
                    row.cells["mamba_ssm"] = measure(timer, make(mamba_fn), args.warmup, reps)
                row.cells["fla"] = Cell(note="n/a")
                rows.append(row)
                print_progress(row)
            del inputs
    return rows


def scan_forward(kernel: str, args):
    """selective_scan_triton with one forward kernel (``--scan-forwards``); the walk with ``--walk-block-d`` /
    ``--walk-chunk`` when given (None: the kernel's own tiling)."""
    from seqlab.kernels.scan.triton_ops import selective_scan_triton

    tiling = dict(block_d=args.walk_block_d, walk_chunk=args.walk_chunk) if kernel == "walk" else {}

    def call(**kw):
        return selective_scan_triton(**kw, fwd_kernel=kernel, **tiling)

    return call


def fla_ssd_inputs(inputs, h):
    """SSD as simple GLA: q = C, k = B (repeated over the heads of a group), v = dt * x, g = dt * A, scale 1."""
    import torch.nn.functional as F

    dt = F.softplus(inputs["dt"].float() + inputs["dt_bias"])
    g = inputs["B"].shape[2]
    rep = h // g
    return dict(
        q=inputs["C"].repeat_interleave(rep, dim=2).contiguous(),
        k=inputs["B"].repeat_interleave(rep, dim=2).contiguous(),
        v=(inputs["x"].float() * dt[..., None]).to(inputs["x"].dtype),
        g=(dt * inputs["A"]).contiguous(),
    )


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
            row.cells["seqlab triton"] = (
                Cell(note=tnote)
                if tnote
                else measure(timer, make(seqlab_op("ssd_scan", "triton")), *tri_reps(args, reps))
            )
            row.cells["seqlab chunked"] = (
                Cell(note="skipped")
                if l > args.chunked_max_len
                else measure(timer, make(seqlab_op("ssd_scan", "chunked")), min(args.warmup, 1), max(1, reps // 4))
            )
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
                row = Row(
                    "causal_conv1d", f"b{b} d{d} w{w} silu, (b,l,d) layout", l, mode, bytes_conv(b, d, l, w, s, bwd)
                )
                make = maker(bwd, inputs, ("x", "weight", "bias"), args.seed, **fixed)
                reps = max(3, args.repeats // 2) if bwd else args.repeats
                row.cells["seqlab triton"] = (
                    Cell(note=tnote)
                    if tnote
                    else measure(timer, make(seqlab_op("causal_conv1d", "triton")), *tri_reps(args, reps))
                )
                row.cells["seqlab chunked"] = (
                    Cell(note="skipped")
                    if l > args.chunked_max_len
                    else measure(
                        timer, make(seqlab_op("causal_conv1d", "chunked")), min(args.warmup, 1), max(1, reps // 2)
                    )
                )
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
        state1, note = _prefill_state(
            "selective_scan", pre, dict(delta_softplus=True), torch.randn(b, d1, n1, device=device, generator=gen)
        )
        notes.append(note)
        step1 = dict(
            state=state1.float(),
            x=rand(gen, b, d1, device=device, dtype=dtype),
            dt=rand(gen, b, d1, device=device, dtype=dtype, scale=0.5, shift=-1.0),
            A=pre["A"],
            B=rand(gen, b, n1, device=device, dtype=dtype),
            C=rand(gen, b, n1, device=device, dtype=dtype),
            D=pre["D"],
            z=rand(gen, b, d1, device=device, dtype=dtype),
            dt_bias=pre["delta_bias"],
        )
        del pre
        nbytes = 4 * 2 * b * d1 * n1 + s * (4 * b * d1 + 2 * b * n1) + 4 * (d1 * n1 + 2 * d1)
        row = Row("decode: selective_state_update", f"b{b} d{d1} n{n1}", ctx, "step", nbytes)
        row.cells["seqlab triton"] = (
            Cell(note=tnote)
            if tnote
            else measure(
                timer,
                forward_fn(seqlab_op("selective_state_update", "triton"), step1, dt_softplus=True),
                *tri_reps(args, reps),
            )
        )
        row.cells["seqlab triton graph"] = (
            Cell(note=tnote)
            if tnote
            else graph_measure(
                timer,
                forward_fn(seqlab_op("selective_state_update", "triton"), step1, dt_softplus=True),
                args.warmup,
                max(3, reps // 10),
            )
        )
        row.cells["seqlab chunked"] = measure(
            timer,
            forward_fn(seqlab_op("selective_state_update", "chunked"), step1, dt_softplus=True),
            args.warmup,
            reps,
        )
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
        state2, note = _prefill_state(
            "ssd_scan",
            pre,
            dict(chunk_size=args.chunk_size, dt_softplus=True),
            torch.randn(b, h, p, n2, device=device, generator=gen),
        )
        notes.append(note)
        step2 = dict(
            state=state2.float(),
            x=rand(gen, b, h, p, device=device, dtype=dtype),
            dt=rand(gen, b, h, device=device, dtype=dtype, scale=0.5),
            A=pre["A"],
            B=rand(gen, b, g, n2, device=device, dtype=dtype),
            C=rand(gen, b, g, n2, device=device, dtype=dtype),
            D=pre["D"],
            dt_bias=pre["dt_bias"],
        )
        del pre
        nbytes = 4 * 2 * b * h * p * n2 + s * (2 * b * h * p + b * h + 2 * b * g * n2) + 12 * h
        row = Row("decode: ssd_state_update", f"b{b} h{h} p{p} g{g} n{n2}", ctx, "step", nbytes)
        row.cells["seqlab triton"] = (
            Cell(note=tnote)
            if tnote
            else measure(
                timer,
                forward_fn(seqlab_op("ssd_state_update", "triton"), step2, dt_softplus=True),
                *tri_reps(args, reps),
            )
        )
        row.cells["seqlab triton graph"] = (
            Cell(note=tnote)
            if tnote
            else graph_measure(
                timer,
                forward_fn(seqlab_op("ssd_state_update", "triton"), step2, dt_softplus=True),
                args.warmup,
                max(3, reps // 10),
            )
        )
        row.cells["seqlab chunked"] = measure(
            timer, forward_fn(seqlab_op("ssd_state_update", "chunked"), step2, dt_softplus=True), args.warmup, reps
        )
        if sel_fn is None or not timer.cuda:
            row.cells["mamba_ssm"] = Cell(note=sel_note or "needs CUDA")
        else:
            # mamba_ssm's Mamba2.step: per-(head, p) views of dt, A, D, dt_bias (stride 0), state in place
            m2 = dict(
                state=step2["state"].clone(),
                x=step2["x"],
                dt=step2["dt"][..., None].expand(b, h, p),
                A=step2["A"][:, None, None].expand(h, p, n2).to(f32),
                B=step2["B"],
                C=step2["C"],
                D=step2["D"][:, None].expand(h, p),
                dt_bias=step2["dt_bias"][:, None].expand(h, p),
            )
            row.cells["mamba_ssm"] = measure(timer, forward_fn(sel_fn, m2, dt_softplus=True), args.warmup, reps)
        row.cells["fla"] = Cell(note="n/a")
        rows.append(row)
        print_progress(row)
        # ---- conv step (the Mamba-2 conv width: x, B and C)
        pre = conv_inputs(b, dconv, ctx, w, device, dtype, args.seed)
        cstate, note = _prefill_state(
            "causal_conv1d", pre, dict(activation="silu"), rand(gen, b, dconv, w - 1, device=device, dtype=dtype)
        )
        notes.append(note)
        stepc = dict(
            x=rand(gen, b, dconv, device=device, dtype=dtype),
            conv_state=cstate.contiguous(),
            weight=pre["weight"],
            bias=pre["bias"],
        )
        del pre
        nbytes = 2 * s * b * dconv * (w - 1) + s * 2 * b * dconv + s * (dconv * w + dconv)
        row = Row("decode: causal_conv1d_update", f"b{b} d{dconv} w{w} silu", ctx, "step", nbytes)
        row.cells["seqlab triton"] = (
            Cell(note=tnote)
            if tnote
            else measure(
                timer,
                forward_fn(seqlab_op("causal_conv1d_update", "triton"), stepc, activation="silu"),
                *tri_reps(args, reps),
            )
        )
        row.cells["seqlab triton graph"] = (
            Cell(note=tnote)
            if tnote
            else graph_measure(
                timer,
                forward_fn(seqlab_op("causal_conv1d_update", "triton"), stepc, activation="silu"),
                args.warmup,
                max(3, reps // 10),
            )
        )
        row.cells["seqlab chunked"] = measure(
            timer, forward_fn(seqlab_op("causal_conv1d_update", "chunked"), stepc, activation="silu"), args.warmup, reps
        )
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
