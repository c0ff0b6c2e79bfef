"""``seqlab laser``: LASER rank reduction of a trained model, scored on held-out files or a store, written as a
model file (``seqlab laser --help``; docs/cli.md).

The work is ``seqlab.pipelines.posttrain.laser_run``: the held-out metric (files encoded by the model's adapter,
or stored sequences written by that adapter, streamed with the state carried), ``seqlab.posttrain.laser_search``
over (layer, kind, rho) cells, the best intervention (or the greedy composition when it is better) applied and
saved, the search's report and heatmap. This module parses flags, shows the search's progress bar on stderr and
prints the summary. ``--out`` may never be the source model file; an existing ``--out`` is replaced only with
``--overwrite``; when no intervention beats the unmodified model nothing is written to ``--out`` unless
``--keep-best``.
"""

from __future__ import annotations

import argparse
import json

from seqlab.cli._args import (
    add_device,
    add_json,
    add_quiet,
    add_seed,
    add_sequences,
    add_threads,
    add_window,
    count,
    number,
)

#: --rhos: a fraction of the maximum rank, in (0, 1]
rho = number(0.0, 1.0, low_open=True)


def _laser(args) -> int:
    from seqlab.cli import require
    from seqlab.pipelines.posttrain import laser_run

    require(args, "model", "out")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    summary = laser_run(
        args.model,
        files=args.files or None,
        store=args.store,
        sequences=args.sequences,
        window=args.window,
        layers=args.layers,
        kinds=args.kinds,
        rhos=args.rhos,
        compose=args.compose,
        method=args.method,
        seed=args.seed,
        out=args.out,
        report_dir=args.report_dir,
        overwrite=args.overwrite,
        keep_best=args.keep_best,
        device=args.device,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    name = summary["metric_name"]
    print(f"baseline {name} {summary['baseline']:.4f} ({summary['cells_scored']} of {summary['cells']} cells scored)")
    if not summary["written"]:
        print(f"{summary['reason']}: wrote no model (--keep-best writes the best cell anyway)")
    else:
        print(f"chosen: {summary['reason']}")
        for c in summary["chosen"]:
            delta = c["score"] - summary["baseline"]
            print(f"  layer {c['layer']} {c['kind']} rho {c['rho']:g} (rank {c['rank']}): {name} {delta:+.4f}")
        print(f"new {name} {summary['metric']:.4f} ({summary['metric'] - summary['baseline']:+.4f})")
        print(
            f"parameters {summary['params_before']:,} -> {summary['params_after']:,}; file bytes "
            f"{summary['source_bytes']:,} -> {summary['file_bytes']:,}"
        )
        print(f"wrote {summary['out']}")
    where = summary["report"] + (f" and {summary['heatmap']}" if summary["heatmap"] else "")
    print(f"report: {where}; {summary['seconds']:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "laser",
        help="LASER: reduce the rank of chosen weight matrices where a held-out score improves",
        description="LAyer-SElective Rank reduction (Sharma et al. 2023): score every (layer, kind, rho) cell - "
        "a weight matrix replaced by its rank-r truncated SVD, r a fraction rho of its maximum rank - by the "
        "adapter's metric on held-out files (encoded by the model's adapter) or stored sequences, streamed with "
        "the state carried; apply the best cell (or, with --compose N, the greedy composition of up to N cells "
        "when it beats the best single one) and write OUT as a model file holding the low-rank factors. The "
        "search's report (JSON) and heatmap (PNG) go to --report-dir, by default beside OUT named after its "
        "stem (OUT-STEM.laser_report.json, OUT-STEM.laser_heatmap.png). When no cell beats the unmodified "
        "model, OUT is not written unless --keep-best. See docs/cli.md.",
        epilog="example: seqlab laser valid.txt --model runs/notes/model.safetensors "
        "--out runs/notes/laser.safetensors --rhos 0.05 0.1 0.25 --compose 3",
    )
    p.add_argument("files", nargs="*", help="held-out files (encoded by the model's adapter)")
    p.add_argument("--model", metavar="FILE", help="model file or training checkpoint folder to reduce (required)")
    p.add_argument("--out", metavar="FILE", help="the LASER'd model file to write (required; never the source)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    data = p.add_argument_group("held-out data")
    data.add_argument("--store", metavar="S.zarr", help="score on a sequence store (written by seqlab ingest)")
    add_sequences(data, "stored sequences to score on (default: all complete ones)")
    add_window(data, 4096, "elements per streamed piece (default 4096; the metric is exact under any window)")
    search = p.add_argument_group("search")
    search.add_argument(
        "--layers", nargs="+", type=count(0, 1 << 16), metavar="I", help="layer indices to search (default all)"
    )
    search.add_argument(
        "--kinds",
        nargs="+",
        metavar="KIND",
        help="matrices to search, named after backbone.layers.I.: mixer.in_proj, mixer.out_proj, mixer.x_proj, "
        "mixer.dt_proj, ffn.gate_up, ffn.down, ffn.down[*] (every MoE expert) ... (default all)",
    )
    search.add_argument(
        "--rhos",
        nargs="+",
        type=rho,
        metavar="RHO",
        help="fractions of the maximum rank kept, each in (0, 1] (default 0.01 0.02 0.05 0.1 0.25 0.5 0.75 0.9)",
    )
    search.add_argument(
        "--compose",
        type=count(0, 1024),
        default=0,
        help="also try the greedy composition of up to N of the best cells on distinct matrices (default 0)",
    )
    search.add_argument(
        "--method",
        choices=("svd", "random"),
        default="svd",
        help="svd: keep the largest singular components; random: as many chosen at random (the control)",
    )
    add_seed(search, text="seed of --method random (default 0)")
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="write the best cell to OUT even when it does not beat the unmodified model",
    )
    p.add_argument(
        "--report-dir",
        metavar="DIR",
        help="folder for laser_report.json and laser_heatmap.png (default: OUT's folder, named after OUT's stem)",
    )
    add_device(p)
    add_threads(p)
    add_quiet(p)
    add_json(p, "print the summary as one JSON object")
    p.set_defaults(func=_laser)
