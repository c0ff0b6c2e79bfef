"""Mamba-1 selective scan: the vectorised torch path against the float64 sequential reference, the reference
against a hand computation, and the exactness invariants (split + threaded state, element-by-element decode).

Tolerances (max-abs-diff / max-abs(reference)): outputs and final states 1e-5, gradients 1e-4, for the float32
torch path against the float64 reference on the same (float32-representable) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
from seqlab.kernels import KernelInputError
from seqlab.kernels.scan.chunked import selective_scan_chunked, selective_state_update_chunked
from seqlab.kernels.scan.ref import selective_scan_ref, selective_state_update_ref
from seqlab.testing import as_f64, assert_rel, channels_last, rel_err, strided
from seqlab.testing import scan_inputs as make_inputs

OUT_TOL = 1e-5
GRAD_TOL = 1e-4


NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# (chunk_size, block_elems): the default tiling, and small ones that force many blocks, a padded last chunk,
# chunks of one position and odd chunk lengths (b * d * n = 24 elements per position in most tests).
TILINGS = [(None, None), (8, 24 * 40), (1, 24 * 5), (5, 24 * 7)]


def run_ref(inputs, softplus, final=True):
    return selective_scan_ref(
        **{k: as_f64(v) for k, v in inputs.items()}, delta_softplus=softplus, return_final_state=final
    )


OPTIONS = {
    # name: (make_inputs kwargs, delta_softplus); without softplus the raw delta is made positive, as a real
    # step size is (negative ones make the states grow exponentially; that case has its own test)
    "full": (dict(gB=2, gC=2), True),
    "bare": (dict(D=False, z=False, bias=False, init=False, positive_delta=True), False),
    "mixed": (dict(gB=4, gC=None, z=False, bias=False), True),
    "gate_only": (dict(gB=None, gC=2, D=False, init=False, positive_delta=True), False),
}


# ------------------------------------------------------------------------------------ the reference itself


def test_reference_matches_hand_computation():
    """l = 2, d = 1, n = 1 with every option on, computed here with plain float arithmetic."""
    u, dr, A, Bv, Cv, Dv, zv, db, h0 = (
        [1.0, 2.0],
        [0.5, -1.0],
        -0.7,
        [0.3, -0.4],
        [1.5, 0.25],
        0.2,
        [0.1, -0.3],
        0.1,
        0.6,
    )

    def softplus(x):
        return math.log1p(math.exp(x))

    def silu(x):
        return x / (1.0 + math.exp(-x))

    h, outs = h0, []
    for t in range(2):
        dt = softplus(dr[t] + db)
        h = math.exp(dt * A) * h + dt * u[t] * Bv[t]
        outs.append((Cv[t] * h + Dv * u[t]) * silu(zv[t]))

    t64 = dict(dtype=torch.float64)
    out, hT = selective_scan_ref(
        torch.tensor([[u]], **t64),
        torch.tensor([[dr]], **t64),
        torch.tensor([[A]], **t64),
        torch.tensor([[Bv]], **t64)[:, None],
        torch.tensor([[Cv]], **t64)[:, None],
        D=torch.tensor([Dv], **t64),
        z=torch.tensor([[zv]], **t64),
        delta_bias=torch.tensor([db], **t64),
        delta_softplus=True,
        initial_state=torch.tensor([[[h0]]], **t64),
        return_final_state=True,
    )
    assert out.shape == (1, 1, 2) and hT.shape == (1, 1, 1)
    assert torch.allclose(out[0, 0], torch.tensor(outs, **t64), rtol=1e-13, atol=0)
    assert abs(hT.item() - h) < 1e-13

    # the decode step of the reference gives the same first element
    y1, h1 = selective_state_update_ref(
        torch.tensor([[[h0]]], **t64),
        torch.tensor([[u[0]]], **t64),
        torch.tensor([[dr[0]]], **t64),
        torch.tensor([[A]], **t64),
        torch.tensor([[Bv[0]]], **t64),
        torch.tensor([[Cv[0]]], **t64),
        D=torch.tensor([Dv], **t64),
        z=torch.tensor([[zv[0]]], **t64),
        dt_bias=torch.tensor([db], **t64),
        dt_softplus=True,
    )
    assert abs(y1.item() - outs[0]) < 1e-13


def test_reference_group_mapping_by_hand():
    """Channel i reads group i // (d // g): d = 4, g = 2, l = 1, zero state, no softplus: y = sum_n C dt u B."""
    d, n = 4, 2
    u = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]], dtype=torch.float64)
    delta = torch.full((1, d, 1), 0.5, dtype=torch.float64)
    A = -torch.ones(d, n, dtype=torch.float64)
    B = torch.tensor([[[[1.0], [0.0]], [[0.0], [10.0]]]], dtype=torch.float64)  # (1, g=2, n=2, 1)
    C = torch.tensor([[[[1.0], [1.0]], [[1.0], [1.0]]]], dtype=torch.float64)
    out = selective_scan_ref(u, delta, A, B, C)
    # channels 0, 1 read group 0 (B = [1, 0]); channels 2, 3 read group 1 (B = [0, 10])
    expected = torch.tensor([0.5 * 1 * 1, 0.5 * 2 * 1, 0.5 * 3 * 10, 0.5 * 4 * 10], dtype=torch.float64)
    assert torch.allclose(out[0, :, 0], expected, rtol=1e-14, atol=0)
    assert torch.allclose(selective_scan_chunked(u, delta, A, B, C)[0, :, 0], expected, rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------------ forward and gradients


@pytest.mark.parametrize("l", [1, 2, 63, 257, 1000])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_matches_reference(l, option):
    kwargs, softplus = OPTIONS[option]
    inputs = make_inputs(l=l, seed=l, **kwargs)
    ref_out, ref_state = run_ref(inputs, softplus)
    for chunk, block in TILINGS:
        with torch.no_grad():
            out, state = selective_scan_chunked(
                **inputs, delta_softplus=softplus, return_final_state=True, chunk_size=chunk, block_elems=block
            )
        assert out.dtype == torch.float32 and state.dtype == torch.float32
        assert state.shape == (2, 4, 3)
        assert_rel(out, ref_out, OUT_TOL, f"out, tiling {chunk, block}")
        assert_rel(state, ref_state, OUT_TOL, f"final state, tiling {chunk, block}")
        plain = selective_scan_chunked(**inputs, delta_softplus=softplus, chunk_size=chunk, block_elems=block)
        assert torch.equal(plain, out)


@pytest.mark.parametrize("layout", ["standard", "channels_last"])
def test_realistic_width(layout):
    """A mixer-like width (d = 96, n = 16, b = 1): the 2-D transpose staging and wide batched matmuls."""
    inputs = make_inputs(b=1, d=96, n=16, l=400, seed=16)
    if layout == "channels_last":
        inputs = _relayout(inputs, "channels_last")
    ref_out, ref_state = run_ref(inputs, True)
    for chunk, block in [(None, None), (16, 96 * 16 * 64)]:
        with torch.no_grad():
            out, state = selective_scan_chunked(
                **inputs, delta_softplus=True, return_final_state=True, chunk_size=chunk, block_elems=block
            )
        assert_rel(out, ref_out, OUT_TOL, "out")
        assert_rel(state, ref_state, OUT_TOL, "state")
    short = {k: (v[..., :100] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
    _grad_check(short, True, [(16, 96 * 16 * 32)])


def _grad_check(inputs, softplus, tilings, *, out_weight=True, state_weight=True, seed=1):
    names = [k for k, v in inputs.items() if v is not None]
    ref_in = {k: (as_f64(v).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref_out, ref_state = selective_scan_ref(**ref_in, delta_softplus=softplus, return_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
    g_state = torch.randn(ref_state.shape, generator=gen, dtype=torch.float64)
    loss = 0
    if out_weight:
        loss = loss + (ref_out * g_out).sum()
    if state_weight:
        loss = loss + (ref_state * g_state).sum()
    ref_grads = torch.autograd.grad(loss, [ref_in[k] for k in names], allow_unused=True)
    for chunk, block in tilings:
        fast_in = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
        out, state = selective_scan_chunked(
            **fast_in, delta_softplus=softplus, return_final_state=True, chunk_size=chunk, block_elems=block
        )
        loss = 0
        if out_weight:
            loss = loss + (out * g_out.to(out.dtype)).sum()
        if state_weight:
            loss = loss + (state * g_state.float()).sum()
        grads = torch.autograd.grad(loss, [fast_in[k] for k in names], allow_unused=True)
        for k, g, rg in zip(names, grads, ref_grads):
            if rg is None:
                assert g is None or g.abs().max() == 0, k
                continue
            assert g is not None, f"no gradient for {k}"
            assert g.shape == inputs[k].shape and g.dtype == inputs[k].dtype, k
            assert_rel(g, rg, GRAD_TOL, f"grad of {k}, tiling {chunk, block}")


@pytest.mark.parametrize("l", [1, 2, 63, 257])
@pytest.mark.parametrize("option", ["full", "bare", "mixed"])
def test_gradients_match_reference(l, option):
    kwargs, softplus = OPTIONS[option]
    _grad_check(make_inputs(l=l, seed=10 + l, **kwargs), softplus, TILINGS[:3])


def test_gradients_long_sequence():
    kwargs, softplus = OPTIONS["full"]
    _grad_check(make_inputs(l=1000, seed=3, **kwargs), softplus, [(None, None), (16, 24 * 64)])


@pytest.mark.parametrize("which", ["out_only", "state_only"])
def test_gradients_through_one_output(which):
    """Only one of (out, final_state) feeds the loss: the other's gradient arrives as None."""
    kwargs, softplus = OPTIONS["full"]
    _grad_check(
        make_inputs(l=50, seed=4, **kwargs),
        softplus,
        TILINGS[:2],
        out_weight=which == "out_only",
        state_weight=which == "state_only",
    )


def test_gradient_without_final_state():
    inputs = make_inputs(l=30, seed=5, gB=2, gC=2)
    ref_in = {k: as_f64(v).requires_grad_() for k, v in inputs.items()}
    selective_scan_ref(**ref_in, delta_softplus=True).square().sum().backward()
    fast_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    selective_scan_chunked(**fast_in, delta_softplus=True, chunk_size=4, block_elems=24 * 8).square().sum().backward()
    for k in NAMES:
        assert_rel(fast_in[k].grad, ref_in[k].grad, GRAD_TOL, k)


def test_no_grad_path_equals_grad_path():
    inputs = make_inputs(l=300, seed=6, gB=2, gC=2)
    with torch.no_grad():
        out0, st0 = selective_scan_chunked(**inputs, delta_softplus=True, return_final_state=True)
    with torch.inference_mode():
        out1, st1 = selective_scan_chunked(**inputs, delta_softplus=True, return_final_state=True)
    grad_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out2, st2 = selective_scan_chunked(**grad_in, delta_softplus=True, return_final_state=True)
    assert out2.requires_grad and st2.requires_grad
    assert torch.equal(out0, out1) and torch.equal(st0, st1)
    # same scan core; the delta preprocessing and D / z epilogue are composed ops here, fused ops there
    assert rel_err(out2, out0) <= 1e-6 and rel_err(st2, st0) <= 1e-6
    # nothing requires grad -> the fused path even with grad mode on
    out3 = selective_scan_chunked(**inputs, delta_softplus=True)
    assert not out3.requires_grad and torch.equal(out3, out0)


def test_empty_sequence():
    inputs = make_inputs(l=0)
    out, state = selective_scan_chunked(**inputs, delta_softplus=True, return_final_state=True)
    ref_out, ref_state = run_ref(inputs, True)
    assert out.shape == ref_out.shape == (2, 4, 0)
    assert torch.equal(state, inputs["initial_state"]) and state.data_ptr() != inputs["initial_state"].data_ptr()
    assert torch.equal(ref_state.float(), state)


# ------------------------------------------------------------------------------------ layouts and dtypes


def _relayout(inputs, how):
    out = dict(inputs)
    for k in ("u", "delta", "z"):
        if out[k] is not None:
            out[k] = {
                "channels_last": channels_last,
                "strided": strided,
                "mixed": channels_last if k == "u" else strided,
            }[how](out[k])
    for k in ("B", "C"):
        # (b, n, l) as the transpose of a contiguous (b, l, n), as a mixer's x_proj produces it
        out[k] = out[k].transpose(-1, -2).contiguous().transpose(-1, -2)
    out["A"] = out["A"].t().contiguous().t()
    return out


@pytest.mark.parametrize("how", ["channels_last", "strided", "mixed"])
def test_non_contiguous_inputs(how):
    base = make_inputs(l=77, seed=7, gB=2, gC=2)
    inputs = _relayout(base, how)
    assert not inputs["u"].is_contiguous()
    ref_out, ref_state = run_ref(base, True)
    for chunk, block in TILINGS[:2]:
        with torch.no_grad():
            out, state = selective_scan_chunked(
                **inputs, delta_softplus=True, return_final_state=True, chunk_size=chunk, block_elems=block
            )
        assert_rel(out, ref_out, OUT_TOL, "out")
        assert_rel(state, ref_state, OUT_TOL, "state")
    if how == "channels_last":
        assert out.stride(1) == 1  # the output keeps the position-major layout of u
    _grad_check(inputs, True, TILINGS[1:2])


def test_mixer_like_inputs():
    """As a Mamba-1 mixer hands them over: u, z halves of one (b, l, 2d) projection seen as (b, d, l) (position-
    major views with gaps), delta / B / C transposed views of (b, l, .) tensors."""
    b, d, n, l = 2, 4, 3, 70
    gen = torch.Generator().manual_seed(19)
    xz = torch.randn(b, l, 2 * d, generator=gen)
    u, z = xz.transpose(1, 2).chunk(2, dim=1)
    dbc = torch.randn(b, l, d + 2 * n, generator=gen)
    delta, Bm, Cm = (t.transpose(1, 2) for t in torch.split(dbc, [d, n, n], dim=-1))
    A, D, bias = -torch.rand(d, n, generator=gen), torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    inputs = dict(u=u, delta=delta, A=A, B=Bm, C=Cm, D=D, z=z, delta_bias=bias, initial_state=None)
    ref_out, ref_state = run_ref(inputs, True)
    for chunk, block in TILINGS[:2]:
        with torch.no_grad():
            out, state = selective_scan_chunked(
                **inputs, delta_softplus=True, return_final_state=True, chunk_size=chunk, block_elems=block
            )
        assert out.stride(1) == 1 and out.stride(2) == d  # a dense position-major output
        assert_rel(out, ref_out, OUT_TOL, "out")
        assert_rel(state, ref_state, OUT_TOL, "state")
    _grad_check({k: (v.detach() if v is not None else None) for k, v in inputs.items()}, True, TILINGS[1:2])


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("a_fp32", [True, False])
def test_low_precision_inputs(dtype, tol, a_fp32):
    inputs = make_inputs(l=90, seed=8, gB=2, gC=2, dtype=dtype)
    if a_fp32:
        inputs["A"] = inputs["A"].float()
    ref_out, ref_state = run_ref(inputs, True)  # the same (rounded) values, in float64
    out, state = selective_scan_chunked(**inputs, delta_softplus=True, return_final_state=True, chunk_size=8)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert_rel(out, ref_out, tol, "out")
    # the state is accumulated in fp32 from exactly representable inputs: fp32 accuracy
    assert_rel(state, ref_state, OUT_TOL, "state")
    ref_lp_out, ref_lp_state = selective_scan_ref(**inputs, delta_softplus=True, return_final_state=True)
    assert ref_lp_out.dtype == dtype and ref_lp_state.dtype == torch.float32
    # gradients come back in the input dtypes
    fast_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    o, s = selective_scan_chunked(**fast_in, delta_softplus=True, return_final_state=True, chunk_size=8)
    (o.float().sum() + s.sum()).backward()
    ref_in = {k: as_f64(v).requires_grad_() for k, v in inputs.items()}
    ro, rs = selective_scan_ref(**ref_in, delta_softplus=True, return_final_state=True)
    (ro.sum() + rs.sum()).backward()
    for k in NAMES:
        assert fast_in[k].grad.dtype == inputs[k].dtype
        assert_rel(fast_in[k].grad, ref_in[k].grad, 4 * tol, f"grad of {k}")


def test_float64_inputs_give_float64_state():
    inputs = {k: as_f64(v) for k, v in make_inputs(l=40, seed=9).items()}
    out, state = selective_scan_chunked(**inputs, delta_softplus=True, return_final_state=True, chunk_size=4)
    ref_out, ref_state = run_ref(inputs, True)
    assert out.dtype == state.dtype == torch.float64
    assert_rel(out, ref_out, 1e-12, "out")
    assert_rel(state, ref_state, 1e-12, "state")


def test_extreme_values_are_exact_and_finite():
    """delta up to ~10 after softplus, A down to -100, and tiny decays: no overflow, no NaN, matches the ref."""
    inputs = make_inputs(l=300, seed=11, gB=2, gC=2, delta_scale=6.0, a_range=(-100.0, -1e-4))
    inputs["delta"][:, :, ::7] = 10.0  # softplus(10 + bias) ~ 10: decays exp(-1000) underflow to 0
    inputs["delta"][:, :, 3::11] = -30.0  # softplus ~ 1e-13: decays of exactly 1 in float32
    ref_out, ref_state = run_ref(inputs, True)
    for chunk, block in TILINGS:
        with torch.no_grad():
            out, state = selective_scan_chunked(
                **inputs, delta_softplus=True, return_final_state=True, chunk_size=chunk, block_elems=block
            )
        assert_rel(out, ref_out, OUT_TOL, "out")
        assert_rel(state, ref_state, OUT_TOL, "state")
    _grad_check(inputs, True, TILINGS[1:2])
    # raw (no softplus) negative delta: growing states are reproduced, not cut off
    grow = make_inputs(l=64, seed=12, D=False, z=False, bias=False, init=True, a_range=(-1.0, -0.5))
    grow["delta"] = -grow["delta"].abs() * 0.3
    ref_out, ref_state = run_ref(grow, False)
    out, state = selective_scan_chunked(**grow, return_final_state=True, chunk_size=8)
    assert ref_state.abs().max() > 100
    assert_rel(out, ref_out, OUT_TOL, "out")
    assert_rel(state, ref_state, OUT_TOL, "state")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_fast_softplus_matches_log1p_formula(dtype, tol):
    """The vectorised in-place softplus of the fast path against max(x, 0) + log1p(exp(-|x|)) in float64,
    relative error over the whole range (tiny results included: that is where a naive log(1 + e^x) fails)."""
    from seqlab.kernels.scan.chunked import _softplus_

    x = torch.cat(
        [
            torch.linspace(-80, 80, 20001, dtype=torch.float64),
            torch.tensor([0.0, 1e-30, -1e-30, 19.99, 20.0, 20.01, 30.0, -30.0], dtype=torch.float64),
        ]
    )
    x = x.to(dtype)
    xd = x.double()
    expected = xd.clamp(min=0) + torch.log1p(torch.exp(-xd.abs()))
    got = _softplus_(x.clone(), torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)).double()
    assert ((got - expected).abs() / expected).max().item() <= tol


# ------------------------------------------------------------------------------------ exactness invariants


@settings(max_examples=25, deadline=None)
@given(
    l=st.integers(1, 150),
    cuts=st.lists(st.integers(1, 149), max_size=4),
    chunk=st.sampled_from([1, 3, 8, 16]),
    seed=st.integers(0, 10_000),
)
def test_split_and_thread_state_equals_one_pass(l, cuts, chunk, seed):
    inputs = make_inputs(l=l, seed=seed, gB=2, gC=2)
    full_out, full_state = selective_scan_chunked(**inputs, delta_softplus=True, return_final_state=True)
    points = sorted({c for c in cuts if c < l})
    bounds = [0, *points, l]
    state = inputs["initial_state"]
    pieces = []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        part = dict(inputs)
        for k in ("u", "delta", "z", "B", "C"):
            part[k] = inputs[k][..., s0:s1]
        part["initial_state"] = state
        out, state = selective_scan_chunked(
            **part, delta_softplus=True, return_final_state=True, chunk_size=chunk, block_elems=24 * 2 * chunk
        )
        pieces.append(out)
    assert_rel(torch.cat(pieces, dim=-1), full_out, OUT_TOL, "split outputs")
    assert_rel(state, full_state, OUT_TOL, "split final state")


@pytest.mark.parametrize("gB, gC", [(None, None), (2, 2), (4, None)])
@pytest.mark.parametrize("step", [selective_state_update_chunked, selective_state_update_ref])
def test_decode_steps_equal_scan(gB, gC, step):
    l = 40
    inputs = make_inputs(l=l, seed=13, gB=gB, gC=gC)
    ref_out, ref_state = run_ref(inputs, True)
    scan_out, scan_state = selective_scan_chunked(**inputs, delta_softplus=True, return_final_state=True)
    state = inputs["initial_state"].clone()
    before = state.clone()
    ys = []
    for t in range(l):
        y, new_state = step(
            state,
            inputs["u"][:, :, t],
            inputs["delta"][:, :, t],
            inputs["A"],
            inputs["B"][..., t],
            inputs["C"][..., t],
            D=inputs["D"],
            z=inputs["z"][:, :, t],
            dt_bias=inputs["delta_bias"],
            dt_softplus=True,
        )
        assert y.shape == (2, 4) and new_state.shape == (2, 4, 3) and new_state.dtype == torch.float32
        if t == 0:
            assert torch.equal(state, before), "the decode step mutated the state passed in"
        ys.append(y)
        state = new_state
    steps = torch.stack(ys, dim=-1)
    assert_rel(steps, scan_out, OUT_TOL, "decode vs scan outputs")
    assert_rel(state, scan_state, OUT_TOL, "decode vs scan state")
    assert_rel(steps, ref_out, OUT_TOL, "decode vs ref outputs")


def test_decode_step_non_contiguous_inputs():
    """As a mixer calls it: x, z (and dt, B, C) are column slices of one projection; the state a transposed copy."""
    b, d, n = 3, 4, 5
    gen = torch.Generator().manual_seed(17)
    proj = torch.randn(b, 2 * d, generator=gen)
    x, z = proj.chunk(2, dim=-1)
    dbc = torch.randn(b, d + 2 * n, generator=gen)
    dt, Bm, Cm = torch.split(dbc, [d, n, n], dim=-1)
    state = torch.randn(b, n, d, generator=gen).transpose(1, 2)
    A, D, bias = -torch.rand(d, n, generator=gen), torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    assert not (x.is_contiguous() or dt.is_contiguous() or state.is_contiguous())
    y, s = selective_state_update_chunked(state, x, dt, A, Bm, Cm, D=D, z=z, dt_bias=bias, dt_softplus=True)
    yr, sr = selective_state_update_ref(
        *(as_f64(t) for t in (state, x, dt, A, Bm, Cm)),
        D=as_f64(D),
        z=as_f64(z),
        dt_bias=as_f64(bias),
        dt_softplus=True,
    )
    assert_rel(y, yr, OUT_TOL, "y")
    assert_rel(s, sr, OUT_TOL, "state")


def test_decode_step_gradients_and_dtypes():
    inputs = make_inputs(l=1, seed=14, gB=2, gC=2)
    args = dict(
        state=inputs["initial_state"],
        x=inputs["u"][:, :, 0],
        dt=inputs["delta"][:, :, 0],
        A=inputs["A"],
        B=inputs["B"][..., 0],
        C=inputs["C"][..., 0],
        D=inputs["D"],
        z=inputs["z"][:, :, 0],
        dt_bias=inputs["delta_bias"],
    )
    ref_in = {k: as_f64(v).requires_grad_() for k, v in args.items()}
    y, s = selective_state_update_ref(**ref_in, dt_softplus=True)
    (y.sin().sum() + s.cos().sum()).backward()
    fast_in = {k: v.clone().requires_grad_() for k, v in args.items()}
    y2, s2 = selective_state_update_chunked(**fast_in, dt_softplus=True)
    (y2.sin().sum() + s2.cos().sum()).backward()
    assert_rel(y2, y, OUT_TOL, "y")
    assert_rel(s2, s, OUT_TOL, "state")
    for k in args:
        assert_rel(fast_in[k].grad, ref_in[k].grad, GRAD_TOL, f"grad of {k}")
    # bf16 activations with an fp32 state: y in bf16, state in fp32
    lp = {k: (v.bfloat16() if k in ("x", "dt", "z", "B", "C") else v) for k, v in args.items()}
    y3, s3 = selective_state_update_chunked(**lp, dt_softplus=True)
    assert y3.dtype == torch.bfloat16 and s3.dtype == torch.float32


# ------------------------------------------------------------------------------------ dispatcher


def test_dispatcher_routes_to_both_backends():
    inputs = make_inputs(l=20, seed=15)
    a = K.selective_scan(**inputs, delta_softplus=True, backend="ref")
    b = K.selective_scan(**inputs, delta_softplus=True, backend="chunked")
    c = K.selective_scan(**inputs, delta_softplus=True)
    assert_rel(b, a, OUT_TOL, "chunked vs ref")
    # "auto" is the backend resolve_backend names for CPU tensors (native where it builds, else chunked), bit for bit
    picked = K.resolve_backend("auto", inputs["u"], op="selective_scan")
    assert picked in ("native", "chunked")
    assert torch.equal(K.selective_scan(**inputs, delta_softplus=True, backend=picked), c)
    y, s = K.selective_state_update(
        inputs["initial_state"],
        inputs["u"][:, :, 0],
        inputs["delta"][:, :, 0],
        inputs["A"],
        inputs["B"][..., 0],
        inputs["C"][..., 0],
        backend="chunked",
    )
    assert y.shape == (2, 4) and s.shape == (2, 4, 3)


# ------------------------------------------------------------------------------------ argument errors


def _scan_case(**changes):
    base = make_inputs(b=2, d=4, n=3, l=5)
    base.update(changes)
    return base


SCAN_ERRORS = [
    ("u as a list", dict(u=[[1.0]]), "u must be a torch.Tensor"),
    ("u 2-D", dict(u=torch.randn(2, 4)), "u must have 3 dimensions"),
    ("u integer", dict(u=torch.ones(2, 4, 5, dtype=torch.int64)), "u must be a floating-point tensor"),
    ("delta wrong l", dict(delta=torch.randn(2, 4, 6)), "delta must have shape (b, d, l) (2, 4, 5), got (2, 4, 6)"),
    ("delta wrong d", dict(delta=torch.randn(2, 3, 5)), "delta must have shape"),
    ("delta 4-D", dict(delta=torch.randn(2, 4, 5, 1)), "delta must have 3 dimensions"),
    ("A complex", dict(A=torch.randn(4, 3, dtype=torch.complex64)), "A must be a real floating-point tensor"),
    ("A 1-D", dict(A=torch.randn(4)), "A must have 2 dimensions"),
    ("A wrong d", dict(A=torch.randn(5, 3)), "A must have shape (d, n) (4, '*'), got (5, 3)"),
    ("A integer", dict(A=torch.ones(4, 3, dtype=torch.int32)), "A must be a floating-point tensor"),
    ("B 2-D", dict(B=torch.randn(2, 3)), "B must have 3 or 4 dimensions"),
    ("B wrong n", dict(B=torch.randn(2, 4, 5)), "B must have shape (b, n, l) (2, 3, 5), got (2, 4, 5)"),
    ("B wrong l", dict(B=torch.randn(2, 3, 4)), "B must have shape (b, n, l)"),
    ("B complex", dict(B=torch.randn(2, 3, 5, dtype=torch.complex64)), "B must be a real"),
    ("C grouped wrong n", dict(C=torch.randn(2, 2, 4, 5)), "C must have shape (b, g, n, l) (2, '*', 3, 5)"),
    ("C groups not dividing d", dict(C=torch.randn(2, 3, 3, 5)), "groups g of C (3)"),
    ("B zero groups", dict(B=torch.randn(2, 0, 3, 5)), "groups g of B (0)"),
    ("C wrong batch", dict(C=torch.randn(1, 3, 5)), "C must have shape"),
    ("D wrong shape", dict(D=torch.randn(3)), "D must have shape (d,) (4,), got (3,)"),
    ("D 2-D", dict(D=torch.randn(4, 1)), "D must have 1 dimensions"),
    ("z wrong shape", dict(z=torch.randn(2, 4, 4)), "z must have shape (b, d, l)"),
    ("z integer", dict(z=torch.ones(2, 4, 5, dtype=torch.int64)), "z must be a floating-point tensor"),
    ("delta_bias wrong", dict(delta_bias=torch.randn(5)), "delta_bias must have shape (d,) (4,), got (5,)"),
    (
        "initial_state wrong n",
        dict(initial_state=torch.randn(2, 4, 2)),
        "initial_state must have shape (b, d, n) (2, 4, 3), got (2, 4, 2)",
    ),
    ("initial_state 2-D", dict(initial_state=torch.randn(2, 4)), "initial_state must have 3 dimensions"),
    ("D on another device", dict(D=torch.empty(4, device="meta")), "all tensors must be on one device"),
]


@pytest.mark.parametrize(
    "impl",
    [selective_scan_ref, selective_scan_chunked, lambda *a, **k: K.selective_scan(*a, **k, backend="chunked")],
    ids=["ref", "torch", "dispatch"],
)
@pytest.mark.parametrize("case, changes, message", SCAN_ERRORS, ids=[c[0] for c in SCAN_ERRORS])
def test_scan_argument_errors(impl, case, changes, message):
    with pytest.raises(KernelInputError) as info:
        impl(**_scan_case(**changes), delta_softplus=True)
    assert message in str(info.value)


def _step_case(**changes):
    base = dict(
        state=torch.randn(2, 4, 3),
        x=torch.randn(2, 4),
        dt=torch.randn(2, 4),
        A=-torch.rand(4, 3),
        B=torch.randn(2, 3),
        C=torch.randn(2, 2, 3),
        D=torch.randn(4),
        z=torch.randn(2, 4),
        dt_bias=torch.randn(4),
    )
    base.update(changes)
    return base


STEP_ERRORS = [
    ("x 3-D", dict(x=torch.randn(2, 4, 1)), "x must have 2 dimensions"),
    ("x integer", dict(x=torch.ones(2, 4, dtype=torch.int64)), "x must be a floating-point tensor"),
    ("dt wrong", dict(dt=torch.randn(2, 5)), "dt must have shape (b, d) (2, 4), got (2, 5)"),
    ("A wrong d", dict(A=torch.randn(3, 3)), "A must have shape (d, n)"),
    ("A complex", dict(A=torch.randn(4, 3, dtype=torch.complex64)), "A must be a real"),
    ("state wrong n", dict(state=torch.randn(2, 4, 2)), "state must have shape (b, d, n) (2, 4, 3), got (2, 4, 2)"),
    ("state 2-D", dict(state=torch.randn(2, 4)), "state must have 3 dimensions"),
    ("B wrong n", dict(B=torch.randn(2, 4)), "B must have shape (b, n) (2, 3), got (2, 4)"),
    ("B 4-D", dict(B=torch.randn(2, 1, 3, 1)), "B must have 2 or 3 dimensions"),
    ("C groups not dividing d", dict(C=torch.randn(2, 3, 3)), "groups g of C (3)"),
    ("C grouped wrong n", dict(C=torch.randn(2, 2, 4)), "C must have shape (b, g, n) (2, '*', 3)"),
    ("D wrong", dict(D=torch.randn(2)), "D must have shape (d,)"),
    ("z wrong", dict(z=torch.randn(2, 3)), "z must have shape (b, d)"),
    ("dt_bias wrong", dict(dt_bias=torch.randn(4, 1)), "dt_bias must have 1 dimensions"),
    ("state on another device", dict(state=torch.empty(2, 4, 3, device="meta")), "all tensors must be on one device"),
]


@pytest.mark.parametrize("impl", [selective_state_update_ref, selective_state_update_chunked], ids=["ref", "chunked"])
@pytest.mark.parametrize("case, changes, message", STEP_ERRORS, ids=[c[0] for c in STEP_ERRORS])
def test_step_argument_errors(impl, case, changes, message):
    with pytest.raises(KernelInputError) as info:
        impl(**_step_case(**changes), dt_softplus=True)
    assert message in str(info.value)
