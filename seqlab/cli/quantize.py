"""``seqlab quantize``: AQLM-quantize a trained model on calibration files or a store, write a quantized model file
(``seqlab quantize --help``; docs/quantization.md).

Reads the model (``model_from_checkpoint``), draws calibration windows with the library
(``seqlab.pipelines.calibration.calibration_windows``: files encoded by the model's adapter, or stored sequences
written by that adapter), with ``--densify`` turns a LASER'd model's low-rank layers back into dense ones
(``seqlab.posttrain.laser.densify``; without it such a model is refused), quantizes in place
(``seqlab.quant.quantize_model``), optionally fine-tunes against the full-precision model
(``seqlab.quant.finetune.finetune_quantized``), and writes ``--out`` with ``seqlab.checkpoint.save_model``
(atomic: a failure leaves whatever was there). ``--out`` may never be the source
model file; an existing ``--out`` is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from seqlab.cli._args import (
    add_device,
    add_json,
    add_quiet,
    add_seed,
    add_sequences,
    add_threads,
    aqlm_config,
    count,
    number,
)


def _check_out(model_path: str, out: str, overwrite: bool) -> None:
    """Refuse an --out that is the source model file (or the checkpoint folder's model), or that exists without
    --overwrite."""
    from seqlab.domains.registry import _model_file
    from seqlab.errors import ConfigError

    source = _model_file(model_path)
    if os.path.isdir(out):
        raise ConfigError(f"quantize --out {out}: is a folder; give the quantized model file's path")
    if os.path.exists(out):
        if os.path.exists(source) and os.path.samefile(out, source):
            raise ConfigError(f"quantize --out {out}: is the source model file; write the quantized model elsewhere")
        if not overwrite:
            raise ConfigError(f"quantize --out {out}: exists; pass --overwrite to replace it")


def _quantize(args) -> int:
    import torch

    from seqlab.cli import require
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.errors import ConfigError, InputError
    from seqlab.pipelines.calibration import calibration_windows
    from seqlab.quant import quantize_model

    require(args, "model", "out")
    if bool(args.files) == bool(args.store):
        raise ConfigError("quantize: give the calibration data as FILE... or as --store S.zarr (one of them)")
    if not os.path.exists(args.model):
        raise InputError(f"{args.model}: no such model file or checkpoint folder")
    _check_out(args.model, args.out, args.overwrite)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, adapter = model_from_checkpoint(args.model, device=args.device)
    if getattr(model, "quantization", None):
        raise ConfigError(f"quantize: {args.model} is already quantized; start from the full-precision model")
    densified = sorted(getattr(model, "low_rank", None) or {})
    if densified:  # a LASER'd model: AQLM quantizes dense layers only
        if not args.densify:
            raise ConfigError(
                f"quantize: {args.model} has {len(densified)} low-rank (LASER) layer(s), which AQLM does not quantize; "
                "pass --densify to turn them back into dense layers first (seqlab.posttrain.laser.densify): that "
                "keeps LASER's weights (its quality) but not its parameter saving, since AQLM stores every weight "
                "at 2-3 bits"
            )
        from seqlab.posttrain.laser import densify

        densify(model)
    windows = calibration_windows(
        model,
        adapter,
        files=args.files or None,
        store=args.store,
        sequences=args.sequences,
        count=args.calib_windows,
        window=args.window,
        seed=args.seed,
    )
    device = next(model.parameters()).device
    windows = [w.to(device) for w in windows]
    teacher = None
    if args.fine_tune_steps:
        import copy

        teacher = copy.deepcopy(model).eval()
    from tqdm.auto import tqdm

    bar = tqdm(desc="quantize", unit="layer", disable=args.quiet, file=sys.stderr)

    def progress(name: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(name.removeprefix("backbone."), refresh=False)
        bar.update(done - bar.n)

    options = {k: v for k, v in (("max_rounds", args.max_rounds), ("beam_size", args.beam_size)) if v is not None}
    try:
        report = quantize_model(
            model,
            windows,
            args.aqlm,
            head=args.head,
            seed=args.seed,
            full_precision_bits=args.full_precision_bits,
            aqlm_options=options,
            progress=progress,
        )
    finally:
        bar.close()
    quantized_at = time.perf_counter()
    tune = None
    if teacher is not None:
        from seqlab.quant.finetune import finetune_quantized

        tune = finetune_quantized(model, teacher, windows, steps=args.fine_tune_steps, lr=args.fine_tune_lr)
        del teacher
    path = args.out
    from seqlab.checkpoint import save_model

    save_model(path, model, extra={"quantized_from": os.path.basename(os.fspath(args.model))})
    summary = {
        "model": os.fspath(args.model),
        "out": os.fspath(path),
        "config": report.setting,
        "calibration_windows": len(windows),
        "window": args.window,
        "bits_per_parameter": report.bits_per_parameter(),
        "quantized_layers": sum(r.skipped is None for r in report.layers),
        "full_precision_layers": [r.name for r in report.layers if r.skipped is not None],
        "file_bytes": os.path.getsize(path),
        "source_bytes": os.path.getsize(_source_file(args.model)),
        "seconds": round(quantized_at - started, 3),
        "densified": densified,
        "fine_tune": None
        if tune is None
        else {"steps": tune.steps, "kl_before": tune.kl_before, "kl_after": tune.kl_after},
        "layers": [
            {"name": r.name, "shape": list(r.shape), "bits": r.bits, "error": r.error, "skipped": r.skipped}
            for r in report.layers
        ],
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(report.table())
    ratio = summary["file_bytes"] / summary["source_bytes"]
    print(
        f"wrote {path}: {summary['file_bytes']:,} bytes ({ratio:.3f} of {args.model}'s {summary['source_bytes']:,}); "
        f"AQLM {report.setting} at {report.bits_per_parameter():.3f} bits per quantized parameter; "
        f"{len(windows)} calibration windows of {args.window}; {summary['seconds']:.1f} s"
    )
    if densified:
        print(f"densified {len(densified)} low-rank (LASER) layer(s) before quantizing: {', '.join(densified)}")
    if tune is not None:
        print(f"fine-tune: {tune.steps} steps, KL(fp || quantized) {tune.kl_before:.4g} -> {tune.kl_after:.4g}")
    return 0


def _source_file(model_path: str) -> str:
    from seqlab.domains.registry import _model_file

    return _model_file(model_path)


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "quantize",
        help="AQLM-quantize a trained model (2-3 bits per weight) on calibration data",
        description="Quantize every linear layer of a trained model with AQLM (additive multi-codebook "
        "quantization), calibrated on files (encoded by the model's adapter) or stored sequences, and write a "
        "quantized model file: packed codes, fp16 codebooks and scales. The file loads like any model "
        "(seqlab generate/eval --model OUT). Layers whose input width the group size does not divide stay in "
        "full precision. See docs/quantization.md.",
        epilog="example: seqlab quantize notes.txt --model runs/notes/model.safetensors --aqlm 2x8g8 "
        "--out runs/notes/model-2x8g8.safetensors",
    )
    q.add_argument("files", nargs="*", help="calibration files (encoded by the model's adapter)")
    q.add_argument("--model", metavar="FILE", help="model file or training checkpoint folder to quantize (required)")
    q.add_argument("--out", metavar="FILE", help="the quantized model file to write (required; never the source)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    data = q.add_argument_group("calibration")
    data.add_argument("--store", metavar="S.zarr", help="calibrate on a sequence store (written by seqlab ingest)")
    add_sequences(data, "stored sequences to calibrate on (default: all complete ones)")
    data.add_argument("--calib-windows", type=count(1, 1 << 20), default=64, help="windows drawn (default 64)")
    data.add_argument("--window", type=count(1), default=256, help="elements per window (default 256)")
    add_seed(data, text="seed of the window draw and of the quantizer (default 0)")
    aq = q.add_argument_group("AQLM")
    aq.add_argument(
        "--aqlm",
        metavar="MxBgG",
        type=aqlm_config,
        default="2x8g8",
        help="MxBgG: M codebooks of 2^B codewords over groups of G weights, per-row scales (default 2x8g8; 1x16g8, "
        "2x6g8, ...); MxBgG-noscale: without scales",
    )
    aq.add_argument(
        "--full-precision-bits",
        type=count(16, 32),
        choices=(16, 32),
        default=16,
        help="storage of everything not quantized: norms, SSM parameters, embedding (default 16)",
    )
    aq.add_argument("--head", action="store_true", help="quantize the LM head too (a tied embedding stays fp16)")
    aq.add_argument(
        "--densify",
        action="store_true",
        help="quantize a LASER'd model: turn its low-rank layers back into dense ones first (LASER's weights are "
        "kept, its parameter saving is not; a model without low-rank layers is unaffected)",
    )
    aq.add_argument("--max-rounds", type=count(1, 1000), help="alternating rounds of code search and codebook update")
    aq.add_argument("--beam-size", type=count(1, 1024), help="code search beam (default the quantizer's)")
    aq.add_argument("--fine-tune-steps", type=count(0), default=0, help="KL fine-tune steps after (default 0)")
    aq.add_argument(
        "--fine-tune-lr", type=number(0, 1, low_open=True), default=1e-4, help="fine-tune learning rate (default 1e-4)"
    )
    add_device(q)
    add_threads(q)
    add_quiet(q)
    add_json(q, "print the summary as one JSON object")
    q.set_defaults(func=_quantize)
