"""seqlab.quant's AQLM linear layer and code packing (issue 20): both forward paths equal the plain definition,
in outputs and in gradients; the row threshold picks the path; packing round-trips at every width; bad input."""

from __future__ import annotations

import math

import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.quant.linear import AQLMLinear
from seqlab.quant.packing import pack_codes, packed_nbytes, unpack_codes

# ------------------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [1, 7, 13, 64])
def test_pack_round_trip_every_width_and_exact_size(bits, count):
    gen = torch.Generator().manual_seed(bits * 100 + count)
    codes = torch.randint(0, 1 << bits, (count,), generator=gen)
    codes[0] = (1 << bits) - 1  # the largest code, every bit set
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(count * bits / 8) == packed_nbytes(count, bits)
    back = unpack_codes(packed, bits, (count,))
    assert back.dtype == torch.int64 and torch.equal(back, codes)


@pytest.mark.parametrize("bits", [3, 5, 12])
def test_pack_multi_dim_odd_widths(bits):
    codes = torch.randint(0, 1 << bits, (5, 3, 2), dtype=torch.int32)  # 30 codes: 30*bits not a multiple of 8...
    packed = pack_codes(codes, bits)
    assert packed.numel() == (30 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes.long())


def test_pack_layout_is_a_little_endian_bit_stream():
    # 3-bit codes 1, 2, 7 -> stream bits (LSB first) 100 010 111 -> byte 0 = 0b11010001, byte 1 = 0b1
    assert pack_codes(torch.tensor([1, 2, 7]), 3).tolist() == [0b11010001, 0b1]
    assert pack_codes(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]
    assert pack_codes(torch.tensor([5, 255]), 8).tolist() == [5, 255]
    assert pack_codes(torch.zeros(0, dtype=torch.int64), 5).numel() == 0
    assert unpack_codes(torch.zeros(0, dtype=torch.uint8), 5, (0, 3)).shape == (0, 3)


def test_pack_errors():
    with pytest.raises(InputError, match=r"\[0, 8\).*from 0 to 8"):
        pack_codes(torch.tensor([0, 8]), 3)
    with pytest.raises(InputError, match="from -1"):
        pack_codes(torch.tensor([-1, 2]), 3)
    for bits in (0, 17, 2.0, True):
        with pytest.raises(InputError, match="bits must be an integer in 1..16"):
            pack_codes(torch.tensor([0]), bits)
        with pytest.raises(InputError, match="bits must be an integer in 1..16"):
            unpack_codes(torch.zeros(1, dtype=torch.uint8), bits, (1,))
    with pytest.raises(InputError, match="integer tensor"):
        pack_codes(torch.tensor([0.0]), 3)
    with pytest.raises(InputError, match="must be 4 bytes, got 5 bytes"):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 3, (10,))
    with pytest.raises(InputError, match="1-D torch.uint8"):
        unpack_codes(torch.zeros(4, dtype=torch.int64), 3, (10,))


# ------------------------------------------------------------------------------------------------------ the layer


def make_layer(out_features=24, in_features=32, m=2, bits=4, g=8, bias=True, dtype=torch.float64, seed=0) -> AQLMLinear:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features // g, m), generator=gen)
    codebooks = torch.randn(m, 1 << bits, g, generator=gen, dtype=torch.float64)
    scales = torch.rand(out_features, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(out_features, generator=gen, dtype=torch.float64) if bias else None
    return AQLMLinear.from_parts(codes, codebooks, scales, b, dtype=dtype)


CONFIGS = [  # (out, in, M, B, g): "2x8g8"-style and "1x16g8"-style at small B, odd group sizes and widths
    (24, 32, 2, 4, 8),
    (24, 32, 1, 6, 8),
    (10, 12, 3, 3, 4),
    (17, 30, 2, 5, 5),
    (5, 16, 1, 16, 8),  # a real 16-bit codebook (65,536 codewords) at tiny size
]
SHAPES = [(1, "in"), ("in",), (2, 3, "in"), (5, "in"), (40, "in")]


def x_of(shape, in_features, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*[in_features if s == "in" else s for s in shape], generator=gen, dtype=torch.float64).to(dtype)


def test_dequantize_is_the_format_definition():
    layer = make_layer(m=2, bits=4, g=8)
    w = layer.dequantize()
    codes, cb, s = layer.codes.long(), layer.codebooks, layer.scales
    for o in (0, 7, 23):
        for j in range(4):
            expect = s[o] * (cb[0, codes[o, j, 0]] + cb[1, codes[o, j, 1]])
            assert torch.allclose(w[o, j * 8 : (j + 1) * 8], expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}_{c[2]}x{c[3]}g{c[4]}")
@pytest.mark.parametrize("bias", [True, False])
def test_both_paths_equal_the_reference(config, bias):
    out_features, in_features, m, bits, g = config
    for dtype, rtol, atol in ((torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 1e-5)):
        layer = make_layer(out_features, in_features, m, bits, g, bias=bias, dtype=dtype)
        for shape in SHAPES:
            x = x_of(shape, in_features, dtype)
            ref = layer.forward_reference(x)
            assert ref.shape == (*x.shape[:-1], out_features)
            scale = ref.abs().max().item() + 1
            for name, y in (("forward", layer(x)), ("lut", layer.forward_lut(x)), ("gemm", layer.forward_gemm(x))):
                assert y.dtype == dtype and y.shape == ref.shape, name
                torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol * scale, msg=f"{name} {shape}")


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: f"{c[2]}x{c[3]}g{c[4]}")
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_gradients_equal_the_references(config, rows):
    out_features, in_features, m, bits, g = config
    layer = make_layer(out_features, in_features, m, bits, g, bias=True)
    x = x_of((rows, "in"), in_features, torch.float64)
    upstream = torch.randn(rows, out_features, dtype=torch.float64)
    params = [layer.codebooks, layer.scales, layer.bias]

    def grads(fn):
        xx = x.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        (fn(xx) * upstream).sum().backward()
        return [xx.grad] + [p.grad.clone() for p in params]

    ref = grads(layer.forward_reference)
    for name, fn in (("forward", layer), ("lut", layer.forward_lut), ("gemm", layer.forward_gemm)):
        for got, want, what in zip(grads(fn), ref, ("x", "codebooks", "scales", "bias")):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{name}: grad of {what}")
    assert layer.codes.grad is None and not layer.codes.requires_grad


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=lambda c: f"{c[0]}x{c[1]}_{c[2]}x{c[3]}g{c[4]}")
def test_gemm_path_by_blocks_of_rows_equals_the_reference(monkeypatch, config):
    """The GEMM path dequantises a few output rows at a time (uneven last block here); outputs and gradients still
    equal the reference's."""
    from seqlab.quant import linear

    out_features, in_features, m, bits, g = config
    monkeypatch.setattr(linear, "GEMM_BLOCK_WEIGHTS", 5 * in_features)  # blocks of 5 rows: 24 = 5*4 + 4, 17 = 5*3 + 2
    layer = make_layer(out_features, in_features, m, bits, g, bias=True)
    x = x_of((2, 7, "in"), in_features, torch.float64).requires_grad_(True)
    upstream = torch.randn(2, 7, out_features, dtype=torch.float64)
    got = layer.forward_gemm(x)
    check_against_reference(layer, x, got, upstream)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=lambda c: f"{c[0]}x{c[1]}_{c[2]}x{c[3]}g{c[4]}")
def test_one_row_lookup_by_blocks_of_outputs_equals_the_reference(monkeypatch, config):
    """The one-row lookup gathers a few outputs at a time (uneven last block); outputs and gradients still equal."""
    from seqlab.quant import linear

    out_features, in_features, m, bits, g = config
    groups = in_features // g
    monkeypatch.setattr(linear, "LUT_BLOCK_GATHERS", 5 * groups * m)  # blocks of 5 outputs
    layer = make_layer(out_features, in_features, m, bits, g, bias=True)
    assert layer._lut_block() == 5
    x = x_of((1, "in"), in_features, torch.float64).requires_grad_(True)
    upstream = torch.randn(1, out_features, dtype=torch.float64)
    check_against_reference(layer, x, layer.forward_lut(x), upstream)


def check_against_reference(layer, x, got, upstream):
    torch.testing.assert_close(got, layer.forward_reference(x), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((got * upstream).sum(), [x, layer.codebooks, layer.scales, layer.bias])
    want = torch.autograd.grad(
        (layer.forward_reference(x) * upstream).sum(), [x, layer.codebooks, layer.scales, layer.bias]
    )
    for a, b, what in zip(grads, want, ("x", "codebooks", "scales", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad of {what}")


def test_threshold_picks_the_path_and_counts():
    layer = make_layer(dtype=torch.float32)
    assert layer.lut_max_rows == 8
    cases = [((1, 32), "lut"), ((32,), "lut"), ((2, 4, 32), "lut"), ((9, 32), "gemm"), ((3, 3, 32), "gemm")]
    for shape, path in cases:
        x = torch.randn(*shape)
        assert layer.path_for(x) == path, shape
        before = dict(layer.path_counts)
        layer(x)
        assert layer.path_counts[path] == before[path] + 1, shape
    layer.lut_max_rows = 0
    assert layer.path_for(torch.randn(1, 32)) == "gemm"
    layer.lut_max_rows = 100
    assert layer.path_for(torch.randn(9, 32)) == "lut"
    assert layer.path_for(torch.randn(0, 32)) == "gemm"  # no rows: nothing to tabulate
    assert layer(torch.randn(0, 32)).shape == (0, 24)
    # a codebook longer than the layer is wide (1x16 on 5 outputs): the table would cost more than the gathers
    wide_codebook = make_layer(*CONFIGS[4][:2], *CONFIGS[4][2:], dtype=torch.float32)
    assert wide_codebook.path_for(torch.randn(1, 16)) == "gemm"
    assert make_layer(out_features=16, m=1, bits=4, dtype=torch.float32).path_for(torch.randn(1, 32)) == "lut"


def test_codes_written_in_place_rebuild_the_index():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(1, 32, dtype=torch.float64)
    layer(x)  # builds and caches the gather index
    other = make_layer(dtype=torch.float64, seed=5)
    layer(x.expand(3, 32))  # and the several-row index
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other.forward_reference(x))
    torch.testing.assert_close(layer(x.expand(3, 32)), other.forward_reference(x.expand(3, 32)))
    torch.testing.assert_close(layer.forward_gemm(x), other.forward_reference(x))
    single = layer.float()  # a cast keeps the codes' values; the cached indices are rebuilt, the results hold
    torch.testing.assert_close(single(x.float()).double(), other.forward_reference(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.codes[0, 0, 0] = 99  # out of range for 4-bit codebooks: caught when the index is rebuilt
    with pytest.raises(InputError, match=r"\[0, 16\).*99"):
        layer(x.float())


def test_a_narrow_layer_decodes_with_a_cached_matrix_without_gradients_only():
    layer = make_layer(out_features=10, in_features=32, m=2, bits=4, g=8, dtype=torch.float64)  # 10 < 16 codewords
    assert layer.is_narrow() and not make_layer(out_features=16, bits=4).is_narrow()
    assert not make_layer(out_features=5, in_features=16, m=1, bits=16).is_narrow()  # 1x16: never cached
    x = torch.randn(1, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.forward_reference(x))
        torch.testing.assert_close(layer.matmul(x), layer.forward_reference(x) - layer.bias)
        cached = layer._narrow_cache
        assert cached is not None
        layer(x)
        assert layer._narrow_cache is cached  # reused
        layer.codebooks.mul_(2)  # an in-place change (a fine-tune step) rebuilds it
        torch.testing.assert_close(layer(x), layer.forward_reference(x))
        assert layer._narrow_cache is not cached
    layer.codebooks.grad = None
    layer(x).sum().backward()  # with gradients: computed from the codebooks, not the cache
    assert layer.codebooks.grad is not None and layer.codebooks.grad.abs().sum() > 0


def test_a_layer_without_scales_holds_constant_ones_it_neither_trains_nor_counts():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 4, 2), generator=gen)
    books = torch.randn(2, 16, 8, generator=gen)
    layer = AQLMLinear.from_parts(codes, books, torch.ones(24), None, scale_layout="none")
    assert [n for n, _ in layer.named_parameters()] == ["codebooks"] and "scales" in dict(layer.named_buffers())
    assert layer.bits_breakdown()["scales"] == 0 and layer.config_name == "2x4g8-noscale"
    x = torch.randn(3, 32, generator=gen)
    torch.testing.assert_close(layer(x), layer.forward_reference(x).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="scales of ones"):
        AQLMLinear.from_parts(codes, books, torch.full((24,), 2.0), None, scale_layout="none")
    with pytest.raises(ConfigError, match="scale_layout must be one of"):
        AQLMLinear(32, 24, 2, 4, 8, scale_layout="group")


def test_module_state_and_accounting():
    layer = make_layer(out_features=24, in_features=32, m=2, bits=4, g=8, dtype=torch.float32)
    assert layer.codes.dtype == torch.int32 and "codes" in dict(layer.named_buffers())
    assert {n for n, _ in layer.named_parameters()} == {"codebooks", "scales", "bias"}
    parts = layer.bits_breakdown()
    assert parts == {"codes": 24 * 4 * 2 * 4, "codebooks": 16 * 2 * 16 * 8, "scales": 16 * 24, "bias": 16 * 24}
    assert layer.storage_bits() == parts["codes"] + parts["codebooks"] + parts["scales"]
    assert layer.bits_per_parameter() == layer.storage_bits() / (24 * 32)
    # the packed codes in a checkpoint take exactly the bytes counted
    assert 8 * pack_codes(layer.codes, 4).numel() == parts["codes"]
    text = repr(layer)
    assert "in_features=32, out_features=24" in text and "config=2x4g8" in text and "bias=True" in text
    fresh = AQLMLinear(32, 24, 2, 4, 8, bias=False)
    assert fresh.bias is None and fresh(torch.randn(2, 32)).abs().max() == 0  # zero codebooks until loaded
    # a 2-bit-per-weight 2x8g8 layer at a realistic width: codes dominate, close to 2 bits per weight
    big = AQLMLinear(768, 3072, 2, 8, 8, bias=False)
    assert 2.0 < big.bits_per_parameter() < 2.1


def test_bad_inputs_name_the_shapes():
    layer = make_layer(dtype=torch.float32)
    with pytest.raises(InputError, match=r"\(\.\.\., 32\).*\(2, 31\)"):
        layer(torch.randn(2, 31))
    with pytest.raises(InputError, match="dtype torch.float64"):
        layer(torch.randn(2, 32, dtype=torch.float64))
    codes = torch.randint(0, 16, (24, 4, 2))
    cb = torch.randn(2, 16, 8)
    s = torch.ones(24)
    with pytest.raises(InputError, match=r"codes of shape \(24, 4, 2\) use 2 codebooks.*\(3, 16, 8\) hold 3"):
        AQLMLinear.from_parts(codes, torch.randn(3, 16, 8), s)
    with pytest.raises(InputError, match=r"\[0, 16\).*from 16 to 16"):
        AQLMLinear.from_parts(torch.full((24, 4, 2), 16), cb, s)
    with pytest.raises(InputError, match=r"\[0, 16\).*from -3"):
        AQLMLinear.from_parts(torch.full((24, 4, 2), -3), cb, s)
    with pytest.raises(InputError, match="power of two"):
        AQLMLinear.from_parts(codes % 12, torch.randn(2, 12, 8), s)
    with pytest.raises(InputError, match=r"scales must be \(out_features,\) = \(24,\).*\(23,\)"):
        AQLMLinear.from_parts(codes, cb, torch.ones(23))
    with pytest.raises(InputError, match=r"bias must be \(out_features,\) = \(24,\), got \(24, 1\)"):
        AQLMLinear.from_parts(codes, cb, s, torch.ones(24, 1))
    with pytest.raises(InputError, match=r"codes must be \(out_features, groups, num_codebooks\).*\(24, 8\)"):
        AQLMLinear.from_parts(codes.view(24, 8), cb, s)
    with pytest.raises(InputError, match="integer tensor"):
        AQLMLinear.from_parts(codes.float(), cb, s)
    with pytest.raises(ConfigError, match="group_size 5 does not divide in_features 32"):
        AQLMLinear(32, 24, 2, 4, 5)
    for bits in (0, 17):
        with pytest.raises(ConfigError, match="codebook_bits must be an integer in 1..16"):
            AQLMLinear(32, 24, 2, bits, 8)
    with pytest.raises(ConfigError, match="num_codebooks"):
        AQLMLinear(32, 24, 0, 4, 8)


def test_bench_quick_runs_in_process(monkeypatch, capsys):
    """bench/quant_linear.py --quick prints the machine line first and its table (no timing assertions)."""
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_quant_linear", bench / "quant_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--quick", "--threads", "1", "--repeats", "1", "--iters", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.startswith("machine:")
    assert "| layer | in -> out | weights | rows | peer | bits/weight | us per call | vs fp32 | forward() path |" in out
    assert "| tiny in_proj | 64 -> 256 | hot | 1 | AQLM 2x8g8 LUT |" in out
    assert "| hot | 64 | AQLM 1x16g8 dequant+GEMM |" in out and "| tiny out_proj | 128 -> 64 | cold x32 | 1 |" in out
    assert "LUT skipped" in out  # 1x16 at 64 rows: the table exceeds the quick limit
