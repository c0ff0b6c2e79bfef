"""Causal depthwise conv1d: the vectorised torch path against the float64 sequential reference, the reference
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
from seqlab.kernels.conv1d.chunked import causal_conv1d_chunked, causal_conv1d_update_chunked
from seqlab.kernels.conv1d.ref import causal_conv1d_ref, causal_conv1d_update_ref
from seqlab.testing import as_f64, assert_rel, channels_last, strided

OUT_TOL = 1e-5
GRAD_TOL = 1e-4


def make_inputs(b=2, d=5, l=37, w=4, *, bias=True, init=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return {
        "x": r(b, d, l),
        "weight": r(d, w),
        "bias": r(d) if bias else None,
        "initial_state": r(b, d, w - 1) if init else None,
    }


def run_ref(inputs, activation, final=True):
    return causal_conv1d_ref(
        **{k: as_f64(v) for k, v in inputs.items()}, activation=activation, return_final_state=final
    )


# block sizes (elements of (b, d, positions)): the default, and small ones that force many blocks
BLOCKS = [None, 2 * 5 * 7, 2 * 5 * 16]


# ------------------------------------------------------------------------------------ the reference itself


def test_reference_matches_hand_computation():
    x, taps, bias, init = [1.0, 2.0, 3.0], [0.5, -1.0, 2.0], 0.1, [4.0, 5.0]
    seq = init + x  # the w - 1 = 2 previous inputs, then x
    expected = [bias + sum(taps[k] * seq[t + k] for k in range(3)) for t in range(3)]
    assert expected == pytest.approx([0.1 + 2 - 5 + 2, 0.1 + 2.5 - 1 + 4, 0.1 + 0.5 - 2 + 6], abs=1e-12)
    t64 = dict(dtype=torch.float64)
    args = (torch.tensor([[x]], **t64), torch.tensor([taps], **t64), torch.tensor([bias], **t64))
    y, state = causal_conv1d_ref(*args, initial_state=torch.tensor([[init]], **t64), return_final_state=True)
    assert torch.allclose(y[0, 0], torch.tensor(expected, **t64), rtol=1e-14, atol=0)
    assert state.tolist() == [[[2.0, 3.0]]]
    y_silu = causal_conv1d_ref(*args, activation="silu", initial_state=torch.tensor([[init]], **t64))
    silu = [v / (1 + math.exp(-v)) for v in expected]
    assert torch.allclose(y_silu[0, 0], torch.tensor(silu, **t64), rtol=1e-14, atol=0)
    # l = 1 < w - 1: the final state still holds the last w - 1 inputs, one from the old state
    _, short_state = causal_conv1d_ref(
        args[0][..., :1], args[1], args[2], initial_state=torch.tensor([[init]], **t64), return_final_state=True
    )
    assert short_state.tolist() == [[[5.0, 1.0]]]
    # the decode step gives the first output and shifts the state
    y0, s0 = causal_conv1d_update_ref(args[0][..., 0], torch.tensor([[init]], **t64), args[1], args[2])
    assert abs(y0.item() - expected[0]) < 1e-14 and s0.tolist() == [[[5.0, 1.0]]]


# ------------------------------------------------------------------------------------ forward and gradients


@pytest.mark.parametrize("l", [1, 2, 63, 257, 1000])
@pytest.mark.parametrize("w", [1, 2, 4])
@pytest.mark.parametrize(
    "activation, bias, init", [("silu", True, True), (None, False, False), ("swish", False, True), (None, True, False)]
)
def test_forward_matches_reference(l, w, activation, bias, init):
    inputs = make_inputs(l=l, w=w, bias=bias, init=init, seed=l + w)
    ref_y, ref_state = run_ref(inputs, activation)
    for block in BLOCKS:
        with torch.no_grad():
            y, state = causal_conv1d_chunked(
                **inputs, activation=activation, return_final_state=True, block_elems=block
            )
        assert y.dtype == torch.float32 and state.shape == (2, 5, w - 1)
        assert_rel(y, ref_y, OUT_TOL, f"y, block {block}")
        assert torch.equal(state, ref_state.float()), "the final state holds inputs: it is exact"
        assert torch.equal(causal_conv1d_chunked(**inputs, activation=activation, block_elems=block), y)


def _grad_check(inputs, activation, blocks, *, y_weight=True, state_weight=True, seed=1):
    names = [k for k, v in inputs.items() if v is not None]
    ref_in = {k: (as_f64(v).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref_y, ref_state = causal_conv1d_ref(**ref_in, activation=activation, return_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    g_y = torch.randn(ref_y.shape, generator=gen, dtype=torch.float64)
    g_state = torch.randn(ref_state.shape, generator=gen, dtype=torch.float64)
    loss = (ref_y * g_y).sum() * y_weight + (ref_state * g_state).sum() * state_weight
    ref_grads = torch.autograd.grad(loss, [ref_in[k] for k in names], allow_unused=True)
    for block in blocks:
        fast_in = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
        y, state = causal_conv1d_chunked(**fast_in, activation=activation, return_final_state=True, block_elems=block)
        loss = 0
        if y_weight:
            loss = loss + (y * g_y.to(y.dtype)).sum()
        if state_weight:
            loss = loss + (state * g_state.to(state.dtype)).sum()
        grads = torch.autograd.grad(loss, [fast_in[k] for k in names], allow_unused=True)
        for k, g, rg in zip(names, grads, ref_grads):
            if rg is None or rg.numel() == 0 or rg.abs().max() == 0:
                assert g is None or g.numel() == 0 or g.abs().max() == 0, k
                continue
            assert g.shape == inputs[k].shape and g.dtype == inputs[k].dtype, k
            assert_rel(g, rg, GRAD_TOL, f"grad of {k}, block {block}")


@pytest.mark.parametrize("l", [1, 2, 63, 257, 1000])
@pytest.mark.parametrize("w, activation", [(4, "silu"), (2, None), (1, "silu")])
def test_gradients_match_reference(l, w, activation):
    _grad_check(make_inputs(l=l, w=w, seed=10 + l), activation, BLOCKS[:2])


@pytest.mark.parametrize("which", ["y_only", "state_only"])
def test_gradients_through_one_output(which):
    _grad_check(
        make_inputs(l=3, w=4, seed=2),
        "silu",
        BLOCKS[:2],
        y_weight=which == "y_only",
        state_weight=which == "state_only",
    )
    _grad_check(
        make_inputs(l=30, w=4, seed=3),
        "silu",
        BLOCKS[:2],
        y_weight=which == "y_only",
        state_weight=which == "state_only",
    )


def test_no_grad_path_equals_grad_path():
    inputs = make_inputs(l=300, seed=4)
    with torch.no_grad():
        y0, s0 = causal_conv1d_chunked(**inputs, activation="silu", return_final_state=True)
    with torch.inference_mode():
        y1, s1 = causal_conv1d_chunked(**inputs, activation="silu", return_final_state=True)
    grad_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y2, s2 = causal_conv1d_chunked(**grad_in, activation="silu", return_final_state=True)
    assert y2.requires_grad and s2.requires_grad
    for y, s in ((y1, s1), (y2, s2)):
        assert torch.equal(y, y0) and torch.equal(s, s0)  # one forward kernel for both paths


def test_empty_sequence():
    inputs = make_inputs(l=0)
    y, state = causal_conv1d_chunked(**inputs, return_final_state=True)
    assert y.shape == (2, 5, 0) and torch.equal(state, inputs["initial_state"])
    assert state.data_ptr() != inputs["initial_state"].data_ptr()
    _, ref_state = run_ref(inputs, None)
    assert torch.equal(state, ref_state.float())


# ------------------------------------------------------------------------------------ layouts and dtypes


@pytest.mark.parametrize("how", ["channels_last", "strided"])
def test_non_contiguous_inputs(how):
    base = make_inputs(l=77, seed=5)
    inputs = dict(base)
    inputs["x"] = (channels_last if how == "channels_last" else strided)(base["x"])
    inputs["weight"] = base["weight"].t().contiguous().t()
    inputs["initial_state"] = channels_last(base["initial_state"])
    ref_y, ref_state = run_ref(base, "silu")
    for block in BLOCKS:
        with torch.no_grad():
            y, state = causal_conv1d_chunked(**inputs, activation="silu", return_final_state=True, block_elems=block)
        assert_rel(y, ref_y, OUT_TOL, "y")
        assert torch.equal(state, ref_state.float())
        if how == "channels_last":
            assert y.stride(1) == 1  # the output keeps the position-major layout of x
    _grad_check(inputs, "silu", BLOCKS[:2])


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_low_precision_inputs(dtype, tol):
    inputs = make_inputs(l=90, seed=6, dtype=dtype)
    ref_y, ref_state = run_ref(inputs, "silu")
    for block in BLOCKS[:2]:
        y, state = causal_conv1d_chunked(**inputs, activation="silu", return_final_state=True, block_elems=block)
        assert y.dtype == dtype and state.dtype == dtype
        assert_rel(y, ref_y, tol, "y")
        assert torch.equal(state, ref_state.to(dtype))
    # an fp32 state with bf16 activations keeps its dtype; no state -> the state comes back in x.dtype
    mixed = dict(inputs, initial_state=inputs["initial_state"].float())
    _, st32 = causal_conv1d_chunked(**mixed, return_final_state=True)
    assert st32.dtype == torch.float32
    _, st_none = causal_conv1d_chunked(**dict(inputs, initial_state=None), return_final_state=True)
    assert st_none.dtype == dtype
    # gradients in the input dtypes
    fast_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, s = causal_conv1d_chunked(**fast_in, activation="silu", return_final_state=True)
    (y.float().sum() + s.float().sum()).backward()
    ref_in = {k: as_f64(v).requires_grad_() for k, v in inputs.items()}
    ry, rs = causal_conv1d_ref(**ref_in, activation="silu", return_final_state=True)
    (ry.sum() + rs.sum()).backward()
    for k in inputs:
        assert fast_in[k].grad.dtype == dtype
        assert_rel(fast_in[k].grad, ref_in[k].grad, 4 * tol, f"grad of {k}")


def test_float64_inputs():
    inputs = {k: as_f64(v) for k, v in make_inputs(l=40, seed=7).items()}
    y = causal_conv1d_chunked(**inputs, activation="silu", block_elems=2 * 5 * 8)
    assert y.dtype == torch.float64
    assert_rel(y, run_ref(inputs, "silu", final=False), 1e-14, "y")


# ------------------------------------------------------------------------------------ exactness invariants


@settings(max_examples=25, deadline=None)
@given(
    l=st.integers(1, 120),
    cuts=st.lists(st.integers(1, 119), max_size=4),
    w=st.sampled_from([1, 2, 4]),
    block=st.sampled_from([None, 10, 40]),
    seed=st.integers(0, 10_000),
)
def test_split_and_thread_state_equals_one_pass(l, cuts, w, block, seed):
    inputs = make_inputs(l=l, w=w, seed=seed)
    full_y, full_state = causal_conv1d_chunked(**inputs, activation="silu", return_final_state=True)
    bounds = [0, *sorted({c for c in cuts if c < l}), l]
    state = inputs["initial_state"]
    pieces = []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        y, state = causal_conv1d_chunked(
            inputs["x"][..., s0:s1], inputs["weight"], inputs["bias"], "silu", state, True, block_elems=block
        )
        pieces.append(y)
    assert_rel(torch.cat(pieces, dim=-1), full_y, OUT_TOL, "split outputs")
    assert torch.equal(state, full_state)


@pytest.mark.parametrize("step", [causal_conv1d_update_chunked, causal_conv1d_update_ref])
@pytest.mark.parametrize("w", [1, 4])
def test_decode_steps_equal_conv(step, w):
    l = 30
    inputs = make_inputs(l=l, w=w, seed=8)
    full_y, full_state = causal_conv1d_chunked(**inputs, activation="silu", return_final_state=True)
    state = inputs["initial_state"].clone()
    before = state.clone()
    ys = []
    for t in range(l):
        y, new_state = step(inputs["x"][:, :, t], state, inputs["weight"], inputs["bias"], "silu")
        if t == 0:
            assert torch.equal(state, before), "the decode step mutated the state passed in"
        ys.append(y)
        state = new_state
    assert_rel(torch.stack(ys, dim=-1), full_y, OUT_TOL, "decode vs conv outputs")
    assert torch.equal(state, full_state)


def test_mixer_like_layouts():
    """x as a mixer hands it over: half of a (b, l, 2d) projection, seen as (b, d, l); a transposed decode input."""
    gen = torch.Generator().manual_seed(18)
    proj = torch.randn(2, 50, 10, generator=gen)
    x = proj[..., :5].transpose(1, 2)  # (b, d, l), position-major with row stride 2d
    weight, bias = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    init = torch.randn(2, 5, 3, generator=gen)
    ref_y, ref_state = causal_conv1d_ref(as_f64(x), as_f64(weight), as_f64(bias), "silu", as_f64(init), True)
    for block in BLOCKS:
        y, state = causal_conv1d_chunked(x, weight, bias, "silu", init, True, block_elems=block)
        assert_rel(y, ref_y, OUT_TOL, "y")
        assert torch.equal(state, ref_state.float())
    step_y, step_state = causal_conv1d_update_chunked(proj[:, 0, :5], init, weight, bias, "silu")
    assert_rel(step_y, ref_y[..., 0], OUT_TOL, "decode y")


def test_decode_step_gradients():
    inputs = make_inputs(l=1, seed=9)
    args = dict(
        x=inputs["x"][:, :, 0], conv_state=inputs["initial_state"], weight=inputs["weight"], bias=inputs["bias"]
    )
    ref_in = {k: as_f64(v).requires_grad_() for k, v in args.items()}
    y, s = causal_conv1d_update_ref(**ref_in, activation="silu")
    (y.sin().sum() + s.cos().sum()).backward()
    fast_in = {k: v.clone().requires_grad_() for k, v in args.items()}
    y2, s2 = causal_conv1d_update_chunked(**fast_in, activation="silu")
    (y2.sin().sum() + s2.cos().sum()).backward()
    assert_rel(y2, y, OUT_TOL, "y")
    for k in args:
        assert_rel(fast_in[k].grad, ref_in[k].grad, GRAD_TOL, f"grad of {k}")
    lp_y, lp_s = causal_conv1d_update_chunked(args["x"].bfloat16(), args["conv_state"], args["weight"])
    assert lp_y.dtype == torch.bfloat16 and lp_s.dtype == torch.float32


def test_dispatcher_routes_to_both_backends():
    inputs = make_inputs(l=20, seed=10)
    a = K.causal_conv1d(**inputs, activation="silu", backend="ref")
    b = K.causal_conv1d(**inputs, activation="silu", backend="chunked")
    assert_rel(b, a, OUT_TOL, "torch vs ref")
    picked = K.resolve_backend("auto", inputs["x"], op="causal_conv1d")
    assert picked in ("native", "chunked")
    want = K.causal_conv1d(**inputs, activation="silu", backend=picked)
    assert torch.equal(want, K.causal_conv1d(**inputs, activation="silu"))
    y, s = K.causal_conv1d_update(inputs["x"][:, :, 0], inputs["initial_state"], inputs["weight"], backend="chunked")
    assert y.shape == (2, 5) and s.shape == (2, 5, 3)


# ------------------------------------------------------------------------------------ argument errors


def _conv_case(**changes):
    base = dict(make_inputs(l=6), activation="silu")
    base.update(changes)
    return base


CONV_ERRORS = [
    ("x as a list", dict(x=[1.0]), "x must be a torch.Tensor"),
    ("x 2-D", dict(x=torch.randn(2, 5)), "x must have 3 dimensions"),
    ("x integer", dict(x=torch.ones(2, 5, 6, dtype=torch.int64)), "x must be a floating-point tensor"),
    ("weight 3-D", dict(weight=torch.randn(5, 1, 4)), "weight must have 2 dimensions"),
    ("weight wrong d", dict(weight=torch.randn(4, 4)), "weight must have shape (d, w) (5, '*'), got (4, 4)"),
    ("weight no taps", dict(weight=torch.randn(5, 0), initial_state=None), "weight must have at least one tap"),
    ("weight integer", dict(weight=torch.ones(5, 4, dtype=torch.int32)), "weight must be a floating-point tensor"),
    ("bias wrong", dict(bias=torch.randn(4)), "bias must have shape (d,) (5,), got (4,)"),
    ("activation relu", dict(activation="relu"), "activation must be None, 'silu' or 'swish', got 'relu'"),
    ("activation True", dict(activation=True), "activation must be None, 'silu' or 'swish', got True"),
    (
        "initial_state wrong w",
        dict(initial_state=torch.randn(2, 5, 4)),
        "initial_state must have shape (b, d, w - 1) (2, 5, 3), got (2, 5, 4)",
    ),
    ("initial_state 2-D", dict(initial_state=torch.randn(2, 5)), "initial_state must have 3 dimensions"),
    ("bias on another device", dict(bias=torch.empty(5, device="meta")), "all tensors must be on one device"),
]


@pytest.mark.parametrize(
    "impl",
    [causal_conv1d_ref, causal_conv1d_chunked, lambda *a, **k: K.causal_conv1d(*a, **k, backend="chunked")],
    ids=["ref", "torch", "dispatch"],
)
@pytest.mark.parametrize("case, changes, message", CONV_ERRORS, ids=[c[0] for c in CONV_ERRORS])
def test_conv_argument_errors(impl, case, changes, message):
    with pytest.raises(KernelInputError) as info:
        impl(**_conv_case(**changes))
    assert message in str(info.value)


def _step_case(**changes):
    base = dict(
        x=torch.randn(2, 5),
        conv_state=torch.randn(2, 5, 3),
        weight=torch.randn(5, 4),
        bias=torch.randn(5),
        activation=None,
    )
    base.update(changes)
    return base


STEP_ERRORS = [
    ("x 3-D", dict(x=torch.randn(2, 5, 1)), "x must have 2 dimensions"),
    (
        "conv_state wrong w",
        dict(conv_state=torch.randn(2, 5, 4)),
        "conv_state must have shape (b, d, w - 1) (2, 5, 3), got (2, 5, 4)",
    ),
    (
        "conv_state integer",
        dict(conv_state=torch.ones(2, 5, 3, dtype=torch.int64)),
        "conv_state must be a floating-point tensor",
    ),
    ("weight wrong d", dict(weight=torch.randn(6, 4)), "weight must have shape (d, w)"),
    ("bias 2-D", dict(bias=torch.randn(5, 1)), "bias must have 1 dimensions"),
    ("activation gelu", dict(activation="gelu"), "activation must be None, 'silu' or 'swish'"),
    (
        "conv_state on another device",
        dict(conv_state=torch.empty(2, 5, 3, device="meta")),
        "all tensors must be on one device",
    ),
]


@pytest.mark.parametrize("impl", [causal_conv1d_update_ref, causal_conv1d_update_chunked], ids=["ref", "chunked"])
@pytest.mark.parametrize("case, changes, message", STEP_ERRORS, ids=[c[0] for c in STEP_ERRORS])
def test_step_argument_errors(impl, case, changes, message):
    with pytest.raises(KernelInputError) as info:
        impl(**_step_case(**changes))
    assert message in str(info.value)
