"""Distillation of attention models into Mamba-2 hybrids ("The Mamba in the Llama"): see docs/distill.md.

``mapping.py``: which layers, the student's config and the attention -> Mamba-2 weight mapping;
``objective.py``: the teacher + student module the Trainer trains, and its losses; ``run.py``: a whole run
(progressive alignment stages, then end-to-end KL + CE) into a folder, resumable, optionally on Ray Train.
"""

from seqlab.distill.mapping import (
    attention_layers,
    build_student,
    calibrate_norms,
    choose_layers,
    init_from_attention,
    mamba2_options,
    stage_groups,
    student_config,
)
from seqlab.distill.objective import (
    DistillModel,
    DistillOutput,
    distill_loss,
    distill_parts,
    evaluate_distillation,
    kl_divergence,
)
from seqlab.distill.run import distill, plan_stages, read_plan

__all__ = [
    "DistillModel",
    "DistillOutput",
    "attention_layers",
    "build_student",
    "calibrate_norms",
    "choose_layers",
    "distill",
    "distill_loss",
    "distill_parts",
    "evaluate_distillation",
    "init_from_attention",
    "kl_divergence",
    "mamba2_options",
    "plan_stages",
    "read_plan",
    "stage_groups",
    "student_config",
]
