"""``seqlab export gguf MODEL OUT.gguf``: a Mamba-1 / Mamba-2 language model as a GGUF file for llama.cpp
(``seqlab export gguf --help``; docs/cli.md, docs/checkpoints.md).

MODEL is a seqlab model file, training checkpoint folder or ``save_pretrained`` directory (rebuilt with its
recorded adapter), or a transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` directory (config.json +
safetensors). The work is
``seqlab.interop.gguf.export_gguf``; this module picks the vocabulary (``--vocab``), parses flags and prints one
line (or JSON).
"""

from __future__ import annotations

import argparse
import json
import os

from seqlab.cli._args import add_json

VOCABS = ("auto", "bytes", "none")


def _load(path: str):
    """(model, adapter name or None, what it is) for a seqlab model file / checkpoint or an HF directory."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        from seqlab.pretrained import is_seqlab_config, read_config

        if not is_seqlab_config(read_config(path)[0]):
            from seqlab.interop.hf import load

            return load(path), None, "transformers directory"
        from seqlab.domains.registry import from_pretrained  # a save_pretrained directory, with its adapter

        model, adapter = from_pretrained(path)
        return model, adapter.name, f"seqlab pretrained directory ({adapter.name} adapter)"
    from seqlab.domains.registry import model_from_checkpoint

    model, adapter = model_from_checkpoint(path)
    return model, adapter.name, f"seqlab model ({adapter.name} adapter)"


def _vocab(choice: str, model, adapter: str | None, source: str, path: str):
    from seqlab.errors import ConfigError
    from seqlab.interop.gguf import byte_vocab, hf_vocab, no_vocab

    if choice == "none":
        return no_vocab(model.vocab_size)
    if choice == "bytes" or (choice == "auto" and adapter == "bytes"):
        if adapter not in (None, "bytes"):
            raise ConfigError(
                f"--vocab bytes: {path} was trained with the {adapter!r} adapter, whose ids are not bytes; "
                f"pass --vocab none to export token ids only"
            )
        return byte_vocab()
    if choice == "auto" and adapter is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return hf_vocab(path, model.vocab_size)
    raise ConfigError(
        f"--vocab auto: {path} is a {source} without a tokenizer GGUF export can write (byte models and "
        f"transformers directories with a byte-level BPE tokenizer.json). Pass --vocab none to export without one "
        f"(llama.cpp then runs token ids, not text)"
    )


def _gguf(args) -> int:
    from seqlab.cli import require
    from seqlab.interop.gguf import check_exportable, check_target, export_gguf

    require(args, "model", "out")
    from pathlib import Path

    check_target(Path(args.out), args.overwrite)  # before loading anything: a bad OUT costs nothing
    model, adapter, source = _load(args.model)
    check_exportable(model)
    vocab = _vocab(args.vocab, model, adapter, source, args.model)
    out = export_gguf(model, args.out, vocab=vocab, outtype=args.outtype, overwrite=args.overwrite)
    arch = "mamba" if model.config.ssm == "mamba1" else "mamba2"
    summary = {
        "out": str(out),
        "architecture": arch,
        "outtype": args.outtype,
        "vocab": vocab.description,
        "layers": model.config.n_layer,
        "bytes": out.stat().st_size,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {out} ({arch}, {model.config.n_layer} layers, {args.outtype}, vocab {vocab.description}, "
            f"{summary['bytes']:,} bytes)"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model in another format (gguf: for llama.cpp)",
        description="Write a trained model in a format other tools run. gguf: a Mamba-1 / Mamba-2 language "
        "model as a GGUF file for llama.cpp. See docs/cli.md and docs/checkpoints.md.",
    )
    formats = p.add_subparsers(dest="export_command", metavar="FORMAT")
    formats.required = True
    g = formats.add_parser(
        "gguf",
        help="a Mamba-1 / Mamba-2 language model as a GGUF file for llama.cpp",
        description="Write MODEL (a seqlab model file or checkpoint folder, or a transformers MambaForCausalLM / "
        "Mamba2ForCausalLM directory) as OUT.gguf with the tensor names and metadata llama.cpp's mamba / mamba2 "
        "architectures load. Quantized (AQLM), LASER'd, MoE, hybrid and feed-forward models are refused. "
        "The file appears only when complete.",
        epilog="example: seqlab export gguf runs/notes/model.safetensors notes-f16.gguf --outtype f16",
    )
    g.add_argument(
        "model", metavar="MODEL", help="model file, checkpoint folder, save_pretrained or transformers directory"
    )
    g.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (name ends in .gguf)")
    g.add_argument(
        "--outtype",
        choices=("f32", "f16", "q8_0"),
        default="f32",
        help="tensor type of the weight matrices (default f32); norms, biases, A, D and the conv stay f32; "
        "q8_0 falls back to f16 for matrices whose rows are not a multiple of 32",
    )
    g.add_argument(
        "--vocab",
        choices=VOCABS,
        default="auto",
        help="the tokenizer written: bytes (the 256 byte tokens of a byte model), none (token ids only), "
        "auto (default: bytes for a byte-adapter model, a transformers directory's byte-level BPE tokenizer.json, "
        "else refuse)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    add_json(g, "print the summary as one JSON object")
    g.set_defaults(func=_gguf)
