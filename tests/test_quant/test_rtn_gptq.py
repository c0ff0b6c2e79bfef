"""Round-to-nearest and GPTQ baselines of seqlab.quant (issue 20): grid bounds, exact bits, GPTQ's advantage on
correlated inputs, its reduction to RTN on white inputs, and the errors."""

from __future__ import annotations

import pytest
import torch

from seqlab.errors import ConfigError, InputError
from seqlab.quant.gptq import layer_error, quantize_gptq
from seqlab.quant.rtn import ScalarQuantWeight, quantize_rtn


def _weight(out_f: int = 24, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def _correlated_xtx(in_f: int = 64, tokens: int = 1024, seed: int = 1) -> torch.Tensor:
    """X^T X of inputs with a strongly non-identity covariance: AR(1)-like mixing along the features plus a few
    dominant directions, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(in_f, dtype=torch.float64)
    cov = 0.9 ** (idx[:, None] - idx[None, :]).abs()
    low = torch.randn(in_f, 4, generator=g, dtype=torch.float64)
    cov = cov + low @ low.t()
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).t()
    return x.t() @ x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_within_half_a_step(bits):
    w = _weight() * 3
    qw = quantize_rtn(w, bits, 16)
    step = qw.scales.float().repeat_interleave(16, dim=1)
    err = (w - qw.dequantize()).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all(), (err / step).max()
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) < 2**bits
    assert qw.dequantize().dtype == torch.float32 and qw.dequantize().shape == w.shape


def test_rtn_exact_bits_hand_computed():
    qw = quantize_rtn(_weight(6, 32), 3, 8)
    # 6 x 32 codes of 3 bits = 576, plus (6 rows x 4 groups) x (16-bit scale + 16-bit zero) = 768
    assert qw.storage_bits() == 576 + 768 == 1344
    assert qw.bits_per_parameter() == pytest.approx(1344 / 192) == 7.0
    assert quantize_rtn(_weight(8, 128), 4, 128).bits_per_parameter() == pytest.approx(4.25)


def test_rtn_round_trip_of_on_grid_matrix_is_exact():
    g = torch.Generator().manual_seed(3)
    out_f, in_f, gs, bits = 5, 24, 8, 3
    codes = torch.randint(0, 8, (out_f, in_f), generator=g)
    codes[:, ::gs] = 0  # every group holds code 0 and the top code, so min/max fix the grid exactly
    codes[:, 1::gs] = 7
    scales = torch.tensor([0.25, 0.5, 0.125], dtype=torch.float16).repeat(out_f, 1)
    zeros = torch.tensor([-1.0, 0.5, -3.0], dtype=torch.float16).repeat(out_f, 1)
    ref = ScalarQuantWeight(codes.to(torch.uint8), scales, zeros, bits, gs)
    again = quantize_rtn(ref.dequantize(), bits, gs)
    assert torch.equal(again.q, ref.q)
    assert torch.equal(again.scales, scales) and torch.equal(again.zeros, zeros)
    assert torch.equal(again.dequantize(), ref.dequantize())


def test_rtn_errors_name_the_value():
    w = _weight(4, 30)
    with pytest.raises(ConfigError, match="group_size 8 does not divide .* 30"):
        quantize_rtn(w, 4, 8)
    with pytest.raises(ConfigError, match="bits .* got 1"):
        quantize_rtn(w, 1, 10)
    with pytest.raises(ConfigError, match="got 9"):
        quantize_rtn(w, 9, 10)
    with pytest.raises(InputError, match=r"2-D .* \(30,\)"):
        quantize_rtn(w[0], 4, 10)
    bad = w.clone()
    bad[2, 7] = float("nan")
    with pytest.raises(InputError, match=r"non-finite value nan at \[2, 7\]"):
        quantize_rtn(bad, 4, 10)
    with pytest.raises(InputError, match=r"xtx must have shape \(30, 30\).*got \(10, 10\)"):
        quantize_gptq(w, torch.eye(10), 4, 10)


def test_scalar_quant_weight_checks_its_fields():
    qw = quantize_rtn(_weight(4, 16), 2, 8)
    with pytest.raises(InputError, match=r"codes in \[0, 5\], outside \[0, 4\) for 2 bits"):
        ScalarQuantWeight(qw.q.clone().fill_(5).index_fill_(1, torch.tensor([0]), 0), qw.scales, qw.zeros, 2, 8)
    with pytest.raises(InputError, match="scales must be float16 of shape"):
        ScalarQuantWeight(qw.q, qw.scales.float(), qw.zeros, 2, 8)
    with pytest.raises(ConfigError, match="group_size 3 does not divide"):
        ScalarQuantWeight(qw.q, qw.scales, qw.zeros, 2, 3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    w, xtx = _weight(), _correlated_xtx()
    rtn = layer_error(w, quantize_rtn(w, bits, 16).dequantize(), xtx)
    gptq = layer_error(w, quantize_gptq(w, xtx, bits, 16).dequantize(), xtx)
    assert gptq < 0.7 * rtn, (bits, gptq, rtn)


def test_gptq_on_white_inputs_is_rtn():
    w = _weight()
    xtx = torch.eye(64, dtype=torch.float64) * 7.0
    for bits in (2, 4):
        rtn, gptq = quantize_rtn(w, bits, 16), quantize_gptq(w, xtx, bits, 16)
        assert (gptq.q != rtn.q).float().mean() < 0.01
        assert layer_error(w, gptq.dequantize(), xtx) == pytest.approx(layer_error(w, rtn.dequantize(), xtx), rel=0.02)


def test_gptq_codes_in_range_deterministic_and_block_size_free():
    w, xtx = _weight(), _correlated_xtx()
    a = quantize_gptq(w, xtx, 3, 16)
    b = quantize_gptq(w, xtx, 3, 16)
    c = quantize_gptq(w, xtx, 3, 16, block_size=7)  # groups straddle blocks: grids use the pending updates
    assert int(a.q.max()) < 8 and a.q.dtype == torch.uint8
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert (a.q != c.q).float().mean() < 0.005
    assert layer_error(w, c.dequantize(), xtx) == pytest.approx(layer_error(w, a.dequantize(), xtx), rel=1e-3)


def test_gptq_dead_inputs_are_rounded_as_they_are():
    w, xtx = _weight(), _correlated_xtx()
    dead = [3, 40]
    xtx[dead, :] = 0
    xtx[:, dead] = 0
    qw = quantize_gptq(w, xtx, 4, 16)
    assert torch.isfinite(qw.dequantize()).all()
    # nothing flows into a dead column, so it is rounded on its group's grid from its own value
    deq = qw.dequantize()
    step = qw.scales.float().repeat_interleave(16, dim=1)
    assert ((w - deq).abs()[:, dead] <= step[:, dead] / 2 * (1 + 1e-5) + 1e-6).all()
    rtn = layer_error(w, quantize_rtn(w, 4, 16).dequantize(), xtx)
    assert layer_error(w, deq, xtx) < rtn


def test_gptq_with_no_calibration_tokens_is_rtn():
    """An MoE expert no calibration token reached has xtx = 0: every input is dead, so GPTQ rounds to nearest."""
    w = _weight()
    got = quantize_gptq(w, torch.zeros(64, 64, dtype=torch.float64), 3, 16)
    want = quantize_rtn(w, 3, 16)
    assert torch.equal(got.q, want.q) and torch.equal(got.scales, want.scales) and torch.equal(got.zeros, want.zeros)


def test_layer_error_is_the_output_error():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 16, generator=g, dtype=torch.float64)
    w = torch.randn(4, 16, generator=g, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    want = ((x @ w.t() - x @ w_hat.t()) ** 2).sum().item()
    assert layer_error(w, w_hat, x.t() @ x) == pytest.approx(want, rel=1e-10)
