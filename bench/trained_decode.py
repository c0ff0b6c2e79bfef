"""Decode speed of trained models: seqlab's fused compiled step against its eager per-block step, same weights.

The models are seqlab model files (``save_model``; rebuilt by ``seqlab.domains.registry.model_from_checkpoint``):
the files given, or every distinct model file of a ladder run (``--ladder DIR``, the folder ``seqlab ladder`` /
``make ladder`` wrote: the dense and MoE MambaByte, the SFT and self-rewarded ones, the LASER'd and the two
AQLM-quantized ones, the attention teacher and its hybrid students). For each: which layers run the fused step
(``seqlab.fused_step.fused_layers``), then greedy ``generate`` of ``--new-tokens`` bytes after a prompt (the first
``--prompt-bytes`` of the ladder's held-out text, or of ``--prompt``), at each batch size (every row the same
prompt), with ``model.fused_step`` on and off, the two taking turns in every repeat (median), and whether both
decoded the same tokens. Random weights would time the same arithmetic; trained ones also show that the fused
step gives the eager step's tokens on real models.

    python bench/trained_decode.py --ladder ladder                     # after `make ladder`
    python bench/trained_decode.py ladder/01-moe/dense.safetensors --batches 1
    python bench/trained_decode.py FILE --quick                        # smoke test
    python bench/trained_decode.py --ladder ladder --bf16              # the models converted to bfloat16
    python bench/trained_decode.py --ladder ladder --sample            # sampled decoding instead of greedy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _machine import machine_line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="seqlab model files")
    p.add_argument("--ladder", type=Path, help="a ladder run's folder: every distinct model file of its summary.json")
    p.add_argument("--prompt", type=Path, help="a file whose first --prompt-bytes bytes are the prompt")
    p.add_argument("--prompt-bytes", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None, help="bytes decoded per measurement (default 128)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("--repeats", type=int, default=5, help="timings per model and batch; the median is shown")
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="few tokens, one repeat (smoke test)")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="time each model converted to bfloat16, and count "
        "how many of its greedy bytes at batch 1 match the float32 model's",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help=f"sampled decoding ({', '.join(f'{k} {v}' for k, v in SAMPLING.items() if k != 'do_sample')}) "
        "instead of greedy",
    )
    args = p.parse_args(argv)
    if not args.files and args.ladder is None:
        p.error("give model files or --ladder DIR")
    args.new_tokens = args.new_tokens or (8 if args.quick else 128)
    args.repeats = 1 if args.quick else args.repeats
    if args.new_tokens < 1 or args.prompt_bytes < 1 or args.repeats < 1 or min(args.batches) < 1:
        p.error("--new-tokens, --prompt-bytes, --repeats and every batch must be at least 1")
    return args


def ladder_files(folder: Path) -> list[tuple[str, Path]]:
    """(label, file) for every distinct model file a ladder run's summary.json names, in table order: the label
    is the rungs that use the file and the first one's name."""
    summary = folder / "summary.json"
    if not summary.is_file():
        raise SystemExit(f"--ladder {folder}: no summary.json there (run `seqlab ladder --out {folder}` first)")
    files: dict[str, list[dict]] = {}
    for row in json.loads(summary.read_text())["rows"]:
        if row.get("file"):
            files.setdefault(row["file"], []).append(row)
    return [
        (f"{' '.join(r['rung'] for r in rows)} {rows[0].get('label', '')}".strip(), folder / name)
        for name, rows in files.items()
    ]


def prompt_bytes(args) -> bytes:
    source = args.prompt
    if source is None and args.ladder is not None:
        source = args.ladder / "data" / "heldout.bin"
    if source is None:
        return bytes(range(65, 65 + 26)) * (args.prompt_bytes // 26 + 1)
    return source.read_bytes()[: args.prompt_bytes]


#: what --sample decodes with
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=0)


@torch.no_grad()
def rates(model, prompt: torch.Tensor, new_tokens: int, repeats: int, **options) -> tuple[float, float, bool]:
    """(fused tok/s, eager tok/s, same tokens) for decoding ``prompt`` (batch, length): greedy, or ``options``."""
    options = options or dict(temperature=0)
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list] = {}
    for _ in range(repeats):
        for fused in (True, False):
            model.fused_step = fused
            start = time.perf_counter()
            out = model.generate(prompt, new_tokens, **options)
            times[fused].append(time.perf_counter() - start)
            tokens[fused] = out.tokens
    model.fused_step = True
    batch = prompt.shape[0]
    fused, eager = (batch * new_tokens / statistics.median(times[f]) for f in (True, False))
    return fused, eager, tokens[True] == tokens[False]


def agreeing(got: list, want: list) -> int:
    """How many tokens ``got`` and ``want`` share before their first difference."""
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.fused_step import fused_layers

    print(machine_line())
    models = [(os.fspath(f.name), f) for f in args.files] + (ladder_files(args.ladder) if args.ladder else [])
    ids = torch.tensor(list(prompt_bytes(args)), dtype=torch.int64)
    mode = "sampled (" + ", ".join(f"{k} {v}" for k, v in SAMPLING.items() if k != "do_sample") + ")"
    options = SAMPLING if args.sample else {}
    print(
        f"{mode if args.sample else 'greedy'} decode of {args.new_tokens} bytes after a {ids.numel()}-byte prompt, "
        f"median of {args.repeats}"
    )
    rows = []
    for label, path in models:
        model, _ = model_from_checkpoint(path)
        model.eval()
        agree = ""
        if args.bf16:  # the float32 model's greedy bytes at batch 1, then the model in bfloat16
            with torch.no_grad():
                want = model.generate(ids[None], args.new_tokens, temperature=0).tokens[0]
                model.to(torch.bfloat16)
                got = model.generate(ids[None], args.new_tokens, temperature=0).tokens[0]
                model.fused_step = False
                got_eager = model.generate(ids[None], args.new_tokens, temperature=0).tokens[0]
                model.fused_step = True
            agree = f" | {agreeing(got, want)}/{len(want)} | {agreeing(got_eager, want)}/{len(want)}"
            label = f"{label} (bf16)"
        reasons = fused_layers(model)
        eager_layers = sorted({r for r in reasons if r is not None})
        fused_note = f"{reasons.count(None)}/{len(reasons)}" + (f" ({'; '.join(eager_layers)})" if eager_layers else "")
        model.generate(ids[None, :4], 2, temperature=0)  # warm-up (builds the plan and the compiled library)
        for batch in args.batches:
            prompt = ids.expand(batch, -1).contiguous()
            fused, eager, same = rates(model, prompt, args.new_tokens, args.repeats, **options)
            rows.append(
                f"| {label} | {fused_note} | {batch} | {fused:,.0f} | {eager:,.0f} | {fused / eager:.1f}x | "
                f"{'yes' if same else 'NO'}{agree} |"
            )
            print(f"  {label} batch {batch}: fused {fused:,.0f} tok/s, eager {eager:,.0f}", flush=True)
    print()
    extra = " bf16 fused = fp32 | bf16 eager = fp32 |" if args.bf16 else ""
    print(f"| model | layers fused | batch | fused tok/s | eager tok/s | fused / eager | same tokens |{extra}")
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.bf16 else ""))
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
