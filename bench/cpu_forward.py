"""CPU forward speed: seqlab (native and chunked backends) vs HF transformers' own CPU path, on the same weights.

Config (the issue's): d_model 256, 4 layers, vocab 256, batch 1, fp32; Mamba-1 (d_state 16, expand 2) and
Mamba-2 (d_state 64, headdim 32, chunk 64); Mamba-3 SISO (d_state 64, headdim 32, chunk 64: the same width,
seqlab only, as transformers has no Mamba-3). HF models get random weights; seqlab loads the same weights
through ``seqlab.interop.hf.load``, and the logits are compared on a short input before timing.

seqlab runs twice, on the same weights: "native" is ``set_backend("native")`` (the compiled CPU kernels of
seqlab.kernels; where they do not build or do not cover an op the model needs, the script says why and shows
'-') and "chunked" is ``set_backend("chunked")`` (vectorised PyTorch).

Timing: torch.no_grad, one warm-up on min(L, 1024) tokens, then the median of ``--repeats`` forwards
(time.perf_counter), the peers taking turns. HF runs with use_cache=False and seqlab with return_state=False
(neither returns a state). HF beyond ``--hf-max-len`` tokens is skipped and shown as '-'.

Streaming: a fresh subprocess feeds N tokens to the seqlab Mamba-1 model in chunks of 8192, threading the
state and discarding the logits, and reports its own peak RSS (getrusage ru_maxrss); 100k and 1M tokens each
run in their own subprocess so their peaks do not mix.

    python bench/cpu_forward.py                    # L = 2k, 8k, 32k; HF up to 8k; streaming 100k vs 1M
    python bench/cpu_forward.py --quick            # a smoke test in well under a minute
    python bench/cpu_forward.py --lengths 2048 8192 --skip-stream --threads 1

On a machine shared with other busy processes, multi-threaded torch timings become erratic (OpenMP workers
spin and wait on each other when the cores are oversubscribed); ``--threads 1`` gives stable numbers there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _machine import machine_line, vm_hwm_kib  # noqa: E402  (bench/ is on sys.path when a bench runs)

from seqlab.testing import rel_err  # noqa: E402

VOCAB = 256
D_MODEL = 256
N_LAYER = 4
MODELS = {
    "Mamba-1": dict(ssm="mamba1", d_state=16, expand=2),
    "Mamba-2": dict(ssm="mamba2", d_state=64, expand=2, headdim=32, chunk_size=64),
    "Mamba-3": dict(ssm="mamba3", d_state=64, expand=2, headdim=32, chunk_size=64),
}
#: the models transformers implements (the others are timed on seqlab and its float64 reference only)
HF_MODELS = ("Mamba-1", "Mamba-2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small lengths, one repeat, short streams (smoke test)")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 2048 8192 32768)")
    p.add_argument("--repeats", type=int, help="timed forwards per point; the median is reported (default 3)")
    p.add_argument("--hf-max-len", type=int, default=8192, help="skip HF above this length (default 8192)")
    p.add_argument(
        "--ref-max-len",
        type=int,
        default=2048,
        help="time the float64 reference model up to this length (default 2048)",
    )
    p.add_argument("--skip-hf", action="store_true", help="time seqlab only (builds the models without HF)")
    p.add_argument("--skip-stream", action="store_true", help="skip the streaming memory test")
    p.add_argument(
        "--stream-tokens",
        type=int,
        nargs=2,
        metavar=("SHORT", "LONG"),
        help="token counts of the streaming test (default 100000 1000000)",
    )
    p.add_argument("--stream-chunk", type=int, default=8192, help="streaming chunk length (default 8192)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--stream-child", type=int, help=argparse.SUPPRESS)  # internal: run one streaming measurement
    args = p.parse_args(argv)
    if args.lengths is None:
        args.lengths = [128, 256] if args.quick else [2048, 8192, 32768]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.stream_tokens is None:
        args.stream_tokens = [4096, 16384] if args.quick else [100_000, 1_000_000]
    if args.quick and args.stream_chunk == 8192:
        args.stream_chunk = 2048
    args.check_len = 150 if args.quick else 300  # crosses Mamba-2's chunk boundaries either way
    for name in ("repeats", "stream_chunk"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(n <= 0 for n in args.lengths + args.stream_tokens):
        p.error("lengths and token counts must be positive")
    return args


# --------------------------------------------------------------------------------------------------
def seqlab_config(kind: str):
    from seqlab import BackboneConfig

    return BackboneConfig(d_model=D_MODEL, n_layer=N_LAYER, **MODELS[kind])


def build_hf(kind: str):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    spec = MODELS[kind]
    common = dict(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYER,
        state_size=spec["d_state"],
        expand=spec["expand"],
    )
    if spec["ssm"] == "mamba1":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**common))
    else:
        heads = spec["expand"] * D_MODEL // spec["headdim"]
        model = transformers.Mamba2ForCausalLM(
            transformers.Mamba2Config(
                **common, head_dim=spec["headdim"], num_heads=heads, n_groups=1, chunk_size=spec["chunk_size"]
            )
        )
    # Spread the decay and skip parameters so the agreement check means something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.5, 8.0)))
            elif name.endswith((".D", "norm.weight")):
                p.uniform_(0.5, 1.5)
    return model.eval()


def build_pair(kind: str, with_hf: bool):
    """(seqlab model on the chunked backend, HF model or None) with the same weights."""
    from seqlab import LanguageModel
    from seqlab.interop import hf as seqlab_hf

    torch.manual_seed(0)
    if with_hf and kind in HF_MODELS:
        hf = build_hf(kind)
        model = seqlab_hf.load(hf)
    else:
        hf = None
        model = LanguageModel(seqlab_config(kind), vocab_size=VOCAB).eval()
    return model.set_backend("chunked"), hf


def native_peer(model, vocab: int = VOCAB, check_len: int = 37):
    """(a copy of ``model`` on seqlab's compiled CPU kernels, "") or (None, why not).

    ``set_backend`` itself checks nothing; a short forward (odd length) finds out whether every op the model
    needs has a native kernel that builds here."""
    from seqlab.kernels.errors import KernelBackendError

    native = copy.deepcopy(model).set_backend("native")
    ids = torch.randint(0, vocab, (1, check_len), generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            native(ids, return_state=False)
    except (KernelBackendError, ImportError, AttributeError, NotImplementedError) as exc:
        # ImportError / AttributeError: a C source exists but its Python wrapper (native_ops) has not landed yet
        return None, f"{type(exc).__name__}: {exc}"
    return native, ""


def native_status() -> str:
    """One line: the commit measured and which compiled CPU kernels build here (csrc file: yes/no)."""
    from seqlab.kernels._dispatch import NATIVE_SOURCES
    from seqlab.kernels._native import native_available

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    sources = sorted(set(NATIVE_SOURCES.values()))
    built = ", ".join(f"{src} {'yes' if native_available(src) else 'no'}" for src in sources)
    return f"commit: {commit or 'unknown'}; native kernels built here: {built}"


@torch.no_grad()
def time_peers(fns: dict, length: int, repeats: int) -> dict:
    """Median seconds of each ``fn(ids)`` on the same ``length`` random tokens.

    The peers take turns within every repeat (seqlab, HF, seqlab, HF, ...), so a slow spell of a shared
    machine falls on all of them alike and the ratio stays meaningful. One warm-up each on min(length, 1024).
    """
    gen = torch.Generator().manual_seed(length)
    warm = torch.randint(0, VOCAB, (1, min(length, 1024)), generator=gen)
    for fn in fns.values():
        fn(warm)
    ids = torch.randint(0, VOCAB, (1, length), generator=gen)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# --------------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None, digits: int = 1) -> str:
    return "-" if a is None or b is None else f"{a / b:.{digits}f}x"


def run_speed(args) -> None:
    rows = []
    scaling = []
    for kind in MODELS:
        model, hf = build_pair(kind, with_hf=not args.skip_hf)
        native, why = native_peer(model)
        if native is None:
            print(f"{kind}: seqlab native: unavailable ({why})", flush=True)
        if hf is not None:
            ids = torch.randint(0, VOCAB, (1, args.check_len), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                want = hf(ids, use_cache=False).logits
                err = rel_err(model(ids, return_state=False).logits, want)
                native_err = (
                    "" if native is None else f", native {rel_err(native(ids, return_state=False).logits, want):.2e}"
                )
            print(
                f"{kind}: seqlab vs HF logits on {args.check_len} tokens: max|diff|/max|HF| = {err:.2e} (chunked)"
                f"{native_err}",
                flush=True,
            )
        reference = copy.deepcopy(model).double().set_backend("ref")
        rates = {}
        for length in args.lengths:
            peers = {} if native is None else {"native": lambda x: native(x, return_state=False)}
            peers["seqlab"] = lambda x: model(x, return_state=False)
            if hf is not None and length <= args.hf_max_len:
                peers["hf"] = lambda x: hf(x, use_cache=False)
            seconds = time_peers(peers, length, args.repeats)
            if length <= args.ref_max_len:  # the sequential float64 truth: slow, timed once
                seconds.update(time_peers({"ref": lambda x: reference(x, return_state=False)}, length, 1))
            rate = {name: length / s for name, s in seconds.items()}
            rates[length] = rate
            chunked, nat, hf_rate, ref_rate = rate["seqlab"], rate.get("native"), rate.get("hf"), rate.get("ref")
            rows.append(
                f"| {kind} | {length} | {fmt_rate(nat)} | {fmt_rate(chunked)} | {fmt_rate(hf_rate)} | "
                f"{_ratio(nat, hf_rate)} | {_ratio(chunked, hf_rate)} | {_ratio(nat, chunked, 2)} | "
                f"{fmt_rate(ref_rate)} | {_ratio(chunked, ref_rate, 0)} |"
            )
            print(
                f"  {kind} L={length}: seqlab native {fmt_rate(nat)} tok/s, chunked {fmt_rate(chunked)} tok/s, "
                f"HF {fmt_rate(hf_rate)} tok/s, float64 ref {fmt_rate(ref_rate)} tok/s",
                flush=True,
            )
        lo, hi = min(rates), max(rates)
        if hi != lo:
            for peer, label in (("native", "native"), ("seqlab", "chunked")):
                if peer in rates[hi] and peer in rates[lo]:
                    scaling.append(
                        f"{kind}: seqlab {label} tok/s at L={hi} / at L={lo} = {rates[hi][peer] / rates[lo][peer]:.2f}"
                    )

    print()
    print(
        "| model | L | seqlab native tok/s | seqlab chunked tok/s | HF tok/s | native / HF | chunked / HF | "
        "native / chunked | float64 ref tok/s | chunked / ref |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    print()
    for line in scaling:
        print(line)


def stream_child(total: int, chunk: int) -> None:
    """Runs in its own process: stream ``total`` tokens through the Mamba-1 model; print peak RSS as JSON."""
    from seqlab import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(seqlab_config("Mamba-1"), vocab_size=VOCAB).eval().set_backend("chunked")
    gen = torch.Generator().manual_seed(0)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # torch + model, before any token
    state = None
    done = 0
    start = time.perf_counter()
    with torch.no_grad():
        while done < total:
            n = min(chunk, total - done)
            ids = torch.randint(0, VOCAB, (1, n), generator=gen)
            state = model(ids, state).state  # logits dropped here
            done += n
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "tokens": done,
                "position": state.position,
                "seconds": seconds,
                "peak_rss_kib": peak_kib,
                "baseline_rss_kib": baseline_kib,
                "vm_hwm_kib": vm_hwm_kib(),
            }
        )
    )


# Linux carries the high-water mark of the memory a process had before exec into its ru_maxrss, and a child
# made by fork/vfork starts from its parent's: a direct child of this (large) process would report at least
# this process's peak. A tiny launcher in between makes the measured process a grandchild whose ru_maxrss
# starts from the launcher's few MiB.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def run_stream(args) -> None:
    results = []
    for total in args.stream_tokens:
        cmd = [
            sys.executable,
            "-S",
            "-c",
            _LAUNCHER,
            sys.executable,
            os.path.abspath(__file__),
            "--stream-child",
            str(total),
            "--stream-chunk",
            str(args.stream_chunk),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"streaming subprocess for {total} tokens failed (exit {proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["position"] != total:
            raise SystemExit(f"streaming subprocess consumed {result['position']} tokens, expected {total}")
        results.append(result)

    print()
    print(
        f"Streaming (seqlab Mamba-1, chunks of {args.stream_chunk}, state threaded, logits discarded; "
        f"each run in a fresh subprocess; peak RSS = its getrusage ru_maxrss, VmHWM = /proc cross-check):"
    )
    print()
    print("| tokens | peak RSS (MiB) | VmHWM (MiB) | RSS before streaming (MiB) | seconds | tok/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        hwm = "-" if r["vm_hwm_kib"] is None else f"{r['vm_hwm_kib'] / 1024:.0f}"
        print(
            f"| {r['tokens']:,} | {r['peak_rss_kib'] / 1024:.0f} | {hwm} | {r['baseline_rss_kib'] / 1024:.0f} | "
            f"{r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} |"
        )
    short, long = results
    print()
    print(
        f"peak RSS {long['tokens']:,} / {short['tokens']:,} tokens = {long['peak_rss_kib'] / short['peak_rss_kib']:.2f}"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stream_child is not None:
        stream_child(args.stream_child, args.stream_chunk)
        return
    print(machine_line())
    print(
        f"config: d_model {D_MODEL}, {N_LAYER} layers, vocab {VOCAB}, batch 1, fp32; "
        f"Mamba-1 d_state 16 expand 2; Mamba-2 and Mamba-3 (SISO) d_state 64 headdim 32 chunk 64; "
        f"median of {args.repeats} after a warm-up; HF up to L={args.hf_max_len}"
        + (" (skipped)" if args.skip_hf else "")
    )
    print(native_status())
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print()
    run_speed(args)
    if not args.skip_stream:
        run_stream(args)


if __name__ == "__main__":
    main()
