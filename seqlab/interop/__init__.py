"""Interop with other Mamba implementations: ``seqlab.interop.hf`` loads and saves HF transformers models."""
