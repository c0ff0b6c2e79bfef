"""Causal depthwise conv1d on Triton (``kernels/conv1d/triton_ops.py``) against the float64 sequential reference.

Runs on CUDA tensors when a GPU is present, otherwise on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). Shapes are small: the interpreter runs
every program one after another in numpy.

Tolerances (max-abs-diff / max-abs(reference)), as in test_conv1d.py: float32 outputs 1e-5, gradients 1e-4;
fp16 outputs 1e-3, bf16 8e-3 (one bf16 ulp is 2^-8 relative; Triton's interpreter rounds fp32 -> bf16 toward
zero, so its error reaches up to one ulp, 2^-7 = 7.8e-3, where a GPU rounds to nearest), gradients 4x that.
Final states hold raw inputs, so they must be exact.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
from seqlab.kernels import KernelBackendError, KernelInputError
from seqlab.kernels._triton import interpreting, triton_available
from seqlab.kernels.conv1d.ref import causal_conv1d_ref, causal_conv1d_update_ref
from seqlab.testing import as_f64, assert_rel, channels_last, strided

if not triton_available():  # pragma: no cover - triton is a dev dependency; the conftest enables the interpreter
    pytest.skip(
        "Triton kernels cannot run here (no triton, or no CUDA and no TRITON_INTERPRET)", allow_module_level=True
    )

from seqlab.kernels.conv1d.triton_ops import causal_conv1d_triton, causal_conv1d_update_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
OUT_TOL = 1e-5
GRAD_TOL = 1e-4
LOW = {torch.float16: 1e-3, torch.bfloat16: 8e-3}

# tile overrides: the heuristic default, and small tiles that force many time blocks / channel blocks (and a
# backward whose programs each walk several time tiles, so the per-chunk dweight partials are summed)
TILES = [{}, dict(block_l=16, block_d=4, bwd_chunk=2)]


def make_inputs(b=2, d=5, l=37, w=4, *, bias=True, init=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

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


def grad_check(inputs, activation, tiles=({},), *, y_weight=True, state_weight=True, tol=GRAD_TOL, seed=1):
    """Gradients of every input (x, weight, bias, initial_state) through y and the final state vs the reference;
    also checks y and the final state of the autograd forward."""
    names = [k for k, v in inputs.items() if v is not None]
    ref_in = {k: (as_f64(v).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref_y, ref_state = causal_conv1d_ref(**ref_in, activation=activation, return_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    g_y = torch.randn(ref_y.shape, generator=gen, dtype=torch.float64).to(ref_y.device)
    g_state = torch.randn(ref_state.shape, generator=gen, dtype=torch.float64).to(ref_y.device)
    loss = (ref_y * g_y).sum() * y_weight + (ref_state * g_state).sum() * state_weight
    ref_grads = torch.autograd.grad(loss, [ref_in[k] for k in names], allow_unused=True)
    dtype = inputs["x"].dtype
    out_tol = LOW.get(dtype, OUT_TOL)
    for t in tiles:
        fast_in = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
        y, state = causal_conv1d_triton(**fast_in, activation=activation, return_final_state=True, **t)
        assert_rel(y, ref_y, out_tol, f"y (autograd forward), tiles {t}")
        assert torch.equal(state, ref_state.to(state.dtype)), "the final state holds inputs: it is exact"
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
            assert g is not None, f"no gradient for {k}"
            assert g.shape == inputs[k].shape and g.dtype == inputs[k].dtype, k
            assert_rel(g, rg, tol, f"grad of {k}, tiles {t}")


# ------------------------------------------------------------------------------------ forward


# (l, w, activation, bias, init): odd lengths incl. l < w - 1, every width, each option on and off
FWD_CASES = [
    (1, 4, "silu", True, True),
    (2, 4, None, False, True),
    (1, 3, None, True, False),
    (2, 3, "silu", True, True),
    (63, 2, "silu", False, True),
    (63, 4, None, True, True),
    (257, 3, "swish", True, False),
    (257, 4, "silu", True, True),
    (1000, 4, "silu", True, True),
    (9, 1, "silu", True, True),
    (5, 1, None, False, False),
    (40, 5, "silu", True, True),
]


@pytest.mark.parametrize("l, w, activation, bias, init", FWD_CASES)
def test_forward_matches_reference(l, w, activation, bias, init):
    inputs = make_inputs(l=l, w=w, bias=bias, init=init, seed=l + 7 * w)
    ref_y, ref_state = run_ref(inputs, activation)
    for t in TILES if l <= 63 else TILES[:1]:
        with torch.no_grad():
            y, state = causal_conv1d_triton(**inputs, activation=activation, return_final_state=True, **t)
            y_only = causal_conv1d_triton(**inputs, activation=activation, **t)
        assert y.dtype == torch.float32 and y.shape == (2, 5, l) and state.shape == (2, 5, w - 1)
        assert_rel(y, ref_y, OUT_TOL, f"y, tiles {t}")
        assert torch.equal(state, ref_state.float()), "the final state holds inputs: it is exact"
        assert torch.equal(y_only, y)


def test_empty_sequence():
    inputs = make_inputs(l=0)
    y, state = causal_conv1d_triton(**inputs, return_final_state=True)
    assert y.shape == (2, 5, 0) and torch.equal(state, inputs["initial_state"])
    assert state.data_ptr() != inputs["initial_state"].data_ptr()
    # with gradients: the final state's gradient flows straight back into the initial state
    grad_check(inputs, "silu", y_weight=False)


def test_no_grad_path_equals_grad_path():
    inputs = make_inputs(l=100, seed=4)
    with torch.no_grad():
        y0, s0 = causal_conv1d_triton(**inputs, activation="silu", return_final_state=True)
    grad_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y1, s1 = causal_conv1d_triton(**grad_in, activation="silu", return_final_state=True)
    assert y1.requires_grad and s1.requires_grad
    assert torch.equal(y1, y0) and torch.equal(s1, s0)  # one forward kernel for both paths


# ------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize(
    "l, w, activation, bias, init",
    [
        (1, 4, "silu", True, True),
        (2, 3, None, True, True),
        (63, 4, "silu", True, True),
        (63, 2, None, False, True),
        (257, 3, "silu", False, False),
        (1, 1, "silu", True, False),
    ],
)
def test_gradients_match_reference(l, w, activation, bias, init):
    grad_check(
        make_inputs(l=l, w=w, bias=bias, init=init, seed=10 + l + w), activation, TILES if l <= 63 else TILES[:1]
    )


def test_gradients_long_sequence():
    grad_check(make_inputs(l=999, w=4, seed=11), "silu")


@pytest.mark.parametrize("which", ["y_only", "state_only"])
@pytest.mark.parametrize("l", [2, 30])
def test_gradients_through_one_output(which, l):
    # l = 2 < w - 1: part of the initial state passes straight into the final state
    grad_check(
        make_inputs(l=l, w=4, seed=2 + l), "silu", TILES, y_weight=which == "y_only", state_weight=which == "state_only"
    )


def test_only_some_inputs_require_grad():
    inputs = make_inputs(l=20, seed=12)
    x = inputs["x"].clone().requires_grad_()
    y = causal_conv1d_triton(x, inputs["weight"], inputs["bias"], "silu", inputs["initial_state"])
    (g_x,) = torch.autograd.grad((y * y).sum(), [x])
    ref_x = as_f64(inputs["x"]).requires_grad_()
    ref_y = causal_conv1d_ref(
        ref_x, *(as_f64(inputs[k]) for k in ("weight", "bias")), "silu", as_f64(inputs["initial_state"])
    )
    (ref_g,) = torch.autograd.grad((ref_y * ref_y).sum(), [ref_x])
    assert_rel(g_x, ref_g, GRAD_TOL, "grad of x alone")


# ------------------------------------------------------------------------------------ layouts and dtypes


@pytest.mark.parametrize("how", ["channels_last", "strided"])
def test_non_contiguous_inputs(how):
    base = make_inputs(l=77, seed=5)
    inputs = dict(base)
    inputs["x"] = (channels_last if how == "channels_last" else strided)(base["x"])
    inputs["weight"] = base["weight"].t().contiguous().t()
    inputs["initial_state"] = channels_last(base["initial_state"])
    inputs["bias"] = strided(base["bias"])
    ref_y, ref_state = run_ref(base, "silu")
    for t in TILES:
        with torch.no_grad():
            y, state = causal_conv1d_triton(**inputs, activation="silu", return_final_state=True, **t)
        assert_rel(y, ref_y, OUT_TOL, "y")
        assert torch.equal(state, ref_state.float())
        if how == "channels_last":
            assert y.stride(1) == 1  # the output keeps the position-major layout of x
    grad_check(inputs, "silu")


def test_mixer_like_layouts():
    """x as a mixer hands it over: half of a (b, l, 2d) projection, seen as (b, d, l); non-contiguous gradients."""
    gen = torch.Generator().manual_seed(18)
    proj = torch.randn(2, 50, 10, generator=gen).to(DEVICE)
    x = proj[..., :5].transpose(1, 2)  # (b, d, l), position-major with row stride 2d
    weight, bias = torch.randn(5, 4, generator=gen).to(DEVICE), torch.randn(5, generator=gen).to(DEVICE)
    init = torch.randn(2, 5, 3, generator=gen).to(DEVICE)
    inputs = dict(x=x, weight=weight, bias=bias, initial_state=init)
    ref_y, ref_state = run_ref(inputs, "silu")
    for t in TILES:
        y, state = causal_conv1d_triton(x, weight, bias, "silu", init, True, **t)
        assert_rel(y, ref_y, OUT_TOL, "y")
        assert torch.equal(state, ref_state.float())
    grad_check(inputs, "silu", TILES[:1])
    # an expanded (stride-0) output gradient, as y.sum().backward() produces
    leaf = x.detach().clone().requires_grad_()
    causal_conv1d_triton(leaf, weight, bias, None, init).sum().backward()
    ref_leaf = as_f64(x).requires_grad_()
    causal_conv1d_ref(ref_leaf, as_f64(weight), as_f64(bias), None, as_f64(init)).sum().backward()
    assert_rel(leaf.grad, ref_leaf.grad, GRAD_TOL, "grad of x from y.sum()")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    tol = LOW[dtype]
    inputs = make_inputs(l=90, seed=6, dtype=dtype)
    ref_y, ref_state = run_ref(inputs, "silu")
    with torch.no_grad():
        y, state = causal_conv1d_triton(**inputs, activation="silu", return_final_state=True)
    assert y.dtype == dtype and state.dtype == dtype
    assert_rel(y, ref_y, tol, "y")
    assert torch.equal(state, ref_state.to(dtype))
    # an fp32 state with low-precision activations keeps its dtype; no state -> the state comes back in x.dtype
    mixed = dict(inputs, initial_state=inputs["initial_state"].float())
    _, st32 = causal_conv1d_triton(**mixed, return_final_state=True)
    assert st32.dtype == torch.float32 and torch.equal(st32, run_ref(mixed, None)[1].float())
    _, st_none = causal_conv1d_triton(**dict(inputs, initial_state=None), return_final_state=True)
    assert st_none.dtype == dtype
    # gradients in the input dtypes (channels-last x, as in a mixer)
    grad_check(dict(inputs, x=channels_last(inputs["x"])), "silu", tol=4 * tol)


def test_float64_inputs_compute_in_float64():
    inputs = {k: as_f64(v) for k, v in make_inputs(l=40, seed=7).items()}
    y, state = causal_conv1d_triton(**inputs, activation="silu", return_final_state=True, block_l=16)
    assert y.dtype == torch.float64 and state.dtype == torch.float64
    ref_y, ref_state = run_ref(inputs, "silu")
    assert_rel(y, ref_y, 1e-14, "y")
    assert torch.equal(state, ref_state)
    grad_check(inputs, "silu", tol=1e-13)


# ------------------------------------------------------------------------------------ exactness invariants


@settings(max_examples=10, deadline=None)
@given(
    l=st.integers(1, 60),
    cuts=st.lists(st.integers(1, 59), max_size=3),
    w=st.sampled_from([2, 3, 4]),
    block_l=st.sampled_from([None, 16]),
    seed=st.integers(0, 10_000),
)
def test_split_and_thread_state_equals_one_pass(l, cuts, w, block_l, seed):
    inputs = make_inputs(l=l, w=w, seed=seed)
    with torch.no_grad():
        full_y, full_state = causal_conv1d_triton(**inputs, activation="silu", return_final_state=True)
        bounds = [0, *sorted({c for c in cuts if c < l}), l]
        state = inputs["initial_state"]
        pieces = []
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            y, state = causal_conv1d_triton(
                inputs["x"][..., s0:s1], inputs["weight"], inputs["bias"], "silu", state, True, block_l=block_l
            )
            pieces.append(y)
    assert_rel(torch.cat(pieces, dim=-1), full_y, OUT_TOL, "split outputs")
    assert torch.equal(state, full_state)


@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_decode_steps_equal_conv(w):
    l = 12
    inputs = make_inputs(l=l, w=w, seed=8)
    ref_y, ref_state = run_ref(inputs, "silu")
    state = inputs["initial_state"].clone()
    before = state.clone()
    ys = []
    with torch.no_grad():
        for t in range(l):
            y, new_state = causal_conv1d_update_triton(
                inputs["x"][:, :, t], state, inputs["weight"], inputs["bias"], "silu"
            )
            if t == 0:
                assert torch.equal(state, before), "the decode step mutated the state passed in"
                r0, rs0 = causal_conv1d_update_ref(
                    *(as_f64(v) for v in (inputs["x"][:, :, 0], before, inputs["weight"], inputs["bias"])), "silu"
                )
                assert_rel(y, r0, OUT_TOL, "first step vs the step reference")
                assert torch.equal(new_state, rs0.float())
            assert y.shape == (2, 5) and new_state.shape == (2, 5, w - 1)
            ys.append(y)
            state = new_state
    assert_rel(torch.stack(ys, dim=-1), ref_y, OUT_TOL, "decode vs conv outputs")
    assert torch.equal(state, ref_state.float())


def test_decode_step_layouts_dtypes_and_options():
    gen = torch.Generator().manual_seed(19)
    proj = torch.randn(3, 16, generator=gen).to(DEVICE)
    x = proj[:, 3:10]  # (b, d) with row stride 16
    state = channels_last(torch.randn(3, 7, 3, generator=gen).to(DEVICE))  # stride 1 along d
    weight = torch.randn(4, 7, generator=gen).to(DEVICE).t()  # (d, w) transposed view
    bias = strided(torch.randn(7, generator=gen).to(DEVICE))
    for act, b in ((None, None), ("silu", bias)):
        y, ns = causal_conv1d_update_triton(x, state, weight, b, act)
        ry, rns = causal_conv1d_update_ref(as_f64(x), as_f64(state), as_f64(weight), as_f64(b), act)
        assert_rel(y, ry, OUT_TOL, f"y, activation {act}")
        assert torch.equal(ns, rns.float())
    # low precision x with an fp32 state: y in x.dtype, the state keeps fp32 and holds x exactly
    for dtype in (torch.bfloat16, torch.float16):
        y, ns = causal_conv1d_update_triton(x.to(dtype), state, weight, bias, "silu")
        ry, rns = causal_conv1d_update_ref(as_f64(x.to(dtype)), as_f64(state), as_f64(weight), as_f64(bias), "silu")
        assert y.dtype == dtype and ns.dtype == torch.float32
        assert_rel(y, ry, LOW[dtype], f"y {dtype}")
        assert torch.equal(ns, rns.float())
    y64, _ = causal_conv1d_update_triton(as_f64(x), as_f64(state), as_f64(weight), as_f64(bias), "silu")
    ry64, _ = causal_conv1d_update_ref(as_f64(x), as_f64(state), as_f64(weight), as_f64(bias), "silu")
    assert y64.dtype == torch.float64
    assert_rel(y64, ry64, 1e-14, "float64 step")
    # wide channel dimension: several channel blocks
    xw, sw, ww = torch.randn(2, 600, generator=gen), torch.randn(2, 600, 3, generator=gen), torch.randn(600, 4)
    y, ns = causal_conv1d_update_triton(xw.to(DEVICE), sw.to(DEVICE), ww.to(DEVICE), None, "silu")
    ry, rns = causal_conv1d_update_ref(as_f64(xw), as_f64(sw), as_f64(ww), None, "silu")
    assert_rel(y, ry, OUT_TOL, "wide d")
    assert torch.equal(ns.cpu(), rns.float())


def test_decode_step_gradients_fall_back_to_torch():
    inputs = make_inputs(l=1, seed=9)
    args = dict(
        x=inputs["x"][:, :, 0], conv_state=inputs["initial_state"], weight=inputs["weight"], bias=inputs["bias"]
    )
    ref_in = {k: as_f64(v).requires_grad_() for k, v in args.items()}
    y, s = causal_conv1d_update_ref(**ref_in, activation="silu")
    (y.sin().sum() + s.cos().sum()).backward()
    fast_in = {k: v.clone().requires_grad_() for k, v in args.items()}
    y2, s2 = causal_conv1d_update_triton(**fast_in, activation="silu")
    (y2.sin().sum() + s2.cos().sum()).backward()
    assert_rel(y2, y, OUT_TOL, "y")
    for k in args:
        assert_rel(fast_in[k].grad, ref_in[k].grad, GRAD_TOL, f"grad of {k}")


# ------------------------------------------------------------------------------------ dispatcher and errors


def test_dispatcher_routes_to_triton():
    inputs = make_inputs(l=20, seed=10)
    a = K.causal_conv1d(**inputs, activation="silu", backend="ref")
    b, sb = K.causal_conv1d(**inputs, activation="silu", return_final_state=True, backend="triton")
    assert_rel(b, a, OUT_TOL, "triton vs ref")
    assert torch.equal(b, causal_conv1d_triton(**inputs, activation="silu"))
    assert torch.equal(sb, inputs["x"][..., -3:])
    y, s = K.causal_conv1d_update(
        inputs["x"][:, :, 0], inputs["initial_state"], inputs["weight"], inputs["bias"], "silu", backend="triton"
    )
    ry, rs = causal_conv1d_update_ref(
        inputs["x"][:, :, 0], inputs["initial_state"], inputs["weight"], inputs["bias"], "silu"
    )
    assert_rel(y, ry, OUT_TOL, "decode via the dispatcher")
    assert torch.equal(s, rs)
    if DEVICE == "cuda":  # pragma: no cover - GPU machines: "auto" picks Triton for CUDA tensors
        assert torch.equal(K.causal_conv1d(**inputs, activation="silu"), b)


def _conv_case(**changes):
    base = dict(make_inputs(l=6), activation="silu")
    base.update(changes)
    return base


CONV_ERRORS = [
    ("x as a list", dict(x=[1.0]), "x must be a torch.Tensor"),
    ("x 2-D", dict(x=torch.randn(2, 5)), "x must have 3 dimensions"),
    ("x integer", dict(x=torch.ones(2, 5, 6, dtype=torch.int64)), "x must be a floating-point tensor"),
    ("weight wrong d", dict(weight=torch.randn(4, 4)), "weight must have shape (d, w) (5, '*'), got (4, 4)"),
    ("weight no taps", dict(weight=torch.randn(5, 0), initial_state=None), "weight must have at least one tap"),
    ("bias wrong", dict(bias=torch.randn(4)), "bias must have shape (d,) (5,), got (4,)"),
    ("activation relu", dict(activation="relu"), "activation must be None, 'silu' or 'swish', got 'relu'"),
    (
        "initial_state wrong w",
        dict(initial_state=torch.randn(2, 5, 4)),
        "initial_state must have shape (b, d, w - 1) (2, 5, 3), got (2, 5, 4)",
    ),
]


@pytest.mark.parametrize("case, changes, message", CONV_ERRORS, ids=[c[0] for c in CONV_ERRORS])
def test_conv_argument_errors(case, changes, message):
    changes = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in changes.items()}
    for impl in (causal_conv1d_triton, lambda **k: K.causal_conv1d(**k, backend="triton")):
        with pytest.raises(KernelInputError) as info:
            impl(**_conv_case(**changes))
        assert message in str(info.value)


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
    ("activation gelu", dict(activation="gelu"), "activation must be None, 'silu' or 'swish'"),
]


@pytest.mark.parametrize("case, changes, message", STEP_ERRORS, ids=[c[0] for c in STEP_ERRORS])
def test_step_argument_errors(case, changes, message):
    base = dict(
        x=torch.randn(2, 5),
        conv_state=torch.randn(2, 5, 3),
        weight=torch.randn(5, 4),
        bias=torch.randn(5),
        activation=None,
    )
    base.update(changes)
    base = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
    with pytest.raises(KernelInputError) as info:
        causal_conv1d_update_triton(**base)
    assert message in str(info.value)


def test_tensors_on_a_device_triton_cannot_use():
    inputs = make_inputs(l=6)
    with pytest.raises(KernelBackendError, match="causal_conv1d"):
        causal_conv1d_triton(**dict(inputs, bias=torch.empty(5, device="meta")))
    with pytest.raises(KernelBackendError, match="causal_conv1d_update"):
        causal_conv1d_update_triton(inputs["x"][..., 0], torch.empty(2, 5, 3, device="meta"), inputs["weight"])
