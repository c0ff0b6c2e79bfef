"""Post-training without new labels (issue 21): LASER rank reduction (``seqlab.posttrain.laser``), DPO
(``seqlab.posttrain.dpo``) and self-rewarding fine-tuning with the model as its own judge
(``seqlab.posttrain.self_reward``) on a program-checkable instruction task (``seqlab.posttrain.tasks``).
See docs/posttrain.md."""

from seqlab.posttrain.dpo import DPOConfig, DPOReport, PreferencePair, dpo_loss, sequence_logprobs, train_dpo
from seqlab.posttrain.laser import (
    DEFAULT_RHOS,
    Intervention,
    LaserReport,
    LowRankLinear,
    apply_interventions,
    densify,
    intervention_targets,
    laser_search,
    plot_heatmap,
    rank_for,
    stream_scorer,
)
from seqlab.posttrain.self_reward import SelfRewardReport, self_reward

__all__ = [
    "DEFAULT_RHOS",
    "DPOConfig",
    "DPOReport",
    "Intervention",
    "LaserReport",
    "LowRankLinear",
    "PreferencePair",
    "SelfRewardReport",
    "apply_interventions",
    "densify",
    "dpo_loss",
    "intervention_targets",
    "laser_search",
    "plot_heatmap",
    "rank_for",
    "self_reward",
    "sequence_logprobs",
    "stream_scorer",
    "train_dpo",
]
