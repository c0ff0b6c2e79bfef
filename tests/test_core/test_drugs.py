"""DRµGS (seqlab.decoding.drugs): random rotations of hidden vectors during decoding.

theta = 0 is bit-identical to plain decoding; at every site each rotated vector keeps its norm and turns by exactly
theta (orthogonal at pi/2); seeds reproduce; rows and positions get their own directions; the prompt and the first
steps are protected; the hooks leave the model as it was, also after an exception; bad settings are refused
naming the field. The decode loop here is prefill outside the context and model.step inside it, as generate's is.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from seqlab.decoding import Drugs, apply_drugs
from seqlab.decoding.drugs import PROFILES, SITES, profile_factors, rotate
from seqlab.errors import InputError
from seqlab.testing import tiny_hybrid_options, tiny_lm

HYBRID = tiny_hybrid_options()
MAMBA_ONLY = ("residual", "mixer_in", "mixer_out", "x", "B", "C")
MODEL_SITES = {"mamba1": MAMBA_ONLY, "mamba2": MAMBA_ONLY, "hybrid": SITES}


def build(kind: str):
    return tiny_lm(**HYBRID, seed=0) if kind == "hybrid" else tiny_lm(kind, seed=0)


@pytest.fixture(scope="module", params=["mamba1", "mamba2", "hybrid"])
def model(request):
    m = build(request.param)
    m.kind = request.param
    return m


def prompt(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode(model, ids, steps, drugs=None, generator=None, forced=None):
    """Greedy decoding (or feeding ``forced`` tokens): prefill outside the context, steps inside. Returns the
    logits of every step (the prefill's first), the tokens fed, the final state and the handle."""
    out = model(ids)
    logits, state = [out.logits[:, -1]], out.state
    fed = []
    context = apply_drugs(model, drugs, generator) if drugs is not None else nullcontext()
    with context as handle:
        for t in range(steps):
            token = logits[-1].argmax(-1) if forced is None else forced[:, t]
            fed.append(token)
            out = model.step(token, state)
            logits.append(out.logits)
            state = out.state
    return logits, torch.stack(fed, 1), state, handle


def states_equal(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def vector_size(model, layer: int, site: str, t: torch.Tensor) -> int:
    """The documented length of one rotated vector at a site (docs/generation.md, DRµGS)."""
    mixer = model.backbone.layers[layer].mixer
    kind = type(mixer).__name__
    if kind == "Mamba2Mixer" and site == "x":
        return mixer.headdim
    if kind == "Mamba2Mixer" and site in ("B", "C"):
        return mixer.d_state
    return t.shape[-1]  # residual/mixer_in/mixer_out: d_model; Mamba-1 x: d_inner, B/C: d_state; attention: head_dim


def record(model, log):
    """Wrap every installed hook so that (layer, site, before, after) of each rotation is kept."""
    for i, block in enumerate(model.backbone.layers):
        for module in (block, block.mixer):
            inner = vars(module).get("_perturb")
            if inner is None:
                continue

            def hook(site, t, inner=inner, i=i):
                out = inner(site, t)
                if out is not t:  # a site the hook left alone returns its input itself
                    log.append((i, site, t.clone(), out.clone()))
                return out

            module._perturb = hook


@torch.no_grad()
def captured(model, drugs, steps=3, seed=0, ids=None):
    ids = prompt() if ids is None else ids
    out = model(ids)
    state, token, log = out.state, out.logits[:, -1].argmax(-1), []
    with apply_drugs(model, drugs, torch.Generator().manual_seed(seed)):
        record(model, log)
        for _ in range(steps):
            out = model.step(token, state)
            state, token = out.state, out.logits.argmax(-1)
    return log


# --------------------------------------------------------------------------------------------------------------
# theta = 0 and DRµGS off


def test_theta_zero_is_bit_identical(model):
    ids = prompt()
    plain_logits, tokens, plain_state, _ = decode(model, ids, 6)
    for profile in ("constant", "peak-middle"):
        drugs = Drugs(theta=0.0, sites=MODEL_SITES[model.kind], profile=profile)
        logits, got, state, handle = decode(model, ids, 6, drugs, torch.Generator().manual_seed(1))
        assert torch.equal(got, tokens)
        assert all(torch.equal(a, b) for a, b in zip(logits, plain_logits))
        assert states_equal(state, plain_state)
        assert handle.steps == 6 and handle.rotations == 0


def test_zero_factor_layers_are_untouched(model):
    """A layer whose theta is 0 (not chosen, or a profile factor of 0) gets no hook at all."""
    n = model.config.n_layer
    drugs = Drugs(theta=0.5, sites="residual", profile=[0.0] * (n - 1) + [1.0])
    log = captured(model, drugs)
    assert log and {i for i, *_ in log} == {n - 1}
    log = captured(model, Drugs(theta=0.5, sites="mixer_out", layers=[0]))
    assert log and {i for i, *_ in log} == {0}


# --------------------------------------------------------------------------------------------------------------
# geometry at every site


@pytest.mark.parametrize("theta", [0.3, math.pi / 2, 2.5])
def test_norm_kept_and_angle_is_theta_at_every_site(model, theta):
    sites = MODEL_SITES[model.kind]
    log = captured(model, Drugs(theta=theta, sites=sites))
    assert {site for _, site, *_ in log} == set(sites)
    for layer, site, before, after in log:
        size = vector_size(model, layer, site, before)
        v = before.double().unflatten(-1, (-1, size))
        w = after.double().unflatten(-1, (-1, size))
        assert after.dtype == before.dtype and after.shape == before.shape
        norm_v, norm_w = v.norm(dim=-1), w.norm(dim=-1)
        assert torch.allclose(norm_w, norm_v, rtol=1e-5, atol=0), f"layer {layer} {site}: norm changed"
        cos = (v * w).sum(-1) / (norm_v * norm_w)
        assert torch.allclose(cos, torch.full_like(cos, math.cos(theta)), atol=1e-5), f"layer {layer} {site}"


def test_rotate_directly():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    v[1, 2] = 0  # a zero vector stays zero
    for theta in (1e-3, 0.4, math.pi / 2, math.pi):
        w = rotate(v, theta, torch.randn(5, 7, 16, generator=g))
        assert torch.allclose(w.norm(dim=-1), v.norm(dim=-1), rtol=1e-12, atol=0)
        cos = (v * w).sum(-1) / (v.norm(dim=-1) * w.norm(dim=-1)).clamp_min(1e-300)
        cos[1, 2] = math.cos(theta)
        assert torch.allclose(cos, torch.full_like(cos, math.cos(theta)), atol=1e-12)
        assert torch.equal(w[1, 2], torch.zeros(16, dtype=torch.float64))
    # every row/position its own direction: the same vector everywhere is turned different ways
    same = torch.ones(4, 8)
    w = rotate(same, 0.5, torch.randn(4, 8, generator=g))
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[2], w[3])
    assert rotate(same, 0.0, torch.randn(4, 8)) is same
    with pytest.raises(InputError, match="length 1"):
        rotate(torch.ones(3, 1), 0.1, torch.randn(3, 1))


def test_rows_get_their_own_directions(model):
    ids = prompt(1).expand(3, -1).contiguous()  # three identical rows
    log = captured(model, Drugs(theta=0.4, sites="residual"), steps=1, ids=ids)
    _, _, before, after = log[0]
    assert torch.equal(before[0], before[1])
    assert not torch.allclose(after[0], after[1]) and not torch.allclose(after[1], after[2])


def test_per_row_generators_make_a_batch_equal_its_rows_alone(model):
    ids = prompt(3)
    drugs = Drugs(theta=0.3, sites="residual")
    batch_logits, *_ = decode(model, ids, 4, drugs, [torch.Generator().manual_seed(10 + i) for i in range(3)])
    for i in range(3):
        alone, *_ = decode(model, ids[i : i + 1], 4, drugs, [torch.Generator().manual_seed(10 + i)])
        for a, b in zip(alone, batch_logits):
            assert torch.allclose(a[0], b[i], atol=1e-5)
    with pytest.raises(InputError, match="handle.rows"):
        decode(model, ids, 2, drugs, [torch.Generator().manual_seed(0)] * 2)


# --------------------------------------------------------------------------------------------------------------
# seeds, protection


def test_same_seed_same_output_other_seed_other_output(model):
    ids = prompt()
    drugs = Drugs(theta=0.6, sites=MODEL_SITES[model.kind])
    a, ta, sa, _ = decode(model, ids, 6, drugs, torch.Generator().manual_seed(3))
    b, tb, sb, _ = decode(model, ids, 6, drugs, torch.Generator().manual_seed(3))
    c, *_ = decode(model, ids, 6, drugs, torch.Generator().manual_seed(4))
    assert torch.equal(ta, tb) and all(torch.equal(x, y) for x, y in zip(a, b)) and states_equal(sa, sb)
    assert not torch.allclose(a[1], c[1])
    plain, *_ = decode(model, ids, 6)
    assert not torch.allclose(a[1], plain[1])
    torch.manual_seed(5)
    d, *_ = decode(model, ids, 6, drugs)  # generator None: drawn from torch's global RNG
    torch.manual_seed(5)
    e, *_ = decode(model, ids, 6, drugs)
    assert all(torch.equal(x, y) for x, y in zip(d, e))


@pytest.mark.parametrize("first", [0, 1, 3])
def test_protect_first(model, first):
    ids = prompt()
    plain, tokens, *_ = decode(model, ids, 6)
    drugs = Drugs(theta=math.pi / 2, sites="residual", protect_first=first)
    # the same tokens fed, so that only the perturbation can make the logits differ
    logits, _, _, handle = decode(model, ids, 6, drugs, torch.Generator().manual_seed(0), forced=tokens)
    assert handle.steps == 6
    for t in range(7):  # logits[0]: the prompt's; logits[t]: after step t
        same = torch.equal(logits[t], plain[t])
        assert same == (t <= first), f"protect_first={first}: logits after step {t} {'' if same else 'not '}equal"


def test_protect_prompt(model):
    ids = prompt()
    drugs = Drugs(theta=0.5, sites="residual")
    with torch.no_grad():
        plain = model(ids).logits
        with apply_drugs(model, drugs, torch.Generator().manual_seed(0)):
            protected = model(ids).logits  # a forward (a prefill) inside the context is left alone
        with apply_drugs(model, Drugs(theta=0.5, sites="residual", protect_prompt=False), torch.Generator()):
            exposed = model(ids).logits
    assert torch.equal(protected, plain)
    assert not torch.allclose(exposed, plain)


# --------------------------------------------------------------------------------------------------------------
# the hooks leave no trace


def test_hooks_removed_after_the_context_and_after_an_exception(model):
    ids = prompt()
    plain_logits, _, plain_state, _ = decode(model, ids, 4)
    drugs = Drugs(theta=1.0, sites=MODEL_SITES[model.kind], protect_prompt=False)
    decode(model, ids, 4, drugs, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="boom"):
        with apply_drugs(model, drugs, torch.Generator()):
            model.step(ids[:, 0], model(ids).state)
            raise RuntimeError("boom")
    for block in model.backbone.layers:
        assert "_perturb" not in vars(block) and "_perturb" not in vars(block.mixer)
        assert block._perturb is None and block.mixer._perturb is None
    assert "step" not in vars(model)
    after_logits, _, after_state, _ = decode(model, ids, 4)
    assert all(torch.equal(a, b) for a, b in zip(after_logits, plain_logits))
    assert states_equal(after_state, plain_state)


def test_one_context_at_a_time(model):
    drugs = Drugs(theta=0.1)
    with apply_drugs(model, drugs, torch.Generator()):
        with pytest.raises(InputError, match="already active"):
            with apply_drugs(model, drugs, torch.Generator()):
                pass
    assert "step" not in vars(model)


# --------------------------------------------------------------------------------------------------------------
# profiles and layers


def test_profiles():
    assert profile_factors("constant", 4) == [1, 1, 1, 1]
    assert profile_factors("linear-up", 4) == [0.25, 0.5, 0.75, 1.0]
    assert profile_factors("linear-down", 4) == [1.0, 0.75, 0.5, 0.25]
    assert profile_factors("peak-middle", 5) == pytest.approx([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    assert profile_factors("peak-middle", 4) == pytest.approx([0.4, 0.8, 0.8, 0.4])
    assert profile_factors(lambda i, n: i / n, 4) == [0, 0.25, 0.5, 0.75]
    assert set(PROFILES) == {"constant", "linear-up", "linear-down", "peak-middle"}
    assert Drugs(theta=0.4, profile="linear-up", layers=[1, 2]).thetas(4) == pytest.approx([0, 0.2, 0.3, 0])


def test_measured_angle_follows_the_profile():
    model = tiny_lm("mamba1", seed=0, n_layer=4)
    log = captured(model, Drugs(theta=0.8, sites="residual", profile="linear-up"), steps=1)
    for layer, _, before, after in log:
        v, w = before.double(), after.double()
        cos = (v * w).sum(-1) / (v.norm(dim=-1) * w.norm(dim=-1))
        assert torch.allclose(cos, torch.full_like(cos, math.cos(0.8 * (layer + 1) / 4)), atol=1e-5)
    assert sorted(i for i, *_ in log) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------------------
# bad settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(theta=float("nan")), "theta must be a finite"),
        (dict(theta=float("inf")), "theta must be a finite"),
        (dict(theta=-0.1), r"theta must be in \[0, pi\]"),
        (dict(theta=3.2), r"theta must be in \[0, pi\]"),
        (dict(theta="0.1"), "theta must be a finite"),
        (dict(theta=True), "theta must be a finite"),
        (dict(theta=0.1, sites=("residual", "z", "qq")), "unknown site.*'z', 'qq'.*known: residual"),
        (dict(theta=0.1, sites=()), "sites is empty"),
        (dict(theta=0.1, layers=[0, -1]), "layers: -1 is not a layer index"),
        (dict(theta=0.1, layers=[]), "layers is empty"),
        (dict(theta=0.1, profile="bell"), "unknown profile 'bell'"),
        (dict(theta=0.1, profile=[1.0, float("nan")]), "factor nan"),
        (dict(theta=0.1, profile=3), "profile must be a name"),
        (dict(theta=0.1, protect_first=-1), "protect_first must be an int >= 0"),
        (dict(theta=0.1, protect_prompt="yes"), "protect_prompt must be True or False"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        Drugs(**kwargs)


def test_bad_settings_for_a_model():
    mamba = tiny_lm("mamba1", seed=0)  # 2 layers
    attention = tiny_lm("attention", seed=0, attn_heads=2)
    cases = [
        (mamba, Drugs(theta=0.1, layers=[0, 2]), "layer 2 is out of range for a model of 2 layers"),
        (mamba, Drugs(theta=0.1, sites="q"), "'q' is a site of an attention layer.*0: mamba1, 1: mamba1"),
        (attention, Drugs(theta=0.1, sites=("residual", "B")), "'B' is a site of a Mamba"),
        (build("hybrid"), Drugs(theta=0.1, sites="k", layers=[0, 2]), "'k' is a site of an attention layer"),
        (mamba, Drugs(theta=2.0, profile=[1.0, 2.0]), r"layer 1 gets theta = 2.0 x 2.0 = 4.0, outside \[0, pi\]"),
        (mamba, Drugs(theta=0.1, profile=[1.0, 1.0, 1.0]), "3 factors for a model of 2 layers"),
        (mamba, Drugs(theta=0.1, profile=lambda i, n: float("nan")), "gave nan for layer 0"),
    ]
    for model, drugs, message in cases:
        with pytest.raises(InputError, match=message):
            with apply_drugs(model, drugs, torch.Generator()):
                pass
        assert "step" not in vars(model)
    with pytest.raises(InputError, match="generator must be"):
        with apply_drugs(mamba, Drugs(theta=0.1), generator=7):
            pass
    with pytest.raises(InputError, match="needs a Drugs"):
        with apply_drugs(mamba, 0.1):
            pass
    with pytest.raises(InputError, match="needs a seqlab model"):
        with apply_drugs(torch.nn.Linear(2, 2), Drugs(theta=0.1)):
            pass
    # the sites that exist somewhere are enough: "q" on a hybrid perturbs its attention layer only
    log = captured(build("hybrid"), Drugs(theta=0.2, sites=("q", "x")), steps=1)
    assert {(i, s) for i, s, *_ in log} == {(1, "q"), (0, "x"), (2, "x")}


# --------------------------------------------------------------------------------------------------------------
# generate inside the context (prefill outside the perturbation by protect_prompt, steps inside)


def test_generate_inside_the_context(model):
    rows = [list(range(3, 9)), list(range(10, 14))]
    plain = model.generate(rows, 8, do_sample=True, temperature=0.8, seed=0)
    with apply_drugs(model, Drugs(theta=0.0, sites=MODEL_SITES[model.kind]), torch.Generator()):
        same = model.generate(rows, 8, do_sample=True, temperature=0.8, seed=0)
    assert same.tokens == plain.tokens
    assert all(states_equal(a, b) for a, b in zip(same.states, plain.states))
    drugs = Drugs(theta=1.2, sites="residual")
    runs = []
    for _ in range(2):
        with apply_drugs(model, drugs, [torch.Generator().manual_seed(i) for i in range(2)]) as handle:
            runs.append(model.generate(rows, 8))
        assert handle.steps == 8 and handle.rotations > 0
    assert runs[0].tokens == runs[1].tokens
    greedy = model.generate(rows, 8)
    assert runs[0].tokens != greedy.tokens
    assert [t[0] for t in runs[0].tokens] == [t[0] for t in greedy.tokens]  # the first token: the prompt's logits
