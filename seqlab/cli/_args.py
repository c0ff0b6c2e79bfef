"""The command line's vocabulary: one flag per idea, and a range-checked argparse type for every number.

**Flags.** The same idea has the same flag (and the same ``dest``) in every command: ``--model FILE``, ``--store``,
``--sequences NAME ...`` (picking stored sequences), ``--adapter``/``--adapter-settings``, ``--window``,
``--batch-size``, ``--device``, ``--threads``, ``--seed``, ``--out``, ``--json``, ``--quiet`` ... Commands add the
shared ones with the ``add_*`` helpers below, and every ``dest`` a command uses is listed in :data:`VOCABULARY` with
its one meaning; tests/test_cli.py walks every parser and refuses a flag spelled two ways, a dest without an entry,
or a numeric option whose type is not one of this module's.

**Numbers.** argparse's own ``type=int`` accepts ``-5`` for a window and ``type=float`` accepts ``nan``, ``inf`` and
``1e-300``; a command then writes thousands of one-element chunks, runs until killed, or fails deep inside torch with
a traceback. Each option here states its range once; a value outside it is refused by argparse, which the CLI turns
into one line on stderr and exit code 2 (``seqlab.cli._Parser.error``), e.g.::

    seqlab ingest: error: argument --window: must be an integer in [1, 1073741824], got '-5'

Use ``type=count(1)`` for sizes and counts, ``type=count(0)`` where zero means "none", ``type=number(...)`` for
floats (NaN and the infinities are always refused), ``type=seed`` for seeds.
"""

from __future__ import annotations

import argparse
import math

#: the largest count any option accepts unless it says otherwise: 2**30 elements, steps, tokens ...
BIG = 1 << 30
#: the most CPU threads a command may ask torch for
MAX_THREADS = 1024


def count(low: int = 1, high: int = BIG, what: str = "an integer"):
    """An argparse type: an int in ``[low, high]`` (no floats, no bools, no '1e3')."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip(), 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what} in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what} in [{low}, {high}], got {text!r}")
        return value

    parse.__name__ = "count"  # argparse names the type in some messages; --config checks values by this name
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the interval (``low_open``/``high_open`` exclude the ends)."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


#: --threads: torch CPU threads
threads = count(1, MAX_THREADS)
#: --seed: what torch.manual_seed and numpy accept
seed = count(0, 2**63 - 1, "a seed (an integer)")
#: --top-k, --max-new-tokens and the like
positive = count(1)
non_negative = count(0)
#: --max-new-tokens: the most new tokens one run generates per prompt or sequence
max_new_tokens = count(1, 1 << 20)
_temperature = number(0.0, 100.0)


def temperature(text: str) -> float:
    """--temperature: 0 (greedy) or a finite number in [0.001, 100]; a smaller one overflows the logits (1e-300
    made torch.multinomial fail on NaN probabilities)."""
    value = _temperature(text)
    if 0 < value < 1e-3:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or a number in [0.001, 100], got {text!r}")
    return value


temperature.__name__ = "number"
#: --top-p: a nucleus of at least 0.001 of the probability (a tinier one, like 1e-300, made sampling fail)
top_p = number(1e-3, 1.0)
_per_actor = number(1e-4, 1024.0)


def resource(text: str) -> float:
    """--num-cpus / --num-gpus: what Ray can schedule per actor: 0, or a finite number in [0.0001, 1024] (Ray counts
    resources in units of 1/10000)."""
    try:
        if float(str(text).strip()) == 0:
            return 0.0
        return _per_actor(text)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"must be 0 or a number in [0.0001, 1024] (Ray's resource unit is 0.0001), got {text!r}"
        ) from None


resource.__name__ = "number"


def keep_checkpoints(text: str):
    """--keep-checkpoints: an int >= 1, or 'all' (kept as the string; TrainConfig gets None)."""
    if str(text).strip().lower() == "all":
        return "all"
    try:
        return count(1, BIG)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {BIG}] or 'all', got {text!r}") from None


#: --subword-vocab: the subword adapter's BPE vocabulary (seqlab.byte_bpe.MIN_VOCAB, MAX_VOCAB)
subword_vocab = count(256, 1 << 16)
#: --speculate: draft tokens per round of speculative decoding
speculate = count(1, 1024)
#: --eval-fraction
eval_fraction = number(0, 1, low_open=True, high_open=True)
#: --chunk-mb range: 0.001 MB (about 1 KiB, the store's smallest chunk) to 1024 MB (a chunk is decoded whole)
CHUNK_MB_MIN, CHUNK_MB_MAX = 0.001, 1024.0
chunk_mb = number(CHUNK_MB_MIN, CHUNK_MB_MAX)
#: event times: from year 1 to year 9999 in Unix seconds
event_time = number(-62135596800.0, 253402300799.0)
#: waiting for another writer: up to a day
timeout = number(0.0, 86400.0)
#: snapshot numbers (eight digits in the file names)
snapshot_number = count(0, 99_999_999, "a snapshot number")
#: actors in a job's pool
MAX_CONCURRENCY = 1024

#: model size flag -> its type (seqlab train and seqlab bench); BackboneConfig checks the same ranges
MODEL_TYPES = {
    "d_model": count(1, 1 << 16),
    "n_layer": count(1, 1024),
    "d_state": count(1, 1 << 12),
    "d_conv": count(1, 64),
    "expand": count(1, 64),
    "headdim": count(1, 1 << 12),
    "chunk_size": count(1, 1 << 16),
}
#: MoE flag -> its type (seqlab train); BackboneConfig checks the same ranges (and top-k <= experts, every <= layers)
MOE_TYPES = {
    "moe_experts": count(1, 4096),
    "moe_top_k": count(1, 4096),
    "moe_d_expert": count(1, 1 << 16),
    "moe_capacity_factor": number(0, 1024, low_open=True),
    "moe_jitter": number(0, 1, high_open=True),
    "moe_balance_weight": number(0, 1000),
    "moe_z_weight": number(0, 1000),
    "moe_every": count(1, 1024),
}
#: training flag -> its type; TrainConfig checks the same ranges for values from --config or a recorded run
TRAIN_TYPES = {
    "steps": count(1),
    "batch_size": count(1),
    "window": count(1),
    "lr": number(1e-12, 100),
    "min_lr_ratio": number(0, 1),
    "weight_decay": number(0, 100),
    "warmup": count(0),
    "grad_accum": count(1),
    "grad_clip": number(1e-12, 1e12),
    "eval_every": count(0),
    "eval_windows": count(1),
    "checkpoint_every": count(1),
    "seed": seed,
    "keep_checkpoints": keep_checkpoints,
}


def flag(dest: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + dest.replace("_", "-")


# ------------------------------------------------------------------------------------------------------
# the shared flags


def add_model(p, text: str = "model file (model.safetensors) or training checkpoint folder (required)") -> None:
    p.add_argument("--model", metavar="FILE", help=text)


def add_sequences(p, text: str = "stored sequences to use (default: all complete ones)") -> None:
    p.add_argument("--sequences", nargs="+", metavar="NAME", help=text)


def add_adapter(p, text: str = "adapter name: bytes, dna, audio, video, memory") -> None:
    p.add_argument("--adapter", help=text)
    p.add_argument("--adapter-settings", metavar="JSON", help="adapter settings, e.g. '{\"sample_rate\": 16000}'")


def add_window(p, default, text: str) -> None:
    p.add_argument("--window", type=count(1), default=default, help=text)


def add_device(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def add_threads(p, default=None, text: str = "torch CPU threads (default: torch's choice)") -> None:
    p.add_argument("--threads", type=threads, default=default, help=text)


def add_seed(p, default=0, text: str = "seed (default 0)") -> None:
    p.add_argument("--seed", type=seed, default=default, help=text)


def add_quiet(p, text: str = "no progress bars") -> None:
    p.add_argument("--quiet", action="store_true", help=text)


def add_json(p, text: str = "print the result as one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=text)


def add_sampling(
    p,
    max_tokens_default: int,
    max_tokens_text: str,
    seed_default: int | None = None,
    seed_text: str = "seed of the sampling (default: fresh randomness)",
    vocab: int = BIG,
) -> None:
    """--max-new-tokens, --do-sample, --temperature, --top-k, --top-p, --seed, --allow-specials (Hugging Face's
    names: greedy unless --do-sample). ``vocab``: the largest --top-k (a fixed vocabulary, e.g. 256 bytes)."""
    p.add_argument("--max-new-tokens", type=max_new_tokens, default=max_tokens_default, help=max_tokens_text)
    p.add_argument(
        "--do-sample",
        action="store_true",
        help="sample with --temperature, --top-k, --top-p (default: greedy, the likeliest token)",
    )
    p.add_argument(
        "--temperature",
        type=temperature,
        default=1.0,
        help="with --do-sample: 0 = greedy, or 0.001 to 100 (default 1.0)",
    )
    p.add_argument(
        "--top-k",
        type=count(1, vocab),
        default=None,
        help="with --do-sample: sample from the k likeliest tokens (default all)",
    )
    p.add_argument(
        "--top-p",
        type=top_p,
        default=None,
        help="with --do-sample: sample from the smallest set of "
        "tokens whose probability reaches p, in [0.001, 1] (default 1)",
    )
    add_seed(p, seed_default, seed_text)
    p.add_argument(
        "--allow-specials",
        action="store_true",
        help="let the model generate the adapter's special tokens too (by default they are never "
        "generated, so the output always decodes; the end token stops a continuation either way)",
    )


#: every dest a command uses -> its one meaning (a new flag is added here; a dest is never reused for another idea)
VOCABULARY = {
    # the front door
    "help": "show the help",
    "version": "print the version",
    "debug": "tracebacks instead of one-line errors",
    "config": "a TOML settings file",
    "command": "the command",
    "memory_command": "the memory action",
    "export_command": "the export format",
    # data and files
    "store": "a sequence store (Zarr v3) to read",
    "out": "the output folder or store a command writes",
    "files": "input files",
    "sequences": "stored sequences to use",
    "sequence_names": "names of the sequences ingest writes, one per file",
    "adapter": "the domain adapter's name",
    "adapter_settings": "the adapter's settings (JSON)",
    "subword_vocab": "the subword adapter's BPE vocabulary size",
    "model": "a model file or checkpoint folder",
    "session": "an agent memory session folder",
    "overwrite": "replace what the output already holds",
    "window": "elements per window",
    "chunk_mb": "target chunk size (MB)",
    "whole_file": "one sequence per file",
    "no_checksum": "identify sources by size and mtime",
    "events": "JSON Lines event files",
    # running
    "device": "torch device",
    "threads": "torch CPU threads",
    "seed": "random seed",
    "quiet": "no progress output",
    "json": "print JSON",
    "timeout": "seconds to wait for another writer",
    # Ray jobs
    "mode": "exact or segments",
    "segment_length": "elements per segment",
    "burn_in": "warm-up elements before a segment",
    "deviation_sample": "segment boundaries measured against exact",
    "concurrency": "actors in the pool",
    "num_cpus": "CPUs per actor",
    "num_gpus": "GPUs per actor",
    "address": "a Ray cluster address",
    # generation
    "prompt": "prompt text",
    "prompt_file": "files whose bytes are prompts",
    "prompt_length": "the last N elements are the prompt",
    "max_new_tokens": "the most tokens generated",
    "do_sample": "sample instead of greedy",
    "temperature": "sampling temperature",
    "top_k": "sample from the k likeliest",
    "top_p": "nucleus sampling",
    "allow_specials": "the adapter's special tokens may be generated",
    "draft": "the drafter of speculative decoding (a model file, run folder, or maxgram)",
    "speculate": "draft tokens per round of speculative decoding",
    # memory sessions
    "create": "create the session",
    "role": "role of the event this command writes",
    "prompt_role": "role of the prompt event",
    "content": "content of one event",
    "time": "time of the events (Unix seconds)",
    "no_save": "no snapshot",
    "snapshot": "a snapshot number",
    "keep": "snapshots to keep",
    # models and training
    "ssm": "the mixer kind",
    "d_model": "model width",
    "n_layer": "layers",
    "d_state": "SSM state size",
    "d_conv": "causal conv width",
    "expand": "inner width / d_model",
    "headdim": "Mamba-2 head size",
    "chunk_size": "Mamba-2 SSD chunk",
    "moe_experts": "experts per MoE layer (makes the feed-forwards mixtures of experts)",
    "moe_top_k": "experts per token",
    "moe_d_expert": "each expert's MLP width",
    "moe_capacity_factor": "MoE expert capacity factor",
    "moe_jitter": "MoE router input jitter",
    "moe_balance_weight": "MoE load-balancing loss weight",
    "moe_z_weight": "MoE router z-loss weight",
    "moe_every": "every Nth layer is an MoE layer",
    "steps": "optimizer steps",
    "batch_size": "sequences or streams per batch",
    "lr": "peak learning rate",
    "min_lr_ratio": "final lr / lr",
    "weight_decay": "AdamW weight decay",
    "warmup": "warmup steps",
    "grad_accum": "micro-batches per step",
    "grad_clip": "gradient norm clip",
    "eval_every": "steps between evaluations",
    "eval_windows": "held-out windows per evaluation",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "step folders kept",
    "bf16": "bfloat16 autocast",
    "carry_state": "carry the state across windows",
    "pack": "pack documents into full rows (no padding, nothing crossing a document)",
    "eval": "held-out files",
    "eval_fraction": "fraction held out",
    "eval_sequences": "stored sequences held out",
    "resume": "continue the run in --out",
    # bench and demo
    "length": "tokens per sequence",
    "repeats": "timed repeats",
    "no_ref": "skip the float64 reference",
    "quick": "a small, fast budget",
    "text": "text files to train on",
    "big": "the long sequence to score",
    "workers": "Ray workers",
    # seqlab distill
    "teacher": "the teacher model of a distillation (model file, run folder or HF directory)",
    "replace": "the attention layers a distillation replaces (fraction or indices)",
    "stages": "progressive distillation stages",
    "e2e_steps": "steps of the end-to-end distillation stage",
    "init": "how replaced layers start (attention or random)",
    "decay": "per-step state decay of the mapped layers",
    "freeze_mlp": "keep the feed-forwards frozen",
    "kd_temperature": "distillation softmax temperature",
    "kl_weight": "weight of KL(teacher || student)",
    "ce_weight": "weight of the next-token cross-entropy",
    "ray_workers": "Ray Train data-parallel workers",
    # seqlab quantize
    "calib_windows": "calibration windows drawn",
    "aqlm": "an AQLM setting MxBgG (M codebooks of 2^B codewords over groups of G weights)",
    "full_precision_bits": "storage bits of what is not quantized (16 or 32)",
    "max_rounds": "AQLM rounds of code search and codebook update",
    "beam_size": "AQLM code search beam",
    "head": "quantize the LM head too",
    "densify": "turn a LASER'd model's low-rank layers back into dense ones before quantizing",
    "fine_tune_steps": "KL fine-tune steps after quantization",
    "fine_tune_lr": "KL fine-tune learning rate",
    # seqlab laser
    "layers": "layer indices to search",
    "kinds": "weight matrices to search (names after backbone.layers.I.)",
    "rhos": "fractions of the maximum rank kept",
    "compose": "cells the greedy composition may combine",
    "method": "how kept singular components are chosen (svd or random)",
    "keep_best": "write the best cell even when it does not improve",
    "report_dir": "the folder a search's report goes to",
    # seqlab self-reward
    "prompts": "a file of prompts, one per line",
    "task_prompts": "prompts of the built-in byte task",
    "measure": "measure each model on the byte task's held-out split",
    "iterations": "self-reward iterations",
    "candidates": "candidates sampled per prompt",
    "judge_samples": "judgements sampled per candidate",
    "beta": "DPO beta",
    "epochs": "passes over the data",
    # seqlab export gguf
    "outtype": "tensor type of an exported file's weight matrices",
    "vocab": "the tokenizer an exported file carries",
}


def aqlm_config(text: str):
    """An argparse type: an AQLM setting such as ``2x8g8`` (``seqlab.quant.AQLMConfig.parse``)."""
    from seqlab.errors import ConfigError
    from seqlab.quant.aqlm import AQLMConfig

    try:
        return AQLMConfig.parse(str(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
