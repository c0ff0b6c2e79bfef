"""HF interop for JambaForCausalLM and BambaForCausalLM: seqlab's logits equal transformers' own CPU forward.

Tiny seeded models: Jamba with attention and MoE (top-2, unrenormalised) layers overlapping, and one with them
apart (top-1, tied, Mamba biases); Bamba with one attention layer (GQA, partial rotary) and one with two
(n_groups 2, tied, attention biases, linear rope scaling). Each is loaded from its save_pretrained directory
(and in memory), run whole, as a chunked prefill threading the state, and decoded step by step after it, saved
back with seqlab and reloaded in transformers. Each field seqlab refuses is refused by name.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import BambaConfig, BambaForCausalLM, JambaConfig, JambaForCausalLM  # noqa: E402

from seqlab import BackboneConfig, LanguageModel  # noqa: E402
from seqlab.errors import ConfigError  # noqa: E402
from seqlab.interop import hf as seqlab_hf  # noqa: E402
from seqlab.testing import rel_err  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 64
TOL = 1e-4
JAMBA = dict(
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    mamba_d_state=8,
    mamba_dt_rank=4,
    mamba_d_conv=4,
)
BAMBA = dict(
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    mamba_n_heads=4,
    mamba_d_state=8,
    mamba_chunk_size=8,
)
CASES = {
    # attention on layers 1, 3 and MoE (top-2) on the same layers; Mamba layers with dense MLPs
    "jamba_overlap_top2": (
        JambaConfig,
        JambaForCausalLM,
        dict(
            JAMBA,
            num_hidden_layers=4,
            num_key_value_heads=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
        ),
    ),
    # attention on layers 0, 3, MoE (top-1) on 0, 2: every combination of mixer and feed-forward
    "jamba_apart_top1_tied": (
        JambaConfig,
        JambaForCausalLM,
        dict(
            JAMBA,
            num_hidden_layers=4,
            num_key_value_heads=4,
            attn_layer_period=3,
            attn_layer_offset=0,
            num_experts=3,
            num_experts_per_tok=1,
            expert_layer_period=2,
            expert_layer_offset=0,
            tie_word_embeddings=True,
            mamba_proj_bias=True,
            mamba_conv_bias=False,
            rms_norm_eps=1e-5,
        ),
    ),
    "bamba_gqa": (
        BambaConfig,
        BambaForCausalLM,
        dict(BAMBA, num_hidden_layers=3, num_key_value_heads=2, attn_layer_indices=[1]),
    ),
    "bamba_groups_tied_bias_linear": (
        BambaConfig,
        BambaForCausalLM,
        dict(
            BAMBA,
            num_hidden_layers=4,
            num_key_value_heads=4,
            attn_layer_indices=[0, 3],
            mamba_n_groups=2,
            tie_word_embeddings=True,
            attention_bias=True,
            mamba_proj_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
        ),
    ),
}


def make_hf(case: str, seed: int = 0):
    config_cls, model_cls, kwargs = CASES[case]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=VOCAB, **kwargs)).eval()
    with torch.no_grad():  # spread what the init leaves uniform, so every mapping mistake shows
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.5, 8.0)))
            elif name.endswith(".D") or "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                p.uniform_(-4.0, 0.5)
            elif name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 1.0)  # decisive routing: no near-ties for rounding to flip
            else:
                p.normal_(0.0, 0.2)
    return model


def ids_of(length: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids):
    return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """case -> (HF model, its save_pretrained directory)."""
    out = {}
    for i, case in enumerate(CASES):
        model = make_hf(case, seed=i)
        path = tmp_path_factory.mktemp(case)
        model.save_pretrained(path)
        out[case] = (model, path)
    return out


def layer_kinds(model: LanguageModel) -> list[tuple[str, str | None]]:
    return [model.config.layer_spec(i)[:2] for i in range(model.config.n_layer)]


# --------------------------------------------------------------------------------------------------
def test_layer_layouts_map_to_layer_overrides(hf_dirs):
    top2 = seqlab_hf.load(hf_dirs["jamba_overlap_top2"][1])
    assert layer_kinds(top2) == [("mamba1", "mlp"), ("attention", "moe")] * 2
    assert top2.config.mamba_inner_norms is True and top2.config.moe_renormalize is False
    assert top2.config.attention_settings(1).rope_dim == 0
    apart = seqlab_hf.load(hf_dirs["jamba_apart_top1_tied"][1])
    assert layer_kinds(apart) == [("attention", "moe"), ("mamba1", "mlp"), ("mamba1", "moe"), ("attention", "mlp")]
    bamba = seqlab_hf.load(hf_dirs["bamba_groups_tied_bias_linear"][1])
    assert layer_kinds(bamba) == [("attention", "mlp"), ("mamba2", "mlp"), ("mamba2", "mlp"), ("attention", "mlp")]
    settings = bamba.config.attention_settings(0)
    assert (settings.head_dim, settings.rope_dim) == (8, 4)  # Bamba's partial_rotary_factor 0.5
    assert bamba.config.ngroups == 2


@pytest.mark.parametrize("case", list(CASES))
def test_directory_load_matches_hf_logits(hf_dirs, case):
    hf, path = hf_dirs[case]
    model = seqlab_hf.load(path)
    assert (model.lm_head.weight is model.embeddings.weight) == hf.config.tie_word_embeddings
    for i, length in enumerate((1, 11, 37)):
        ids = ids_of(length, seed=i)
        with torch.no_grad():
            assert rel_err(model(ids).logits, hf_logits(hf, ids)) <= TOL, (case, length)


@pytest.mark.parametrize("case", ["jamba_overlap_top2", "bamba_gqa"])
def test_in_memory_load_matches(hf_dirs, case):
    """transformers 5 keeps Jamba's experts fused in memory (experts.gate_up_proj); on disk they are per expert."""
    hf, _ = hf_dirs[case]
    model = seqlab_hf.load(hf)
    ids = ids_of(20, seed=5)
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_prefill_then_decode_matches_hf_full_forward(hf_dirs, case):
    hf, path = hf_dirs[case]
    model = seqlab_hf.load(path)
    ids = ids_of(30, seed=7)
    want = hf_logits(hf, ids)
    with torch.no_grad():
        first = model(ids[:, :13])
        second = model(ids[:, 13:24], first.state)
        assert rel_err(first.logits, want[:, :13]) <= TOL
        assert rel_err(second.logits, want[:, 13:24]) <= TOL
        state = second.state
        for t in range(24, 30):
            step = model.step(ids[:, t], state)
            state = step.state
            assert rel_err(step.logits, want[:, t]) <= TOL, (case, t)
    assert state.position == 30


@pytest.mark.parametrize("case", list(CASES))
def test_save_round_trip_through_transformers(hf_dirs, case, tmp_path):
    hf, path = hf_dirs[case]
    model = seqlab_hf.load(path)
    seqlab_hf.save(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    assert config["tie_word_embeddings"] == hf.config.tie_word_embeddings
    # the same tensor names as transformers' own save (per-expert MoE weights, no lm_head when tied)
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_file(path / "model.safetensors"))
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    assert back.config.layers_block_type == hf.config.layers_block_type
    theirs = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    ids = ids_of(23, seed=4)
    assert torch.equal(hf_logits(back, ids), hf_logits(hf, ids))
    again = seqlab_hf.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_a_seqlab_born_jamba_layout_saves_and_reloads_in_transformers(tmp_path):
    """MoE chosen by moe_every, attention by an override: save finds Jamba's periods and offsets."""
    torch.manual_seed(1)
    config = BackboneConfig(
        d_model=32,
        n_layer=4,
        ssm="mamba1",
        d_state=8,
        mamba_inner_norms=True,
        ffn="moe",
        moe_every=2,
        moe_experts=4,
        moe_top_k=2,
        moe_renormalize=False,
        d_ffn=48,
        layer_overrides={2: {"mixer": "attention"}},
        attn_heads=4,
        attn_kv_heads=2,
        attn_rope_dim=0,
        residual_in_fp32=False,
    )
    model = LanguageModel(config, vocab_size=VOCAB, tie_embeddings=False).eval()
    seqlab_hf.save(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["attn_layer_period"], saved["attn_layer_offset"]) == (3, 2)
    assert (saved["expert_layer_period"], saved["expert_layer_offset"]) == (2, 1)
    back = JambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = ids_of(21, seed=9)
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf_logits(back, ids)) <= TOL


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
def copy_dir(hf_dirs, case, tmp_path):
    out = tmp_path / case
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((hf_dirs[case][1] / name).read_bytes())
    return out


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case, changes, field",
    [
        ("jamba_overlap_top2", dict(hidden_act="gelu"), "hidden_act"),
        ("jamba_overlap_top2", dict(sliding_window=8), "sliding_window"),
        ("jamba_overlap_top2", dict(attn_layer_offset=2), "attn_layer_offset"),
        ("jamba_overlap_top2", dict(expert_layer_period=0), "expert_layer_period"),
        ("jamba_overlap_top2", dict(num_experts_per_tok=5), "num_experts_per_tok"),
        ("jamba_overlap_top2", dict(mamba_expand=1.5), "mamba_expand"),
        ("jamba_overlap_top2", dict(architectures=["LlamaForCausalLM"]), "architectures"),
        ("bamba_gqa", dict(hidden_act="relu"), "hidden_act"),
        ("bamba_gqa", dict(mlp_bias=True), "mlp_bias"),
        ("bamba_gqa", dict(time_step_limit=[0.0, 0.1]), "time_step_limit"),
        ("bamba_gqa", dict(mamba_d_head=7), "mamba_d_head"),
        ("bamba_gqa", dict(mamba_n_groups=3), "mamba_n_groups"),
        ("bamba_gqa", dict(attn_layer_indices=[9]), "attn_layer_indices"),
        (
            "bamba_gqa",
            dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}),
            "rope_type",
        ),
        (
            "bamba_gqa",
            dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.375}),
            "partial_rotary_factor",
        ),
    ],
)
def test_unsupported_config_is_refused_naming_the_field(hf_dirs, tmp_path, case, changes, field):
    path = copy_dir(hf_dirs, case, tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ConfigError, match=field) as info:
        seqlab_hf.load(path)
    assert "config.json" in str(info.value)


def test_infinite_time_step_limit_spellings_are_accepted(hf_dirs, tmp_path):
    path = copy_dir(hf_dirs, "bamba_gqa", tmp_path)
    assert json.loads((path / "config.json").read_text())["time_step_limit"][1] == {"__float__": "Infinity"}
    edit_config(path, time_step_limit=[0.0, math.inf])
    assert seqlab_hf.load(path).config.ssm == "mamba2"


HYBRID = dict(d_model=32, n_layer=4, d_state=8, ffn="mlp", d_ffn=48, residual_in_fp32=False)
JAMBA_LIKE = dict(HYBRID, ssm="mamba1", mamba_inner_norms=True)
BAMBA_LIKE = dict(HYBRID, ssm="mamba2", headdim=16)
ATTN_1 = {1: {"mixer": "attention"}}


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(HYBRID, ssm="mamba1"), "mamba_inner_norms"),
        (dict(JAMBA_LIKE, layer_overrides={1: {"mixer": "mamba2"}}, headdim=16), "layer_overrides"),
        (dict(JAMBA_LIKE, layer_overrides=ATTN_1, attn_heads=4), "attn_rope_dim"),
        (dict(JAMBA_LIKE, layer_overrides=ATTN_1, attn_heads=4, attn_rope_dim=0, attn_bias=True), "attn_bias"),
        (
            dict(JAMBA_LIKE, layer_overrides={i: {"mixer": "attention"} for i in (0, 1, 3)}, attn_rope_dim=0),
            "attention layers",
        ),
        (dict(JAMBA_LIKE, ffn="moe", moe_experts=4, moe_top_k=2), "moe_renormalize"),
        (dict(JAMBA_LIKE, ffn="moe", moe_experts=4, moe_d_expert=32), "moe_d_expert"),
        (dict(JAMBA_LIKE, layer_overrides={2: {"ffn": "none"}}), "ffn"),
        (dict(BAMBA_LIKE, ffn="moe", moe_experts=4), "moe"),
        (dict(BAMBA_LIKE, layer_overrides=ATTN_1, attn_heads=4, attn_rope_dim=0), "attn_rope_dim"),
        (dict(BAMBA_LIKE, layer_overrides=ATTN_1, attn_heads=4, attn_window=8), "attn_window"),
        (dict(BAMBA_LIKE, layer_overrides={1: {"options": {"d_state": 4}}}), "options"),
    ],
)
def test_save_refuses_what_jamba_and_bamba_cannot_represent(tmp_path, kw, field):
    model = LanguageModel(BackboneConfig(**kw), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=field):
        seqlab_hf.save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
