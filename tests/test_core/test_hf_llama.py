"""HF interop for LlamaForCausalLM: seqlab's logits equal transformers' own CPU forward on the same weights.

Tiny seeded LlamaForCausalLM models (GQA and multi-head, tied and untied, attention biases, an explicit
head_dim wider than hidden_size / heads, linear and llama3 rope scaling) are saved with ``save_pretrained``,
loaded with ``seqlab.interop.hf.load``, run whole, as a chunked prefill threading the state, and decoded step by
step after it (against transformers' forward of the longer sequence), saved back with seqlab and reloaded in
transformers. Each field seqlab refuses is refused by name.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from seqlab import BackboneConfig, LanguageModel  # noqa: E402
from seqlab.errors import ConfigError, CorruptFileError  # noqa: E402
from seqlab.interop import hf as seqlab_hf  # noqa: E402
from seqlab.testing import rel_err  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 64
TOL = 1e-4
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied_bias_wide_heads": dict(
        num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, head_dim=16, rms_norm_eps=1e-5
    ),
    "gqa_linear_rope": dict(
        num_key_value_heads=1, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}
    ),
    "gqa_llama3_rope": dict(num_key_value_heads=2, rope_parameters=LLAMA3),
}


def make_hf(case: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **BASE, **CASES[case])).eval()
    with torch.no_grad():  # spread what the init leaves uniform, so every mapping mistake shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
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


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_directory_load_matches_hf_logits(hf_dirs, case):
    hf, path = hf_dirs[case]
    model = seqlab_hf.load(path)
    assert model.config.ssm == "attention" and model.config.ffn == "mlp"
    assert (model.lm_head.weight is model.embeddings.weight) == hf.config.tie_word_embeddings
    settings = model.config.attention_settings(0)
    assert (settings.heads, settings.kv_heads, settings.head_dim) == (
        hf.config.num_attention_heads,
        hf.config.num_key_value_heads,
        hf.config.head_dim,
    )
    for i, length in enumerate((1, 9, 40)):
        ids = ids_of(length, seed=i)
        with torch.no_grad():
            assert rel_err(model(ids).logits, hf_logits(hf, ids)) <= TOL, (case, length)


@pytest.mark.parametrize("case", ["gqa_untied", "mha_tied_bias_wide_heads"])
def test_in_memory_load_matches_and_owns_its_weights(hf_dirs, case):
    hf, _ = hf_dirs[case]
    model = seqlab_hf.load(hf)
    ids = ids_of(17, seed=3)
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf_logits(hf, ids)) <= TOL
        model.backbone.norm_f.weight.add_(1.0)
    assert not torch.equal(model.backbone.norm_f.weight, hf.model.norm.weight)


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_prefill_then_decode_matches_hf_full_forward(hf_dirs, case):
    hf, path = hf_dirs[case]
    model = seqlab_hf.load(path)
    ids = ids_of(30, seed=7)
    want = hf_logits(hf, ids)
    with torch.no_grad():
        first = model(ids[:, :11])
        second = model(ids[:, 11:23], first.state)
        assert rel_err(first.logits, want[:, :11]) <= TOL
        assert rel_err(second.logits, want[:, 11:23]) <= TOL
        state = second.state
        for t in range(23, 30):
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
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] == hf.config.tie_word_embeddings
    assert config["num_key_value_heads"] == hf.config.num_key_value_heads
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    theirs = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    ids = ids_of(25, seed=4)
    assert torch.equal(hf_logits(back, ids), hf_logits(hf, ids))
    again = seqlab_hf.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_older_rope_theta_and_rope_scaling_keys(hf_dirs, tmp_path):
    """transformers 4's spelling: rope_theta and rope_scaling ({"type": ...}) at the top level."""
    hf, path = hf_dirs["gqa_linear_rope"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (legacy / "config.json").write_text(json.dumps(config))
    model = seqlab_hf.load(legacy)
    assert model.config.attn_rope_theta == 1000.0
    assert dict(model.config.attn_rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    ids = ids_of(21, seed=2)
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf_logits(hf, ids)) <= TOL


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def llama_dir(hf_dirs, tmp_path):
    _, path = hf_dirs["gqa_untied"]
    out = tmp_path / "llama"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((path / name).read_bytes())
    return out


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "rope_type"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}), "rope_parameters"),
        (dict(rope_scaling={"type": "longrope", "factor": 2.0}), "rope_scaling"),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
            "partial_rotary_factor",
        ),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}), "factor"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(architectures=["MambaForCausalLM"]), "architectures"),
    ],
)
def test_unsupported_config_is_refused_naming_the_field(llama_dir, changes, field):
    edit_config(llama_dir, **changes)
    with pytest.raises(ConfigError, match=field) as info:
        seqlab_hf.load(llama_dir)
    assert "config.json" in str(info.value)


def test_missing_unexpected_and_misshapen_tensors_are_named(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptFileError) as info:
        seqlab_hf.load(llama_dir)
    message = str(info.value)
    assert "model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.0.self_attn.rotary.weight" in message
    assert "model.layers.0.self_attn.k_proj.weight" in message


def test_tied_head_that_differs_is_refused(llama_dir):
    edit_config(llama_dir, tie_word_embeddings=True)
    with pytest.raises(CorruptFileError, match="tie_word_embeddings"):
        seqlab_hf.load(llama_dir)


ATTN = dict(d_model=32, n_layer=2, ssm="attention", ffn="mlp", attn_heads=4, residual_in_fp32=False)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(attn_window=8), "attn_window"),
        (dict(attn_bias=True), "attn_out_bias"),
        (dict(attn_rope_dim=4), "attn_rope_dim"),
        (dict(ffn=None), "ffn"),
        (dict(layer_overrides={1: {"options": {"attn_kv_heads": 2}}}), "options"),
        (dict(attn_heads=3, attn_head_dim=8), "attn_heads"),
        (dict(bidirectional=True), "bidirectional"),
    ],
)
def test_save_refuses_what_llama_cannot_represent(tmp_path, kw, field):
    model = LanguageModel(BackboneConfig(**{**ATTN, **kw}), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=field):
        seqlab_hf.save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_save_refuses_a_bf16_model_with_an_fp32_residual(tmp_path):
    model = LanguageModel(BackboneConfig(**{**ATTN, "residual_in_fp32": True}), vocab_size=VOCAB).to(torch.bfloat16)
    with pytest.raises(ConfigError, match="residual_in_fp32"):
        seqlab_hf.save(model, tmp_path / "out")


def test_a_seqlab_born_attention_model_saves_as_llama(tmp_path):
    torch.manual_seed(0)
    config = BackboneConfig(**{**ATTN, "attn_kv_heads": 2, "attn_rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    model = LanguageModel(config, vocab_size=VOCAB, tie_embeddings=False).eval()
    seqlab_hf.save(model, tmp_path / "out")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = ids_of(19, seed=9)
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf_logits(back, ids)) <= TOL
