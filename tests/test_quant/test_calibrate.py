"""Calibration of seqlab.quant (issue 20): the quantizable layers of every block kind, and each one's input second
moment X^T X, checked against inputs captured by hand, across chunkings (the state-threading promise), with hooks
gone afterwards and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqlab.errors import ConfigError, InputError
from seqlab.ffn.moe import route
from seqlab.quant.calibrate import Moments, collect_input_moments, linear_layers
from seqlab.testing import tiny_hybrid_options, tiny_lm

VOCAB = 32


def _moe_lm():
    return tiny_lm("mamba1", vocab=VOCAB, ffn="moe", d_ffn=24, moe_experts=4, moe_top_k=2)


MODELS = {
    "mamba1": lambda: tiny_lm("mamba1", vocab=VOCAB),
    "mamba2": lambda: tiny_lm("mamba2", vocab=VOCAB),
    "hybrid": lambda: tiny_lm(vocab=VOCAB, **tiny_hybrid_options()),
    "moe": _moe_lm,
}


def _windows(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 23), generator=g), torch.randint(0, VOCAB, (1, 17), generator=g)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())


def test_linear_layers_cover_every_block_kind():
    layer = "backbone.layers.{}.{}"
    names = {k: [t.name for t in linear_layers(make())] for k, make in MODELS.items()}
    mamba1 = [layer.format(i, f"mixer.{p}") for i in range(2) for p in ("in_proj", "x_proj", "dt_proj", "out_proj")]
    assert names["mamba1"] == mamba1
    assert names["mamba2"] == [layer.format(i, f"mixer.{p}") for i in range(2) for p in ("in_proj", "out_proj")]
    hybrid = set(names["hybrid"])
    assert {layer.format(1, f"mixer.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj")} <= hybrid
    assert {layer.format(i, f"ffn.{p}") for i in range(3) for p in ("gate_up", "down")} <= hybrid
    assert layer.format(2, "mixer.in_proj") in hybrid and layer.format(0, "mixer.dt_proj") in hybrid
    experts = {layer.format(i, f"ffn.{p}[{e}]") for i in range(2) for p in ("gate_up", "down") for e in range(4)}
    assert experts <= set(names["moe"]) and len(names["moe"]) == len(mamba1) + len(experts)
    assert all("router" not in n and "lm_head" not in n and "embed" not in n for v in names.values() for n in v)
    moe = _moe_lm()
    extra = {t.name for t in linear_layers(moe, head=True, router=True)} - set(names["moe"])
    assert extra == {"lm_head", layer.format(0, "ffn.router"), layer.format(1, "ffn.router")}
    for target in linear_layers(moe):
        if target.expert is not None:  # an expert's slice, laid out like an nn.Linear weight (out, in)
            want = (48, 16) if target.part == "gate_up" else (16, 24)
            assert tuple(target.weight.shape) == want and target.weight._base is getattr(target.module, target.part)


def test_xtx_equals_inputs_captured_by_hand():
    model = MODELS["hybrid"]()
    windows = _windows()
    layers = model.backbone.layers
    captured: dict[str, list[torch.Tensor]] = {k: [] for k in ("in_proj0", "dt_proj0", "q_proj1", "down1", "in_proj2")}
    handles = [
        # Mamba's in_proj reads the mixer's input (via F.linear on row slices, no module call)
        layers[0].mixer.register_forward_pre_hook(lambda m, a: captured["in_proj0"].append(a[0])),
        # dt_proj reads the first dt_rank outputs of x_proj (via F.linear on dt_proj.weight)
        layers[0].mixer.x_proj.register_forward_hook(
            lambda m, a, out: captured["dt_proj0"].append(out[..., : layers[0].mixer.dt_rank])
        ),
        layers[1].mixer.q_proj.register_forward_pre_hook(lambda m, a: captured["q_proj1"].append(a[0])),
        layers[1].ffn.down.register_forward_pre_hook(lambda m, a: captured["down1"].append(a[0])),
        layers[2].mixer.register_forward_pre_hook(lambda m, a: captured["in_proj2"].append(a[0])),
    ]
    with torch.no_grad():
        for ids in windows:
            model(ids)
    for h in handles:
        h.remove()
    moments = collect_input_moments(model, windows, chunk_size=8)
    names = {
        "in_proj0": "backbone.layers.0.mixer.in_proj",
        "dt_proj0": "backbone.layers.0.mixer.dt_proj",
        "q_proj1": "backbone.layers.1.mixer.q_proj",
        "down1": "backbone.layers.1.ffn.down",
        "in_proj2": "backbone.layers.2.mixer.in_proj",
    }
    for key, name in names.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[key]]).double()
        assert moments[name].count == x.shape[0] == 2 * 23 + 17
        assert _rel(moments[name].xtx, x.t() @ x) < 1e-5, key
        assert moments[name].xtx.dtype == torch.float64


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_streaming_in_chunks_gives_the_same_moments(kind):
    model = MODELS[kind]()
    whole = collect_input_moments(model, _windows(), chunk_size=1000)
    for chunk in (4,):
        pieces = collect_input_moments(model, _windows(), chunk_size=chunk)
        assert pieces.keys() == whole.keys()
        for name, m in whole.items():
            assert pieces[name].count == m.count
            assert _rel(pieces[name].xtx, m.xtx) < 1e-5, (kind, chunk, name)
    tokens = 2 * 23 + 17
    for name, m in whole.items():
        if "[" not in name:
            assert m.count == tokens, name


def test_moe_expert_moments():
    model = _moe_lm()
    ffn = model.backbone.layers[1].ffn
    seen: list[torch.Tensor] = []
    handle = ffn.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    windows = _windows()
    router = "backbone.layers.1.ffn.router"
    experts = [f"backbone.layers.1.ffn.{p}[{e}]" for p in ("gate_up", "down") for e in range(4)]
    try:
        moments = collect_input_moments(model, windows, layers=[router, *experts])
    finally:
        handle.remove()
    h = torch.cat(seen)
    tokens = 2 * 23 + 17
    assert h.shape[0] == tokens and moments[router].count == tokens  # the router counted once, not twice
    assert _rel(moments[router].xtx, h.double().t() @ h.double()) < 1e-6
    # every token reaches top_k = 2 distinct experts
    assert sum(moments[n].count for n in experts[:4]) == 2 * tokens
    up_sum = sum(moments[n].xtx for n in experts[:4])
    assert _rel(up_sum, 2 * h.double().t() @ h.double()) < 1e-6
    # expert 3's down projection reads silu(gate) * up of the tokens routed to it, token by token
    _, chosen, _ = route(h, ffn.router.weight, 2)
    rows = []
    for t in range(h.shape[0]):
        if 3 in chosen[t].tolist():
            a = ffn.gate_up[3, :24] @ h[t]
            b = ffn.gate_up[3, 24:] @ h[t]
            rows.append((F.silu(a) * b).detach())
    act = torch.stack(rows).double()
    assert moments[experts[7]].count == len(rows)
    assert _rel(moments[experts[7]].xtx, act.t() @ act) < 1e-5


def _clean(model) -> bool:
    no_hooks = all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    return no_hooks and torch._C._len_torch_function_stack() == 0


def test_hooks_removed_and_modes_restored_after_success_and_failure():
    model = _moe_lm()
    model.backbone.layers[0].train()  # a mixed mode is restored as it was
    calls = []
    collect_input_moments(model, _windows(), progress=lambda done, tokens: calls.append((done, tokens)))
    assert calls == [(1, 46), (2, 63)]
    assert _clean(model) and model.backbone.layers[0].training and not model.backbone.layers[1].training

    def boom(done, tokens):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        collect_input_moments(model, _windows(), progress=boom)
    assert _clean(model) and model.backbone.layers[0].training
    bad = _windows()
    bad[1][0, 5] = VOCAB + 3
    with pytest.raises(InputError, match=rf"calibration window 1 has token id {VOCAB + 3}, outside .*\[0, {VOCAB}\)"):
        collect_input_moments(model, bad)
    assert _clean(model)


def test_errors():
    model = MODELS["mamba1"]()
    with pytest.raises(InputError, match="the calibration set is empty"):
        collect_input_moments(model, [])
    with pytest.raises(InputError, match="the calibration set is empty"):
        collect_input_moments(model, iter([torch.zeros(2, 0, dtype=torch.long)]))
    with pytest.raises(InputError, match="calibration window 0 has token id -1"):
        collect_input_moments(model, [torch.tensor([[1, -1, 2]])])
    with pytest.raises(InputError, match="calibration window 0 must be an integer"):
        collect_input_moments(model, [torch.zeros(1, 3)])
    with pytest.raises(ConfigError, match="no_such_layer"):
        collect_input_moments(model, _windows(), layers=["no_such_layer"])
    with pytest.raises(ConfigError, match="chunk_size"):
        collect_input_moments(model, _windows(), chunk_size=0)
    assert _clean(model)


def test_layer_filters_and_head():
    model = MODELS["mamba1"]()
    only = collect_input_moments(model, _windows(), layers=lambda n: n.endswith("out_proj"))
    assert sorted(only) == ["backbone.layers.0.mixer.out_proj", "backbone.layers.1.mixer.out_proj"]
    head = collect_input_moments(model, _windows(), layers=["lm_head"])
    assert head["lm_head"].count == 63 and head["lm_head"].xtx.shape == (16, 16)
    m = Moments(torch.zeros(3, 3, dtype=torch.float64))
    m.add(torch.ones(2, 4, 3))
    assert m.count == 8 and torch.equal(m.xtx, torch.full((3, 3), 8.0, dtype=torch.float64))


def test_calibrated_gptq_beats_rtn_on_a_tiny_hybrid():
    """End to end: the collected moments drive GPTQ, which lowers the summed output error of the hybrid's layers."""
    from seqlab.quant.gptq import layer_error, quantize_gptq
    from seqlab.quant.rtn import quantize_rtn

    model = MODELS["hybrid"]()
    g = torch.Generator().manual_seed(0)
    moments = collect_input_moments(model, [torch.randint(0, VOCAB, (2, 64), generator=g) for _ in range(2)])
    total_rtn = total_gptq = 0.0
    for target in linear_layers(model):
        w = target.weight.detach()
        group = 8 if w.shape[1] % 8 == 0 else w.shape[1]
        xtx = moments[target.name].xtx
        rtn = layer_error(w, quantize_rtn(w, 2, group).dequantize(), xtx)
        gptq = layer_error(w, quantize_gptq(w, xtx, 2, group).dequantize(), xtx)
        assert gptq <= 1.05 * rtn, target.name
        total_rtn, total_gptq = total_rtn + rtn, total_gptq + gptq
    assert total_gptq < 0.9 * total_rtn


def test_a_lone_tensor_is_one_window():
    model = MODELS["mamba2"]()
    ids = _windows()[0]
    lone = collect_input_moments(model, ids)
    listed = collect_input_moments(model, [ids])
    assert all(lone[n].count == 46 and torch.equal(lone[n].xtx, listed[n].xtx) for n in listed)
