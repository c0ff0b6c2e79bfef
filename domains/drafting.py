"""A drafter for speculative decoding from what a user names (``seqlab generate --draft DRAFT``): a model file or
run folder, or ``maxgram``, checked against the target model and its adapter.

- a model made by the target's adapter (same name, same vocabulary): it drafts token for token
  (``seqlab.decoding.ModelDrafter``);
- a subword model (``domains/subword.py``) for a byte-level target (vocabulary 256): ``SubwordDrafter`` with the
  tokenizer saved in the draft's model file;
- ``maxgram``: ``seqlab.decoding.MaxGramDrafter`` over the target's vocabulary (no model at all).

Anything else (a DNA draft for a byte target, a continuous model) is an ``InputError`` naming both sides.
"""

from __future__ import annotations

import os

from seqlab.errors import InputError

__all__ = ["MAXGRAM", "load_drafter"]

#: the --draft word for the statistical drafter
MAXGRAM = "maxgram"
_BYTES = 256


def _describe(adapter, vocab) -> str:
    return f"a {adapter.name!r} model (vocabulary {vocab})"


def load_drafter(draft: str | os.PathLike, target, target_adapter, device=None):
    """The drafter ``draft`` names for ``target`` (a LanguageModel built by ``target_adapter``)."""
    from seqlab.decoding import MaxGramDrafter, ModelDrafter, SubwordDrafter

    from .bytes import ByteAdapter
    from .registry import model_from_checkpoint
    from .subword import SubwordAdapter

    if os.fspath(draft) == MAXGRAM:
        return MaxGramDrafter(target.vocab_size)
    if not os.path.exists(draft):
        raise InputError(f"--draft {os.fspath(draft)}: no such model file or run folder (or give 'maxgram')")
    model, adapter = model_from_checkpoint(draft, device=device)
    wanted = _describe(target_adapter, target.vocab_size)
    if adapter.continuous:
        raise InputError(
            f"--draft {os.fspath(draft)}: a {adapter.name!r} model takes frames; it cannot draft for {wanted}"
        )
    if adapter.name == target_adapter.name and model.vocab_size == target.vocab_size:
        return ModelDrafter(model)
    if isinstance(adapter, SubwordAdapter) and isinstance(target_adapter, ByteAdapter) and target.vocab_size == _BYTES:
        return SubwordDrafter(model, adapter)
    raise InputError(
        f"--draft {os.fspath(draft)}: {_describe(adapter, model.vocab_size)} cannot draft for {wanted}: give a "
        f"model of the same adapter and vocabulary, a subword model for a byte model, or '{MAXGRAM}'"
    )
