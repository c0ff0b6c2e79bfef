"""quantize_weights: every target weight replaced by its dequantized value, all or nothing, with exact bits."""

from __future__ import annotations

import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.quant import AQLMConfig, linear_layers, quantize_rtn
from seqlab.quant.model import quantize_weights
from seqlab.testing import tiny_hybrid_options, tiny_lm

VOCAB = 32


def windows(n: int = 3, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, length), generator=g) for _ in range(n)]


def weights(model) -> dict[str, torch.Tensor]:
    return {t.name: t.weight.detach().clone() for t in linear_layers(model, head=True, router=True)}


def test_rtn_replaces_each_divisible_layer_by_its_dequantized_weight_and_skips_the_rest():
    model = tiny_lm("mamba1", vocab=VOCAB, seed=1)
    before = weights(model)
    report = quantize_weights(model, None, "rtn", bits=4, group_size=8)
    after = weights(model)
    quantized = [r for r in report.layers if r.skipped is None]
    skipped = [r for r in report.layers if r.skipped is not None]
    assert quantized and skipped  # the tiny model's dt_proj (in = dt rank) is not a multiple of 8
    for r in quantized:
        want = quantize_rtn(before[r.name].float(), 4, 8)
        assert torch.equal(after[r.name], want.dequantize())
        assert r.bits == want.storage_bits() and r.error is None
    for r in skipped:
        assert torch.equal(after[r.name], before[r.name]) and "does not divide" in r.skipped
    total = sum(r.bits for r in quantized) + 16 * sum(r.params for r in skipped)
    assert report.total_bits() == total
    assert report.bits_per_parameter() == total / sum(r.params for r in report.layers)
    assert "| total (rtn 4-bit g8) |" in report.table()


@pytest.mark.parametrize("kind", ["mamba2", "hybrid"])
def test_gptq_and_aqlm_are_calibrated_and_the_model_keeps_its_state_contract(kind):
    """After quantization the model is an ordinary model: a chunked pass equals one pass (state threaded)."""
    make = (lambda: tiny_lm(**tiny_hybrid_options(), vocab=VOCAB, seed=2)) if kind == "hybrid" else (
        lambda: tiny_lm("mamba2", vocab=VOCAB, seed=2))  # fmt: skip
    aqlm = {"config": "2x4g8", "aqlm_options": {"max_rounds": 2, "adam_steps": 5}}
    for method, options in (("gptq", {"bits": 3, "group_size": 8}), ("aqlm", aqlm)):
        model = make()
        before = weights(model)
        report = quantize_weights(model, windows(), method, **options)
        quantized = [r for r in report.layers if r.skipped is None]
        assert quantized and all(r.error is not None and r.error >= 0 for r in quantized)
        changed = [name for name, w in weights(model).items() if not torch.equal(w, before[name])]
        assert sorted(changed) == sorted(r.name for r in quantized)
        ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            whole = model(ids).logits
            first = model(ids[:, :7])
            rest = model(ids[:, 7:], first.state).logits
        assert torch.allclose(torch.cat([first.logits, rest], dim=1), whole, atol=1e-4, rtol=1e-4)


def test_aqlm_bits_follow_its_config():
    model = tiny_lm("mamba1", vocab=VOCAB, seed=3)
    report = quantize_weights(model, windows(2), "aqlm", config=AQLMConfig(1, 4, 8),
                              aqlm_options={"max_rounds": 1, "adam_steps": 2})  # fmt: skip
    for r in report.layers:
        if r.skipped is None:
            groups = r.params // 8
            assert r.bits == groups * 4 + 1 * 16 * 8 * 16 + r.shape[0] * 16  # codes + fp16 codebook + fp16 scales


def test_layers_pick_the_targets_with_or_without_calibration():
    model = tiny_lm("mamba1", vocab=VOCAB, seed=6)
    picked = [t.name for t in linear_layers(model) if t.name.endswith("out_proj")]
    for data in (None, windows(1)):
        report = quantize_weights(model, data, "rtn", bits=4, group_size=8, layers=lambda name: name in picked)
        assert [r.name for r in report.layers] == picked
        assert all((r.error is None) == (data is None) for r in report.layers)


def test_a_failure_leaves_the_model_as_it_was():
    model = tiny_lm("mamba1", vocab=VOCAB, seed=4)
    before = weights(model)
    calls = []

    def stop_after_two(name, done, total):
        calls.append(name)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_weights(model, windows(2), "gptq", bits=2, group_size=8, progress=stop_after_two)
    assert len(calls) == 2
    assert all(torch.equal(w, before[name]) for name, w in weights(model).items())


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "words"),
    [
        ((None, "awq"), {"bits": 4}, ConfigError, "method must be one of rtn, gptq, aqlm"),
        ((None, "rtn"), {}, ConfigError, "needs bits"),
        ((None, "rtn"), {"bits": 4, "config": "2x8g8"}, ConfigError, "config is an AQLM setting"),
        ((None, "aqlm"), {"bits": 2}, ConfigError, "not bits"),
        ((None, "gptq"), {"bits": 3}, InputError, "pass calibration windows"),
        ((None, "rtn"), {"bits": 4, "full_precision_bits": 8}, ConfigError, "full_precision_bits must be 16 or 32"),
        (([],), {"method": "gptq", "bits": 3}, InputError, "calibration set is empty"),
        ((None, "rtn"), {"bits": 4, "layers": ["backbone.nope"]}, ConfigError, "names no quantizable linear layer"),
    ],
)
def test_bad_settings_are_named(args, kwargs, error, words):
    model = tiny_lm("mamba1", vocab=VOCAB, seed=5)
    before = weights(model)
    with pytest.raises(error, match=words):
        quantize_weights(model, *args, **kwargs)
    assert all(torch.equal(w, before[name]) for name, w in weights(model).items())
