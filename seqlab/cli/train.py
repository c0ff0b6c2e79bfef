"""``seqlab train`` and ``seqlab eval``: train a model for a domain adapter from files or a sequence store, and
measure a trained model's held-out metric (``seqlab train --help``, ``seqlab eval --help``).

``seqlab train`` writes into ``--out DIR``::

    DIR/latest, DIR/step-XXXXXXXX/   training checkpoints (seqlab.checkpoint; ``--resume`` continues from them)
    DIR/model.safetensors            the final model (seqlab.checkpoint.save_model; model_from_checkpoint loads it)
    DIR/train.jsonl                  one JSON line per optimizer step
    DIR/run.json                     the run's adapter, model and training settings, its data, and the summary

Files are encoded in memory with the adapter's streaming reader (``iter_windows``), except one ``bytes`` file,
which is memory-mapped (never read whole). Data larger than memory goes into a store first (``seqlab ingest``)
and trains from there (``--store``): ``StoreSource`` reads only the chunks each window touches.

``seqlab eval`` streams every input through the model in windows with the state carried (equal to one pass
over the whole input, in constant memory) and prints the adapter's metric per input and in total.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from seqlab import cli_args
from seqlab.errors import ConfigError, CorruptFileError, InputError

RUN_FILE = "run.json"
MODEL_FILE = "model.safetensors"
LOG_FILE = "train.jsonl"
PREVIOUS = ".previous-run"       # an --overwrite'n run waits here until the new run has finished
ENCODE_WINDOW = 1 << 20          # elements encoded at a time when reading files
FINAL_EVAL_WINDOW = 8192         # elements per streamed window of the final held-out evaluation

#: model flag -> BackboneConfig field, with the default of a new run
MODEL_FLAGS = {"ssm": "mamba1", "d_model": 128, "n_layer": 4, "d_state": None, "d_conv": 4, "expand": 2,
               "headdim": 64, "chunk_size": 256}
#: training flag -> TrainConfig field (defaults: TrainConfig's, except the CLI's own below)
TRAIN_FLAGS = {"steps": "max_steps", "batch_size": "batch_size", "window": "window", "lr": "lr",
               "min_lr_ratio": "min_lr_ratio", "weight_decay": "weight_decay", "warmup": "warmup_steps",
               "grad_accum": "grad_accum", "grad_clip": "grad_clip", "eval_every": "eval_every",
               "eval_windows": "eval_windows", "checkpoint_every": "checkpoint_every", "seed": "seed",
               "bf16": "bf16", "carry_state": "carry_state", "keep_checkpoints": "keep_checkpoints"}
CLI_TRAIN_DEFAULTS = {"checkpoint_every": 100, "eval_every": 100}
RUN_FORMAT_VERSION = 2           # run.json: 2 carries a checksum of its contents


def _keep(text: str):
    """--keep-checkpoints: an int >= 1, or 'all' (kept as the string; TrainConfig gets None)."""
    if str(text).strip().lower() == "all":
        return "all"
    try:
        return cli_args.count(1, cli_args.BIG)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {cli_args.BIG}] or 'all', got {text!r}") from None


#: argparse types of the numeric options (seqlab.cli_args); TrainConfig and BackboneConfig check the same ranges
#: for values that come from a --config TOML file or a recorded run, which argparse never converts
TRAIN_TYPES = {"steps": cli_args.count(1), "batch_size": cli_args.count(1), "window": cli_args.count(1),
               "lr": cli_args.number(1e-12, 100), "min_lr_ratio": cli_args.number(0, 1),
               "weight_decay": cli_args.number(0, 100), "warmup": cli_args.count(0),
               "grad_accum": cli_args.count(1), "grad_clip": cli_args.number(1e-12, 1e12),
               "eval_every": cli_args.count(0), "eval_windows": cli_args.count(1),
               "checkpoint_every": cli_args.count(1), "seed": cli_args.seed, "keep_checkpoints": _keep}
MODEL_TYPES = {"d_model": cli_args.count(1, 1 << 16), "n_layer": cli_args.count(1, 1024),
               "d_state": cli_args.count(1, 1 << 12), "d_conv": cli_args.count(1, 64), "expand": cli_args.count(1, 64),
               "headdim": cli_args.count(1, 1 << 12), "chunk_size": cli_args.count(1, 1 << 16)}
EVAL_FRACTION = cli_args.number(0, 1, low_open=True, high_open=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _torch_setup(args) -> None:
    import torch

    threads = getattr(args, "threads", None)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cli_args.MAX_THREADS:
            raise ConfigError(f"--threads must be an integer in [1, {cli_args.MAX_THREADS}], got {threads!r}")
        torch.set_num_threads(threads)


def _device(name: str | None):
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    return device


# ------------------------------------------------------------------------------------------------------
# adapters and encoded data


def _adapter(domain: str, settings_json: str | None):
    from seqlab.domains import get_adapter

    settings = {}
    if settings_json:
        try:
            settings = json.loads(settings_json) if isinstance(settings_json, str) else settings_json
        except ValueError as exc:
            raise ConfigError(f"--adapter-settings must be a JSON object, got {settings_json!r} ({exc})") from None
        if not isinstance(settings, dict):
            raise ConfigError(f"--adapter-settings must be a JSON object, got {settings_json!r}")
    cls = get_adapter(domain)
    try:
        return cls(**settings)
    except TypeError as exc:
        raise ConfigError(f"--adapter-settings {settings} do not fit the {domain!r} adapter: {exc}") from None


def _check_trainable(adapter) -> None:
    if getattr(adapter, "task", None) == "classify":
        raise ConfigError("seqlab train and eval handle next-element models; a video adapter with task='classify' "
                          "needs clip labels: train it with seqlab.domains.video.VideoSource and Trainer")


def _check_file(path: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    return path


def _file_pieces(adapter, path: str, window: int) -> Iterator:
    """The encoded file, ``window`` elements at a time (the adapter's streaming reader)."""
    _check_file(path)
    yield from adapter.iter_windows(path, window)


def _encode_files(adapter, paths: list[str], bar=None):
    """All files encoded and laid end to end: a 1-D id tensor or (T, width) float frames."""
    import torch

    pieces = []
    for path in paths:
        for piece in _file_pieces(adapter, path, ENCODE_WINDOW):
            pieces.append(_flat(adapter, piece))
            if bar is not None:
                bar.update(piece.shape[0])
    if not pieces:
        raise InputError(f"{', '.join(paths)}: nothing to encode")
    return torch.cat(pieces)


def _flat(adapter, piece):
    """(t, *frame) -> (t, features) for continuous inputs; ids stay 1-D."""
    if adapter.input_spec.kind == "continuous" and piece.dim() > 2:
        return piece.reshape(piece.shape[0], -1)
    return piece


def _source(adapter, data, batch_size: int, window: int, where: str):
    """A Trainer source over encoded ``data`` (ids: SequenceSource, frames: FrameSource)."""
    from seqlab.train import SequenceSource

    try:
        if adapter.input_spec.kind == "continuous":
            from seqlab.domains.audio import FrameSource

            return FrameSource(data.float(), batch_size, window)
        if adapter.name == "audio":  # interleaved channels: every stream starts on a frame boundary
            return adapter.source(data, batch_size, window)
        return SequenceSource(data, batch_size, window)
    except InputError as exc:
        raise InputError(f"{where}: {exc} (use fewer --batch-size streams or a shorter --window)") from None


@dataclass
class HeldOut:
    """One held-out input: a name and a function giving its encoded pieces in order."""

    name: str
    pieces: Callable[[], Iterator]
    length: int | None = None


def stream_metric(model, adapter, pieces, device, bar=None) -> tuple[float, int]:
    """The adapter's metric of ``model`` over one input given as encoded pieces, streamed with the state carried
    (exact: equals one pass over the whole input). Returns ``(metric, number of targets)``."""
    import torch

    total, count, state, tail = 0.0, 0, None, None
    with torch.no_grad():
        for piece in pieces:
            piece = _flat(adapter, piece)
            seq = piece if tail is None else torch.cat([tail, piece])
            if seq.shape[0] < 2:
                tail = seq
                continue
            inputs, targets = seq[:-1][None].to(device), seq[1:][None].to(device)
            out = model(inputs, state, return_state=True)
            state = out.state
            weight = adapter.metric_weight(targets)
            if weight:
                value = float(adapter.metric(out, targets))
                total += value * weight
                count += weight
            tail = seq[-1:]
            if bar is not None:
                bar.update(piece.shape[0])
    if count == 0:
        return None, 0
    return total / count, count


def evaluate_inputs(model, adapter, inputs: list[HeldOut], device, progress: bool) -> dict:
    """Per-input and total metric over ``inputs`` (each streamed from a fresh state)."""
    from tqdm.auto import tqdm

    total_len = sum(h.length for h in inputs) if all(h.length is not None for h in inputs) else None
    bar = tqdm(total=total_len, unit="el", unit_scale=True, disable=not progress, desc="eval")
    rows = []
    try:
        for item in inputs:
            value, count = stream_metric(model, adapter, item.pieces(), device, bar)
            rows.append({"name": item.name, "metric": value, "targets": count})
    finally:
        bar.close()
    n = sum(r["targets"] for r in rows)
    total = sum(r["metric"] * r["targets"] for r in rows if r["targets"]) / n if n else None
    return {"metric_name": adapter.metric_name, "inputs": rows, "metric": total, "targets": n,
            "uniform_baseline": adapter.uniform_baseline()}


# ------------------------------------------------------------------------------------------------------
# training data: files or a store


@dataclass
class TrainData:
    adapter: object
    train: object                 # a Trainer source
    train_elements: int
    eval_source: object | None    # for the periodic evaluation inside the Trainer
    held_out: list[HeldOut]       # for the final, exact evaluation
    spec: dict                    # recorded in run.json (and reused by --resume)


def _files_data(spec: dict, batch_size: int, window: int, progress: bool) -> TrainData:
    import numpy as np
    from tqdm.auto import tqdm

    adapter = _adapter(spec["domain"], spec.get("adapter_settings"))
    _check_trainable(adapter)
    files = [_check_file(f) for f in spec["files"]]
    evals = [_check_file(f) for f in spec.get("eval") or []]
    fraction = spec.get("eval_fraction")
    if fraction is not None and evals:
        raise ConfigError("give held-out data either as --eval FILE... or as --eval-fraction, not both")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction < 1):
        raise ConfigError(f"--eval-fraction must be a number in (0, 1), got {fraction!r}")
    held_out: list[HeldOut] = []
    eval_data = None
    if adapter.name == "bytes" and len(files) == 1 and os.path.getsize(files[0]) > 0:
        # memory-mapped: a file larger than memory is never read whole
        mapped = np.memmap(files[0], dtype=np.uint8, mode="r")
        split = mapped.shape[0] - int(mapped.shape[0] * fraction) if fraction else mapped.shape[0]
        if adapter.utf8:  # never cut a character in two
            while 0 < split < mapped.shape[0] and 0x80 <= int(mapped[split]) < 0xC0:
                split -= 1
        train = _wrap(lambda: adapter.source(files[0], batch_size, window, stop=split), files[0])
        train_elements = split
        if fraction:
            eval_data = mapped[split:]
    else:
        bar = tqdm(unit="el", unit_scale=True, disable=not progress, desc="encode")
        try:
            data = _encode_files(adapter, files, bar)
        finally:
            bar.close()
        split = data.shape[0] - int(data.shape[0] * fraction) if fraction else data.shape[0]
        if fraction:
            eval_data = data[split:]
        train = _source(adapter, data[:split], batch_size, window, ", ".join(files))
        train_elements = split
    if fraction:
        if eval_data.shape[0] < 2:
            raise InputError(f"--eval-fraction {fraction} leaves {eval_data.shape[0]} elements of held-out data: "
                             "at least 2 are needed")
        tail_data = eval_data
        held_out.append(HeldOut(f"last {fraction:g} of the data", lambda: _chunks(tail_data, FINAL_EVAL_WINDOW),
                                int(tail_data.shape[0])))
    for path in evals:
        held_out.append(HeldOut(path, lambda path=path: _file_pieces(adapter, path, FINAL_EVAL_WINDOW)))
    if evals:
        eval_data = _encode_files(adapter, evals)
    eval_source = None
    if eval_data is not None:
        if eval_data.shape[0] < 2:
            raise InputError(f"held-out data {', '.join(evals)} holds {eval_data.shape[0]} elements: at least 2 "
                             "are needed")
        eval_source = _source(adapter, eval_data, 1, min(window, eval_data.shape[0] - 1), "held-out data")
    return TrainData(adapter, train, train_elements, eval_source, held_out, spec)


def _wrap(make, where: str):
    try:
        return make()
    except InputError as exc:
        raise InputError(f"{exc} (use fewer --batch-size streams or a shorter --window)") from None


def _chunks(data, window: int) -> Iterator:
    import numpy as np
    import torch

    for start in range(0, data.shape[0], window):
        piece = data[start:start + window]
        yield torch.from_numpy(np.asarray(piece, dtype=np.int64)) if isinstance(piece, np.ndarray) else piece


def _store_data(spec: dict, batch_size: int, window: int, model_for=None) -> tuple[TrainData, object]:
    from seqlab.domains.base import adapter_from_info
    from seqlab.pipelines.store import SequenceStore, StoreSource

    store = SequenceStore(spec["store"], "r")
    eval_names = list(spec.get("eval_sequences") or [])
    names = list(spec.get("sequences") or [])
    if not names:
        names = [n for n in store.list(incomplete=False) if n not in eval_names]
        if not names:
            raise InputError(f"sequence store {store.where} holds no complete sequence to train on"
                             + (" besides --eval-sequences" if eval_names else ""))
    overlap = sorted(set(names) & set(eval_names))
    if overlap:
        raise ConfigError(f"--eval-sequences {overlap} are also training sequences: held-out data must be unseen")
    info = store.describe(names[0])
    if not info.adapter:
        raise InputError(f"sequence store {store.where}: sequence {names[0]!r} records no adapter (it was not "
                         "written by seqlab ingest or an adapter), so seqlab train cannot know how it was encoded")
    adapter = adapter_from_info(info.adapter)
    _check_trainable(adapter)
    if spec.get("domain") and spec["domain"] != adapter.name:
        raise ConfigError(f"--domain {spec['domain']!r}, but sequence store {store.where} was encoded by the "
                          f"{adapter.name!r} adapter ({info.adapter}); leave out --domain with --store")
    model = model_for(adapter) if model_for else None
    train = _wrap(lambda: StoreSource(store, names, batch_size, window, model=model), store.where)
    held_out, eval_source = [], None
    if eval_names:
        readers = [store.reader(n) for n in eval_names]
        total = sum(r.length for r in readers)
        if total < 2:
            raise InputError(f"--eval-sequences {eval_names} hold {total} elements: at least 2 are needed")
        eval_source = StoreSource(store, eval_names, 1, min(window, total - 1), model=model)
        for reader in readers:
            held_out.append(HeldOut(reader.info.name, lambda r=reader: _reader_pieces(r, FINAL_EVAL_WINDOW),
                                    reader.length))
    spec = {**spec, "store": os.path.abspath(spec["store"]) if "://" not in spec["store"] else spec["store"],
            "sequences": names, "eval_sequences": eval_names, "domain": adapter.name}
    return TrainData(adapter, train, train.total, eval_source, held_out, spec), model


def _reader_pieces(reader, window: int) -> Iterator:
    for start in range(0, reader.length, window):
        yield reader.read(start, min(start + window, reader.length))


# ------------------------------------------------------------------------------------------------------
# seqlab train


def _run_checksum(record: dict) -> str:
    import hashlib

    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_run(out: Path, record: dict) -> None:
    """run.json, with a checksum of its contents (a resume trusts its data and settings)."""
    from seqlab.io import atomic_write_bytes

    record = {k: v for k, v in record.items() if k != "checksum"}
    record["format_version"] = RUN_FORMAT_VERSION
    record["checksum"] = _run_checksum(record)
    atomic_write_bytes(out / RUN_FILE, (json.dumps(record, indent=2) + "\n").encode())


def _read_run(out: Path) -> dict:
    """The run recorded in ``out/run.json`` ({} when there is none); a damaged or edited file is refused."""
    path = out / RUN_FILE
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON, damaged or truncated ({' '.join(str(exc).split())})") \
            from None
    if not isinstance(run, dict):
        raise CorruptFileError(f"{path}: not a seqlab train run file (not a JSON object)")
    version = run.get("format_version", 1)
    if "checksum" in run or version != 1:
        if run.get("checksum") != _run_checksum(run):
            raise CorruptFileError(f"{path}: checksum mismatch, the file was altered or damaged (start over with "
                                   "--overwrite, or restore the file)")
    for key, kind in (("train", dict), ("data", dict), ("model", dict), ("adapter", dict)):
        if key in run and not isinstance(run[key], kind):
            raise CorruptFileError(f"{path}: {key} is not a JSON object")
    return run


def _checkpoint_settings(out: Path) -> tuple[dict, dict, dict]:
    """(adapter info, backbone config dict, train config dict) recorded in the latest checkpoint of ``out``."""
    from seqlab.checkpoint import latest_checkpoint, model_file_config, read_model_file, read_trainer_file

    folder = latest_checkpoint(out)
    _, meta = read_model_file(folder / "model.safetensors")
    _, trainer_meta = read_trainer_file(folder / "trainer.safetensors")
    if not meta.get("adapter") or not meta.get("config"):
        raise InputError(f"{folder}: the checkpoint records no adapter or model config (not made by seqlab train "
                         "or a model built by an adapter): it cannot be resumed from the command line")
    model_file_config(folder / "model.safetensors", meta)  # a bad key or value names the file
    trainer = trainer_meta.get("trainer")
    config = trainer.get("config") if isinstance(trainer, dict) else None
    if not isinstance(meta["adapter"], dict) or not isinstance(config or {}, dict):
        raise CorruptFileError(f"{folder}: the recorded adapter or training settings are not JSON objects")
    return meta["adapter"], meta["config"], dict(config or {})


def _holds_run(out: Path) -> str | None:
    from seqlab.checkpoint import has_checkpoint

    if has_checkpoint(out):
        words = (out / "latest").read_bytes().decode("utf-8", "replace").split()
        return f"a checkpoint ({words[0] if words else 'latest'})"
    for name in (MODEL_FILE, RUN_FILE):
        if (out / name).exists():
            return f"a training run ({name})"
    return None


def _set_aside_previous_run(out: Path) -> None:
    """--overwrite: move the old run out of the way (deleted once the new run has finished)."""
    previous = out / PREVIOUS
    if previous.exists():
        shutil.rmtree(previous)
    previous.mkdir()
    for entry in out.iterdir():
        if entry.name in (MODEL_FILE, RUN_FILE, LOG_FILE, "latest") or (entry.is_dir()
                                                                        and entry.name.startswith("step-")):
            entry.rename(previous / entry.name)


def _check_args(args, train: bool) -> None:
    """Settings from a --config TOML file reach ``args`` without argparse's types (a TOML number or list is never
    converted): check each one as its flag would be, so that a bad value is refused naming the flag."""
    types = ({**TRAIN_TYPES, **MODEL_TYPES, "eval_fraction": EVAL_FRACTION, "threads": cli_args.threads} if train
             else {"window": cli_args.count(1), "threads": cli_args.threads})
    for name, parse in types.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{_flag(name)} must be a number, got {value!r}")
        try:
            setattr(args, name, parse(str(value)))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{_flag(name)}: {exc}") from None
    flags = ("resume", "overwrite", "quiet", "json", "bf16", "carry_state") if train else ("quiet", "json")
    for name in flags:
        value = getattr(args, name, None)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{_flag(name)} must be true or false, got {value!r}")
    lists = ("files", "eval", "sequences", "eval_sequences") if train else ("files", "sequences")
    for name in lists:
        value = getattr(args, name, None)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{_flag(name) if name != 'files' else 'FILE...'} must be a list of names, "
                              f"got {value!r}")
    texts = ("out", "domain", "store", "device") if train else ("model", "store", "device")
    for name in texts:
        value = getattr(args, name, None)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{_flag(name) if name != 'model' else 'MODEL'} must be a string, got {value!r}")


def _train_settings(args, recorded: dict, resuming: bool) -> dict:
    from seqlab.train import TrainConfig

    base = TrainConfig().to_dict()
    settings = {TRAIN_FLAGS[k]: v for k, v in CLI_TRAIN_DEFAULTS.items()}
    if resuming:
        settings.update({k: v for k, v in recorded.items() if k in base})
    for flag, field in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            settings[field] = value
    return settings


def _train_config(settings: dict, out: Path, progress: bool, has_eval: bool):
    from seqlab.train import TrainConfig

    settings = dict(settings)
    if not has_eval:
        settings["eval_every"] = 0
    settings.update(checkpoint_dir=str(out), log_path=str(out / LOG_FILE), progress=progress)
    if settings.get("keep_checkpoints") == "all":
        settings["keep_checkpoints"] = None
    if settings.get("checkpoint_every", 0) == 0:
        raise ConfigError("--checkpoint-every must be >= 1 (seqlab train always keeps a checkpoint to resume from)")
    try:
        return TrainConfig(**settings)
    except ConfigError as exc:
        raise ConfigError(_flag_names(str(exc), "TrainConfig", TRAIN_FLAGS)) from None
    except TypeError as exc:
        raise ConfigError(f"{out / RUN_FILE}: recorded training settings do not fit this seqlab ({exc})") from None


def _flag_names(message: str, prefix: str, flags: dict) -> str:
    """'TrainConfig.max_steps must be ...' -> '--steps must be ...'."""
    for flag, field in sorted(flags.items(), key=lambda kv: -len(kv[1])):
        message = message.replace(f"{prefix}.{field}", _flag(flag))
    return message


def _backbone(args, recorded: dict | None):
    from seqlab.config import BackboneConfig

    if recorded is not None:
        config = BackboneConfig.from_dict(recorded)
        for flag in MODEL_FLAGS:
            value = getattr(args, flag)
            if value is not None and value != getattr(config, flag):
                raise ConfigError(f"{_flag(flag)} {value} differs from the run being resumed ({flag} = "
                                  f"{getattr(config, flag)}): leave it out, or start over with --overwrite")
        return config
    values = {k: (getattr(args, k) if getattr(args, k) is not None else default) for k, default in MODEL_FLAGS.items()}
    try:
        return BackboneConfig(**values)
    except ConfigError as exc:
        raise ConfigError(_flag_names(str(exc), "BackboneConfig", {k: k for k in MODEL_FLAGS})) from None


def _data_spec(args, recorded_spec: dict | None) -> dict:
    if args.files and args.store:
        raise ConfigError("give training data either as FILE... or as --store, not both")
    if args.store:
        if args.eval or args.eval_fraction is not None:
            raise ConfigError("with --store, held-out data comes from --eval-sequences (not --eval/--eval-fraction)")
        if args.adapter_settings:
            raise ConfigError("with --store, the adapter is the one the store was encoded with: leave out "
                              "--adapter-settings")
        return {"store": args.store, "sequences": args.sequences, "eval_sequences": args.eval_sequences,
                "domain": args.domain}
    if args.files:
        if args.sequences or args.eval_sequences:
            raise ConfigError("--sequences and --eval-sequences go with --store")
        from seqlab.cli import require

        domain, settings = args.domain, args.adapter_settings
        if domain is None and recorded_spec and "files" in recorded_spec:  # --resume: the run's adapter
            domain = recorded_spec.get("domain")
            settings = recorded_spec.get("adapter_settings") if settings is None else settings
        args.domain = domain
        require(args, "domain")
        return {"files": [os.path.abspath(f) for f in args.files], "domain": domain,
                "adapter_settings": settings,
                "eval": [os.path.abspath(f) for f in args.eval or []], "eval_fraction": args.eval_fraction}
    if recorded_spec:
        return recorded_spec
    raise ConfigError("no training data: give FILE... (with --domain) or --store S.zarr")


def _train(args) -> int:
    import torch

    from seqlab.checkpoint import has_checkpoint, save_model
    from seqlab.cli import require
    from seqlab.train import Trainer

    require(args, "out")
    _check_args(args, train=True)
    _torch_setup(args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    held = _holds_run(out) if out.is_dir() else None
    if held and not (args.resume or args.overwrite):
        raise InputError(f"--out {out} already holds {held}: pass --resume to continue it or --overwrite to "
                         "start over")
    resuming = bool(args.resume and has_checkpoint(out))
    run = _read_run(out) if args.resume else {}
    restarting = bool(args.resume and not resuming and run.get("data"))
    if resuming:
        adapter_info, model_config, recorded_train = _checkpoint_settings(out)
        recorded_train = {**recorded_train, **run.get("train", {})}
    elif restarting:  # stopped before its first checkpoint: the same run again, from step 0
        adapter_info, model_config = run.get("adapter"), run.get("model")
        from seqlab.config import BackboneConfig

        try:
            BackboneConfig.from_dict(model_config or {})
        except ConfigError as exc:
            raise CorruptFileError(f"{out / RUN_FILE}: recorded model config: {exc}") from None
        recorded_train = dict(run.get("train") or {})
        print(f"seqlab train: no checkpoint in {out} yet (the run stopped before its first one): starting it again "
              f"from step 0 with the data and settings in {out / RUN_FILE}", file=sys.stderr)
    else:
        adapter_info, model_config, recorded_train = None, None, {}
        if args.resume:
            print(f"seqlab train: no checkpoint in {out} yet: starting a new run", file=sys.stderr)
    progress = not args.quiet
    device = _device(args.device)
    settings = _train_settings(args, recorded_train, resuming or restarting)
    backbone = _backbone(args, model_config)
    spec = _data_spec(args, run.get("data"))
    batch_size, window = settings.get("batch_size", 8), settings.get("window", 256)
    for name, value in (("batch_size", batch_size), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{_flag(name)} must be an int >= 1, got {value!r}")

    seed = settings.get("seed", 0)
    options = dict((adapter_info or {}).get("model") or {})

    def build(adapter):
        _check_model_fits(backbone, device)
        torch.manual_seed(seed)  # the initial weights follow --seed
        return adapter.build_model(backbone, **options).to(device)

    if "store" in spec:
        data, model = _store_data(spec, batch_size, window, build)
    else:
        data = _files_data(spec, batch_size, window, progress)
        model = build(data.adapter)
    adapter = data.adapter
    if adapter_info is not None and _plain(adapter_info, drop="model") != _plain(adapter.info()):
        raise ConfigError(f"the run in {out} was trained with adapter {adapter_info}, the data now given is "
                          f"encoded by {adapter.info()}: give the run's data, or start over with --overwrite")
    if resuming and run.get("train_elements") not in (None, data.train_elements):
        raise ConfigError(f"the training data now holds {data.train_elements} elements, the run in {out} was "
                          f"made on {run['train_elements']}: the data position would not match (give the same "
                          "data, or start over with --overwrite)")
    config = _train_config(settings, out, progress, data.eval_source is not None)

    if resuming:  # loads the checkpoint (and checks it fits these settings) before anything is written
        try:
            trainer = Trainer.resume(out, model, config, data.train, data.eval_source, loss_fn=adapter.loss,
                                     metric_fn=adapter.metric)
        except ConfigError as exc:
            raise ConfigError(_flag_names(str(exc), "TrainConfig", TRAIN_FLAGS)) from None
    else:
        trainer = Trainer(model, config, data.train, data.eval_source, loss_fn=adapter.loss,
                          metric_fn=adapter.metric)

    # everything is checked: only now is --out touched
    out.mkdir(parents=True, exist_ok=True)
    if held and not resuming:  # --overwrite, or --resume of a run that never reached a checkpoint
        _set_aside_previous_run(out)
    record = {"seqlab": "train", "adapter": adapter.info(), "model": backbone.to_dict(),
              "model_options": options, "train": {k: v for k, v in config.to_dict().items()
                                                  if k not in ("checkpoint_dir", "log_path", "progress")},
              "data": data.spec, "train_elements": data.train_elements}
    _write_run(out, record)
    start_step, started = trainer.step, time.perf_counter()
    records = trainer.fit()  # checkpoints every --checkpoint-every steps and at the last one
    seconds = time.perf_counter() - started
    model_path = save_model(out / MODEL_FILE, model, {"step": trainer.step})

    summary = {"steps": trainer.step, "steps_this_run": trainer.step - start_step,
               "tokens": trainer.pos.tokens, "seconds": seconds,
               "train_loss": _last_loss(records, out / LOG_FILE),
               "loss_unit": "mse" if adapter.input_spec.kind == "continuous" and adapter.name == "video" else "nats",
               "metric_name": adapter.metric_name,
               "uniform_baseline": adapter.uniform_baseline(), "model": str(model_path), "out": str(out)}
    if data.held_out:
        model.eval()
        result = evaluate_inputs(model, adapter, data.held_out, device, progress)
        summary.update(held_out=result["metric"], held_out_targets=result["targets"],
                       held_out_inputs=result["inputs"])
    record["summary"] = summary
    _write_run(out, record)
    if (out / PREVIOUS).exists():
        shutil.rmtree(out / PREVIOUS)
    _print_train_summary(summary, args.json)
    return 0


def _memory_bytes(device) -> int | None:
    import torch

    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):  # pragma: no cover - no way to tell
        return None


def _check_model_fits(backbone, device) -> None:
    """Refuse a model too large to train here (--d-model 65536 --n-layer 1024 would otherwise allocate until the
    kernel kills the process). The count is a lower bound: every Mamba layer has at least its input and output
    projections, 3 * d_model * d_inner weights."""
    count = backbone.n_layer * 3 * backbone.d_model * backbone.d_inner
    need, have = count * 16, _memory_bytes(device)  # fp32 weights, gradients and two AdamW moments
    if have is not None and need > have:
        raise ConfigError(f"a model of over {count:,} parameters (--d-model {backbone.d_model} --n-layer "
                          f"{backbone.n_layer}) needs over {need / 2**30:,.1f} GiB to train, this machine has "
                          f"{have / 2**30:,.1f} GiB ({device.type}): use a smaller --d-model or --n-layer")


def _plain(value, drop: str | None = None):
    value = json.loads(json.dumps(value, default=str))
    if drop and isinstance(value, dict):
        value.pop(drop, None)
    return value


def _last_loss(records: list[dict], log: Path) -> float | None:
    if records:
        return records[-1]["loss"]
    if log.is_file():  # nothing trained in this call (the run had reached --steps): the log's last step
        for line in reversed(log.read_bytes().decode("utf-8", "replace").splitlines()):
            try:
                loss = json.loads(line)["loss"]
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                return float(loss)
    return None


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _print_train_summary(s: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(s))
        return
    rate = s["steps_this_run"] and s["seconds"] > 0
    print(f"steps       {s['steps']} ({s['steps_this_run']} in this run"
          + (f", {s['seconds']:.1f} s" if rate else "") + ")")
    loss = s["train_loss"]
    print(f"train loss  {_fmt(loss)} {s['loss_unit']} (last step)")
    baseline = s["uniform_baseline"]
    base = f" (uniform baseline {_fmt(baseline)})" if baseline is not None else ""
    if "held_out" in s:
        print(f"held-out    {_fmt(s['held_out'])} {s['metric_name']} over {s['held_out_targets']} targets{base}")
    else:
        print(f"held-out    - (no held-out data: give --eval FILE, --eval-fraction or --eval-sequences){base}")
    print(f"model       {s['model']}")


# ------------------------------------------------------------------------------------------------------
# seqlab eval


def _eval(args) -> int:
    from seqlab.domains.base import model_from_checkpoint

    if not args.model:
        raise ConfigError("missing MODEL: a model file (model.safetensors) or a training checkpoint folder")
    _check_args(args, train=False)
    _torch_setup(args)
    if bool(args.files) == bool(args.store):
        raise ConfigError("give the held-out data as FILE... or as --store S.zarr (one of them)")
    if not os.path.exists(args.model):
        raise InputError(f"{args.model}: no such model file or checkpoint folder")
    device = _device(args.device)
    model, adapter = model_from_checkpoint(args.model, device=device)
    _check_trainable(adapter)
    if getattr(model.config, "bidirectional", False):
        raise ConfigError(f"{args.model} is a bidirectional model: it has no next-element metric to stream")
    inputs: list[HeldOut] = []
    if args.store:
        from seqlab.pipelines.store import SequenceStore, check_model_fits

        store = SequenceStore(args.store, "r")
        for name in args.sequences or store.list(incomplete=False):
            reader = store.reader(name)
            check_model_fits(model, reader.info, reader.where)
            inputs.append(HeldOut(name, lambda r=reader: _reader_pieces(r, args.window), reader.length))
        if not inputs:
            raise InputError(f"sequence store {store.where} holds no complete sequence")
    else:
        if args.sequences:
            raise ConfigError("--sequences goes with --store")
        for path in args.files:
            _check_file(path)
            inputs.append(HeldOut(path, lambda p=path: _file_pieces(adapter, p, args.window)))
    result = evaluate_inputs(model, adapter, inputs, device, not args.quiet)
    for row in result["inputs"]:
        if row["targets"] == 0:
            raise InputError(f"{row['name']}: too short to measure (a metric needs at least 2 elements)")
    result = {"model": args.model, "adapter": adapter.info(), **result}
    if args.json:
        print(json.dumps(result))
        return 0
    name = result["metric_name"]
    for row in result["inputs"]:
        print(f"{row['name']}\t{_fmt(row['metric'])} {name}\t{row['targets']} targets")
    baseline = result["uniform_baseline"]
    print(f"total\t{_fmt(result['metric'])} {name}\t{result['targets']} targets"
          + (f"\tuniform baseline {_fmt(baseline)}" if baseline is not None else ""))
    return 0


# ------------------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", help="train a model for a domain adapter from files or a sequence store",
        description="Train a Mamba model for a domain adapter with truncated BPTT (state carried across windows "
        "and detached), from files (encoded in memory; one bytes file is memory-mapped) or from a sequence "
        "store (--store; only the chunks each window needs are read, so a chromosome or hours of audio train "
        "without being loaded). Writes checkpoints, train.jsonl, run.json and the final model.safetensors into "
        "--out; --resume continues from the latest checkpoint there. Settings may come from a TOML file "
        "(seqlab --config run.toml train ...; keys of its [train] table).",
        epilog="example: seqlab train notes.txt --domain bytes --eval-fraction 0.1 --steps 500 --out runs/notes")
    t.add_argument("files", nargs="*", help="training files (text/bytes, FASTA/FASTQ, audio, .npy video, memory "
                   "events)")
    data = t.add_argument_group("data")
    data.add_argument("--domain", "--adapter", dest="domain",
                      help="adapter for FILE...: bytes, dna, audio, video, memory (with --store: the store's)")
    data.add_argument("--adapter-settings", metavar="JSON", help='adapter settings, e.g. \'{"utf8": true}\'')
    data.add_argument("--eval", nargs="+", metavar="FILE", help="held-out files (put this after the training "
                      "files)")
    data.add_argument("--eval-fraction", type=EVAL_FRACTION, metavar="F",
                      help="hold out the last F of the encoded data")
    data.add_argument("--store", metavar="S.zarr", help="train from a sequence store (written by seqlab ingest)")
    data.add_argument("--sequences", nargs="+", metavar="NAME", help="stored sequences to train on (default: all "
                      "complete ones but the --eval-sequences)")
    data.add_argument("--eval-sequences", nargs="+", metavar="NAME", help="stored sequences held out for eval")
    run = t.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="output folder (required)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                     "(a new run when there is none yet); flags left out keep the run's settings")
    run.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run "
                     "(kept in DIR/.previous-run until the new run has finished)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument("--threads", type=cli_args.threads, default=None, help="torch CPU threads (default: torch's "
                     "choice)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    model = t.add_argument_group("model (a new run; a resumed run keeps its own)")
    model.add_argument("--ssm", choices=("mamba1", "mamba2"), default=None, help="mixer kind (default mamba1)")
    model_help = {"d_model": "model width (default 128)", "n_layer": "layers (default 4)",
                  "d_state": "SSM state size (default 16 mamba1, 128 mamba2)",
                  "d_conv": "causal conv width (default 4)", "expand": "inner width / d_model (default 2)",
                  "headdim": "Mamba-2 head size (default 64)", "chunk_size": "Mamba-2 SSD chunk (default 256)"}
    for name, text in model_help.items():
        model.add_argument(_flag(name), type=MODEL_TYPES[name], default=None, help=text)
    opt = t.add_argument_group("training")
    train_help = {
        "steps": "optimizer steps in all (default 1000)", "batch_size": "streams per step (default 8)",
        "window": "TBPTT window: elements per stream per step (default 256)",
        "lr": "peak learning rate (default 1e-3)", "min_lr_ratio": "cosine ends at this * lr (default 0.1)",
        "weight_decay": "AdamW weight decay (default 0.1)", "warmup": "linear warmup steps (default 0)",
        "grad_accum": "micro-batches per step (default 1)", "grad_clip": "clip the gradient norm (default 1.0)",
        "eval_every": "evaluate every N steps and at the end (default 100; 0: only the final full evaluation)",
        "eval_windows": "held-out windows per periodic evaluation (default 8)",
        "checkpoint_every": "checkpoint every N steps and at the end (default 100)",
        "keep_checkpoints": "step folders kept: the newest N (default 3; the one 'latest' names is always kept), "
                            "or 'all'",
        "seed": "seed of the initial weights and the RNGs (default 0)",
    }
    for name, text in train_help.items():
        opt.add_argument(_flag(name), type=TRAIN_TYPES[name], default=None, help=text,
                         metavar="N|all" if name == "keep_checkpoints" else None)
    opt.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                     help="bfloat16 autocast (default off)")
    opt.add_argument("--carry-state", action=argparse.BooleanOptionalAction, default=None,
                     help="carry the state across windows (default on)")
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "eval", help="held-out metric of a trained model over files or stored sequences",
        description="Measure a trained model (a model file or a training checkpoint folder) on files or stored "
        "sequences: each input is streamed in windows with the state carried (equal to one pass over it, in "
        "constant memory). Prints the adapter's metric per input and in total, with the uniform baseline.",
        epilog="example: seqlab eval runs/notes/model.safetensors test.txt")
    e.add_argument("model", nargs="?", help="model file (model.safetensors) or checkpoint folder")
    e.add_argument("files", nargs="*", help="files to measure (encoded by the model's adapter)")
    e.add_argument("--store", metavar="S.zarr", help="measure stored sequences instead of files")
    e.add_argument("--sequences", nargs="+", metavar="NAME", help="stored sequences (default: all complete ones)")
    e.add_argument("--window", type=cli_args.count(1), default=4096, help="elements per streamed window (default 4096)")
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    e.add_argument("--threads", type=cli_args.threads, default=None, help="torch CPU threads")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.set_defaults(func=_eval)
