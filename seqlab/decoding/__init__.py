"""Decoding strategies beyond one token per step: exact speculative decoding with state rollback (a model,
statistical or subword drafter, Cascade Speculative Drafting) and DRµGS. ``generate(model, ids, draft=...,
speculate=k)`` is the front door; docs/generation.md explains each."""

from seqlab.decoding.acceptance import Sampling, accept_draft, output_law
from seqlab.decoding.cascade import HorizontalCascade, SpeculativeDrafter, cascade
from seqlab.decoding.cursor import ModelCursor
from seqlab.decoding.drafters import Drafter, MaxGramDrafter, ModelDrafter
from seqlab.decoding.drugs import Drugs, DrugsHandle, apply_drugs
from seqlab.decoding.speculative import SpeculativeStats
from seqlab.decoding.subword import SubwordDrafter

__all__ = [
    "Drafter",
    "HorizontalCascade",
    "SpeculativeDrafter",
    "cascade",
    "Drugs",
    "DrugsHandle",
    "MaxGramDrafter",
    "ModelCursor",
    "ModelDrafter",
    "Sampling",
    "SpeculativeStats",
    "SubwordDrafter",
    "accept_draft",
    "apply_drugs",
    "output_law",
]
