"""The budgets of a ladder run (``QUICK``: every rung in tiny form, for the test suite; ``FULL``: the run recorded in
docs/ladder.md) and the rungs' names."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

#: the rungs in order: (number, folder name, what it does)
RUNGS = (
    (1, "01-moe", "MambaByte (dense) and MambaByte-MoE, the same active parameters and budget"),
    (2, "02-self-reward", "self-rewarding fine-tuning of the MoE model on the program-checked task"),
    (3, "03-laser", "LASER search on held-out text and the best intervention"),
    (4, "04-aqlm", "AQLM at about 2 and 3 bits per parameter"),
    (5, "05-decoding", "the final model decoded plainly, with a subword drafter, and with a cascade"),
    (6, "06-drugs", "DRµGS sampling against temperature sampling"),
    (7, "07-distill", "beside the ladder: a Llama-style teacher distilled into a 50% Mamba hybrid"),
)
#: what each rung reads from the rungs before it (a rung that reruns makes these rerun too)
NEEDS = {1: (), 2: (1,), 3: (2,), 4: (3,), 5: (1, 4), 6: (1, 4), 7: ()}


@dataclass(frozen=True)
class LadderSettings:
    """Every size and budget of a run. The byte models of rungs 1-6 share ``d_model``, ``n_layer`` and
    ``d_state``; the dense model's MLP is ``d_ffn`` wide and the MoE model has ``experts`` experts of that width,
    one used per token (top-1), so both have the same active parameters."""

    # rung 1: the two byte models, trained on the same stream for the same steps
    d_model: int
    n_layer: int
    d_ffn: int
    steps: int
    batch_size: int
    window: int
    d_state: int = 16
    experts: int = 4
    lr: float = 4e-3
    # rung 2: supervised seed model M0 on the instruction task, then self-rewarding iterations
    task_train: int = 512
    task_prompts: int = 128
    task_test: int = 128
    text_docs: int = 1024  # pieces of training text mixed into the SFT documents (keeps the model a text model)
    sft_steps: int = 400
    sft_batch: int = 32
    sft_lr: float = 1e-3
    sr_iterations: int = 3
    sr_candidates: int = 4
    sr_judge_samples: int = 3
    sr_new_tokens: int = 8
    dpo_batch: int = 8
    dpo_lr: float = 1e-4
    dpo_epochs: int = 2
    # rung 3: LASER
    laser_rhos: tuple[float, ...] = (0.5, 0.25, 0.1)
    laser_compose: int = 2
    # rung 4: AQLM
    aqlm: tuple[str, ...] = ("2x6g8", "3x6g8")
    calib_windows: int = 64
    calib_window: int = 256
    aqlm_rounds: int = 4
    # rung 5: decoding
    decode_tokens: int = 256
    decode_repeats: int = 3
    speculate: int = 4
    subword_vocab: int = 512
    drafter_d_model: int = 64
    drafter_n_layer: int = 2
    drafter_steps: int = 600
    # rung 6: sampling
    samples: int = 8
    sample_tokens: int = 128
    temperature: float = 1.0
    drugs_theta: float = 0.3
    # rung 7: distillation beside the ladder
    teacher_d_model: int = 128
    teacher_layers: int = 4
    teacher_heads: int = 4
    teacher_kv_heads: int = 2
    teacher_steps: int = 600
    distill_steps: int = 100
    distill_e2e_steps: int = 100

    def with_changes(self, **changes) -> LadderSettings:
        """A copy with ``changes`` (unknown names are a ConfigError)."""
        from seqlab.errors import ConfigError

        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown ladder setting(s): {', '.join(unknown)}")
        return replace(self, **changes)


#: the recorded run (docs/ladder.md)
FULL = LadderSettings(d_model=128, n_layer=4, d_ffn=256, steps=1000, batch_size=16, window=256)

#: every rung in tiny form (the test suite runs it; its numbers only show the plumbing works)
QUICK = LadderSettings(
    d_model=32,
    n_layer=2,
    d_ffn=64,
    steps=24,
    batch_size=8,
    window=64,
    task_train=32,
    task_prompts=6,
    task_test=12,
    text_docs=16,
    sft_steps=12,
    sft_batch=8,
    sr_iterations=1,
    sr_candidates=2,
    sr_judge_samples=1,
    sr_new_tokens=6,
    dpo_batch=4,
    laser_rhos=(0.25,),
    laser_compose=1,
    calib_windows=8,
    calib_window=64,
    aqlm_rounds=1,
    decode_tokens=24,
    decode_repeats=1,
    subword_vocab=300,
    drafter_d_model=32,
    drafter_n_layer=1,
    drafter_steps=12,
    samples=3,
    sample_tokens=24,
    teacher_d_model=32,
    teacher_heads=4,
    teacher_kv_heads=2,
    teacher_steps=16,
    distill_steps=4,
    distill_e2e_steps=4,
)
