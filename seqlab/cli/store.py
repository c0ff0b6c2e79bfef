"""``seqlab ingest`` and ``seqlab describe``: fill a Zarr sequence store from files, and list what a store holds
or summarise a model file (``seqlab.domains.describe_model``: class, config, MoE settings, total and active
parameters, fingerprint)."""

from __future__ import annotations

import argparse
import sys

from seqlab.cli._args import CHUNK_MB_MAX, CHUNK_MB_MIN, add_adapter, add_quiet, add_sequences, chunk_mb, count


def _ingest(args) -> int:
    from seqlab.cli import require
    from seqlab.domains.training_data import adapter_for
    from seqlab.pipelines import ingest

    require(args, "adapter")
    adapter = adapter_for(args.adapter, args.adapter_settings)
    results = ingest(
        args.store,
        args.files,
        adapter,
        names=args.sequence_names,
        window=args.window,
        overwrite=args.overwrite,
        checksum=not args.no_checksum,
        split_records=False if args.whole_file else None,
        chunk_bytes=round(args.chunk_mb * (1 << 20)) if args.chunk_mb is not None else None,
        progress=not args.quiet,
    )
    for r in results:
        print(f"{r.name}\t{r.action}\t{r.info.length} elements")
    return 0


def _is_model(path: str) -> bool:
    """Whether ``seqlab describe PATH`` names a model: a file (a store is a folder or a URL), or a folder with a
    checkpoint (``latest``) or a ``model.safetensors`` that is not a store."""
    import os

    if os.path.isfile(path):
        return True
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "zarr.json")):
        return any(os.path.exists(os.path.join(path, name)) for name in ("latest", "model.safetensors"))
    return False


def _describe_model(args) -> int:
    from seqlab.cli.train import moe_text, parameters_text
    from seqlab.domains import describe_model
    from seqlab.errors import ConfigError

    if args.sequences:
        raise ConfigError(f"--sequences goes with a store; {args.store} is a model")
    d = describe_model(args.store, device="cpu")
    config = d["config"] or {}
    adapter = d["adapter"]
    print(f"model        {d['path']}" + (f" (step {d['step']})" if d["step"] is not None else ""))
    kind = d["class"] + (f", adapter {adapter['name']}" if adapter else "")
    if "vocab_size" in d:
        kind += f", vocabulary {d['vocab_size']}"
    print(f"class        {kind}")
    if config:
        shape = [f"{config['ssm']}", f"d_model {config['d_model']}", f"n_layer {config['n_layer']}"]
        shape += [f"d_state {config['d_state']}", f"expand {config['expand']}"]
        if config["ssm"] in ("mamba2", "mamba3"):
            shape.append(f"headdim {config['headdim']}")
        if config["ssm"] == "mamba3":
            rank = config.get("mamba3_mimo_rank") or 1
            shape.append("SISO" if rank == 1 else f"MIMO rank {rank}")
        shape.append(f"ffn {config['ffn'] or 'none'}")
        if config.get("bidirectional"):
            shape.append("bidirectional")
        print(f"config       {', '.join(shape)}")
    mixers = d.get("mixers") or []
    if len(set(mixers)) > 1:
        print(f"layers       {', '.join(mixers)}")
    attention = d.get("attention")
    if attention:
        window = attention["window"] or "none"
        print(
            f"attention    {attention['heads']} heads, {attention['kv_heads']} key/value heads, head_dim "
            f"{attention['head_dim']}, rope dims {attention['rope_dim']} (theta {attention['rope_theta']:g}), "
            f"window {window}"
        )
    moe = d["moe"]
    if moe:
        print(
            f"moe          {moe_text(moe, config['n_layer'])}; while training: capacity factor "
            f"{moe['capacity_factor']:g}, jitter {moe['jitter']:g}, balance weight {moe['balance_weight']:g}, "
            f"z weight {moe['z_weight']:g}"
        )
    quant = d.get("quantization")
    if quant:
        print(
            f"quantized    {str(quant['method']).upper()} {quant['config']}: {quant['layers']} layers at "
            f"{quant['bits_per_parameter']:.3f} bits per weight (codebooks and scales included), the rest at "
            f"{quant['full_precision_bits']} bits"
        )
    print(f"parameters   {parameters_text(d['parameters'])}")
    print(f"fingerprint  {d['fingerprint']}")
    return 0


def _describe(args) -> int:
    """A model file or checkpoint folder: its summary. A store: one line per sequence; a sequence whose metadata
    is damaged gets a DAMAGED line saying why (the healthy ones are still listed), and the exit code is then 1."""
    from seqlab.errors import CorruptFileError
    from seqlab.pipelines import SequenceStore

    if _is_model(args.store):
        return _describe_model(args)

    store = SequenceStore(args.store, "r")
    if args.sequences:
        names = args.sequences
        for name in names:
            if name not in store:
                store.describe(name)  # the InputError naming what the store holds
    else:
        import warnings

        broken = store.damaged()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the damaged ones are listed below, each with why
            names = sorted([*store.list(), *broken])
    damaged = 0
    for name in names:
        try:
            info = store.describe(name)
        except CorruptFileError as exc:
            damaged += 1
            why = " ".join(str(exc).split())
            print(f"{name}\t-\t-\t-\t-\tDAMAGED\t{why}")
            print(f"seqlab describe: damaged sequence {name!r}: {why}", file=sys.stderr)
            continue
        adapter = (info.adapter or {}).get("name", "-")
        state = "complete" if info.complete else "INCOMPLETE"
        print(f"{name}\t{info.length}\t{info.kind}\t{info.dtype}{list(info.frame_shape) or ''}\t{adapter}\t{state}")
    return 1 if damaged else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="encode files into a Zarr v3 sequence store (streaming, resumable)",
        description="Encode files with a domain adapter into a Zarr v3 sequence store, a window at a "
        "time (a file larger than memory is never loaded). Re-running skips finished sequences "
        "and resumes an interrupted one. Each file is all or nothing: its sequences are marked "
        "complete only once the whole file has been read and verified; on an error, what was "
        "written from it is removed (files before it stay ingested).",
    )
    p.add_argument("store", help="store directory (created when missing) or a zarr store URL")
    p.add_argument("files", nargs="+", help="input files (FASTA/FASTQ, audio, text/bytes, .npy frames, ...)")
    add_adapter(p, "adapter name: bytes, audio, dna, video, memory (required)")
    p.add_argument(
        "--sequence-names",
        nargs="+",
        metavar="NAME",
        help="names of the sequences written, one per file (default: each file's stem)",
    )
    p.add_argument(
        "--window", type=count(1), default=1 << 20, help="elements encoded at a time, in [1, 2**30] (default 1Mi)"
    )
    p.add_argument(
        "--chunk-mb",
        type=chunk_mb,
        default=None,
        help=f"target chunk size in MB, in [{CHUNK_MB_MIN}, {CHUNK_MB_MAX:g}] (default 2)",
    )
    p.add_argument("--whole-file", action="store_true", help="one sequence per file, even for multi-record files")
    p.add_argument("--overwrite", action="store_true", help="replace sequences that already exist")
    p.add_argument("--no-checksum", action="store_true", help="identify sources by size and mtime, not sha256")
    add_quiet(p, "no progress bar")
    p.set_defaults(func=_ingest)

    d = sub.add_parser(
        "describe",
        help="list the sequences of a store, or summarise a model file (total and active parameters)",
        description="A store: one line per sequence: name, length, kind, dtype, adapter, complete or "
        "INCOMPLETE. A sequence whose metadata is damaged is listed as DAMAGED with the reason "
        "(also on stderr) and the exit code is 1; the healthy ones are listed as usual. A model file "
        "(model.safetensors) or a checkpoint or run folder: the model's class, adapter, config, MoE settings, "
        "total and active parameters (dense models: all active) and fingerprint.",
        epilog="examples: seqlab describe store.zarr;  seqlab describe run/model.safetensors",
    )
    d.add_argument(
        "store", metavar="STORE|MODEL", help="store directory or URL, or a model file or checkpoint/run folder"
    )
    add_sequences(d, "sequences to describe (default: all)")
    d.set_defaults(func=_describe)
