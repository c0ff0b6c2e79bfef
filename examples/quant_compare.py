"""Held-out quality of a quantized MambaByte model: RTN, GPTQ and AQLM at about 2, 3 and 4 bits (issue 20).

The model: a MambaByte model trained here on the CPython documentation (the demo's corpus; the last 5% held out;
``--size small``: d_model 192, 4 layers, 1000 steps, bench/decoding.py's target; ``--size large``: d_model 320,
4 layers, 650 steps; ``--save-model`` keeps it), or the model file given with ``--model``. Calibration: ``--calib``
windows of 256 bytes from the training part, drawn with each seed of ``--seed``..``--seed + --seeds - 1`` (AQLM
initialises with the same seed; RTN is deterministic and runs once). Each method quantizes every linear map of the
backbone (``quantize_weights``: simulated quantization, the weights replaced by their dequantized values; layers
whose input width the group size does not divide stay at 16 bits and are counted so) and the held-out text is
scored as one stream (pieces of 1024 bytes, state carried). Prints a markdown table (exact bits per parameter of
the targets, held-out bits per byte: mean, min-max and std over the seeds, seconds) and writes the JSON (every run,
with each layer's calibration error relative to trace(W XtX W^T), seed by seed as it goes). ``--plot``: bits/byte
against bits/parameter and the per-layer relative error of each method's setting nearest 2 bits, with the runs of
``--plot-with`` (their JSON) on the same axes; ``--from-json`` redraws from a JSON without running.

    python examples/quant_compare.py --model out/bench-decoding/target.safetensors --seeds 3 --out out/quant-small
    python examples/quant_compare.py --size large --save-model out/quant-large/model.safetensors --out out/q-large
    python examples/quant_compare.py --from-json out/quant-small/quant_compare.json --plot qc.png
        --plot-with out/q-large/quant_compare.json     # (one command line)
    python examples/quant_compare.py --quick --out /tmp/qc --plot /tmp/qc/qc.png   # a tiny model, a few steps
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
AQLM_CONFIGS = ("2x6g8", "1x8g4", "3x6g8", "2x8g8", "2x8g6", "4x6g8", "2x8g4")
# (d_model, layers, training steps): small = bench/decoding.py's target; large: ~20 minutes on one thread
SIZES = {"quick": (32, 2, 20), "small": (192, 4, 1000), "large": (320, 4, 650)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a byte model file to quantize (default: train one here)")
    p.add_argument("--aqlm", nargs="+", default=None, help=f"AQLM configs (default {' '.join(AQLM_CONFIGS)})")
    p.add_argument("--group-size", type=int, default=64, help="RTN/GPTQ group size (default 64)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows of 256 bytes (default 32)")
    p.add_argument("--seed", type=int, default=0, help="the first calibration/AQLM seed (default 0)")
    p.add_argument("--seeds", type=int, default=1, help="GPTQ/AQLM runs with seeds seed..seed+N-1 (default 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny model trained for a few steps; few settings")
    p.add_argument("--size", choices=("small", "large"), default="small", help="the model trained without --model")
    p.add_argument("--save-model", type=Path, help="write the model trained here (reuse it with --model)")
    p.add_argument("--out", type=Path, default=Path("out/quant-compare"))
    p.add_argument("--label", help="this model's name in the plot's legend (default: where the model came from)")
    p.add_argument("--plot", type=Path, help="write the figure (PNG) here")
    p.add_argument("--from-json", type=Path, help="no run: the table and plot of this run's quant_compare.json")
    p.add_argument("--plot-with", nargs="*", default=[], type=Path, help="JSON of other runs to draw on the plot")
    return p.parse_args(argv)


def train_model(data: bytes, size: str):
    """A MambaByte model of ``SIZES[size]`` trained on ``data`` (batch 16, windows of 256 bytes)."""
    from seqlab import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.train import TrainConfig, Trainer

    d_model, n_layer, steps = SIZES[size]
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


def calibration_windows(train: bytes, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` windows of 256 bytes of ``train`` at positions drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - 257, (count,), generator=g).tolist()
    return [torch.tensor([list(train[s : s + 256])]) for s in starts]


def output_energy(model, windows: list[torch.Tensor]) -> dict[str, float]:
    """{target: trace(W XtX W^T)}: the summed squared output of each target over the calibration tokens, the scale
    of its calibration error (relative error = error / this)."""
    from seqlab.quant.calibrate import collect_input_moments, select_targets

    moments = collect_input_moments(model, windows)
    energy = {}
    for target in select_targets(model, None):
        w = target.weight.detach().double()
        energy[target.name] = float(((w @ moments[target.name].xtx.double()) * w).sum())
    return energy


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (method, setting): bits/param, held-out bits/byte mean, std, min and max over the seeds, mean
    seconds, and each layer's relative calibration error averaged over the seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    out = []
    for (method, setting), runs in groups.items():
        bpb = torch.tensor([r["bits_per_byte"] for r in runs], dtype=torch.float64)
        layers = []
        for i, layer in enumerate(runs[0].get("layers", [])):
            rel = [r["layers"][i]["relative_error"] for r in runs]
            mean = None if any(v is None for v in rel) else sum(rel) / len(rel)
            layers.append({"name": layer["name"], "relative_error": mean})
        out.append({"method": method, "setting": setting, "bits_per_parameter": runs[0]["bits_per_parameter"],
                    "seeds": [r["seed"] for r in runs], "bits_per_byte": float(bpb.mean()),
                    "std": float(bpb.std()) if len(runs) > 1 else 0.0, "min": float(bpb.min()),
                    "max": float(bpb.max()), "seconds": sum(r["seconds"] for r in runs) / len(runs),
                    "layers": layers})  # fmt: skip
    return sorted(out, key=lambda e: (e["bits_per_parameter"], e["method"]))


METHOD_STYLE = {"rtn": ("RTN", "tab:red", "s"), "gptq": ("GPTQ", "tab:orange", "^"), "aqlm": ("AQLM", "tab:blue", "o")}
MODEL_LINES = ("-", "--", ":")


def plot(path: Path, results: list[dict]) -> None:
    """Two panels: held-out bits/byte against bits/parameter (one colour and marker per method, one line style per
    model, fp32 as a horizontal line, bars from the lowest to the highest seed); and, per layer, the relative
    calibration error of each method's setting nearest 2 bits/parameter (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.25]})
    order: list[str] = []  # layer names, module order
    series: list[tuple] = []  # (relative error by layer, label, colour, marker, line style) for the right panel
    for k, result in enumerate(results):
        line, label = MODEL_LINES[k % len(MODEL_LINES)], result["label"]
        summary = result["summary"]
        fp32 = next(e for e in summary if e["method"] == "fp32")
        left.axhline(fp32["bits_per_byte"], color="black", linestyle=line, linewidth=1)
        for method, (name, colour, marker) in METHOD_STYLE.items():
            points = sorted((e for e in summary if e["method"] == method), key=lambda e: e["bits_per_parameter"])
            if not points:
                continue
            x = [e["bits_per_parameter"] for e in points]
            y = [e["bits_per_byte"] for e in points]
            spread = [[e["bits_per_byte"] - e["min"] for e in points], [e["max"] - e["bits_per_byte"] for e in points]]
            left.errorbar(x, y, yerr=spread, color=colour, marker=marker, linestyle=line, capsize=3, markersize=5)
            near2 = min(points, key=lambda e: abs(e["bits_per_parameter"] - 2))
            values = {la["name"]: la["relative_error"] for la in near2["layers"] if la["relative_error"] is not None}
            for la in near2["layers"]:
                if la["name"] not in order:
                    order.append(la["name"])
            series.append((values, f"{name} {near2['setting']} ({near2['bits_per_parameter']:.2f}) - {label}",
                           colour, marker, line))  # fmt: skip
    names = [n for n in order if any(n in values for values, *_ in series)]  # module order, quantized somewhere
    for values, label, colour, marker, line in series:
        x = [i for i, n in enumerate(names) if n in values]
        right.plot(x, [values[names[i]] for i in x], color=colour, marker=marker, linestyle=line, markersize=5,
                   label=label)  # fmt: skip
    left.set_xlabel("bits per parameter (targets, exact storage)")
    left.set_ylabel("held-out bits per byte")
    left.set_title("held-out bits/byte (mean; bars: min-max over seeds)")
    left.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker=m, linestyle="") for _, c, m in METHOD_STYLE.values()]
    labels = [n for n, _, _ in METHOD_STYLE.values()]
    handles.append(Line2D([], [], color="black", linewidth=1))
    labels.append("fp32")
    for k, result in enumerate(results):
        handles.append(Line2D([], [], color="grey", linestyle=MODEL_LINES[k % len(MODEL_LINES)]))
        labels.append(result["label"])
    left.legend(handles, labels, fontsize=8)
    right.set_yscale("log")
    right.set_xticks(range(len(names)))
    right.set_xticklabels([n.removeprefix("backbone.") for n in names], rotation=60, ha="right", fontsize=7)
    right.set_ylabel("calibration error / trace(W XtX W^T)")
    right.set_title("per-layer relative output error, setting nearest 2 bits/param")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(args) -> dict:
    """Train or load the model, quantize it with every setting and seed, score each; the result (as JSON)."""
    from seqlab.cli.demo_inputs import python_docs
    from seqlab.quant import quantize_weights

    data = python_docs()
    if args.quick:
        data = data[:40_000]
    split = len(data) - int(len(data) * HELD_OUT)
    train, held_bytes = data[:split], data[split:]
    training_seconds = None
    if args.model:
        from seqlab.domains.registry import model_from_checkpoint

        base = model_from_checkpoint(args.model)[0].eval()
        source = str(args.model)
    else:
        started = time.perf_counter()
        size = "quick" if args.quick else args.size
        base = train_model(train, size)
        training_seconds = time.perf_counter() - started
        source = f"trained here ({size}: d_model {SIZES[size][0]}, {SIZES[size][1]} layers, {SIZES[size][2]} steps, "
        source += f"{training_seconds:.0f} s)"
        if args.save_model:
            from seqlab.checkpoint import save_model

            args.save_model.parent.mkdir(parents=True, exist_ok=True)
            save_model(args.save_model, base)
    params = sum(p.numel() for p in base.parameters())
    seeds = list(range(args.seed, args.seed + args.seeds))
    calib = {seed: calibration_windows(train, args.calib, seed) for seed in seeds}
    energy = {seed: output_energy(base, calib[seed]) for seed in seeds}
    held = torch.tensor(list(held_bytes))
    print(f"model: {source}, {params:,} parameters; held-out {len(held):,} bytes; {args.calib} calibration windows "
          f"of 256 bytes per seed (seeds {', '.join(map(str, seeds))})", flush=True)  # fmt: skip
    configs: list[tuple[str, dict]] = [("rtn", {"bits": b, "group_size": args.group_size}) for b in RTN_GPTQ_BITS]
    configs += [("gptq", {"bits": b, "group_size": args.group_size}) for b in RTN_GPTQ_BITS]
    aqlm = args.aqlm or (["2x4g8"] if args.quick else list(AQLM_CONFIGS))
    options = {"max_rounds": 2, "adam_steps": 10} if args.quick else {}
    configs += [("aqlm", {"config": c, "aqlm_options": {**options, "num_threads": args.threads}}) for c in aqlm]
    if args.quick:
        configs = [c for c in configs if c[0] == "aqlm" or c[1]["bits"] == 2]
    rows = [{"method": "fp32", "setting": "-", "seed": None, "bits_per_parameter": 32.0,
             "bits_per_byte": bits_per_byte(base, held), "seconds": 0.0}]  # fmt: skip
    result = {"model": source, "label": args.label or source, "parameters": params, "seeds": seeds,
              "training_seconds": training_seconds, "calibration_windows": args.calib,
              "held_out_bytes": len(held), "rows": rows, "summary": []}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seed by seed, the JSON rewritten after each run (an interrupted run keeps whole seeds)
        # RTN is deterministic: one run (its calibration error measured on the first seed's windows)
        for method, kwargs in [c for c in configs if c[0] != "rtn" or seed == seeds[0]]:
            model = copy.deepcopy(base)
            started = time.perf_counter()
            report = quantize_weights(model, calib[seed], method, seed=seed, **kwargs)
            seconds = time.perf_counter() - started
            layers = [vars(r) for r in report.layers]
            for layer in layers:
                e = layer["error"]
                layer["relative_error"] = None if e is None else e / energy[seed][layer["name"]]
            rows.append({"method": method, "setting": report.setting, "seed": seed,
                         "bits_per_parameter": report.bits_per_parameter(), "bits_per_byte": bits_per_byte(model, held),
                         "seconds": seconds, "layers": layers})  # fmt: skip
            print(f"{method} {report.setting} seed {seed}: {rows[-1]['bits_per_byte']:.4f} bits/byte "
                  f"({seconds:.0f} s)", flush=True)  # fmt: skip
            result["summary"] = summarize(rows)
            (args.out / "quant_compare.json").write_text(json.dumps(result, indent=1))
    return result


def print_table(summary: list[dict]) -> None:
    print("\n| method | setting | bits/param | held-out bits/byte (mean) | spread (min-max) | std | seeds | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for e in summary:
        n = len(e["seeds"])
        spread = f"{e['min']:.4f}-{e['max']:.4f}" if n > 1 else "-"
        std = f"{e['std']:.4f}" if n > 1 else "-"
        print(f"| {e['method']} | {e['setting']} | {e['bits_per_parameter']:.3f} | {e['bits_per_byte']:.4f} | "
              f"{spread} | {std} | {n if e['method'] in ('gptq', 'aqlm') else '-'} | {e['seconds']:.0f} |")  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:  # no model: the table and the plot of a run's JSON
        result = json.loads(args.from_json.read_text())
    else:
        result = run(args)
    print_table(result["summary"])
    if args.plot:
        others = [json.loads(Path(p).read_text()) for p in args.plot_with]
        plot(args.plot, [result, *others])
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
