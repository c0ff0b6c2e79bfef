"""A reverse-complement equivariant ``LanguageModel`` over the DNA vocabulary, with shared weights."""

from __future__ import annotations

import torch
from torch import nn

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError, StateError

from .vocab import VOCAB, _complement_table

__all__ = ["RCEquivariantLM"]


def _rc_hidden(h: torch.Tensor) -> torch.Tensor:
    """The group action on hidden states (b, l, d): reverse the sequence and the channels (Caduceus's choice,
    which pairs channel i with channel d-1-i as the 'other strand')."""
    return h.flip(-2, -1)


class RCEquivariantLM(nn.Module):
    """A ``LanguageModel`` made reverse-complement equivariant with shared weights (see ``build_model``).

    ``mode="ps"``: every piece (embedding, each residual block, the final norm, the head) is symmetrised:
    ``g(h) = (f(h) + R(f(R(h)))) / 2`` with ``R`` reversing length and channels; the embedding maps rc of ids to
    ``R`` of hiddens and the head maps ``R`` back to rc of logits. The strands meet in every layer.
    ``mode="conjoin"``: the unchanged model runs on x and rc(x) and the rc output is mapped back.
    Either way ``model(rc(x)).logits == reverse_complement_logits(model(x).logits)`` up to float rounding.
    """

    def __init__(self, model: nn.Module, mode: str = "ps") -> None:
        super().__init__()
        if mode not in ("ps", "conjoin"):
            raise ConfigError(f"RCEquivariantLM mode must be 'ps' or 'conjoin', got {mode!r}")
        if getattr(model, "vocab_size", None) != len(VOCAB):
            raise ConfigError(f"RCEquivariantLM needs a LanguageModel over the {len(VOCAB)}-id DNA vocabulary")
        self.model, self.mode = model, mode
        self.register_buffer("complement", _complement_table(), persistent=False)

    @property
    def config(self) -> BackboneConfig:
        return self.model.config

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def set_backend(self, backend: str) -> RCEquivariantLM:
        self.model.set_backend(backend)
        return self

    def _rc_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.complement[ids].flip(-1)

    @staticmethod
    def _both(fn, h: torch.Tensor) -> torch.Tensor:
        # x and R(x) in one batch: one call, and the same weights by construction
        out = fn(torch.cat([h, _rc_hidden(h)], 0))
        fwd, rev = out.chunk(2, 0)
        return (fwd + _rc_hidden(rev)) / 2

    def forward(self, input_ids: torch.Tensor, state=None, return_state: bool = True):
        from seqlab.models import ModelOutput

        if state is not None:
            raise StateError(
                "an RC-equivariant model sees both strands of the whole sequence and has no streaming "
                "state: call it with state=None"
            )
        lm = self.model
        input_ids = lm._check_ids(input_ids, 2)
        both_ids = torch.cat([input_ids, self._rc_ids(input_ids)], 0)
        if self.mode == "conjoin":
            out = lm(both_ids, None, return_state=False)
            fwd, rev = out.logits.chunk(2, 0)
            hf, hr = out.hidden.chunk(2, 0)
            logits = (fwd + rev.flip(-2)[..., self.complement]) / 2
            return ModelOutput(logits, None, (hf + _rc_hidden(hr)) / 2)
        fwd, rev = lm.embeddings(both_ids).chunk(2, 0)
        h = (fwd + _rc_hidden(rev)) / 2
        for layer in lm.backbone.layers:
            h = self._both(lambda t, layer=layer: layer(t, None, False)[0], h)
        norm = lm.backbone.norm_f
        h = self._both(lambda t: norm(t.to(norm.weight.dtype)), h)
        logits = (lm.head(h) + lm.head(h.flip(-1))[..., self.complement]) / 2
        return ModelOutput(logits, None, h)
