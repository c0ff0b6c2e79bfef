"""seqlab.domains: one adapter per modality (raw bytes, audio, DNA, video frames, agent memory streams), all with
the small protocol of ``seqlab.domains.base``. Adapter modules import their optional dependencies lazily.
This room imports the core and the kernels, never the pipelines or the CLI (docs/architecture.md)."""

if __name__ != "seqlab.domains":  # this folder imported as a bare 'domains' from a checkout's root: seqlab/_checkout.py
    from seqlab._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from .base import (
        ADAPTERS,
        Adapter,
        InputSpec,
        TokenAdapter,
        adapter_from_checkpoint,
        adapter_from_info,
        get_adapter,
        model_from_checkpoint,
        register_adapter,
    )
    from .registry import describe_model

__all__ = [
    "ADAPTERS",
    "Adapter",
    "InputSpec",
    "TokenAdapter",
    "adapter_from_checkpoint",
    "adapter_from_info",
    "describe_model",
    "get_adapter",
    "model_from_checkpoint",
    "register_adapter",
]
