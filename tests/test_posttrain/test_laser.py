"""LASER (seqlab.posttrain.laser): the low-rank layer, the truncated SVD's optimality, interventions on every block
kind with an exact revert, the state contract and the model file of a LASER'd model, the search and its report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from seqlab.checkpoint import load_model, save_model
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.posttrain.laser import (
    DEFAULT_RHOS,
    Intervention,
    LaserReport,
    LowRankLinear,
    apply_interventions,
    factorize,
    intervention_targets,
    laser_applied,
    laser_search,
    plot_heatmap,
    rank_for,
    stream_scorer,
)
from seqlab.safetensors_io import read_tensors, write_tensors
from seqlab.testing import rel_err, run_chunked, shrinking_interventions, tiny_hybrid_options, tiny_lm, tiny_moe_options

VOCAB = 32
MOE = tiny_moe_options()
KINDS = {
    "mamba1": dict(ssm="mamba1"),
    "mamba2": dict(ssm="mamba2"),
    "attn_hybrid": tiny_hybrid_options(),
    "moe": MOE,
}
MODEL_FILE = dict(kind="seqlab.checkpoint.model", version=2)


def fresh(kind: str, seed: int = 0):
    return tiny_lm(**KINDS[kind], vocab=VOCAB, seed=seed)


def ids(b: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


shrinking = shrinking_interventions


# ---------------------------------------------------------------------------------------------- the layer
def test_full_rank_layer_reproduces_the_linear_layer_outputs_and_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(12, 20)
    layer = LowRankLinear.from_linear(linear, 12, allow_larger=True)  # full rank: larger than the matrix
    assert (layer.in_features, layer.out_features, layer.rank) == (12, 20, 12)
    assert layer.left.shape == (20, 12) and layer.right.shape == (12, 12)
    assert rel_err(layer.weight, linear.weight) <= 1e-5
    x = torch.randn(3, 5, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    want, got = linear(x), layer(x2)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(layer.matmul(x2), want - linear.bias) <= 1e-5
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    assert rel_err(x2.grad, x.grad) <= 1e-5
    assert rel_err(layer.bias.grad, linear.bias.grad) <= 1e-6
    # the factors get the chain rule of the dense weight's gradient: dL/dleft = G right^T, dL/dright = left^T G
    assert rel_err(layer.left.grad, linear.weight.grad @ layer.right.detach().t()) <= 1e-5
    assert rel_err(layer.right.grad, layer.left.detach().t() @ linear.weight.grad) <= 1e-5
    # balanced factors: sqrt(S) on both sides
    assert rel_err(layer.left.norm(dim=0), layer.right.norm(dim=1)) <= 1e-5


def test_truncated_svd_is_the_best_rank_r_approximation_and_random_keeps_other_components():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 12, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in (1, 3, 7, 11):
        left, right = factorize(w, r)
        err = w - left @ right
        # Eckart-Young: the Frobenius error is the tail's norm, the spectral error the first dropped value
        assert math.isclose(float(torch.linalg.matrix_norm(err)), float(s[r:].square().sum().sqrt()), rel_tol=1e-9)
        assert math.isclose(float(torch.linalg.matrix_norm(err, ord=2)), float(s[r]), rel_tol=1e-9)
        assert int(torch.linalg.matrix_rank(left @ right)) == r
        # the random control keeps r true singular components: its error is the norm of those it drops
        rl, rr = factorize(w, r, method="random", seed=5)
        kept = torch.linalg.svdvals(rl @ rr)[:r]
        dropped = s.square().sum() - kept.square().sum()
        assert math.isclose(float(torch.linalg.matrix_norm(w - rl @ rr) ** 2), float(dropped), rel_tol=1e-7)
        assert float(torch.linalg.matrix_norm(w - rl @ rr)) >= float(torch.linalg.matrix_norm(err)) - 1e-12
    a = factorize(w, 3, method="random", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, factorize(w, 3, method="random", seed=5)))
    assert not torch.equal(a[0] @ a[1], factorize(w, 3, method="random", seed=6)[0] @ factorize(w, 3, seed=6)[1])
    assert not torch.equal(a[0] @ a[1], torch.matmul(*factorize(w, 3)))
    with pytest.raises(ConfigError, match="rank must be"):
        factorize(w, 13)
    with pytest.raises(ConfigError, match="method"):
        factorize(w, 2, method="best")


def test_rank_rule_and_the_size_check():
    assert rank_for((64, 16), 0.5) == 8 and rank_for((16, 64), 0.01) == 1 and rank_for((100, 300), 0.29) == 29
    assert rank_for((10, 10), 1) == 10 and rank_for((7, 9), 0.9) == 6
    for rho in (0, -0.1, 1.5, math.nan, True, "0.5"):
        with pytest.raises(ConfigError, match="rho must be"):
            rank_for((8, 8), rho)
    assert DEFAULT_RHOS[0] <= 0.01 and all(0 < r <= 1 for r in DEFAULT_RHOS)
    linear = nn.Linear(16, 16)
    with pytest.raises(ConfigError, match="not fewer than its 256"):
        LowRankLinear.from_linear(linear, 8)  # 8 * 32 = 256 numbers: not smaller
    assert LowRankLinear.from_linear(linear, 7).parameter_saving() == 256 - 7 * 32


# ---------------------------------------------------------------------------------------------- interventions
def test_targets_naming_and_errors():
    model = fresh("moe")
    targets = intervention_targets(model)
    assert (0, "mixer.in_proj") in targets and (1, "ffn.gate_up[3]") in targets and (1, "ffn.down[0]") in targets
    assert not any("router" in k for _, k in targets)
    hybrid = intervention_targets(fresh("attn_hybrid"))
    assert {(1, "mixer.q_proj"), (1, "mixer.o_proj"), (0, "ffn.gate_up"), (2, "ffn.down")} <= set(hybrid)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"layer 7 .*\(0\.\.1\)"):
        apply_interventions(model, [Intervention(7, "mixer.in_proj", 0.5)])
    with pytest.raises(ConfigError, match="has no reducible matrix 'mixer.q_proj'; its kinds: mixer.in_proj"):
        apply_interventions(model, [Intervention(0, "mixer.q_proj", 0.5)])
    with pytest.raises(ConfigError, match=r"ffn.gate_up\[\*\]"):
        apply_interventions(model, [Intervention(0, "ffn.gate_up[9]", 0.5)])
    with pytest.raises(ConfigError, match="rho must be"):
        apply_interventions(model, [Intervention(0, "mixer.in_proj", 0.0)])
    with pytest.raises(ConfigError, match="rho must be"):
        apply_interventions(model, [Intervention(0, "mixer.in_proj", 1.01)])
    with pytest.raises(ConfigError, match="backbone.layers.0.mixer.dt_proj: rank 1 factors"):
        apply_interventions(model, [Intervention(0, "mixer.dt_proj", 0.5)])  # (32, 1): nothing to save
    with pytest.raises(ConfigError, match="more than one intervention"):
        apply_interventions(model, [Intervention(0, "ffn.down[*]", 0.5), Intervention(0, "ffn.down[2]", 0.1)])
    with pytest.raises(ConfigError, match="method"):
        apply_interventions(model, [Intervention(0, "mixer.in_proj", 0.5)], method="top")
    # a failure after the first good intervention still leaves the model as it was
    with pytest.raises(ConfigError):
        apply_interventions(model, [Intervention(0, "mixer.in_proj", 0.5), Intervention(0, "nope", 0.5)])
    assert same(model, before) and not hasattr(model, "low_rank")
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    undo = apply_interventions(model, [Intervention(0, "mixer.dt_proj", 0.5)], allow_larger=True)
    with pytest.raises(ConfigError, match="already low-rank"):
        apply_interventions(model, [Intervention(0, "mixer.dt_proj", 0.5)])
    undo.revert()


def test_revert_restores_the_model_bit_for_bit():
    model = fresh("moe")
    before = snapshot(model)
    modules = dict(model.named_modules())
    x = ids(2, 9, 3)
    with torch.no_grad():
        want = model(x).logits
    first = apply_interventions(model, shrinking(model, 0.25), method="random", seed=3)
    layout = dict(model.low_rank)
    assert set(layout) == set(first.names) and "backbone.layers.1.ffn.gate_up[2]" in layout
    second = apply_interventions(model, [Intervention(0, "mixer.dt_proj", 1.0)], allow_larger=True)
    assert set(model.low_rank) == set(layout) | {"backbone.layers.0.mixer.dt_proj"}
    with pytest.raises(ConfigError, match="reverse order"):
        first.revert()
    second.revert()
    assert model.low_rank == layout
    first.revert()
    first.revert()  # twice: nothing more to do
    assert same(model, before) and not hasattr(model, "low_rank") and not hasattr(model, "_low_rank_experts")
    assert all(modules[n] is m for n, m in model.named_modules())  # the very same modules
    with laser_applied(model, shrinking(model, 0.5)):
        with torch.no_grad():
            assert not torch.equal(model(x).logits, want)
    with pytest.raises(RuntimeError, match="inside"):
        with apply_interventions(model, shrinking(model, 0.5)) as reduced:
            assert reduced is model and isinstance(model.backbone.layers[0].mixer.in_proj, LowRankLinear)
            raise RuntimeError("inside")
    assert same(model, before)
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)


@pytest.mark.parametrize("kind", list(KINDS))
def test_laser_model_keeps_the_state_contract_and_its_file_holds_the_factors(kind, tmp_path):
    model = fresh(kind)
    dense_path = save_model(tmp_path / "dense.safetensors", model)
    dense_params = sum(p.numel() for p in model.parameters())
    interventions = shrinking(model, 0.25)
    apply_interventions(model, interventions)
    linear = [n for n in model.low_rank if "[" not in n]
    assert linear and all(isinstance(model.get_submodule(n), LowRankLinear) for n in linear)
    assert ("[" in "".join(model.low_rank)) == (kind == "moe")
    entry = model.low_rank[linear[0]]
    assert set(entry) == {"rank", "shape", "rho", "method"} and entry["method"] == "svd" and entry["rho"] == 0.25
    json.dumps(model.low_rank)
    x = ids(2, 13, 5)
    with torch.no_grad():
        whole = model(x)
        pieces, state = run_chunked(model, x, [1, 6])
        assert rel_err(pieces, whole.logits) <= 1e-5
        for key, value in whole.state.tensors().items():
            assert rel_err(state.tensors()[key], value) <= 1e-5, key
        prefix = model(x[:, :5])
        state, logits = prefix.state, [prefix.logits]
        for t in range(5, x.shape[1]):
            out = model.step(x[:, t], state)
            logits.append(out.logits.unsqueeze(1))
            state = out.state
        assert rel_err(torch.cat(logits, dim=1), whole.logits) <= 1e-5
    # the file: factors, not dense matrices; smaller than the dense model's
    path = save_model(tmp_path / "laser.safetensors", model)
    tensors, meta = read_tensors(path, **MODEL_FILE)
    assert meta["low_rank"]["layers"] == model.low_rank
    for name in linear:
        assert f"{name}.left" in tensors and f"{name}.right" in tensors and f"{name}.weight" not in tensors
    if kind == "moe":
        assert "backbone.layers.0.ffn.gate_up" not in tensors and "backbone.layers.1.ffn.down[3].left" in tensors
    assert path.stat().st_size < dense_path.stat().st_size
    if kind != "moe":  # experts keep their stacked parameters in memory (the file shrinks, not the model)
        assert sum(p.numel() for p in model.parameters()) < dense_params
    # load into another model of the same config: every bit from the file; a state carries over
    loaded = fresh(kind, seed=3)
    load_model(path, loaded)
    assert loaded.low_rank == model.low_rank
    assert all(isinstance(loaded.get_submodule(n), LowRankLinear) for n in linear)
    with torch.no_grad():
        half = model(x[:, :7])
        assert torch.equal(loaded(x).logits, whole.logits)
        assert torch.equal(loaded(x[:, 7:], half.state).logits, model(x[:, 7:], half.state).logits)
    again, _ = read_tensors(save_model(tmp_path / "again.safetensors", loaded), **MODEL_FILE)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_gradients_reach_the_factors_of_a_laser_model():
    model = fresh("attn_hybrid").train()
    apply_interventions(model, shrinking(model, 0.5))
    out = model(ids(2, 8, 1)).logits
    out.square().mean().backward()
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) >= 10
    assert all(m.left.grad is not None and m.right.grad is not None and m.left.grad.abs().sum() > 0 for m in layers)


def test_model_from_checkpoint_rebuilds_a_laser_model(tmp_path):
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.testing import tiny_config

    torch.manual_seed(0)
    model = ByteAdapter().build_model(tiny_config()).eval()
    apply_interventions(model, shrinking(model, 0.1))
    path = save_model(tmp_path / "m.safetensors", model)
    loaded, adapter = model_from_checkpoint(path)
    assert adapter.name == "bytes" and loaded.low_rank == model.low_rank
    prompt = torch.tensor([list(b"the quick")])
    assert model.generate(prompt, 8).tokens == loaded.generate(prompt, 8).tokens


def test_a_file_loads_into_a_model_reduced_with_the_same_layout(tmp_path):
    """Resuming the fine-tune of a LASER'd model: the checkpoint loads into the live reduced model, in place."""
    model = fresh("moe")
    apply_interventions(model, shrinking(model, 0.25))
    path = save_model(tmp_path / "m.safetensors", model)
    live = fresh("moe", seed=5)
    undo = apply_interventions(live, shrinking(live, 0.25))
    factors = [m.left for m in live.modules() if isinstance(m, LowRankLinear)]
    other = fresh("moe", seed=5)
    apply_interventions(other, shrinking(other, 0.5))
    before = snapshot(other)
    with pytest.raises(CorruptFileError, match="another layout"):
        load_model(path, other)
    assert same(other, before)
    load_model(path, live)
    assert [m.left for m in live.modules() if isinstance(m, LowRankLinear)] == factors  # the same parameters
    x = ids(2, 9, 2)
    with torch.no_grad():
        assert torch.equal(live(x).logits, model(x).logits)
    with pytest.raises(ConfigError, match="loaded from a LASER file"):
        undo.revert()


def test_bad_files_are_refused_and_leave_the_model_as_it_was(tmp_path):
    model = fresh("moe")
    apply_interventions(model, shrinking(model, 0.25))
    path = save_model(tmp_path / "m.safetensors", model)
    tensors, meta = read_tensors(path, **MODEL_FILE)
    layer, expert = "backbone.layers.0.mixer.in_proj", "backbone.layers.1.ffn.down[2]"

    def variant(**changes):
        t = dict(tensors)
        for k, v in changes.items():
            if v is None:
                del t[k]
            else:
                t[k] = v
        return t

    def meta_with(edit):
        m = json.loads(json.dumps(meta))
        edit(m)
        return m

    nan = tensors[f"{expert}.right"].clone()
    nan[0, 0] = math.nan
    cases = {
        "cut": (variant(**{f"{layer}.left": tensors[f"{layer}.left"][:-1]}), meta, f"{layer}.left is"),
        "no_right": (
            variant(**{f"{expert}.right": None}),
            meta,
            rf"has no {expert.replace('[', '.').replace(']', '.')}",
        ),
        "rank": (tensors, meta_with(lambda m: m["low_rank"]["layers"][layer].update(rank=3)), f"{layer}.left is"),
        "shape": (tensors, meta_with(lambda m: m["low_rank"]["layers"][layer].update(shape=[8, 16])), "does not match"),
        "future": (tensors, meta_with(lambda m: m["low_rank"].update(format=99)), "low_rank format 99"),
        "dense": (variant(**{f"{layer}.weight": torch.zeros(64, 16)}), meta, "unexpected"),
        "nan": (variant(**{f"{expert}.right": nan}), meta, "NaN"),
        "both": (tensors, meta_with(lambda m: m.update(quantization={"layers": {}})), "both quantization"),
    }
    for name, (t, m, words) in cases.items():
        bad = write_tensors(tmp_path / f"{name}.safetensors", t, meta=m, **MODEL_FILE)
        target = fresh("moe", seed=4)
        before = snapshot(target)
        with pytest.raises(CorruptFileError, match=words) as info:
            load_model(bad, target)
        assert str(bad) in str(info.value), name
        assert same(target, before), name
        assert not hasattr(target, "low_rank") and not any(isinstance(x, LowRankLinear) for x in target.modules())


def test_quantized_and_low_rank_together_are_refused(tmp_path):
    from seqlab.quant import quantize_model

    model = fresh("mamba1")
    windows = [ids(1, 16, 0)]
    fast = {"max_rounds": 1, "adam_steps": 2, "kmeans_iters": 3}
    quantize_model(model, windows, "1x4g8", layers=["backbone.layers.0.mixer.out_proj"], aqlm_options=fast)
    with pytest.raises(ConfigError, match="quantized"):
        apply_interventions(model, [Intervention(1, "mixer.in_proj", 0.25)])
    with pytest.raises(ConfigError, match="quantized"):
        laser_search(model, lambda m: 0.0, rhos=(0.25,))
    reduced = fresh("mamba1")
    apply_interventions(reduced, [Intervention(1, "mixer.in_proj", 0.25)])
    before = {k: v.clone() for k, v in reduced.state_dict().items()}
    with pytest.raises(ConfigError, match="low-rank"):  # quantize_model refuses a LASER'd model, model untouched
        quantize_model(reduced, windows, "1x4g8", layers=["backbone.layers.0.mixer.out_proj"], aqlm_options=fast)
    assert not getattr(reduced, "quantization", None)
    assert all(torch.equal(before[k], v) for k, v in reduced.state_dict().items())
    reduced.quantization = {"method": "aqlm", "layers": {}}  # as if quantize_model had run on the LASER'd model
    with pytest.raises(ConfigError, match="both quantized and low-rank"):
        save_model(tmp_path / "both.safetensors", reduced)
    assert not (tmp_path / "both.safetensors").exists()


# ---------------------------------------------------------------------------------------------- the search
@pytest.fixture(scope="module")
def planted():
    """A Mamba-1 model whose layer-1 out_proj is a rank-1 matrix plus small full-rank noise, and a score: the mean
    squared distance of its logits to those of the clean (rank-1) model. Reducing that matrix to rank 1 removes the
    noise, so the search must find (1, mixer.out_proj) at the smallest rho; every other cell moves away."""
    model = fresh("mamba1", seed=2)
    g = torch.Generator().manual_seed(9)
    proj = model.backbone.layers[1].mixer.out_proj
    u, v = torch.randn(16, 1, generator=g), torch.randn(1, 32, generator=g)
    clean = 0.6 * u @ v / (u.norm() * v.norm()) * proj.weight.norm()
    x = ids(2, 24, 11)
    with torch.no_grad():
        proj.weight.copy_(clean)
        target = model(x).logits
        proj.weight.add_(0.1 * proj.weight.norm() / math.sqrt(16 * 32) * torch.randn(16, 32, generator=g))

    def score(m) -> float:
        with torch.no_grad():  # as laser_search scores: the same kernels' path, so the same bits
            return float((m(x).logits - target).square().mean())

    return model, score


def test_search_finds_the_planted_improvement_and_leaves_the_model_unchanged(planted, tmp_path):
    model, score = planted
    before = snapshot(model)
    modules = dict(model.named_modules())
    calls = []

    def counted(m):
        calls.append(1)
        return score(m)

    report = laser_search(
        model, counted, kinds=["mixer.out_proj", "mixer.in_proj", "mixer.dt_proj"], rhos=(0.05, 0.5), compose=2
    )
    assert same(model, before) and all(modules[n] is m for n, m in model.named_modules())
    assert not hasattr(model, "low_rank")
    assert report.baseline == score(model) and report.baseline > 0
    assert [(c.layer, c.kind) for c in report.cells[::2]] == [
        (layer, kind) for layer in (0, 1) for kind in ("mixer.out_proj", "mixer.in_proj", "mixer.dt_proj")
    ]
    skipped = [c for c in report.cells if c.skipped]
    assert {c.kind for c in skipped} == {"mixer.dt_proj"} and all(c.score is None for c in skipped)
    scored = [c for c in report.cells if not c.skipped]
    winners = {(c.layer, c.kind) for c in scored if c.delta < 0}
    assert len(calls) == 1 + len(scored) + min(2, len(winners))  # baseline, cells, composition trials
    best = report.best
    assert (best.layer, best.kind, best.rho, best.rank) == (1, "mixer.out_proj", 0.05, 1)
    assert best.delta < -0.5 * report.baseline and best.params_saved == 16 * 32 - 48
    assert all(c.delta == c.score - report.baseline for c in scored)
    assert report.composed[0] == best and report.composed_score <= best.score
    assert report.improves(best.score) and not report.improves(report.baseline)
    # the same interventions applied by hand give the reported scores
    with apply_interventions(model, report.composed) as reduced:
        assert score(reduced) == report.composed_score
    # the random control of the same size keeps other components: no gain there
    control = laser_search(model, score, layers=[1], kinds=["mixer.out_proj"], rhos=(0.05,), method="random")
    assert control.cells[0].rank == 1 and control.cells[0].score > best.score * 10
    assert same(model, before)
    # the report: JSON round trip (a non-finite score too) and the heatmap
    report.cells[1].score = math.nan
    text = json.dumps(report.to_json())
    assert "NaN" in text and json.loads(text, parse_constant=lambda c: pytest.fail(c))
    back = LaserReport.from_json(text)
    assert math.isnan(back.cells[1].score) and back.best == report.best and back.composed == report.composed
    assert back.cells[2:] == report.cells[2:] and back.rhos == [0.05, 0.5]
    png = plot_heatmap(report, tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["heat.png"]


def test_search_progress_bar(planted, capsys):
    model, score = planted
    report = laser_search(model, score, layers=[1], kinds=["mixer.out_proj"], rhos=(0.05, 0.9), progress=True)
    assert "LASER" in capsys.readouterr().err and report.cells[1].skipped  # rank 14: 672 numbers, not < 512


def test_search_argument_errors(planted):
    model, score = planted
    with pytest.raises(ConfigError, match=r"kinds \['ffn.down'\] name no reducible matrix"):
        laser_search(model, score, kinds=["ffn.down"])
    with pytest.raises(ConfigError, match=r"layers \[5\]"):
        laser_search(model, score, layers=[5])
    with pytest.raises(ConfigError, match="rho must be"):
        laser_search(model, score, rhos=(0.5, 0))
    with pytest.raises(ConfigError, match="compose"):
        laser_search(model, score, compose=-1)
    with pytest.raises(InputError, match="score must return a float"):
        laser_search(model, lambda m: "low", rhos=(0.5,))
    with pytest.raises(InputError, match="finite"):
        laser_search(model, lambda m: math.inf, rhos=(0.5,))
    with pytest.raises(InputError, match="not a LASER report"):
        LaserReport.from_json({"cells": []})


def test_stream_scorer_is_the_streamed_metric():
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.streaming import stream_metric
    from seqlab.testing import tiny_config

    torch.manual_seed(0)
    adapter = ByteAdapter()
    model = adapter.build_model(tiny_config()).eval()
    data = torch.tensor(list(b"a held-out stream of bytes, in pieces"))
    score = stream_scorer(adapter, lambda: data.split(10))
    want, count = stream_metric(model, adapter, [data])
    assert count == len(data) - 1 and math.isclose(score(model), want, rel_tol=1e-5)
    assert math.isclose(stream_scorer(adapter, list(data.split(7)))(model), want, rel_tol=1e-5)
    with pytest.raises(InputError, match="one-shot iterator"):
        stream_scorer(adapter, iter(data.split(10)))
    with pytest.raises(InputError, match="no position"):
        stream_scorer(adapter, [data[:1]])(model)
