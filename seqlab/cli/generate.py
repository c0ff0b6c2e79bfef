"""``seqlab generate``: continue ``--prompt``/``--prompt-file`` texts in this process and print them (no store, and
Ray is never imported), or, given ``STORE OUT`` instead, continue every stored sequence as a Ray Data job
(seqlab/cli/jobs.py). Greedy unless ``--do-sample``, like Hugging Face's and seqlab's ``generate``.

``--model`` is a model file, a run or checkpoint folder, or a pretrained directory (``save_pretrained``'s, or a
transformers Mamba / Mamba-2 directory with a ``tokenizer.json``): ``seqlab.domains.registry.model_from_checkpoint``
loads the model with its adapter. One prompt's continuation is streamed (``TextStreamer``)."""

from __future__ import annotations

import argparse
import json
import sys

from seqlab.cli._args import add_sampling, count, speculate
from seqlab.cli.jobs import add_job_options

#: the largest --prompt-file read
MAX_PROMPT_BYTES = 64 << 20


def _prompts(args) -> list[tuple[str, bytes | str]]:
    """(where, prompt) of every --prompt and --prompt-file, each file read up to MAX_PROMPT_BYTES."""
    from seqlab.errors import InputError

    prompts: list[tuple[str, bytes | str]] = [(f"--prompt {i + 1}", p) for i, p in enumerate(args.prompt or [])]
    for path in args.prompt_file or []:
        with open(path, "rb") as fh:  # at most MAX_PROMPT_BYTES: /dev/zero or a huge file is refused, not read
            data = fh.read(MAX_PROMPT_BYTES + 1)
        if len(data) > MAX_PROMPT_BYTES:
            raise InputError(
                f"generate --prompt-file {path}: larger than {MAX_PROMPT_BYTES:,} bytes; give the "
                "end of it that the model should continue"
            )
        prompts.append((f"--prompt-file {path}", data))
    return prompts


def _generate_prompts(args) -> int:
    """Continue --prompt / --prompt-file texts with the model, in this process, and print each continuation."""
    from seqlab.domains import model_from_checkpoint
    from seqlab.errors import ConfigError, InputError

    if args.store or args.out:
        raise ConfigError("generate: give either --prompt/--prompt-file or a STORE and OUT, not both")
    prompts = _prompts(args)
    model, adapter = model_from_checkpoint(args.model)
    if adapter.continuous:
        raise ConfigError(
            f"generate --prompt: the model's adapter {adapter.name!r} takes continuous frames; "
            "prompts need a token adapter (bytes, memory, dna)"
        )
    ids = []
    for i, (where, prompt) in enumerate(prompts):
        try:
            row = adapter.encode(prompt)
        except UnicodeError as exc:  # undecodable bytes for a text adapter, or an argument that is not text
            reason, start = getattr(exc, "reason", str(exc)), getattr(exc, "start", "?")
            raise InputError(
                f"generate {where}: not valid text for the {adapter.name!r} adapter ({reason} at position {start})"
            ) from None
        except InputError as exc:  # the adapter's own words, said of this prompt
            raise InputError(f"generate {where}: not valid input for the {adapter.name!r} adapter: {exc}") from None
        if row.numel() == 0:
            raise ConfigError(f"generate: prompt {i + 1} is empty")
        ids.append(row)
    draft = None
    if args.draft is not None:
        from seqlab.domains.drafting import load_drafter

        draft = load_drafter(args.draft, model, adapter)
    # one prompt: its continuation is printed as it is generated (several: one JSON line each, at the end)
    streamer = TextStreamer(adapter) if len(prompts) == 1 else None
    out = model.generate(
        ids,
        args.max_new_tokens,
        callback=streamer,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        draft=draft,
        speculate=args.speculate,
        **adapter.generation_options(allow_specials=args.allow_specials),
    )
    if streamer is not None:
        streamer.finish()
    else:
        for tokens in out.tokens:
            print(json.dumps(decoded_text(adapter, tokens)))
    if out.stats is not None and not args.quiet:
        print(_stats_line(out.stats, "bytes" if adapter.metric_name == "bits_per_byte" else "tokens"), file=sys.stderr)
    return 0


def decoded_text(adapter, tokens) -> str:
    """The adapter's decoding of ``tokens`` as text (bytes as UTF-8, an unfinished or bad sequence as U+FFFD)."""
    import torch

    ids = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=torch.long)
    value = adapter.decode(ids)
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


class TextStreamer:
    """``generate``'s ``callback`` that prints one continuation as it is generated: after each token the ids so
    far are decoded and only the text that cannot change any more is written: up to the last whitespace (a
    later token may still merge with the last word: a WordPiece ``##`` piece, a tokenizer's clean-up), never an
    unfinished UTF-8 character (it decodes as U+FFFD until its last byte arrives), and only while the decoding
    still extends what was written. ``finish()`` writes the rest and a newline, so the whole output is the
    decoding of every generated id, as without streaming."""

    def __init__(self, adapter, stream=None) -> None:
        import torch

        self.adapter = adapter
        self.stream = stream if stream is not None else sys.stdout
        self.ids: list[int] = []
        # the ids so far as a tensor, grown by doubling: converting the whole list every token made a long
        # stream quadratic (0.45 s of 4,000 tokens' 0.9 s went to torch.tensor)
        self._buffer = torch.empty(256, dtype=torch.long)
        self.shown = ""

    def _write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()
            self.shown += text

    def _so_far(self):
        n = len(self.ids)
        if n > len(self._buffer):
            grown = self._buffer.new_empty(2 * n)
            grown[: len(self._buffer)] = self._buffer
            self._buffer = grown
        self._buffer[n - 1] = self.ids[-1]
        return self._buffer[:n]

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(int(token))
        text = decoded_text(self.adapter, self._so_far())
        if not text.startswith(self.shown):
            return  # the decoding changed what was written (rare): wait for finish()
        stable = text.rstrip("\ufffd")
        end = len(stable)
        while end > len(self.shown) and not stable[end - 1].isspace():  # hold back the last word
            end -= 1
        if end > len(self.shown):
            self._write(stable[len(self.shown) : end])

    def finish(self) -> None:
        text = decoded_text(self.adapter, self.ids)
        self._write(text[len(self.shown) :])
        self.stream.write("\n")
        self.stream.flush()


def _stats_line(stats, unit: str) -> str:
    """``speculative: 12 rounds, 63.4% of 82 drafted bytes accepted, 3.42 bytes per target forward``."""
    return (
        f"seqlab generate: speculative: {stats.rounds} rounds, {100 * stats.acceptance_rate:.1f}% of "
        f"{stats.drafted} drafted {unit} accepted, {stats.tokens_per_round:.2f} {unit} per target forward"
    )


def _generate(args) -> int:
    from seqlab.cli import require
    from seqlab.errors import ConfigError

    require(args, "model")
    if args.speculate is not None and args.draft is None:
        raise ConfigError("generate: --speculate K goes with --draft DRAFT (a model file, run folder or maxgram)")
    if args.prompt or args.prompt_file:
        return _generate_prompts(args)
    if not (args.store and args.out):
        raise ConfigError("generate: give STORE and OUT (a Ray job over a store), or --prompt/--prompt-file")
    if args.draft is not None:
        raise ConfigError("generate: --draft works with --prompt/--prompt-file (in process), not with a store job")
    from seqlab.cli.jobs import job_options, report, run_job

    # the job samples unless its temperature is 0: greedy (0) unless --do-sample
    return report(
        run_job(
            "generate",
            args.model,
            args.store,
            args.out,
            max_new_tokens=args.max_new_tokens,
            prompt_length=args.prompt_length,
            temperature=args.temperature if args.do_sample else 0.0,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            allow_specials=args.allow_specials,
            **job_options(args),
        )
    )


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="continue prompts, or every stored sequence (Ray Data), with a model",
        description="Continue --prompt or --prompt-file texts in this process and print each "
        "continuation (one prompt: as it is generated; several: one line of JSON per prompt). --model is a model "
        "file, a run folder, or a pretrained directory (save_pretrained's, or a transformers Mamba / Mamba-2 "
        "directory with its tokenizer.json). With STORE OUT "
        "instead: continue each stored sequence (its last --prompt-length elements, or all of it) "
        "as a Ray Data job and write the new token ids to the OUT store. Greedy unless "
        "--do-sample.",
    )
    add_job_options(g, segments=False, optional_stores=True)
    g.add_argument("--prompt", action="append", help="a prompt text to continue (repeat for several)")
    g.add_argument("--prompt-file", action="append", metavar="FILE", help="a file whose bytes are a prompt")
    g.add_argument("--prompt-length", type=count(1), default=None, help="prompt = the last N elements (default all)")
    add_sampling(
        g,
        64,
        "tokens to generate (default 64; fewer when the adapter's end token comes first)",
        seed_default=0,
        seed_text="seed of the sampling (default 0; sequence NAME of a store uses seed + crc32(NAME))",
    )
    g.add_argument(
        "--draft",
        metavar="DRAFT",
        help="speculative decoding with this drafter: a model file or run folder (a model of the same adapter, or "
        "a subword model for a byte model: seqlab train --adapter subword), or 'maxgram' (n-gram matching, no "
        "model); the output is exactly plain decoding's (greedy: the same text)",
    )
    g.add_argument(
        "--speculate",
        type=speculate,
        metavar="K",
        default=None,
        help="with --draft: tokens (bytes) drafted per round, 1 to 1024 (default 4)",
    )
    g.set_defaults(func=_generate)
