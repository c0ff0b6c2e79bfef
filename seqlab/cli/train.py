"""``seqlab train`` and ``seqlab eval``: train a model for a domain adapter from files or a sequence store, and
measure a trained model's held-out metric (``seqlab train --help``, ``seqlab eval --help``).

``seqlab train`` writes a run directory into ``--out DIR`` (checkpoints, ``train.jsonl``, ``run.json``, the final
``model.safetensors``; seqlab.runs). The data comes from files (seqlab.domains.training_data: encoded in memory, or
memory-mapped where the adapter can) or from a store (seqlab.pipelines.train_data: ``StoreSource`` reads only the
chunks each window touches). The loss is printed in the adapter's ``loss_unit`` (bits per element, like the
held-out metric, or a video adapter's mean squared error).

``seqlab eval`` streams every input through the model in windows with the state carried (equal to one pass
over the whole input, in constant memory) and prints the adapter's metric per input and in total.

This module parses and checks the flags, shows progress and prints; the work is the library's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from seqlab.cli._args import (
    MODEL_TYPES,
    MOE_TYPES,
    TRAIN_TYPES,
    add_adapter,
    add_device,
    add_json,
    add_model,
    add_quiet,
    add_sequences,
    add_threads,
    add_window,
    count,
    eval_fraction,
    flag,
    subword_vocab,
    threads,
)

#: what each kind of setting must be when it comes from a --config TOML file (argparse never converts those)
_TRAIN_CHECKS = {
    "numbers": {
        **TRAIN_TYPES,
        **MODEL_TYPES,
        **MOE_TYPES,
        "eval_fraction": eval_fraction,
        "threads": threads,
        "subword_vocab": subword_vocab,
    },
    "flags": ("resume", "overwrite", "quiet", "json", "bf16", "carry_state", "pack"),
    "lists": ("files", "eval", "sequences", "eval_sequences"),
    "texts": ("out", "adapter", "store", "device"),
}
_EVAL_CHECKS = {
    "numbers": {"window": count(1), "threads": threads},
    "flags": ("quiet", "json"),
    "lists": ("files", "sequences"),
    "texts": ("model", "store", "device"),
}


def _check_args(args, checks: dict) -> None:
    """Settings from a --config TOML file reach ``args`` without argparse's types (a TOML number or list is never
    converted): check each one as its flag would be, so that a bad value is refused naming the flag."""
    from seqlab.errors import ConfigError

    for name, parse in checks["numbers"].items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{flag(name)} must be a number, got {value!r}")
        try:
            setattr(args, name, parse(str(value)))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{flag(name)}: {exc}") from None
    for name in checks["flags"]:
        value = getattr(args, name, None)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{flag(name)} must be true or false, got {value!r}")
    for name in checks["lists"]:
        value = getattr(args, name, None)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{flag(name) if name != 'files' else 'FILE...'} must be a list of names, got {value!r}")
    for name in checks["texts"]:
        value = getattr(args, name, None)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{flag(name)} must be a string, got {value!r}")


def _torch_threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


def _train(args) -> int:
    from seqlab.cli import require
    from seqlab.pipelines.training import train_run
    from seqlab.runs import MODEL_OPTIONS, MOE_OPTIONS, TRAIN_OPTIONS

    require(args, "out")
    _check_args(args, _TRAIN_CHECKS)
    _pack_settings(args)
    _torch_threads(args)
    options = {name: getattr(args, name) for name in (*MODEL_OPTIONS, *MOE_OPTIONS, *TRAIN_OPTIONS)}
    options["pack"] = args.pack

    def say(message: str) -> None:
        print(f"seqlab train: {message}", file=sys.stderr)

    summary = train_run(
        args.out,
        files=args.files,
        adapter=args.adapter,
        adapter_settings=_adapter_settings(args),
        eval_files=args.eval,
        eval_fraction=args.eval_fraction,
        store=args.store,
        sequences=args.sequences,
        eval_sequences=args.eval_sequences,
        options=options,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
        notify=say,
        on_start=None if args.quiet else lambda model: say(_model_line(model)),
    )
    _print_train_summary(summary, args.json)
    return 0


def _pack_settings(args) -> None:
    """--pack trains rows that each start from a fresh state: --carry-state is refused with it, and off unless
    given."""
    from seqlab.errors import ConfigError

    if not args.pack:
        return
    if args.carry_state:
        raise ConfigError(
            "--pack packs documents into rows that each start from a fresh state: it cannot go with --carry-state"
        )
    args.carry_state = False


def _adapter_settings(args):
    """--adapter-settings, with --subword-vocab N as the subword adapter's ``vocab_size``."""
    from seqlab.errors import ConfigError

    if getattr(args, "subword_vocab", None) is None:
        return args.adapter_settings
    if args.adapter != "subword":
        raise ConfigError(
            f"--subword-vocab goes with --adapter subword (the byte-level BPE learned on the training data), "
            f"got --adapter {args.adapter!r}"
        )
    settings = args.adapter_settings or {}
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except ValueError as exc:
            raise ConfigError(
                f"--adapter-settings must be a JSON object, got {args.adapter_settings!r} ({exc})"
            ) from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--adapter-settings must be a JSON object, got {args.adapter_settings!r}")
    return {**settings, "vocab_size": args.subword_vocab}


def parameters_text(counts: dict) -> str:
    """``1,234 (dense: all active)``, or ``5,678 total, 1,234 active per token`` (an MoE model)."""
    total, active = counts["total"], counts["active"]
    if total == active:
        return f"{total:,} (dense: all active)"
    return f"{total:,} total, {active:,} active per token"


def moe_text(moe: dict, n_layer: int) -> str:
    """``4 experts, top-1, d_expert 128, every layer`` (an MoE summary of seqlab.models.model_summary)."""
    layers = moe["layers"]
    where = "every layer" if len(layers) == n_layer else f"layers {', '.join(map(str, layers))}"
    return f"{moe['experts']} experts, top-{moe['top_k']}, d_expert {moe['d_expert']}, {where}"


def _model_line(model: dict) -> str:
    """The line printed when training starts: what trains, and its total and active parameters."""
    config = model.get("config") or {}
    shape = f"{config.get('ssm')}, d_model {config.get('d_model')}, n_layer {config.get('n_layer')}"
    if model.get("moe"):
        shape += f", MoE ({moe_text(model['moe'], config.get('n_layer', 0))})"
    start = f" from step {model['step']}" if model.get("resumed") else ""
    return f"training {model['class']} ({shape}){start}, parameters {parameters_text(model['parameters'])}"


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _print_train_summary(s: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(s))
        return
    rate = s["steps_this_run"] and s["seconds"] > 0
    print(
        f"steps       {s['steps']} ({s['steps_this_run']} in this run"
        + (f", {s['seconds']:.1f} s" if rate else "")
        + ")"
    )
    print(f"train loss  {_fmt(s['train_loss'])} {s['loss_unit']} (last step)")
    baseline = s["uniform_baseline"]
    base = f" (uniform baseline {_fmt(baseline)})" if baseline is not None else ""
    if "held_out" in s:
        print(f"held-out    {_fmt(s['held_out'])} {s['metric_name']} over {s['held_out_targets']} targets{base}")
    else:
        print(f"held-out    - (no held-out data: give --eval FILE, --eval-fraction or --eval-sequences){base}")
    if s.get("packing"):
        from seqlab.packing import efficiency_text

        print(f"packing     {efficiency_text(s['packing']).removeprefix('packing ')}")
    if "parameters" in s:
        print(f"parameters  {parameters_text(s['parameters'])}")
    print(f"model       {s['model']}")


# ------------------------------------------------------------------------------------------------------
# seqlab eval


def _eval(args) -> int:
    from seqlab.cli import require
    from seqlab.pipelines.training import evaluate_model

    require(args, "model")
    _check_args(args, _EVAL_CHECKS)
    _torch_threads(args)
    result = evaluate_model(
        args.model,
        files=args.files,
        store=args.store,
        sequences=args.sequences,
        window=args.window,
        device=args.device,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    name = result["metric_name"]
    for row in result["inputs"]:
        print(f"{row['name']}\t{_fmt(row['metric'])} {name}\t{row['targets']} targets")
    baseline = result["uniform_baseline"]
    print(
        f"total\t{_fmt(result['metric'])} {name}\t{result['targets']} targets"
        + (f"\tuniform baseline {_fmt(baseline)}" if baseline is not None else "")
    )
    return 0


# ------------------------------------------------------------------------------------------------------

_MODEL_HELP = {
    "d_model": "model width (default 128)",
    "n_layer": "layers (default 4)",
    "d_state": "SSM state size (default 16 mamba1, 128 mamba2 and mamba3)",
    "d_conv": "causal conv width (default 4)",
    "expand": "inner width / d_model (default 2)",
    "headdim": "Mamba-2/Mamba-3 head size (default 64)",
    "chunk_size": "Mamba-2/Mamba-3 scan chunk (default 256; compute only, not the result)",
}
_MOE_HELP = {
    "moe_experts": "experts per MoE layer: makes the model an MoE-Mamba (default: no MoE, a dense model)",
    "moe_top_k": "experts each token uses (default 1)",
    "moe_d_expert": "each expert's gated-MLP width (default 8/3 * d_model rounded up to 64)",
    "moe_capacity_factor": "while training, an expert takes at most this * its even share of a batch's tokens "
    "(default 1.25; the rest skip the layer)",
    "moe_jitter": "while training, multiply the router's input by noise in [1 - J, 1 + J] (default 0)",
    "moe_balance_weight": "weight of the load-balancing loss (default 0.01)",
    "moe_z_weight": "weight of the router z-loss (default 0.001)",
    "moe_every": "every Nth layer is an MoE layer, the others dense MLPs (default 1: every layer)",
}
_TRAIN_HELP = {
    "steps": "optimizer steps in all (default 1000)",
    "batch_size": "streams per step (default 8)",
    "window": "TBPTT window: elements per stream per step (default 256)",
    "lr": "peak learning rate (default 1e-3)",
    "min_lr_ratio": "cosine ends at this * lr (default 0.1)",
    "weight_decay": "AdamW weight decay (default 0.1)",
    "warmup": "linear warmup steps (default 0)",
    "grad_accum": "micro-batches per step (default 1)",
    "grad_clip": "clip the gradient norm (default 1.0)",
    "eval_every": "evaluate every N steps and at the end (default 100; 0: only the final full evaluation)",
    "eval_windows": "held-out windows per periodic evaluation (default 8)",
    "checkpoint_every": "checkpoint every N steps and at the end (default 100)",
    "keep_checkpoints": "step folders kept: the newest N (default 3; the one 'latest' names is always kept), or 'all'",
    "seed": "seed of the initial weights and the RNGs (default 0)",
}


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train a model for a domain adapter from files or a sequence store",
        description="Train a Mamba model for a domain adapter with truncated BPTT (state carried across windows "
        "and detached), from files (encoded in memory; one bytes file is memory-mapped) or from a sequence "
        "store (--store; only the chunks each window needs are read, so a chromosome or hours of audio train "
        "without being loaded); --pack trains on documents packed into full rows instead. Writes checkpoints, "
        "train.jsonl, run.json and the final model.safetensors into "
        "--out; --resume continues from the latest checkpoint there. The loss is shown in bits per element "
        "(a video model's in mse). Settings may come from a TOML file (seqlab train --config run.toml ...; "
        "keys of its [train] table).",
        epilog="example: seqlab train notes.txt --adapter bytes --eval-fraction 0.1 --steps 500 --out runs/notes",
    )
    t.add_argument(
        "files", nargs="*", help="training files (text/bytes, FASTA/FASTQ, audio, .npy video, memory events)"
    )
    data = t.add_argument_group("data")
    add_adapter(
        data,
        "adapter for FILE...: bytes, subword, dna, audio, video, memory (with --store: the store's, or subword "
        "on a bytes store)",
    )
    data.add_argument(
        "--subword-vocab",
        type=subword_vocab,
        metavar="N",
        help="with --adapter subword: tokens of the byte-level BPE learned on the training data, 256 to 65536 "
        "(default 512); a subword model drafts for a byte model (seqlab generate --draft)",
    )
    data.add_argument("--eval", nargs="+", metavar="FILE", help="held-out files (put this after the training files)")
    data.add_argument(
        "--eval-fraction", type=eval_fraction, metavar="F", help="hold out the last F of the encoded data"
    )
    data.add_argument("--store", metavar="S.zarr", help="train from a sequence store (written by seqlab ingest)")
    add_sequences(data, "stored sequences to train on (default: all complete ones but the --eval-sequences)")
    data.add_argument("--eval-sequences", nargs="+", metavar="NAME", help="stored sequences held out for eval")
    run = t.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="output folder (required)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint "
        "(a new run when there is none yet); flags left out keep the run's settings",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds another run (kept in DIR/.previous-run until the new run has finished)",
    )
    add_device(run)
    add_threads(run)
    add_quiet(run)
    add_json(run, "print the summary as one JSON object")
    model = t.add_argument_group("model (a new run; a resumed run keeps its own)")
    model.add_argument(
        "--ssm",
        choices=("mamba1", "mamba2", "mamba3"),
        default=None,
        help="mixer kind (default mamba1; mamba3: SISO with mamba_ssm's defaults, docs/backbone.md)",
    )
    for name, text in _MODEL_HELP.items():
        model.add_argument(flag(name), type=MODEL_TYPES[name], default=None, help=text)
    moe = t.add_argument_group(
        "mixture of experts (MoE-Mamba; a new run; a resumed run keeps its own)",
        "--moe-experts N turns every layer's feed-forward into a mixture of N experts (the others need it); "
        "see docs/moe.md",
    )
    for name, text in _MOE_HELP.items():
        moe.add_argument(flag(name), type=MOE_TYPES[name], default=None, help=text)
    opt = t.add_argument_group("training")
    for name, text in _TRAIN_HELP.items():
        opt.add_argument(
            flag(name),
            type=TRAIN_TYPES[name],
            default=None,
            help=text,
            metavar="N|all" if name == "keep_checkpoints" else None,
        )
    opt.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast (default off)"
    )
    opt.add_argument(
        "--carry-state",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="carry the state across windows (default on; off with --pack)",
    )
    opt.add_argument(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pack documents (each file, each FASTA/FASTQ record, each stored sequence) end to end into full rows "
        "of --window: no padding, nothing crossing a document (each starts from a fresh state, its last element "
        "predicts nothing); prints the packing efficiency (default off; token adapters)",
    )
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "eval",
        help="held-out metric of a trained model over files or stored sequences",
        description="Measure a trained model (a model file or a training checkpoint folder) on files or stored "
        "sequences: each input is streamed in windows with the state carried (equal to one pass over it, in "
        "constant memory). Prints the adapter's metric per input and in total, with the uniform baseline.",
        epilog="example: seqlab eval --model runs/notes/model.safetensors test.txt",
    )
    add_model(e)
    e.add_argument("files", nargs="*", help="files to measure (encoded by the model's adapter)")
    e.add_argument("--store", metavar="S.zarr", help="measure stored sequences instead of files")
    add_sequences(e, "stored sequences (default: all complete ones)")
    add_window(e, 4096, "elements per streamed window (default 4096)")
    add_device(e)
    add_threads(e)
    add_quiet(e, "no progress bar")
    add_json(e)
    e.set_defaults(func=_eval)
