"""AQLM's Triton kernels (Triton interpreter on CPU here, real kernels on a GPU) against the layer's definition
(``AQLMLinear.forward_reference``), and a quantized model decoding on them."""

from __future__ import annotations

import pytest
import torch

import seqlab.kernels as K
from seqlab.errors import ConfigError
from seqlab.quant import AQLMLinear, quantize_model
from seqlab.testing import tiny_lm

pytestmark = pytest.mark.skipif(not K.triton_available(), reason="Triton cannot run here (import failed)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = [(24, 32, 2, 4, 8), (17, 30, 2, 5, 5), (10, 12, 3, 3, 4), (70, 16, 1, 8, 8)]  # (out, in, M, B, g)


def layer_of(out_features, in_features, m, bits, g, bias=True, seed=0) -> AQLMLinear:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features // g, m), generator=gen)
    books = torch.randn(m, 1 << bits, g, generator=gen)
    scales = torch.rand(out_features, generator=gen) + 0.5
    b = torch.randn(out_features, generator=gen) if bias else None
    return AQLMLinear.from_parts(codes, books, scales, b).to(DEVICE)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}_{c[2]}x{c[3]}g{c[4]}")
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_equal_the_definition(config, bias):
    from seqlab.kernels.aqlm.triton_ops import aqlm_dequantize_triton, aqlm_matmul_triton

    layer = layer_of(*config, bias=bias)
    in_features = config[1]
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, in_features), (in_features,), (2, 3, in_features), (20, in_features)]:  # matvec and GEMM
        x = torch.randn(*shape, generator=gen).to(DEVICE)
        got = aqlm_matmul_triton(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
        torch.testing.assert_close(got, layer.forward_reference(x).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aqlm_dequantize_triton(layer.codes, layer.codebooks, layer.scales), layer.dequantize())


def test_the_layer_uses_triton_without_gradients_only():
    layer = layer_of(24, 32, 2, 4, 8)
    layer.backend = "triton"
    x = torch.randn(2, 32, device=DEVICE)
    with torch.no_grad():
        y = layer(x)
        assert layer.triton_calls == 1
        torch.testing.assert_close(
            layer.matmul(x), layer.forward_reference(x).float() - layer.bias, rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(y, layer.forward_reference(x).float(), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()  # a gradient is needed: the torch path, which has one
    assert layer.triton_calls == 2 and layer.codebooks.grad is not None
    layer.backend = "torch"
    with torch.no_grad():
        layer(x)
    assert layer.triton_calls == 2
    layer.backend = "cuda"
    with pytest.raises(ConfigError, match="backend must be"):
        layer(x)


def test_a_quantized_model_decodes_the_same_on_the_kernels():
    model = tiny_lm("mamba1", vocab=32, seed=0)
    windows = [torch.randint(0, 32, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    quantize_model(model, windows, "2x4g8", aqlm_options={"max_rounds": 1, "adam_steps": 3})
    model = model.to(DEVICE)
    layers = [m for m in model.modules() if isinstance(m, AQLMLinear)]
    prompt = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with torch.no_grad():
        for layer in layers:
            layer.backend = "torch"
        want = model(prompt).logits
        plain = model.generate(prompt, 8).tokens
        for layer in layers:
            layer.backend = "triton"
        got = model(prompt).logits
        fast = model.generate(prompt, 8).tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert fast == plain and all(layer.triton_calls > 0 for layer in layers)
