"""HF checkpoints at real size: sharded safetensors directories in fp32 / bf16 / fp16, loaded without a second
copy of the weights (meta-device model, every tensor read straight into its parameter) with ``dtype=`` and
``device=``, saved sharded with HF's names and index atomically, bad shards refused naming file and tensor
before anything is read, and Codestral Mamba's layout: a tiny random transformers ``Mamba2ForCausalLM`` with
its settings (n_groups 8, head_dim 64, state_size 128, untied head), saved sharded by transformers itself,
matches HF's logits; the full 7B config on the meta device gives the published parameter count and the state
size per sequence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seqlab import BackboneConfig, LanguageModel
from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.interop import hf as seqlab_hf
from seqlab.testing import rel_err

VOCAB = 64
TOL = 1e-4
INDEX = "model.safetensors.index.json"

# mistralai/Mamba-Codestral-7B-v0.1's config.json (HF format, as published with the model; its values are also
# transformers' Mamba2Config defaults). Keys transformers ignores (bos/eos ids, initializer_range) left out.
CODESTRAL = {
    "architectures": ["Mamba2ForCausalLM"],
    "model_type": "mamba2",
    "chunk_size": 256,
    "conv_kernel": 4,
    "expand": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "layer_norm_epsilon": 1e-05,
    "n_groups": 8,
    "num_heads": 128,
    "num_hidden_layers": 64,
    "residual_in_fp32": True,
    "rms_norm": True,
    "state_size": 128,
    "tie_word_embeddings": False,
    "time_step_floor": 0.0001,
    "time_step_limit": [0.0, float("inf")],
    "time_step_max": 0.1,
    "time_step_min": 0.001,
    "time_step_rank": 256,
    "torch_dtype": "bfloat16",
    "use_bias": False,
    "use_conv_bias": True,
    "vocab_size": 32768,
}
# The same layout, tiny: n_groups 8 x head_dim 64 needs at least 8 heads, so d_inner 512 and hidden 256.
TINY_CODESTRAL = {**CODESTRAL, "hidden_size": 256, "num_heads": 8, "num_hidden_layers": 2, "vocab_size": VOCAB}


def small_model(dtype=torch.float32, ssm="mamba2", seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    config = BackboneConfig(d_model=32, n_layer=3, ssm=ssm, d_state=8, headdim=16, chunk_size=8)
    return LanguageModel(config, vocab_size=VOCAB, tie_embeddings=False).to(dtype).eval()


def ids_of(length: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def shards_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))


def same_parameters(a: LanguageModel, b: LanguageModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------
# save sharded, load back
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sharded_round_trip_keeps_dtype_and_every_bit(tmp_path, dtype):
    model = small_model(dtype)
    seqlab_hf.save(model, tmp_path, max_shard_size=8_000)
    shards = shards_of(tmp_path)
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    index = json.loads((tmp_path / INDEX).read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["weight_map"].values()) == set(shards)
    total = 0
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), framework="pt") as f:  # the safetensors package reads our shards
            tensor = f.get_tensor(name)
        assert tensor.dtype == dtype
        total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    for shard in shards:  # a tensor larger than the limit gets a shard of its own, the others stay under it
        names = [n for n, s in index["weight_map"].items() if s == shard]
        size = sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / shard)).values())
        assert size <= 8_000 or len(names) == 1

    loaded = seqlab_hf.load(tmp_path)
    assert loaded.embeddings.weight.dtype == dtype and not loaded.training
    assert same_parameters(loaded, model)
    ids = ids_of(13)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dtype_and_device_arguments(tmp_path):
    model = small_model(torch.bfloat16)
    seqlab_hf.save(model, tmp_path, max_shard_size="10KB")
    up = seqlab_hf.load(tmp_path, dtype=torch.float32, device="cpu")
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in up.parameters())
    assert all(torch.equal(up.state_dict()[k], v.float()) for k, v in model.state_dict().items())
    assert seqlab_hf.load(tmp_path, dtype="float16").embeddings.weight.dtype == torch.float16
    meta = seqlab_hf.load(tmp_path, device="meta")  # shapes and checks only, nothing read
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in meta.parameters())
    with pytest.raises(ConfigError, match="dtype"):
        seqlab_hf.load(tmp_path, dtype=torch.int8)
    with pytest.raises(ConfigError, match="device"):
        seqlab_hf.load(tmp_path, device="no-such-device")


def test_weights_are_read_straight_into_the_parameters(tmp_path, monkeypatch):
    """No second copy: in the checkpoint's dtype every tensor's bytes land in the parameter's own memory."""
    model = small_model(torch.bfloat16)
    seqlab_hf.save(model, tmp_path, max_shard_size="10KB")
    targets: list[int] = []
    read_into = seqlab_hf._Stored.read_into

    def spy(self, out, handle):
        targets.append(out.data_ptr())
        read_into(self, out, handle)

    monkeypatch.setattr(seqlab_hf._Stored, "read_into", spy)
    loaded = seqlab_hf.load(tmp_path)
    params = {p.data_ptr() for p in loaded.parameters()}
    assert sorted(targets) == sorted(params) and len(targets) == len(params)


def test_resave_replaces_the_old_layout(tmp_path):
    a, b = small_model(seed=1), small_model(seed=2)
    seqlab_hf.save(a, tmp_path, max_shard_size=8_000)
    old_shards = shards_of(tmp_path)
    seqlab_hf.save(b, tmp_path)  # fits the default 5GB: one model.safetensors, the shards and index removed
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / INDEX).exists()
    assert shards_of(tmp_path) == [] and old_shards
    assert same_parameters(seqlab_hf.load(tmp_path), b)
    seqlab_hf.save(a, tmp_path, max_shard_size=8_000)  # and back: the single file must not shadow the index
    assert not (tmp_path / "model.safetensors").exists() and same_parameters(seqlab_hf.load(tmp_path), a)
    (tmp_path / "tokenizer.json").write_text("{}")
    seqlab_hf.save(b, tmp_path, max_shard_size=20_000)  # fewer shards: the extra old ones go, other files stay
    assert (tmp_path / "tokenizer.json").is_file() and len(shards_of(tmp_path)) < len(old_shards)
    assert same_parameters(seqlab_hf.load(tmp_path), b)


def test_a_failed_save_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    old, new = small_model(seed=1), small_model(seed=2)
    seqlab_hf.save(old, tmp_path, max_shard_size=8_000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = {"n": 0}
    write = seqlab_hf._write_safetensors

    def failing(handle, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        write(handle, tensors)

    monkeypatch.setattr(seqlab_hf, "_write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        seqlab_hf.save(new, tmp_path, max_shard_size=5_000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries, nothing replaced
    calls["n"] = 0
    with pytest.raises(OSError, match="disk full"):
        seqlab_hf.save(new, tmp_path / "fresh" / "dir", max_shard_size=5_000)
    assert not (tmp_path / "fresh" / "dir").exists()  # the directory the failed save made is gone too
    monkeypatch.undo()
    assert same_parameters(seqlab_hf.load(tmp_path), old)


@pytest.mark.parametrize(
    "size, expected", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("10kb", 10_000), (1234, 1234), (None, None)]
)
def test_max_shard_size_spellings(size, expected):
    assert seqlab_hf._parse_size(size) == expected


@pytest.mark.parametrize("size", ["big", "-5GB", 0, -1, True, "5 parsecs"])
def test_bad_max_shard_size_is_refused(tmp_path, size):
    with pytest.raises(ConfigError, match="max_shard_size"):
        seqlab_hf.save(small_model(), tmp_path, max_shard_size=size)
    assert not any(tmp_path.iterdir())


def test_transformer_family_saves_sharded_too(tmp_path):
    config = BackboneConfig(d_model=32, n_layer=2, ssm="attention", ffn="mlp", attn_heads=4, residual_in_fp32=False)
    model = LanguageModel(config, vocab_size=VOCAB).eval()
    seqlab_hf.save(model, tmp_path, max_shard_size=10_000)
    assert len(shards_of(tmp_path)) > 1 and (tmp_path / INDEX).is_file()
    assert same_parameters(seqlab_hf.load(tmp_path), model)
    half = seqlab_hf.load(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert torch.equal(half.embeddings.weight, model.embeddings.weight.to(torch.bfloat16))


def test_a_model_without_data_is_not_saved(tmp_path):
    with torch.device("meta"):
        model = LanguageModel(BackboneConfig(d_model=32, n_layer=1, d_state=8, headdim=16), vocab_size=VOCAB)
    with pytest.raises(InputError, match="meta device"):
        seqlab_hf.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_a_gpu(tmp_path):
    model = small_model(torch.bfloat16)
    seqlab_hf.save(model, tmp_path, max_shard_size="10KB")
    for dtype in (None, torch.float32):
        on_gpu = seqlab_hf.load(tmp_path, dtype=dtype, device="cuda")
        assert all(p.device.type == "cuda" for p in on_gpu.parameters())
        want = {k: v.to(dtype or v.dtype) for k, v in model.state_dict().items()}
        assert all(torch.equal(v.cpu(), want[k]) for k, v in on_gpu.state_dict().items())


# --------------------------------------------------------------------------------------------------
# bad shards: clear errors, nothing read before everything is checked
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def sharded(tmp_path):
    seqlab_hf.save(small_model(), tmp_path, max_shard_size=8_000)
    return tmp_path


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def test_missing_shard_names_file_and_tensor(sharded):
    name, shard = sorted(weight_map(sharded).items())[-1]
    (sharded / shard).unlink()
    with pytest.raises(CorruptFileError, match=shard) as info:
        seqlab_hf.load(sharded)
    assert INDEX in str(info.value) and "is not a file" in str(info.value)
    assert any(n in str(info.value) for n, s in weight_map(sharded).items() if s == shard)


def test_index_naming_a_tensor_absent_from_its_shard(sharded):
    index = json.loads((sharded / INDEX).read_text())
    shard = index["weight_map"]["backbone.norm_f.weight"]
    index["weight_map"]["backbone.layers.9.mixer.D"] = shard
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptFileError, match=r"does not hold .*backbone\.layers\.9\.mixer\.D") as info:
        seqlab_hf.load(sharded)
    assert shard in str(info.value)


def test_shard_holding_a_tensor_the_index_does_not_place_there(sharded):
    index = json.loads((sharded / INDEX).read_text())
    shared = [s for s in set(index["weight_map"].values()) if list(index["weight_map"].values()).count(s) > 1]
    name = next(n for n, s in sorted(index["weight_map"].items()) if s == sorted(shared)[0])
    del index["weight_map"][name]
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptFileError, match="does not place") as info:
        seqlab_hf.load(sharded)
    assert name in str(info.value) and sorted(shared)[0] in str(info.value)


def test_truncated_shard_names_file_and_tensor(sharded):
    shard = shards_of(sharded)[1]
    path = sharded / shard
    last = list(load_file(str(path)))[-1]
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 3)
    with pytest.raises(CorruptFileError, match="truncated") as info:
        seqlab_hf.load(sharded)
    assert shard in str(info.value) and last in str(info.value)
    with open(path, "r+b") as handle:  # cut inside the header
        handle.truncate(20)
    with pytest.raises(CorruptFileError, match=shard):
        seqlab_hf.load(sharded)


def test_shape_that_does_not_match_the_config_is_found_before_reading(sharded, monkeypatch):
    name, shard = sorted(weight_map(sharded).items())[-1]
    tensors = load_file(str(sharded / shard))
    tensors[name] = torch.zeros(*tensors[name].shape[:-1], tensors[name].shape[-1] + 1)
    save_file(tensors, str(sharded / shard), metadata={"format": "pt"})
    read: list[str] = []
    monkeypatch.setattr(seqlab_hf._Stored, "read_into", lambda self, out, handle: read.append(self.name))
    with pytest.raises(CorruptFileError, match="does not match its config") as info:
        seqlab_hf.load(sharded)
    assert name in str(info.value) and "expected" in str(info.value)
    assert read == []  # nothing was read, let alone returned


def test_damaged_headers_and_index(sharded):
    shard = shards_of(sharded)[0]
    raw = (sharded / shard).read_bytes()
    (sharded / shard).write_bytes(raw[:8] + b"[" + raw[9:])
    with pytest.raises(CorruptFileError, match=f"{shard}.*not JSON"):
        seqlab_hf.load(sharded)
    (sharded / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere"}}))
    with pytest.raises(CorruptFileError, match="not a file name"):
        seqlab_hf.load(sharded)
    (sharded / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CorruptFileError, match="weight_map"):
        seqlab_hf.load(sharded)


def test_sharded_pickles_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(seqlab_hf.config_to_hf(small_model().config, VOCAB, False)))
    (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(CorruptFileError, match="never unpickles"):
        seqlab_hf.load(tmp_path)


# --------------------------------------------------------------------------------------------------
# Codestral Mamba
# --------------------------------------------------------------------------------------------------
def test_codestral_7b_on_the_meta_device(tmp_path):
    model = seqlab_hf.meta_model(CODESTRAL)
    assert all(p.is_meta for p in model.parameters())
    assert seqlab_hf.parameter_count(model) == 7_285_403_648  # the published count
    (tmp_path / "config.json").write_text(json.dumps({**CODESTRAL, "time_step_limit": [0.0, "Infinity"]}))
    assert seqlab_hf.parameter_count(seqlab_hf.meta_model(tmp_path)) == 7_285_403_648
    # tied, the LM head's 32768 x 4096 would be counted once
    tied = seqlab_hf.meta_model({**CODESTRAL, "tie_word_embeddings": True})
    assert seqlab_hf.parameter_count(tied) == 7_285_403_648 - 32768 * 4096

    # per layer: conv state (d_inner + 2 * n_groups * d_state) x (conv_kernel - 1) + SSM state heads x head_dim x
    # d_state; 64 layers
    per_layer = (8192 + 2 * 8 * 128) * 3 + 128 * 64 * 128
    assert seqlab_hf.state_bytes(CODESTRAL) == 64 * per_layer * 4 == 276_299_776
    assert seqlab_hf.state_bytes(CODESTRAL, torch.bfloat16) == 64 * per_layer * 2
    assert seqlab_hf.state_bytes(model, "float32", batch_size=3) == 3 * 276_299_776
    assert seqlab_hf.state_bytes(model.config) == 276_299_776


def test_state_bytes_matches_a_real_state():
    model = small_model()
    state = model.init_state(2)
    real = sum(t.numel() * t.element_size() for layer in state.layers for t in layer.values())
    assert seqlab_hf.state_bytes(model, batch_size=2) == real
    with pytest.raises(ConfigError, match="batch_size"):
        seqlab_hf.state_bytes(model, batch_size=0)


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_codestral():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    transformers.utils.logging.set_verbosity_error()
    fields = {k: v for k, v in TINY_CODESTRAL.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    model = Mamba2ForCausalLM(Mamba2Config(**fields)).eval()
    with torch.no_grad():  # spread what the init leaves uniform, so that every mapping mistake shows
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.5, 8.0)))
            elif name.endswith((".D", "norm.weight", "norm_f.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-4.0, 0.5)
            elif name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    return model


@torch.no_grad()
def hf_logits(model, ids):
    return model(ids, use_cache=False).logits


def test_tiny_codestral_saved_sharded_by_transformers_matches_hf_fp32(tiny_codestral, tmp_path):
    tiny_codestral.save_pretrained(tmp_path, max_shard_size="500KB")
    assert len(shards_of(tmp_path)) > 1 and (tmp_path / INDEX).is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["n_groups"], config["head_dim"], config["state_size"]) == (8, 64, 128)
    assert config.get("tie_word_embeddings") is False
    model = seqlab_hf.load(tmp_path)
    assert model.embeddings.weight.dtype == torch.float32 and model.lm_head.weight is not model.embeddings.weight
    for length in (1, 37, 300):  # 300 > chunk_size 256
        ids = ids_of(length, seed=length)
        with torch.no_grad():
            assert rel_err(model(ids).logits, hf_logits(tiny_codestral, ids)) <= TOL


def test_tiny_codestral_bf16_shards(tiny_codestral, tmp_path):
    from transformers import Mamba2ForCausalLM

    bf16 = Mamba2ForCausalLM(tiny_codestral.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(tiny_codestral.state_dict())
    bf16.save_pretrained(tmp_path, max_shard_size="300KB")
    assert len(shards_of(tmp_path)) > 1
    model = seqlab_hf.load(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    hf_state = {k.replace("backbone.embeddings", "embeddings"): v for k, v in bf16.state_dict().items()}
    assert all(torch.equal(v, hf_state[k]) for k, v in model.state_dict().items())
    # the same bf16 weights computed in fp32 on both sides
    wide = seqlab_hf.load(tmp_path, dtype=torch.float32)
    reference = Mamba2ForCausalLM(tiny_codestral.config).eval()
    reference.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    ids = ids_of(41, seed=3)
    with torch.no_grad():
        assert rel_err(wide(ids).logits, hf_logits(reference, ids)) <= TOL


def test_in_memory_hf_model_with_dtype_and_device(tiny_codestral):
    model = seqlab_hf.load(tiny_codestral, dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.lm_head.weight, tiny_codestral.lm_head.weight.to(torch.bfloat16))


def test_seqlab_shards_load_in_transformers(tmp_path, tiny_codestral):
    from transformers import Mamba2ForCausalLM

    model = seqlab_hf.load(tiny_codestral)
    seqlab_hf.save(model, tmp_path, max_shard_size="400KB")
    assert len(shards_of(tmp_path)) > 1
    back = Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = ids_of(29, seed=5)
    with torch.no_grad():
        assert rel_err(hf_logits(back, ids), model(ids).logits) <= TOL


def test_worked_example_bf16(tmp_path):
    """The example of the checkpoints documentation: build, save sharded bf16, reload, run a forward."""
    config = BackboneConfig(d_model=64, n_layer=2, ssm="mamba2", d_state=16, headdim=16, residual_in_fp32=False)
    model = LanguageModel(config, vocab_size=VOCAB).to(torch.bfloat16)
    out = seqlab_hf.save(model, tmp_path / "ckpt", max_shard_size="50KB")
    assert "model-00001-of-00004.safetensors" in os.listdir(out) and (out / INDEX).is_file()
    again = seqlab_hf.load(out)
    assert again.embeddings.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = again(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, VOCAB) and logits.dtype == torch.bfloat16
