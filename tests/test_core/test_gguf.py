"""GGUF export (seqlab.interop.gguf, ``seqlab export gguf``): every tensor and metadata key read back with gguf-py's
reader against the seqlab weights (transformed as llama.cpp's converter does), llama.cpp's Mamba graph (as read from
its source, in numpy) on the file against seqlab's logits, refusals that write nothing, the CLI, and (when
llama-cpp-python is installed) llama.cpp's own logits against seqlab's."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.testing import tiny_lm

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'seqlab[gguf]')")

from seqlab.interop.gguf import (  # noqa: E402
    CONTEXT_LENGTH,
    INERT_MERGE,
    byte_vocab,
    check_exportable,
    export_gguf,
    no_vocab,
)

Q = gguf.GGMLQuantizationType


def _expected(model) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in numpy order, written out from the seqlab state dict here (not by the code
    under test): A = -exp(A_log), conv (c, 1, w) -> (c, w), Mamba-2 A/D (h, 1) and norm (groups, d_inner/groups),
    output omitted when tied."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    out = {"token_embd.weight": sd["embeddings.weight"], "output_norm.weight": sd["backbone.norm_f.weight"]}
    if model.lm_head.weight is not model.embeddings.weight:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        m, b = f"backbone.layers.{i}.mixer.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[f"backbone.layers.{i}.norm.weight"]
        out[b + "ssm_in.weight"] = sd[m + "in_proj.weight"]
        conv = sd[m + "conv1d.weight"]
        out[b + "ssm_conv1d.weight"] = conv[:, 0, :]
        out[b + "ssm_conv1d.bias"] = sd.get(m + "conv1d.bias", np.zeros(conv.shape[0], np.float32))
        out[b + "ssm_out.weight"] = sd[m + "out_proj.weight"]
        if cfg.ssm == "mamba1":
            out[b + "ssm_x.weight"] = sd[m + "x_proj.weight"]
            out[b + "ssm_dt.weight"] = sd[m + "dt_proj.weight"]
            out[b + "ssm_dt.bias"] = sd[m + "dt_proj.bias"]
            out[b + "ssm_a"] = -np.exp(sd[m + "A_log"])
            out[b + "ssm_d"] = sd[m + "D"]
        else:
            out[b + "ssm_dt.bias"] = sd[m + "dt_bias"]
            out[b + "ssm_a"] = -np.exp(sd[m + "A_log"])[:, None]
            out[b + "ssm_d"] = sd[m + "D"][:, None]
            out[b + "ssm_norm.weight"] = sd[m + "norm.weight"].reshape(cfg.ngroups, -1)
    return out


def _stays_f32(name: str, array: np.ndarray) -> bool:
    return (
        array.ndim == 1
        or name.endswith(("_norm.weight", ".bias", ".ssm_a", ".ssm_d"))
        or name.endswith("ssm_conv1d.weight")
    )


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _check_file(path, model, outtype: str, vocab_meta: dict | None = None) -> None:
    """Every tensor (name, shape, type, values) and every metadata key of the file at ``path``; the tokenizer keys
    are ``vocab_meta`` (None: the byte vocabulary's)."""
    reader = gguf.GGUFReader(path)
    expected = _expected(model)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(expected)  # every tensor, none extra
    for name, want in expected.items():
        t = tensors[name]
        assert tuple(int(n) for n in t.shape) == tuple(reversed(want.shape)), name  # GGUF lists dims reversed
        if outtype == "f32" or _stays_f32(name, want):
            assert t.tensor_type == Q.F32, name
            np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want, err_msg=name)
        elif outtype == "f16" or want.shape[-1] % 32:
            assert t.tensor_type == Q.F16, name
            got = np.asarray(t.data).reshape(want.shape)
            np.testing.assert_array_equal(got, want.astype(np.float16), err_msg=name)  # exactly f16 rounding
        else:
            assert t.tensor_type == Q.Q8_0, name
            got = gguf.quants.dequantize(np.asarray(t.data), Q.Q8_0).reshape(want.shape)
            np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(want, Q.Q8_0), Q.Q8_0))
            # and Q8_0 is close: at most half a step of 1/127 of each block's largest magnitude (+ f16 scale)
            blocks = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs(got.reshape(-1, 32) - want.reshape(-1, 32))
            assert (err <= blocks / 127 * 0.5 + blocks * 2e-3 + 1e-7).all(), name

    cfg = model.config
    arch = "mamba" if cfg.ssm == "mamba1" else "mamba2"
    fields = _fields(reader)
    want_meta = {
        "general.architecture": arch,
        "general.name": f"seqlab-{arch}",
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[outtype],
        "general.quantization_version": 2,
        f"{arch}.context_length": CONTEXT_LENGTH,
        f"{arch}.embedding_length": cfg.d_model,
        f"{arch}.feed_forward_length": 0,
        f"{arch}.attention.head_count": 0,
        f"{arch}.block_count": cfg.n_layer,
        f"{arch}.ssm.conv_kernel": cfg.d_conv,
        f"{arch}.ssm.inner_size": cfg.d_inner,
        f"{arch}.ssm.state_size": cfg.d_state,
        f"{arch}.ssm.time_step_rank": cfg.dt_rank if arch == "mamba" else cfg.nheads,
    }
    if arch == "mamba":
        want_meta["mamba.ssm.dt_b_c_rms"] = False
    else:
        want_meta["mamba2.ssm.group_count"] = cfg.ngroups
    if vocab_meta is None:
        tokens = fields["tokenizer.ggml.tokens"]
        want_meta.update(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.tokens": tokens,  # checked below
                "tokenizer.ggml.token_type": [1] * 256,
                "tokenizer.ggml.merges": [INERT_MERGE],
                "tokenizer.ggml.bos_token_id": 0,
                "tokenizer.ggml.eos_token_id": 0,
                "tokenizer.ggml.add_bos_token": False,
                "tokenizer.ggml.add_eos_token": False,
            }
        )
        _check_byte_tokens(tokens)
    else:
        want_meta.update(vocab_meta)
    eps = fields.pop(f"{arch}.attention.layer_norm_rms_epsilon")
    assert math.isclose(eps, cfg.norm_eps, rel_tol=1e-6)
    assert fields == want_meta  # every key, none extra


def _none(model) -> dict:
    arch = "mamba" if model.config.ssm == "mamba1" else "mamba2"
    return {"tokenizer.ggml.model": "none", f"{arch}.vocab_size": model.vocab_size}


def _check_byte_tokens(tokens: list[str]) -> None:
    """256 distinct one-character tokens; printable bytes stand for themselves, the rest are GPT-2's stand-ins
    (space -> U+0120, newline -> U+010A), so llama.cpp's byte-level decoding gives id i back as byte i."""
    assert len(tokens) == 256 and len(set(tokens)) == 256 and all(len(t) == 1 for t in tokens)
    assert tokens[ord("A")] == "A" and tokens[ord("~")] == "~" and tokens[0xE9] == "\xe9"
    assert tokens[0x20] == "\u0120" and tokens[0x0A] == "\u010a" and tokens[0] == "\u0100"
    assert tokens[0x7F] == "\u0121" and tokens[0xAD] == "\u0143"
    assert " " not in INERT_MERGE.split(" ", 1)[0] and all(len(half) == 2 for half in INERT_MERGE.split(" "))


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_every_tensor_and_key_reads_back(tmp_path, ssm, outtype):
    """A 256-token (byte) model, d_model 32 (every matrix row a multiple of 32, so q8_0 quantizes them all)."""
    model = tiny_lm(ssm, vocab=256, d_model=32, seed=1)
    path = export_gguf(model, tmp_path / "m.gguf", vocab=byte_vocab(), outtype=outtype)
    _check_file(path, model, outtype)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temp file left beside it


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_untied_head_no_conv_bias_groups_and_rows_q8_cannot_take(tmp_path, ssm):
    """An untied LM head is written as output.weight; conv_bias=False is written as zero biases (llama.cpp requires
    one); Mamba-2 with 2 groups; d_model 16: matrices whose rows are 16 long fall back to f16 under q8_0."""
    extra = {"ngroups": 2} if ssm == "mamba2" else {}
    torch.manual_seed(0)
    from seqlab.models import LanguageModel
    from seqlab.testing import tiny_config

    model = LanguageModel(tiny_config(ssm, conv_bias=False, **extra), vocab_size=64, tie_embeddings=False).eval()
    path = export_gguf(model, tmp_path / "m.gguf", vocab=no_vocab(64), outtype="q8_0")
    _check_file(path, model, "q8_0", _none(model))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == Q.F16 and types["blk.0.ssm_out.weight"] == Q.Q8_0  # rows 16 vs 32


def test_bf16_weights_are_written_from_their_exact_values(tmp_path):
    model = tiny_lm("mamba2", vocab=256).to(torch.bfloat16)
    path = export_gguf(model, tmp_path / "m.gguf", vocab=byte_vocab())
    _check_file(path, model, "f32")


def _refused(tmp_path, model, match, **kw):
    target = tmp_path / "out.gguf"
    with pytest.raises((ConfigError, InputError), match=match):
        export_gguf(model, target, vocab=kw.pop("vocab", byte_vocab()), **kw)
    assert os.listdir(tmp_path) == []  # nothing written, not even a temp file


def test_models_llama_cpp_would_compute_differently_are_refused(tmp_path):
    from seqlab.testing import tiny_hybrid_options

    _refused(tmp_path, tiny_lm(vocab=256, **tiny_hybrid_options()), "hybrid")
    _refused(tmp_path, tiny_lm("mamba1", vocab=256, ffn="moe", moe_experts=2, moe_top_k=1), "mixture-of-experts")
    _refused(tmp_path, tiny_lm("mamba1", vocab=256, ffn="mlp"), "feed-forward")
    _refused(tmp_path, tiny_lm("attention", vocab=256, attn_heads=2), "ssm='attention'")
    _refused(tmp_path, tiny_lm("mamba1", vocab=256, expand=3), "expansion factor of 2")
    _refused(tmp_path, tiny_lm("mamba1", vocab=256, proj_bias=True), "proj_bias")
    _refused(tmp_path, tiny_lm("mamba1", vocab=256, mamba_inner_norms=True), "mamba_inner_norms")
    _refused(tmp_path, tiny_lm("mamba1", vocab=256, bidirectional=True), "bidirectional")


def test_laserd_and_aqlm_quantized_models_are_refused(tmp_path):
    from seqlab.posttrain.laser import LowRankLinear
    from seqlab.quant.linear import AQLMLinear

    model = tiny_lm("mamba1", vocab=256)
    model.backbone.layers[0].mixer.out_proj = LowRankLinear(32, 16, 2, bias=False)
    _refused(tmp_path, model, r"backbone\.layers\.0\.mixer\.out_proj is a LASER low-rank layer")
    model = tiny_lm("mamba2", vocab=256)
    model.backbone.layers[1].mixer.out_proj = AQLMLinear(32, 16, 1, 4, 8)
    _refused(tmp_path, model, r"backbone\.layers\.1\.mixer\.out_proj is AQLM-quantized")
    with pytest.raises(ConfigError, match="SequenceModel"):
        from seqlab.models import SequenceModel
        from seqlab.testing import tiny_config

        check_exportable(SequenceModel(tiny_config(), d_input=3))


def test_bad_targets_and_vocabularies_write_nothing(tmp_path):
    model = tiny_lm("mamba1", vocab=256)
    with pytest.raises(InputError, match=r"out\.bin: a GGUF file name must end in \.gguf"):
        export_gguf(model, tmp_path / "out.bin", vocab=byte_vocab())
    _refused(tmp_path, tiny_lm("mamba1"), "has 256 tokens but the model's embedding has 32 rows")
    _refused(tmp_path, model, "outtype 'q4'", outtype="q4")
    (tmp_path / "old.gguf").write_bytes(b"keep me")
    with pytest.raises(InputError, match=r"old\.gguf: already exists"):
        export_gguf(model, tmp_path / "old.gguf", vocab=byte_vocab())
    assert (tmp_path / "old.gguf").read_bytes() == b"keep me"
    export_gguf(model, tmp_path / "old.gguf", vocab=byte_vocab(), overwrite=True)
    assert gguf.GGUFReader(tmp_path / "old.gguf").tensors[0].name == "token_embd.weight"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_gguf(model, tmp_path / "no" / "m.gguf", vocab=byte_vocab())


def test_a_failed_write_leaves_neither_the_target_nor_a_temp_file(tmp_path, monkeypatch):
    model = tiny_lm("mamba2", vocab=256)

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, tmp_path / "m.gguf", vocab=byte_vocab())
    assert os.listdir(tmp_path) == []


# ==================================================================================================
# the command line
# ==================================================================================================
def _cli(*argv):
    from seqlab.cli import main

    return main(list(argv))


def _byte_model_file(tmp_path, ssm="mamba2", **kw):
    from seqlab.checkpoint import save_model
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.testing import tiny_config

    torch.manual_seed(0)
    model = ByteAdapter().build_model(tiny_config(ssm, d_model=32, **kw)).eval()
    path = tmp_path / "model.safetensors"
    save_model(path, model)
    return path, model


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_cli_writes_a_byte_model_that_reads_back(tmp_path, capsys, ssm):
    path, model = _byte_model_file(tmp_path, ssm)
    out = tmp_path / "m.gguf"
    assert _cli("export", "gguf", str(path), str(out), "--outtype", "f16") == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    _check_file(out, model, "f16")
    assert _cli("export", "gguf", str(path), str(out)) == 2  # exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and err[0].startswith("seqlab export: error:")
    assert _cli("export", "gguf", str(path), str(out), "--overwrite", "--outtype", "q8_0", "--json") == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["outtype"] == "q8_0" and summary["vocab"].startswith("bytes")
    _check_file(out, model, "q8_0")


def test_cli_exports_a_save_pretrained_directory_with_its_adapter(tmp_path, capsys):
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.registry import save_pretrained

    _, model = _byte_model_file(tmp_path, "mamba2")
    folder = save_pretrained(model, tmp_path / "pretrained", adapter=ByteAdapter())
    out = tmp_path / "p.gguf"
    assert _cli("export", "gguf", str(folder), str(out), "--json") == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab"].startswith("bytes")  # the recorded byte adapter picks the byte vocabulary
    _check_file(out, model, "f32")


def test_cli_transformers_directory_needs_vocab_none(tmp_path, capsys):
    from seqlab.interop.hf import save

    model = tiny_lm("mamba1", vocab=48)
    save(model, tmp_path / "hf")
    out = tmp_path / "m.gguf"
    assert _cli("export", "gguf", str(tmp_path / "hf"), str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vocab none" in err[0] and not out.exists()
    assert _cli("export", "gguf", str(tmp_path / "hf"), str(out), "--vocab", "none") == 0
    _check_file(out, model, "f32", _none(model))


def _bpe_tokenizer(pre_tokenizer=None):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer.json test needs the tokenizers package")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, hello there. the theory of everything"] * 20, trainer)
    tok.add_tokens(["<user>"])  # an added, non-special token
    return tok


def test_cli_transformers_directory_with_a_byte_level_bpe_tokenizer(tmp_path, capsys):
    """tokenizer.json -> llama.cpp's gpt2 vocabulary: tokens by id, padded with unused [PADi] up to the embedding's
    rows, merges in order, special / added / normal / padding types, BOS/EOS from tokenizer_config.json."""
    import json

    from seqlab.interop.hf import save

    tok = _bpe_tokenizer()
    size = tok.get_vocab_size(with_added_tokens=True)
    model = tiny_lm("mamba2", vocab=size + 6, seed=3)
    folder = tmp_path / "hf"
    save(model, folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    )
    out = tmp_path / "m.gguf"
    assert _cli("export", "gguf", str(folder), str(out), "--outtype", "f16") == 0
    data = json.loads(tok.to_str())
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size + 6)]
    types = [3 if t == "<|endoftext|>" else 4 if t == "<user>" else 5 if t.startswith("[PAD") else 1 for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    eos = tok.token_to_id("<|endoftext|>")
    _check_file(
        out,
        model,
        "f16",
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": eos,
            "tokenizer.ggml.eos_token_id": eos,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_eos_token": False,
        },
    )
    assert len(merges) > 10 and tokens[-1] == f"[PAD{size + 5}]"


def test_tokenizers_llama_cpp_would_split_differently_are_refused(tmp_path):
    from tokenizers import pre_tokenizers

    from seqlab.interop.gguf import hf_vocab

    folder = tmp_path / "hf"
    folder.mkdir()
    _bpe_tokenizer(pre_tokenizers.Whitespace()).save(str(folder / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"tokenizer\.json: pre_tokenizer is .*Whitespace"):
        hf_vocab(folder, 400)
    _bpe_tokenizer().save(str(folder / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"has id \d+, outside the model's 100 embedding rows"):
        hf_vocab(folder, 100)
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        hf_vocab(tmp_path, 400)


def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    path, _ = _byte_model_file(tmp_path, "mamba1", ffn="moe", moe_experts=2, moe_top_k=1)
    cases = [
        ((str(path), str(tmp_path / "m.gguf")), "mixture-of-experts"),
        ((str(path), str(tmp_path / "m.txt")), "must end in .gguf"),
        ((str(tmp_path / "absent.safetensors"), str(tmp_path / "m.gguf")), "absent.safetensors"),
    ]
    for argv, message in cases:
        assert _cli("export", "gguf", *argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


# ==================================================================================================
# the file computes what the model computes (llama.cpp's graph, read from its source, in numpy)
# ==================================================================================================
def _gguf_arrays(reader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        data = np.asarray(t.data)
        if t.tensor_type not in (Q.F32, Q.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = data.astype(np.float64).reshape(shape)
    return out


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """ggml_ssm_conv: (d_conv - 1) zero columns of state, then out[t] = sum_k w[:, k] * padded[t + k]."""
    width = weight.shape[1]
    padded = np.concatenate([np.zeros((width - 1, x.shape[1])), x])
    return np.stack([(padded[t : t + width] * weight.T).sum(0) for t in range(len(x))]) + bias


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """Logits of llama.cpp's mamba / mamba2 graph (llm_build_mamba: attn_norm -> build_mamba(2)_layer -> residual;
    output_norm; output or token_embd) on the GGUF file's tensors and metadata, for one sequence, in float64."""
    reader = gguf.GGUFReader(path)
    w = _gguf_arrays(reader)
    meta = _fields(reader)
    arch = meta["general.architecture"]
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    d_inner, d_state = meta[f"{arch}.ssm.inner_size"], meta[f"{arch}.ssm.state_size"]
    rank = meta[f"{arch}.ssm.time_step_rank"]
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    x = w["token_embd.weight"][ids]
    for i in range(meta[f"{arch}.block_count"]):
        b = f"blk.{i}."
        h = _rms(x, w[b + "attn_norm.weight"], eps)
        proj = h @ w[b + "ssm_in.weight"].T
        if arch == "mamba":
            xs, z = proj[:, :d_inner], proj[:, d_inner:]
            xs = _silu(_conv(xs, w[b + "ssm_conv1d.weight"], w[b + "ssm_conv1d.bias"]))
            x_db = xs @ w[b + "ssm_x.weight"].T
            dt = softplus(x_db[:, :rank] @ w[b + "ssm_dt.weight"].T + w[b + "ssm_dt.bias"])
            B, C = x_db[:, rank : rank + d_state], x_db[:, rank + d_state :]
            state, ys = np.zeros((d_inner, d_state)), []
            for t in range(len(ids)):
                state = state * np.exp(dt[t][:, None] * w[b + "ssm_a"]) + B[t][None, :] * (xs[t] * dt[t])[:, None]
                ys.append(state @ C[t])
            y = (np.stack(ys) + xs * w[b + "ssm_d"]) * _silu(z)
        else:
            groups = meta["mamba2.ssm.group_count"]
            heads, head_dim, conv_dim = rank, d_inner // rank, d_inner + 2 * groups * d_state
            z, xbc, dt = proj[:, :d_inner], proj[:, d_inner : d_inner + conv_dim], proj[:, d_inner + conv_dim :]
            xbc = _silu(_conv(xbc, w[b + "ssm_conv1d.weight"], w[b + "ssm_conv1d.bias"]))
            xs = xbc[:, :d_inner].reshape(-1, heads, head_dim)
            B = xbc[:, d_inner : d_inner + groups * d_state].reshape(-1, groups, d_state)
            C = xbc[:, d_inner + groups * d_state :].reshape(-1, groups, d_state)
            dt = softplus(dt + w[b + "ssm_dt.bias"])
            A, D = w[b + "ssm_a"][:, 0], w[b + "ssm_d"]
            g = np.arange(heads) // (heads // groups)  # repeat_interleave, as ggml_ssm_scan
            state, ys = np.zeros((heads, head_dim, d_state)), []
            for t in range(len(ids)):
                decay = np.exp(dt[t] * A)[:, None, None]
                state = state * decay + (xs[t] * dt[t][:, None])[:, :, None] * B[t][g][:, None, :]
                ys.append(np.einsum("hpn,hn->hp", state, C[t][g]))
            y = ((np.stack(ys) + xs * D[None]).reshape(len(ids), d_inner)) * _silu(z)
            norm = w[b + "ssm_norm.weight"]
            y = _rms(y.reshape(len(ids), groups, -1), norm, eps).reshape(len(ids), d_inner)
        x = x + y @ w[b + "ssm_out.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms(x, w["output_norm.weight"], eps) @ head.T


@pytest.mark.parametrize(
    "ssm, options",
    [("mamba1", {}), ("mamba1", {"tie": False}), ("mamba2", {}), ("mamba2", {"ngroups": 2, "tie": False})],
)
def test_the_file_computes_the_models_logits_in_llama_cpps_graph(tmp_path, ssm, options):
    """llama.cpp's Mamba graph as read from its source (llm_build_mamba, build_mamba_layer, build_mamba2_layer,
    ggml_ssm_conv, ggml_ssm_scan), run in numpy on the exported f32 file: seqlab's logits to 1e-4 (the layouts of
    in_proj, x_proj, the conv, A, D and the grouped norm all agree). A q8_0 file stays close."""
    from seqlab.models import LanguageModel
    from seqlab.testing import tiny_config

    tie = options.pop("tie", True)
    torch.manual_seed(4)
    model = LanguageModel(tiny_config(ssm, d_model=32, **options), vocab_size=256, tie_embeddings=tie).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm.weight")):
                p.uniform_(0.5, 1.5)
    ids = list(b"Mamba in GGUF, 24 bytes!")
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    got = _llama_cpp_logits(export_gguf(model, tmp_path / "m.gguf", vocab=byte_vocab()), ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    q8 = _llama_cpp_logits(export_gguf(model, tmp_path / "q8.gguf", vocab=byte_vocab(), outtype="q8_0"), ids)
    assert np.abs(q8 - want).max() < 0.05 * np.abs(want).max()


# ==================================================================================================
# llama.cpp itself (optional)
# ==================================================================================================
@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_llama_cpp_matches_seqlab_logits(tmp_path, ssm):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp from source; not built here)"
    )
    model = tiny_lm(ssm, vocab=256, d_model=32, seed=2)
    path = export_gguf(model, tmp_path / "m.gguf", vocab=byte_vocab())
    ids = list(b"hello, GGUF")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert llm.tokenize(b"hello, GGUF", add_bos=False) == ids  # the byte vocabulary tokenizes to bytes
