"""CPU inference: seqlab vs llama.cpp (through llama-cpp-python) on the same weights, at the same thread count.

Each seqlab model is exported with ``seqlab.interop.gguf.export_gguf`` (f32, the byte vocabulary) and loaded by
llama.cpp from that file, so both run the same float32 weights. Models: Mamba-1 and Mamba-2 at the bench's width
(bench/cpu_forward.py: d_model 256, 4 layers, vocab 256) and a mamba-130m-shaped Mamba-1 (d_model 768, 24 layers,
d_state 16, expand 2; vocab 256 so the byte vocabulary exports: the 50k-token head of the real model would add
the same cost to both sides). seqlab runs on its default backend ("auto": the compiled CPU kernels where they
build, else the chunked PyTorch path; the line "native kernels built here" says which).

First the agreement on a short prompt: llama.cpp's logits (``logits_all=True``) against seqlab's, and the greedy
continuation of both. Then, peers taking turns within every repeat (median of ``--repeats``, one warm-up each):
- prompt processing of L tokens from an empty state: seqlab ``model(ids)`` (logits of every position and the
  final state), llama.cpp ``Llama.eval`` (``n_batch`` = ``n_ubatch`` = 512, llama.cpp's defaults; logits of the
  last position);
- decode at batch 1: after a prompt of ``--decode-context`` tokens, ``--new-tokens`` greedy tokens. seqlab:
  ``model.generate(last prompt token, N, temperature=0, state=...)``; llama.cpp: one ``Llama.eval([token])`` per
  token and the argmax of its last logits (``llama_get_logits_ith(-1)``), the same N single-token forwards.

Threads: ``torch.set_num_threads(T)`` and llama.cpp ``n_threads = n_threads_batch = T`` (``--threads``, default 2).
Both libraries' worker threads spin for a moment after their work, so the script pauses 50 ms before each timed
call: the previous peer's spinning threads must not steal the cores of the next.

    python bench/llamacpp.py                     # L = 2048 and 8192, 128 new tokens, 3 repeats, 2 threads
    python bench/llamacpp.py --quick             # a smoke test in seconds (small lengths, the small models)
    python bench/llamacpp.py --models Mamba-1 --lengths 2048

Without llama-cpp-python (``import llama_cpp``) or the gguf package the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _machine import machine_line  # noqa: E402  (bench/ is on sys.path when a bench runs)
from cpu_forward import MODELS, VOCAB, native_status  # noqa: E402

#: name -> BackboneConfig fields (d_model, n_layer, mixer); the first two are bench/cpu_forward.py's models
SHAPES = {
    "Mamba-1": dict(d_model=256, n_layer=4, **MODELS["Mamba-1"]),
    "Mamba-2": dict(d_model=256, n_layer=4, **MODELS["Mamba-2"]),
    "Mamba-1 130m": dict(d_model=768, n_layer=24, ssm="mamba1", d_state=16, expand=2),
    # mamba2-130m's shape; not in the default run (add it with --models)
    "Mamba-2 130m": dict(d_model=768, n_layer=24, ssm="mamba2", d_state=128, expand=2, headdim=64, chunk_size=256),
}
DEFAULT_MODELS = ("Mamba-1", "Mamba-2", "Mamba-1 130m")
PAUSE_S = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short lengths, one repeat, the small models (smoke test)")
    p.add_argument("--models", nargs="+", choices=list(SHAPES), help=f"default: {', '.join(DEFAULT_MODELS)}")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt-processing lengths (default 2048 8192)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per decode measurement (default 128)")
    p.add_argument("--decode-context", type=int, help="prompt length before the decode (default 512)")
    p.add_argument("--repeats", type=int, help="timed runs per point; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp n_threads (default 2)")
    p.add_argument("--n-batch", type=int, default=512, help="llama.cpp n_batch and n_ubatch (default 512)")
    args = p.parse_args(argv)
    if args.models is None:
        args.models = ["Mamba-1", "Mamba-2"] if args.quick else list(DEFAULT_MODELS)
    if args.lengths is None:
        args.lengths = [128, 512] if args.quick else [2048, 8192]
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 128
    if args.decode_context is None:
        args.decode_context = 64 if args.quick else 512
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    for name in ("repeats", "threads", "n_batch", "new_tokens", "decode_context"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(n <= 0 for n in args.lengths):
        p.error("every length must be positive")
    return args


# --------------------------------------------------------------------------------------------------
def build_model(name: str):
    """A seqlab LanguageModel of shape ``name`` with seeded random weights, eval mode, default backend."""
    from seqlab import BackboneConfig, LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(BackboneConfig(**SHAPES[name]), vocab_size=VOCAB).eval()
    # Spread the decay and skip parameters (as bench/cpu_forward.py does for HF) so the agreement means something.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.5, 8.0)))
            elif pname.endswith((".D", "norm.weight")):
                p.uniform_(0.5, 1.5)
    return model.set_backend("auto")


class LlamaPeer:
    """llama.cpp on a GGUF file: prompt processing, greedy decode, logits (one sequence)."""

    def __init__(self, llama_cpp, path: str, n_ctx: int, threads: int, n_batch: int, logits_all: bool = False):
        self.llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def prefill(self, ids: list[int]) -> None:
        """Process ``ids`` from an empty state (clears the recurrent state first)."""
        self.llm.reset()
        self.llm.eval(ids)

    def last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,)).copy()

    def greedy(self, token: int, n: int) -> list[int]:
        """Feed ``token`` after the current state, then ``n`` greedy steps: n single-token forwards."""
        out = []
        for _ in range(n):
            self.llm.eval([token])
            token = int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))))
            out.append(token)
        return out


def check_agreement(name: str, model, llama_cpp, path: str, threads: int) -> None:
    """Print llama.cpp's logits against seqlab's on a short prompt, and both greedy continuations."""
    prompt = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(5))
    ids = prompt[0].tolist()
    peer = LlamaPeer(llama_cpp, path, n_ctx=256, threads=threads, n_batch=512, logits_all=True)
    peer.prefill(ids)
    got = np.asarray(peer.llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        want = model(prompt).logits[0].double().numpy()
        ours = model.generate(prompt, 16, temperature=0).tokens[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    peer.prefill(ids[:-1])
    theirs = peer.greedy(ids[-1], 16)
    same = sum(a == b for a, b in zip(ours, theirs))
    print(
        f"{name}: llama.cpp vs seqlab logits on {len(ids)} tokens: max|diff|/max|seqlab| = {err:.2e}; "
        f"greedy tokens equal: {same}/16" + ("" if same == 16 else f" (seqlab {ours}, llama.cpp {theirs})"),
        flush=True,
    )
    del peer


def median_turns(fns: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument ``fn``, the peers taking turns within every repeat."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(PAUSE_S)  # let the previous peer's spinning worker threads go idle
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def measure(name: str, model, peer: LlamaPeer, args) -> list[tuple[str, float, float]]:
    """(metric, seqlab tok/s, llama.cpp tok/s) rows for one model."""
    rows = []
    gen = torch.Generator().manual_seed(7)
    warm = torch.randint(0, VOCAB, (1, min(512, max(args.lengths))), generator=gen)
    model(warm)
    peer.prefill(warm[0].tolist())
    for length in args.lengths:
        ids = torch.randint(0, VOCAB, (1, length), generator=gen)
        as_list = ids[0].tolist()
        seconds = median_turns(
            {"seqlab": lambda: model(ids), "llama.cpp": lambda: peer.prefill(as_list)},  # noqa: B023
            args.repeats,
        )
        rows.append((f"prompt {length}", length / seconds["seqlab"], length / seconds["llama.cpp"]))
        print(f"  {name} prompt {length}: {_pair(rows[-1])}", flush=True)

    n = args.new_tokens
    prompt = torch.randint(0, VOCAB, (1, args.decode_context), generator=gen)
    state = model(prompt[:, :-1]).state
    last = int(prompt[0, -1])
    model.generate(prompt[:, -1:], 4, temperature=0, state=state)  # warm-up (generate leaves the state as it is)

    def seqlab_decode():
        out = model.generate(prompt[:, -1:], n, temperature=0, state=state)
        assert len(out.tokens[0]) == n

    def llama_decode():
        # the prefill is outside the timed region: the timed part is the n single-token forwards
        peer.greedy(last, n)

    times = {"seqlab": [], "llama.cpp": []}
    for _ in range(args.repeats):
        time.sleep(PAUSE_S)
        start = time.perf_counter()
        seqlab_decode()
        times["seqlab"].append(time.perf_counter() - start)
        peer.prefill(prompt[0, :-1].tolist())
        time.sleep(PAUSE_S)
        start = time.perf_counter()
        llama_decode()
        times["llama.cpp"].append(time.perf_counter() - start)
    rows.append(
        (
            f"decode b=1 ({n} tokens after {args.decode_context})",
            n / statistics.median(times["seqlab"]),
            n / statistics.median(times["llama.cpp"]),
        )
    )
    print(f"  {name} {rows[-1][0]}: {_pair(rows[-1])}", flush=True)
    return rows


def fmt_rate(value: float) -> str:
    # a 130m-shaped model on a loaded machine decodes a few tokens a second: keep a decimal there
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _pair(row) -> str:
    return f"seqlab {fmt_rate(row[1])} tok/s, llama.cpp {fmt_rate(row[2])} tok/s, ratio {row[1] / row[2]:.2f}"


def fused_note(model) -> str:
    """Which layers ``generate`` runs through seqlab's fused decode step (seqlab.fused_step), in words."""
    try:
        from seqlab.fused_step import fused_layers
    except ImportError:
        return "no fused decode step in this seqlab (eager decode)"
    reasons = fused_layers(model)
    fused = sum(r is None for r in reasons)
    eager = sorted({r for r in reasons if r is not None})
    return f"decode: fused step on {fused}/{len(reasons)} layers" + (f" (eager: {'; '.join(eager)})" if eager else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line())
    try:
        import llama_cpp
    except ImportError as exc:
        print(f"llama-cpp-python is not importable here ({exc}); nothing to compare against: skipped.")
        return 0
    try:
        from seqlab.interop.gguf import byte_vocab, export_gguf
    except ImportError as exc:  # the gguf package is an extra (pip install 'seqlab[gguf]')
        print(f"GGUF export is not available here ({exc}); skipped.")
        return 0
    try:
        import gguf  # noqa: F401  (export_gguf imports it lazily)
    except ImportError as exc:
        print(f"GGUF export needs the gguf package (pip install 'seqlab[gguf]'): {exc}; skipped.")
        return 0

    print(
        f"llama-cpp-python {llama_cpp.__version__}; {args.threads} threads on both sides (torch, llama.cpp "
        f"n_threads and n_threads_batch); fp32 weights (GGUF f32); llama.cpp n_batch = n_ubatch = {args.n_batch}; "
        f"median of {args.repeats}"
    )
    print(native_status())
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print()
    table = []
    with tempfile.TemporaryDirectory(prefix="seqlab-llamacpp-") as tmp:
        for name in args.models:
            model = build_model(name)
            path = str(export_gguf(model, os.path.join(tmp, "model.gguf"), vocab=byte_vocab(), overwrite=True))
            print(
                f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {fused_note(model)}",
                flush=True,
            )
            check_agreement(name, model, llama_cpp, path, args.threads)
            n_ctx = max(max(args.lengths), args.decode_context + args.new_tokens) + 16
            peer = LlamaPeer(llama_cpp, path, n_ctx=n_ctx, threads=args.threads, n_batch=args.n_batch)
            table += [(name, *row) for row in measure(name, model, peer, args)]
            del peer, model
    print()
    print("| model | metric | seqlab tok/s | llama.cpp tok/s | seqlab / llama.cpp |")
    print("|---|---|---|---|---|")
    for name, metric, ours, theirs in table:
        print(f"| {name} | {metric} | {fmt_rate(ours)} | {fmt_rate(theirs)} | {ours / theirs:.2f}x |")
    print()
    print("target (issue 24): seqlab at least as fast as llama.cpp in every row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
