"""The AQLM quantizer core (seqlab.quant.aqlm, issue 20): layout, bits accounting, the objective's monotone descent,
calibration, a round-to-nearest yardstick, determinism and bad input.

The quality checks here are checks of the calibration objective ||(W - W_hat) X^T||^2 on synthetic matrices, not
claims about a model's quality. Every call runs on one torch thread (``num_threads=1``): many small tensor operations
run several times faster that way on a CPU shared with other test workers."""

from __future__ import annotations

import math

import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.quant.aqlm import AQLMConfig, AQLMProgress, AQLMWeight, objective, quantize_aqlm


def _structured(out: int, inp: int, seed: int, rank: int = 8) -> torch.Tensor:
    """A trained-like matrix: low rank plus noise, rows of different norms, a few larger columns."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g) / math.sqrt(rank)
    w = w + 0.4 * torch.randn(out, inp, generator=g)
    w = w * (0.5 + torch.rand(out, 1, generator=g))
    w[:, torch.randperm(inp, generator=g)[: inp // 16]] *= 3.0
    return w


def _correlated_xtx(inp: int, seed: int, samples: int = 1024) -> torch.Tensor:
    """X^T X of inputs with a strongly non-identity covariance (a few directions carry most of the energy)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) * torch.rand(inp, 1, generator=g).pow(4)
    x = torch.randn(samples, inp, generator=g) @ mix + 0.05 * torch.randn(samples, inp, generator=g)
    return x.T @ x


def _rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest over groups of ``group`` consecutive inputs (fp16 scale and zero each):
    the yardstick, written here so this test does not depend on seqlab.quant.rtn."""
    out, inp = weight.shape
    w = weight.reshape(out, inp // group, group)
    low, high = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
    step = ((high - low) / (2**bits - 1)).clamp_min(1e-12).half().float()
    low = low.half().float()
    q = ((w - low) / step).round().clamp(0, 2**bits - 1)
    return (q * step + low).reshape(out, inp)


def test_config_name_parse_and_validation():
    assert AQLMConfig().name == "2x8g8"
    assert AQLMConfig.parse("1x16g8") == AQLMConfig(1, 16, 8)
    assert AQLMConfig.parse("2x8g8").codebook_size == 256
    for kwargs, field, value in [
        ({"num_codebooks": 0}, "num_codebooks", "0"),
        ({"codebook_bits": 0}, "codebook_bits", "0"),
        ({"codebook_bits": 17}, "codebook_bits", "17"),
        ({"group_size": 0}, "group_size", "0"),
        ({"group_size": 2.5}, "group_size", "2.5"),
    ]:
        with pytest.raises(ConfigError, match=field) as info:
            AQLMConfig(**kwargs)
        assert value in str(info.value)
    with pytest.raises(ConfigError, match="2x8"):
        AQLMConfig.parse("2x8")


def test_the_scale_layout_none_stores_no_scales_and_never_increases_the_objective():
    config = AQLMConfig.parse("2x4g8-noscale")
    assert config == AQLMConfig(2, 4, 8, scales="none") and config.name == "2x4g8-noscale"
    assert AQLMConfig.parse(config.name) == config and AQLMConfig.parse("2x4g8").scales == "row"
    with pytest.raises(ConfigError, match="scales must be one of row, none"):
        AQLMConfig(scales="group")
    with pytest.raises(ConfigError, match="MxBgG-noscale"):
        AQLMConfig.parse("2x4g8-scale")
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 32, generator=g) * torch.linspace(0.1, 3, 24).unsqueeze(1)  # rows of other sizes
    x = torch.randn(200, 32, generator=g)
    none = quantize_aqlm(weight, x.t() @ x, config, max_rounds=3, seed=0)
    row = quantize_aqlm(weight, x.t() @ x, AQLMConfig(2, 4, 8), max_rounds=3, seed=0)
    assert torch.equal(none.scales, torch.ones(24))
    assert all(b <= a for a, b in zip(none.history, none.history[1:]))
    assert row.storage_bits() - none.storage_bits() == 24 * 16  # the fp16 scales, and nothing else
    # per-row scales fit rows of very different magnitudes better at the same codebooks
    assert objective(weight, row.dequantize(), x.t() @ x) < objective(weight, none.dequantize(), x.t() @ x)


def test_dequantize_matches_the_formula_by_a_loop():
    cfg = AQLMConfig(num_codebooks=2, codebook_bits=2, group_size=4)
    g = torch.Generator().manual_seed(0)
    out, groups = 3, 2
    codes = torch.randint(0, 4, (out, groups, 2), generator=g)
    codebooks = torch.randn(2, 4, 4, generator=g)
    scales = torch.rand(out, generator=g) + 0.5
    q = AQLMWeight(codes=codes, codebooks=codebooks, scales=scales, config=cfg)
    expected = torch.zeros(out, groups * 4)
    for o in range(out):
        for j in range(groups):
            for m in range(2):
                expected[o, j * 4 : (j + 1) * 4] += codebooks[m, codes[o, j, m]]
            expected[o, j * 4 : (j + 1) * 4] *= scales[o]
    w_hat = q.dequantize()
    assert w_hat.shape == (out, 8) and w_hat.dtype == torch.float32
    torch.testing.assert_close(w_hat, expected)
    stored = q.dequantize(as_stored=True)
    rounded = AQLMWeight(codes, codebooks.half().float(), scales.half().float(), cfg).dequantize()
    torch.testing.assert_close(stored, rounded, rtol=0, atol=0)
    assert not torch.equal(stored, w_hat)  # the fp16 rounding is real for these values


def test_quantize_shapes_dtypes_and_code_range_on_tiny_lm_weights():
    from seqlab.testing import tiny_lm

    weight = tiny_lm().backbone.layers[0].mixer.in_proj.weight.detach()  # (64, 16): a shape check only
    cfg = AQLMConfig(num_codebooks=2, codebook_bits=4, group_size=4)
    q = quantize_aqlm(weight, None, cfg, max_rounds=2, adam_steps=5, num_threads=1, progress=True)
    assert q.codes.shape == (64, 4, 2) and q.codes.dtype == torch.int64
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) < 16
    assert q.codebooks.shape == (2, 16, 4) and q.codebooks.dtype == torch.float32
    assert q.scales.shape == (64,) and q.scales.dtype == torch.float32
    # returned already at stored (fp16) precision
    assert torch.equal(q.codebooks, q.codebooks.half().float()) and torch.equal(q.scales, q.scales.half().float())
    assert torch.equal(q.dequantize(), q.dequantize(as_stored=True))
    assert q.dequantize().shape == weight.shape
    assert math.isclose(objective(weight, q.dequantize(), None), q.history[-1], rel_tol=1e-2)


def test_bits_accounting_exact_and_about_two_bits_on_a_large_layer():
    cfg = AQLMConfig(2, 8, 8)
    q = AQLMWeight(torch.zeros(64, 16, 2, dtype=torch.int64), torch.zeros(2, 256, 8), torch.ones(64), cfg)
    # codes 64 rows * 16 groups * 2 codebooks * 8 bits = 16384; codebooks 2 * 256 * 8 * 16 = 65536; scales 64 * 16
    assert q.storage_bits() == 16384 + 65536 + 1024 == 82944
    assert q.bits_per_parameter() == 82944 / (64 * 128)

    out, inp = 4096, 4096  # a large layer: the codes cost 2 bits per weight, the rest is overhead
    for name, codebook_bits in [("2x8g8", 2 * 256 * 8 * 16), ("1x16g8", 65536 * 8 * 16)]:
        cfg = AQLMConfig.parse(name)
        big = AQLMWeight(
            torch.zeros(out, inp // 8, cfg.num_codebooks, dtype=torch.int64),
            torch.zeros(cfg.num_codebooks, cfg.codebook_size, 8),
            torch.ones(out),
            cfg,
        )
        overhead = (codebook_bits + out * 16) / (out * inp)
        assert big.storage_bits() == 2 * out * inp + codebook_bits + out * 16
        assert big.bits_per_parameter() == pytest.approx(2 + overhead, rel=1e-12)
    assert 2.0 < AQLMWeight.bits_per_parameter(big) < 2.51  # 1x16g8: 65536 fp16 codewords are 0.5 bit at 4096^2


def test_objective_never_increases_and_ends_well_below_the_kmeans_init():
    weight = _structured(64, 128, seed=1)
    xtx = _correlated_xtx(128, seed=2)
    events: list[AQLMProgress] = []
    cfg = AQLMConfig(2, 6, 8)
    q = quantize_aqlm(weight, xtx, cfg, max_rounds=5, adam_steps=20, tol=0.0, progress=events.append, num_threads=1)
    init = quantize_aqlm(weight, xtx, cfg, max_rounds=0, num_threads=1)
    assert len(q.history) == 6 == len(events)
    assert [e.round for e in events] == list(range(6))
    assert all(b <= a for a, b in zip(q.history, q.history[1:])), q.history
    assert init.history == q.history[:1]
    final = objective(weight, q.dequantize(), xtx)
    assert final < 0.5 * objective(weight, init.dequantize(), xtx)


def test_calibration_with_xtx_beats_plain_weight_mse():
    weight = _structured(64, 128, seed=3)
    xtx = _correlated_xtx(128, seed=4)
    cfg = AQLMConfig(2, 6, 8)
    kw = {"max_rounds": 4, "adam_steps": 20, "num_threads": 1}
    calibrated = objective(weight, quantize_aqlm(weight, xtx, cfg, **kw).dequantize(), xtx)
    plain = objective(weight, quantize_aqlm(weight, None, cfg, **kw).dequantize(), xtx)
    assert calibrated < 0.7 * plain, (calibrated, plain)


def test_aqlm_at_two_bits_beats_round_to_nearest_on_the_objective():
    """An objective check at equal-or-fewer total bits for AQLM, not a model quality claim: a low-rank-plus-noise
    matrix stands in for a trained weight, and the yardstick is min-max RTN at 2 bits per weight with an fp16 scale
    and zero per group of 64 (2.5 bits per weight in all) against AQLM 2x4g4 (2 bits of codes, 2.125 in all)."""
    weight = _structured(128, 256, seed=5)
    xtx = _correlated_xtx(256, seed=6)
    q = quantize_aqlm(weight, xtx, AQLMConfig(2, 4, 4), max_rounds=4, adam_steps=20, num_threads=1)
    rtn_bits = 2 + 2 * 16 / 64
    assert q.bits_per_parameter() == 2.125 < rtn_bits
    aqlm = objective(weight, q.dequantize(), xtx)
    rtn = objective(weight, _rtn(weight, bits=2, group=64), xtx)
    assert aqlm < 0.5 * rtn, (aqlm, rtn)
    # and on plain weight error as well, though AQLM was calibrated for xtx
    assert objective(weight, q.dequantize()) < objective(weight, _rtn(weight, bits=2, group=64))


def test_deterministic_for_a_seed():
    weight = _structured(32, 64, seed=7)
    xtx = _correlated_xtx(64, seed=8)
    cfg = AQLMConfig(2, 4, 8)
    kw = {"max_rounds": 2, "adam_steps": 10, "num_threads": 1}
    a = quantize_aqlm(weight, xtx, cfg, seed=3, **kw)
    b = quantize_aqlm(weight, xtx, cfg, seed=3, **kw)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks) and torch.equal(a.scales, b.scales)
    assert a.history == b.history
    c = quantize_aqlm(weight, xtx, cfg, seed=4, **kw)
    assert not torch.equal(a.codebooks, c.codebooks)


def test_beam_width_one_and_eight_both_descend():
    weight = _structured(32, 64, seed=9)
    xtx = _correlated_xtx(64, seed=10)
    for beam in (1, 8):
        q = quantize_aqlm(
            weight, xtx, AQLMConfig(1, 4, 4), beam_size=beam, max_rounds=3, adam_steps=0, tol=0.0, num_threads=1
        )
        assert all(b <= a for a, b in zip(q.history, q.history[1:]))
        assert q.history[-1] < q.history[0]


@pytest.mark.parametrize(
    "weight, xtx, config, error, words",
    [
        (torch.zeros(8), None, AQLMConfig(1, 2, 4), InputError, ["2-D", "(8,)"]),
        (torch.zeros(2, 8, 8), None, AQLMConfig(1, 2, 4), InputError, ["2-D", "(2, 8, 8)"]),
        (torch.ones(4, 10), None, AQLMConfig(1, 2, 4), InputError, ["group_size 4", "in_features 10"]),
        (torch.ones(4, 8), torch.eye(7), AQLMConfig(1, 2, 4), InputError, ["xtx", "(8, 8)", "(7, 7)"]),
        (torch.full((4, 8), math.nan), None, AQLMConfig(1, 2, 4), InputError, ["weight", "non-finite"]),
        (torch.ones(4, 8), torch.full((8, 8), math.inf), AQLMConfig(1, 2, 4), InputError, ["xtx", "non-finite"]),
        (torch.ones(4, 8, dtype=torch.int64), None, AQLMConfig(1, 2, 4), InputError, ["floating", "int64"]),
        (torch.ones(4, 8), None, "2x8g8", ConfigError, ["AQLMConfig", "str"]),
    ],
)
def test_bad_input_names_the_value(weight, xtx, config, error, words):
    with pytest.raises(error) as info:
        quantize_aqlm(weight, xtx, config, max_rounds=1)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"beam_size": 0}, ["beam_size", "0"]),
        ({"max_rounds": -1}, ["max_rounds", "-1"]),
        ({"lr": 0.0}, ["lr", "0.0"]),
        ({"tol": math.nan}, ["tol", "nan"]),
        ({"num_threads": 0}, ["num_threads", "0"]),
    ],
)
def test_bad_options_name_the_value(kwargs, words):
    with pytest.raises(ConfigError) as info:
        quantize_aqlm(torch.ones(4, 8), None, AQLMConfig(1, 2, 4), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_objective_helper():
    w = torch.tensor([[1.0, 2.0]])
    w_hat = torch.tensor([[0.0, 0.0]])
    assert objective(w, w_hat, None) == 5.0
    assert objective(w, w_hat, torch.tensor([[2.0, 1.0], [1.0, 2.0]])) == 2 + 4 + 8
    with pytest.raises(InputError, match="w_hat"):
        objective(w, torch.zeros(2, 1), None)


def _tiny_problem(seed: int, rows: int, groups: int, books: int, k: int, g: int):
    gen = torch.Generator().manual_seed(seed)
    inp = groups * g
    weight = torch.randn(rows, inp, generator=gen)
    codebooks = torch.randn(books, k, g, generator=gen)
    codes = torch.randint(0, k, (rows, groups, books), generator=gen)
    scales = torch.rand(rows, generator=gen) + 0.5
    x = torch.randn(3 * inp, inp, generator=gen) @ torch.randn(inp, inp, generator=gen)
    return weight, codes, codebooks, scales, x.T @ x


def _row_loss(w_row, codes_row, codebooks, scale, h):
    w_hat = AQLMWeight(codes_row.unsqueeze(0), codebooks, scale.view(1), AQLMConfig(1, 1, 1)).dequantize()[0]
    e = (w_row - w_hat).double()
    return float(e @ h.double() @ e)


def test_beam_width_one_is_exact_greedy_coordinate_descent():
    """The incremental scores of the beam search equal the objective recomputed from scratch: with one beam, a sweep
    makes the same choices as a brute-force loop that tries every codeword at each (group, codebook) in turn."""
    from seqlab.quant.aqlm import _beam_search

    weight, codes, codebooks, scales, h = _tiny_problem(0, rows=4, groups=3, books=2, k=4, g=2)
    got = _beam_search(weight, codes, codebooks, scales, h, beam_size=1)
    for o in range(4):
        row = codes[o].clone()
        for j in range(3):
            for m in range(2):
                losses = []
                for c in range(4):
                    row[j, m] = c
                    losses.append(_row_loss(weight[o], row, codebooks, scales[o], h))
                row[j, m] = min(range(4), key=losses.__getitem__)
        assert torch.equal(got[o], row), (o, got[o], row)


def test_a_beam_as_wide_as_the_search_space_finds_the_exact_optimum():
    """One group, two codebooks of 4: 16 assignments per row; a 16-wide beam keeps them all (beams stay distinct), so
    the sweep returns each row's global optimum, which greedy descent can miss."""
    from seqlab.quant.aqlm import _beam_search

    weight, codes, codebooks, scales, h = _tiny_problem(1, rows=12, groups=1, books=2, k=4, g=3)
    got = _beam_search(weight, codes, codebooks, scales, h, beam_size=16)
    greedy = _beam_search(weight, codes, codebooks, scales, h, beam_size=1)
    assert (greedy != got).any(dim=(1, 2)).sum() >= 1  # this case is one where width matters
    for o in range(12):
        best = min(
            (_row_loss(weight[o], torch.tensor([[a, b]]), codebooks, scales[o], h), a, b)
            for a in range(4)
            for b in range(4)
        )
        assert got[o].tolist() == [[best[1], best[2]]], (o, got[o], best)


def test_none_is_the_identity_and_zero_rows_are_fine():
    weight = _structured(16, 32, seed=12)
    weight[3] = 0.0
    cfg = AQLMConfig(1, 4, 4)
    kw = {"max_rounds": 2, "adam_steps": 5, "num_threads": 1}
    a = quantize_aqlm(weight, None, cfg, **kw)
    b = quantize_aqlm(weight, torch.eye(32, dtype=torch.float64), cfg, **kw)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
    assert bool(torch.isfinite(a.dequantize()).all())
    assert a.history[-1] == pytest.approx(objective(weight, a.dequantize()), rel=1e-2)
