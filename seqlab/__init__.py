"""seqlab: Mamba state space models for long signals.

The top-level names load lazily, so ``import seqlab.kernels`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "BackboneConfig": "seqlab.config",
    "LayerOverride": "seqlab.config",
    "RecurrentState": "seqlab.state",
    "Backbone": "seqlab.backbone",
    "LanguageModel": "seqlab.models",
    "SequenceModel": "seqlab.models",
    "ModelOutput": "seqlab.models",
    "errors": "seqlab.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'seqlab' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name == "errors" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
