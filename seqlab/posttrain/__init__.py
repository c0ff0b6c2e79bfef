"""Post-training without new labels (issue 21): LASER rank reduction (``seqlab.posttrain.laser``), DPO
(``seqlab.posttrain.dpo``) and self-rewarding fine-tuning with the model as its own judge
(``seqlab.posttrain.self_reward``) on a program-checkable instruction task (``seqlab.posttrain.tasks``).
See docs/posttrain.md."""
