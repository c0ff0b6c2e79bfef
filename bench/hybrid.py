"""Decode speed and state size against context: a pure attention model, a 50% Mamba-2 hybrid, an all-Mamba-2 model.

Three LanguageModels of the same width and depth (d_model 256, 4 layers, vocab 256, fp32, no feed-forward, as
in bench/cpu_forward.py), on the CPU, in one process:
- "attention" (the teacher): every layer ``ssm="attention"``, 4 heads of 64 (``--kv-heads`` for GQA; default 4,
  plain multi-head), rotary positions, no window. Its state is the KV cache: 2 x kv_heads x head_dim x 4 bytes
  per token per layer, growing with the context.
- "hybrid": layers 0 and 2 Mamba-2, layers 1 and 3 attention (every other layer, Jamba's interleave).
- "mamba2": every layer Mamba-2 (d_state 64, headdim 32, chunk 64, expand 2: bench/cpu_forward.py's Mamba-2).
  Its state is fixed-size, whatever the context.

For each context C a random prompt of C tokens is prefilled in chunks of ``--prefill-chunk`` tokens with the state
threaded (exact by the state contract; the chunk bounds the attention score matrix a prefill call builds), and
the prefill is timed once. Then ``--new-tokens`` greedy decode steps (``model.step`` on the argmax, the loop
``generate`` runs) are timed from that state, ``--repeats`` times (the state is never changed in place, so every
repeat starts from the same one); models and contexts take turns within a repeat and the median is shown.
"state bytes" is ``RecurrentState.nbytes()`` after the prefill; "per token" divides it by C.

A Mamba-2 layer's decode cost does not depend on C: the check line divides the all-Mamba-2 model's decode rate
at the longest context by its rate at the shortest.

    python bench/hybrid.py                    # contexts 1k, 8k, 64k; 64 new tokens; 3 repeats
    python bench/hybrid.py --quick            # tiny contexts (smoke test)
    python bench/hybrid.py --contexts 1024 8192 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import machine_line  # (bench/ is on sys.path when a bench runs)

VOCAB = 256
D_MODEL = 256
N_LAYER = 4
MAMBA2 = dict(d_state=64, expand=2, headdim=32, chunk_size=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny contexts, few tokens, one repeat (smoke test)")
    p.add_argument("--contexts", type=int, nargs="+", help="context lengths (default 1024 8192 65536)")
    p.add_argument("--new-tokens", type=int, help="decode steps per measurement (default 64)")
    p.add_argument("--repeats", type=int, help="timed decodes per point; the median is shown (default 3)")
    p.add_argument("--prefill-chunk", type=int, help="tokens per prefill call (default 1024)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads of the attention layers (default 4)")
    p.add_argument("--models", nargs="+", choices=("attention", "hybrid", "mamba2"), help="default: all three")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    args = p.parse_args(argv)
    args.contexts = args.contexts or ([32, 256] if args.quick else [1024, 8192, 65536])
    args.new_tokens = args.new_tokens or (4 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.prefill_chunk = args.prefill_chunk or (64 if args.quick else 1024)
    args.models = args.models or ["attention", "hybrid", "mamba2"]
    if any(c < 1 for c in args.contexts) or args.new_tokens < 1 or args.repeats < 1 or args.prefill_chunk < 1:
        p.error("contexts, --new-tokens, --repeats and --prefill-chunk must be positive")
    if args.kv_heads < 1 or 4 % args.kv_heads:
        p.error("--kv-heads must divide the 4 query heads")
    return args


def build(kind: str, kv_heads: int):
    from seqlab.config import BackboneConfig
    from seqlab.models import LanguageModel

    attn = dict(attn_heads=4, attn_kv_heads=kv_heads)
    if kind == "attention":
        config = BackboneConfig(d_model=D_MODEL, n_layer=N_LAYER, ssm="attention", **attn)
    elif kind == "hybrid":
        overrides = {i: {"mixer": "attention"} for i in range(1, N_LAYER, 2)}
        config = BackboneConfig(
            d_model=D_MODEL, n_layer=N_LAYER, ssm="mamba2", **MAMBA2, **attn, layer_overrides=overrides
        )
    else:
        config = BackboneConfig(d_model=D_MODEL, n_layer=N_LAYER, ssm="mamba2", **MAMBA2)
    torch.manual_seed(0)
    return LanguageModel(config, vocab_size=VOCAB).eval()


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk: int):
    """The state after ``ids`` (1, C), fed ``chunk`` tokens at a time; and the last logits."""
    state, logits = None, None
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start : start + chunk], state)
        state, logits = out.state, out.logits[:, -1]
    return state, logits


@torch.no_grad()
def decode(model, state, logits: torch.Tensor, steps: int) -> None:
    """``steps`` greedy decode steps from ``state`` (what ``generate`` does per token, without its bookkeeping)."""
    for _ in range(steps):
        out = model.step(logits.argmax(-1), state)
        state, logits = out.state, out.logits


def attention_bytes(state, model) -> int:
    kinds = [model.config.layer_spec(i)[0] for i in range(model.config.n_layer)]
    return sum(
        t.numel() * t.element_size()
        for i, layer in enumerate(state.layers)
        if kinds[i] == "attention"
        for t in layer.values()
    )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    print(
        f"d_model {D_MODEL}, {N_LAYER} layers, vocab {VOCAB}, fp32, CPU; attention: 4 heads x 64, kv_heads "
        f"{args.kv_heads}; prefill in chunks of {args.prefill_chunk}; {args.new_tokens} greedy decode steps, "
        f"median of {args.repeats}"
    )
    models = {kind: build(kind, args.kv_heads) for kind in args.models}
    gen = torch.Generator().manual_seed(0)
    prompts = {c: torch.randint(0, VOCAB, (1, c), generator=gen) for c in args.contexts}
    prefilled, prefill_s = {}, {}
    for kind, model in models.items():
        for c, ids in prompts.items():
            start = time.perf_counter()
            prefilled[kind, c] = prefill(model, ids, args.prefill_chunk)
            prefill_s[kind, c] = time.perf_counter() - start
            print(f"  prefilled {kind} at {c:,}: {prefill_s[kind, c]:.1f} s", flush=True)
    for key, (state, logits) in prefilled.items():  # warm-up: one short decode each
        decode(models[key[0]], state, logits, min(2, args.new_tokens))
    times: dict = {key: [] for key in prefilled}
    for _ in range(args.repeats):
        for key, (state, logits) in prefilled.items():
            start = time.perf_counter()
            decode(models[key[0]], state, logits, args.new_tokens)
            times[key].append(time.perf_counter() - start)
    rate = {key: args.new_tokens / statistics.median(t) for key, t in times.items()}

    print()
    print("| model | context | prefill s | decode tok/s | ms / token | state bytes | KV cache part | per token |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, model in models.items():
        for c in args.contexts:
            state = prefilled[kind, c][0]
            nbytes, kv = state.nbytes(), attention_bytes(state, model)
            print(
                f"| {kind} | {c:,} | {prefill_s[kind, c]:.1f} | {rate[kind, c]:,.1f} | {1000 / rate[kind, c]:.2f} | "
                f"{human(nbytes)} | {human(kv)} | {nbytes / c:,.1f} B |"
            )
    if "attention" in models:
        others = [k for k in models if k != "attention"]
        print()
        print(
            "| context | "
            + " | ".join(f"{k} / attention decode tok/s" for k in others)
            + " | "
            + " | ".join(f"attention / {k} state bytes" for k in others)
            + " |"
        )
        print("|---|" + "---|" * (2 * len(others)))
        for c in args.contexts:
            speed = [f"{rate[k, c] / rate['attention', c]:.2f}x" for k in others]
            size = [f"{prefilled['attention', c][0].nbytes() / prefilled[k, c][0].nbytes():,.1f}x" for k in others]
            print(f"| {c:,} | " + " | ".join(speed + size) + " |")
    lo, hi = min(args.contexts), max(args.contexts)
    print()
    for kind in models:
        print(f"{kind}: decode tok/s at {hi:,} / at {lo:,} = {rate[kind, hi] / rate[kind, lo]:.2f}")
    if "mamba2" in models:
        print("(a Mamba-2 layer's decode cost is flat in the context: the all-Mamba-2 ratio should be about 1)")


if __name__ == "__main__":
    main()
