"""Decode speed against context length: seqlab's generate vs HF transformers' generate, on the same weights.

The models are the ones in bench/cpu_forward.py: d_model 256, 4 layers, vocab 256, fp32. For each context C,
a random prompt of C tokens is prefilled, then ``--new-tokens`` tokens are decoded greedily.
- seqlab: the prompt's first C - 1 tokens are prefilled, then ``generate`` is timed from the last token. That
  time is almost all decode.
- HF: the prompt is prefilled with ``use_cache=True``, then one cached forward per greedy token is timed
  (what its ``generate`` does per token).
A recurrent model's per-token cost should not depend on C.

A second table sets seqlab's fused decode step (``seqlab.fused_step``, the default) against its eager per-block
step (``model.fused_step = False``) on the same prefilled states, at batch 1 and 16 (the batch-16 state is the
batch-1 state repeated: every row at context C), with the ratio, and batch 16's tokens/s over batch 1's.

    python bench/generate.py                       # contexts 1k and 64k, 128 new tokens, HF up to 8k context
    python bench/generate.py --quick               # smoke test
    python bench/generate.py --hf-max-context 65536   # HF at 64k too (its slow path prefill takes minutes)
    python bench/generate.py --skip-hf --batches 1 16   # fused vs eager only
    python bench/generate.py --ffn mlp --models Mamba-1 Mamba-2   # blocks with a gated MLP (MambaByte's)
    python bench/generate.py --ffn moe --models Mamba-1 Mamba-2   # blocks with a 4-expert top-1 MoE
    python bench/generate.py --skip-hf --bf16      # also a bfloat16 copy: fused vs the fp32 model and vs eager
    python bench/generate.py --skip-hf --shape 768 24 --models Mamba-1   # mamba-130m's width and depth
    python bench/generate.py --skip-hf --sampling  # sampled decoding: many steps per call vs one per token
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from _machine import machine_line
from cpu_forward import MODELS, N_LAYER, VOCAB, build_pair, seqlab_config

from seqlab import LanguageModel


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (default 1024 65536)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per measurement (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="seqlab timings per context; the median is shown")
    p.add_argument("--hf-max-context", type=int, default=8192, help="skip HF above this context (default 8192)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--quick", action="store_true", help="short contexts and few tokens (smoke test)")
    p.add_argument("--threads", type=int)
    p.add_argument("--models", nargs="+", default=None, help=f"a subset of {list(MODELS)} (default: all)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="fused vs eager batch sizes (1 16)")
    p.add_argument("--skip-eager", action="store_true", help="leave out the fused vs eager table")
    p.add_argument(
        "--ffn",
        choices=["mlp", "moe"],
        help="give every block a feed-forward: mlp, the gated MLP (MambaByte's blocks, d_ffn 8/3 d_model), or moe, "
        "4 experts of that width, top-1 (MoE-Mamba's); seqlab only: transformers has no such Mamba",
    )
    p.add_argument(
        "--attention",
        type=int,
        nargs="+",
        metavar="LAYER",
        help="make these layers causal attention (4 heads of 64, rotary): a hybrid, its KV cache growing with the "
        "context; seqlab only",
    )
    p.add_argument(
        "--attn-kv-heads",
        type=int,
        choices=[1, 2, 4],
        default=4,
        help="key/value heads of those layers (default 4: one per query head; fewer is grouped-query attention)",
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=2,
        metavar=("D_MODEL", "N_LAYER"),
        help="other widths and depths than the bench models' 256 x 4 (768 24: mamba-130m's shape); seqlab only",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="also time the model converted to bfloat16 (its compiled step computes in float32 on the bfloat16 "
        "weights): against its eager step and against the float32 model's compiled step",
    )
    p.add_argument(
        "--sampling",
        action="store_true",
        help="also time sampled decoding (temperature 0.8, top-k 50, top-p 0.95): the many-steps compiled call "
        "(sampling in C) against one compiled step per token",
    )
    args = p.parse_args(argv)
    unknown = sorted(set(args.models or ()) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    args.contexts = args.contexts or ([64, 512] if args.quick else [1024, 65536])
    args.new_tokens = args.new_tokens or (8 if args.quick else 128)
    args.repeats = 1 if args.quick else args.repeats
    if args.new_tokens < 2 or any(c < 2 for c in args.contexts):
        p.error("--new-tokens and every context must be at least 2")
    layers = args.shape[1] if args.shape else N_LAYER
    if args.attention and any(not 0 <= i < layers for i in args.attention):
        p.error(f"--attention: layers are 0..{layers - 1}, got {args.attention}")
    if args.shape and min(args.shape) < 1:
        p.error(f"--shape: D_MODEL and N_LAYER must be positive, got {args.shape}")
    return args


@torch.no_grad()
def seqlab_decode_rates(model, prompts: dict, states: dict, new_tokens: int, repeats: int) -> dict:
    """Median decode tok/s per context. Every context is prefilled first (its first C - 1 tokens); the
    timed ``generate`` calls from the last token then take turns across contexts, repeat after repeat, so
    a slow spell of the machine hits all of them alike. ``generate`` never changes the state it is given."""
    times = {c: [] for c in prompts}
    for _ in range(repeats):
        for c, p in prompts.items():
            start = time.perf_counter()
            out = model.generate(p[:, -1:], new_tokens, temperature=0, state=states[c])
            times[c].append(time.perf_counter() - start)
            assert len(out.tokens[0]) == new_tokens
    return {c: new_tokens / statistics.median(t) for c, t in times.items()}


@torch.no_grad()
def paired_rates(model, prompts: dict, states: dict, new_tokens: int, repeats: int, batches, use, **options) -> dict:
    """{(context, batch): (tok/s after ``use(True)``, after ``use(False)``)}: ``generate`` with ``options`` from the
    same prefilled states, the two peers taking turns within every repeat (medians), so machine noise hits both
    alike. ``use(peer)`` sets the peer up; where it returns a model, that model generates instead of ``model``.
    Each timed call follows an untimed 2-token call of the same kind, so one-off costs of a first call stay out of
    the timing (docs/benchmarks.md, fourth sitting, has a slow cell this did not remove)."""
    from seqlab.state import RecurrentState

    times: dict = {}
    for _ in range(repeats):
        for c, p in prompts.items():
            for batch in batches:
                state = states[c] if batch == 1 else RecurrentState.stack([states[c]] * batch)
                last = p[:, -1:].expand(batch, 1).contiguous()
                for peer in (True, False):
                    chosen = use(peer) or model
                    chosen.generate(last, 2, state=state, **options)
                    start = time.perf_counter()
                    out = chosen.generate(last, new_tokens, state=state, **options)
                    times.setdefault((c, batch, peer), []).append(time.perf_counter() - start)
                    assert len(out.tokens) == batch and len(out.tokens[0]) == new_tokens
    return {
        (c, b): tuple(b * new_tokens / statistics.median(times[(c, b, f)]) for f in (True, False))
        for c in prompts
        for b in batches
    }


def fused_vs_eager_rates(model, prompts: dict, states: dict, new_tokens: int, repeats: int, batches) -> dict:
    """{(context, batch): (fused tok/s, eager tok/s)}: greedy ``generate`` with the fused step on and off."""
    try:
        use = lambda fused: setattr(model, "fused_step", fused)  # noqa: E731
        return paired_rates(model, prompts, states, new_tokens, repeats, batches, use, temperature=0)
    finally:
        model.fused_step = True


def bf16_rates(model, prompts: dict, states: dict, new_tokens: int, repeats: int, batches) -> dict:
    """{(context, batch): (bfloat16 fused, float32 fused, bfloat16 fused, bfloat16 eager) tok/s}: greedy ``generate``
    on a bfloat16 copy of ``model`` (the same prefilled states: a bfloat16 model's states are float32) against the
    float32 model, then its compiled step against its eager step, each pair taking turns."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    against_fp32 = paired_rates(
        model, prompts, states, new_tokens, repeats, batches, lambda peer: half if peer else model, temperature=0
    )
    against_eager = fused_vs_eager_rates(half, prompts, states, new_tokens, repeats, batches)
    return {key: against_fp32[key] + against_eager[key] for key in against_fp32}


#: what --sampling samples with (a common setting)
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=0)


def sampled_rates(model, prompts: dict, states: dict, new_tokens: int, repeats: int, batches) -> dict:
    """{(context, batch): (many tok/s, one tok/s)}: sampled ``generate`` (``SAMPLING``) with its many-steps
    compiled call (the default: steps and sampling in C until a stop token) against its step-by-step loop (one
    compiled step and one compiled sample per token, which is what DRµGS runs; before
    the many-steps call sampled too, every sampled token took this loop)."""
    import seqlab.generate as generate_module

    many = generate_module.fused_lm_greedy

    def use(peer: bool) -> None:
        generate_module.fused_lm_greedy = many if peer else (lambda *a, **k: None)  # type: ignore[assignment]

    try:
        return paired_rates(model, prompts, states, new_tokens, repeats, batches, use, **SAMPLING)
    finally:
        generate_module.fused_lm_greedy = many  # type: ignore[assignment]


def sampling_cache_rates(model, prompts: dict, states: dict, new_tokens: int, repeats: int, batches) -> dict:
    """{(context, batch): (in place tok/s, copied tok/s)}: sampled ``generate`` on its step-by-step loop (the
    many-steps call switched off: one compiled call per token, as DRµGS runs) with the attention
    caches appended in place (``seqlab.fused_step.KVRoom``, the default) and with the room turned off (every step
    copies each cache, as before it existed)."""
    import seqlab.generate as generate_module
    from seqlab.fused_step import KVRoom

    many = generate_module.fused_lm_greedy

    def use(in_place: bool) -> None:
        generate_module.KVRoom = KVRoom if in_place else (lambda: None)  # type: ignore[assignment]

    try:
        generate_module.fused_lm_greedy = lambda *a, **k: None  # type: ignore[assignment]
        options = dict(do_sample=True, temperature=1.0, seed=0)
        return paired_rates(model, prompts, states, new_tokens, repeats, batches, use, **options)
    finally:
        generate_module.KVRoom = KVRoom  # type: ignore[assignment]
        generate_module.fused_lm_greedy = many  # type: ignore[assignment]


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
    rows, fused_rows, sampling_rows, bf16_rows, sampled_rows = [], [], [], [], []
    greedy_fused: dict = {}
    for kind in args.models or MODELS:
        if args.ffn or args.attention or args.shape:
            torch.manual_seed(0)
            config = seqlab_config(kind)
            if args.shape:
                config = dataclasses.replace(config, d_model=args.shape[0], n_layer=args.shape[1])
                kind = f"{kind} ({args.shape[0]} x {args.shape[1]})"
            if args.ffn:
                moe = dict(moe_experts=4, moe_top_k=1) if args.ffn == "moe" else {}
                config = dataclasses.replace(config, ffn=args.ffn, **moe)
                kind = f"{kind} + {args.ffn.upper()}"
            if args.attention:
                overrides = {i: {"mixer": "attention"} for i in args.attention}
                config = dataclasses.replace(
                    config, layer_overrides=overrides, attn_heads=4, attn_kv_heads=args.attn_kv_heads
                )
                kv = "" if args.attn_kv_heads == 4 else f" ({args.attn_kv_heads} kv heads)"
                kind = f"{kind}, attention in {', '.join(map(str, args.attention))}{kv}"
            model, hf = LanguageModel(config, vocab_size=VOCAB).eval(), None
        else:
            model, hf = build_pair(kind, with_hf=not args.skip_hf)
        # seqlab's default backend ("auto": the compiled kernels on CPU where they build), which the fused step needs;
        # build_pair hands the model over on the chunked backend, where every step would run eagerly
        model.set_backend("auto")
        prompts = {
            c: torch.randint(0, VOCAB, (1, c), generator=torch.Generator().manual_seed(c)) for c in args.contexts
        }
        model.generate([1, 2, 3], 2, temperature=0)  # warm-up
        with torch.no_grad():  # every context prefilled once (its first C - 1 tokens), for both tables
            states = {c: model(p[:, :-1]).state for c, p in prompts.items()}
        rates = seqlab_decode_rates(model, prompts, states, args.new_tokens, args.repeats)
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
        if not args.skip_eager:
            pairs = fused_vs_eager_rates(model, prompts, states, args.new_tokens, args.repeats, args.batches)
            for (context, batch), (fused, eager) in pairs.items():
                greedy_fused[(kind, context, batch)] = fused
                one = pairs[(context, 1)][0] if (context, 1) in pairs else None
                scale = "-" if one is None or batch == 1 else f"{fused / one:.1f}x"
                fused_rows.append(
                    f"| {kind} | {context} | {batch} | {fused:,.0f} | {eager:,.0f} | {fused / eager:.1f}x | {scale} |"
                )
                print(f"  {kind} C={context} batch {batch}: fused {fused:,.0f} tok/s, eager {eager:,.0f}", flush=True)
        if args.bf16:
            for (context, batch), (half, single, half2, eager) in bf16_rates(
                model, prompts, states, args.new_tokens, args.repeats, args.batches
            ).items():
                bf16_rows.append(
                    f"| {kind} | {context} | {batch} | {half:,.0f} | {single:,.0f} | {half / single:.2f}x "
                    f"| {half2:,.0f} | {eager:,.0f} | {half2 / eager:.1f}x |"
                )
                print(
                    f"  {kind} C={context} batch {batch}: bf16 fused {half:,.0f} tok/s, eager {eager:,.0f}", flush=True
                )
        if args.sampling:
            pairs = sampled_rates(model, prompts, states, args.new_tokens, args.repeats, args.batches)
            for (context, batch), (many, one) in pairs.items():
                greedy = greedy_fused.get((kind, context, batch))
                against = "- | -" if greedy is None else f"{greedy:,.0f} | {many / greedy:.2f}x"
                sampled_rows.append(
                    f"| {kind} | {context} | {batch} | {many:,.0f} | {one:,.0f} | {many / one:.2f}x | {against} |"
                )
                print(f"  {kind} C={context} batch {batch}: sampled {many:,.0f} tok/s, per step {one:,.0f}", flush=True)
        if args.attention:
            pairs = sampling_cache_rates(model, prompts, states, args.new_tokens, args.repeats, args.batches)
            for (context, batch), (in_place, copied) in pairs.items():
                sampling_rows.append(
                    f"| {kind} | {context} | {batch} | {in_place:,.0f} | {copied:,.0f} | {in_place / copied:.2f}x |"
                )
    print()
    print("| model | context | seqlab decode tok/s | HF decode tok/s | seqlab / HF |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row)
    if fused_rows:
        print()
        print("| model | context | batch | fused tok/s | eager tok/s | fused / eager | fused batch / batch 1 |")
        print("|---|---|---|---|---|---|---|")
        for row in fused_rows:
            print(row)
    if bf16_rows:
        print()
        print("bfloat16 (greedy): its compiled step against the float32 model's, then against its eager step:")
        print(
            "| model | context | batch | bf16 fused | fp32 fused | bf16 / fp32 | bf16 fused | bf16 eager "
            "| fused / eager |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for row in bf16_rows:
            print(row)
    if sampled_rows:
        print()
        print(
            "sampled (T 0.8, top-k 50, top-p 0.95): many steps per compiled call against one compiled step per "
            "token; greedy fused from the table above (another turn):"
        )
        print(
            "| model | context | batch | sampled, many steps tok/s | sampled, step by step tok/s | many / step "
            "| greedy fused tok/s | sampled / greedy |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for row in sampled_rows:
            print(row)
    if sampling_rows:
        print()
        print("sampling (T=1, step by step), the attention caches appended in place against copied every step:")
        print("| model | context | batch | in place tok/s | copied tok/s | in place / copied |")
        print("|---|---|---|---|---|---|")
        for row in sampling_rows:
            print(row)


if __name__ == "__main__":
    main()
