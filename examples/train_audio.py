"""Train a small Mamba on real speech, 8-bit mu-law at 16 kHz (or continuous samples), report held-out bits per
sample against simple baselines, and write a WAV of a generated continuation.

The speech is the repository's real test audio (tests/data/audio, see PROVENANCE.md there): the spoken digits
(16 kHz FLAC) and the first 75% of an English sentence (22.05 kHz WAV, resampled to 16 kHz) train the model; the
last 25% of that sentence, which the model never sees, is held out. Every number printed is computed here.

Run: `.venv/bin/python examples/train_audio.py` (~5 min on one CPU core). Options: --mode mulaw|continuous,
--steps, --d-model, --threads, --seconds (length of the generated continuation), --out DIR, --files (your own
audio files to train on instead; the last 25% of the last file is held out).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from seqlab import BackboneConfig
from seqlab.domains.audio import PCM16_STEP, AudioAdapter, Waveform
from seqlab.train import TrainConfig, Trainer

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "audio"
FILES = [DATA / "speech_digits_16k.flac", DATA / "speech_en_22k.wav"]


@torch.no_grad()
def held_out_bits(adapter: AudioAdapter, model, encoded: torch.Tensor) -> float:
    """The adapter's metric over the whole held-out signal, streamed through the model with its state."""
    model.eval()
    total, count, state = 0.0, 0, None
    for start in range(0, encoded.shape[0] - 1, 4096):
        chunk = encoded[start : start + 4097]
        out = model(chunk[None, :-1], state)
        n = chunk.shape[0] - 1
        total += adapter.metric(out, chunk[None, 1:]) * n
        count += n
        state = out.state
    return total / count


def baselines(adapter: AudioAdapter, train: torch.Tensor, held: torch.Tensor) -> dict[str, float]:
    """Context-free models fitted on the training signal, measured on the held-out one like the model."""
    if adapter.mode == "mulaw":
        p = torch.bincount(held, minlength=adapter.mu).double() / held.numel()
        q = (torch.bincount(train, minlength=adapter.mu).double() + 0.5) / (train.numel() + 0.5 * adapter.mu)
        return {"training-set level histogram (no context)": float(-(p * q.log2()).sum())}
    mean, std = train.mean(), train.std()
    nll = 0.5 * ((held - mean) / std) ** 2 + torch.log(std) + 0.5 * math.log(2 * math.pi)
    return {"i.i.d. Gaussian fitted to training samples": float(nll.mean()) / math.log(2) - math.log2(PCM16_STEP)}


@torch.no_grad()
def continue_signal(adapter: AudioAdapter, model, prompt: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Prompt + ``steps`` sampled elements (ids, or frames drawn from the predicted Gaussians)."""
    model.eval()
    if adapter.mode == "mulaw":
        out = model.generate(prompt[None], max_new_tokens=steps, do_sample=True, temperature=1.0, seed=seed)
        return torch.cat([prompt, torch.tensor(out.tokens[0], dtype=prompt.dtype)])
    generator = torch.Generator().manual_seed(seed)
    out = model(prompt[None])
    frames, state = [prompt], out.state
    last = out.output[:, -1]
    channels = adapter.out_channels
    for _ in range(steps):
        mean = last[:, :channels]
        scale = PCM16_STEP + torch.nn.functional.softplus(last[:, channels:])
        x = (mean + scale * torch.randn(mean.shape, generator=generator)).clamp(-1, 1)
        frames.append(x)
        step = model.step(x, state)
        last, state = step.output, step.state
    return torch.cat(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=AudioAdapter.MODES, default="mulaw")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of the generated continuation")
    parser.add_argument("--files", nargs="+", type=Path, default=FILES)
    parser.add_argument("--out", type=Path, default=Path("out/train_audio"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits a model this small)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    adapter = AudioAdapter(mode=args.mode)  # 16 kHz, mono (channels mixed down)
    encoded = []
    for path in args.files:
        wave = adapter.read(path)
        encoded.append(adapter.encode(wave))
        print(
            f"{path.name}: {wave.num_channels} ch, {wave.sample_rate} Hz, {wave.duration:.2f} s -> "
            f"{encoded[-1].shape[0]:,} samples at {adapter.sample_rate} Hz"
        )
    split = int(0.75 * encoded[-1].shape[0])
    train = torch.cat([*encoded[:-1], encoded[-1][:split]])
    held = encoded[-1][split:]
    print(
        f"train {train.shape[0]:,} samples, held out {held.shape[0]:,} samples "
        f"({held.shape[0] / adapter.sample_rate:.2f} s of {args.files[-1].name}, never trained on)"
    )

    model = adapter.build_model(BackboneConfig(d_model=args.d_model, n_layer=2, d_state=16))
    config = TrainConfig(
        lr=3e-3,
        warmup_steps=min(50, args.steps),
        max_steps=args.steps,
        batch_size=8,
        window=256,
        weight_decay=0.0,
        progress=False,
        seed=0,
    )
    t0 = time.perf_counter()
    every = max(1, args.steps // 4)

    def report(trainer: Trainer, record: dict) -> None:
        if record["step"] % every == 0 or record["step"] == args.steps:
            bits = held_out_bits(adapter, trainer.model, held)
            trainer.model.train()
            print(
                f"step {record['step']:5d}  train loss {record['loss']:.3f} {record['loss_unit']}  held-out {bits:.3f} "
                f"bits/sample  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    Trainer(
        model, config, adapter.source(train, 8, 256), loss_fn=adapter.loss, metric_fn=adapter.metric, callbacks=[report]
    ).fit()

    bits = held_out_bits(adapter, model, held)
    print(f"\nheld-out {adapter.metric_name} ({args.mode}): {bits:.3f}")
    print(f"  uniform baseline: {adapter.uniform_baseline():.3f}")
    for name, value in baselines(adapter, train, held).items():
        print(f"  {name}: {value:.3f}")

    # a continuation of the first 0.25 s of the held-out speech, decoded and written as a WAV
    args.out.mkdir(parents=True, exist_ok=True)
    prompt = held[: adapter.sample_rate // 4]
    t0 = time.perf_counter()
    signal = continue_signal(adapter, model, prompt, int(args.seconds * adapter.sample_rate), seed=0)
    wave: Waveform = adapter.decode(signal)
    adapter.write(args.out / "continuation.wav", wave)
    adapter.write(args.out / "prompt.wav", adapter.decode(prompt))
    print(
        f"\nwrote {args.out / 'continuation.wav'}: {wave.duration:.2f} s at {wave.sample_rate} Hz "
        f"(0.25 s real prompt + {args.seconds:.2f} s generated in {time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
