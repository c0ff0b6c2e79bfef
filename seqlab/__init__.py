"""seqlab: Mamba state space models for long signals.

The top-level names load lazily, so ``import seqlab.kernels`` stays light. The rooms (kernels, core, domains,
pipelines, cli), the arrows between them and the contracts: docs/architecture.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

__version__ = "0.1.0"

# In a source checkout, seqlab.kernels, seqlab.domains and seqlab.pipelines are the folders beside this one
# (pyproject's package-dir), which an install maps, editable or not. A Python started in the checkout's root imports
# this folder as seqlab even when a non-editable copy is installed; the subpackages are then found beside it.
if importlib.util.find_spec(".kernels", __name__) is None:
    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(_checkout, "kernels", "__init__.py")):
        __path__.append(_checkout)

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
