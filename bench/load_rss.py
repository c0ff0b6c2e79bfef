"""Peak resident memory while loading a sharded bf16 HF Mamba-2 checkpoint (issue 22: within 1.3x of its size).

Builds a ~1 GB bf16 ``Mamba2ForCausalLM``-format directory (``seqlab.interop.hf.save`` with a max shard size
that gives ``--shards`` shards, HF's names and index) in a temp dir, then loads it in a fresh subprocess per
variant and reports the child's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, cross-checked with
/proc VmHWM) absolute and minus the baseline of the same interpreter after ``import torch, seqlab`` (measured in
the child just before loading), as a ratio to the checkpoint's size on disk.

Variants: ``seqlab`` (``load(dir)``: meta-device model, each tensor read into its parameter), ``seqlab-fp32``
(``load(dir, dtype=torch.float32)``: the loaded model is twice the checkpoint; its ratio is against the
loaded size), ``load_file`` (``safetensors.torch.load_file`` of each shard into one dict, for comparison: its
tensors are backed by a memory map of the file, so one byte per 4 KiB page is read to make them resident,
as a forward pass would).

    python bench/load_rss.py                       # ~1 GB, 4 shards, all variants
    python bench/load_rss.py --gb 0.1 --quick      # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_line, status_kib  # (bench/ is on sys.path when a bench runs)

VARIANTS = ("seqlab", "seqlab-fp32", "load_file")


def child(folder: str, variant: str) -> None:
    """Runs in a fresh interpreter: import, note the baseline, load, report peaks as one JSON line."""
    import torch

    import seqlab  # noqa: F401
    from seqlab.interop import hf as seqlab_hf

    torch.set_num_threads(1)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    # Building the first seqlab model imports what torch and seqlab import lazily (torch._dynamo, sympy,
    # triton: ~150 MiB here), whatever its size: a fixed cost, measured apart by building a tiny model first.
    tiny = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 1, "num_heads": 2, "n_groups": 1}
    seqlab_hf.meta_model({**tiny, "vocab_size": 8})
    warm_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "load_file":
        from safetensors.torch import load_file

        index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
        tensors = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(Path(folder) / shard)))
        # safetensors maps the files: a page counts in RSS once touched, as a model's forward would touch it
        checksum = sum(int(t.reshape(-1).view(torch.uint8)[::4096].sum()) for t in tensors.values())
        loaded = sum(t.numel() * t.element_size() for t in tensors.values()) + 0 * checksum
    else:
        dtype = torch.float32 if variant == "seqlab-fp32" else None
        model = seqlab_hf.load(folder, dtype=dtype)
        loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "variant": variant,
                "baseline_kib": base_kib,
                "warm_kib": warm_kib,
                "peak_kib": peak_kib,
                "vm_hwm_kib": status_kib("VmHWM"),
                "loaded_bytes": loaded,
                "seconds": seconds,
            }
        )
    )


def build(folder: Path, gb: float, shards: int) -> dict:
    """A bf16 Mamba-2 LanguageModel of about ``gb`` GB (d_model 2048, vocab 32768, untied), saved sharded."""
    import torch

    from seqlab import BackboneConfig, LanguageModel
    from seqlab.interop import hf as seqlab_hf

    d_model, vocab = 2048, 32768
    with torch.device("meta"):
        probe = LanguageModel(
            BackboneConfig(d_model=d_model, n_layer=1, ssm="mamba2", d_state=128, headdim=64, residual_in_fp32=False),
            vocab_size=vocab,
            tie_embeddings=False,
        )
    per_layer = sum(p.numel() for n, p in probe.named_parameters() if n.startswith("backbone.layers."))
    fixed = sum(p.numel() for n, p in probe.named_parameters() if not n.startswith("backbone.layers."))
    n_layer = max(1, round((gb * 1e9 / 2 - fixed) / per_layer))
    config = BackboneConfig(
        d_model=d_model, n_layer=n_layer, ssm="mamba2", d_state=128, headdim=64, residual_in_fp32=False
    )
    with torch.device("meta"):
        model = LanguageModel(config, vocab_size=vocab, tie_embeddings=False)
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # bf16 from the start: no fp32 copy in the builder
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    seqlab_hf.save(model, folder, max_shard_size=math.ceil(total / shards * 1.01))
    files = sorted(folder.glob("model-*.safetensors"))
    return {
        "n_layer": n_layer,
        "parameters": sum(p.numel() for p in model.parameters()),
        "shards": len(files),
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (bf16)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="0.1 GB, seqlab variant only")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.build:
        info = build(Path(args.build), args.gb, args.shards)
        print(json.dumps({**info, "machine": machine_line()}))
        return
    if args.quick:
        args.gb, args.variants = min(args.gb, 0.1), "seqlab"
    # This process never imports torch and builds nothing: a child's ru_maxrss starts from its parent's
    # resident size at fork, so the parent must stay small; the checkpoint is built in a subprocess too.
    with tempfile.TemporaryDirectory(prefix="seqlab-load-rss-") as tmp:
        folder = Path(tmp) / "ckpt"
        start = time.perf_counter()
        built = (
            subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--build",
                    str(folder),
                    "--gb",
                    str(args.gb),
                    "--shards",
                    str(args.shards),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        info = json.loads(built)
        print(info["machine"])
        size = info["checkpoint_bytes"]
        print(
            f"checkpoint: bf16 Mamba-2, d_model 2048, {info['n_layer']} layers, vocab 32768 untied, "
            f"{info['parameters']:,} parameters, {info['shards']} shards, {size / 1e9:.3f} GB on disk "
            f"(built in {time.perf_counter() - start:.0f} s)"
        )
        print(
            "peak: the child's ru_maxrss; base: after `import torch, seqlab`; warm: after building one tiny model "
            "(lazy imports); ratios against the checkpoint's size on disk (seqlab-fp32: against the loaded fp32 size)"
        )
        print(
            f"{'variant':<12} {'base MiB':>8} {'warm MiB':>8} {'peak MiB':>8} {'loaded MiB':>10} "
            f"{'peak-base':>9} {'peak-warm':>9} {'peak/size':>9} {'load s':>6}"
        )
        for variant in args.variants.split(","):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = (
                subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), variant],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            # the loaded model's own size is the reference: the checkpoint for bf16, twice it for fp32
            ref = max(size, r["loaded_bytes"]) if variant == "seqlab-fp32" else size
            peak, base, warm = (r[k] * 1024 for k in ("peak_kib", "baseline_kib", "warm_kib"))
            print(
                f"{variant:<12} {base / 2**20:>8.0f} {warm / 2**20:>8.0f} {peak / 2**20:>8.0f} "
                f"{r['loaded_bytes'] / 2**20:>10.0f} {(peak - base) / ref:>9.3f} {(peak - warm) / ref:>9.3f} "
                f"{peak / ref:>9.3f} {r['seconds']:>6.1f}"
            )
            if r["vm_hwm_kib"] is not None and abs(r["vm_hwm_kib"] - r["peak_kib"]) > 4096:
                print(f"  note: VmHWM {r['vm_hwm_kib'] / 1024:.0f} MiB differs from ru_maxrss")


if __name__ == "__main__":
    main()
