"""``seqlab ingest`` and ``seqlab describe``: fill a Zarr sequence store from files, and list what a store holds."""

from __future__ import annotations

import argparse
import json
import sys

from seqlab.cli_args import count, number
from seqlab.errors import ConfigError

#: --chunk-mb range: 0.001 MB (about 1 KiB, the store's smallest chunk) to 1024 MB (a chunk is decoded whole)
CHUNK_MB_MIN, CHUNK_MB_MAX = 0.001, 1024.0


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
                     chunk_bytes=round(args.chunk_mb * (1 << 20)) if args.chunk_mb is not None else None,
                     progress=not args.quiet)
    for r in results:
        print(f"{r.name}\t{r.action}\t{r.info.length} elements")
    return 0


def _describe(args) -> int:
    """One line per sequence; a sequence whose metadata is damaged gets a DAMAGED line saying why (the healthy
    ones are still listed), and the exit code is then 1."""
    from seqlab.errors import CorruptFileError

    from .store import SequenceStore

    store = SequenceStore(args.store, "r")
    if args.names:
        names = args.names
        for name in names:
            if name not in store:
                store.describe(name)  # the InputError naming what the store holds
    else:
        healthy, damaged = store._scan()  # both kinds, each reported below
        names = sorted([*healthy, *damaged])
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
    p = sub.add_parser("ingest", help="encode files into a Zarr v3 sequence store (streaming, resumable)",
                       description="Encode files with a domain adapter into a Zarr v3 sequence store, a window at a "
                       "time (a file larger than memory is never loaded). Re-running skips finished sequences "
                       "and resumes an interrupted one. Each file is all or nothing: its sequences are marked "
                       "complete only once the whole file has been read and verified; on an error, what was "
                       "written from it is removed (files before it stay ingested).")
    p.add_argument("store", help="store directory (created when missing) or a zarr store URL")
    p.add_argument("files", nargs="+", help="input files (FASTA/FASTQ, audio, text/bytes, .npy frames, ...)")
    p.add_argument("--adapter", help="adapter name: bytes, audio, dna, video, memory (required)")
    p.add_argument("--adapter-settings", metavar="JSON", help='adapter settings, e.g. \'{"sample_rate": 16000}\'')
    p.add_argument("--name", action="append", help="sequence name per file (default: the file's stem)")
    p.add_argument("--window", type=count(1), default=1 << 20,
                   help="elements encoded at a time, in [1, 2**30] (default 1Mi)")
    p.add_argument("--chunk-mb", type=number(CHUNK_MB_MIN, CHUNK_MB_MAX), default=None,
                   help=f"target chunk size in MB, in [{CHUNK_MB_MIN}, {CHUNK_MB_MAX:g}] (default 2)")
    p.add_argument("--whole-file", action="store_true", help="one sequence per file, even for multi-record files")
    p.add_argument("--overwrite", action="store_true", help="replace sequences that already exist")
    p.add_argument("--no-checksum", action="store_true", help="identify sources by size and mtime, not sha256")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_ingest)

    d = sub.add_parser("describe", help="list the sequences of a store with their length, type and adapter",
                       description="One line per sequence: name, length, kind, dtype, adapter, complete or "
                       "INCOMPLETE. A sequence whose metadata is damaged is listed as DAMAGED with the reason "
                       "(also on stderr) and the exit code is 1; the healthy ones are listed as usual.")
    d.add_argument("store", help="store directory or URL")
    d.add_argument("names", nargs="*", help="sequences to describe (default: all)")
    d.set_defaults(func=_describe)
