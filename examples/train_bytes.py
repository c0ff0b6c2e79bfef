"""Train a byte-level Mamba (MambaByte) with ``seqlab.domains.bytes.ByteAdapter`` and report held-out bits per
byte against the uniform baseline of 8.

By default the corpus is the CPython documentation text shipped with every interpreter (``pydoc_data.topics``),
real English present on any machine; ``--file`` trains on any file of yours (text or binary). The file is
memory-mapped (``ByteAdapter.source``), never read whole; the last 5% is held out and scored by streaming it
through the model window by window with the state carried (``ByteAdapter.iter_windows``), so the score is the
bits per byte of the whole held-out text in one pass. The model is saved with its adapter, reloaded, and
continues a prompt.

Run: `.venv/bin/python examples/train_bytes.py` (defaults: 400 steps, d_model=64: about 1 min of training on one
idle CPU core; `--threads 1` when the machine is busy).
Options: --steps, --d-model, --n-layer, --batch-size, --window, --lr, --file, --out, --threads.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab import BackboneConfig
from seqlab.checkpoint import load_model, save_model
from seqlab.domains import adapter_from_checkpoint
from seqlab.domains.bytes import ByteAdapter
from seqlab.train import TrainConfig, Trainer


def python_docs() -> bytes:
    from pydoc_data import topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


@torch.no_grad()
def streamed_bits_per_byte(model, adapter: ByteAdapter, path: Path, window: int = 1024) -> tuple[float, int]:
    """Bits per byte of every next-byte prediction in the file, one window in memory, the state carried."""
    model.eval()
    state, previous, total, count = None, None, 0.0, 0
    for ids in adapter.iter_windows(path, window):
        if previous is not None:  # the last byte of the previous window predicts the first byte of this one
            ids = torch.cat([previous, ids])
        if ids.numel() < 2:
            previous = ids
            continue
        out = model(ids[None, :-1], state)
        total += F.cross_entropy(out.logits[0].float(), ids[1:], reduction="sum").item()
        count += ids.numel() - 1
        state, previous = out.state, ids[-1:]
    return total / count / math.log(2), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--file", help="train on this file instead of the CPython docs text")
    parser.add_argument("--out", default="out/train_bytes", help="folder for the corpus copy and the model")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 is faster for tiny models on a busy machine",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = ByteAdapter()
    if args.file:
        corpus = Path(args.file)
        size = corpus.stat().st_size
    else:
        corpus = out / "python_docs.txt"
        adapter.write(corpus, python_docs())
        size = corpus.stat().st_size
    split = int(size * 0.95)
    held_out = out / "held_out.bin"
    with open(corpus, "rb") as handle:  # copy the held-out tail to its own file, to stream it like any file
        handle.seek(split)
        adapter.write(held_out, handle.read())
    print(f"corpus: {corpus} ({size:,} bytes); training on bytes [0, {split:,}), held out {size - split:,}")

    torch.manual_seed(0)
    model = adapter.build_model(BackboneConfig(d_model=args.d_model, n_layer=args.n_layer, d_state=16))
    params = sum(p.numel() for p in model.parameters())
    train = adapter.source(corpus, batch_size=args.batch_size, window=args.window, stop=split)
    config = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        window=args.window,
        lr=args.lr,
        warmup_steps=min(20, args.steps),
        progress=False,
    )
    trainer = Trainer(model, config, train, loss_fn=adapter.loss, metric_fn=adapter.metric)

    before, _ = streamed_bits_per_byte(model, adapter, held_out)
    started = time.perf_counter()
    records = trainer.fit()
    seconds = time.perf_counter() - started
    after, scored = streamed_bits_per_byte(model, adapter, held_out)
    print(
        f"model: {params:,} parameters; {args.steps} steps of {args.batch_size}x{args.window} bytes "
        f"in {seconds:.0f} s; last train loss {records[-1]['loss']:.3f} bits/byte"
    )
    print(
        f"held-out bits per byte: {after:.3f} (untrained {before:.3f}, uniform baseline "
        f"{adapter.uniform_baseline():.1f}) over {scored:,} predictions"
    )

    path = save_model(out / "model.safetensors", model)
    restored_adapter = adapter_from_checkpoint(path)
    restored = restored_adapter.build_model(BackboneConfig(d_model=args.d_model, n_layer=args.n_layer, d_state=16))
    load_model(path, restored)
    prompt = restored_adapter.encode('The "with" statement\n')
    result = restored.eval().generate(prompt, 160, do_sample=True, temperature=0.7, top_k=20, seed=0)
    print(f"saved {path} (adapter {restored_adapter!r}); a sample continuing 'The \"with\" statement':")
    print(restored_adapter.decode_text(torch.cat([prompt, torch.tensor(result.tokens[0])])))


if __name__ == "__main__":
    main()
