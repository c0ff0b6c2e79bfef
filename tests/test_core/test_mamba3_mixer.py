"""The Mamba-3 mixer (seqlab.mixers.mamba3) and its config: the parameter layout of mamba_ssm's Mamba3 module,
the pre-scan activations by hand, float32 against a float64 model (outputs, states, gradients) for SISO and MIMO
with and without the gated out-proj norm, states_at, packed rows, and the config's checks. The state contract
(chunking, step, save/load, fingerprints) is in test_state_contract.py; the rest of the house in
test_mamba3_everywhere.py."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seqlab import BackboneConfig
from seqlab.errors import ConfigError, InputError
from seqlab.mixers import Mamba3Mixer, build_mixer
from seqlab.mixers.mamba3 import heavy_tail
from seqlab.testing import rel_err, tiny_lm

# the vectorised CPU path once it exists (kernels/mamba3/chunked.py), else the sequential reference
FAST = "chunked" if importlib.util.find_spec("seqlab.kernels.mamba3.chunked") is not None else "ref"

SISO = dict(headdim=8, chunk_size=4)
MIMO = dict(headdim=8, chunk_size=4, mamba3_mimo_rank=2)
VARIANTS = {
    "siso": SISO,
    "siso_norm": dict(SISO, mamba3_outproj_norm=True, ngroups=2),
    "mimo": MIMO,
    "mimo_norm_rope1": dict(MIMO, mamba3_outproj_norm=True, mamba3_rope_fraction=1.0),
}


def model(variant: str, seed: int = 0, **kw):
    m = tiny_lm("mamba3", seed=seed, **VARIANTS[variant], **kw)
    with torch.no_grad():  # move every parameter off its init so each one matters in the comparison
        for name, p in m.named_parameters():
            if name.endswith(("B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "dt_bias")):
                p.add_(0.3 * torch.randn_like(p))
    return m


def test_parameters_have_the_reference_modules_names_and_shapes():
    # mamba_ssm/modules/mamba3.py: in_proj rows [z, x, B, C, dd_dt, dd_A, trap, angle], no bias; B/C biases
    # (h, r, n) initialised to 1; MIMO projections (h, r, p) with x and o at 1/r; norm over d_inner.
    cfg = BackboneConfig(d_model=16, n_layer=1, ssm="mamba3", d_state=8, headdim=4, ngroups=2, mamba3_mimo_rank=3)
    cfg = BackboneConfig(**{**cfg.to_dict(), "mamba3_outproj_norm": True})
    mixer = build_mixer("mamba3", cfg, 0, {})
    d_inner, h, r, g, n, p, a = 32, 8, 3, 2, 8, 4, 2
    shapes = {name: tuple(t.shape) for name, t in mixer.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * n * g * r + 3 * h + a, 16),
        "dt_bias": (h,),
        "B_bias": (h, r, n),
        "C_bias": (h, r, n),
        "B_norm.weight": (n,),
        "C_norm.weight": (n,),
        "mimo_x": (h, r, p),
        "mimo_z": (h, r, p),
        "mimo_o": (h, r, p),
        "D": (h,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (16, d_inner),
    }
    assert torch.equal(mixer.B_bias, torch.ones(h, r, n)) and torch.equal(mixer.mimo_x, torch.full((h, r, p), 1 / r))
    siso = build_mixer("mamba3", BackboneConfig(d_model=16, n_layer=1, ssm="mamba3", d_state=8, headdim=4), 0, {})
    assert not any(k.startswith(("mimo_", "norm.")) for k in siso.state_dict())
    assert siso.num_rope_angles == 2 and siso.mimo_rank == 1
    dt = F.softplus(siso.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001  # log-uniform in [dt_min, dt_max]


def test_heavy_tail_and_the_A_floor_by_hand():
    u = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    assert torch.equal(heavy_tail(u), torch.tensor([0.25, 0.5, 1.0, 1.5, 3.0], dtype=torch.float64))
    cfg = BackboneConfig(d_model=8, n_layer=1, ssm="mamba3", d_state=4, headdim=4, mamba3_A_floor=0.7)
    mixer = Mamba3Mixer(cfg).double()
    hidden = torch.randn(1, 3, 8, dtype=torch.float64)
    got = mixer._inputs(hidden)
    # the in_proj rows by hand, in the reference's order
    W = mixer.in_proj.weight
    sizes = [16, 16, 4, 4, 4, 4, 4, 1]
    z, x, B, C, dd_dt, dd_A, trap, angle = (hidden @ w.T for w in torch.split(W, sizes))
    rms = lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)  # noqa: E731
    ht = torch.where(dd_A >= 0, 1 + dd_A, 1 / (1 - dd_A))
    want = {
        "z": z.reshape(1, 3, 4, 4),
        "x": x.reshape(1, 3, 4, 4),
        "B": rms(B).reshape(1, 3, 1, 1, 4),
        "C": rms(C).reshape(1, 3, 1, 1, 4),
        "dt": torch.log1p(torch.exp(dd_dt + mixer.dt_bias)),
        "A": torch.minimum(-ht, torch.tensor(-0.7, dtype=torch.float64)),
        "trap": trap,
        "angles": angle,
    }
    assert got.keys() == want.keys()
    for key in want:  # seqlab's RMSNorm normalises in float32 (B, C)
        assert rel_err(got[key], want[key]) <= (1e-6 if key in "BC" else 1e-12), key
    assert (got["A"] <= -0.7).all()
    soft = Mamba3Mixer(BackboneConfig(**{**cfg.to_dict(), "mamba3_A_activation": "softplus"})).double()
    soft.load_state_dict(mixer.state_dict())
    assert (
        rel_err(soft._inputs(hidden)["A"], torch.minimum(-F.softplus(dd_A), torch.tensor(-0.7, dtype=torch.float64)))
        <= 1e-12
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_model_matches_a_float64_model(variant):
    """Outputs, final states and every parameter's gradient of a float32 model on the fast path against the same
    weights in float64 on the sequential reference, from a nonzero initial state, odd length."""
    fast = model(variant).set_backend(FAST).train()
    wide = copy.deepcopy(fast).double().set_backend("ref")
    ids = torch.randint(0, 32, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = fast(ids[:, :5]).state
    out32 = fast(ids[:, 5:], start)
    out64 = wide(ids[:, 5:], start)
    assert rel_err(out32.logits, out64.logits) <= 1e-5
    s32, s64 = out32.state.tensors(), out64.state.tensors()
    assert s32.keys() == s64.keys() and any(k.endswith(".angle") for k in s32)
    for key in s32:
        assert s32[key].dtype == torch.float32 and s64[key].dtype == torch.float64, key
        assert rel_err(s32[key], s64[key]) <= 1e-5, key
    weights = torch.randn(out32.logits.shape, generator=torch.Generator().manual_seed(2))
    (out32.logits * weights).sum().backward()
    (out64.logits * weights.double()).sum().backward()
    grads64 = dict(wide.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, grads64[name].grad) <= 1e-4, name


@pytest.mark.parametrize("variant", ["siso", "mimo_norm_rope1"])
def test_states_at_equal_the_states_of_prefixes(variant):
    m = model(variant, seed=3).set_backend(FAST)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        start = m(ids[:, :2]).state
        out = m(ids[:, 2:], start, states_at=[1, 4, 7])
        whole = m(ids[:, 2:], start)
        assert rel_err(out.logits, whole.logits) <= 1e-6
        for i, p in enumerate([1, 4, 7]):
            prefix = m(ids[:, 2 : 2 + p], start).state.tensors()
            for key, t in out.states_at[i].tensors().items():
                assert rel_err(t, prefix[key]) <= 1e-6, (p, key)


def test_packed_rows_equal_each_sequence_alone():
    m = model("siso_norm", seed=5)
    mix = m.backbone.layers[0].mixer
    mix.backend = FAST
    lengths = [3, 1, 5]
    hidden = torch.randn(1, sum(lengths), 16, generator=torch.Generator().manual_seed(6))
    init = mix.init_state(3)
    for t in init.values():
        t.normal_()
    cu = torch.tensor([0, 3, 4, 9])
    with torch.no_grad():
        out, state = mix(hidden, init, cu_seqlens=cu)
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone, alone_state = mix(hidden[:, s:e], {k: v[i : i + 1] for k, v in init.items()})
            assert rel_err(out[:, s:e], alone) <= 1e-5, i
            for key in alone_state:
                assert rel_err(state[key][i : i + 1], alone_state[key]) <= 1e-5, (i, key)
    with pytest.raises(InputError, match="states_at cannot be combined with cu_seqlens"):
        mix(hidden, None, states_at=[2], cu_seqlens=cu)


def test_config_mamba3_fields_and_their_errors():
    base = dict(d_model=16, n_layer=2)
    # unset mamba3_* fields leave the fingerprint as it was; set ones enter it
    plain = BackboneConfig(**base, ssm="mamba3", headdim=8)
    assert plain.fingerprint() != BackboneConfig(**base, ssm="mamba3", headdim=8, mamba3_mimo_rank=2).fingerprint()
    assert "mamba3_mimo_rank" not in BackboneConfig(**base).fingerprint()
    assert BackboneConfig.from_dict(plain.to_dict()) == plain
    assert plain.d_state == 128 and plain.mamba3_settings().num_rope_angles == 32
    assert BackboneConfig(**base, ssm="mamba3", headdim=8, d_state=7).mamba3_settings().num_rope_angles == 1
    cases = {
        "mamba3_rope_fraction must be 0.5 or 1.0": dict(ssm="mamba3", headdim=8, mamba3_rope_fraction=0.25),
        "mamba3_mimo_rank must be an int": dict(ssm="mamba3", headdim=8, mamba3_mimo_rank=0),
        "mamba3_A_floor must be a finite number": dict(ssm="mamba3", headdim=8, mamba3_A_floor=-1.0),
        "mamba3_outproj_norm must be true or false": dict(ssm="mamba3", headdim=8, mamba3_outproj_norm=1),
        "mamba3_A_activation must be one of": dict(ssm="mamba3", headdim=8, mamba3_A_activation="exp"),
        "no layer is a Mamba-3 layer": dict(ssm="mamba2", headdim=8, mamba3_mimo_rank=2),
        "at least one rotary angle": dict(ssm="mamba3", headdim=8, d_state=1),
        r"divisible by headdim \(5\)": dict(ssm="mamba3", headdim=5),
        r"nheads \(4\) divisible by ngroups \(3\)": dict(ssm="mamba3", headdim=8, ngroups=3),
        r"layer 1: mamba3_mimo_rank": dict(
            layer_overrides={1: {"mixer": "mamba3", "options": {"headdim": 8, "mamba3_mimo_rank": 1.5}}}
        ),
        r"layer 1: bad options \['dt_rank'\] for mixer 'mamba3'": dict(
            layer_overrides={1: {"mixer": "mamba3", "options": {"dt_rank": 2}}}
        ),
    }
    for message, kw in cases.items():
        with pytest.raises(ConfigError, match=message):
            BackboneConfig(**base, **kw)


def test_per_layer_mamba3_in_a_hybrid():
    cfg = BackboneConfig(
        d_model=16,
        n_layer=3,
        ssm="mamba1",
        mamba3_A_floor=0.01,  # config-level mamba3 fields reach the mamba3 layers only
        layer_overrides={
            1: {"mixer": "mamba3", "options": {"headdim": 4, "d_state": 6, "mamba3_mimo_rank": 2}},
            2: {"mixer": "mamba2", "options": {"headdim": 8, "d_state": 4}},
        },
    )
    from seqlab.models import LanguageModel

    lm = LanguageModel(cfg, vocab_size=32)
    kinds = [type(layer.mixer).__name__ for layer in lm.backbone.layers]
    assert kinds == ["Mamba1Mixer", "Mamba3Mixer", "Mamba2Mixer"]
    mix = lm.backbone.layers[1].mixer
    assert (mix.nheads, mix.d_state, mix.mimo_rank, mix.A_floor, mix.num_rope_angles) == (8, 6, 2, 0.01, 1)
    assert cfg.mamba3_settings(1).mimo_rank == 2
    with pytest.raises(ConfigError, match="layer 0 is a 'mamba1' layer, not a Mamba-3 layer"):
        cfg.mamba3_settings(0)
    state = lm.init_state(2)
    assert tuple(state.layers[1]["k"].shape) == (2, 2, 8, 6)


def test_bad_layer_state_is_refused_with_the_tensor_named():
    m = model("siso")
    state = m.init_state(1)
    state.layers[0]["k"] = torch.zeros(1, 2, 4, 8)
    with pytest.raises(Exception, match=r"layers\.0\.k"):
        m(torch.zeros(1, 2, dtype=torch.long), state)


# ------------------------------------------------------------------------------------------- mamba-ssm
def reference_mamba3(monkeypatch):
    """mamba_ssm.modules.mamba3 from an installed mamba-ssm (skip, with the reason, without one). mamba-ssm built
    without its CUDA extension (MAMBA_SKIP_CUDA_BUILD=TRUE) cannot run its package ``__init__`` (it imports
    ``selective_scan_cuda``), so the package is entered without it."""
    import importlib
    import sys
    import types

    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.origin is None:
        pytest.skip(
            "mamba-ssm is not installed (it installs without CUDA as MAMBA_SKIP_CUDA_BUILD=TRUE "
            "MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps mamba-ssm)"
        )
    try:
        return importlib.import_module("mamba_ssm.modules.mamba3")
    except ImportError:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = [str(Path(spec.origin).parent)]
        monkeypatch.setitem(sys.modules, "mamba_ssm", package)
        for name in [n for n in sys.modules if n.startswith("mamba_ssm.")]:
            monkeypatch.delitem(sys.modules, name)
        try:
            return importlib.import_module("mamba_ssm.modules.mamba3")
        except ImportError as exc:  # pragma: no cover - depends on the installed version
            pytest.skip(f"mamba_ssm.modules.mamba3 does not import here: {exc}")


def test_same_weights_as_mamba_ssms_mamba3_module(monkeypatch):
    """The reference module's parameters load into Mamba3Mixer by name (strictly, both ways), its rate activation
    is ours (heavy-tail on mamba_ssm's main branch; softplus in the 2.3.2 release: mamba3_A_activation), and
    where CUDA runs its kernels the two give the same output on the same weights."""
    ref = reference_mamba3(monkeypatch)
    u = torch.linspace(-4, 4, 33)
    if hasattr(ref, "heavy_tail_activation"):
        activation = "heavy_tail"
        assert torch.equal(ref.heavy_tail_activation(u), heavy_tail(u))
    else:  # the release computes -softplus(dd_A) inline
        activation = "softplus"
        assert "-F.softplus(dd_A" in Path(ref.__file__).read_text()
    torch.manual_seed(0)
    theirs = ref.Mamba3(d_model=32, d_state=16, expand=2, headdim=16, ngroups=1, chunk_size=16, is_outproj_norm=True)
    cfg = BackboneConfig(
        d_model=32,
        n_layer=1,
        ssm="mamba3",
        d_state=16,
        headdim=16,
        chunk_size=16,
        mamba3_outproj_norm=True,
        mamba3_A_activation=activation,
    )
    ours = Mamba3Mixer(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if not torch.cuda.is_available():
        pytest.skip(
            "mamba_ssm's Mamba3.forward needs CUDA (its Triton RMSNormGated and scan kernels); compared the "
            "parameter layout and the rate activation only"
        )
    theirs, ours = theirs.cuda(), ours.cuda()
    u = torch.randn(2, 40, 32, device="cuda")
    with torch.no_grad():
        want = theirs(u)
        got, _ = ours(u)
    assert rel_err(got, want) <= 1e-3


def test_the_out_proj_norm_normalises_each_head_then_gates():
    """Mamba-3's norm (GatedRMSNorm with norm_before_gate=True): y / rms(y over each head) * weight * silu(z),
    written out here in float64; gating first (Mamba-2's order) gives something else."""
    from seqlab.norm import GatedRMSNorm

    torch.manual_seed(3)
    y, z = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    norm = GatedRMSNorm(12, group_size=4, eps=1e-5, norm_before_gate=True).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    heads = y.unflatten(-1, (3, 4))
    want = (heads / torch.sqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2)
    want = want * norm.weight * z * torch.sigmoid(z)
    assert torch.allclose(norm(y, z), want, rtol=1e-12, atol=1e-12)
    gate_first = GatedRMSNorm(12, group_size=4, eps=1e-5).double()
    gate_first.load_state_dict(norm.state_dict())
    assert not torch.allclose(gate_first(y, z), want, atol=1e-3)
