"""``seqlab distill``: distil an attention teacher into a Mamba-2 hybrid (``seqlab distill --help``; docs/distill.md).

Parses and checks the flags, reads the data with the library (``seqlab.domains.training_data.files_data`` or
``seqlab.pipelines.train_data.store_data``), calls ``seqlab.distill.distill`` and prints its summary. With
``--ray-workers N`` every stage runs on N Ray Train workers (``seqlab.pipelines.ray_train.train_data_parallel``).
"""

from __future__ import annotations

import argparse
import json
import sys

from seqlab.cli._args import (
    TRAIN_TYPES,
    add_adapter,
    add_device,
    add_json,
    add_quiet,
    add_sequences,
    add_threads,
    count,
    eval_fraction,
    flag,
    number,
)

_STEPS = count(0)
_WEIGHT = number(0, 1000)
_KD_TEMPERATURE = number(0.01, 100)
_DECAY = number(0, 1, low_open=True)


def parse_replace(text: str):
    """``0.5`` or ``1.0`` (a fraction of the attention layers: has a point) or ``3`` / ``1,3,5`` (layer indices)."""
    text = str(text).strip()
    bad = f"must be a fraction in (0, 1] like 0.5 or layer indices like 1,3,5, got {text!r}"
    if "." not in text:
        parts = [part.strip() for part in text.split(",")]
        if not parts or not all(part.isdigit() for part in parts):
            raise argparse.ArgumentTypeError(bad)
        return [int(part) for part in parts]
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(bad) from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(bad)
    return value


def _distill(args) -> int:
    from seqlab.cli import require
    from seqlab.distill import distill
    from seqlab.distill.run import read_plan
    from seqlab.distill.teacher import load_teacher
    from seqlab.errors import ConfigError
    from seqlab.runs import resolve_device

    require(args, "teacher", "out")
    if args.replace is not None:
        try:
            args.replace = parse_replace(args.replace)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--replace: {exc}") from None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    teacher = load_teacher(args.teacher, device=device)
    recorded = (read_plan(args.out) or {}) if args.resume else {}  # a resumed run keeps what is left out
    batch_size = args.batch_size or recorded.get("batch_size") or 8
    window = args.window or recorded.get("window") or 256
    adapter = args.adapter or (getattr(teacher, "adapter_info", None) or {}).get("name") or "bytes"
    if args.store:
        from seqlab.pipelines.train_data import store_data

        spec = {"store": args.store, "sequences": args.sequences, "eval_sequences": args.eval_sequences}
        data, _ = store_data({**spec, "domain": args.adapter}, batch_size, window)
    elif args.files:
        from seqlab.domains.training_data import files_data

        spec = {"files": args.files, "domain": adapter, "eval": args.eval or [], "eval_fraction": args.eval_fraction}
        data = files_data(spec, batch_size, window, not args.quiet)
    else:
        raise ConfigError("no training data: give FILE... or --store S.zarr")
    vocab = getattr(data.adapter, "vocab_size", None)
    if vocab is not None and vocab > teacher.vocab_size:
        raise ConfigError(f"the {data.adapter.name} adapter has {vocab} tokens, the teacher {teacher.vocab_size}")
    if getattr(teacher, "adapter_info", None) is None:  # an HF teacher: the student records its data's encoding,
        teacher.adapter_info = data.adapter.info()  # so seqlab eval/generate can use the student file
    options = {
        name: getattr(args, name)
        for name in ("lr", "seed", "checkpoint_every", "grad_accum", "weight_decay", "warmup")
        if getattr(args, name, None) is not None
    }
    if "warmup" in options:
        options["warmup_steps"] = options.pop("warmup")
    options.update(batch_size=batch_size, window=window)
    data_parallel = None
    if args.ray_workers:
        from seqlab.pipelines.ray_train import train_data_parallel

        data_parallel = train_data_parallel

    def say(message: str) -> None:
        if not args.quiet:
            print(f"seqlab distill: {message}", file=sys.stderr)

    summary = distill(
        teacher,
        data.train,
        args.out,
        replace=args.replace,
        stages=args.stages,
        steps=args.steps,
        e2e_steps=args.e2e_steps,
        init=args.init,
        decay=args.decay,
        freeze_mlp=args.freeze_mlp,
        eval_data=data.eval_source,
        train_options=options,
        temperature=args.kd_temperature or 1.0,
        kl_weight=1.0 if args.kl_weight is None else args.kl_weight,
        ce_weight=0.0 if args.ce_weight is None else args.ce_weight,
        resume=bool(args.resume),
        overwrite=bool(args.overwrite),
        ray_workers=args.ray_workers or 0,
        data_parallel=data_parallel,
        ray_options={"quiet": True} if args.ray_workers else None,
        progress=not args.quiet,
        notify=say,
        teacher_source=str(args.teacher),
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    for stage in summary["stages"]:
        first, last = stage["first_loss"], stage["last_loss"]
        shown = "-" if first is None else f"{first:.4g} -> {last:.4g}"
        print(
            f"stage {stage['name']:8s} {stage['mode']:5s} layers {stage['layers']}: loss {shown} {stage['loss_unit']}"
        )
    if "eval_kl" in summary:
        print(
            f"held-out: KL(teacher || student) {summary['eval_kl']:.4f} nats/token, student "
            f"{summary['eval_bits_per_token']:.4f} bits/token, teacher {summary['teacher_bits_per_token']:.4f}"
        )
    print(f"student: {summary['student']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "distill",
        help="distil an attention model into a Mamba-2 hybrid (Mamba in the Llama)",
        description="Replace attention layers of a teacher (a seqlab model file or run folder, or a local HF "
        "Llama directory) by Mamba-2 layers initialised from the attention weights (V->x, K->B, Q->C, O->out), "
        "align them layer by layer in progressive stages (MSE to the teacher's attention output), then train "
        "the student end to end on KL(teacher || student) + CE. Checkpoints per stage in --out; --resume "
        "continues. See docs/distill.md.",
        epilog="example: seqlab distill notes.txt --teacher runs/llama/model.safetensors --replace 0.5 "
        "--stages 2 --steps 200 --out runs/student",
    )
    d.add_argument("files", nargs="*", help="training files (encoded by the teacher's adapter)")
    data = d.add_argument_group("data")
    add_adapter(data, "adapter for FILE... (default: the teacher's, else bytes)")
    data.add_argument("--eval", nargs="+", metavar="FILE", help="held-out files (put this after the training files)")
    data.add_argument("--eval-fraction", type=eval_fraction, metavar="F", help="hold out the last F of the data")
    data.add_argument("--store", metavar="S.zarr", help="distil on a sequence store (written by seqlab ingest)")
    add_sequences(data, "stored sequences to train on (default: all complete ones but the --eval-sequences)")
    data.add_argument("--eval-sequences", nargs="+", metavar="NAME", help="stored sequences held out for eval")
    run = d.add_argument_group("distillation")
    run.add_argument("--teacher", metavar="MODEL", help="teacher: model file, run folder or HF directory (required)")
    run.add_argument(
        "--replace",
        metavar="F|I,J,..",
        help="attention layers to replace: a fraction (default 0.5, spread over the stack) or indices 1,3,5",
    )
    run.add_argument("--stages", type=count(1, 1024), help="progressive alignment stages (default 3)")
    run.add_argument("--steps", type=_STEPS, help="steps per alignment stage (default 100; 0: none)")
    run.add_argument("--e2e-steps", type=_STEPS, help="steps of the end-to-end stage (default --steps; 0: none)")
    run.add_argument("--init", choices=("attention", "random"), help="replaced layers' start (default attention)")
    run.add_argument(
        "--decay", type=_DECAY, help="mapped layers' per-step state decay exp(dt*A) (default 0.9; see docs)"
    )
    run.add_argument("--freeze-mlp", action="store_true", default=None, help="keep the feed-forwards frozen")
    run.add_argument("--kd-temperature", type=_KD_TEMPERATURE, help="softmax temperature of the KL (default 1)")
    run.add_argument("--kl-weight", type=_WEIGHT, help="weight of KL(teacher || student) (default 1)")
    run.add_argument("--ce-weight", type=_WEIGHT, help="weight of the next-token cross-entropy (default 0)")
    run.add_argument("--out", metavar="DIR", help="output folder (required)")
    run.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --out (flags left out keep the run's settings)",
    )
    run.add_argument("--overwrite", action="store_true", default=None, help="replace the run in --out")
    run.add_argument("--ray-workers", type=count(0, 1024), help="run each stage on N Ray Train workers")
    opt = d.add_argument_group("training")
    for name in ("batch_size", "window", "lr", "warmup", "weight_decay", "grad_accum", "checkpoint_every", "seed"):
        opt.add_argument(flag(name), type=TRAIN_TYPES[name], default=None)
    add_device(run)
    add_threads(run)
    add_quiet(run)
    add_json(run, "print the summary as one JSON object")
    d.set_defaults(func=_distill)
