"""Model behaviour: fast path vs float64 reference (outputs and gradients), bidirectional mode, hybrids."""

import copy

import pytest
import torch

from seqlab import LanguageModel, SequenceModel
from seqlab.errors import StateError
from seqlab.testing import rel_err, tiny_config, tiny_lm


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_fast_path_matches_float64_reference_outputs_and_grads(ssm):
    fast = tiny_lm(ssm, seed=7).train()
    ref = copy.deepcopy(fast).double().set_backend("ref")
    ids = torch.randint(0, 32, (2, 41), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 32, (2, 41), generator=torch.Generator().manual_seed(1))

    def loss_of(model):
        out = model(ids)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        # Reach the final state too, so its gradient path is checked.
        return loss + sum(t.sum() for t in out.state.tensors().values()) * 1e-3, out

    loss_fast, out_fast = loss_of(fast)
    loss_ref, out_ref = loss_of(ref)
    assert rel_err(out_fast.logits, out_ref.logits) <= 1e-5
    for key, tensor in out_ref.state.tensors().items():
        assert rel_err(out_fast.state.tensors()[key], tensor) <= 1e-5, key
    loss_fast.backward()
    loss_ref.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, ref_params[name].grad) <= 1e-4, name


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_gradient_reaches_the_initial_state(ssm):
    model = tiny_lm(ssm, seed=8)
    ids = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(0))
    state = model(ids[:, :6]).state.detach()
    for t in state.tensors().values():
        t.requires_grad_(True)
    model(ids[:, 6:], state).logits.square().sum().backward()
    for key, t in state.tensors().items():
        assert t.grad is not None and t.grad.abs().sum() > 0, key


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_bidirectional_sees_the_future_and_causal_does_not(ssm):
    ids = torch.randint(0, 32, (1, 20), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 32
    causal = tiny_lm(ssm, seed=1)
    bidir = tiny_lm(ssm, seed=1, bidirectional=True)
    with torch.no_grad():
        assert torch.equal(causal(ids).logits[:, :-1], causal(changed).logits[:, :-1])
        assert not torch.allclose(bidir(ids).logits[:, 0], bidir(changed).logits[:, 0])
        out = bidir(ids)
    assert out.state is None


def test_bidirectional_reverse_branch_is_a_reversed_scan():
    # mean-combined bidirectional block == (fwd(x) + flip(rev(flip(x)))) / 2, checked through one block.
    model = tiny_lm("mamba1", seed=2, bidirectional=True, bidirectional_combine="mean", n_layer=1)
    block = model.backbone.layers[0]
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        h = block.norm(x)
        want = x + (block.mixer(h, None, False)[0] + block.mixer_rev(h.flip(1), None, False)[0].flip(1)) / 2
        got, _ = block(x)
    assert rel_err(got, want) <= 1e-6


def test_bidirectional_refuses_to_stream():
    model = tiny_lm("mamba2", bidirectional=True)
    causal_state = tiny_lm("mamba2").init_state(1)
    with pytest.raises(StateError, match="bidirectional"):
        model.init_state(1)
    with pytest.raises(StateError, match="bidirectional"):
        model(torch.zeros(1, 3, dtype=torch.long), causal_state)
    with pytest.raises(StateError, match="bidirectional"):
        model.step(torch.zeros(1, dtype=torch.long))


def test_hybrid_layers_follow_overrides():
    cfg = tiny_config(
        "mamba1",
        n_layer=3,
        ffn="mlp",
        layer_overrides={1: {"mixer": "mamba2", "ffn": "none", "options": {"headdim": 8}}},
    )
    model = LanguageModel(cfg, vocab_size=32)
    kinds = [type(layer.mixer).__name__ for layer in model.backbone.layers]
    assert kinds == ["Mamba1Mixer", "Mamba2Mixer", "Mamba1Mixer"]
    assert [layer.ffn is not None for layer in model.backbone.layers] == [True, False, True]
    state = model.init_state(2)
    assert state.layers[1]["ssm"].shape == (2, 4, 8, 8)  # (b, heads, headdim, d_state)


def test_sequence_model_continuous_inputs_stream_exactly():
    torch.manual_seed(0)
    model = SequenceModel(tiny_config("mamba2"), d_input=5, d_output=3).eval()
    x = torch.randn(2, 30, 5)
    with torch.no_grad():
        whole = model(x)
        a = model(x[:, :11])
        b = model(x[:, 11:], a.state)
        s = model.step(x[:, 11], a.state)
    assert whole.output.shape == (2, 30, 3)
    assert rel_err(torch.cat([a.output, b.output], 1), whole.output) <= 1e-5
    assert rel_err(s.output, whole.output[:, 11]) <= 1e-5
    features = SequenceModel(tiny_config("mamba1"), d_input=5)(x).output
    assert features.shape == (2, 30, 16)


def test_tied_and_untied_heads():
    tied = tiny_lm("mamba1")
    assert tied.lm_head.weight is tied.embeddings.weight
    untied = LanguageModel(tiny_config("mamba1"), vocab_size=32, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embeddings.weight


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_blockwise_inference_equals_one_pass(ssm):
    model = tiny_lm(ssm, seed=4)
    ids = torch.randint(0, 32, (2, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.inference_block = None
        whole = model(ids)
        model.inference_block = 7
        blocked = model(ids)
        no_state = model(ids, return_state=False)
    assert rel_err(blocked.logits, whole.logits) <= 1e-5
    assert rel_err(blocked.hidden, whole.hidden) <= 1e-5
    for key, tensor in whole.state.tensors().items():
        assert rel_err(blocked.state.tensors()[key], tensor) <= 1e-5, key
    assert blocked.state.position == 45 and no_state.state is None


@pytest.mark.parametrize("model_kind", ["language", "sequence"])
@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_model_output_unpacks_as_output_and_state(model_kind, ssm):
    """``out, state = model(x, state)``, the README's contract, for both models; a state continued by unpacking
    equals the one-pass result; the attributes stay."""
    torch.manual_seed(3)
    if model_kind == "language":
        model = tiny_lm(ssm, seed=3)
        x = torch.randint(0, 32, (2, 23), generator=torch.Generator().manual_seed(5))
    else:
        model = SequenceModel(tiny_config(ssm), d_input=5, d_output=3).eval()
        x = torch.randn(2, 23, 5)
    with torch.no_grad():
        whole = model(x)
        first, state = model(x[:, :9])
        rest, state = model(x[:, 9:], state)
        step_out, step_state = model.step(x[:, 0], None)
    assert len(whole) == 2 and whole[0] is whole.output and whole[1] is whole.state and whole[-1] is whole.state
    assert list(whole) == [whole.output, whole.state] and whole.hidden.shape[:2] == (2, 23)
    with pytest.raises(IndexError):
        whole[2]
    assert rel_err(torch.cat([first, rest], 1), whole.output) <= 1e-5
    assert state.position == 23 == whole.state.position
    for key, tensor in whole.state.tensors().items():
        assert rel_err(state.tensors()[key], tensor) <= 1e-5, key
    assert rel_err(step_out, whole.output[:, 0]) <= 1e-5 and step_state.position == 1
    output, none = model(x, return_state=False)
    assert none is None and rel_err(output, whole.output) <= 1e-5
