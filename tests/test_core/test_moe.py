"""The MoE feed-forward (ffn="moe"): the grouped dispatch against its per-token twin (outputs and every gradient,
capacity drops and top-k > 1 included), the router losses, evaluation without capacity, the config's refusals,
the trainer's log fields and collapse warning, checkpoints and generation. The state contract for MoE stacks is
in test_state_contract.py (kind "moe")."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import seqlab.ffn.moe as moe_module
from seqlab.checkpoint import load_model, save_model
from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError
from seqlab.ffn import (
    MoEFeedForward,
    capacity_for,
    dispatch,
    moe_reference,
    parameter_counts,
    route,
    router_losses,
)
from seqlab.ffn.moe import _router_stats
from seqlab.models import LanguageModel
from seqlab.testing import rel_err, tiny_lm
from seqlab.train import TrainConfig, Trainer


def moe_layer(experts=4, top_k=1, d_model=16, d_expert=24, seed=0, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    config = BackboneConfig(
        d_model=d_model, n_layer=1, ffn="moe", moe_experts=experts, moe_top_k=top_k, moe_d_expert=d_expert, **kw
    )
    layer = MoEFeedForward(config)
    with torch.no_grad():  # a router sharp enough that the experts get unequal loads (so capacity bites)
        layer.router.weight.mul_(4)
    return layer


def grads(layer, x, out):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    params = [x, layer.router.weight, layer.gate_up, layer.down]
    return torch.autograd.grad((out * weight).sum(), params)


CASES = [  # experts, top_k, capacity factor (None: evaluation, no capacity)
    (4, 1, None),
    (4, 2, None),
    (8, 1, 1.0),
    (4, 2, 0.5),
    (8, 3, 0.75),
]


@pytest.mark.parametrize(("experts", "top_k", "factor"), CASES)
def test_grouped_dispatch_equals_per_token_twin_outputs_and_gradients(experts, top_k, factor):
    kw = {} if factor is None else {"moe_capacity_factor": factor}
    layer = moe_layer(experts, top_k, **kw)
    x = torch.randn(3, 11, 16, requires_grad=True)
    layer.train(factor is not None)
    out = layer(x)
    capacity = capacity_for(33, layer.settings) if factor is not None else None
    ref = moe_reference(layer, x, capacity)
    assert rel_err(out, ref) <= 1e-5
    for fast, slow in zip(grads(layer, x, out), grads(layer, x, ref)):
        assert rel_err(fast, slow) <= 1e-5
    if factor is not None:  # these capacities drop pairs, and the twin agrees on which
        stats = layer.last_stats
        assert stats is not None and stats.dropped > 0
        _, experts_of, gates = route(x.detach().reshape(-1, 16), layer.router.weight, top_k)
        _, kept = dispatch(x.detach().reshape(-1, 16), experts_of, gates, layer.gate_up, layer.down, capacity)
        assert math.isclose(stats.dropped, 1 - kept / (33 * top_k))
        assert kept <= capacity * experts


def test_dispatch_float64_matches_twin():
    """float64 experts; the router runs in fp32 by design (as Switch's), so the gates agree to fp32 rounding."""
    layer = moe_layer(8, 2, moe_capacity_factor=0.6).double().train()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    out = layer(x)
    assert out.dtype == torch.float64
    assert rel_err(out, moe_reference(layer, x, capacity_for(40, layer.settings))) <= 1e-6


def test_capacity_drops_latest_pairs_and_they_pass_through_on_the_residual():
    layer = moe_layer(4, 1)
    h = torch.randn(6, 16)
    experts = torch.zeros(6, 1, dtype=torch.long)  # everyone wants expert 0
    gates = torch.ones(6, 1)
    out, kept = dispatch(h, experts, gates, layer.gate_up, layer.down, capacity=2)
    assert kept == 2
    assert out[2:].abs().max() == 0  # tokens over capacity: the MoE adds nothing, the block's residual carries them
    full, _ = dispatch(h, experts, gates, layer.gate_up, layer.down, capacity=None)
    assert torch.allclose(out[:2], full[:2], atol=1e-6)
    # second choices yield before first choices of later tokens
    experts2 = torch.tensor([[0, 1], [0, 1], [1, 0]])
    out2, kept2 = dispatch(h[:3], experts2, torch.full((3, 2), 0.5), layer.gate_up, layer.down, capacity=2)
    assert kept2 == 4  # expert 0: tokens 0, 1 (first choices), token 2's second choice dropped; expert 1: 2 then 0
    only_first = dispatch(h[2:3], experts2[2:, :1], torch.full((1, 1), 0.5), layer.gate_up, layer.down)[0]
    assert torch.allclose(out2[2], only_first[0])


def test_evaluation_is_drop_free_and_token_local():
    layer = moe_layer(4, 2, moe_capacity_factor=0.25).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        whole = layer(x)
        alone = torch.stack([torch.stack([layer(x[b, t].view(1, 1, 16))[0, 0] for t in range(9)]) for b in range(2)])
    assert rel_err(whole, alone) <= 1e-6
    assert rel_err(whole, moe_reference(layer, x, None)) <= 1e-5
    assert layer.last_stats is None  # no router statistics outside training


def test_router_losses_balance_and_z():
    n, e = 64, 4
    uniform = torch.zeros(n, e)  # equal probabilities: the balance loss is 1 whatever the choices
    choices = torch.arange(n).remainder(e).view(n, 1)
    st = _router_stats(uniform, choices, e, kept=n)
    assert math.isclose(float(st.balance_loss), 1.0, rel_tol=1e-6)
    assert torch.allclose(st.fraction, torch.full((e,), 0.25))
    assert math.isclose(float(st.z_loss), math.log(e) ** 2, rel_tol=1e-6)
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 30.0  # everything to expert 0, with all the probability: E * 1 * 1
    st = _router_stats(collapsed, torch.zeros(n, 1, dtype=torch.long), e, kept=n // 2)
    assert math.isclose(float(st.balance_loss), e, rel_tol=1e-6)
    assert st.dropped == 0.5
    logits = torch.randn(n, e, requires_grad=True)
    st = _router_stats(logits, logits.argmax(-1, keepdim=True), e, kept=n)
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    assert torch.allclose(st.z_loss, expected)
    st.balance_loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # P_i carries the gradient


def test_model_router_losses_are_weighted_summed_and_cleared():
    model = LanguageModel(
        BackboneConfig(
            d_model=16, n_layer=3, ffn="moe", moe_every=1, moe_experts=4, moe_balance_weight=0.5, moe_z_weight=0.25
        ),
        32,
    ).train()
    model(torch.randint(0, 32, (2, 10)))
    losses = router_losses(model)
    assert losses is not None and sorted(losses.expert_fraction) == [0, 1, 2]
    layers = [layer.ffn for layer in model.backbone.layers]
    assert all(layer.last_stats is None for layer in layers)  # cleared
    model(torch.randint(0, 32, (2, 10)))
    stats = [layer.last_stats for layer in layers]
    expected = sum(0.5 * s.balance_loss + 0.25 * s.z_loss for s in stats)
    assert torch.allclose(router_losses(model).loss, expected)
    assert router_losses(model) is None  # nothing new since the last call
    with torch.no_grad():
        model.eval()(torch.randint(0, 32, (2, 10)))
    assert router_losses(model) is None
    assert router_losses(tiny_lm("mamba1").train()) is None  # dense models have none


def test_jitter_acts_only_in_training():
    layer = moe_layer(4, 1, moe_jitter=0.5)
    x = torch.randn(1, 40, 16)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    torch.manual_seed(2)
    c = layer(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# config


def test_layouts_every_layer_every_other_layer_and_overrides():
    every = BackboneConfig(d_model=16, n_layer=4, ffn="moe")
    assert [every.layer_spec(i)[1] for i in range(4)] == ["moe"] * 4
    other = BackboneConfig(d_model=16, n_layer=4, ffn="moe", moe_every=2)
    assert [other.layer_spec(i)[1] for i in range(4)] == ["mlp", "moe", "mlp", "moe"]
    one = BackboneConfig(d_model=16, n_layer=3, ffn="mlp", moe_experts=4, layer_overrides={2: {"ffn": "moe"}})
    model = LanguageModel(one, 32)
    assert [type(layer.ffn).__name__ for layer in model.backbone.layers] == ["GatedMLP", "GatedMLP", "MoEFeedForward"]
    assert model.backbone.layers[2].ffn.settings.experts == 4
    assert one.moe_settings().d_expert == one.d_ffn_resolved == 64


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(ffn="moe", moe_experts=0), "moe_experts"),
        (dict(ffn="moe", moe_experts=4, moe_top_k=5), "moe_top_k"),
        (dict(ffn="moe", moe_top_k=0), "moe_top_k"),
        (dict(ffn="moe", moe_capacity_factor=-1.0), "moe_capacity_factor"),
        (dict(ffn="moe", moe_capacity_factor=0), "moe_capacity_factor"),
        (dict(ffn="moe", moe_jitter=1.5), "moe_jitter"),
        (dict(ffn="moe", moe_balance_weight=-0.1), "moe_balance_weight"),
        (dict(ffn="moe", moe_z_weight=float("nan")), "moe_z_weight"),
        (dict(ffn="moe", moe_d_expert=True), "moe_d_expert"),
        (dict(ffn="moe", moe_every=5), "moe_every"),
        (dict(ffn="mlp", moe_experts=8), "moe_experts"),
        (dict(moe_top_k=2), "moe_top_k"),
        (dict(ffn="mlp", moe_every=2), "moe_every"),
        (dict(ffn="moe", layer_overrides={0: {"ffn": "none"}, 1: {"ffn": "mlp"}}, moe_experts=2), "moe_experts"),
    ],
)
def test_bad_moe_settings_are_config_errors_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        BackboneConfig(d_model=16, n_layer=2, **kw)


def test_config_round_trip_and_fingerprint():
    config = BackboneConfig(d_model=16, n_layer=2, ffn="moe", moe_experts=4, moe_top_k=2, moe_every=2)
    again = BackboneConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.fingerprint() == config.fingerprint()
    dense = BackboneConfig(d_model=16, n_layer=2, ffn="mlp")
    assert config.fingerprint() != dense.fingerprint()
    # the training-only settings do not change what a trained model computes, so not its states' fingerprint
    trained = BackboneConfig(
        d_model=16, n_layer=2, ffn="moe", moe_experts=4, moe_top_k=2, moe_every=2, moe_capacity_factor=2.0
    )
    assert trained.fingerprint() == config.fingerprint()
    assert BackboneConfig(d_model=16, n_layer=2, ffn="moe", moe_experts=8).fingerprint() != config.fingerprint()


def test_parameter_counts_total_and_active():
    config = BackboneConfig(d_model=16, n_layer=2, ffn="moe", moe_experts=8, moe_top_k=2, moe_d_expert=24)
    model = LanguageModel(config, 32)
    counts = parameter_counts(model)
    per_expert = 2 * 24 * 16 + 16 * 24
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] - counts["active"] == 2 * (8 - 2) * per_expert
    dense = tiny_lm("mamba1")
    assert parameter_counts(dense)["active"] == parameter_counts(dense)["total"]
    # top-1 with the dense width: active parameters = the dense model's + the routers
    same = LanguageModel(BackboneConfig(d_model=16, n_layer=2, ffn="moe", moe_experts=8, d_ffn=24), 32)
    base = LanguageModel(BackboneConfig(d_model=16, n_layer=2, ffn="mlp", d_ffn=24), 32)
    assert parameter_counts(same)["active"] == parameter_counts(base)["total"] + 2 * 8 * 16


# ---------------------------------------------------------------------------------------------------------------
# trainer, checkpoints, generation


def moe_lm(seed=0, **kw):
    torch.manual_seed(seed)
    config = dict(d_model=16, n_layer=2, ffn="moe", moe_experts=4, d_ffn=32, d_state=4)
    config.update(kw)
    return LanguageModel(BackboneConfig(**config), 64)


def test_trainer_logs_router_fields_and_trains_the_router(tmp_path):
    model = moe_lm()
    before = model.backbone.layers[0].ffn.router.weight.detach().clone()
    data = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(
        max_steps=3, batch_size=4, window=16, grad_accum=2, progress=False, log_path=str(tmp_path / "log.jsonl")
    )
    records = Trainer(model, config, data).fit()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for record in lines:
        for key in ("moe_balance_loss", "moe_z_loss", "moe_dropped_fraction", "moe_max_expert_fraction"):
            assert isinstance(record[key], float), key
        shares = record["moe_expert_fraction"]
        assert sorted(shares) == ["0", "1"] and all(math.isclose(sum(v), 1.0, rel_tol=1e-6) for v in shares.values())
        assert 0.5 < record["moe_balance_loss"] < 4.0
    assert records[-1]["moe_max_expert_fraction"] == lines[-1]["moe_max_expert_fraction"]
    assert not torch.equal(before, model.backbone.layers[0].ffn.router.weight)


def test_auxiliary_loss_reaches_the_gradients():
    """With a zero task loss, the router still gets the balance and z gradients (weighted as configured)."""
    model = moe_lm(moe_balance_weight=1.0, moe_z_weight=1.0).train()
    data = torch.randint(0, 64, (2000,))
    trainer = Trainer(
        model,
        TrainConfig(max_steps=1, batch_size=2, window=8, progress=False, lr=1e-3),
        data,
        loss_fn=lambda o, t: o.logits.sum() * 0,
    )
    router = model.backbone.layers[0].ffn.router.weight
    before = router.detach().clone()
    trainer.fit()
    assert not torch.equal(before, router)


def test_router_collapse_is_warned_once_and_logged_every_step(tmp_path, monkeypatch):
    real_route = moe_module.route

    def everyone_to_expert_2(h, weight, top_k, jitter=0.0):
        logits, _, gates = real_route(h, weight, top_k, jitter)
        return logits, torch.full_like(logits[:, :top_k], 2, dtype=torch.long), gates

    monkeypatch.setattr(moe_module, "route", everyone_to_expert_2)
    model = moe_lm(moe_capacity_factor=8.0)
    data = torch.randint(0, 64, (4000,))
    config = TrainConfig(max_steps=3, batch_size=2, window=16, progress=False, log_path=str(tmp_path / "log.jsonl"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model, config, data).fit()
    collapse = [w for w in caught if "router collapse" in str(w.message)]
    assert len(collapse) == 2  # one per layer, at the first step only
    assert "expert 2 took 100%" in str(collapse[0].message)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(len(line["warnings"]) == 2 and line["moe_max_expert_fraction"] == 1.0 for line in lines)


def test_checkpoint_round_trip_and_generation(tmp_path):
    model = moe_lm(seed=3, moe_top_k=2).eval()
    save_model(tmp_path / "m.safetensors", model)
    again = moe_lm(seed=9, moe_top_k=2).eval()
    load_model(tmp_path / "m.safetensors", again)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    out = again.generate(ids[:, :4], max_new_tokens=6)
    assert [len(t) for t in out.tokens] == [6, 6]
    # greedy generation (step by step) = the argmax of one full forward over what it produced
    tokens = torch.cat([ids[:, :4], torch.tensor(out.tokens)], 1)
    with torch.no_grad():
        logits = again(tokens[:, :-1]).logits
    assert torch.equal(logits[:, 3:].argmax(-1), tokens[:, 4:])


def test_bf16_autocast_forward_and_backward():
    model = moe_lm().train()
    ids = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
        loss = out.logits.float().logsumexp(-1).mean() + router_losses(model).loss
    loss.backward()
    assert model.backbone.layers[0].ffn.gate_up.grad is not None
