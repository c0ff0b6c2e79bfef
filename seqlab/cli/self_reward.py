"""``seqlab self-reward``: self-rewarding fine-tuning of a byte model, the model judging its own candidates
(``seqlab self-reward --help``; docs/cli.md).

The work is ``seqlab.pipelines.posttrain.self_reward_run`` (``seqlab.posttrain.self_reward``): per iteration,
sampled candidates for every prompt, the model's own judgements of them, max/min pairs, DPO against a frozen copy.
Every file goes under ``--out`` (``iteration-<t>/candidates.jsonl``, ``pairs.jsonl``, ``model.safetensors``,
``iteration.json``, ``report.json``); ``--resume`` continues after the last finished iteration. This module parses
flags, shows a progress bar over the models on stderr and prints the per-iteration table.
"""

from __future__ import annotations

import argparse
import json
import sys

from seqlab.cli._args import (
    TRAIN_TYPES,
    add_device,
    add_json,
    add_quiet,
    add_seed,
    add_threads,
    count,
    max_new_tokens,
    number,
    temperature,
)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _self_reward(args) -> int:
    from tqdm.auto import tqdm

    from seqlab.cli import require
    from seqlab.pipelines.posttrain import self_reward_run

    require(args, "model", "out")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    bar = tqdm(total=args.iterations + 1, desc="self-reward", unit="model", disable=args.quiet, file=sys.stderr)
    try:
        summary = self_reward_run(
            args.model,
            out=args.out,
            prompts_file=args.prompts,
            task_prompts=args.task_prompts,
            iterations=args.iterations,
            candidates=args.candidates,
            judge_samples=args.judge_samples,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            beta=args.beta,
            lr=args.lr,
            epochs=args.epochs,
            seed=args.seed,
            resume=args.resume,
            measure=args.measure,
            device=args.device,
            progress=lambda _measure: bar.update(1),
        )
    finally:
        bar.close()
    if args.json:
        print(json.dumps(summary))
        return 0
    measured = summary["measure"]
    head = "| iteration | pairs | unparseable / judgements | mean score | DPO loss |"
    if measured:
        head += " task accuracy | judge agreement |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    if measured:
        m0 = summary["measures"][0]
        print(f"| 0 (the model given) | - | - | - | - | {_fmt(m0.get('accuracy'))} | "
              f"{_fmt(m0.get('judge_agreement'))} |")  # fmt: skip
    for row in summary["iterations"]:
        loss = "-" if row["dpo_loss_first"] is None else f"{row['dpo_loss_first']:.3f} -> {row['dpo_loss_last']:.3f}"
        line = (
            f"| {row['iteration']} | {row['pairs']} | {row['unparseable']} / {row['judgements']} | "
            f"{_fmt(row['mean_score'])} | {loss} |"
        )
        if measured:
            m = row["measure"]
            line += f" {_fmt(m.get('accuracy'))} | {_fmt(m.get('judge_agreement'))} |"
        print(line)
    print(
        f"{summary['prompts']} prompts ({summary['prompt_source']}); wrote {summary['out']} "
        f"(final model {summary['final_model']}); {summary['seconds']:.1f} s"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "self-reward",
        help="self-rewarding fine-tuning of a byte model: it judges its own candidates, then DPO",
        description="Self-rewarding fine-tuning (Yuan et al. 2024) of a byte model (adapter 'bytes'): each "
        "iteration samples --candidates continuations of every prompt, has the model judge each one "
        "--judge-samples times with the byte task's rubric, pairs the best and worst candidate of each prompt and "
        "trains on the pairs with DPO against a frozen copy of the model. Prompts come from a file (one per line) "
        "or from the built-in program-checkable byte task (--task-prompts N); with --task-prompts, --measure "
        "also reports the program checker's accuracy and the judge's agreement with it on the task's held-out "
        "split. Everything is written under --out. See docs/cli.md.",
        epilog="example: seqlab self-reward --model runs/task/model.safetensors --task-prompts 96 --measure "
        "--out runs/task/self-reward",
    )
    p.add_argument("--model", metavar="FILE", help="byte model file or training checkpoint folder (required)")
    p.add_argument("--out", metavar="DIR", help="the folder the run writes (required; new or empty unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished iteration")
    prompts = p.add_argument_group("prompts (one of them)")
    prompts.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line (bytes)")
    prompts.add_argument(
        "--task-prompts",
        type=count(1, 1 << 20),
        metavar="N",
        help="N self-reward prompts of the built-in byte task (reverse, sort, vowels, add)",
    )
    prompts.add_argument(
        "--measure",
        action="store_true",
        help="with --task-prompts: the checker's accuracy and the judge's agreement on the task's held-out "
        "split, for the model given and after each iteration",
    )
    loop = p.add_argument_group("the loop")
    loop.add_argument("--iterations", type=count(1, 1000), default=3, help="self-reward iterations (default 3)")
    loop.add_argument("--candidates", type=count(2, 1024), default=4, help="candidates sampled per prompt (default 4)")
    loop.add_argument(
        "--judge-samples", type=count(1, 1024), default=3, help="judgements sampled per candidate (default 3)"
    )
    loop.add_argument(
        "--temperature",
        type=temperature,
        default=1.0,
        help="sampling temperature of candidates and judgements, in [0.001, 100] (default 1.0)",
    )
    loop.add_argument(
        "--max-new-tokens",
        type=max_new_tokens,
        default=16,
        help="the most bytes of a candidate (it also stops at its first newline; default 16)",
    )
    dpo = p.add_argument_group("DPO")
    dpo.add_argument("--beta", type=number(0, 1000, low_open=True), default=0.1, help="DPO beta (default 0.1)")
    dpo.add_argument("--lr", type=TRAIN_TYPES["lr"], default=1e-4, help="DPO learning rate (default 1e-4)")
    dpo.add_argument(
        "--epochs", type=count(1, 1000), default=1, help="DPO passes over each iteration's pairs (default 1)"
    )
    add_seed(p, text="seed of the sampling, the DPO shuffle and the task's prompts (default 0)")
    add_device(p)
    add_threads(p)
    add_quiet(p)
    add_json(p, "print the summary as one JSON object")
    p.set_defaults(func=_self_reward)
