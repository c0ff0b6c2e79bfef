"""CPU training speed: forward + backward tokens/s of seqlab (native and chunked backends) vs HF transformers' own
trainable CPU path, on the same weights.

Models (bench/cpu_forward.py's): d_model 256, 4 layers, vocab 256, fp32; Mamba-1 (d_state 16, expand 2) and
Mamba-2 (d_state 64, headdim 32, chunk 64). HF gets random weights and seqlab loads the same weights through
``seqlab.interop.hf.load``; before timing, the loss and the embedding's gradient (tied to the head, so every layer
contributes to it) are compared on a short input.

One training step = forward in train mode (HF: ``use_cache=False``; seqlab: ``return_state=False``), the mean
cross-entropy of each position's logits against the next token, and ``loss.backward()``; the gradients are
dropped (set to None) between steps, outside the timed region. No optimizer step: it costs the same for every
peer. Peers take turns within each repeat (native, chunked, HF, native, ...) so a slow spell of a shared machine
falls on all of them; the median of ``--repeats`` is reported after one warm-up step each on min(L, 256) tokens.

HF's Mamba-1 CPU path (no mamba_ssm, no mambapy) scans with a Python loop over positions, and its backward is
quadratic in L: each position's ``discrete_A[:, :, i]`` read hands autograd a gradient the size of the whole
(d_inner, L, d_state) tensor (measured here: 2 s at L = 128, 8 s at 256, 40 s at 512, one thread). So HF Mamba-1 is
timed up to ``--hf-max-len-mamba1`` (512) only; its Mamba-2 path (chunked SSD in PyTorch) up to ``--hf-max-len``.

    python bench/train_speed.py                      # L = 512, 2048, 8192; 3 repeats; HF Mamba-1 at 512 only
    python bench/train_speed.py --quick              # a smoke test in seconds
    python bench/train_speed.py --lengths 2048 --repeats 5 --threads 1

The "native" peer is ``set_backend("native")`` (seqlab's compiled CPU kernels); where they do not build or do not
cover an op the model needs, the script says why and shows '-' in that column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _machine import machine_line  # noqa: E402  (bench/ is on sys.path when a bench runs)
from cpu_forward import HF_MODELS, VOCAB, build_pair, fmt_rate, native_peer, native_status  # noqa: E402

from seqlab.testing import rel_err  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short lengths, one repeat (smoke test)")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 2048 8192)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--repeats", type=int, help="timed steps per point; the median is reported (default 3)")
    p.add_argument("--hf-max-len", type=int, default=8192, help="skip HF Mamba-2 above this length (default 8192)")
    p.add_argument(
        "--hf-max-len-mamba1",
        type=int,
        default=512,
        help="skip HF Mamba-1 above this length (default 512: its backward is quadratic in L)",
    )
    p.add_argument("--models", nargs="+", choices=HF_MODELS, default=list(HF_MODELS), help="which mixers")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    args = p.parse_args(argv)
    if args.lengths is None:
        args.lengths = [128, 256] if args.quick else [512, 2048, 8192]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    # crosses Mamba-2's chunk boundaries (64) either way; short, as HF Mamba-1's backward is quadratic in L
    args.check_len = 100 if args.quick else 130
    if args.repeats <= 0:
        p.error("--repeats must be positive")
    if args.batch <= 0:
        p.error("--batch must be positive")
    if any(n < 2 for n in args.lengths):
        p.error("every length must be at least 2 (the loss needs a next token)")
    if args.threads is not None and args.threads <= 0:
        p.error("--threads must be positive")
    return args


# --------------------------------------------------------------------------------------------------
def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against token t + 1 (the same formula for every peer)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def seqlab_step(model):
    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = next_token_loss(model(ids, return_state=False).logits, ids)
        loss.backward()
        return loss

    return step


def hf_step(hf):
    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = next_token_loss(hf(ids, use_cache=False).logits, ids)
        loss.backward()
        return loss

    return step


def clear_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def time_steps(peers: dict, length: int, batch: int, repeats: int) -> dict:
    """Median seconds of one training step of each peer (name -> (step, module)) on the same random tokens.

    Peers take turns within every repeat; each gets one warm-up step on min(length, 256) tokens first. Clearing
    the gradients happens between steps, outside the timed region."""
    gen = torch.Generator().manual_seed(length)
    warm = torch.randint(0, VOCAB, (batch, min(length, 256)), generator=gen)
    for step, module in peers.values():
        clear_grads(module)
        step(warm)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    times = {name: [] for name in peers}
    for _ in range(repeats):
        for name, (step, module) in peers.items():
            clear_grads(module)
            start = time.perf_counter()
            step(ids)
            times[name].append(time.perf_counter() - start)
            clear_grads(module)
    return {name: statistics.median(values) for name, values in times.items()}


def check_agreement(kind: str, seqlab_models: dict, hf, length: int) -> None:
    """Print the loss and embedding-gradient agreement of every seqlab peer with HF on ``length`` tokens."""
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    clear_grads(hf)
    hf_loss = hf_step(hf)(ids).item()
    hf_grad = hf.get_input_embeddings().weight.grad.clone()
    clear_grads(hf)
    for name, model in seqlab_models.items():
        clear_grads(model)
        loss = seqlab_step(model)(ids).item()
        grad_err = rel_err(model.embeddings.weight.grad, hf_grad)
        clear_grads(model)
        print(
            f"{kind}: seqlab {name} vs HF on {length} tokens: loss {loss:.6f} vs {hf_loss:.6f}, "
            f"embedding grad max|diff|/max|HF| = {grad_err:.2e}",
            flush=True,
        )


def run(args) -> list[str]:
    rows = []
    for kind in args.models:
        model, hf = build_pair(kind, with_hf=True)
        model.train()
        hf.train()
        native, note = native_peer(model, VOCAB)
        if native is None:
            print(f"{kind}: seqlab native: unavailable ({note})", flush=True)
        seqlab_models = {"native": native, "chunked": model} if native is not None else {"chunked": model}
        check_agreement(kind, seqlab_models, hf, args.check_len)
        for length in args.lengths:
            peers = {name: (seqlab_step(m), m) for name, m in seqlab_models.items()}
            if length <= (args.hf_max_len_mamba1 if kind == "Mamba-1" else args.hf_max_len):
                peers["hf"] = (hf_step(hf), hf)
            seconds = time_steps(peers, length, args.batch, args.repeats)
            rate = {name: args.batch * length / s for name, s in seconds.items()}
            nat, chunked, hf_rate = rate.get("native"), rate["chunked"], rate.get("hf")

            def ratio(a, b):
                return "-" if a is None or b is None else f"{a / b:.2f}x"

            rows.append(
                f"| {kind} | {length} | {fmt_rate(nat)} | {fmt_rate(chunked)} | {fmt_rate(hf_rate)} | "
                f"{ratio(nat, hf_rate)} | {ratio(chunked, hf_rate)} | {ratio(nat, chunked)} |"
            )
            print(
                f"  {kind} L={length}: native {fmt_rate(nat)}, chunked {fmt_rate(chunked)}, "
                f"HF {fmt_rate(hf_rate)} tok/s (forward + backward)",
                flush=True,
            )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    print(
        f"training step (forward + next-token cross-entropy + backward), batch {args.batch}, fp32, "
        f"d_model 256, 4 layers, vocab {VOCAB}; median of {args.repeats} after a warm-up; HF Mamba-1 up to "
        f"L={args.hf_max_len_mamba1}, HF Mamba-2 up to L={args.hf_max_len}"
    )
    print(native_status())
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print()
    rows = run(args)
    print()
    print(
        "| model | L | seqlab native tok/s | seqlab chunked tok/s | HF tok/s | native / HF | chunked / HF | "
        "native / chunked |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    print()
    print("target (issue 24): seqlab forward + backward >= 5x HF's CPU path for both mixers")


if __name__ == "__main__":
    main()
