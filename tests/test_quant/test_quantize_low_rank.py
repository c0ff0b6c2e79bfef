"""LASER x AQLM: "densify, then quantize" (``seqlab.posttrain.laser.densify``). Densify gives an ordinary full-rank
model computing what the LASER'd one did (dense, MoE with reduced experts, a hybrid with reduced attention
projections); densify -> quantize_model -> save_model -> model_from_checkpoint reproduces the logits and keeps
the LASER layout as provenance; without densify both quantizers refuse, saying how; ``seqlab quantize --densify``
on a LASER'd model file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from seqlab.checkpoint import load_model, save_model
from seqlab.errors import ConfigError
from seqlab.posttrain import densify
from seqlab.posttrain.laser import (
    Intervention,
    LowRankLinear,
    apply_interventions,
)
from seqlab.quant import AQLMLinear, quantize_model, quantize_weights
from seqlab.testing import (
    one_line,
    rel_err,
    run_cli,
    shrinking_interventions,
    tiny_config,
    tiny_hybrid_options,
    tiny_lm,
    tiny_moe_options,
)

VOCAB = 32
MOE = tiny_moe_options()
KINDS = {"mamba1": dict(ssm="mamba1"), "moe": MOE, "attn_hybrid": tiny_hybrid_options()}
FAST = {"max_rounds": 1, "adam_steps": 2, "kmeans_iters": 3}
REFUSAL = r"call seqlab\.posttrain\.laser\.densify\(model\) first: it keeps LASER's weights \(its quality\) but not"


def ids(b: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


reductions = shrinking_interventions


def lasered(kind: str, seed: int = 0):
    model = tiny_lm(**KINDS[kind], vocab=VOCAB, seed=seed)
    apply_interventions(model, reductions(model))
    return model


def expert_slice(model, name: str) -> torch.Tensor:
    """The stacked parameter's slice of an expert target ``<moe>.<part>[e]``."""
    moe, part = name.rsplit(".", 1)
    stacked, e = part.split("[")
    return getattr(model.get_submodule(moe), stacked)[int(e[:-1])]


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits, out.state.tensors()


@pytest.mark.parametrize("kind", list(KINDS))
def test_densify_gives_a_full_rank_model_with_the_laser_models_outputs(kind, tmp_path):
    model = lasered(kind)
    layout = copy.deepcopy(model.low_rank)
    names = set(layout)
    if kind == "moe":
        assert any("[" in n for n in names)  # reduced experts
    if kind == "attn_hybrid":
        assert {f"backbone.layers.1.mixer.{p}_proj" for p in "qkvo"} <= names  # reduced attention projections
    products = {n: m.left.double() @ m.right.double() for n, m in model.named_modules() if type(m) is LowRankLinear}
    slices = {n: expert_slice(model, n).clone() for n in names if "[" in n}
    x = ids(2, 24, 1)
    logits, state = run(model, x)

    assert densify(model) is model
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert not getattr(model, "low_rank", None) and not hasattr(model, "_low_rank_experts")
    assert model.laser_densified == layout  # provenance
    got_logits, got_state = run(model, x)
    assert rel_err(got_logits, logits) < 1e-5
    assert got_state.keys() == state.keys()
    assert all(rel_err(got_state[k], state[k]) < 1e-5 for k in state)
    for name, product in products.items():  # each dense weight is the factors' product, the layer an nn.Linear
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        assert torch.equal(layer.weight, product.float())
    for name, value in slices.items():  # expert slices untouched (they held the product already)
        assert torch.equal(expert_slice(model, name), value)

    # an ordinary full-rank model: its state dict is a fresh model's, and a plain model file round-trips
    fresh = tiny_lm(**KINDS[kind], vocab=VOCAB, seed=5)
    own, theirs = model.state_dict(), fresh.state_dict()
    assert own.keys() == theirs.keys() and all(own[k].shape == theirs[k].shape for k in own)
    path = save_model(tmp_path / "dense.safetensors", model)
    load_model(path, fresh)
    assert torch.equal(run(fresh, x)[0], got_logits)


def test_densify_keeps_requires_grad_and_training_and_makes_earlier_undos_stale():
    model = tiny_lm(vocab=VOCAB)
    undo = apply_interventions(model, [Intervention(0, "mixer.in_proj", 0.25)])
    model.train()
    densify(model)
    layer = model.get_submodule("backbone.layers.0.mixer.in_proj")
    assert type(layer) is nn.Linear and layer.training and layer.weight.requires_grad
    with pytest.raises(ConfigError, match="densified"):
        undo.revert()
    # a densified model may be LASER'd again; densify merges the provenance
    apply_interventions(model, [Intervention(1, "mixer.out_proj", 0.5)])
    densify(model)
    assert set(model.laser_densified) == {"backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.out_proj"}


def test_densify_of_a_full_rank_model_changes_nothing_and_a_quantized_one_is_refused():
    model = tiny_lm(vocab=VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert densify(model) is model
    assert not hasattr(model, "laser_densified")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    quantize_model(model, [ids(1, 16, 0)], "1x4g8", layers=["backbone.layers.0.mixer.out_proj"], aqlm_options=FAST)
    with pytest.raises(ConfigError, match="quantized"):
        densify(model)


@pytest.mark.parametrize("quantizer", ["quantize_model", "quantize_weights"])
def test_quantizing_a_laser_model_is_refused_saying_how(quantizer):
    model = lasered("moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = [ids(1, 16, 0)]
    with pytest.raises(ConfigError, match=REFUSAL):
        if quantizer == "quantize_model":
            quantize_model(model, windows, "1x4g8", aqlm_options=FAST)
        else:
            quantize_weights(model, windows, "aqlm", config="1x4g8", aqlm_options=FAST)
    assert not getattr(model, "quantization", None) and model.low_rank
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_densify_then_quantize_then_save_and_load_reproduces_the_logits(tmp_path):
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.registry import model_from_checkpoint

    torch.manual_seed(0)
    model = ByteAdapter().build_model(tiny_config(**MOE)).eval()
    apply_interventions(model, [Intervention(0, "mixer.in_proj", 0.25), Intervention(1, "ffn.gate_up[*]", 0.25)])
    layout = copy.deepcopy(model.low_rank)
    densify(model)
    windows = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    picked = ("backbone.layers.0.mixer.in_proj", "backbone.layers.1.ffn.gate_up[")  # what LASER had reduced
    report = quantize_model(model, windows, "1x4g8", layers=lambda n: n.startswith(picked), aqlm_options=FAST)
    quantized = {r.name for r in report.layers if r.skipped is None}
    assert "backbone.layers.0.mixer.in_proj" in quantized and "backbone.layers.1.ffn.gate_up[2]" in quantized
    assert isinstance(model.get_submodule("backbone.layers.0.mixer.in_proj"), AQLMLinear)
    assert model.quantization["laser"] == layout
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))
    logits = run(model, x)[0]
    path = save_model(tmp_path / "q.safetensors", model)
    loaded, _ = model_from_checkpoint(path)
    assert torch.equal(run(loaded, x)[0], logits)
    assert loaded.quantization["laser"] == layout  # the provenance survives the file
    assert not getattr(loaded, "low_rank", None)


def test_cli_quantize_densify(tmp_path, capsys):
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.registry import model_from_checkpoint

    torch.manual_seed(0)
    model = ByteAdapter().build_model(tiny_config(d_model=32)).eval()
    apply_interventions(model, [Intervention(0, "mixer.in_proj", 0.25), Intervention(1, "mixer.out_proj", 0.25)])
    source = save_model(tmp_path / "laser.safetensors", model)
    text = (Path(__file__).parents[2] / "seqlab" / "quant" / "aqlm.py").read_bytes()[:6000]
    (tmp_path / "calib.txt").write_bytes(text)
    out = tmp_path / "q.safetensors"
    argv = ["quantize", tmp_path / "calib.txt", "--model", source, "--out", out, "--aqlm", "2x4g8",
            "--max-rounds", "1", "--calib-windows", "4", "--window", "64", "--threads", "1", "--quiet"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    line = one_line(err)
    assert code == 2 and "low-rank (LASER)" in line and "pass --densify" in line and "parameter saving" in line
    assert not out.exists()
    code, stdout, _ = run_cli([*argv, "--densify", "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["densified"] == sorted(model.low_rank)
    loaded, _ = model_from_checkpoint(out)
    assert loaded.quantization["laser"] == model.low_rank
    assert isinstance(loaded.get_submodule("backbone.layers.0.mixer.in_proj"), AQLMLinear)
    assert not any(isinstance(m, LowRankLinear) for m in loaded.modules())
    code, stdout, _ = run_cli([*argv, "--densify", "--overwrite"], capsys)  # the table names what was densified
    assert code == 0 and "densified 2 low-rank (LASER) layer(s) before quantizing" in stdout
