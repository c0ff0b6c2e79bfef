"""``LanguageModel.from_pretrained`` / ``save_pretrained`` (and ``SequenceModel``'s): seqlab's own models as
directories in HF's conventions (seqlab's marked config.json, safetensors weights, HF's shards + index past a
max shard size), round trips bit-exact (tied, untied, bf16, sharded, hybrid with attention, MoE), transformers
directories and seqlab model files through the same call, and bad input refused in one line naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from seqlab import BackboneConfig, LanguageModel, SequenceModel
from seqlab.checkpoint import save_model
from seqlab.errors import ConfigError, CorruptFileError, FormatVersionError
from seqlab.interop import hf as seqlab_hf

VOCAB = 48


def lm(ssm="mamba2", tie=True, seed=0, **fields) -> LanguageModel:
    torch.manual_seed(seed)
    config = BackboneConfig(d_model=32, n_layer=2, ssm=ssm, d_state=8, headdim=16, chunk_size=8, **fields)
    return LanguageModel(config, vocab_size=VOCAB, tie_embeddings=tie).eval()


def ids(length=12, batch=2, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_bit_exact(tmp_path, ssm, tie):
    model = lm(ssm, tie)
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    # marked as seqlab's: no model_type, so neither transformers nor seqlab's HF loader takes it for an HF config
    assert config["format"] == "seqlab.pretrained" and "model_type" not in config
    assert config["class"] == "LanguageModel" and config["tie_embeddings"] is tie and config["files"] == []
    loaded = LanguageModel.from_pretrained(folder)
    assert same_weights(model, loaded) and not loaded.training
    assert (loaded.lm_head.weight is loaded.embeddings.weight) is tie
    assert loaded.fingerprint == model.fingerprint
    x = ids()
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_sharded_round_trip_and_resave(tmp_path):
    model = lm(tie=False)
    folder = model.save_pretrained(tmp_path / "m", max_shard_size=6000)
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    loaded = LanguageModel.from_pretrained(folder)
    assert same_weights(model, loaded)
    # saved again unsharded into the same folder: the old shards and index go, one file stays
    loaded.save_pretrained(folder, max_shard_size=None)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert same_weights(model, LanguageModel.from_pretrained(folder))


def test_dtype_and_device(tmp_path):
    model = lm().to(torch.bfloat16)
    folder = model.save_pretrained(tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = LanguageModel.from_pretrained(folder)
    assert same_weights(model, loaded)  # bf16 stays bf16, bit for bit
    as_fp32 = LanguageModel.from_pretrained(folder, dtype="float32", device="cpu")
    assert all(p.dtype == torch.float32 for p in as_fp32.parameters())
    assert torch.equal(as_fp32.embeddings.weight, model.embeddings.weight.float())
    with pytest.raises(ConfigError, match="dtype"):
        LanguageModel.from_pretrained(folder, dtype="int8")


@pytest.mark.parametrize("d_output", [5, None])
def test_sequence_model_round_trip(tmp_path, d_output):
    torch.manual_seed(0)
    model = SequenceModel(BackboneConfig(d_model=16, n_layer=2, d_state=4), d_input=3, d_output=d_output).eval()
    folder = model.save_pretrained(tmp_path / "s", max_shard_size=2000)
    loaded = SequenceModel.from_pretrained(folder)
    assert isinstance(loaded, SequenceModel) and loaded.d_output == d_output and same_weights(model, loaded)
    x = torch.randn(2, 7, 3)
    assert torch.equal(model(x).output, loaded(x).output)
    with pytest.raises(ConfigError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, str(folder), "SequenceModel.from_pretrained")


def test_hybrid_attention_and_moe_round_trip(tmp_path):
    """Attention's rotary frequencies are a non-persistent buffer (not in the files): computed again on load."""
    model = lm(
        "mamba1",
        attn_heads=2,
        layer_overrides={1: {"mixer": "attention", "ffn": "moe"}},
        moe_experts=2,
        moe_d_expert=8,
    )
    loaded = LanguageModel.from_pretrained(model.save_pretrained(tmp_path / "h"))
    assert same_weights(model, loaded)
    x = ids(10)
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_transformers_directory_and_model_file_load_through_the_same_call(tmp_path):
    model = lm("mamba2", tie=False)
    hf_dir = seqlab_hf.save(model, tmp_path / "hf", max_shard_size=5000)
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "mamba2"
    from_hf = LanguageModel.from_pretrained(hf_dir, dtype=torch.float32)
    assert same_weights(model, from_hf)
    # a seqlab model file (save_model) without an adapter: rebuilt from its config and weight shapes
    for tie in (True, False):
        file = save_model(tmp_path / f"m{tie}.safetensors", lm(tie=tie, seed=3))
        loaded = LanguageModel.from_pretrained(file)
        assert same_weights(lm(tie=tie, seed=3), loaded)
        assert (loaded.lm_head.weight is loaded.embeddings.weight) is tie


def test_adapter_info_is_recorded_and_restored(tmp_path):
    model = lm()
    model.adapter_info = {"name": "bytes", "settings": {"utf8": False}}
    folder = model.save_pretrained(tmp_path / "a")
    assert json.loads((folder / "config.json").read_text())["adapter"] == model.adapter_info
    assert LanguageModel.from_pretrained(folder).adapter_info == model.adapter_info


def test_extra_files_are_written_with_the_model(tmp_path):
    folder = lm().save_pretrained(tmp_path / "x", files={"notes.txt": b"hello"})
    assert (folder / "notes.txt").read_bytes() == b"hello"
    assert json.loads((folder / "config.json").read_text())["files"] == ["notes.txt"]
    with pytest.raises(Exception, match="not a file name"):
        lm().save_pretrained(tmp_path / "y", files={"../escape": b"x"})
    assert not (tmp_path / "y").exists() and not (tmp_path / "escape").exists()


# ------------------------------------------------------------------------------------------------------
# bad input: one line, naming the file
# ------------------------------------------------------------------------------------------------------
def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptFileError) as exc:
        LanguageModel.from_pretrained(tmp_path / "empty")
    one_line(exc, str(tmp_path / "empty" / "config.json"), "no such file")
    with pytest.raises(FileNotFoundError):
        LanguageModel.from_pretrained(tmp_path / "absent")


def test_config_of_an_unknown_family(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, str(folder / "config.json"), "'gpt2'", "mamba")


def test_config_neither_seqlab_nor_transformers(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CorruptFileError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, str(folder / "config.json"), "neither")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CorruptFileError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, str(folder / "config.json"), "not valid JSON")


def test_damaged_seqlab_directories(tmp_path):
    folder = lm(tie=False).save_pretrained(tmp_path / "m", max_shard_size=6000)
    config_path = folder / "config.json"
    good = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(FormatVersionError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, str(config_path), "99")

    edited = {**good, "config": {**good["config"], "d_state": 16}}  # the config no longer matches the weights
    config_path.write_text(json.dumps(edited))
    with pytest.raises(CorruptFileError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, str(config_path), "fingerprint")
    config_path.write_text(json.dumps({**edited, "fingerprint": None}))
    with pytest.raises(CorruptFileError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, "model.safetensors.index.json", "in_proj.weight", "shape")

    config_path.write_text(json.dumps({**good, "vocab_size": VOCAB + 1, "fingerprint": None}))
    with pytest.raises(CorruptFileError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, "embeddings.weight", "shape")

    config_path.write_text(json.dumps(good))
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CorruptFileError) as exc:
        LanguageModel.from_pretrained(folder)
    one_line(exc, shard.name)


def test_quantized_or_low_rank_models_are_not_saved_here(tmp_path):
    model = lm()
    model.quantization = {"method": "aqlm"}
    with pytest.raises(ConfigError, match="save_model"):
        model.save_pretrained(tmp_path / "q")
