"""Small model factories shared by the seqlab tests."""

import torch

from seqlab import BackboneConfig, LanguageModel


def tiny_config(ssm: str = "mamba1", **kw) -> BackboneConfig:
    base = dict(d_model=16, n_layer=2, ssm=ssm, d_state=8)
    if ssm == "mamba2":
        base.update(headdim=8, chunk_size=8)
    base.update(kw)
    return BackboneConfig(**base)


def tiny_lm(ssm: str = "mamba1", vocab: int = 32, seed: int = 0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(tiny_config(ssm, **kw), vocab_size=vocab)
    # Spread the parameters so that the scan's decay, conv tail and gating all matter in the tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("D") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()
