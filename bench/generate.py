"""Decode speed against context length: seqlab's generate vs HF transformers' generate, on the same weights.

The models are the ones in bench/cpu_forward.py: d_model 256, 4 layers, vocab 256, fp32. For each context C,
a random prompt of C tokens is prefilled, then ``--new-tokens`` tokens are decoded greedily.
- seqlab: the prompt's first C - 1 tokens are prefilled, then ``generate`` is timed from the last token. That
  time is almost all decode.
- HF: the prompt is prefilled with ``use_cache=True``, then one cached forward per greedy token is timed
  (what its ``generate`` does per token).
A recurrent model's per-token cost should not depend on C.

    python bench/generate.py                       # contexts 1k and 64k, 128 new tokens, HF up to 8k context
    python bench/generate.py --quick               # smoke test
    python bench/generate.py --hf-max-context 65536   # HF at 64k too (its slow path prefill takes minutes)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import machine_line
from cpu_forward import MODELS, VOCAB, build_pair


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (default 1024 65536)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per measurement (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="seqlab timings per context; the median is shown")
    p.add_argument("--hf-max-context", type=int, default=8192, help="skip HF above this context (default 8192)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--quick", action="store_true", help="short contexts and few tokens (smoke test)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    args.contexts = args.contexts or ([64, 512] if args.quick else [1024, 65536])
    args.new_tokens = args.new_tokens or (8 if args.quick else 128)
    args.repeats = 1 if args.quick else args.repeats
    if args.new_tokens < 2 or any(c < 2 for c in args.contexts):
        p.error("--new-tokens and every context must be at least 2")
    return args


@torch.no_grad()
def seqlab_decode_rates(model, prompts: dict, new_tokens: int, repeats: int) -> dict:
    """Median decode tok/s per context. Every context is prefilled first (its first C - 1 tokens); the
    timed ``generate`` calls from the last token then take turns across contexts, repeat after repeat, so
    a slow spell of the machine hits all of them alike. ``generate`` never changes the state it is given."""
    states = {c: model(p[:, :-1]).state for c, p in prompts.items()}
    times = {c: [] for c in prompts}
    for _ in range(repeats):
        for c, p in prompts.items():
            start = time.perf_counter()
            out = model.generate(p[:, -1:], new_tokens, temperature=0, state=states[c])
            times[c].append(time.perf_counter() - start)
            assert len(out.tokens[0]) == new_tokens
    return {c: new_tokens / statistics.median(t) for c, t in times.items()}


@torch.no_grad()
def hf_decode_rate(hf, prompt: torch.Tensor, new_tokens: int) -> float:
    """HF's own cached decode: prefill with ``use_cache=True``, then time one forward per greedy token."""
    out = hf(prompt, use_cache=True)
    cache, token = out.cache_params, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = hf(token, cache_params=cache, use_cache=True)
        cache, token = out.cache_params, out.logits[:, -1].argmax(-1, keepdim=True)
    return new_tokens / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"greedy decode of {args.new_tokens} tokens after a prompt of C tokens; HF up to C={args.hf_max_context}")
    rows = []
    for kind in MODELS:
        model, hf = build_pair(kind, with_hf=not args.skip_hf)
        prompts = {
            c: torch.randint(0, VOCAB, (1, c), generator=torch.Generator().manual_seed(c)) for c in args.contexts
        }
        model.generate([1, 2, 3], 2, temperature=0)  # warm-up
        rates = seqlab_decode_rates(model, prompts, args.new_tokens, args.repeats)
        for context, prompt in prompts.items():
            rate = rates[context]
            hf_rate = None
            if hf is not None and context <= args.hf_max_context:
                hf_rate = hf_decode_rate(hf, prompt, args.new_tokens)
            ratio = "-" if hf_rate is None else f"{rate / hf_rate:.1f}x"
            rows.append(
                f"| {kind} | {context} | {rate:,.0f} | {'-' if hf_rate is None else f'{hf_rate:,.0f}'} | {ratio} |"
            )
            print(
                f"  {kind} C={context}: seqlab {rate:,.0f} tok/s, HF "
                f"{'-' if hf_rate is None else f'{hf_rate:,.0f}'} tok/s",
                flush=True,
            )
        lo, hi = min(rates), max(rates)
        rows.append(f"| {kind} | decode tok/s at {hi} / at {lo} | {rates[hi] / rates[lo]:.2f} | | |")
    print()
    print("| model | context | seqlab decode tok/s | HF decode tok/s | seqlab / HF |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
