"""``seqlab score``, ``seqlab embed`` and ``seqlab generate``: Ray Data batch jobs over a sequence store
(see docs/ray-jobs.md). ``--address`` joins a running Ray cluster; without it a local one is started.
``seqlab generate --prompt TEXT`` continues prompts in this process instead (no store, no Ray)."""

from __future__ import annotations

import argparse
import json

from seqlab.cli_args import count, number, seed, temperature

#: actors in a job's pool
MAX_CONCURRENCY = 1024
#: the most new tokens one run generates per prompt or sequence
MAX_NEW_TOKENS = 1 << 20
#: the largest --prompt-file read
MAX_PROMPT_BYTES = 64 << 20
_per_actor = number(1e-4, 1024.0)


def resource(text: str) -> float:
    """--num-cpus / --num-gpus: what Ray can schedule per actor: 0, or a finite number in [0.0001, 1024] (Ray counts
    resources in units of 1/10000)."""
    try:
        if float(str(text).strip()) == 0:
            return 0.0
        return _per_actor(text)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be 0 or a number in [0.0001, 1024] (Ray's resource unit is "
                                         f"0.0001), got {text!r}") from None


resource.__name__ = "number"  # a float flag (seqlab.cli checks --config values by this name)


def sampling_temperature(text: str) -> float:
    """--temperature: 0 (greedy) or a finite number in [0.001, 100]; a smaller one overflows the logits (1e-300
    made torch.multinomial fail on NaN probabilities)."""
    value = temperature(text)
    if 0 < value < 1e-3:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or a number in [0.001, 100], got {text!r}")
    return value


sampling_temperature.__name__ = "number"
#: --top-p: a nucleus of at least 0.001 of the probability (a tinier one, like 1e-300, made sampling fail)
sampling_top_p = number(1e-3, 1.0)


def _common(p: argparse.ArgumentParser, segments: bool = True, optional_stores: bool = False) -> None:
    nargs = "?" if optional_stores else None
    p.add_argument("store", nargs=nargs, help="input sequence store (a Zarr v3 directory written by seqlab ingest)")
    p.add_argument("output", nargs=nargs, help="output store directory (created when missing; resumable)")
    p.add_argument("--model", help="model file written by seqlab.checkpoint.save_model (required)")
    p.add_argument("--name", action="append", dest="names", help="sequence to process (repeat; default: all)")
    p.add_argument("--window", type=count(1), default=4096, help="elements per streamed window (default 4096)")
    if segments:
        p.add_argument("--mode", choices=("exact", "segments"), default="exact",
                       help="exact: whole sequences with carried state; segments: split long sequences across "
                       "workers, each warmed up on --burn-in elements (default exact)")
        p.add_argument("--segment-length", type=count(1), default=None, help="elements per segment (segments mode)")
        p.add_argument("--burn-in", type=count(0), default=4096, help="warm-up elements before each segment "
                       "(default 4096)")
        p.add_argument("--deviation-sample", type=count(0), default=4,
                       help="segment boundaries at which the deviation from exact is measured (default 4; "
                       "0: not measured)")
    p.add_argument("--concurrency", type=count(1, MAX_CONCURRENCY), default=2, help="actors in the pool (default 2)")
    p.add_argument("--num-cpus", type=resource, default=1, help="CPUs per actor (default 1)")
    p.add_argument("--num-gpus", type=resource, default=0, help="GPUs per actor (default 0)")
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


def _job(fn, *args, **kwargs):
    """Run a job; a worker that died for good (killed again and again, out of memory, its node lost: Ray's own
    errors, after the retries) is one line: the finished outputs are kept and the same command resumes."""
    import ray.exceptions

    from seqlab.errors import BackendUnavailableError

    died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError)
    try:
        return fn(*args, **kwargs)
    except died as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise BackendUnavailableError(f"a Ray worker of the job died and was not brought back ({type(exc).__name__}: "
                                      f"{first[:200]}); finished outputs are kept: run the same command again to "
                                      "resume") from exc


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
    return _report(_job(score, args.model, args.store, args.output, **_options(args)))


def _embed(args) -> int:
    from seqlab.cli import require

    from .ray_jobs import embed

    require(args, "model")
    return _report(_job(embed, args.model, args.store, args.output, **_options(args)))


def _generate_prompts(args) -> int:
    """Continue --prompt / --prompt-file texts with the model, in this process, and print each continuation."""
    from seqlab.domains import model_from_checkpoint
    from seqlab.errors import ConfigError

    if args.store or args.output:
        raise ConfigError("generate: give either --prompt/--prompt-file or a STORE and OUTPUT, not both")
    from seqlab.errors import InputError

    prompts = [(f"--prompt {i + 1}", p) for i, p in enumerate(args.prompt or [])]
    for path in args.prompt_file or []:
        with open(path, "rb") as fh:  # at most MAX_PROMPT_BYTES: /dev/zero or a huge file is refused, not read
            data = fh.read(MAX_PROMPT_BYTES + 1)
        if len(data) > MAX_PROMPT_BYTES:
            raise InputError(f"generate --prompt-file {path}: larger than {MAX_PROMPT_BYTES:,} bytes; give the "
                             "end of it that the model should continue")
        prompts.append((f"--prompt-file {path}", data))
    model, adapter = model_from_checkpoint(args.model)
    if adapter.input_spec.kind != "tokens":
        raise ConfigError(f"generate --prompt: the model's adapter {adapter.name!r} takes continuous frames; "
                          "prompts need a token adapter (bytes, memory, dna)")
    ids = []
    for i, (where, prompt) in enumerate(prompts):
        try:
            row = adapter.encode(prompt)
        except UnicodeError as exc:  # undecodable bytes for a text adapter, or an argument that is not text
            raise InputError(f"generate {where}: not valid text for the {adapter.name!r} adapter ({exc.reason} at "
                             f"position {exc.start})") from None
        except InputError as exc:  # the adapter's own words, said of this prompt
            raise InputError(f"generate {where}: not valid input for the {adapter.name!r} adapter: {exc}") from None
        if row.numel() == 0:
            raise ConfigError(f"generate: prompt {i + 1} is empty")
        ids.append(row)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed,
                         **adapter.generation_options(allow_specials=args.allow_specials))
    for tokens in out.tokens:
        value = adapter.decode(tokens)
        text = value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)
        print(text if len(prompts) == 1 else json.dumps(text))
    return 0


def _generate(args) -> int:
    from seqlab.cli import require

    from .ray_jobs import generate

    require(args, "model")
    if args.prompt or args.prompt_file:
        return _generate_prompts(args)
    if not (args.store and args.output):
        from seqlab.errors import ConfigError

        raise ConfigError("generate: give STORE and OUTPUT (a Ray job over a store), or --prompt/--prompt-file")
    return _report(_job(generate, args.model, args.store, args.output, max_new_tokens=args.max_new_tokens,
                        prompt_length=args.prompt_length, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, allow_specials=args.allow_specials, **_options(args)))


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

    g = sub.add_parser("generate", help="continue prompts, or every stored sequence (Ray Data), with a model",
                       description="Generate a continuation of each stored sequence (its last --prompt-length "
                       "elements, or all of it) and write the new token ids to an output store. With --prompt "
                       "or --prompt-file instead of STORE OUTPUT: continue those texts in this process and print "
                       "each continuation (one line of JSON per prompt when there are several).")
    _common(g, segments=False, optional_stores=True)
    g.add_argument("--prompt", action="append", help="a prompt text to continue (repeat for several)")
    g.add_argument("--prompt-file", action="append", metavar="FILE", help="a file whose bytes are a prompt")
    g.add_argument("--max-new-tokens", type=count(1, MAX_NEW_TOKENS), default=64,
                   help="tokens to generate (default 64; fewer when the adapter's end token comes first)")
    g.add_argument("--prompt-length", type=count(1), default=None, help="prompt = the last N elements (default all)")
    g.add_argument("--temperature", type=sampling_temperature, default=1.0,
                   help="0 = greedy, or 0.001 to 100 (default 1.0)")
    g.add_argument("--top-k", type=count(1), default=None, help="sample from the k likeliest tokens (default all)")
    g.add_argument("--top-p", type=sampling_top_p, default=None, help="sample from the smallest set of tokens whose "
                   "probability reaches p, in [0.001, 1] (default 1)")
    g.add_argument("--seed", type=seed, default=0, help="base seed (sequence NAME uses seed + crc32(NAME))")
    g.add_argument("--allow-specials", action="store_true",
                   help="let the model generate the adapter's special tokens too (by default they are never "
                   "generated, so the output always decodes; the end token stops a continuation either way)")
    g.set_defaults(func=_generate)
