"""The fused compiled decode step (seqlab/fused_step.py, kernels/csrc/step.c) against the eager step.

Every comparison runs the same model twice: ``model.fused_step = True`` (the compiled step) and ``False`` (each
block's eager ``step``), and checks the logits and every state tensor (values, dtype, shape) and the positions.
float64 agrees to ~1e-7 rather than 1e-12 because the eager float64 path itself normalises in float32
(seqlab/norm.py) and keeps the conv state in float32: the two sum those float32 values in different orders.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqlab.fused_step import fused_layers
from seqlab.models import LanguageModel
from seqlab.testing import assert_rel, rel_err, tiny_config, tiny_lm

pytestmark = pytest.mark.skipif(
    fused_layers(tiny_lm("mamba1"))[0] is not None, reason="the compiled step library does not build here"
)

TOL = {torch.float32: 2e-5, torch.float64: 2e-6}

VARIANTS = {
    "mamba1": dict(ssm="mamba1"),
    "mamba1-bias-noresfp32": dict(ssm="mamba1", proj_bias=True, conv_bias=False, residual_in_fp32=False, d_conv=3),
    "mamba2": dict(ssm="mamba2"),
    "mamba2-groups": dict(ssm="mamba2", ngroups=2, d_state=4, proj_bias=True),
    "mamba2-conv2": dict(ssm="mamba2", d_conv=2, headdim=4),
    # the gated MLP feed-forward after each mixer (MambaByte's blocks); d_ffn not a multiple of the 64-wide blocks
    "mamba1-mlp": dict(ssm="mamba1", ffn="mlp", d_ffn=72, residual_in_fp32=False),
    "mamba2-mlp": dict(ssm="mamba2", ffn="mlp", d_ffn=24, proj_bias=True),
    "mamba3-mlp": dict(ssm="mamba3", ffn="mlp", d_ffn=24, proj_bias=True),
    # the mixture of experts (MoE-Mamba's layers): top-1 (Switch gate), top-2 renormalised, top-3 not (Jamba's rule)
    "mamba1-moe": dict(ssm="mamba1", ffn="moe", moe_experts=4, moe_top_k=1, d_ffn=24),
    "mamba2-moe-top2": dict(ssm="mamba2", ffn="moe", moe_experts=5, moe_top_k=2, d_ffn=72),
    "mamba1-moe-top3-raw": dict(ssm="mamba1", ffn="moe", moe_experts=4, moe_top_k=3, moe_renormalize=False, d_ffn=8),
    # Mamba-3: SISO (rotary pairs interleaved), MIMO rank 2 (pairs in halves) with groups, the per-head gated norm
    # before out_proj with the softplus rate and biases, all rotary (rope_fraction 1)
    "mamba3": dict(ssm="mamba3"),
    "mamba3-mimo": dict(ssm="mamba3", mamba3_mimo_rank=2, ngroups=2, d_state=6, mamba3_rope_fraction=1.0),
    "mamba3-outnorm": dict(ssm="mamba3", mamba3_outproj_norm=True, mamba3_A_activation="softplus", proj_bias=True),
    # attention (the KV cache grows a slot per step): grouped-query heads, a sliding window shorter than the
    # prefill, q/k/v and output biases, a gated MLP; two heads of 12 with 4 rotated dims (linear rope scaling,
    # head_dim not a multiple of 8) and an MoE
    "attention-gqa-window-mlp": dict(
        ssm="attention",
        attn_heads=4,
        attn_kv_heads=2,
        attn_window=4,
        attn_bias=True,
        attn_out_bias=True,
        ffn="mlp",
        d_ffn=24,
    ),
    "attention-rope-moe": dict(
        ssm="attention",
        attn_heads=2,
        attn_head_dim=12,
        attn_rope_dim=4,
        ffn="moe",
        moe_experts=3,
        moe_top_k=2,
        d_ffn=8,
        attn_rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}


def _model(variant: str, dtype=torch.float32, **kw) -> LanguageModel:
    options = dict(VARIANTS[variant])
    ssm = options.pop("ssm")
    model = tiny_lm(ssm, seed=3, **{**options, **kw})
    with torch.no_grad():  # biases away from zero and norm weights away from one, so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") and "dt" not in name:
                p.uniform_(-0.3, 0.3)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def _step(model, tokens, state, fused: bool):
    model.fused_step = fused
    try:
        return model.step(tokens, state)
    finally:
        model.fused_step = True


def _generate_eagerly(model, *args, **kwargs):
    model.fused_step = False
    try:
        return model.generate(*args, **kwargs)
    finally:
        model.fused_step = True


def _assert_same_generations(fused, eager) -> None:
    """Two ``generate`` outputs: the same tokens and stop reasons, final states equal to rounding (shapes too)."""
    assert fused.tokens == eager.tokens and fused.stop_reasons == eager.stop_reasons
    for a, b in zip(fused.states, eager.states):
        assert a.position == b.position
        for la, lb in zip(a.layers, b.layers):
            for name in lb:
                assert la[name].shape == lb[name].shape
                assert_rel(la[name], lb[name], 2e-5, f"final state {name}")


def _assert_same(got, want, tol: float, what: str) -> None:
    assert_rel(got.logits, want.logits, tol, f"{what} logits")
    assert got.logits.dtype == want.logits.dtype
    assert got.state.positions == want.state.positions
    assert len(got.state.layers) == len(want.state.layers)
    for i, (a, b) in enumerate(zip(got.state.layers, want.state.layers)):
        assert set(a) == set(b), f"{what} layer {i}"
        for name in b:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, f"{what} layers.{i}.{name}"
            assert_rel(a[name], b[name], tol, f"{what} layers.{i}.{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_fused_step_equals_eager_step(variant, batch, dtype):
    model = _model(variant, dtype)
    assert fused_layers(model) == [None, None]  # else this test would compare eager with eager
    gen = torch.Generator().manual_seed(batch)
    # from no state (position 0), then after a prefill of 7 tokens, then three steps on (the new state feeds on)
    state = None
    for start in ("zero", "prefill"):
        if start == "prefill":
            state = model(torch.randint(0, 32, (batch, 7), generator=gen)).state
        for k in range(2):
            tokens = torch.randint(0, 32, (batch,), generator=gen)
            before = None if state is None else state.clone()
            fused = _step(model, tokens, state, True)
            eager = _step(model, tokens, state, False)
            _assert_same(fused, eager, TOL[dtype], f"{variant} {start} step {k}")
            if before is not None:  # the state passed in is never modified
                for a, b in zip(state.layers, before.layers):
                    assert all(torch.equal(a[n], b[n]) for n in b)
                assert state.positions == before.positions
            state = fused.state


@pytest.mark.parametrize("variant", ["mamba1", "mamba2-groups", "mamba3-mimo", "attention-gqa-window-mlp"])
@torch.no_grad()
def test_step_equals_forward(variant):
    model = _model(variant, torch.float64)
    ids = torch.randint(0, 32, (3, 11), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    state = None
    for t in range(ids.shape[1]):
        out = model.step(ids[:, t], state)
        assert_rel(out.logits, want[:, t], 1e-6, f"position {t}")
        state = out.state
    assert state.position == ids.shape[1]


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2", "mamba3"])
def test_greedy_generate_equals_step_by_step_argmax(ssm):
    model = _model(ssm)
    prompt = [3, 1, 4, 1, 5]
    out = model.generate(prompt, 12, temperature=0)
    with torch.no_grad():
        step = model(torch.tensor([prompt]))
        state, token = step.state, int(step.logits[0, -1].argmax())
        tokens = [token]
        for _ in range(11):
            step = model.step(torch.tensor([token]), state)
            state, token = step.state, int(step.logits[0].argmax())
            tokens.append(token)
    assert list(out.tokens[0]) == tokens


def _hybrid(dtype=torch.float32) -> LanguageModel:
    """Mamba-1, attention (grouped-query), Mamba-2, Mamba-1 (no feed-forward)."""
    torch.manual_seed(5)
    config = tiny_config(
        "mamba1",
        n_layer=4,
        attn_heads=4,
        attn_kv_heads=2,
        layer_overrides={1: {"mixer": "attention"}, 2: {"mixer": "mamba2", "options": {"headdim": 8}}},
    )
    return LanguageModel(config, vocab_size=32).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("attention", ["fused", "eager"])
@torch.no_grad()
def test_hybrid_equals_eager_with_its_attention_fused_or_not(attention, dtype):
    """Every block of a hybrid fuses (one call, the whole-model step after the first); with a hook on the
    attention mixer it steps eagerly between two fused runs of Mamba blocks. Both equal the eager step."""
    from seqlab.fused_step import fused_lm_step

    model = _hybrid(dtype)
    if attention == "eager":
        model.backbone.layers[1].mixer.register_forward_hook(lambda module, args, out: None)
    reasons = fused_layers(model)
    assert reasons[0] is None and reasons[2] is None and reasons[3] is None
    assert reasons[1] is None if attention == "fused" else "forward hook" in reasons[1]
    state = model(torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))).state
    for k in range(3):
        tokens = torch.tensor([k, 7 + k])
        if k:  # the whole-model call takes a state the fused step returned, when every block fuses
            assert (fused_lm_step(model, tokens, state) is not None) == (attention == "fused")
        fused, eager = _step(model, tokens, state, True), _step(model, tokens, state, False)
        _assert_same(fused, eager, TOL[dtype], f"hybrid step {k}")
        state = fused.state


@torch.no_grad()
def test_hybrid_with_feed_forwards_fuses_every_block_and_mlp():
    torch.manual_seed(6)
    config = tiny_config(
        "mamba2",
        n_layer=3,
        ffn="mlp",
        d_ffn=40,
        attn_heads=4,
        layer_overrides={1: {"mixer": "attention"}},
    )
    model = LanguageModel(config, vocab_size=32).eval()
    assert fused_layers(model) == [None, None, None]
    state = model(torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(2))).state
    for k in range(2):
        tokens = torch.tensor([k, 9, 30 - k])
        fused, eager = _step(model, tokens, state, True), _step(model, tokens, state, False)
        _assert_same(fused, eager, TOL[torch.float32], f"hybrid with MLPs, step {k}")
        state = fused.state


@torch.no_grad()
def test_a_replaced_mlp_child_and_what_does_not_fuse():
    from seqlab.posttrain.laser import LowRankLinear

    model = _model("mamba1-mlp")
    state = model(torch.tensor([[1, 2, 3]])).state
    before = _step(model, torch.tensor([4]), state, True).logits
    ffn = model.backbone.layers[1].ffn
    ffn.gate_up = LowRankLinear.from_linear(ffn.gate_up, 4)  # a child of the MLP replaced: the plan must see it
    assert fused_layers(model) == [None, None]
    after = _step(model, torch.tensor([4]), state, True)
    assert not torch.allclose(after.logits, before)
    _assert_same(after, _step(model, torch.tensor([4]), state, False), 1e-5, "low-rank MLP")
    biased = _model("mamba2-mlp")  # a feed-forward projection with a bias (GatedMLP builds none)
    gate_up = biased.backbone.layers[0].ffn.gate_up
    biased.backbone.layers[0].ffn.gate_up = nn.Linear(gate_up.in_features, gate_up.out_features)
    assert "have biases" in fused_layers(biased)[0] and fused_layers(biased)[1] is None
    routed = tiny_lm("mamba1", seed=1, ffn="moe", moe_experts=2, moe_top_k=1, d_ffn=8)
    routed.backbone.layers[1].ffn.router = nn.Linear(16, 2)  # a router with a bias
    assert fused_layers(routed)[0] is None and "router has a bias" in fused_layers(routed)[1]
    for model in (biased, routed):
        state = model(torch.tensor([[1, 2]])).state
        _assert_same(_step(model, torch.tensor([5]), state, True), _step(model, torch.tensor([5]), state, False),
                     2e-5, "one eager block")  # fmt: skip
    mimo_norm = tiny_lm("mamba3", seed=1, mamba3_mimo_rank=2, mamba3_outproj_norm=True)
    assert all("MIMO with the output norm" in r for r in fused_layers(mimo_norm))
    _eager_bitwise(mimo_norm, torch.tensor([5]), mimo_norm(torch.tensor([[1, 2]])).state)
    wide = tiny_lm("mamba1", seed=1, ffn="moe", moe_experts=18, moe_top_k=17, d_ffn=8)  # past step.c's top-k
    assert all("top_k 17" in r for r in fused_layers(wide))
    _eager_bitwise(wide, torch.tensor([5]), wide(torch.tensor([[1, 2]])).state)


def test_moe_training_with_autograd_runs_eagerly_and_evaluation_fuses():
    """An MoE layer in training mode with autograd on routes with capacity and jitter and records its router
    statistics: that step is the eager one. Under no_grad (or in eval mode) it is the drop-free routing, fused,
    and leaves ``last_stats`` None as the eager forward does."""
    from seqlab.ffn import moe_layers
    from seqlab.fused_step import _PLANS

    model = _model("mamba1-moe").train()
    model.requires_grad_(False)  # nothing needs a gradient: only the MoE's training mode can stop the fused step
    state = model.init_state(3)
    tokens = torch.tensor([1, 7, 30])
    out = model.step(tokens, state)
    assert all(m.last_stats is not None for m in moe_layers(model))  # the eager forward ran, in training mode
    with torch.no_grad():
        fused = model.step(tokens, state)
    assert all(m.last_stats is None for m in moe_layers(model))
    assert _PLANS[model.backbone].moe  # the fused plan holds both MoE layers
    model.eval()
    _assert_same(fused, _step(model, tokens, state, False), TOL[torch.float32], "MoE under no_grad")
    assert out.logits.shape == fused.logits.shape


def _eager_bitwise(model, tokens, state) -> None:
    """A model the fused step must not take: its step equals the eager step bit for bit."""
    fused, eager = _step(model, tokens, state, True), _step(model, tokens, state, False)
    assert torch.equal(fused.logits, eager.logits)
    for a, b in zip(fused.state.layers, eager.state.layers):
        assert all(torch.equal(a[n], b[n]) for n in b)


def _aqlm(linear, num_codebooks=2, bits=4, group=4, layout="row", seed=0):
    """An AQLMLinear of ``linear``'s shape, bias and dtype with random codes, codebooks and (row layout) scales."""
    from seqlab.quant.linear import AQLMLinear

    gen = torch.Generator().manual_seed(seed)
    out, inp = linear.weight.shape
    codes = torch.randint(0, 1 << bits, (out, inp // group, num_codebooks), generator=gen)
    books = 0.2 * torch.randn(num_codebooks, 1 << bits, group, generator=gen)
    scales = torch.rand(out, generator=gen) + 0.5 if layout == "row" else torch.ones(out)
    bias = None if linear.bias is None else linear.bias.detach()
    return AQLMLinear.from_parts(codes, books, scales, bias, scale_layout=layout, dtype=linear.weight.dtype)


def _compressed(ssm: str, dtype=torch.float32) -> LanguageModel:
    """A model whose projections are AQLM-quantized (2x4g4 with row scales, 1x3g8 without) or LASER low-rank, in
    both blocks, the MLP's included: every projection kind of the compiled step, dense ones left between them."""
    from seqlab.posttrain.laser import LowRankLinear

    model = _model("attention-gqa-window-mlp" if ssm == "attention" else f"{ssm}-mlp", dtype)
    first, second = model.backbone.layers
    if ssm == "attention":  # q, o; k, v
        first.mixer.q_proj = _aqlm(first.mixer.q_proj)
        first.mixer.o_proj = LowRankLinear.from_linear(first.mixer.o_proj, 3)
        second.mixer.k_proj = _aqlm(second.mixer.k_proj, group=8)
        second.mixer.v_proj = LowRankLinear.from_linear(second.mixer.v_proj, 2)
    else:
        first.mixer.in_proj = _aqlm(first.mixer.in_proj)
        first.mixer.out_proj = LowRankLinear.from_linear(first.mixer.out_proj, 3)
    second.ffn.gate_up = _aqlm(second.ffn.gate_up, num_codebooks=1, bits=3, group=8, layout="none")
    second.ffn.down = LowRankLinear.from_linear(second.ffn.down, 5)
    if ssm == "mamba1":
        second.mixer.x_proj = _aqlm(second.mixer.x_proj, group=8)
        second.mixer.dt_proj = LowRankLinear.from_linear(second.mixer.dt_proj, 1, allow_larger=True)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("ssm", ["mamba1", "mamba2", "mamba3", "attention"])
@torch.no_grad()
def test_low_rank_and_aqlm_projections_fuse_and_equal_eager(ssm, dtype):
    """LASER's LowRankLinear and AQLM's AQLMLinear run inside the compiled step (two GEMMs; codebook sums dotted
    with the input per group, the weight never formed): the block step and the whole-model step equal the eager
    step, and a row gets the same bits alone as in a batch."""
    from seqlab.fused_step import fused_lm_step

    model = _compressed(ssm, dtype)
    assert fused_layers(model) == [None, None]
    gen = torch.Generator().manual_seed(4)
    state = model(torch.randint(0, 32, (5, 6), generator=gen)).state
    for k in range(2):  # the first through the fused blocks, the second the whole-model call
        tokens = torch.randint(0, 32, (5,), generator=gen)
        if k == 1:
            assert fused_lm_step(model, tokens, state) is not None
        fused, eager = _step(model, tokens, state, True), _step(model, tokens, state, False)
        _assert_same(fused, eager, TOL[dtype], f"{ssm} compressed step {k}")
        state = fused.state
    # row independence: two steps from zeros (the second the whole-model call) for a batch and for row 2 alone
    batch = model.step(tokens, model.step(tokens, model.init_state(5)).state)
    row = model.step(tokens[2:3], model.step(tokens[2:3], model.init_state(1)).state)
    assert torch.equal(row.logits[0], batch.logits[2]) and torch.equal(row.hidden[0], batch.hidden[2])


@torch.no_grad()
def test_low_rank_key_and_value_projections_size_the_workspace():
    """The low-rank projections' inner rows share one workspace sized by the model's largest rank: an attention
    layer's k_proj and v_proj count too (they were once left out, and a LASER'd hybrid wrote past the workspace:
    the ladder's run aborted in free())."""
    from seqlab.posttrain.laser import LowRankLinear

    model = _model("attention-gqa-window-mlp")
    for block in model.backbone.layers:  # the only low-rank layers, rank 8 (k and v: 8 x 16)
        block.mixer.k_proj = LowRankLinear.from_linear(block.mixer.k_proj, 8, allow_larger=True)
        block.mixer.v_proj = LowRankLinear.from_linear(block.mixer.v_proj, 8, allow_larger=True)
    assert fused_layers(model) == [None, None]
    gen = torch.Generator().manual_seed(2)
    state = model(torch.randint(0, 32, (16, 5), generator=gen)).state
    for k in range(3):
        tokens = torch.randint(0, 32, (16,), generator=gen)
        fused, eager = _step(model, tokens, state, True), _step(model, tokens, state, False)
        _assert_same(fused, eager, TOL[torch.float32], f"low-rank k/v step {k}")
        state = fused.state
    out = model.generate([[1, 2, 3]] * 16, 20)  # the greedy loop's workspace too
    assert all(len(t) == 20 for t in out.tokens)


@torch.no_grad()
def test_an_attention_layer_whose_shapes_do_not_match_its_heads_runs_eagerly():
    """A projection replaced by one of another shape: the compiled step would read past its weights, so the block
    runs eagerly, which names the mismatch; a wide head (past step.c's 256) is eager too."""
    model = _model("attention-gqa-window-mlp")
    state = model(torch.tensor([[1, 2, 3]])).state
    mixer = model.backbone.layers[1].mixer
    mixer.k_proj = nn.Linear(16, 12)  # 3 key heads' worth for a layer with 2
    assert fused_layers(model)[0] is None and "k_proj maps 16 -> 12 features" in fused_layers(model)[1]
    with pytest.raises(RuntimeError):
        model.step(torch.tensor([4]), state)
    mixer.k_proj = nn.Linear(16, 8)
    assert fused_layers(model) == [None, None]
    wide = tiny_lm("attention", seed=1, attn_heads=1, attn_head_dim=264)
    assert all("head_dim 264" in reason for reason in fused_layers(wide))
    _eager_bitwise(wide, torch.tensor([5]), wide(torch.tensor([[1, 2]])).state)


@torch.no_grad()
def test_compressed_projections_the_step_does_not_take_and_edited_codes():
    model = _compressed("mamba2")
    state = model(torch.tensor([[1, 2, 3]])).state
    tokens = torch.tensor([4])
    layer = model.backbone.layers[0].mixer.in_proj
    before = model.step(tokens, state).logits
    layer.codes[0, 0, 0] = (int(layer.codes[0, 0, 0]) + 1) % 16  # a buffer edited in place: the plan follows
    after = _step(model, tokens, state, True)
    assert not torch.allclose(after.logits, before)
    _assert_same(after, _step(model, tokens, state, False), TOL[torch.float32], "edited codes")
    layer.backend = "triton"  # the Triton kernels were asked for: that layer's block is left to them
    assert "backend 'triton'" in fused_layers(model)[0] and fused_layers(model)[1] is None
    layer.backend = "auto"
    assert fused_layers(model) == [None, None]
    wide = tiny_lm("mamba2", seed=2, d_model=128)  # an AQLM group past the compiled step's 64
    wide.backbone.layers[1].mixer.in_proj = _aqlm(wide.backbone.layers[1].mixer.in_proj, group=128)
    assert fused_layers(wide)[0] is None and "group size 128" in fused_layers(wide)[1]
    state = wide(torch.tensor([[1, 2, 3]])).state
    _assert_same(_step(wide, tokens, state, True), _step(wide, tokens, state, False), 2e-5, "one eager AQLM block")


@torch.no_grad()
def test_perturbation_hooks_and_backends_run_eagerly():
    model = _model("mamba2")
    state = model(torch.tensor([[1, 2, 3]])).state
    tokens = torch.tensor([4])
    plain = _step(model, tokens, state, True).logits
    mixers = [block.mixer for block in model.backbone.layers]
    for mixer in mixers:
        mixer._perturb = lambda site, t: t * 1.5 if site == "x" else t  # a DRµGS-like site hook
    assert all("DRµGS" in r for r in fused_layers(model))
    _eager_bitwise(model, tokens, state)
    assert not torch.allclose(_step(model, tokens, state, True).logits, plain)
    for mixer in mixers:
        del mixer._perturb
    handles = [m.out_proj.register_forward_hook(lambda m, args, out: out * 2) for m in mixers]
    assert all("hook" in r for r in fused_layers(model))
    _eager_bitwise(model, tokens, state)
    assert not torch.allclose(_step(model, tokens, state, True).logits, plain)
    handles.pop().remove()  # one layer left hooked: the other fuses, the hooked one still runs its hook
    assert fused_layers(model)[1] is None and "hook" in fused_layers(model)[0]
    _assert_same(_step(model, tokens, state, True), _step(model, tokens, state, False), 2e-5, "one hooked layer")
    handles.pop().remove()
    model.set_backend("chunked")
    assert all("backend" in r for r in fused_layers(model))
    _eager_bitwise(model, tokens, state)
    model.set_backend("auto")
    assert fused_layers(model) == [None, None]
    assert torch.equal(_step(model, tokens, state, True).logits, plain)


def test_drugs_decode_runs_eagerly():
    from seqlab.decoding.drugs import Drugs, apply_drugs

    model = _model("mamba1")
    gen = dict(temperature=0)
    with apply_drugs(model, Drugs(theta=0.6, sites=("residual", "x")), generator=torch.Generator().manual_seed(0)):
        assert all("DRµGS" in r for r in fused_layers(model))
        fused = model.generate([1, 2, 3], 6, **gen).tokens
    model.fused_step = False
    with apply_drugs(model, Drugs(theta=0.6, sites=("residual", "x")), generator=torch.Generator().manual_seed(0)):
        eager = model.generate([1, 2, 3], 6, **gen).tokens
    assert fused == eager
    assert fused_layers(model) == [None, None]  # the hooks are gone with the context


def test_parameters_requiring_grad_run_eagerly_when_autograd_is_on():
    model = _model("mamba1")
    state = model.init_state(2)
    tokens = torch.tensor([1, 2])
    out = model.step(tokens, state)  # autograd on, parameters require grad: the eager step, differentiable
    assert out.state.layers[0]["ssm"].requires_grad
    out.logits.sum().backward()
    assert model.backbone.layers[0].mixer.A_log.grad is not None
    with torch.no_grad():
        assert not model.step(tokens, state).state.layers[0]["ssm"].requires_grad
    model.requires_grad_(False)  # nothing to differentiate: the fused step runs with autograd on
    fused = model.step(tokens, state)
    eager = _step(model, tokens, state, False)
    _assert_same(fused, eager, 2e-5, "no grad needed")


@torch.no_grad()
def test_plan_follows_weight_changes():
    model = _model("mamba1")
    state = model(torch.tensor([[1, 2, 3]])).state
    tokens = torch.tensor([4])
    first = model.step(tokens, state).logits
    other = _model("mamba1")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.load_state_dict(other.state_dict())  # in place: the same storage, new values
    _assert_same(_step(model, tokens, state, True), _step(model, tokens, state, False), 2e-5, "after load")
    assert not torch.allclose(model.step(tokens, state).logits, first)
    model.backbone.layers[0].mixer.A_log.mul_(0.5)  # a derived parameter (A = -exp(A_log)) must follow too
    model.backbone.layers[1].norm.weight.data = torch.full_like(model.backbone.layers[1].norm.weight, 0.7)
    _assert_same(_step(model, tokens, state, True), _step(model, tokens, state, False), 2e-5, "after edits")
    model.double()  # new tensors in another dtype
    wide = state.to(dtype=torch.float64)
    wide.layers = [{**layer, "conv": layer["conv"].float()} for layer in wide.layers]
    _assert_same(_step(model, tokens, wide, True), _step(model, tokens, wide, False), 2e-6, "after double()")


@torch.no_grad()
def test_fused_step_leaves_a_cuda_free_path_and_switch():
    model = _model("mamba2")
    assert model.fused_step is True
    model.fused_step = False
    state = model.init_state(1)
    a = model.step(torch.tensor([3]), state)
    b = model.backbone.step(model.embeddings(torch.tensor([3])), state, fused=False)
    assert torch.equal(a.hidden, b[0])


@torch.no_grad()
def test_a_state_from_the_fused_step_is_rechecked_once_edited():
    """The next step skips the full state check only for a state the fused step returned and nobody changed:
    a wrong shape, dtype, layer, fingerprint or position put into it afterwards is refused with the full
    check's own error, and a later step (fused or eager) never changes a state returned earlier."""
    from seqlab.errors import StateError, StateMismatchError

    model = _model("mamba1")
    tokens = torch.tensor([1, 2, 3])
    first = model.step(tokens).state
    kept = [{k: t.clone() for k, t in layer.items()} for layer in first.layers]
    second = model.step(tokens, first).state
    model.step(tokens, second)
    _step(model, tokens, second, fused=False)
    for layer, copy in zip(first.layers, kept):
        for name, t in copy.items():
            assert torch.equal(layer[name], t), name  # bit for bit: the step wrote only new memory

    def refused(edit, error, match: str) -> None:
        state = model.step(tokens, first).state
        edit(state)
        with pytest.raises(error, match=match):
            model.step(tokens, state)
        model.fused_step = False
        try:  # the eager step (always fully checked) gives the same error
            with pytest.raises(error, match=match):
                model.step(tokens, state)
        finally:
            model.fused_step = True

    conv = first.layers[1]["conv"]
    refused(lambda s: s.layers[1].__setitem__("conv", conv[:, :-1]), StateMismatchError, r"layers\.1\.conv has shape")
    refused(lambda s: s.layers[0].__setitem__("ssm", s.layers[0]["ssm"].half()), StateMismatchError, "dtype")
    refused(lambda s: s.layers[0].pop("conv"), StateMismatchError, r"layers\.0 holds")
    refused(lambda s: s.layers.pop(), StateMismatchError, "layers")
    refused(lambda s: setattr(s, "fingerprint", "0" * 16), StateMismatchError, "fingerprint")
    refused(lambda s: setattr(s, "_position", -1), StateError, "position")
    with pytest.raises(StateMismatchError, match="batch"):
        model.step(torch.tensor([1, 2]), second)  # a batch of 2 for a state of 3 rows


def _trusted_state(model, batch: int, seed: int = 0):
    """A state the fused step returned (so the next step may take the whole-model call)."""
    gen = torch.Generator().manual_seed(seed)
    state = model(torch.randint(0, 32, (batch, 5), generator=gen)).state
    return model.step(torch.randint(0, 32, (batch,), generator=gen), state).state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
    "variant",
    [
        "mamba1",
        "mamba1-bias-noresfp32",
        "mamba2-groups",
        "mamba2-mlp",
        "mamba1-moe",
        "mamba3-outnorm",
        "attention-rope-moe",
    ],
)
@torch.no_grad()
def test_whole_model_step_is_one_call_and_equals_eager(variant, batch, dtype):
    """After the first fused step, LanguageModel.step runs embedding, blocks, final norm and head in one compiled
    call (fused_lm_step): logits, final hidden and states equal the eager step's, for a tied head and for an
    untied head with a bias."""
    from torch import nn

    from seqlab.fused_step import fused_lm_step

    for tied in (True, False):
        model = _model(variant, dtype)
        if not tied:  # an untied head with a bias
            model.lm_head = nn.Linear(model.config.d_model, 32, bias=True).to(dtype)
        state = _trusted_state(model, batch)
        gen = torch.Generator().manual_seed(batch)
        for k in range(3):
            tokens = torch.randint(0, 32, (batch,), generator=gen)
            assert fused_lm_step(model, tokens, state) is not None  # the one-call path is the one taken
            fused, eager = _step(model, tokens, state, True), _step(model, tokens, state, False)
            _assert_same(fused, eager, TOL[dtype], f"tied={tied} step {k}")
            assert fused.hidden.dtype == eager.hidden.dtype
            assert_rel(fused.hidden, eager.hidden, TOL[dtype], f"tied={tied} step {k} hidden")
            state = fused.state
        # ids as (b, 1) and in another integer dtype give the same step
        as_column = model.step(tokens[:, None], state)
        as_int32 = model.step(tokens.to(torch.int32), state)
        want = model.step(tokens, state)
        assert torch.equal(as_column.logits, want.logits)
        assert_rel(as_int32.logits, want.logits, TOL[dtype], "int32 ids")


@torch.no_grad()
def test_whole_model_step_follows_embedding_head_and_hooks():
    from torch import nn

    from seqlab.fused_step import fused_lm_step

    model = _model("mamba2")
    model.lm_head = nn.Linear(model.config.d_model, 32, bias=False)  # untied: the embedding edit below is its own
    state = _trusted_state(model, 2)
    tokens = torch.tensor([3, 9])
    before = model.step(tokens, state).logits
    model.embeddings.weight.mul_(1.5)  # in place: the plan sees the version change
    _assert_same(_step(model, tokens, state, True), _step(model, tokens, state, False), 2e-5, "edited embedding")
    assert not torch.allclose(model.step(tokens, state).logits, before)
    model.lm_head = nn.Linear(model.config.d_model, 32, bias=True)  # a new module
    _assert_same(_step(model, tokens, state, True), _step(model, tokens, state, False), 2e-5, "new head")
    model.backbone.norm_f.weight.data = torch.full_like(model.backbone.norm_f.weight, 0.5)  # new storage
    _assert_same(_step(model, tokens, state, True), _step(model, tokens, state, False), 2e-5, "new norm weight")
    calls = []
    for module in (model.embeddings, model.backbone.norm_f, model.lm_head):
        handle = module.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
        assert fused_lm_step(model, tokens, state) is None  # a hooked module is called as a module
        out = model.step(tokens, state)
        assert calls and calls[-1] == type(module).__name__  # the blocks still fuse, by the backbone's step
        _assert_same(_step(model, tokens, state, True), _step(model, tokens, state, False), 2e-5, "hooked")
        handle.remove()
        assert_rel(model.step(tokens, state).logits, out.logits, 2e-5, "hook removed")
    assert fused_lm_step(model, tokens, state) is not None

    class OwnHead(LanguageModel):
        def head(self, hidden):
            return super().head(hidden) * 2

    own = OwnHead(model.config, vocab_size=32)
    own.lm_head = nn.Linear(model.config.d_model, 32, bias=True)
    own.load_state_dict(model.state_dict())
    own_state = _trusted_state(own, 2)
    assert fused_lm_step(own, tokens, own_state) is None
    model_state = _trusted_state(model, 2)
    assert torch.allclose(own.step(tokens, own_state).logits, 2 * model.step(tokens, model_state).logits, atol=1e-5)


@torch.no_grad()
def test_whole_model_step_refuses_an_out_of_vocabulary_id_and_keeps_the_state():
    from seqlab.errors import InputError

    model = _model("mamba1")
    state = _trusted_state(model, 3)
    kept = state.clone()
    with pytest.raises(InputError, match=r"input_ids\[1\] = 32 is outside the vocabulary \[0, 32\)"):
        model.step(torch.tensor([1, 32, 2]), state)
    with pytest.raises(InputError, match=r"input_ids\[0\] = -1"):
        model.step(torch.tensor([-1, 3, 2]), state)
    for a, b in zip(state.layers, kept.layers):
        assert all(torch.equal(a[n], b[n]) for n in b)
    assert state.positions == kept.positions


@pytest.mark.parametrize("loop", ["one call per stop", "one step at a time"])
@pytest.mark.parametrize("ssm", ["mamba1", "mamba2", "mamba3"])
def test_generate_on_the_compiled_step_equals_the_eager_loop(ssm, loop, monkeypatch):
    """Plain greedy ``generate`` runs many steps per compiled call (fused_lm_greedy), returning after a step that
    fed a stop sequence's last token; with that call off it steps one token at a time, writing each new state into
    the memory of the state two steps back. Both give the eager loop's tokens and final states, rows that stop
    early keep their own states, the state passed in is untouched, and no returned state shares memory."""
    import seqlab.fused_step as fused_step_module
    import seqlab.generate as generate_module

    model = _model(ssm)
    with torch.no_grad():
        start = model(torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])).state
    kept = start.clone()
    prompts = [[3, 1], [4, 1], [5, 9]]
    # stops that end row 0 after 3 tokens and row 1 after 12-14 (on this machine's weights), row 2 runs on
    stop = {"mamba1": [[23, 19], [11]], "mamba2": [[10, 4], [21]], "mamba3": [[20, 0]]}[ssm]
    seen: list = []
    options: dict = dict(state=start, stop=stop)
    if loop == "one step at a time":
        monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: None)
        reusable = fused_step_module._reusable
        record = lambda spare, like: seen.append(reusable(spare, like)) or seen[-1]  # noqa: E731
        monkeypatch.setattr(fused_step_module, "_reusable", record)
    else:
        greedy = fused_step_module.fused_lm_greedy

        def counted(*args, **kwargs):
            run = greedy(*args, **kwargs)
            seen.append(run[0] if run else 0)
            return run

        monkeypatch.setattr(generate_module, "fused_lm_greedy", counted)
    fused = model.generate(prompts, 24, **options)
    if loop == "one step at a time":
        assert sum(x is True for x in seen) > 20  # the loop wrote into its old states (else: plain paths)
    else:
        assert max(x for x in seen if x) > 5  # compiled calls ran several steps each
    _assert_same_generations(fused, _generate_eagerly(model, prompts, 24, state=start, stop=stop))
    for a, b in zip(start.layers, kept.layers):
        assert all(torch.equal(a[n], b[n]) for n in b)
    pointers = [t.data_ptr() for s in fused.states for layer in s.layers for t in layer.values()]
    assert len(set(pointers)) == len(pointers)


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_hybrid_generate_with_ragged_prompts_equals_the_eager_loop(sampling, monkeypatch):
    """A hybrid decodes on the compiled step: plain greedy and plain sampling many steps per call (fused_lm_greedy:
    each step appends its key and value in place to buffers made for the call). Prompts of
    three lengths (rows left-padded in the cache, each with its own position), one row stopping early, give the
    eager loop's tokens and final states."""
    import seqlab.generate as generate_module
    import seqlab.models as models_module

    model = _hybrid()
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5]]
    options: dict = dict(do_sample=sampling == "sampled", temperature=1.0, seed=4)
    options["stop"] = [model.generate(prompts, 6, **options).tokens[1][3:6]]  # row 1 stops after 6 tokens
    calls: list = []
    for module in (models_module, generate_module):
        for name in ("fused_lm_step", "fused_lm_greedy"):
            if hasattr(module, name):
                one_call = getattr(module, name)
                counted = lambda *a, one_call=one_call, **k: calls.append(one_call(*a, **k)) or calls[-1]  # noqa: E731
                monkeypatch.setattr(module, name, counted)
    fused = model.generate(prompts, 14, **options)
    assert fused.stop_reasons[1] == "stop"
    assert max(run[0] for run in calls if isinstance(run, tuple) and len(run) == 5) >= 5  # several steps a call
    _assert_same_generations(fused, _generate_eagerly(model, prompts, 14, **options))


@pytest.mark.parametrize("variant", ["hybrid", "attention-gqa-window-mlp"])
def test_sampling_appends_the_kv_cache_in_place(variant, monkeypatch):
    """generate's step-by-step loop (sampling with the many-steps call off) appends each step's key and value in
    place in a KVRoom's buffers
    (a state continuing the one the room handed out), so 150 tokens copy each cache into new buffers a few times
    (when they fill: 64 spare slots at these sizes), not 150 times; tokens and final
    states equal the eager loop's, and the states it returns hold their own memory."""
    import seqlab.generate as generate_module
    from seqlab.fused_step import KVRoom

    model = _hybrid() if variant == "hybrid" else _model(variant)
    rooms: list = []
    monkeypatch.setattr(generate_module, "KVRoom", lambda: rooms.append(KVRoom()) or rooms[-1])
    many = generate_module.fused_lm_greedy
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: None)  # the step-by-step loop
    options = dict(do_sample=True, temperature=1.0, seed=3)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9]]
    fused = model.generate(prompts, 150, **options)
    monkeypatch.setattr(generate_module, "fused_lm_greedy", many)
    attention = sum("seen" in layer for layer in fused.states[0].layers)
    assert 2 * attention <= rooms[0].copies <= 4 * attention, rooms[0].copies
    _assert_same_generations(fused, _generate_eagerly(model, prompts, 150, **options))
    held = [t.untyped_storage().data_ptr() for st in fused.states for layer in st.layers for t in layer.values()]
    buffers = {t.untyped_storage().data_ptr() for entry in rooms[0].layers.values() for t in entry[:2]}
    assert len(set(held)) == len(held) and not buffers & set(held)


def test_windowed_attention_greedy_runs_a_few_windows_per_call(monkeypatch):
    """A sliding-window layer's greedy buffers hold window + steps slots, so a call runs at most
    max(4 windows, 64) steps; generate calls again for the rest. 80 tokens: calls of 64 and 16 steps, the eager
    loop's tokens and final state (the cache cut to the window)."""
    import seqlab.generate as generate_module

    model = _model("attention-gqa-window-mlp")
    greedy = generate_module.fused_lm_greedy
    runs: list = []
    monkeypatch.setattr(generate_module, "fused_lm_greedy", lambda *a, **k: runs.append(greedy(*a, **k)) or runs[-1])
    fused = model.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 80)
    assert [run[0] for run in runs if run is not None] == [64, 15]  # the first token comes from the prefill
    _assert_same_generations(fused, _generate_eagerly(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], 80))


@torch.no_grad()
def test_fused_greedy_equals_step_by_step_argmax():
    """fused_lm_greedy against model.step + argmax one token at a time: the same tokens, the same final state to
    rounding, an early return right after a step that fed a watched token, the state passed in untouched. With
    attention: the KV cache grows a slot per step inside the call (without a window; from 6 slots up to a window of
    10, then held there) and comes back at its eager shape, after all 12 steps and after an early return."""
    from seqlab.fused_step import fused_lm_greedy

    for ssm in ("mamba1", "mamba2", "attention-rope-moe", "attention-gqa-window-mlp"):
        model = _model(ssm, torch.float64, **({"attn_window": 10} if "window" in ssm else {}))
        state = _trusted_state(model, 2)
        kept = state.clone()
        first = torch.tensor([4, 9])
        steps, tokens, new_state, logits, hidden = fused_lm_greedy(model, first, state, 12)
        assert steps == 12 and new_state.position == state.position + 12
        s, ids, want = state, first, []
        model.fused_step = False
        try:
            for _ in range(12):
                out = model.step(ids, s)
                s, ids = out.state, out.logits.float().argmax(-1)
                want.append(ids.tolist())
        finally:
            model.fused_step = True
        assert tokens.tolist() == want
        assert_rel(logits, out.logits, 2e-6, f"{ssm} last logits")
        assert_rel(hidden, out.hidden, 2e-6, f"{ssm} last hidden")
        for a, b in zip(new_state.layers, s.layers):
            for name in b:
                assert a[name].shape == b[name].shape and a[name].is_contiguous()
                assert_rel(a[name], b[name], 2e-6, f"{ssm} state {name}")
        for a, b in zip(state.layers, kept.layers):
            assert all(torch.equal(a[n], b[n]) for n in b)
        watched = want[4][1]  # row 1 feeds this at step 5 (after 4 argmax tokens): the call returns there
        early = fused_lm_greedy(model, first, state, 12, watch=[watched])
        fed = [first.tolist()] + want
        expect = next(k for k in range(12) if watched in fed[k]) + 1
        assert early[0] == expect and early[1].tolist() == want[:expect]
        s = state
        model.fused_step = False
        try:
            for ids in fed[:expect]:
                s = model.step(torch.tensor(ids), s).state
        finally:
            model.fused_step = True
        for a, b in zip(early[2].layers, s.layers):
            for name in b:
                assert a[name].shape == b[name].shape
                assert_rel(a[name], b[name], 2e-6, f"{ssm} early state {name}")
        with pytest.raises(ValueError, match="max_steps"):
            fused_lm_greedy(model, first, state, 0)
        assert fused_lm_greedy(model, torch.tensor([4, 99]), state, 3) is None  # the usual step names the bad id
    # ties: torch's argmax takes the first maximum; a head of zeros ties every logit, so every token is 0
    from torch import nn

    model = _model("mamba1")
    model.lm_head = nn.Linear(model.config.d_model, 32, bias=False)
    nn.init.zeros_(model.lm_head.weight)
    state = _trusted_state(model, 2)
    assert fused_lm_greedy(model, torch.tensor([4, 9]), state, 5)[1].tolist() == [[0, 0]] * 5


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2", "mamba2-moe-top2", "mamba3-mimo", "attention-gqa-window-mlp"])
@torch.no_grad()
def test_a_row_decodes_the_same_alone_or_in_a_batch(ssm):
    """The compiled step computes each row on its own (the projections' sums run in a fixed order whatever the
    batch, seqlab_gemm.h): two steps from a zero state (the first through the fused blocks, the second the
    whole-model call) give a row in a batch of 5 exactly, bit for bit, what the row gets alone."""
    from seqlab.fused_step import fused_lm_step

    model = _model(ssm)
    gen = torch.Generator().manual_seed(11)
    first, second = torch.randint(0, 32, (5,), generator=gen), torch.randint(0, 32, (5,), generator=gen)
    batch_state = model.step(first, model.init_state(5)).state
    assert fused_lm_step(model, second, batch_state) is not None
    batch = model.step(second, batch_state)
    for i in range(5):
        alone_state = model.step(first[i : i + 1], model.init_state(1)).state
        alone = model.step(second[i : i + 1], alone_state)
        assert torch.equal(alone.logits[0], batch.logits[i]), f"row {i} logits"
        assert torch.equal(alone.hidden[0], batch.hidden[i]), f"row {i} hidden"
        for a, b in zip(alone.state.layers, batch.state.layers):
            assert all(torch.equal(a[n][0], b[n][i]) for n in b), f"row {i} state"


# bfloat16: a bfloat16 model steps in float32, its dense weights read as bfloat16 (step.c st_proj kind 3), every
# other parameter converted once. Its twin is the same model converted to float32, whose compiled step the tests
# above hold to the eager float32 / float64 steps: the bfloat16 step must give exactly that step's results, rounded
# to bfloat16 where the eager bfloat16 step returns bfloat16 (hidden states, logits; the states are float32).

BF16_VARIANTS = [
    "mamba1",
    "mamba1-bias-noresfp32",
    "mamba2-groups",
    "mamba2-mlp",
    "mamba1-moe",
    "mamba2-moe-top2",
    "mamba3-mlp",
    "mamba3-mimo",
    "mamba3-outnorm",
    "attention-gqa-window-mlp",
    "attention-rope-moe",
]


def _bf16_pair(variant: str):
    """(the variant in bfloat16, its float32 copy); "compressed-mamba1/2": LASER and AQLM projections too;
    "+fp32-ssm": A_log, D and the dt bias kept in float32, as Mamba checkpoints often keep them; "+fp32-down": an
    MoE's stacked down experts in float32 beside bfloat16 gate_up (then both are taken in float32)."""
    import copy

    name, _, extra = variant.partition("+")
    if name.startswith("compressed-"):
        model = _compressed(name.removeprefix("compressed-"), torch.bfloat16)
    else:
        model = _model(name, torch.bfloat16)
    if extra == "fp32-ssm":
        for block in model.backbone.layers:
            for attr in ("A_log", "D", "dt_bias"):
                p = getattr(block.mixer, attr, None)
                if p is not None:
                    p.data = p.data.float()
    if extra == "fp32-down":
        for block in model.backbone.layers:
            block.ffn.down.data = block.ffn.down.data.float()
    return model, copy.deepcopy(model).float()


def _rounded(got: torch.Tensor, twin: torch.Tensor) -> bool:
    return got.dtype == torch.bfloat16 and torch.equal(got, twin.to(torch.bfloat16))


def _same_layers(a, b) -> bool:
    return all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in y) for x, y in zip(a, b))


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize(
    "variant",
    [
        *BF16_VARIANTS,
        "compressed-mamba1",
        "compressed-mamba2",
        "compressed-mamba3",
        "compressed-attention",
        "mamba2-mlp+fp32-ssm",
        "mamba1+fp32-ssm",
        "mamba2-moe-top2+fp32-down",
    ],
)
@torch.no_grad()
def test_bfloat16_step_is_its_float32_twins_step_bit_for_bit(variant, batch):
    """The fused blocks, the whole-model call and the greedy loop of a bfloat16 model give exactly what its float32
    copy's compiled step gives: hidden states and logits rounded to bfloat16, float32 states bit for bit."""
    from seqlab.fused_step import fused_lm_greedy, fused_lm_step, fused_step

    model, twin = _bf16_pair(variant)
    assert fused_layers(model) == [None, None]
    gen = torch.Generator().manual_seed(batch)
    state = model(torch.randint(0, 32, (batch, 6), generator=gen)).state  # the eager bfloat16 prefill
    assert all(t.dtype in (torch.float32, torch.int64) for layer in state.layers for t in layer.values())
    hidden = torch.randn(batch, model.config.d_model, generator=gen).to(torch.bfloat16)
    got, got_layers = fused_step(model.backbone, hidden, state)
    want, want_layers = fused_step(twin.backbone, hidden.float(), state)
    assert _rounded(got, want) and _same_layers(got_layers, want_layers)
    # the first step after the prefill (fused blocks; embedding, final norm and head eager) gives a state both
    # models trust; then the whole-model call, three times
    tokens = torch.randint(0, 32, (batch,), generator=gen)
    mine, theirs = model.step(tokens, state).state, twin.step(tokens, state).state
    assert _same_layers(mine.layers, theirs.layers)
    for k in range(3):
        tokens = torch.randint(0, 32, (batch,), generator=gen)
        a, b = fused_lm_step(model, tokens, mine), fused_lm_step(twin, tokens, theirs)
        assert a is not None and b is not None, "the whole-model call did not apply"
        assert _rounded(a[0], b[0]) and _rounded(a[2], b[2]), f"step {k}: logits or hidden"
        assert _same_layers(a[1].layers, b[1].layers), f"step {k}: states"
        mine, theirs = a[1], b[1]
    # greedy, 20 steps in one call: step by step, the argmax of the bfloat16 logits each step returns (ties as the
    # eager bfloat16 step's argmax sees them; the twin argmaxes unrounded float32 logits, so it is not the twin here)
    steps, greedy_tokens, greedy_state, logits, _ = fused_lm_greedy(model, tokens, mine, 20)
    assert steps == 20 and logits.dtype == torch.bfloat16
    for k in range(20):
        logits_k, mine, _ = fused_lm_step(model, tokens, mine)
        tokens = logits_k.float().argmax(-1)
        assert torch.equal(greedy_tokens[k], tokens), f"greedy step {k}"
    assert _same_layers(greedy_state.layers, mine.layers) and torch.equal(logits, logits_k)


@pytest.mark.parametrize("variant", BF16_VARIANTS)
@torch.no_grad()
def test_bfloat16_steps_follow_the_float64_forward_closer_than_the_eager_bfloat16_steps(variant):
    """Step == forward in bfloat16: 12 steps from the zero state (the first through the fused blocks, the rest the
    whole-model call) against the float64 forward of the same weights over the same tokens: every step's logits
    within 8e-3 (a few bfloat16 roundings of the logits: the step computes in float32), and on average closer than
    the eager bfloat16 steps, which round every op (measured: 1.2e-3 to 5.2e-3 against 3e-3 to 3.5e-2). The states
    have the eager step's dtypes, so either continues the other's."""
    import copy

    model = _model(variant, torch.bfloat16)
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, 32, (3, 12), generator=torch.Generator().manual_seed(7))
    want = reference(ids).logits
    fused_state = eager_state = model.init_state(3)
    fused_err, eager_err = [], []
    for t in range(ids.shape[1]):
        fused = _step(model, ids[:, t], fused_state, True)
        eager = _step(model, ids[:, t], eager_state, False)
        assert fused.logits.dtype == eager.logits.dtype == torch.bfloat16
        for name, layer in enumerate(fused.state.layers):
            assert {k: v.dtype for k, v in layer.items()} == {k: v.dtype for k, v in eager.state.layers[name].items()}
        fused_err.append(rel_err(fused.logits, want[:, t]))
        eager_err.append(rel_err(eager.logits, want[:, t]))
        fused_state, eager_state = fused.state, eager.state
    assert max(fused_err) <= 8e-3, fused_err
    assert sum(fused_err) < sum(eager_err), (fused_err, eager_err)
    # a fused state continues eagerly and an eager one fused (same dtypes and layout); an MoE's top-k may pick
    # another expert for a row whose router logits are close, so its values are compared above only
    tokens = ids[:, 0]
    assert _step(model, tokens, fused_state, False).logits.dtype == torch.bfloat16
    continued = _step(model, tokens, eager_state, True).logits
    if "moe" not in variant:
        assert_rel(continued, reference.step(tokens, eager_state).logits, 8e-3, "an eager state continued fused")


@torch.no_grad()
def test_bfloat16_hybrid_fuses_whole_and_float16_does_not():
    """A bfloat16 hybrid (Mamba-1, attention, Mamba-2, Mamba-1) fuses every block (the attention's KV cache is
    float32 in the eager step too); float16 is not fused at all, and says so. The hybrid's steps stay close to its
    float64 forward, whole-model calls included, and its greedy generate equals its step-by-step argmax."""
    import copy

    from seqlab.fused_step import fused_lm_step

    model = _hybrid(torch.bfloat16)
    assert fused_layers(model) == [None] * 4
    assert "float16" in fused_layers(_model("mamba1", torch.float16))[0]
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(3))
    want = reference(ids).logits
    state = model.init_state(2)
    for t in range(ids.shape[1]):
        if t > 1:
            assert fused_lm_step(model, ids[:, t], state) is not None
        out = model.step(ids[:, t], state)
        assert_rel(out.logits, want[:, t], 8e-3, f"hybrid step {t}")
        state = out.state
    prompt = [3, 1, 4, 1, 5]
    greedy = model.generate(prompt, 12, temperature=0).tokens[0]
    step = model(torch.tensor([prompt]))
    state, token = step.state, int(step.logits[0, -1].float().argmax())
    tokens = [token]
    for _ in range(11):
        step = model.step(torch.tensor([token]), state)
        state, token = step.state, int(step.logits[0].float().argmax())
        tokens.append(token)
    assert list(greedy) == tokens
