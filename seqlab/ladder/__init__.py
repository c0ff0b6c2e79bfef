"""``seqlab ladder``: the seed article's ladder climbed on one model, in one command, on real text.

Rungs 1-6 go on from one model: MambaByte (dense) and MambaByte-MoE with the same active parameters and budget;
self-rewarding fine-tuning of the MoE model on the program-checked instruction task; LASER; AQLM at about 2 and 3
bits; the final model decoded plainly, with a subword drafter and with a cascade; DRµGS against temperature
sampling. Rung 7 stands beside them: a small Llama-style teacher distilled into a 50% Mamba hybrid (then LASER'd).
Every rung writes its models and a checkpoint record into its own folder; ``run_ladder(..., resume=True)`` goes on
after an interruption. docs/ladder.md shows a full run.

    from seqlab.ladder import QUICK, run_ladder
    summary = run_ladder(QUICK, "ladder-out")
    summary["rows"]   # one dict per table row (summary.md)
"""

from seqlab.ladder.run import run_ladder, split_corpus
from seqlab.ladder.settings import FULL, QUICK, RUNGS, LadderSettings

__all__ = ["FULL", "QUICK", "RUNGS", "LadderSettings", "run_ladder", "split_corpus"]
