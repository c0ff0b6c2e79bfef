"""``seqlab ingest`` and ``seqlab describe``: fill a Zarr sequence store from files, and list what a store holds."""

from __future__ import annotations

import argparse
import json

from seqlab.errors import ConfigError


def _adapter_from_args(args):
    from seqlab.domains import get_adapter

    settings = {}
    if args.adapter_settings:
        try:
            settings = json.loads(args.adapter_settings)
        except ValueError as exc:
            raise ConfigError(f"--adapter-settings must be a JSON object, got {args.adapter_settings!r} ({exc})") \
                from None
        if not isinstance(settings, dict):
            raise ConfigError(f"--adapter-settings must be a JSON object, got {args.adapter_settings!r}")
    try:
        return get_adapter(args.adapter)(**settings)
    except TypeError as exc:
        raise ConfigError(f"--adapter-settings {settings} do not fit the {args.adapter!r} adapter: {exc}") from None


def _ingest(args) -> int:
    from seqlab.cli import require

    from .store import ingest

    require(args, "adapter")
    adapter = _adapter_from_args(args)
    results = ingest(args.store, args.files, adapter, names=args.name, window=args.window,
                     overwrite=args.overwrite, checksum=not args.no_checksum,
                     split_records=False if args.whole_file else None,
                     chunk_bytes=args.chunk_mb * (1 << 20) if args.chunk_mb else None,
                     progress=not args.quiet)
    for r in results:
        print(f"{r.name}\t{r.action}\t{r.info.length} elements")
    return 0


def _describe(args) -> int:
    from .store import SequenceStore

    store = SequenceStore(args.store, "r")
    names = args.names or store.list(incomplete=True)
    for name in names:
        info = store.describe(name)
        adapter = (info.adapter or {}).get("name", "-")
        state = "complete" if info.complete else "INCOMPLETE"
        print(f"{name}\t{info.length}\t{info.kind}\t{info.dtype}{list(info.frame_shape) or ''}\t{adapter}\t{state}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="encode files into a Zarr v3 sequence store (streaming, resumable)",
                       description="Encode files with a domain adapter into a Zarr v3 sequence store, a window at a "
                       "time (a file larger than memory is never loaded). Re-running skips finished sequences "
                       "and resumes an interrupted one.")
    p.add_argument("store", help="store directory (created when missing) or a zarr store URL")
    p.add_argument("files", nargs="+", help="input files (FASTA/FASTQ, audio, text/bytes, .npy frames, ...)")
    p.add_argument("--adapter", help="adapter name: bytes, audio, dna, video, memory (required)")
    p.add_argument("--adapter-settings", metavar="JSON", help='adapter settings, e.g. \'{"sample_rate": 16000}\'')
    p.add_argument("--name", action="append", help="sequence name per file (default: the file's stem)")
    p.add_argument("--window", type=int, default=1 << 20, help="elements encoded at a time (default 1Mi)")
    p.add_argument("--chunk-mb", type=float, default=None, help="target chunk size in MB (default 2)")
    p.add_argument("--whole-file", action="store_true", help="one sequence per file, even for multi-record files")
    p.add_argument("--overwrite", action="store_true", help="replace sequences that already exist")
    p.add_argument("--no-checksum", action="store_true", help="identify sources by size and mtime, not sha256")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_ingest)

    d = sub.add_parser("describe", help="list the sequences of a store with their length, type and adapter")
    d.add_argument("store", help="store directory or URL")
    d.add_argument("names", nargs="*", help="sequences to describe (default: all)")
    d.set_defaults(func=_describe)
