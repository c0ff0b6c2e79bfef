"""Subprocess helper for the exact-resume test: train a tiny LM, optionally SIGKILL itself after a step.

usage: python _train_worker.py OUT_DIR MODE [KILL_AFTER]
MODE "fresh": train from scratch (to max_steps, or until KILL_AFTER where it kill -9s itself);
MODE "resume": continue from OUT_DIR/ckpt to max_steps. Final weights go to OUT_DIR/final.safetensors.
"""

import os
import signal
import sys
from pathlib import Path

import torch

from seqlab.checkpoint import save_model
from seqlab.testing import tiny_lm
from seqlab.train import TrainConfig, Trainer


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    kill_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 32, (4 * 120,), generator=g)  # 7 windows: the epoch wraps at step 7
    model = tiny_lm(vocab=32, d_model=16, n_layer=2)
    config = TrainConfig(
        lr=3e-3,
        max_steps=12,
        warmup_steps=3,
        batch_size=4,
        window=16,
        grad_accum=2,
        checkpoint_dir=str(out / "ckpt"),
        checkpoint_every=4,
        log_path=str(out / "log.jsonl"),
        progress=False,
        seed=7,
    )
    callbacks = []
    if kill_after is not None:

        def die(trainer, record):
            if trainer.step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        callbacks.append(die)
    if mode == "resume":
        trainer = Trainer.resume(out / "ckpt", model, config, data, callbacks=callbacks)
    else:
        trainer = Trainer(model, config, data, callbacks=callbacks)
    trainer.fit()
    save_model(out / "final.safetensors", model)


if __name__ == "__main__":
    main()
