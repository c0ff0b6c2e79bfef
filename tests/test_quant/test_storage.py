"""quantize_model and quantized model files: the model runs on AQLMLinear layers, keeps the state contract
(chunking, step == forward, save/load/continue), and its file holds exactly the counted bits."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from seqlab.checkpoint import load_model, save_model
from seqlab.errors import ConfigError, CorruptFileError
from seqlab.quant import AQLMLinear, linear_layers, quantize_model
from seqlab.quant.packing import packed_nbytes
from seqlab.safetensors_io import read_tensors
from seqlab.testing import rel_err, run_chunked, tiny_hybrid_options, tiny_lm, tiny_moe_options

VOCAB = 32
FAST = {"max_rounds": 1, "adam_steps": 3, "kmeans_iters": 5}
MOE = tiny_moe_options()
KINDS = {
    "mamba1": dict(ssm="mamba1"),
    "mamba2": dict(ssm="mamba2"),
    "attn_hybrid": tiny_hybrid_options(),
    "moe": MOE,
}


def windows(n: int = 3, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, length), generator=g) for _ in range(n)]


def fresh(kind: str, seed: int = 0):
    return tiny_lm(**KINDS[kind], vocab=VOCAB, seed=seed)


@pytest.fixture(scope="module")
def quantized():
    """Each kind of model quantized once (2x4g8, one round): {kind: (model, report)}."""
    out = {}
    for kind in KINDS:
        model = fresh(kind)
        out[kind] = (model, quantize_model(model, windows(), "2x4g8", aqlm_options=FAST))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_divisible_linear_becomes_an_aqlm_layer(quantized, kind):
    model, report = quantized[kind]
    names = {r.name for r in report.layers if r.skipped is None}
    layers = {n for n, m in model.named_modules() if isinstance(m, AQLMLinear)}
    experts = {n for n in names if "[" in n}
    assert layers == names - experts and layers
    assert not any(isinstance(m, nn.Linear) and n in names for n, m in model.named_modules())
    for r in report.layers:
        if r.skipped is not None:
            assert isinstance(model.get_submodule(r.name), nn.Linear)
    assert bool(experts) == (kind == "moe")
    assert model.quantization["config"] == "2x4g8" and set(model.quantization["layers"]) == names
    # everything not quantized holds fp16 values (what the file stores), codebooks and scales too; the experts
    # hold their dequantized values (stored as codes)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not name.endswith((".ffn.gate_up", ".ffn.down")):
            assert torch.equal(tensor, tensor.half().float()), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_model_keeps_the_state_contract(quantized, kind):
    model, _ = quantized[kind]
    ids = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(5))
    layers = [m for m in model.modules() if isinstance(m, AQLMLinear)]
    for layer in layers:
        layer.path_counts = {"lut": 0, "gemm": 0}
    with torch.no_grad():
        whole = model(ids)
        for cuts in ([1, 2, 9], [20], [3, 4, 5, 6, 7, 30, 40]):  # pieces of 1..8 rows take the lookup table
            pieces, state = run_chunked(model, ids, cuts)
            assert rel_err(pieces, whole.logits) <= 1e-5
            for key, value in whole.state.tensors().items():
                assert rel_err(state.tensors()[key], value) <= 1e-5, key
        # step == forward: token by token from a prefilled state
        prefix = model(ids[:, :6])
        state, logits = prefix.state, [prefix.logits]
        for t in range(6, ids.shape[1]):
            out = model.step(ids[:, t], state)
            logits.append(out.logits.unsqueeze(1))
            state = out.state
    assert rel_err(torch.cat(logits, dim=1), whole.logits) <= 1e-5
    for layer in layers:  # the table serves a layer at least as wide as its codebooks (AQLMLinear.path_for)
        assert layer.path_counts["gemm"] > 0
        assert (layer.path_counts["lut"] > 0) == (layer.codebook_size <= layer.out_features)
    assert sum(layer.path_counts["lut"] > 0 for layer in layers) >= len(layers) // 2


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_continue_is_exact(quantized, kind, tmp_path):
    model, _ = quantized[kind]
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(7))
    path = save_model(tmp_path / "q.safetensors", model)
    loaded = fresh(kind, seed=3)  # other weights: everything must come from the file
    load_model(path, loaded)
    assert loaded.quantization == model.quantization
    with torch.no_grad():
        want = model(ids)
        half = model(ids[:, :13])
        again = loaded(ids[:, 13:], half.state)  # a state from the original continues on the loaded model
        assert torch.equal(loaded(ids).logits, want.logits)
        assert torch.equal(again.logits, model(ids[:, 13:], half.state).logits)
    assert rel_err(again.logits, want.logits[:, 13:]) <= 1e-5
    # the loaded model saves to the same bytes' tensors: save -> load -> save is stable
    path2 = save_model(tmp_path / "q2.safetensors", loaded)
    a, _ = read_tensors(path, kind="seqlab.checkpoint.model", version=2)
    b, _ = read_tensors(path2, kind="seqlab.checkpoint.model", version=2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_file_holds_packed_codes_fp16_parts_and_the_counted_bits(quantized, tmp_path):
    model, report = quantized["mamba1"]
    path = save_model(tmp_path / "q.safetensors", model)
    tensors, meta = read_tensors(path, kind="seqlab.checkpoint.model", version=2)
    assert meta["quantization"]["format"] == 1
    # the tied LM head is the embedding table: written once
    assert meta["quantization"]["tied"] == {"lm_head.weight": "embeddings.weight"} and "lm_head.weight" not in tensors
    quantized_bytes = 0
    for r in report.layers:
        if r.skipped is not None:
            assert tensors[f"{r.name}.weight"].dtype == torch.float16
            continue
        layer = model.get_submodule(r.name)
        codes, books, scales = (tensors[f"{r.name}.{p}"] for p in ("codes", "codebooks", "scales"))
        assert codes.dtype == torch.uint8 and codes.numel() == packed_nbytes(layer.codes.numel(), 4)
        assert books.dtype == scales.dtype == torch.float16
        assert f"{r.name}.weight" not in tensors
        quantized_bytes += codes.numel() + 2 * (books.numel() + scales.numel())
    # exactly the report's bits (each layer's packed codes round up to whole bytes: 0 here, 4-bit codes)
    assert quantized_bytes * 8 == sum(r.bits for r in report.layers if r.bits is not None)
    rest = sum(
        t.numel() * t.element_size() for n, t in tensors.items() if not n.endswith((".codes", ".codebooks", ".scales"))
    )
    header = int.from_bytes(open(path, "rb").read(8), "little")
    assert os.path.getsize(path) == 8 + header + quantized_bytes + rest


def test_moe_experts_are_stored_packed_and_the_stacked_weights_omitted(quantized, tmp_path):
    model, _ = quantized["moe"]
    tensors, _ = read_tensors(save_model(tmp_path / "m.safetensors", model), kind="seqlab.checkpoint.model", version=2)
    assert "backbone.layers.0.ffn.gate_up" not in tensors and "backbone.layers.0.ffn.down" not in tensors
    assert tensors["backbone.layers.0.ffn.gate_up[3].codes"].dtype == torch.uint8


def test_model_from_checkpoint_and_generate_run_the_quantized_file(tmp_path):
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.registry import describe_model, model_from_checkpoint
    from seqlab.testing import tiny_config

    torch.manual_seed(0)
    model = ByteAdapter().build_model(tiny_config(d_model=32)).eval()
    data = [torch.tensor([list(b"the quick brown fox jumps over the lazy dog " * 2)])]
    quantize_model(model, data, "2x4g8", aqlm_options=FAST)
    path = save_model(tmp_path / "q.safetensors", model)
    loaded, adapter = model_from_checkpoint(path)
    assert adapter.name == "bytes" and any(isinstance(m, AQLMLinear) for m in loaded.modules())
    prompt = torch.tensor([list(b"the quick")])
    assert model.generate(prompt, 12).tokens == loaded.generate(prompt, 12).tokens
    assert describe_model(path)["fingerprint"] == model.fingerprint


def test_bad_files_are_refused_and_leave_the_model_as_it_was(quantized, tmp_path):
    from seqlab.safetensors_io import write_tensors

    model, _ = quantized["mamba1"]
    path = save_model(tmp_path / "q.safetensors", model)
    tensors, meta = read_tensors(path, kind="seqlab.checkpoint.model", version=2)

    def rewrite(name, tensors, meta):
        return write_tensors(tmp_path / name, tensors, kind="seqlab.checkpoint.model", version=2, meta=meta)

    layer = "backbone.layers.0.mixer.in_proj"
    cut = dict(tensors, **{f"{layer}.codes": tensors[f"{layer}.codes"][:-1]})
    bad_shape = json.loads(json.dumps(meta))
    bad_shape["quantization"]["layers"][layer]["shape"] = [8, 16]
    no_scales = {k: v for k, v in tensors.items() if k != f"{layer}.scales"}
    future = json.loads(json.dumps(meta))
    future["quantization"]["format"] = 99
    untied = json.loads(json.dumps(meta))
    untied["quantization"]["tied"] = {"lm_head.weight": "backbone.norm_f.weight"}
    cases = {
        "cut.safetensors": (cut, meta, f"{layer}.codes is"),
        "shape.safetensors": (tensors, bad_shape, "does not match the model"),
        "scales.safetensors": (no_scales, meta, f"has no {layer}.scales"),
        "future.safetensors": (tensors, future, "quantization format 99"),
        "untied.safetensors": (tensors, untied, "tied weights lm_head.weight = backbone.norm_f.weight do not match"),
    }
    for name, (t, m, words) in cases.items():
        target = fresh("mamba1", seed=4)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(CorruptFileError, match=words):
            load_model(rewrite(name, t, m), target)
        after = target.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
        assert not hasattr(target, "quantization") or not target.quantization


def test_quantize_model_refuses_a_quantized_model_and_changes_nothing_on_failure():
    model, _ = fresh("mamba1"), None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="codebook_bits"):
        quantize_model(model, windows(), "2x17g8")
    with pytest.raises(ConfigError, match="no quantizable linear layer"):
        quantize_model(model, windows(), "2x4g8", layers=["backbone.nope"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, AQLMLinear) for m in model.modules())
    quantize_model(model, windows(n=1), "1x4g8", aqlm_options=FAST, layers=["backbone.layers.0.mixer.out_proj"])
    assert [n for n, m in model.named_modules() if isinstance(m, AQLMLinear)] == ["backbone.layers.0.mixer.out_proj"]
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, windows(), "2x4g8")


def test_report_counts_every_target(quantized):
    model, report = quantized["attn_hybrid"]
    names = [t.name for t in linear_layers(fresh("attn_hybrid"))]
    assert [r.name for r in report.layers] == names
    bits = report.total_bits()
    assert bits == sum(r.bits if r.bits is not None else 16 * r.params for r in report.layers)
    assert math.isclose(report.bits_per_parameter(), bits / sum(r.params for r in report.layers))


def test_a_named_layer_the_group_size_does_not_divide_is_an_error():
    model = fresh("mamba1")
    dt = "backbone.layers.0.mixer.dt_proj"  # its input is the dt rank, 1 here
    with pytest.raises(ConfigError, match=rf"group size 8 does not divide the input width of {dt} \(1 inputs\)"):
        quantize_model(model, windows(), "2x4g8", layers=[dt, "backbone.layers.0.mixer.out_proj"])
    assert not any(isinstance(m, AQLMLinear) for m in model.modules())
    report = quantize_model(model, windows(n=1), "2x4g8", aqlm_options=FAST, layers=lambda n: "layers.0." in n)
    assert [r.name for r in report.layers if r.skipped] == [dt]  # a filter skips it, as layers=None does


@pytest.mark.parametrize("options", [{}, tiny_hybrid_options()], ids=["mamba", "attention_hybrid"])
def test_model_from_checkpoint_builds_without_the_fp32_weights_of_quantized_layers(tmp_path, options):
    from seqlab.domains.bytes import ByteAdapter
    from seqlab.domains.registry import model_from_checkpoint
    from seqlab.quant.storage import build_for_quantized
    from seqlab.testing import tiny_config

    torch.manual_seed(0)
    adapter = ByteAdapter()
    config = tiny_config(**{"d_model": 32, **options})
    model = adapter.build_model(config).eval()
    quantize_model(model, [torch.tensor([list(b"calibration text, calibration text")])], "2x4g8", aqlm_options=FAST)
    path = save_model(tmp_path / "q.safetensors", model)
    _, meta = read_tensors(path, kind="seqlab.checkpoint.model", version=2)
    bare = build_for_quantized(lambda: adapter.build_model(config), meta, min_bytes=0)  # lean even when tiny
    linears = list(meta["quantization"]["layers"])
    if options:  # attention's rotary frequencies are computed at construction: the plain build
        assert all(bare.get_submodule(n).weight.stride()[0] > 0 for n in linears)
        assert all(t.device.type == "cpu" for t in bare.state_dict().values())
    else:  # no memory behind the quantized layers' weights; the rest allocated, the tied head still tied
        assert all(bare.get_submodule(n).weight.stride() == (0, 0) for n in linears)
        assert all(t.device.type == "cpu" for t in bare.state_dict().values())
        assert bare.lm_head.weight is bare.embeddings.weight
    plain = build_for_quantized(lambda: adapter.build_model(config), meta)  # tiny: the plain build
    assert all(plain.get_submodule(n).weight.stride()[0] > 0 for n in linears)
    loaded, _ = model_from_checkpoint(path)
    ids = torch.tensor([list(b"calibration")])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.embeddings.weight


def test_a_model_without_scales_saves_no_scales_and_loads_exactly(tmp_path):
    from seqlab.quant.finetune import trainable_parameters

    model = fresh("mamba2")
    report = quantize_model(model, windows(), "2x4g8-noscale", aqlm_options=FAST)
    assert model.quantization["config"] == "2x4g8-noscale"
    assert not any(n.endswith(".scales") for n in trainable_parameters(model))  # constant ones: not trained
    path = save_model(tmp_path / "q.safetensors", model)
    tensors, meta = read_tensors(path, kind="seqlab.checkpoint.model", version=2)
    assert not any(n.endswith(".scales") for n in tensors)
    stored = sum(tensors[f"{r.name}.{p}"].numel() * tensors[f"{r.name}.{p}"].element_size() for r in report.layers
                 if r.bits is not None for p in ("codes", "codebooks"))  # fmt: skip
    assert 8 * stored == sum(r.bits for r in report.layers if r.bits is not None)
    loaded = fresh("mamba2", seed=2)
    load_model(path, loaded)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
