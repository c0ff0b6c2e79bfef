"""``seqlab score``, ``seqlab embed`` and ``seqlab generate``: Ray Data batch jobs over a sequence store
(see docs/ray-jobs.md). ``--address`` joins a running Ray cluster; without it a local one is started."""

from __future__ import annotations

import argparse
import json


def _common(p: argparse.ArgumentParser, segments: bool = True) -> None:
    p.add_argument("store", help="input sequence store (a Zarr v3 directory written by seqlab ingest)")
    p.add_argument("output", help="output store directory (created when missing; resumable)")
    p.add_argument("--model", help="model file written by seqlab.checkpoint.save_model (required)")
    p.add_argument("--name", action="append", dest="names", help="sequence to process (repeat; default: all)")
    p.add_argument("--window", type=int, default=4096, help="elements per streamed window (default 4096)")
    if segments:
        p.add_argument("--mode", choices=("exact", "segments"), default="exact",
                       help="exact: whole sequences with carried state; segments: split long sequences across "
                       "workers, each warmed up on --burn-in elements (default exact)")
        p.add_argument("--segment-length", type=int, default=None, help="elements per segment (segments mode)")
        p.add_argument("--burn-in", type=int, default=4096, help="warm-up elements before each segment "
                       "(default 4096)")
        p.add_argument("--deviation-sample", type=int, default=4,
                       help="segment boundaries at which the deviation from exact is measured (default 4)")
    p.add_argument("--concurrency", type=int, default=2, help="actors in the pool (default 2)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor (default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (default 0)")
    p.add_argument("--address", default=None, help="Ray cluster address to join (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs of another job config")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _options(args) -> dict:
    options = {"names": args.names, "window": args.window, "concurrency": args.concurrency,
               "num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "address": args.address,
               "overwrite": args.overwrite, "progress": not args.quiet}
    if hasattr(args, "mode"):
        options.update(mode=args.mode, segment_length=args.segment_length, burn_in=args.burn_in,
                       deviation_sample=args.deviation_sample)
    return options


def _report(result) -> int:
    from .ray_jobs import _describe

    for name, totals in result.totals.items():
        state = "skipped" if name in result.skipped else "done"
        print(f"{name}\t{state}\t{json.dumps(totals)}")
    print(json.dumps(_describe(result)))
    return 0


def _score(args) -> int:
    from seqlab.cli import require

    from .ray_jobs import score

    require(args, "model")
    return _report(score(args.model, args.store, args.output, **_options(args)))


def _embed(args) -> int:
    from seqlab.cli import require

    from .ray_jobs import embed

    require(args, "model")
    return _report(embed(args.model, args.store, args.output, **_options(args)))


def _generate(args) -> int:
    from seqlab.cli import require

    from .ray_jobs import generate

    require(args, "model")
    return _report(generate(args.model, args.store, args.output, max_new_tokens=args.max_new_tokens,
                            prompt_length=args.prompt_length, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, **_options(args)))


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("score", help="per-position bits of every stored sequence under a model (Ray Data)",
                       description="Score every element (bits = -log2 p of the next element) of stored sequences "
                       "with a model, writing one array per sequence and the totals to an output store.")
    _common(s)
    s.set_defaults(func=_score)

    e = sub.add_parser("embed", help="mean-pooled hidden features per window of stored sequences (Ray Data)",
                       description="Embed stored sequences: one row of mean-pooled final hidden features per "
                       "window, (n_windows, d_model) per sequence, in an output store.")
    _common(e)
    e.set_defaults(func=_embed)

    g = sub.add_parser("generate", help="continue every stored sequence with a model (Ray Data)",
                       description="Generate a continuation of each stored sequence (its last --prompt-length "
                       "elements, or all of it) and write the new token ids to an output store.")
    _common(g, segments=False)
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--prompt-length", type=int, default=None, help="prompt = the last N elements (default all)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0, help="base seed (sequence NAME uses seed + crc32(NAME))")
    g.set_defaults(func=_generate)
