"""Optional dependencies: which seqlab extra installs each optional package, and the check that says so.

Library code that needs an optional package calls ``require_module("zarr", "sequence stores")``: a missing package
is a :class:`seqlab.errors.ConfigError` naming the extra to install, instead of a bare ModuleNotFoundError. The
command line (``seqlab.cli``) turns a ModuleNotFoundError of one of these packages into the same one line
(:func:`missing_extra`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: optional top-level package -> the seqlab extra that installs it
EXTRAS = {
    "zarr": "store",
    "ray": "ray",
    "soundfile": "audio",
    "torchaudio": "audio",
    "Bio": "dna",
    "PIL": "video",
    "triton": "triton",
    "transformers": "hf",
    "matplotlib": "demo",
    "tokenizers": "subword",
    "gguf": "gguf",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line advice for a missing optional package (``pip install 'seqlab[store]'``), or None when the
    missing module is not one of seqlab's optional packages (a bug or a broken install: let it show)."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return f"this needs the optional package {top!r}: pip install 'seqlab[{EXTRAS[top]}]'"


def require_module(name: str, what: str) -> ModuleType:
    """Import the optional package ``name`` (needed for ``what``), or raise a ConfigError naming its extra."""
    from seqlab.errors import ConfigError

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = name.split(".")[0]
        if (exc.name or "").split(".")[0] != top:
            raise  # the package is there, something it imports is not: its own error says more
        extra = EXTRAS.get(top)
        hint = f"pip install 'seqlab[{extra}]'" if extra else f"pip install {top}"
        raise ConfigError(f"{what} needs the optional package {top!r}: {hint}") from None


__all__ = ["EXTRAS", "missing_extra", "require_module"]
