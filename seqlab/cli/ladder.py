"""``seqlab ladder``: every rung of the seed article on one model, in one command (``seqlab.ladder``): MambaByte
and MambaByte-MoE, self-rewarding fine-tuning, LASER, AQLM, plain / speculative / cascade decoding, DRµGS against
temperature sampling, and beside them a Transformer distilled into a Mamba hybrid. One table (summary.md,
summary.json) and one plot (ladder.png) in --out; --resume goes on after an interruption."""

from __future__ import annotations

import argparse
import json

from seqlab.cli._args import add_json, add_quiet, add_seed, add_threads


def run(args) -> dict:
    from seqlab.cli.demo_inputs import resolve_inputs
    from seqlab.ladder import FULL, QUICK, run_ladder

    corpus = what = None
    if args.text:
        inputs = resolve_inputs(args.text, command="ladder")  # the demo's checks: files exist, not empty, enough bytes
        corpus, what = inputs.corpus, inputs.corpus_what
    import torch

    torch.set_num_threads(args.threads)
    say = (lambda text="": None) if args.json else (lambda text="": print(text, flush=True))
    summary = run_ladder(
        QUICK if args.quick else FULL,
        args.out,
        corpus=corpus,
        corpus_what=what,
        seed=args.seed,
        resume=args.resume,
        progress=not (args.quiet or args.json),
        say=say,
    )
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        from seqlab.ladder.report import table

        print()
        print(table(summary["rows"]), end="")
        print(f"all rungs {summary['seconds_all_rungs']:.1f} s; this call {summary['seconds_this_call']:.1f} s")
    return summary


def _handler(args) -> int:
    run(args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ladder",
        help="the whole ladder on one model: MoE, self-reward, LASER, AQLM, drafting, DRµGS, distillation",
        description="Climb every rung of the seed article on one byte-level model trained here on real text "
        "(streamed from a Zarr store): MambaByte vs MambaByte-MoE, self-rewarding fine-tuning, LASER, AQLM at "
        "about 2 and 3 bits, plain / speculative (subword drafter) / cascade decoding, DRµGS vs temperature "
        "sampling, and beside them a Llama-style teacher distilled into a 50%% Mamba hybrid. Writes one table "
        "(summary.md, summary.json) and ladder.png into --out; each rung is checkpointed (--resume).",
    )
    p.add_argument(
        "--out",
        default="ladder",
        help="output folder (default ./ladder; a non-empty folder that is "
        "not a ladder folder is refused; without --resume a ladder folder's outputs are replaced)",
    )
    p.add_argument("--quick", action="store_true", help="every rung with tiny budgets (well under 3 minutes)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on with the run in --out: finished rungs are skipped (same options needed)",
    )
    p.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        default=None,
        help="your own text files (concatenated) instead of the CPython documentation text",
    )
    add_threads(p, 2, "torch threads (default 2)")
    add_seed(p, 0, "seed of every model init, data order and sample (default 0)")
    add_quiet(p, "no progress bars (the rung lines and the table are still printed)")
    add_json(p, "print only the summary as one JSON object")
    p.set_defaults(func=_handler)
