"""Held-out quality of a quantized MambaByte model: RTN, GPTQ and AQLM at about 2, 3 and 4 bits (issue 20).

The model: a MambaByte model trained on the CPython documentation (the demo's corpus; the last 5% held out), or
the model file given with ``--model`` (e.g. the target ``bench/decoding.py`` trains and caches in
``out/bench-decoding/target.safetensors``). Calibration: ``--calib`` windows of 256 bytes drawn (seed
``--seed``) from the training part. Each method quantizes every linear map of the backbone (``quantize_weights``:
simulated quantization, the weights replaced by their dequantized values; layers whose input width the group
size does not divide stay at 16 bits and are counted so) and the held-out text is scored as one stream (pieces of
1024 bytes, state carried). Prints a markdown table (exact bits per parameter of the targets, held-out bits per
byte, seconds) and writes it as JSON.

    python examples/quant_compare.py --model out/bench-decoding/target.safetensors --out out/quant-compare
    python examples/quant_compare.py --quick --out /tmp/qc     # a tiny model trained for a few steps
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

HELD_OUT = 0.05
RTN_GPTQ_BITS = (2, 3, 4)
AQLM_CONFIGS = ("2x6g8", "1x8g4", "3x6g8", "2x8g8", "2x8g6")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a byte model file to quantize (default: train one here)")
    p.add_argument("--aqlm", nargs="+", default=None, help=f"AQLM configs (default {' '.join(AQLM_CONFIGS)})")
    p.add_argument("--group-size", type=int, default=64, help="RTN/GPTQ group size (default 64)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows of 256 bytes (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny model trained for a few steps; few settings")
    p.add_argument("--out", type=Path, default=Path("out/quant-compare"))
    return p.parse_args(argv)


def train_model(data: bytes, quick: bool):
    """A MambaByte model (bench/decoding.py's target size, or a tiny one with --quick) trained on ``data``."""
    from seqlab import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.train import TrainConfig, Trainer

    d_model, n_layer, steps = (32, 2, 20) if quick else (192, 4, 1000)
    adapter = ByteAdapter()
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=d_model, n_layer=n_layer, d_state=16))
    ids = torch.tensor(list(data), dtype=torch.uint8)
    config = TrainConfig(lr=3e-3, warmup_steps=max(1, steps // 20), max_steps=steps, batch_size=16, window=256, seed=0)
    source = adapter.source(ids, batch_size=16, window=256)
    Trainer(model, config, source, loss_fn=adapter.loss, metric_fn=adapter.metric).fit()
    return model.eval()


def bits_per_byte(model, held: torch.Tensor, piece: int = 1024) -> float:
    """Held-out bits per byte over the whole held-out text as one stream, in pieces of ``piece`` bytes with the
    state carried (``seqlab.streaming.stream_metric``: equal to one pass over the whole text)."""
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.streaming import stream_metric

    with torch.no_grad():
        value, _ = stream_metric(model, ByteAdapter(), held.split(piece))
    assert value is not None
    return value


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from seqlab.cli.demo_inputs import python_docs
    from seqlab.quant import quantize_weights

    data = python_docs()
    if args.quick:
        data = data[:40_000]
    split = len(data) - int(len(data) * HELD_OUT)
    train, held_bytes = data[:split], data[split:]
    if args.model:
        from seqlab.domains.registry import model_from_checkpoint

        base = model_from_checkpoint(args.model)[0].eval()
        source = str(args.model)
    else:
        started = time.perf_counter()
        base = train_model(train, args.quick)
        source = f"trained here ({time.perf_counter() - started:.0f} s)"
    params = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(train) - 257, (args.calib,), generator=g).tolist()
    calib = [torch.tensor([list(train[s : s + 256])]) for s in starts]
    held = torch.tensor(list(held_bytes))
    print(f"model: {source}, {params:,} parameters; held-out {len(held):,} bytes; {args.calib} calibration windows "
          f"of 256 bytes (seed {args.seed})")  # fmt: skip
    configs: list[tuple[str, dict]] = [("rtn", {"bits": b, "group_size": args.group_size}) for b in RTN_GPTQ_BITS]
    configs += [("gptq", {"bits": b, "group_size": args.group_size}) for b in RTN_GPTQ_BITS]
    aqlm = args.aqlm or (["2x4g8"] if args.quick else list(AQLM_CONFIGS))
    options = {"max_rounds": 2, "adam_steps": 10} if args.quick else {}
    configs += [("aqlm", {"config": c, "aqlm_options": {**options, "num_threads": args.threads}}) for c in aqlm]
    if args.quick:
        configs = [c for c in configs if c[0] == "aqlm" or c[1]["bits"] == 2]
    rows = [{"method": "fp32", "setting": "-", "bits_per_parameter": 32.0, "bits_per_byte": bits_per_byte(base, held),
             "seconds": 0.0}]  # fmt: skip
    for method, kwargs in configs:
        model = copy.deepcopy(base)
        started = time.perf_counter()
        report = quantize_weights(model, None if method == "rtn" else calib, method, seed=args.seed, **kwargs)
        seconds = time.perf_counter() - started
        rows.append({"method": method, "setting": report.setting, "bits_per_parameter": report.bits_per_parameter(),
                     "bits_per_byte": bits_per_byte(model, held), "seconds": seconds,
                     "layers": [vars(r) for r in report.layers]})  # fmt: skip
        print(f"{method} {report.setting}: {rows[-1]['bits_per_byte']:.4f} bits/byte", flush=True)
    print("\n| method | setting | bits/param | held-out bits/byte | seconds |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["bits_per_parameter"]):
        print(f"| {r['method']} | {r['setting']} | {r['bits_per_parameter']:.3f} | {r['bits_per_byte']:.4f} | "
              f"{r['seconds']:.0f} |")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_compare.json").write_text(json.dumps({"model": source, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
