"""Seams between the MoE feed-forward and the features around it (issue 25, failures F2 and F3 of the ladder
survey): a model copies after a training-mode forward (``copy.deepcopy``, ``pickle``); ``tasks.sft`` adds the
router losses as the Trainer does (so self-rewarding can follow it directly); ``parameter_counts`` of a LASER'd
MoE counts the reduced expert slices as their factors, in memory and after a file round trip."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import seqlab.posttrain.tasks as tasks
from seqlab.checkpoint import load_model, save_model
from seqlab.config import BackboneConfig
from seqlab.domains.bytes import ByteAdapter
from seqlab.domains.registry import model_from_checkpoint
from seqlab.errors import ConfigError
from seqlab.ffn import moe_layers, parameter_counts, router_losses
from seqlab.posttrain import self_reward
from seqlab.posttrain.dpo import DPOConfig
from seqlab.posttrain.laser import Intervention, LowRankLinear, apply_interventions

# d_model 16, 2 layers, 4 experts of width 24, top-2: gate_up slices (48, 16), down slices (16, 24)
MOE = dict(d_model=16, n_layer=2, d_state=8, ffn="moe", moe_experts=4, moe_top_k=2, moe_d_expert=24)


def byte_moe(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return ByteAdapter().build_model(BackboneConfig(**{**MOE, **kw})).eval()


def ids(b: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, length), generator=torch.Generator().manual_seed(seed))


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids(seed=1), None, return_state=False).logits


def train_forward(model) -> None:
    """One training-mode forward with autograd, as a fine-tune's step leaves it before its loss is taken."""
    model.train()
    model(ids(), None, return_state=False).logits.sum()
    assert all(layer.last_stats is not None for layer in moe_layers(model))
    assert moe_layers(model)[0].last_stats.balance_loss.grad_fn is not None  # graph-carrying, not a leaf


# ---------------------------------------------------------------------------------------------------------------
# F2: copies after a training forward


def test_deepcopy_after_a_training_forward():
    model = byte_moe()
    train_forward(model)
    twin = copy.deepcopy(model)
    assert all(layer.last_stats is None for layer in moe_layers(twin))
    # the original keeps its stats for the loss it is about to take
    assert all(layer.last_stats is not None for layer in moe_layers(model))
    router = router_losses(model)
    assert router is not None and router.loss.grad_fn is not None
    assert torch.equal(eval_logits(twin), eval_logits(model))


def test_pickle_after_a_training_forward():
    model = byte_moe()
    train_forward(model)
    twin = pickle.loads(pickle.dumps(model))
    assert all(layer.last_stats is None for layer in moe_layers(twin))
    assert all(layer.last_stats is not None for layer in moe_layers(model))
    assert torch.equal(eval_logits(twin), eval_logits(model))


def test_model_file_after_a_training_forward(tmp_path):
    """seqlab.checkpoint writes the state dict, which never held the stats: unchanged by the copy rule."""
    model = byte_moe()
    keys = set(model.state_dict())
    train_forward(model)
    assert set(model.state_dict()) == keys
    path = save_model(tmp_path / "moe.safetensors", model)
    assert all(layer.last_stats is not None for layer in moe_layers(model))  # saving leaves the model alone
    loaded, _ = model_from_checkpoint(path)
    assert torch.equal(eval_logits(loaded), eval_logits(model))


# ---------------------------------------------------------------------------------------------------------------
# F2: sft trains the routers as the Trainer does, and self-rewarding can follow it


def seed_docs():
    splits = tasks.make_splits(24, 2, 0, seed=0)
    return tasks.seed_corpus(splits.train, [], seed=0), [i.prompt for i in splits.prompts]


def test_sft_then_self_reward_on_an_moe_model(tmp_path):
    model = byte_moe()
    docs, prompts = seed_docs()
    losses = tasks.sft(model, docs, steps=2, batch_size=4, seed=0)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(layer.last_stats is None for layer in moe_layers(model))  # collected every step
    report = self_reward(
        model,
        prompts,
        iterations=1,
        candidates=2,
        judge_samples=1,
        max_new_tokens=4,
        judge_max_new_tokens=2,
        dpo=DPOConfig(batch_size=2, seed=0),
        out=tmp_path / "sr",
        seed=0,
    )
    assert len(report.iterations) == 1
    assert (tmp_path / "sr" / "iteration-1" / "model.safetensors").is_file()


def router_grads(monkeypatch, **moe) -> tuple[list[torch.Tensor], list[float]]:
    """The routers' gradients of one sft step (read just before the optimizer step), and the gradient that reached
    each router loss sft took (1.0: it entered the loss with weight 1)."""
    seen: list[torch.Tensor] = []
    reaching: list[float] = []

    def watched(model, clear=True):
        router = router_losses(model, clear)
        if router is not None:
            router.loss.register_hook(lambda g: reaching.append(float(g)))
        return router

    def before_step(optimizer, args, kwargs):
        seen.extend(layer.router.weight.grad.detach().clone() for layer in moe_layers(model))

    monkeypatch.setattr(tasks, "router_losses", watched, raising=False)
    model = byte_moe(**moe)
    docs, _ = seed_docs()
    handle = register_optimizer_step_pre_hook(before_step)
    try:
        tasks.sft(model, docs, steps=1, batch_size=4, seed=0)
    finally:
        handle.remove()
    assert len(seen) == 2
    return seen, reaching


def test_sft_adds_the_router_losses(monkeypatch):
    """With the auxiliary losses weighted 0 the routers learn from the cross-entropy alone; with the Switch balance
    loss weighted in, their gradient changes: sft optimizes CE + router losses, the router losses with weight 1
    (as the Trainer adds them)."""
    plain, _ = router_grads(monkeypatch, moe_balance_weight=0.0, moe_z_weight=0.0)
    balanced, reaching = router_grads(monkeypatch, moe_balance_weight=1.0, moe_z_weight=0.0)
    for a, b in zip(plain, balanced, strict=True):
        assert not torch.allclose(a, b)
    assert reaching == [1.0]  # one step, one router loss: d(loss) / d(router loss) = 1


# ---------------------------------------------------------------------------------------------------------------
# F3: parameter counts of a LASER'd MoE


def factors(out: int, inp: int, rank: int) -> int:
    return rank * (out + inp)


def test_parameter_counts_of_a_lasered_moe(tmp_path):
    model = byte_moe()
    before = parameter_counts(model)
    assert before["total"] == sum(p.numel() for p in model.parameters())
    in_proj = model.get_submodule("backbone.layers.0.mixer.in_proj")
    in_shape = tuple(in_proj.weight.shape)  # Mamba-1: (2 * d_inner, d_model) = (64, 16), no bias
    assert in_shape == (64, 16) and in_proj.bias is None
    undo = apply_interventions(
        model,
        [
            Intervention(0, "ffn.gate_up[*]", 0.25),  # 4 slices (48, 16) at rank 4
            Intervention(1, "ffn.down[1]", 0.5),  # 1 slice (16, 24) at rank 8
            Intervention(0, "mixer.in_proj", 0.25),  # a dense layer (64, 16) at rank 4: a LowRankLinear
        ],
    )
    assert isinstance(model.get_submodule("backbone.layers.0.mixer.in_proj"), LowRankLinear)
    gate_up_saving = 48 * 16 - factors(48, 16, 4)  # 512 per expert
    down_saving = 16 * 24 - factors(16, 24, 8)  # 64
    in_proj_saving = 64 * 16 - factors(64, 16, 4)  # 704
    expected = {
        "total": before["total"] - 4 * gate_up_saving - down_saving - in_proj_saving,
        # each MoE layer's active experts are its top_k / experts = 2 / 4 share of its experts' numbers
        "active": before["active"] - 4 * gate_up_saving * 2 // 4 - down_saving * 2 // 4 - in_proj_saving,
    }
    assert parameter_counts(model) == expected
    # the dense LowRankLinear counts as its parameters are: the factors (the stacked experts do not shrink)
    assert sum(p.numel() for p in model.parameters()) == before["total"] - in_proj_saving

    path = save_model(tmp_path / "laser.safetensors", model)
    loaded, _ = model_from_checkpoint(path)
    assert loaded.low_rank == model.low_rank
    assert parameter_counts(loaded) == expected
    into = byte_moe(seed=3)
    load_model(path, into)
    assert parameter_counts(into) == expected

    undo.revert()
    assert parameter_counts(model) == before


def test_parameter_counts_active_share_rounds():
    """Experts of unequal sizes: the active count is the top_k / experts share of their sum, rounded."""
    model = byte_moe(moe_experts=3, moe_top_k=1)
    before = parameter_counts(model)
    apply_interventions(model, [Intervention(1, "ffn.down[2]", 0.3)])  # one (16, 24) slice at rank 4
    saving = 16 * 24 - factors(16, 24, 4)
    assert saving == 224
    counts = parameter_counts(model)
    assert counts["total"] == before["total"] - saving
    # layer 1's experts: 3 * (48 * 16 + 16 * 24) - 224 = 3232 numbers, a third 1077.3 -> 1077 (was 1152)
    assert counts["active"] == before["active"] - (1152 - 1077)


def test_parameter_counts_refuses_a_layout_naming_no_expert():
    model = byte_moe()
    model.low_rank = {"backbone.layers.5.ffn.gate_up[0]": {"rank": 2, "shape": [48, 16], "rho": 0.1}}
    with pytest.raises(ConfigError, match=r"backbone\.layers\.5\.ffn\.gate_up\[0\]"):
        parameter_counts(model)
    model.low_rank = {"backbone.layers.0.ffn.gate_up[7]": {"rank": 2, "shape": [48, 16], "rho": 0.1}}
    with pytest.raises(ConfigError, match="no such expert slice"):
        parameter_counts(model)
    model.low_rank = {"backbone.layers.0.ffn.down[0]": {"shape": [16, 24]}}
    with pytest.raises(ConfigError, match="rank"):
        parameter_counts(model)
