"""HF transformers interop: seqlab's logits equal transformers' own CPU path on the same weights.

Small random MambaForCausalLM / Mamba2ForCausalLM models (Mamba-2 also with n_groups > 1 and in Codestral
Mamba's layout: head_dim 64, n_groups 8) are loaded in memory and from a save_pretrained directory, compared
on several lengths (odd, not multiples of chunk_size), round-tripped through ``save`` -> ``from_pretrained``,
stepped token by token after a prefill, and fed broken directories.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM  # noqa: E402

from seqlab import BackboneConfig, LanguageModel  # noqa: E402
from seqlab.errors import ConfigError, CorruptFileError, SeqlabError  # noqa: E402
from seqlab.interop import hf as seqlab_hf  # noqa: E402
from seqlab.testing import rel_err  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 100
TOL = 1e-4

# name -> (config class, model class, config kwargs)
CASES = {
    "mamba1": (
        MambaConfig,
        MambaForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, time_step_rank=4),
    ),
    "mamba1_bias_untied": (
        MambaConfig,
        MambaForCausalLM,
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            state_size=16,
            conv_kernel=3,
            use_bias=True,
            tie_word_embeddings=False,
            layer_norm_epsilon=1e-4,
        ),
    ),
    "mamba2_g2": (
        Mamba2Config,
        Mamba2ForCausalLM,
        dict(hidden_size=64, num_hidden_layers=2, state_size=16, num_heads=8, head_dim=16, n_groups=2, chunk_size=16),
    ),
    "mamba2_g1_tied_bias": (
        Mamba2Config,
        Mamba2ForCausalLM,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            state_size=8,
            num_heads=4,
            head_dim=16,
            n_groups=1,
            chunk_size=8,
            use_bias=True,
            tie_word_embeddings=True,
        ),
    ),
    # Codestral Mamba's layout shape-wise (head_dim 64, n_groups 8, untied head), kept tiny.
    "mamba2_codestral": (
        Mamba2Config,
        Mamba2ForCausalLM,
        dict(
            hidden_size=256,
            num_hidden_layers=1,
            state_size=16,
            num_heads=8,
            head_dim=64,
            n_groups=8,
            chunk_size=32,
            tie_word_embeddings=False,
        ),
    ),
}
LENGTHS = (1, 7, 33, 50)


def make_hf(case: str, seed: int = 0):
    config_cls, model_cls, kwargs = CASES[case]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=VOCAB, **kwargs)).eval()
    # Spread the parameters the init leaves uniform, so that every mapping mistake shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.5, 8.0)))
            elif name.endswith((".D", "norm.weight", "norm_f.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                p.uniform_(-4.0, 0.5)
            elif name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    return model


def ids_of(length: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids):
    return model(ids, use_cache=False).logits


@torch.no_grad()
def seqlab_logits(model, ids):
    return model(ids).logits


@pytest.fixture(scope="module")
def hf_models():
    return {case: make_hf(case, seed=i) for i, case in enumerate(CASES)}


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_in_memory_load_matches_hf_logits(hf_models, case):
    hf = hf_models[case]
    model = seqlab_hf.load(hf)
    assert isinstance(model, LanguageModel)
    assert model.vocab_size == VOCAB
    assert (model.lm_head.weight is model.embeddings.weight) == hf.config.tie_word_embeddings
    for i, length in enumerate(LENGTHS):
        ids = ids_of(length, seed=i)
        assert rel_err(seqlab_logits(model, ids), hf_logits(hf, ids)) <= TOL, (case, length)
    # The seqlab model owns its parameters: changing it does not touch the HF model.
    with torch.no_grad():
        model.backbone.norm_f.weight.add_(1.0)
    assert not torch.equal(model.backbone.norm_f.weight, hf.backbone.norm_f.weight)


@pytest.mark.parametrize("case", ["mamba1", "mamba2_g2", "mamba2_codestral"])
def test_directory_load_and_save_round_trip(hf_models, case, tmp_path):
    hf = hf_models[case]
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = seqlab_hf.load(tmp_path / "hf")
    for i, length in enumerate((5, 37)):
        ids = ids_of(length, seed=10 + i)
        assert rel_err(seqlab_logits(model, ids), hf_logits(hf, ids)) <= TOL, (case, length)

    # save -> transformers' from_pretrained gives the same weights and identical logits.
    seqlab_hf.save(model, tmp_path / "out")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    assert config["architectures"] == [type(hf).__name__]
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    theirs = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    ids = ids_of(29, seed=3)
    assert torch.equal(hf_logits(back, ids), hf_logits(hf, ids))
    # ... and seqlab reads its own save back bit for bit.
    again = seqlab_hf.load(tmp_path / "out")
    assert torch.equal(seqlab_logits(again, ids), seqlab_logits(model, ids))


def test_dtype_argument(hf_models):
    model = seqlab_hf.load(hf_models["mamba1"], dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    ids = ids_of(9)
    assert rel_err(seqlab_logits(model, ids), hf_logits(hf_models["mamba1"], ids)) <= TOL
    with pytest.raises(ConfigError, match="dtype"):
        seqlab_hf.load(hf_models["mamba1"], dtype=torch.int32)


@pytest.mark.parametrize("case", ["mamba1", "mamba2_g2"])
def test_step_after_prefill_matches_hf_continuation(hf_models, case):
    hf = hf_models[case]
    model = seqlab_hf.load(hf)
    ids = ids_of(30, seed=5)
    want = hf_logits(hf, ids)
    prefix = 19
    with torch.no_grad():
        out = model(ids[:, :prefix])
        assert rel_err(out.logits, want[:, :prefix]) <= TOL
        state = out.state
        for t in range(prefix, ids.shape[1]):
            step = model.step(ids[:, t], state)
            state = step.state
            assert rel_err(step.logits, want[:, t]) <= TOL, (case, t)
    assert state.position == ids.shape[1]


# --------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def mamba2_dir(hf_models, tmp_path):
    path = tmp_path / "m2"
    hf_models["mamba2_g2"].save_pretrained(path, safe_serialization=True)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_in_one_error(mamba2_dir):
    def damage(tensors):
        del tensors["backbone.layers.1.mixer.dt_bias"]
        del tensors["lm_head.weight"]
        tensors["backbone.layers.0.mixer.surprise"] = torch.zeros(3)

    edit_weights(mamba2_dir, damage)
    with pytest.raises(CorruptFileError) as info:
        seqlab_hf.load(mamba2_dir)
    message = str(info.value)
    assert "model.safetensors" in message
    assert "backbone.layers.1.mixer.dt_bias" in message and "lm_head.weight" in message
    assert "backbone.layers.0.mixer.surprise" in message


def test_wrong_shape(mamba2_dir):
    edit_weights(mamba2_dir, lambda t: t.__setitem__("backbone.layers.0.mixer.A_log", torch.zeros(9)))
    with pytest.raises(CorruptFileError, match=r"backbone\.layers\.0\.mixer\.A_log has shape \(9,\), expected \(8,\)"):
        seqlab_hf.load(mamba2_dir)


def test_extra_mlp_rows_in_in_proj(mamba2_dir):
    def widen(tensors):
        w = tensors["backbone.layers.0.mixer.in_proj.weight"]
        tensors["backbone.layers.0.mixer.in_proj.weight"] = torch.cat([torch.zeros(2 * 24, w.shape[1]), w])

    edit_weights(mamba2_dir, widen)
    with pytest.raises(ConfigError, match="d_mlp = 24"):
        seqlab_hf.load(mamba2_dir)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_type="llama"), "model_type"),
        (dict(time_step_limit=[0.0, 0.1]), "time_step_limit"),
        (dict(rms_norm=False), "rms_norm"),
        (dict(norm_before_gate=True), "norm_before_gate"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(num_heads=4), "num_heads"),
        (dict(n_groups=3), "n_groups"),
        (dict(expand=1.5), "expand"),
    ],
)
def test_unsupported_config_is_refused_naming_the_field(mamba2_dir, changes, field):
    edit_config(mamba2_dir, **changes)
    with pytest.raises(ConfigError, match=field) as info:
        seqlab_hf.load(mamba2_dir)
    assert "config.json" in str(info.value)


def test_infinite_time_step_limit_spellings_are_accepted(mamba2_dir):
    config = json.loads((mamba2_dir / "config.json").read_text())
    assert config["time_step_limit"][1] == {"__float__": "Infinity"}  # transformers 5's spelling
    (mamba2_dir / "config.json").write_text(
        json.dumps({**config, "time_step_limit": [0.0, float("inf")], "rms_norm": True})
    )  # older: bare Infinity
    assert seqlab_hf.load(mamba2_dir).config.ssm == "mamba2"


def test_pickle_only_directory_is_refused(mamba2_dir):
    (mamba2_dir / "model.safetensors").unlink()
    (mamba2_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not for unpickling")
    with pytest.raises(CorruptFileError, match="safetensors") as info:
        seqlab_hf.load(mamba2_dir)
    assert "pytorch_model.bin" in str(info.value)


def test_other_bad_directories(mamba2_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        seqlab_hf.load(tmp_path / "nowhere")
    (mamba2_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match="safetensors"):
        seqlab_hf.load(mamba2_dir)
    (mamba2_dir / "config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="config.json"):
        seqlab_hf.load(mamba2_dir)
    (mamba2_dir / "config.json").unlink()
    with pytest.raises(CorruptFileError, match="config.json"):
        seqlab_hf.load(mamba2_dir)
    with pytest.raises(SeqlabError):
        seqlab_hf.load(12)


def test_tied_head_that_differs_is_refused(hf_models, tmp_path):
    hf_models["mamba1"].save_pretrained(tmp_path, safe_serialization=True)
    edit_weights(tmp_path, lambda t: t.__setitem__("lm_head.weight", torch.zeros(VOCAB, 32)))
    with pytest.raises(CorruptFileError, match="tie_word_embeddings"):
        seqlab_hf.load(tmp_path)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(bidirectional=True), "bidirectional"),
        (dict(layer_overrides={1: {"mixer": "mamba2"}}), "layer_overrides"),
        (dict(ffn="mlp"), "ffn"),
    ],
)
def test_save_refuses_what_hf_cannot_represent(tmp_path, kw, field):
    model = LanguageModel(BackboneConfig(d_model=16, n_layer=2, d_state=4, headdim=8, **kw), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=field):
        seqlab_hf.save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_sharded_directory_loads(hf_models, tmp_path):
    hf = hf_models["mamba2_g2"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ids = ids_of(21, seed=4)
    assert rel_err(seqlab_logits(seqlab_hf.load(tmp_path), ids), hf_logits(hf, ids)) <= TOL


def test_a_seqlab_model_is_not_an_hf_model(hf_models):
    with pytest.raises(SeqlabError, match="already a seqlab"):
        seqlab_hf.load(seqlab_hf.load(hf_models["mamba1"]))
