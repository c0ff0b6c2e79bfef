"""seqlab end-to-end in one minute on a CPU: train a tiny byte-level Mamba on real text, stream it with
carried state, save and restore that state, and continue a prompt token by token.

Every number printed is computed here. Run: `make demo` (or `.venv/bin/python examples/quickstart.py`).
Options: --steps, --ssm mamba1|mamba2, --text FILE (your own UTF-8/binary file), --out DIR.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab import BackboneConfig, LanguageModel, RecurrentState


def corpus(path: str | None) -> bytes:
    if path:
        return Path(path).read_bytes()
    from pydoc_data import topics  # the CPython documentation text shipped with every interpreter

    return "\n".join(topics.topics.values()).encode("utf-8")


def bits_per_byte(model: LanguageModel, data: torch.Tensor, window: int) -> float:
    """Mean next-byte loss in bits, streaming ``data`` through the model window by window with state."""
    state, total, count = None, 0.0, 0
    with torch.no_grad():
        for start in range(0, data.numel() - 1, window):
            chunk = data[start : start + window + 1]
            out = model(chunk[None, :-1], state)
            total += F.cross_entropy(out.logits[0], chunk[1:], reduction="sum").item()
            count += chunk.numel() - 1
            state = out.state
    return total / count / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ssm", choices=["mamba1", "mamba2"], default="mamba2")
    parser.add_argument("--text", help="train on this file instead of the CPython docs text")
    parser.add_argument("--out", default="out/quickstart", help="folder for the saved state")
    args = parser.parse_args()
    torch.manual_seed(0)

    raw = corpus(args.text)
    data = torch.tensor(list(raw), dtype=torch.long)
    split = int(0.95 * data.numel())
    train, held_out = data[:split], data[split : split + 32_768]
    print(
        f"corpus: {len(raw):,} bytes ({'CPython docs' if not args.text else args.text}); "
        f"held-out {held_out.numel():,} bytes"
    )

    config = BackboneConfig(
        d_model=128, n_layer=2, ssm=args.ssm, d_state=16 if args.ssm == "mamba1" else 32, headdim=32, chunk_size=64
    )
    model = LanguageModel(config, vocab_size=256)
    print(f"model: {args.ssm}, {sum(p.numel() for p in model.parameters()):,} parameters")

    window, batch = 256, 8
    before = bits_per_byte(model.eval(), held_out, 4096)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, train.numel() - window - 1, (batch,))
        seq = torch.stack([train[s : s + window + 1] for s in starts.tolist()])
        logits = model(seq[:, :-1], return_state=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps:
            rate = step * batch * window / (time.perf_counter() - started)
            print(f"  step {step:4d}  loss {loss.item() / math.log(2):.3f} bits/byte  {rate:,.0f} tok/s")
    model.eval()
    after = bits_per_byte(model, held_out, 4096)
    print(f"held-out bits/byte: {before:.3f} untrained -> {after:.3f} trained (uniform baseline 8.000)")

    # Streaming in chunks equals one pass (the state contract).
    sample = held_out[None, :3000]
    with torch.no_grad():
        whole = model(sample)
        state, pieces = None, []
        for start in range(0, sample.shape[1], 1024):
            out = model(sample[:, start : start + 1024], state)
            pieces.append(out.logits)
            state = out.state
    diff = (torch.cat(pieces, 1) - whole.logits).abs().max().item()
    print(f"3,000 bytes in 1,024-byte chunks vs one pass: max |diff| = {diff:.2e}")

    # Save the state, restore it, continue a prompt one byte at a time (greedy).
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt = b"The return statement"
    with torch.no_grad():
        prefill = model(torch.tensor([list(prompt)]))
        path = prefill.state.save(out_dir / "prompt_state.safetensors")
        state = RecurrentState.load(path, model)
        token, generated = prefill.logits[0, -1].argmax(), []
        for _ in range(60):
            generated.append(int(token))
            out = model.step(token[None], state)
            state, token = out.state, out.logits[0].argmax()
    print(f"state saved to {path} ({path.stat().st_size:,} bytes, position {state.position - 60})")
    print(f"greedy continuation: {(prompt + bytes(generated)).decode('utf-8', errors='replace')!r}")


if __name__ == "__main__":
    main()
