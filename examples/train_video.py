"""Video adapter end to end on a CPU: tiny Mamba video models learn motion from synthetic moving-square clips.

1. next-frame prediction (causal): per-pixel MSE / PSNR on held-out clips against the copy-previous-frame
   baseline (predicting that nothing moves), then a long video on disk (.npy) streamed window by window with
   the state carried, checked against one pass, and its predicted frames decoded and written as PNGs;
2. clip classification of the motion direction (4 classes), causal and bidirectional, against chance.

Every number printed is computed here. Run: `.venv/bin/python examples/train_video.py` (about 2-4 minutes on
2 cores). Options: --steps (next-frame steps; classification runs half as many), --out DIR.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from seqlab.config import BackboneConfig
from seqlab.domains.video import VideoAdapter, VideoSource, moving_square_clips
from seqlab.train import TrainConfig, Trainer

SIZE, FRAMES, BATCH = 16, 12, 8


def train(adapter: VideoAdapter, config: BackboneConfig, steps: int, lr: float, seed: int):
    torch.manual_seed(seed)
    clips, labels = moving_square_clips(BATCH * steps, FRAMES, size=SIZE, seed=seed + 1)
    held_out, held_labels = moving_square_clips(256, FRAMES, size=SIZE, seed=seed + 2)
    classify = adapter.task == "classify"
    train_data = VideoSource(adapter, clips, BATCH, labels=labels if classify else None)
    test = VideoSource(adapter, held_out, 256, labels=held_labels if classify else None)
    model = adapter.build_model(config)
    tc = TrainConfig(
        lr=lr,
        max_steps=steps,
        warmup_steps=min(20, steps),
        batch_size=BATCH,
        window=train_data.window_size,
        carry_state=False,
        weight_decay=0.0,
        progress=False,
        seed=seed,
    )
    start = time.perf_counter()
    Trainer(model, tc, train_data, loss_fn=adapter.loss, metric_fn=adapter.metric, loss_unit=adapter.loss_unit).fit()
    seconds = time.perf_counter() - start
    model.eval()
    x, y = test.window(0)
    with torch.no_grad():
        out = model(x)
    return model, x, y, out, seconds


def long_video(frames: int, seed: int) -> np.ndarray:
    """One square whose direction changes every 24 frames: a video longer than any training clip."""
    rng = np.random.default_rng(seed)
    video = np.zeros((frames, SIZE, SIZE, 1), np.uint8)
    video[:] = rng.integers(0, 40, size=(1, SIZE, SIZE, 1), dtype=np.uint8)
    y, x = rng.integers(0, SIZE, size=2)
    for f in range(frames):
        if f % 24 == 0:
            dy, dx = [(0, 1), (0, -1), (1, 0), (-1, 0)][rng.integers(4)]
        video[f, (y + np.arange(4))[:, None] % SIZE, (x + np.arange(4))[None, :] % SIZE] = 220
        y, x = y + dy, x + dx
    return video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default=None, help="folder for the long video and its predicted frames")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast and does not fight other work
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="seqlab-video-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = BackboneConfig(d_model=64, n_layer=2, d_state=16)

    # 1. next-frame prediction ------------------------------------------------------------------------
    nf = VideoAdapter(frame_size=(SIZE, SIZE), channels=1, tubelet=(2, 4, 4), embed_dim=16)
    model, x, y, out, seconds = train(nf, config, args.steps, 1e-2, seed=0)
    mse, copy = nf.metric(out, y), nf.copy_baseline(x, y)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"next-frame  {params} params, {args.steps} steps in {seconds:.0f} s, 256 held-out clips of {FRAMES} "
        f"frames {SIZE}x{SIZE}, tubelet (2, 4, 4)"
    )
    print(f"  model:              MSE {mse:.5f}  PSNR {nf.psnr(mse):.2f} dB")
    print(f"  copy-previous-frame MSE {copy:.5f}  PSNR {nf.psnr(copy):.2f} dB   (ratio {mse / copy:.2f})")

    video = long_video(240, seed=7)
    nf.write(out_dir / "long.npy", video)
    with torch.no_grad():
        outs = list(nf.stream(model, out_dir / "long.npy", window=16))  # 32 frames per window, state carried
        streamed = torch.cat([o.output for o in outs], 1)
        whole = model(nf.encode(nf.read(out_dir / "long.npy"))[None]).output
    patches = nf.encode(video)[None]
    long_mse = nf.metric(streamed[:, :-1], patches[:, 1:])
    long_copy = nf.copy_baseline(patches[:, :-1], patches[:, 1:])
    print(
        f"  long video ({len(video)} frames, streamed in {len(outs)} windows): MSE {long_mse:.5f} vs copy "
        f"{long_copy:.5f}; streamed == one pass: max |diff| {float((streamed - whole).abs().max()):.1e}"
    )
    predicted = nf.decode(streamed[0, :-1])  # uint8 frames 2..T-1 as the model saw them coming
    nf.write(out_dir / "predicted", predicted[:24])
    print(f"  decoded predictions: {predicted.shape} {predicted.dtype}, first 24 written to {out_dir / 'predicted'}")

    # 2. classification of the motion direction ------------------------------------------------------
    for bidirectional in (False, True):
        cl = VideoAdapter(
            frame_size=(SIZE, SIZE), channels=1, tubelet=(2, 4, 4), task="classify", num_classes=4, embed_dim=16
        )
        cfg = BackboneConfig(d_model=64, n_layer=2, d_state=16, bidirectional=bidirectional)
        steps = args.steps // 2
        _, x, y, out, seconds = train(cl, cfg, steps, 3e-3, seed=1)
        name = "bidirectional" if bidirectional else "causal"
        print(
            f"classify ({name:13s}) {steps} steps in {seconds:.0f} s: accuracy {cl.accuracy(out, y):.3f} "
            f"(chance 0.25), cross-entropy {cl.metric(out, y):.3f} bits (uniform {cl.uniform_baseline():.0f})"
        )


if __name__ == "__main__":
    main()
