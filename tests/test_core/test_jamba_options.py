"""The two options Jamba needs, on their own: ``mamba_inner_norms`` (RMSNorms on the Mamba-1 mixer's dt, B and C)
and ``moe_renormalize`` (whether the router's top-k probabilities are renormalised). Both default to None, the
behaviour before they existed, and leave the config fingerprint as it was while unset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqlab import BackboneConfig, LanguageModel
from seqlab.errors import ConfigError
from seqlab.ffn.moe import MoEFeedForward, moe_reference, route
from seqlab.testing import rel_err

MAMBA = dict(d_model=16, n_layer=2, d_state=4, dt_rank=3)
MOE = dict(d_model=16, n_layer=1, ssm="mamba1", d_state=4, ffn="moe", moe_experts=4, d_ffn=24)


# --------------------------------------------------------------------------------------------------
# mamba_inner_norms
# --------------------------------------------------------------------------------------------------
def test_inner_norms_add_three_rmsnorms_with_jambas_names():
    plain = LanguageModel(BackboneConfig(**MAMBA), vocab_size=32)
    normed = LanguageModel(BackboneConfig(**MAMBA, mamba_inner_norms=True), vocab_size=32)
    extra = set(normed.state_dict()) - set(plain.state_dict())
    assert extra == {f"backbone.layers.{i}.mixer.{n}_layernorm.weight" for i in range(2) for n in ("dt", "b", "c")}
    mixer = normed.backbone.layers[0].mixer
    assert mixer.dt_layernorm.weight.shape == (3,) and mixer.b_layernorm.weight.shape == (4,)
    assert LanguageModel(BackboneConfig(**MAMBA, mamba_inner_norms=False), vocab_size=32).state_dict().keys() == (
        plain.state_dict().keys()
    )


def test_inner_norms_compute_rmsnorm_of_dt_b_c():
    torch.manual_seed(0)
    config = BackboneConfig(**MAMBA, mamba_inner_norms=True, norm_eps=1e-5)
    mixer = LanguageModel(config, vocab_size=32).backbone.layers[0].mixer
    with torch.no_grad():
        for norm in (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm):
            norm.weight.uniform_(0.5, 1.5)
    x_dbl = torch.randn(2, 5, 3 + 4 + 4)
    dt, B, C = mixer._split_x_dbl(x_dbl)
    raw = torch.split(x_dbl, [3, 4, 4], dim=-1)
    for got, part, norm in zip((dt, B, C), raw, (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm)):
        want = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
        assert rel_err(got, want) <= 1e-6


def test_inner_norms_keep_the_state_contract():
    """Chunks threading the state and steps after a prefill give the whole-sequence logits."""
    torch.manual_seed(1)
    model = LanguageModel(BackboneConfig(**MAMBA, mamba_inner_norms=True), vocab_size=32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
        ids = torch.randint(0, 32, (2, 20))
        whole = model(ids).logits
        first = model(ids[:, :7])
        second = model(ids[:, 7:15], first.state)
        assert rel_err(torch.cat([first.logits, second.logits], 1), whole[:, :15]) <= 1e-5
        state = second.state
        for t in range(15, 20):
            step = model.step(ids[:, t], state)
            state = step.state
            assert rel_err(step.logits, whole[:, t]) <= 1e-5


def test_inner_norms_are_refused_without_a_mamba1_layer_and_ignored_by_other_layers():
    with pytest.raises(ConfigError, match="mamba_inner_norms"):
        BackboneConfig(d_model=16, n_layer=2, ssm="mamba2", headdim=8, mamba_inner_norms=True)
    with pytest.raises(ConfigError, match="mamba_inner_norms"):
        BackboneConfig(**MAMBA, mamba_inner_norms=1)
    # a hybrid: only the Mamba-1 layer gets the norms
    config = BackboneConfig(**MAMBA, headdim=8, mamba_inner_norms=True, layer_overrides={1: {"mixer": "mamba2"}})
    model = LanguageModel(config, vocab_size=32)
    assert model.backbone.layers[0].mixer.dt_layernorm is not None
    assert not any("layernorm" in n for n in model.backbone.layers[1].state_dict())


def test_inner_norms_fingerprint_unchanged_while_unset():
    base = BackboneConfig(**MAMBA)
    assert BackboneConfig(**MAMBA, mamba_inner_norms=None).fingerprint() == base.fingerprint()
    assert BackboneConfig(**MAMBA, mamba_inner_norms=True).fingerprint() != base.fingerprint()
    assert BackboneConfig.from_dict(BackboneConfig(**MAMBA, mamba_inner_norms=True).to_dict()).mamba_inner_norms


# --------------------------------------------------------------------------------------------------
# moe_renormalize
# --------------------------------------------------------------------------------------------------
def test_route_renormalize_choices():
    torch.manual_seed(2)
    h, w = torch.randn(10, 16), torch.randn(4, 16)
    probs = F.linear(h, w).softmax(-1)
    top_p, _ = probs.topk(2, dim=-1)
    _, _, default = route(h, w, 2)
    _, _, kept = route(h, w, 2, renormalize=False)
    _, _, forced = route(h, w, 2, renormalize=True)
    assert torch.allclose(default, top_p / top_p.sum(-1, keepdim=True))
    assert torch.equal(forced, default)
    assert torch.allclose(kept, top_p) and (kept.sum(-1) < 1).all()
    _, _, top1 = route(h, w, 1, renormalize=False)
    assert torch.equal(top1, route(h, w, 1)[2])  # top-1: the probability either way


@pytest.mark.parametrize("top_k, renormalize", [(2, False), (3, False), (2, True), (1, False)])
def test_moe_dispatch_matches_its_reference_twin(top_k, renormalize):
    torch.manual_seed(3)
    config = BackboneConfig(**MOE, moe_top_k=top_k, moe_renormalize=renormalize)
    layer = MoEFeedForward(config).eval()
    x = torch.randn(2, 9, 16, requires_grad=True)
    out = layer(x)
    want = moe_reference(layer, x)
    assert rel_err(out, want) <= 1e-5
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    want_grads = torch.autograd.grad(want.square().sum(), [x, *layer.parameters()])
    for got, expected in zip(grads, want_grads):
        assert rel_err(got, expected) <= 1e-5


def test_moe_renormalize_false_changes_the_output_for_top2():
    torch.manual_seed(4)
    renorm = MoEFeedForward(BackboneConfig(**MOE, moe_top_k=2)).eval()
    kept = MoEFeedForward(BackboneConfig(**MOE, moe_top_k=2, moe_renormalize=False)).eval()
    kept.load_state_dict(renorm.state_dict())
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        assert rel_err(kept(x), renorm(x)) > 1e-3


def test_moe_renormalize_refusals_and_fingerprint():
    with pytest.raises(ConfigError, match="moe_renormalize"):
        BackboneConfig(**MOE, moe_top_k=1, moe_renormalize=True)
    with pytest.raises(ConfigError, match="moe_renormalize"):
        BackboneConfig(**MAMBA, moe_renormalize=False)  # no MoE layer
    with pytest.raises(ConfigError, match="moe_renormalize"):
        BackboneConfig(**MOE, moe_renormalize="no")
    base = BackboneConfig(**MOE, moe_top_k=2)
    assert BackboneConfig(**MOE, moe_top_k=2, moe_renormalize=None).fingerprint() == base.fingerprint()
    assert BackboneConfig(**MOE, moe_top_k=2, moe_renormalize=False).fingerprint() != base.fingerprint()
    assert base.moe_settings().renormalize is None
