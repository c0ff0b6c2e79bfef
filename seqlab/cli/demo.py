"""``seqlab demo``: seqlab end to end on text every Python install has, in a few minutes on a laptop CPU.

Five steps, everything written under one output folder (default ``./seqlab-demo``):

1. ingest: the CPython documentation text shipped with the interpreter (``pydoc_data.topics``), split into a
   training part and a held-out tail, plus a 1 MiB sequence (that text followed by the standard library's own
   ``.py`` sources), into a Zarr sequence store (``store.zarr``) through ``ByteAdapter``;
2. train: a small byte-level Mamba (MambaByte) on the training part, streamed from the store
   (``StoreSource`` + ``Trainer``), then bits per byte of the held-out tail against the uniform 8;
3. generate: a sampled continuation of a prompt;
4. score: the Ray ``score`` job on an embedded local Ray cluster over the 1 MiB sequence (per-position bits in
   ``scores.zarr``) and a plot of bits per byte along the position (``bpb.png``);
5. memory: the model is fine-tuned on an agent-memory stream made from the training text (stored in the same
   store by ``MemoryStreamAdapter``), then a memory session observes events, saves, closes, and is reopened
   from disk alone; the restored state and its (seeded, sampled) answer are compared with the live ones.

Every number printed is computed by the run and kept in ``summary.json``. ``--text FILE...`` trains on your own
files and ``--big FILE`` scores your own long sequence; ``--quick`` is a tiny budget (well under two minutes).
Re-running into a demo folder replaces the demo's own outputs and leaves other files alone; a non-empty folder
that is not a demo folder is refused.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from seqlab.cli._args import add_quiet, add_seed, add_threads, count
from seqlab.cli.demo_inputs import DEFAULT_PROMPT, FULL, OUTPUTS, QUICK, Budget, prepare_out, resolve_inputs
from seqlab.cli.demo_steps import step_generate, step_ingest, step_memory, step_score, step_train

# ------------------------------------------------------------------------------------------------------
# the command


def _short(text: str, limit: int = 200) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run(args) -> dict:
    """Run the demo for parsed ``args``; returns the summary (also written to ``summary.json``)."""
    from seqlab.errors import ConfigError

    started = time.perf_counter()
    budget = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args.steps}")
        budget = Budget(**{**asdict(budget), "steps": args.steps})
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    inputs = resolve_inputs(args.text, args.big, args.prompt)
    out = prepare_out(args.out)
    import torch

    torch.set_num_threads(args.threads)
    bars = not args.quiet

    def say(text: str = "") -> None:
        print(text, flush=True)

    seconds: dict[str, float] = {}
    summary: dict = {
        "seqlab_demo": 1,
        "run": "quick" if args.quick else "full",
        "seed": args.seed,
        "threads": args.threads,
        "workers": args.workers,
        "out": str(out),
        "budget": asdict(budget),
        "seconds": seconds,
    }
    say(f"seqlab demo ({summary['run']} run) -> {out}/")

    t = time.perf_counter()
    say(f"[1/5] ingest: {inputs.corpus_what}, {len(inputs.corpus):,} bytes")
    ing = step_ingest(inputs, out, bars)
    seconds["ingest"] = time.perf_counter() - t
    summary["ingest"] = ing
    seq = ing["sequences"]
    say(f"      {ing['store']}/ (Zarr v3, zstd chunks), sequences of byte ids:")
    say(f"        train   {seq['train']:>9,} bytes  the corpus without its tail")
    say(f"        heldout {seq['heldout']:>9,} bytes  the corpus's tail, never trained on")
    say(f"        long    {seq['long']:>9,} bytes  {ing['long_source']}")
    say(
        f"        memory  {seq['memory']:>9,} bytes  {ing['memory_events']:,} question/answer events made from the "
        f"training text (for step 5)  ({seconds['ingest']:.1f} s)"
    )

    t = time.perf_counter()
    say(
        f"[2/5] train: MambaByte d_model={budget.d_model} n_layer={budget.n_layer}, {budget.steps} steps of "
        f"{budget.batch_size}x{budget.window} bytes streamed from the store"
    )
    model, tr = step_train(out, budget, args.seed, bars)
    seconds["train"] = time.perf_counter() - t
    summary["train"] = tr
    say(
        f"      {tr['parameters']:,} parameters, {tr['train_bytes_per_s']:,.0f} bytes/s, "
        f"{tr['epochs']:.2f} epochs; train loss (last 20 steps) {tr['train_loss_bpb_last20']:.3f} bits/byte"
    )
    say(
        f"      held-out bits/byte: {tr['heldout_bpb']:.3f} (untrained {tr['heldout_bpb_untrained']:.3f}, "
        f"uniform {tr['uniform_bpb']:.0f}) over {tr['heldout_predictions']:,} predictions  "
        f"({seconds['train']:.1f} s)"
    )

    t = time.perf_counter()
    say(
        f"[3/5] generate: {budget.new_tokens} bytes after {inputs.prompt!r} (temperature 0.7, top-k 20, "
        f"seed {args.seed})"
    )
    gen = step_generate(model, inputs.prompt, budget.new_tokens, args.seed)
    seconds["generate"] = time.perf_counter() - t
    summary["generate"] = gen
    for line in (inputs.prompt + gen["continuation"]).splitlines():
        say("      | " + "".join(c if c.isprintable() else "\ufffd" for c in line))
    say(f"      ({gen['bytes_per_s']:,.0f} bytes/s, {seconds['generate']:.1f} s)")

    t = time.perf_counter()
    say(f"[4/5] score: Ray score job over long ({seq['long']:,} bytes) on a local Ray cluster of {args.workers} CPU(s)")
    sc = step_score(out, args.workers, bars, ing["long_regions"], deviation_sample=0 if args.quick else 1)
    seconds["score"] = time.perf_counter() - t
    summary["score"] = sc
    how = (
        f"{sc['segments']} segments of {-(-sc['positions'] // sc['segments']):,} bytes, each warmed up on the "
        f"4,096 before it"
        if sc["mode"] == "segments"
        else "one pass with carried state"
    )
    say(
        f"      {sc['positions']:,} positions scored ({how}) in {sc['job_seconds']:.1f} s "
        f"({sc['bytes_per_s']:,.0f} bytes/s; Ray start {sc['ray_start_seconds']:.1f} s)"
    )
    say(
        f"      mean {sc['mean_bpb']:.3f} bits/byte; "
        + "; ".join(f"{r['what']} {r['mean_bpb']:.3f}" for r in sc["regions"])
    )
    if sc["deviation"]:
        d = sc["deviation"]
        say(
            f"      segments vs exact at {d['segments']} boundary ({d['positions']:,} positions): max |diff| "
            f"{d['max_abs']:.2e} bits, mean {d['mean_bits_segments']:.4f} vs {d['mean_bits_exact']:.4f}"
        )
    say(f"      {sc['output']} (per-position bits), {sc['plot']}  ({seconds['score']:.1f} s)")

    t = time.perf_counter()
    say(
        f"[5/5] memory: the model fine-tuned {budget.memory_steps} steps on the memory stream; a session observes "
        "4 events, saves after 3, answers, closes, and is reopened from disk"
    )
    mem = step_memory(model, out, budget, args.seed, bars)
    seconds["memory"] = time.perf_counter() - t
    summary["memory"] = mem
    say(
        f"      fine-tune loss (last 20 steps) {mem['finetune_loss_bpb_last20']:.3f} bits/byte "
        f"({mem['finetune_seconds']:.1f} s)"
    )
    say(
        f"      {mem['events']} events (snapshot {mem['snapshot']} holds {mem['events_in_snapshot']}, "
        f"{mem['events_replayed_from_log']} replayed from the log), position {mem['position']:,}, "
        f"state {mem['state_bytes']:,} bytes"
    )
    ended = "ended by its end-of-event byte" if mem["answer_stop"] == "stop" else "cut at the byte limit"
    say(
        f"      live answer (sampled, seed {args.seed}; {mem['answer_bytes']} bytes, {ended}): "
        f"{_short(mem['answer'])!r}"
    )
    say(
        f"      reopened: state identical: {mem['restored_state_identical']}; answer identical: "
        f"{mem['restored_answer_identical']}; state == replay of the events: {mem['replayed_state_identical']}  "
        f"({seconds['memory']:.1f} s)"
    )

    seconds["total"] = time.perf_counter() - started
    summary["paths"] = {
        "store": ing["store"],
        "model": tr["model_file"],
        "checkpoint": tr["checkpoint"],
        "train_log": tr["log"],
        "scores": sc["output"],
        "plot": sc["plot"],
        "memory_session": mem["session"],
        "summary": str(out / "summary.json"),
    }
    from seqlab.io import atomic_write_bytes

    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False).encode() + b"\n")
    say()
    say("Summary")
    say(
        f"  held-out bits/byte   {tr['heldout_bpb']:.3f}  (uniform baseline {tr['uniform_bpb']:.0f}, untrained "
        f"{tr['heldout_bpb_untrained']:.3f})"
    )
    say(
        f"  long sequence        {sc['mean_bpb']:.3f} bits/byte over {sc['positions']:,} positions (Ray, "
        f"{args.workers} worker(s))"
    )
    say(
        f"  memory restore       state identical {mem['restored_state_identical']}, answer identical "
        f"{mem['restored_answer_identical']}"
    )
    say(
        "  wall time            "
        + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total")
        + f"; total {seconds['total']:.1f} s"
    )
    say(f"  written under {out}/: " + ", ".join(n for n in OUTPUTS if (out / n).exists()))
    say(f'  next: seqlab describe {ing["store"]};  seqlab memory ask {mem["session"]} "What is a generator?"')
    return summary


def _handler(args) -> int:
    run(args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="seqlab end to end on built-in text: ingest, train, generate, Ray score + plot, memory",
        description="The end-to-end demo on the CPython documentation text (no download): ingest into a Zarr store, "
        "train a byte-level Mamba, generate, score a 1 MiB sequence with Ray (plot), and save/restore an agent "
        "memory session. Everything goes under --out; the numbers go to summary.json.",
    )
    p.add_argument(
        "--out",
        default="seqlab-demo",
        help="output folder (default ./seqlab-demo; re-running replaces "
        "the demo's own outputs there, other files are left alone)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny budget ({QUICK.steps} training steps): well under two minutes on 2 cores",
    )
    p.add_argument(
        "--steps",
        type=count(1, 1 << 24),
        default=None,
        help=f"training steps (default {FULL.steps}, "
        f"{QUICK.steps} with --quick; the memory fine-tune takes {FULL.memory_steps} more, "
        f"{QUICK.memory_steps} with --quick)",
    )
    p.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        default=None,
        help="train on these files (concatenated) instead of the CPython docs text",
    )
    p.add_argument(
        "--big",
        metavar="FILE",
        default=None,
        help="score this file as the long sequence (default: 1 MiB of the corpus + stdlib sources)",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help=f"prompt to continue (default {DEFAULT_PROMPT!r}, or the start of the held-out text with --text)",
    )
    p.add_argument(
        "--workers", type=count(1, 256), default=2, help="Ray workers (CPUs of the local cluster; default 2)"
    )
    add_threads(
        p,
        1,
        "torch threads of the demo process (default 1: a model this small trains fastest on one "
        "thread, and on a busy machine many times faster)",
    )
    add_seed(p, 0, "seed of the model init, training and sampling (default 0)")
    add_quiet(p, "no progress bars")
    p.set_defaults(func=_handler)
