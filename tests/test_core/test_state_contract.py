"""The four invariants of the state contract (docs/architecture.md), for both mixers, a hybrid stack, an MoE
stack (top-2 routing: drop-free and token-local at evaluation, so chunking cannot change what a token gets), a
Mamba + attention hybrid (grouped-query heads, KV cache in the state) and a sliding-window attention stack
(window 5, shorter than most inputs: the cache stays bounded and old tokens must drop out exactly), and Mamba-3
(SISO; MIMO with the gated norm; a Mamba-1 + Mamba-3 + Mamba-2 stack)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab import RecurrentState
from seqlab.errors import StateMismatchError
from seqlab.testing import rel_err, run_chunked, tiny_hybrid_options, tiny_lm, tiny_moe_options

SSMS = ["mamba1", "mamba2"]
HYBRID = dict(
    ssm="mamba1",
    n_layer=3,
    ffn="mlp",
    d_ffn=24,
    layer_overrides={1: {"mixer": "mamba2", "options": {"headdim": 8, "d_state": 4, "chunk_size": 4}}},
)


def assert_states_close(a: RecurrentState, b: RecurrentState, tol: float) -> None:
    assert a.position == b.position
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert rel_err(ta[key], tb[key]) <= tol, key


MOE = tiny_moe_options()
ATTN_HYBRID = tiny_hybrid_options()
WINDOW = dict(ssm="attention", n_layer=2, ffn="mlp", d_ffn=24, attn_heads=2, attn_window=5, attn_bias=True)
# Mamba-3: SISO; MIMO (rank 2) with the gated out-proj norm and a full rotary state; Mamba-1 + Mamba-3 + Mamba-2
MAMBA3 = dict(ssm="mamba3", headdim=8, chunk_size=8)
MAMBA3_MIMO = dict(MAMBA3, mamba3_mimo_rank=2, mamba3_outproj_norm=True, mamba3_rope_fraction=1.0)
HYBRID3 = dict(
    ssm="mamba1",
    n_layer=3,
    layer_overrides={
        1: {"mixer": "mamba3", "options": {"headdim": 8, "d_state": 6, "chunk_size": 8}},
        2: {"mixer": "mamba2", "options": {"headdim": 8, "d_state": 4, "chunk_size": 4}},
    },
)
STACKS = {
    "hybrid": HYBRID,
    "moe": MOE,
    "attn_hybrid": ATTN_HYBRID,
    "window": WINDOW,
    "mamba3": MAMBA3,
    "mamba3_mimo": MAMBA3_MIMO,
    "hybrid3": HYBRID3,
}
ATTN = ["attn_hybrid", "window"]
M3 = ["mamba3", "mamba3_mimo", "hybrid3"]


def model_for(kind: str, seed: int = 0):
    return tiny_lm(**STACKS[kind], seed=seed) if kind in STACKS else tiny_lm(kind, seed=seed)


@pytest.mark.parametrize("kind", SSMS + ["hybrid", "moe"] + ATTN)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_chunking_equals_one_pass(kind, data):
    check_any_chunking(kind, data)


@pytest.mark.parametrize("kind", M3)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_chunking_equals_one_pass_mamba3(kind, data):
    check_any_chunking(kind, data)


def check_any_chunking(kind, data):
    model = model_for(kind)
    batch = data.draw(st.integers(1, 2), label="batch")
    length = data.draw(st.integers(1, 70), label="length")
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, length - 1)), max_size=5), label="cuts"))
    ids = torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        whole = model(ids)
        pieces, state = run_chunked(model, ids, cuts)
    assert rel_err(pieces, whole.logits) <= 1e-5
    assert_states_close(state, whole.state, 1e-5)
    assert state.position == length


@pytest.mark.parametrize("kind", SSMS + ["hybrid", "moe"] + ATTN + M3)
def test_step_equals_forward(kind):
    model = model_for(kind, seed=1)
    ids = torch.randint(0, 32, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(ids)
        prefix = model(ids[:, :5])  # steps may also start from a prefilled state
        state, logits = prefix.state, [prefix.logits]
        for t in range(5, ids.shape[1]):
            out = model.step(ids[:, t], state)
            logits.append(out.logits[:, None])
            state = out.state
    assert rel_err(torch.cat(logits, 1), whole.logits) <= 1e-5
    assert_states_close(state, whole.state, 1e-5)


def test_step_from_no_state_equals_forward_of_one_token():
    model = model_for("mamba2")
    ids = torch.tensor([[3], [7]])
    with torch.no_grad():
        a = model.step(ids)
        b = model(ids)
    assert rel_err(a.logits, b.logits[:, 0]) <= 1e-5


@pytest.mark.parametrize("kind", SSMS + ["moe"] + ATTN + M3)
def test_save_load_continue_is_bit_exact(kind, tmp_path):
    model = model_for(kind, seed=2)
    ids = torch.randint(0, 32, (2, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = model(ids[:, :23])
        reference = model(ids[:, 23:], first.state)
        first.state.save(tmp_path / "s.safetensors")
        loaded = RecurrentState.load(tmp_path / "s.safetensors", model)
        resumed = model(ids[:, 23:], loaded)
    assert loaded.position == 23 and loaded.batch_size == 2
    for key, tensor in first.state.tensors().items():
        assert torch.equal(loaded.tensors()[key], tensor), key
    assert torch.equal(resumed.logits, reference.logits)
    for key, tensor in reference.state.tensors().items():
        assert torch.equal(resumed.state.tensors()[key], tensor), key


def test_state_of_another_config_is_refused(tmp_path):
    small = model_for("mamba1")
    other = tiny_lm("mamba1", d_state=4)
    with torch.no_grad():
        state = small(torch.zeros(1, 4, dtype=torch.long)).state
    with pytest.raises(StateMismatchError, match="fingerprint"):
        other(torch.zeros(1, 4, dtype=torch.long), state)
    state.save(tmp_path / "s.safetensors")
    with pytest.raises(StateMismatchError, match="fingerprint"):
        RecurrentState.load(tmp_path / "s.safetensors", other)


def test_mamba3_state_of_another_mamba3_config_is_refused(tmp_path):
    # SISO and MIMO states differ in k's rank dim; a different A floor keeps every shape but changes the meaning
    siso = model_for("mamba3")
    with torch.no_grad():
        state = siso(torch.zeros(1, 4, dtype=torch.long)).state
    state.save(tmp_path / "s.safetensors")
    for other in (model_for("mamba3_mimo"), tiny_lm(**MAMBA3, mamba3_A_floor=0.01)):
        assert other.fingerprint != siso.fingerprint
        with pytest.raises(StateMismatchError, match="fingerprint"):
            other(torch.zeros(1, 4, dtype=torch.long), state)
        with pytest.raises(StateMismatchError, match="fingerprint"):
            RecurrentState.load(tmp_path / "s.safetensors", other)


def test_same_config_different_weights_share_fingerprint():
    # The fingerprint names the architecture, so a fine-tuned copy can continue a state.
    assert model_for("mamba1", seed=0).fingerprint == model_for("mamba1", seed=5).fingerprint


@pytest.mark.parametrize("kind", SSMS + ["moe"] + ATTN + M3)
def test_prefill_on_existing_state_any_length(kind):
    # Exact prefill of many new tokens on an existing state (mamba_ssm/HF cannot for Mamba-1).
    model = model_for(kind, seed=3)
    ids = torch.randint(0, 32, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = model(ids)
        state = model(ids[:, :1]).state
        rest = model(ids[:, 1:], state)
    assert rel_err(rest.logits, whole.logits[:, 1:]) <= 1e-5


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_random_configs_stream_and_step_exactly(data):
    """Invariants 1 and 2 over random shapes of both mixers, not just the fixed tiny configs."""
    ssm = data.draw(st.sampled_from(SSMS), label="ssm")
    d_conv = data.draw(st.integers(1, 4), label="d_conv")
    expand = data.draw(st.integers(1, 2), label="expand")
    d_state = data.draw(st.integers(1, 8), label="d_state")
    kw = dict(d_conv=d_conv, expand=expand, d_state=d_state, n_layer=data.draw(st.integers(1, 2), label="n_layer"))
    if ssm == "mamba1":
        kw["dt_rank"] = data.draw(st.integers(1, 4), label="dt_rank")
    else:
        kw["headdim"] = data.draw(st.sampled_from([2, 4, 8]), label="headdim")
        heads = 16 * expand // kw["headdim"]
        kw["ngroups"] = data.draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]), label="ngroups")
        kw["chunk_size"] = data.draw(st.integers(1, 12), label="chunk_size")
    model = tiny_lm(ssm, seed=data.draw(st.integers(0, 3), label="seed"), **kw)
    length = data.draw(st.integers(1, 40), label="length")
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, length - 1)), max_size=4), label="cuts"))
    ids = torch.randint(0, 32, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        whole = model(ids)
        pieces, state = run_chunked(model, ids, cuts)
        stepped = model(ids[:, :1]).state
        for t in range(1, length):
            stepped = model.step(ids[:, t], stepped).state
    assert rel_err(pieces, whole.logits) <= 1e-5
    assert_states_close(state, whole.state, 1e-5)
    assert_states_close(stepped, whole.state, 1e-5)
