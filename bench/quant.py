"""A whole AQLM-quantized model against its fp32 original on CPU: file size, memory, decode speed, quality (issue 20).

The model: a byte model file (``--model``; default ``out/bench-decoding/target.safetensors``, the MambaByte target
``bench/decoding.py`` trains and caches: ``cd bench && python decoding.py --threads 1 --models ../out/bench-decoding``),
or with ``--quick`` a tiny MambaByte model trained here for a few steps. Each ``--configs`` entry quantizes a copy
of it with ``seqlab.quant.quantize_model`` (every backbone ``nn.Linear`` whose input width the group size divides
becomes an ``AQLMLinear``; the rest is rounded to fp16 values) on ``--calib`` windows of 256 bytes drawn (seed 0)
from the training part of the CPython docs (the last 5% is held out), and writes it with
``seqlab.checkpoint.save_model``; the fp32 model is written the same way. Every variant is then read back with
``model_from_checkpoint`` (so every number below is of the file as loaded). Per variant:

- quantization seconds (calibration statistics + AQLM, ``quantize_model``'s whole call);
- the file's size and its ratio to fp32's; bits per parameter of the quantized layers (``QuantReport``) and of the
  whole file (file bits over all the model's parameters, header and unquantized tensors included);
- held-out bits/byte on the first ``--held-bytes`` of the held-out text, streamed (``stream_metric``);
- decode tokens/s at batch 1: greedy, ``model.step`` per token after a 64-byte held-out prompt, every variant
  loaded side by side in this one process and timed in interleaved rounds (A B C A B C ...); the median over
  ``--repeats`` rounds and its ratio to fp32. Each variant twice: on the default path, the compiled fused decode
  step (``seqlab.fused_step``, which runs the AQLM layers in C: codebook sums dotted with the input, the weight
  never formed), and on the eager step (``model.fused_step = False``), where each ``AQLMLinear`` runs its own
  torch path. Two peers run the same file another way on the eager step: "lut_max_rows=0" (every step
  dequantises its weights: the trade-off against the lookup table) and "lookup table on every layer" (where
  some layers have fewer outputs than codewords, which ``path_for`` keeps off the lookup table, the bench overrides
  it for them); the fused step does not read those settings, so the peers' fused column repeats their file's;
- what the quantized layers' matmuls cost per decode step: each layer at one row against the fp32 layer of the
  same name (hot: called again and again), summed over the layers, next to the whole step's time;
- memory: one child process per variant (``--child decode``) loads the file and decodes; it reports its RSS after
  imports, its peak while loading (the loader builds the fp32 model, then swaps in the AQLM layers, so this peak
  holds the fp32 weights), its RSS after loading, its peak while decoding (the peak is reset after loading by
  writing 5 to /proc/self/clear_refs), ``ru_maxrss``, and the bytes of the model's tensors (parameters, buffers,
  the AQLM layers' cached gather indices and narrow layers' cached ``W_hat``).

Prints markdown tables and writes ``--out``/quant.json. Timings on a shared machine vary by tens of percent: read
the ratios; ``--threads 1`` is the stable setting.

    python bench/quant.py --threads 1                  # the default model, fp32 vs 2x8g8 and 1x16g8
    python bench/quant.py --model out/quant-large/model.safetensors --out out/bench-quant-large
    python bench/quant.py --quick --out /tmp/bq       # a tiny model, tiny configs: the suite's smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from _machine import machine_line, reset_peak  # (bench/ is on sys.path when a bench runs)

HELD_OUT = 0.05
DEFAULT_MODEL = Path("out/bench-decoding/target.safetensors")
PROMPT_BYTES = 64
#: the same file run another way: every step dequantises; every layer of <= 8-bit codebooks takes the lookup table
PEERS = ("lut_max_rows=0", "lookup table on every layer")
QUICK_OPTIONS = {"max_rounds": 1, "beam_size": 2, "adam_steps": 5, "kmeans_iters": 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help=f"a byte model file (default {DEFAULT_MODEL})")
    p.add_argument("--configs", nargs="+", help="AQLM configs (default 2x8g8 1x16g8; --quick: 2x4g8 1x6g8)")
    p.add_argument(
        "--aqlm-options",
        action="append",
        default=[],
        metavar="CONFIG=JSON",
        help="options for quantize_aqlm for one config, e.g. 1x16g8='{\"max_rounds\": 4}' (repeatable)",
    )
    p.add_argument("--calib", type=int, help="calibration windows of 256 bytes (default 32; --quick 4)")
    p.add_argument("--tokens", type=int, help="greedy tokens decoded per timing (default 256; --quick 8)")
    p.add_argument("--repeats", type=int, help="interleaved timing rounds; the median is shown (default 7)")
    p.add_argument("--held-bytes", type=int, help="held-out bytes scored (default 8192; --quick 512)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--memory", choices=("child", "none"), default="child", help="measure memory in child processes")
    p.add_argument(
        "--no-lut-peer", action="store_true", help="skip the peers (lut_max_rows=0, lookup table on every layer)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny model trained for a few steps, tiny configs")
    p.add_argument("--out", type=Path, default=Path("out/bench-quant"), help="model files and quant.json go here")
    p.add_argument("--child", choices=("decode",), help=argparse.SUPPRESS)
    p.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.configs = args.configs or (["2x4g8", "1x6g8"] if args.quick else ["2x8g8", "1x16g8"])
    args.calib = args.calib or (4 if args.quick else 32)
    args.tokens = args.tokens or (8 if args.quick else 256)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.held_bytes = args.held_bytes or (512 if args.quick else 8192)
    options = {}
    for item in args.aqlm_options:
        name, sep, text = item.partition("=")
        if not sep:
            p.error(f"--aqlm-options takes CONFIG=JSON, got {item!r}")
        options[name] = json.loads(text)
    args.options = options
    return args


# ------------------------------------------------------------------------------------------------------ data, model


def corpus(quick: bool) -> tuple[bytes, bytes]:
    """(training part, held-out part) of the CPython docs text (the last 5% held out)."""
    from seqlab.cli.demo_inputs import python_docs

    data = python_docs()
    data = data[:60_000] if quick else data
    split = len(data) - int(len(data) * HELD_OUT)
    return data[:split], data[split:]


def calibration_windows(train: bytes, count: int, seed: int = 0, window: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - window - 1, (count,), generator=g).tolist()
    return [torch.tensor([list(train[s : s + window])]) for s in starts]


def quick_model(train: bytes):
    """A tiny MambaByte model (d_model 32, 2 layers) trained for 20 steps: seconds."""
    from seqlab import BackboneConfig
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.train import TrainConfig, Trainer

    adapter = ByteAdapter()
    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=32, n_layer=2, d_state=8))
    ids = adapter.encode(train)
    config = TrainConfig(lr=5e-3, warmup_steps=1, max_steps=20, batch_size=4, window=64, seed=0, progress=False)
    Trainer(model, config, adapter.source(ids, batch_size=4, window=64), loss_fn=adapter.loss).fit()
    return model.eval()


def prompt_ids(held: bytes) -> torch.Tensor:
    return torch.tensor([list(held[:PROMPT_BYTES])])


def held_bits_per_byte(model, held: bytes, count: int, piece: int = 1024) -> float:
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.streaming import stream_metric

    ids = torch.tensor(list(held[:count]))
    with torch.no_grad():
        value, _ = stream_metric(model, ByteAdapter(), ids.split(piece))
    assert value is not None
    return value


def aqlm_layers(model) -> dict[str, torch.nn.Module]:
    from seqlab.quant.linear import AQLMLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, AQLMLinear)}


def set_lut_max_rows(model, rows: int) -> None:
    for layer in aqlm_layers(model).values():
        layer.lut_max_rows = rows


def uses_lut(model) -> bool:
    """Whether any AQLM layer of ``model`` takes the lookup table for one row (``AQLMLinear.path_for``)."""
    return any(layer.codebook_size <= layer.out_features for layer in aqlm_layers(model).values())


def narrow_layers(model) -> list:
    """The AQLM layers with codebooks of at most 8 bits that never take the lookup table (``path_for``) because they
    have fewer outputs than codewords (``2**B > out_features``): they compute with a cached ``W_hat`` when no
    gradient is needed (``AQLMLinear.is_narrow``), or dequantise at every call in older versions."""
    return [m for m in aqlm_layers(model).values() if m.codebook_bits <= 8 and m.codebook_size > m.out_features]


def _lut_up_to_max_rows(layer, x: torch.Tensor) -> str:
    rows = x.numel() // layer.in_features if layer.in_features else 0
    return "lut" if 0 < rows <= layer.lut_max_rows else "gemm"


def apply_peer(model, peer: str | None) -> None:
    """Run ``model`` as the peer says: "lut_max_rows=0" dequantises at every call; "lookup table on every layer"
    overrides ``path_for`` of the narrow layers (:func:`narrow_layers`) so that they take the lookup table too."""
    if peer == "lut_max_rows=0":
        set_lut_max_rows(model, 0)
    elif peer == "lookup table on every layer":
        for layer in narrow_layers(model):
            layer.path_for = types.MethodType(_lut_up_to_max_rows, layer)


def file_parts(path: Path) -> dict[str, int]:
    """Bytes of a safetensors model file by part: the quantized layers' "codes", "codebooks" and "scales", the
    "embedding + head" (the token embedding and the LM head: tied in memory, each written in full), every "other"
    tensor, and the "header" (names, shapes, the metadata: seqlab's config, adapter and quantization layout)."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    meta = json.loads(header.pop("__metadata__", {}).get("seqlab", "{}"))
    layers = set((meta.get("quantization") or {}).get("layers", {}))
    parts = dict.fromkeys(("codes", "codebooks", "scales", "embedding + head", "other"), 0)
    for name, entry in header.items():
        start, stop = entry["data_offsets"]
        layer, _, leaf = name.rpartition(".")
        if layer in layers and leaf in parts:
            parts[leaf] += stop - start
        elif name.startswith(("embeddings.", "lm_head.")):
            parts["embedding + head"] += stop - start
        else:
            parts["other"] += stop - start
    parts["header"] = 8 + length
    return parts


# ------------------------------------------------------------------------------------------------------ decode


def greedy(model, prompt: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    """Prefill ``prompt`` (not timed), then ``tokens`` greedy ``model.step`` calls at batch 1: (seconds, ids)."""
    with torch.no_grad():
        out = model(prompt, None)
        state, token = out.state, out.output[:, -1].argmax(-1)
        ids = []
        started = time.perf_counter()
        for _ in range(tokens):
            ids.append(int(token))
            out = model.step(token, state)
            state, token = out.state, out.output.argmax(-1)
        return time.perf_counter() - started, ids


def step_paths(model, prompt: torch.Tensor) -> dict[str, int]:
    """How many AQLM layer calls of one eager decode step take each path (``AQLMLinear.path_counts``; the fused
    step runs the layers in C and calls none of them)."""
    layers = aqlm_layers(model).values()
    with torch.no_grad():
        out = model(prompt, None)
        before = {key: sum(layer.path_counts[key] for layer in layers) for key in ("lut", "gemm")}
        model.fused_step = False
        try:
            model.step(out.output[:, -1].argmax(-1), out.state)
        finally:
            model.fused_step = True
    return {key: sum(layer.path_counts[key] for layer in layers) - before[key] for key in before}


def time_decode(models: dict, prompt: torch.Tensor, tokens: int, repeats: int) -> tuple[dict, dict, dict]:
    """Median tokens/s of each model on the fused step (the default) and on the eager step, interleaved rounds after
    one warm-up each; and each one's greedy ids (fused; the eager step's must be the same)."""
    ids = {name: greedy(model, prompt, min(tokens, 8))[1] for name, model in models.items()}  # warm-up, caches
    samples: dict[tuple[str, bool], list[float]] = {(name, f): [] for name in models for f in (True, False)}
    for _ in range(repeats):
        for name, model in models.items():
            for fused in (True, False):
                model.fused_step = fused
                seconds, got = greedy(model, prompt, tokens)
                samples[(name, fused)].append(tokens / seconds)
                if fused:
                    ids[name] = got
                elif got != ids[name]:
                    raise AssertionError(f"{name}: the eager step decoded other tokens than the fused step")
            model.fused_step = True
    rate = {key: statistics.median(values) for key, values in samples.items()}
    return {n: rate[(n, True)] for n in models}, {n: rate[(n, False)] for n in models}, ids


def linear_costs(fp32, models: dict, repeats: int, iters: int) -> tuple[dict[str, float], dict[str, dict]]:
    """Microseconds per decode step spent in the matmuls of the layers the AQLM variants quantized: each layer at
    one row, the peers (the fp32 model's layer of the same name, each variant's layer) taking turns. Returns the
    totals per variant, and per kind of layer (the name's last part, e.g. "in_proj") its shape, count, mean
    microseconds per variant and the path each variant's layer takes."""
    names = sorted({name for model in models.values() for name in aqlm_layers(model)})
    totals = {"fp32": 0.0, **{name: 0.0 for name in models}}
    kinds: dict[str, dict] = {}
    with torch.no_grad():
        for layer_name in names:
            base = fp32.get_submodule(layer_name)
            x = torch.randn(1, base.in_features)
            peers = {"fp32": base}
            peers.update({name: model.get_submodule(layer_name) for name, model in models.items()})
            for layer in peers.values():
                layer(x)
            samples: dict[str, list[float]] = {name: [] for name in peers}
            for _ in range(repeats):
                for name, layer in peers.items():
                    started = time.perf_counter()
                    for _ in range(iters):
                        layer(x)
                    samples[name].append((time.perf_counter() - started) / iters * 1e6)
            kind = kinds.setdefault(
                layer_name.rpartition(".")[2],
                {"shape": f"{base.in_features}->{base.out_features}", "count": 0, "us": dict.fromkeys(peers, 0.0)},
            )
            kind["count"] += 1
            kind["paths"] = {  # a layer one config quantizes and another keeps (a dt_proj under g4 but not g8)
                name: layer.path_for(x) if hasattr(layer, "path_for") else "not quantized"
                for name, layer in peers.items()
                if name != "fp32"
            }
            for name, values in samples.items():
                totals[name] += statistics.median(values)
                kind["us"][name] += statistics.median(values)
    for kind in kinds.values():
        kind["us"] = {name: value / kind["count"] for name, value in kind["us"].items()}
    return totals, kinds


# ------------------------------------------------------------------------------------------------------ memory


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in KiB (empty off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key = line.split(":")[0]
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (each storage once) and of its AQLM layers' gather indices."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    for layer in aqlm_layers(model).values():
        total += sum(index.numel() * index.element_size() for _, index in layer._index_cache.values())
        narrow = getattr(layer, "_narrow_cache", None)  # a narrow layer's cached W_hat (AQLMLinear.is_narrow)
        if narrow is not None:
            total += narrow[1].numel() * narrow[1].element_size()
    return total


def child_decode(args) -> dict:
    """``--child decode``: load ``--model``, decode ``--tokens`` greedily, report memory (KiB) as one JSON line."""
    from seqlab.domains.registry import model_from_checkpoint

    _, held = corpus(args.quick)
    prompt = prompt_ids(held)
    gc.collect()
    after_imports = proc_status()
    model, _ = model_from_checkpoint(args.model)
    apply_peer(model, args.peer)
    gc.collect()
    after_load = proc_status()
    reset = reset_peak()
    greedy(model, prompt, args.tokens)
    after_decode = proc_status()
    result = {
        "rss_after_imports_kib": after_imports.get("VmRSS"),
        "peak_load_kib": after_load.get("VmHWM"),
        "rss_after_load_kib": after_load.get("VmRSS"),
        "peak_decode_kib": after_decode.get("VmHWM") if reset else None,
        "rss_after_decode_kib": after_decode.get("VmRSS"),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "model_tensor_bytes": tensor_bytes(model),
    }
    print("CHILD_JSON " + json.dumps(result), flush=True)
    return result


def measure_memory(path: Path, args, peer: str | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "decode", "--model", str(path)]
    command += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    command += ["--peer", peer] if peer else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("CHILD_JSON "):
            return json.loads(line.removeprefix("CHILD_JSON "))
    raise RuntimeError(f"child for {path} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


# ------------------------------------------------------------------------------------------------------ main


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child_decode(args)
        return None
    from seqlab.checkpoint import save_model
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.quant import quantize_model

    print(machine_line())
    train, held = corpus(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick and args.model is None:
        source = "a tiny MambaByte model (d_model 32, 2 layers) trained here for 20 steps"
        fp32 = quick_model(train)
    else:
        path = args.model or DEFAULT_MODEL
        if not path.exists():
            raise SystemExit(
                f"{path}: no such model file; train it with `cd bench && python decoding.py --threads 1 "
                "--models ../out/bench-decoding`, or give --model (or --quick)"
            )
        source = str(path)
        fp32, _ = model_from_checkpoint(path)
    params = sum(p.numel() for p in fp32.parameters())
    files = {"fp32": args.out / "fp32.safetensors"}
    save_model(files["fp32"], fp32)
    windows = calibration_windows(train, args.calib)
    c = fp32.config
    shape = f"{c.ssm}, d_model {c.d_model}, {c.n_layer} layers, d_state {c.d_state}"
    print(f"model: {source}, {params:,} parameters ({shape})")
    print(f"calibration: {args.calib} windows of 256 bytes (seed 0) from the training part; held-out: the last 5% of "
          f"the CPython docs ({len(held):,} bytes), first {args.held_bytes:,} scored")  # fmt: skip

    rows: dict[str, dict] = {"fp32": {"config": "fp32", "quantize_seconds": 0.0, "layer_bits_per_parameter": 32.0}}
    for config in args.configs:
        options = args.options.get(config, QUICK_OPTIONS if args.quick else {})
        model = copy.deepcopy(fp32)
        started = time.perf_counter()
        report = quantize_model(model, windows, config, aqlm_options=options)
        seconds = time.perf_counter() - started
        files[config] = args.out / f"{config}.safetensors"
        save_model(files[config], model)
        rows[config] = {"config": config, "quantize_seconds": seconds, "aqlm_options": options,
                        "layer_bits_per_parameter": report.bits_per_parameter(),
                        "quantized_layers": sum(r.bits is not None for r in report.layers),
                        "skipped_layers": sum(r.bits is None for r in report.layers)}  # fmt: skip
        counts = f"{rows[config]['quantized_layers']} layers quantized, {rows[config]['skipped_layers']} kept in fp16"
        print(f"quantized {config} in {seconds:.1f} s (aqlm_options {json.dumps(options)}): {counts}")
        del model

    # every variant read back from its file
    models = {"fp32": model_from_checkpoint(files["fp32"])[0]}
    lut_peers: dict[str, str] = {}  # peer name -> config
    for config in args.configs:
        models[config] = model_from_checkpoint(files[config])[0]
        peers = []
        if not args.no_lut_peer and uses_lut(models[config]):
            peers.append("lut_max_rows=0")
        if not args.no_lut_peer and narrow_layers(models[config]):
            peers.append("lookup table on every layer")
        for peer in peers:
            name = f"{config} {peer}"
            models[name] = model_from_checkpoint(files[config])[0]
            apply_peer(models[name], peer)
            lut_peers[name] = config
            rows[name] = {**rows[config], "peer": peer}
    fp32_bytes = files["fp32"].stat().st_size
    for name, row in rows.items():
        size = files[row["config"]].stat().st_size
        row.update(file_bytes=size, file_ratio=size / fp32_bytes, file_bits_per_parameter=8 * size / params)
        row["file_parts"] = file_parts(files[row["config"]])
        row["bits_per_byte"] = held_bits_per_byte(models[name], held, args.held_bytes)

    print("\nsize and quality (files written with save_model, read back with model_from_checkpoint)")
    print("| variant | quantize (s) | file (KiB) | file vs fp32 | bits/param, quantized layers | bits/param, whole "
          "file | held-out bits/byte |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        if name in lut_peers:
            continue
        print(f"| {name} | {row['quantize_seconds']:.1f} | {row['file_bytes'] / 1024:,.1f} | {row['file_ratio']:.3f} "
              f"| {row['layer_bits_per_parameter']:.3f} | {row['file_bits_per_parameter']:.2f} "
              f"| {row['bits_per_byte']:.4f} |")  # fmt: skip
    print("\nwhat the files hold (KiB)")
    print("| variant | codes | codebooks | scales | embedding + head | other tensors | header |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        if name not in lut_peers:
            print(f"| {name} | " + " | ".join(f"{v / 1024:,.1f}" for v in row["file_parts"].values()) + " |")

    prompt = prompt_ids(held)
    with torch.no_grad():
        tok_s, eager_tok_s, ids = time_decode(models, prompt, args.tokens, args.repeats)
    print(f"\ndecode at batch 1: greedy, {args.tokens} tokens after a {PROMPT_BYTES}-byte held-out prompt, all "
          f"variants in one process, {args.repeats} interleaved rounds, median; {args.threads} thread(s)")  # fmt: skip
    print("| variant | tokens/s | vs fp32 | ms per token | greedy tokens equal to fp32's | AQLM layer calls per eager "
          "step: lookup table / dequantise+GEMM | eager step tokens/s | eager vs fp32's eager |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for name, model in models.items():
        same = sum(a == b for a, b in zip(ids[name], ids["fp32"], strict=True)) / len(ids["fp32"])
        counts = step_paths(model, prompt)
        paths = "-" if name == "fp32" else f"{counts['lut']} / {counts['gemm']}"
        eager = eager_tok_s[name]
        rows[name].update(decode_tok_s=tok_s[name], decode_ratio=tok_s[name] / tok_s["fp32"], same_tokens=same,
                          decode_eager_tok_s=eager, decode_eager_ratio=eager / eager_tok_s["fp32"],
                          lut_calls_per_step=counts["lut"], gemm_calls_per_step=counts["gemm"])  # fmt: skip
        print(f"| {name} | {tok_s[name]:,.0f} | {tok_s[name] / tok_s['fp32']:.2f} | {1e3 / tok_s[name]:.3f} "
              f"| {same:.2f} | {paths} | {eager:,.0f} | {eager / eager_tok_s['fp32']:.2f} |")  # fmt: skip

    quantized = {name: model for name, model in models.items() if name != "fp32"}
    costs, kinds = linear_costs(models["fp32"], quantized, 3 if args.quick else args.repeats, 2 if args.quick else 200)
    print("\none quantized layer at one row, hot, microseconds per call (mean over the layers of a kind; the path "
          "forward() takes)")  # fmt: skip
    print("| layer | in->out | layers | " + " | ".join(["fp32", *quantized]) + " |")
    print("|---|---|---:|" + "---:|" * (1 + len(quantized)))
    for kind_name, kind in kinds.items():
        cells = [f"{kind['us']['fp32']:,.1f}"]
        cells += [
            f"{kind['us'][n]:,.1f} ({kind['paths'][n]}, {kind['us'][n] / kind['us']['fp32']:.1f}x)" for n in quantized
        ]
        print(f"| {kind_name} | {kind['shape']} | {kind['count']} | " + " | ".join(cells) + " |")
    print("\nwhere an eager decode step goes: those matmuls summed over the model's layers, against the whole step")
    print("| variant | those matmuls (us per step) | vs fp32 | whole eager step (us) | rest of the step (us) |")
    print("|---|---:|---:|---:|---:|")
    for name in models:
        step_us = 1e6 / eager_tok_s[name]
        rows[name].update(linear_us_per_step=costs[name], step_us=step_us)
        print(f"| {name} | {costs[name]:,.0f} | {costs[name] / costs['fp32']:.2f} | {step_us:,.0f} "
              f"| {step_us - costs[name]:,.0f} |")  # fmt: skip

    if args.memory == "child":
        print("\nmemory (MiB), one child process per variant: load the file, decode; RSS includes torch itself")
        print("| variant | RSS after imports | peak while loading | RSS after load | peak while decoding | ru_maxrss "
              "| model tensors + indices + caches |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            memory = measure_memory(files[row["config"]], args, row.get("peer"))
            row["memory"] = memory
            print(f"| {name} | {mib(memory['rss_after_imports_kib'])} | {mib(memory['peak_load_kib'])} "
                  f"| {mib(memory['rss_after_load_kib'])} | {mib(memory['peak_decode_kib'])} "
                  f"| {mib(memory['ru_maxrss_kib'])} | {memory['model_tensor_bytes'] / 2**20:.2f} |")  # fmt: skip

    print()
    first = next((c for c in args.configs if c.startswith("2x")), args.configs[0])
    r = rows[first]
    size_ok = "met" if r["file_ratio"] <= 0.1 else "NOT met"
    speed_ok = "met" if r["decode_ratio"] >= 1.0 else "NOT met"
    print(f"target (issue 20): the 2-bit model's file at most 1/10 of fp32's: {first} is {r['file_ratio']:.3f} "
          f"of it ({size_ok})")  # fmt: skip
    print(f"target (issue 20): decodes at least as fast as fp32 on CPU at batch 1: {first} at "
          f"{r['decode_ratio']:.2f}x fp32's tokens/s ({speed_ok})")  # fmt: skip
    result = {"layer_costs_us": kinds, "machine": machine_line(), "model": source, "parameters": params, "args": {
        "configs": args.configs, "calib": args.calib, "tokens": args.tokens, "repeats": args.repeats,
        "held_bytes": args.held_bytes, "threads": args.threads, "quick": args.quick}, "variants": rows}  # fmt: skip
    (args.out / "quant.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out / 'quant.json'}")
    return result


if __name__ == "__main__":
    main()
