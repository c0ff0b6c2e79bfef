"""The attention mixer against its reference twin, and attention layers in hybrid stacks.

The twin is attention written from its definition in float64: explicit score matrices per query head, the
rotary embedding as an explicit rotation matrix per position (pairs (i, i + rope_dim / 2) of the first rope_dim
dims, Llama/NeoX's half-split layout), query head h reading key/value head h // (heads / kv_heads), and the
window as an explicit mask (a query sees itself and the window - 1 tokens before it). The rotary frequencies
come from the definitions (theta^(-2i/d); linear: divided by factor; llama3: Llama 3.1's three bands, the same
formula as HF transformers' ``_compute_llama3_parameters``).

Then: a window keeps the state bounded; select/stack on hybrid states; generation on hybrids (ragged prompts,
stop sequences, continuing after generation); save/load; malformed KV caches refused with clear messages; a
bf16 model; the attn_* config errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqlab import RecurrentState
from seqlab.config import AttentionSettings, BackboneConfig
from seqlab.errors import ConfigError, CorruptFileError, StateMismatchError
from seqlab.generate import generate
from seqlab.mixers.attention import AttentionMixer, rope_inverse_frequencies
from seqlab.testing import rel_err, tiny_hybrid_options, tiny_lm

# --------------------------------------------------------------------------------------------------------------
# the reference twin


def definition_frequencies(s: AttentionSettings) -> list[float]:
    """The rotary inverse frequencies from their definition, one Python float at a time."""
    out = []
    for i in range(s.rope_dim // 2):
        f = s.rope_theta ** (-2 * i / s.rope_dim)
        scaling = s.rope_scaling
        if scaling is not None and scaling["rope_type"] == "linear":
            f = f / scaling["factor"]
        elif scaling is not None:  # llama3: by wavelength against the original context
            factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            original = scaling["original_max_position_embeddings"]
            wavelength = 2 * math.pi / f
            if wavelength < original / high:  # high frequency: kept
                pass
            elif wavelength > original / low:  # low frequency: interpolated by factor
                f = f / factor
            else:  # between: a smooth blend of the two
                smooth = (original / wavelength - low) / (high - low)
                f = (1 - smooth) * f / factor + smooth * f
        out.append(f)
    return out


def rotation(position: int, freqs: list[float], head_dim: int) -> torch.Tensor:
    """The (head_dim, head_dim) rotary matrix of one position: a 2-D rotation of each pair (i, i + half)."""
    r = torch.eye(head_dim, dtype=torch.float64)
    half = len(freqs)
    for i, f in enumerate(freqs):
        c, s = math.cos(position * f), math.sin(position * f)
        r[i, i], r[i, i + half] = c, -s
        r[i + half, i], r[i + half, i + half] = s, c
    return r


def naive_attention(mixer: AttentionMixer, x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The mixer's output for x (b, l, d_model) at absolute positions start, start + 1, ... (no earlier tokens),
    from the definition, in the dtype of x (use float64), differentiable in x and the mixer's parameters."""
    s = mixer.settings
    b, length, _ = x.shape

    def linear(layer, h):
        return h @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    q = linear(mixer.q_proj, x).view(b, length, s.heads, s.head_dim)
    k = linear(mixer.k_proj, x).view(b, length, s.kv_heads, s.head_dim)
    v = linear(mixer.v_proj, x).view(b, length, s.kv_heads, s.head_dim)
    freqs = definition_frequencies(s)
    rot = torch.stack([rotation(start + t, freqs, s.head_dim) for t in range(length)]).to(x.dtype)
    q = torch.einsum("tij,bthj->bthi", rot, q)
    k = torch.einsum("tij,bthj->bthi", rot, k)
    allowed = torch.tensor(
        [[j <= t and (s.window is None or t - j < s.window) for j in range(length)] for t in range(length)]
    )
    per_head = []
    for h in range(s.heads):
        g = h // (s.heads // s.kv_heads)  # query head h reads key/value head g
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(s.head_dim)  # (b, query t, key j)
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        per_head.append(weights @ v[:, :, g])
    return linear(mixer.o_proj, torch.cat(per_head, dim=-1))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 2048}  # fmt: skip
CASES = {
    "mha": dict(attn_heads=2),
    "gqa": dict(attn_heads=4, attn_kv_heads=2, attn_head_dim=8),
    "mqa": dict(attn_heads=4, attn_kv_heads=1, attn_head_dim=8),
    "window": dict(attn_heads=2, attn_window=3),
    "bias": dict(attn_heads=2, attn_bias=True, attn_out_bias=True),
    "partial_rope": dict(attn_heads=2, attn_rope_dim=4),
    "no_rope": dict(attn_heads=2, attn_rope_dim=0),
    "linear": dict(attn_heads=2, attn_rope_scaling={"rope_type": "linear", "factor": 4.0}, attn_rope_theta=100.0),
    # head_dim 16, theta 10000: wavelengths 6 ... 19869, so orig 2048 / high 8 / low 1 puts some in every band
    "llama3": dict(attn_heads=2, attn_head_dim=16, attn_rope_scaling=LLAMA3),
    "everything": dict(
        attn_heads=4,
        attn_kv_heads=2,
        attn_head_dim=16,
        attn_rope_dim=12,
        attn_window=4,
        attn_bias=True,
        attn_out_bias=True,
        attn_rope_scaling=LLAMA3,
        attn_rope_theta=500.0,
    ),  # fmt: skip
}


def make_mixer(case: str, dtype=torch.float64, seed: int = 0) -> AttentionMixer:
    torch.manual_seed(seed)
    config = BackboneConfig(d_model=16, n_layer=1, ssm="attention", **CASES[case])
    mixer = AttentionMixer(config, 0).to(dtype)
    if mixer.q_proj.bias is not None:  # nn.Linear's init already gives random biases; make them count
        with torch.no_grad():
            for layer in (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.o_proj):
                if layer.bias is not None:
                    layer.bias.uniform_(-0.5, 0.5)
    return mixer


def outputs_and_grads(fn, mixer, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    out = fn(mixer, x)
    params = [p for _, p in mixer.named_parameters()]
    grads = torch.autograd.grad((out * upstream).sum(), [x, *params])
    return out.detach(), dict(zip(["input", *[n for n, _ in mixer.named_parameters()]], grads))


def mixer_forward(mixer, x):
    return mixer(x)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_mixer_equals_the_definition_float64(case):
    mixer = make_mixer(case)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 16, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, 13, 16, generator=gen, dtype=torch.float64)
    got, got_grads = outputs_and_grads(mixer_forward, mixer, x, upstream)
    want, want_grads = outputs_and_grads(naive_attention, mixer, x, upstream)
    assert rel_err(got, want) <= 1e-5
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert rel_err(got_grads[name], want_grads[name]) <= 1e-5, name
    with torch.no_grad():  # the same through the KV cache: two chunks, then single steps
        first, state = mixer(x[:, :5])
        second, state = mixer(x[:, 5:10], state)
        steps = []
        for t in range(10, 13):
            out, state = mixer.step(x[:, t], state)
            steps.append(out[:, None])
        chunked = torch.cat([first, second, *steps], dim=1)
    assert rel_err(chunked, want) <= 1e-5
    assert state["seen"].tolist() == [13, 13]
    assert state["k"].shape[2] == (13 if mixer.window is None else mixer.window)


@pytest.mark.parametrize("case", ["gqa", "window", "everything"])
def test_mixer_float32_is_close_to_the_float64_definition(case):
    mixer = make_mixer(case, torch.float32)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 21, 16, generator=gen)
    upstream = torch.randn(2, 21, 16, generator=gen)
    got, got_grads = outputs_and_grads(mixer_forward, mixer, x, upstream)
    want, want_grads = outputs_and_grads(naive_attention, mixer.double(), x.double(), upstream.double())
    assert rel_err(got, want) <= 2e-5
    for name in want_grads:
        assert rel_err(got_grads[name], want_grads[name]) <= 1e-4, name


def test_rope_frequencies_follow_the_definitions_and_hf():
    for case in ("mha", "partial_rope", "linear", "llama3", "everything"):
        s = make_mixer(case).settings
        got = rope_inverse_frequencies(s)
        assert rel_err(got, torch.tensor(definition_frequencies(s), dtype=torch.float64)) <= 1e-14, case
    # the llama3 case really has frequencies in all three bands
    s = make_mixer("llama3").settings
    wavelengths = [2 * math.pi / s.rope_theta ** (-2 * i / s.rope_dim) for i in range(s.rope_dim // 2)]
    original = LLAMA3["original_max_position_embeddings"]
    assert any(w < original / LLAMA3["high_freq_factor"] for w in wavelengths)
    assert any(original / LLAMA3["high_freq_factor"] <= w <= original / LLAMA3["low_freq_factor"] for w in wavelengths)
    assert any(w > original / LLAMA3["low_freq_factor"] for w in wavelengths)
    # and HF transformers computes the same (in float32)
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=2, head_dim=16, rope_theta=10000.0, rope_scaling=dict(LLAMA3)
    )
    hf_freqs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    assert rel_err(hf_freqs, rope_inverse_frequencies(s)) <= 1e-6


# --------------------------------------------------------------------------------------------------------------
# attention in stacks

HYBRID = tiny_hybrid_options()
WINDOW_HYBRID = dict(ssm="mamba1", n_layer=2, attn_heads=2, attn_window=6, layer_overrides={1: {"mixer": "attention"}})
STACKS = {"hybrid": HYBRID, "window_hybrid": WINDOW_HYBRID}


@pytest.fixture(scope="module")
def hybrid():
    return tiny_lm(**HYBRID, seed=0)


@pytest.fixture(scope="module")
def window_hybrid():
    return tiny_lm(**WINDOW_HYBRID, seed=1)


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_a_window_keeps_the_state_bounded(window_hybrid):
    model, stream = window_hybrid, ids(2, 200, seed=3)
    state, sizes = None, []
    with torch.no_grad():
        for start in range(0, 160, 7):
            state = model(stream[:, start : min(start + 7, 160)], state).state
            sizes.append(state.nbytes())
        for t in range(160, 200):
            state = model.step(stream[:, t], state).state
        whole = model(stream).state
    assert state.layers[1]["k"].shape == state.layers[1]["v"].shape == (2, 2, 6, 8)  # slots == window
    assert sizes[-1] == sizes[1] == state.nbytes()  # flat once the window is full
    assert state.layers[1]["seen"].tolist() == [200, 200]
    for key, tensor in whole.tensors().items():
        assert rel_err(state.tensors()[key], tensor) <= 1e-5, key


def test_select_and_stack_hybrid_states(hybrid):
    x = ids(3, 10, seed=4)
    with torch.no_grad():
        state = hybrid(x).state
        rows = [state.select(i) for i in range(3)]
        again = RecurrentState.stack(rows)
        assert again.position == 10 and again.batch_size == 3
        for key, tensor in state.tensors().items():
            assert torch.equal(again.tensors()[key], tensor), key
        nxt = ids(3, 4, seed=5)
        batch_logits = hybrid(nxt, state).logits
        for i, row in enumerate(rows):
            assert rel_err(hybrid(nxt[i : i + 1], row).logits, batch_logits[i : i + 1]) <= 1e-5
        shorter = hybrid(x[:1, :7]).state
        mixed = RecurrentState.stack([rows[0], shorter])  # rows at different positions: one state (issue 23)
        assert mixed.positions == (10, 7)
        both = hybrid(nxt[:2], mixed).logits
        assert rel_err(both[1:2], hybrid(nxt[1:2], shorter).logits) <= 1e-5
        assert rel_err(both[:1], hybrid(nxt[:1], rows[0]).logits) <= 1e-5
    with pytest.raises(IndexError):
        state.select(3)


@pytest.mark.parametrize("stack", list(STACKS))
def test_ragged_generation_equals_each_prompt_alone(stack, hybrid, window_hybrid):
    model = hybrid if stack == "hybrid" else window_hybrid
    prompts = [ids(1, 3, seed=6)[0].tolist(), ids(1, 11, seed=7)[0].tolist(), ids(1, 5, seed=8)[0].tolist()]
    batch = generate(model, prompts, 12)
    follow = ids(1, 3, seed=9)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            alone = generate(model, prompt, 12)
            assert batch.tokens[i] == alone.tokens[0]
            assert batch.states[i].position == alone.state.position == len(prompt) + 12
            got, want = batch.states[i].tensors(), alone.state.tensors()
            for key, tensor in want.items():  # the row's state holds no padding: same shapes, same values
                assert got[key].shape == tensor.shape, key
                assert rel_err(got[key], tensor) <= 1e-5, key
            assert rel_err(model(follow, batch.states[i]).logits, model(follow, alone.state).logits) <= 1e-5


def test_stop_sequences_on_a_hybrid(hybrid):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    free = generate(hybrid, prompts, 16)
    stop = free.tokens[0][5:7]
    first = next(t for t in range(2, 17) if free.tokens[0][t - 2 : t] == stop)
    out = generate(hybrid, prompts, 16, stop=[stop])
    assert out.tokens[0] == free.tokens[0][:first] and out.stop_reasons[0] == "stop"
    assert out.states[0].position == 3 + first
    for i, prompt in enumerate(prompts):
        alone = generate(hybrid, prompt, 16, stop=[stop])
        assert out.tokens[i] == alone.tokens[0] and out.stop_reasons[i] == alone.stop_reasons[0]
        for key, tensor in alone.state.tensors().items():
            assert rel_err(out.states[i].tensors()[key], tensor) <= 1e-5, key


def test_a_state_continues_after_generation(hybrid):
    prompt = [3, 1, 4, 1, 5]
    out = generate(hybrid, prompt, 9)
    nxt = ids(1, 6, seed=10)
    with torch.no_grad():
        continued = hybrid(nxt, out.state).logits
        whole = torch.cat([torch.tensor([prompt + out.tokens[0]]), nxt], dim=1)
        straight = hybrid(whole).logits[:, -6:]
    assert rel_err(continued, straight) <= 1e-5
    more = generate(hybrid, nxt[0].tolist(), 5, state=out.state)
    assert more.tokens[0] == generate(hybrid, whole[0].tolist(), 5).tokens[0]


def test_save_load_a_hybrid_state(hybrid, tmp_path):
    out = generate(hybrid, [[1, 2], [3, 4, 5, 6, 7, 8]], 4)  # the short row was left-padded while decoding
    for i, state in enumerate(out.states):
        path = state.save(tmp_path / f"row{i}.safetensors")
        loaded = RecurrentState.load(path, hybrid)
        assert loaded.position == state.position
        for key, tensor in state.tensors().items():
            assert torch.equal(loaded.tensors()[key], tensor) and loaded.tensors()[key].dtype == tensor.dtype
        nxt = ids(1, 3, seed=11)
        with torch.no_grad():
            assert torch.equal(hybrid(nxt, loaded).logits, hybrid(nxt, state).logits)


def _with(state: RecurrentState, layer: int, **tensors) -> RecurrentState:
    layers = [dict(d) for d in state.layers]
    layers[layer].update(tensors)
    return RecurrentState(layers, state.position, state.fingerprint)


def test_malformed_kv_caches_are_refused(hybrid, window_hybrid, tmp_path):
    x = ids(2, 9, seed=12)
    with torch.no_grad():
        state = hybrid(x).state
        wstate = window_hybrid(x).state
    k, v = state.layers[1]["k"], state.layers[1]["v"]  # (2, kv_heads 2, 9 slots, head_dim 4)
    bad = {
        "kv heads": (hybrid, _with(state, 1, k=k.repeat(1, 2, 1, 1), v=v.repeat(1, 2, 1, 1)),
                     r"layers\.1: k has 4 key/value heads.*this attention layer has 2 \(attn_kv_heads\)"),
        "head dim": (hybrid, _with(state, 1, k=k[..., :2], v=v[..., :2]), r"layers\.1: k has head_dim 2.*4"),
        "slots": (hybrid, _with(state, 1, v=v[:, :, 1:]), r"layers\.1: k holds 9 slots and v 8"),
        "window": (window_hybrid, _with(wstate, 1, k=torch.zeros(2, 2, 7, 8), v=torch.zeros(2, 2, 7, 8)),
                   r"layers\.1: k and v hold 7 slots, more than the layer's window \(6\)"),
        "seen": (hybrid, _with(state, 1, seen=torch.tensor([9, -1])), r"layers\.1: seen holds -1"),
    }  # fmt: skip
    for what, (model, broken, message) in bad.items():
        with pytest.raises(StateMismatchError, match=message):
            model(x[:, :1], broken)
        path = broken.save(tmp_path / f"{what.replace(' ', '_')}.safetensors")
        with pytest.raises(CorruptFileError, match=message):
            RecurrentState.load(path, model)


def test_a_bf16_hybrid_runs_and_tracks_fp32(hybrid):
    model16 = tiny_lm(**HYBRID, seed=0).to(torch.bfloat16)
    x = ids(2, 12, seed=13)
    with torch.no_grad():
        out = model16(x)
        assert out.logits.dtype == torch.bfloat16 and bool(out.logits.isfinite().all())
        assert out.state.layers[1]["k"].dtype == torch.float32  # the cache stays fp32 whatever the model's dtype
        step = model16.step(x[:, 0], out.state)
        assert bool(step.logits.isfinite().all())
        assert rel_err(out.logits, hybrid(x).logits) <= 5e-2
    assert len(generate(model16, [[1, 2, 3], [4]], 5).tokens[1]) == 5
    # the rotary angles do not depend on the model's dtype (a bf16 cast of the frequencies would turn them)
    far = torch.tensor([[1000, 40000]])
    mixer16, mixer32 = model16.backbone.layers[1].mixer, hybrid.backbone.layers[1].mixer
    for got, want in zip(mixer16._rope(far, torch.float32), mixer32._rope(far, torch.float32)):
        assert torch.equal(got, want)
    back = model16.float().backbone.layers[1].mixer  # and a bf16 round trip leaves them exact
    assert torch.equal(back._rope(far, torch.float32)[0], mixer32._rope(far, torch.float32)[0])


BAD_FIELDS = {
    "kv_heads": (
        dict(ssm="attention", attn_heads=3, attn_kv_heads=2, attn_head_dim=8),
        r"attn_heads \(3\) must be a multiple of attn_kv_heads \(2\)",
    ),
    "odd_rope_dim": (dict(ssm="attention", attn_heads=2, attn_rope_dim=3), r"attn_rope_dim must be even.*got 3"),
    "rope_dim_too_big": (
        dict(ssm="attention", attn_heads=2, attn_rope_dim=16),
        r"at most attn_head_dim \(8\), got 16",
    ),
    "rope_type": (
        dict(ssm="attention", attn_rope_scaling={"rope_type": "yarn", "factor": 2.0}),
        r"rope_type 'yarn' is not supported",
    ),
    "llama3_fields": (
        dict(ssm="attention", attn_rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        r"llama3 scaling needs low_freq_factor",
    ),
    "llama3_bands": (
        dict(ssm="attention", attn_rope_scaling={**LLAMA3, "high_freq_factor": 1.0}),
        r"llama3 scaling needs high_freq_factor > low_freq_factor",
    ),
    "no_attention_layer": (dict(ssm="mamba1", attn_heads=2), r"attn_heads is set but no layer is an attention layer"),
    "no_attention_layer_hybrid": (
        dict(ssm="mamba1", attn_window=4, layer_overrides={1: {"mixer": "mamba2", "options": {"headdim": 8}}}),
        r"attn_window is set but no layer",
    ),
    "window": (dict(ssm="attention", attn_window=0), r"attn_window must be an int in \[1,"),
    "head_dim": (
        dict(ssm="attention", d_model=12, attn_head_dim=8),
        r"d_model \(12\) is not a multiple of attn_head_dim \(8\)",
    ),
    "layer_options": (
        dict(ssm="mamba1", layer_overrides={1: {"mixer": "attention", "options": {"headdim": 4}}}),
        r"layer 1: bad options \['headdim'\] for mixer 'attention'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_attention_fields_are_config_errors(case):
    fields, message = BAD_FIELDS[case]
    with pytest.raises(ConfigError, match=message):
        BackboneConfig(**{"d_model": 16, "n_layer": 2, **fields})


def test_training_carries_only_a_bounded_kv_cache():
    """TBPTT carries the state through the whole run: an attention layer without a window is refused (its cache
    would grow every step); with a window it trains and its cache stays at the window; without carrying it trains."""
    from seqlab.errors import ConfigError
    from seqlab.testing import tiny_lm
    from seqlab.train import TrainConfig, Trainer

    data = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 200)
    settings = dict(lr=1e-2, max_steps=6, batch_size=2, window=16, progress=False, weight_decay=0.0)
    hybrid = dict(n_layer=2, attn_heads=2, layer_overrides={1: {"mixer": "attention"}})
    with pytest.raises(ConfigError, match=r"attention layer\(s\) \[1\] have no attn_window"):
        Trainer(tiny_lm(vocab=16, **hybrid), TrainConfig(**settings), data)
    trainer = Trainer(tiny_lm(vocab=16, **hybrid, attn_window=8), TrainConfig(**settings), data)
    records = trainer.fit()
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    assert trainer.states[0] is not None and trainer.states[0].layers[1]["k"].shape[2] == 8
    fresh = Trainer(tiny_lm(vocab=16, **hybrid), TrainConfig(**settings, carry_state=False), data).fit()
    assert len(fresh) == 6
