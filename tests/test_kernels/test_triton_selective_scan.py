"""Mamba-1 selective scan on Triton (``kernels/scan/triton_ops.py``) against the float64 sequential reference.

Runs on CUDA tensors when a GPU is present, otherwise on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). The interpreter runs every program one
after another and ``tl.associative_scan`` one element at a time (~0.1 ms per tile element), so the shapes are
small and each case picks its own tiling instead of sweeping all of them.

Tolerances (max-abs-diff / max-abs(reference)), as in test_selective_scan.py: float32 outputs and states 1e-5,
gradients 1e-4; fp16 outputs 1e-3, bf16 8e-3 (the interpreter rounds fp32 -> bf16 toward zero: up to one bf16
ulp, 2^-7), their gradients 4x that; float64 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
from seqlab.kernels import KernelInputError
from seqlab.kernels._triton import interpreting, triton_available
from seqlab.kernels.scan.ref import selective_scan_ref, selective_state_update_ref
from seqlab.testing import as_f64, assert_rel, channels_last, scan_inputs, strided, vectorised_generic_scan

if not triton_available():  # pragma: no cover - triton is a dev dependency; the conftest enables the interpreter
    pytest.skip(
        "Triton kernels cannot run here (no triton, or no CUDA and no TRITON_INTERPRET)", allow_module_level=True
    )

from seqlab.kernels.scan.triton_kernels import _adjoint_combine, _recurrence_combine  # noqa: E402
from seqlab.kernels.scan.triton_ops import selective_scan_triton, selective_state_update_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


_vectorised_generic_scan = vectorised_generic_scan


_SLOW_SCAN = None


@pytest.fixture(autouse=True, scope="module")
def _fast_interpreter_scan():
    """Under the interpreter, scan with ``_vectorised_generic_scan`` (this module only); test time drops ~10x."""
    if not interpreting():
        yield
        return
    from triton.runtime import interpreter

    global _SLOW_SCAN
    _SLOW_SCAN = interpreter.ScanOps.generic_scan
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.ScanOps, "generic_scan", _vectorised_generic_scan)
        yield


OUT_TOL = 1e-5
GRAD_TOL = 1e-4
LOW = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# tilings (positions per chunk, channels per block, channel blocks per program): the heuristic default (16
# positions per chunk under the interpreter), one channel per block with two blocks per program (B / C tiles
# shared, dB / dC summed over blocks in registers), short chunks (many chunk carries; short sequences only:
# the interpreter pays per chunk), a chunk longer than most test sequences
T_DEFAULT = {}
T_SUB = dict(block_l=32, block_d=1, sub_blocks=2)
T_SHORT = dict(block_l=8, block_d=2, sub_blocks=1)
T_LONG = dict(block_l=64, block_d=4, sub_blocks=1)


def make_inputs(*args, **kwargs):
    return {k: (None if v is None else v.to(DEVICE)) for k, v in scan_inputs(*args, **kwargs).items()}


def run_ref(inputs, softplus, final=True):
    return selective_scan_ref(
        **{k: as_f64(v) for k, v in inputs.items()}, delta_softplus=softplus, return_final_state=final
    )


OPTIONS = {
    # name: (make_inputs kwargs, delta_softplus); without softplus the raw delta is made positive, as a real
    # step size is (negative ones make the states grow; test_extreme_values has that case)
    "full": (dict(gB=2, gC=2), True),
    "bare": (dict(D=False, z=False, bias=False, init=False, positive_delta=True), False),
    "mixed": (dict(gB=4, gC=None, z=False, bias=False), True),  # B grouped, C not
    "gate_only": (dict(gB=None, gC=2, D=False, init=False, positive_delta=True), False),
    "groups_4_2": (dict(gB=4, gC=2, bias=False), True),  # different group counts
}


def check_forward(inputs, softplus, tiling, *, out_tol=OUT_TOL, state_tol=OUT_TOL):
    """The no-grad forward (no chunk states stored), with and without the final state."""
    ref_out, ref_state = run_ref(inputs, softplus)
    with torch.no_grad():
        out, state = selective_scan_triton(**inputs, delta_softplus=softplus, return_final_state=True, **tiling)
        plain = selective_scan_triton(**inputs, delta_softplus=softplus, **tiling) if out.shape[-1] <= 64 else out
    assert out.dtype == inputs["u"].dtype and out.shape == ref_out.shape
    assert state.dtype == (torch.float64 if inputs["u"].dtype == torch.float64 else torch.float32)
    assert state.shape == ref_state.shape
    assert torch.is_tensor(plain) and torch.equal(plain, out)
    assert_rel(out, ref_out, out_tol, f"out, tiling {tiling}")
    assert_rel(state, ref_state, state_tol, f"final state, tiling {tiling}")
    return out, state


def check_grads(inputs, softplus, tiling, *, out_weight=True, state_weight=True, tol=GRAD_TOL, out_tol=OUT_TOL, seed=1):
    """Gradients of every input through the output and / or the final state, against the reference; also the
    output and state of the autograd forward (which stores the chunk states)."""
    names = [k for k, v in inputs.items() if v is not None]
    ref_in = {k: (as_f64(v).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref_out, ref_state = selective_scan_ref(**ref_in, delta_softplus=softplus, return_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    g_state = torch.randn(ref_state.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    loss = 0
    if out_weight:
        loss = loss + (ref_out * g_out).sum()
    if state_weight:
        loss = loss + (ref_state * g_state).sum()
    ref_grads = torch.autograd.grad(loss, [ref_in[k] for k in names], allow_unused=True)

    fast_in = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out, state = selective_scan_triton(**fast_in, delta_softplus=softplus, return_final_state=True, **tiling)
    assert out.requires_grad and state.requires_grad
    assert_rel(out, ref_out, out_tol, f"out (autograd forward), tiling {tiling}")
    assert_rel(state, ref_state, OUT_TOL, f"final state (autograd forward), tiling {tiling}")
    loss = 0
    if out_weight:
        loss = loss + (out.double() * g_out).sum()
    if state_weight:
        loss = loss + (state.double() * g_state).sum()
    grads = torch.autograd.grad(loss, [fast_in[k] for k in names], allow_unused=True)
    for k, g, rg in zip(names, grads, ref_grads):
        if rg is None:  # C, D, z do not reach the final state
            assert g is None or g.abs().max() == 0, k
            continue
        assert g is not None, f"no gradient for {k}"
        assert g.shape == inputs[k].shape and g.dtype == inputs[k].dtype, k
        assert_rel(g, rg, tol, f"grad of {k}, tiling {tiling}")


# ------------------------------------------------------------------------------------ forward and gradients


CASES = [
    # (option, l, tiling): every option at l = 1 and 63, the odd l = 257 with two option sets; tilings rotate
    ("full", 1, T_DEFAULT),
    ("full", 63, T_SUB),
    ("full", 257, dict(block_l=32)),
    ("bare", 1, T_SHORT),
    ("bare", 63, T_LONG),
    ("bare", 257, dict(block_l=32, block_d=2, sub_blocks=2)),
    ("mixed", 1, T_SUB),
    ("mixed", 63, T_LONG),
    ("gate_only", 1, T_LONG),
    ("gate_only", 63, T_DEFAULT),
    ("groups_4_2", 1, T_SHORT),
    ("groups_4_2", 63, T_LONG),
]


@pytest.mark.parametrize("option, l, tiling", CASES, ids=[f"{o}-l{l}-{i}" for i, (o, l, _) in enumerate(CASES)])
def test_matches_reference(option, l, tiling):
    kwargs, softplus = OPTIONS[option]
    inputs = make_inputs(l=l, seed=l, **kwargs, b=1 if l > 100 else 2)
    check_forward(inputs, softplus, tiling)
    check_grads(inputs, softplus, tiling)


def test_long_sequence():
    """l = 1000 (many chunks, a padded last one) with every option on."""
    inputs = make_inputs(b=1, d=2, n=2, l=1000, seed=3)
    check_forward(inputs, True, dict(block_l=64))
    check_grads(inputs, True, dict(block_l=64))


@pytest.mark.parametrize("which", ["out_only", "state_only"])
def test_gradients_through_one_output(which):
    """Only one of (out, final_state) feeds the loss: the other's gradient arrives as None."""
    kwargs, softplus = OPTIONS["full"]
    check_grads(
        make_inputs(l=21, seed=4, **kwargs),
        softplus,
        T_SHORT,
        out_weight=which == "out_only",
        state_weight=which == "state_only",
    )


def test_initial_state_gradient_without_final_state():
    """return_final_state=False: the initial state still gets its gradient through the outputs."""
    inputs = make_inputs(l=30, seed=5, gB=2, gC=2)
    ref_in = {k: as_f64(v).requires_grad_() for k, v in inputs.items()}
    selective_scan_ref(**ref_in, delta_softplus=True).square().sum().backward()
    fast_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = selective_scan_triton(**fast_in, delta_softplus=True, **T_SHORT)
    assert torch.is_tensor(out) and out.shape == (2, 4, 30)
    out.square().sum().backward()
    for k in NAMES:
        assert_rel(fast_in[k].grad, ref_in[k].grad, GRAD_TOL, k)
    assert fast_in["initial_state"].grad.abs().max() > 0


def test_partial_blocks_and_padded_state():
    """Odd sizes everywhere: n = 5 (padded to 8), 3 channels per group split into blocks of 2 with 2 blocks per
    program (the second block half empty), 6 groups (lcm of B's 3 and C's 2) of one channel each."""
    inputs = make_inputs(b=1, d=6, n=5, l=19, seed=20, gB=2)
    check_grads(inputs, True, dict(block_l=8, block_d=2, sub_blocks=2))
    inputs = make_inputs(b=1, d=6, n=5, l=19, seed=21, gB=3, gC=2)
    check_grads(inputs, True, dict(block_l=32, block_d=2, sub_blocks=1))
    inputs = make_inputs(b=1, d=2, n=1, l=9, seed=22)
    check_grads(inputs, True, dict(block_l=4))


def test_no_grad_path_equals_grad_path():
    inputs = make_inputs(l=40, seed=6, gB=2, gC=2)
    with torch.no_grad():
        out0, st0 = selective_scan_triton(**inputs, delta_softplus=True, return_final_state=True)
    grad_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out1, st1 = selective_scan_triton(**grad_in, delta_softplus=True, return_final_state=True)
    assert torch.equal(out0, out1.detach()) and torch.equal(st0, st1.detach())
    out2 = selective_scan_triton(**inputs, delta_softplus=True)  # nothing requires grad
    assert not out2.requires_grad and torch.equal(out2, out0)


def test_empty_sequence():
    inputs = make_inputs(l=0)
    out, state = selective_scan_triton(**inputs, delta_softplus=True, return_final_state=True)
    assert out.shape == (2, 4, 0)
    assert torch.equal(state, inputs["initial_state"]) and state.data_ptr() != inputs["initial_state"].data_ptr()


def test_extreme_values_are_exact_and_finite():
    """delta up to ~10 after softplus with A down to -100 (decays underflow to exactly 0), softplus ~ 1e-13
    (decays of exactly 1 in float32): no overflow, no NaN, matches the reference; raw negative delta makes
    the states grow, and they are reproduced, not cut off."""
    inputs = make_inputs(b=1, l=60, seed=11, gB=2, gC=2, delta_scale=6.0, a_range=(-100.0, -1e-4))
    inputs["delta"][:, :, ::7] = 10.0
    inputs["delta"][:, :, 3::11] = -30.0
    check_grads(inputs, True, T_SUB)
    grow = make_inputs(b=1, l=64, seed=12, D=False, z=False, bias=False, init=True, a_range=(-1.0, -0.5))
    grow["delta"] = -grow["delta"].abs() * 0.3
    _, state = check_forward(grow, False, T_LONG)
    assert state.abs().max() > 100
    check_grads(grow, False, T_LONG)


# ------------------------------------------------------------------------------------ layouts and dtypes


def _relayout(inputs, how):
    out = dict(inputs)
    for k in ("u", "delta", "z"):
        if out[k] is not None:
            out[k] = {"channels_last": channels_last, "strided": strided}[how](out[k])
    for k in ("B", "C"):
        out[k] = out[k].transpose(-1, -2).contiguous().transpose(-1, -2)  # (.., n, l) from a contiguous (.., l, n)
    out["A"] = out["A"].t().contiguous().t()
    out["initial_state"] = out["initial_state"].transpose(1, 2).contiguous().transpose(1, 2)
    out["D"] = strided(out["D"])
    return out


@pytest.mark.parametrize("how", ["channels_last", "strided"])
def test_non_contiguous_inputs(how):
    base = make_inputs(l=29, seed=7, gB=2, gC=2)
    inputs = _relayout(base, how)
    assert not inputs["u"].is_contiguous() and not inputs["initial_state"].is_contiguous()
    out, _ = check_forward(inputs, True, T_DEFAULT)
    if how == "channels_last":
        assert out.stride(1) == 1 and out.stride(2) == 4  # a dense position-major output, as the input
    check_grads(inputs, True, T_DEFAULT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    tol = LOW[dtype]
    inputs = make_inputs(l=40, seed=8, gB=2, gC=2, dtype=dtype)
    inputs["A"] = inputs["A"].float()  # as mamba keeps A_log in fp32
    # the same (rounded) values in float64: the state is accumulated in fp32 from exact inputs
    check_forward(inputs, True, T_DEFAULT, out_tol=tol)
    check_grads(inputs, True, T_DEFAULT, tol=4 * tol, out_tol=tol)


def test_float64_inputs_are_computed_in_float64():
    inputs = {k: as_f64(v) for k, v in make_inputs(l=40, seed=9, gB=2).items()}
    out, state = selective_scan_triton(**inputs, delta_softplus=True, return_final_state=True, **T_SUB)
    ref_out, ref_state = run_ref(inputs, True)
    assert out.dtype == state.dtype == torch.float64
    assert_rel(out, ref_out, 1e-12, "out")
    assert_rel(state, ref_state, 1e-12, "state")
    check_grads(inputs, True, T_SUB, tol=1e-12, out_tol=1e-12)


# ------------------------------------------------------------------------------------ exactness invariants


@settings(max_examples=5, deadline=None)
@given(
    l=st.integers(1, 40),
    cuts=st.lists(st.integers(1, 39), max_size=2),
    block_l=st.sampled_from([8, 16, 32]),
    seed=st.integers(0, 10_000),
)
def test_split_and_thread_state_equals_one_pass(l, cuts, block_l, seed):
    """Running the pieces of a sequence one after another, each starting from the state the previous one
    returned, gives the outputs and the final state of one call over the whole sequence."""
    inputs = make_inputs(l=l, seed=seed, gB=2, gC=2)
    with torch.no_grad():
        full_out, full_state = selective_scan_triton(**inputs, delta_softplus=True, return_final_state=True)
        bounds = [0, *sorted({c for c in cuts if c < l}), l]
        state = inputs["initial_state"]
        pieces = []
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            part = dict(inputs)
            for k in ("u", "delta", "z", "B", "C"):
                part[k] = inputs[k][..., s0:s1]
            part["initial_state"] = state
            out, state = selective_scan_triton(**part, delta_softplus=True, return_final_state=True, block_l=block_l)
            pieces.append(out)
    assert_rel(torch.cat(pieces, dim=-1), full_out, OUT_TOL, "split outputs")
    assert_rel(state, full_state, OUT_TOL, "split final state")


# ------------------------------------------------------------------------------------ decode step


def _step_args(inputs, t):
    return dict(
        state=inputs["initial_state"],
        x=inputs["u"][:, :, t],
        dt=inputs["delta"][:, :, t],
        A=inputs["A"],
        B=inputs["B"][..., t],
        C=inputs["C"][..., t],
        D=inputs["D"],
        z=None if inputs["z"] is None else inputs["z"][:, :, t],
        dt_bias=inputs["delta_bias"],
    )


@pytest.mark.parametrize("option", ["full", "bare", "groups_4_2"])
def test_decode_steps_equal_scan(option):
    """Element-by-element decode steps reproduce the reference scan; each step matches the reference step and
    never writes the state it is given."""
    kwargs, softplus = OPTIONS[option]
    kwargs = dict(kwargs, init=True)
    l = 12
    inputs = make_inputs(l=l, seed=13, **kwargs)
    ref_out, ref_state = run_ref(inputs, softplus)
    state = inputs["initial_state"]
    ys = []
    for t in range(l):
        args = dict(_step_args(inputs, t), state=state)
        before = state.clone()
        y, new_state = selective_state_update_triton(**args, dt_softplus=softplus)
        assert torch.equal(state, before), "the decode step wrote the state passed in"
        assert y.shape == (2, 4) and y.dtype == torch.float32
        assert new_state.shape == (2, 4, 3) and new_state.dtype == torch.float32
        yr, sr = selective_state_update_ref(**{k: as_f64(v) for k, v in args.items()}, dt_softplus=softplus)
        assert_rel(y, yr, OUT_TOL, f"step {t} y")
        assert_rel(new_state, sr, OUT_TOL, f"step {t} state")
        ys.append(y)
        state = new_state
    assert_rel(torch.stack(ys, dim=-1), ref_out, OUT_TOL, "decode vs scan outputs")
    assert_rel(state, ref_state, OUT_TOL, "decode vs scan state")


def test_decode_step_non_contiguous_and_dtypes():
    """As a mixer calls it: x, z (and dt, B, C) are column slices of one projection, the state a transposed copy;
    bf16 activations give a bf16 y and an fp32 state; float64 inputs a float64 state."""
    b, d, n = 3, 6, 5
    gen = torch.Generator().manual_seed(17)
    proj = torch.randn(b, 2 * d, generator=gen).to(DEVICE)
    x, z = proj.chunk(2, dim=-1)
    dbc = torch.randn(b, d + 2 * n, generator=gen).to(DEVICE)
    dt, Bm, Cm = torch.split(dbc, [d, n, n], dim=-1)
    state = torch.randn(b, n, d, generator=gen).to(DEVICE).transpose(1, 2)
    A = -torch.rand(d, n, generator=gen).to(DEVICE)
    D, bias = torch.randn(d, generator=gen).to(DEVICE), torch.randn(d, generator=gen).to(DEVICE)
    assert not (x.is_contiguous() or dt.is_contiguous() or state.is_contiguous())
    args = dict(state=state, x=x, dt=dt, A=A, B=Bm, C=Cm, D=D, z=z, dt_bias=bias)
    y, s = selective_state_update_triton(**args, dt_softplus=True)
    yr, sr = selective_state_update_ref(**{k: as_f64(v) for k, v in args.items()}, dt_softplus=True)
    assert_rel(y, yr, OUT_TOL, "y")
    assert_rel(s, sr, OUT_TOL, "state")
    lp = {k: (v.bfloat16() if k in ("x", "dt", "z", "B", "C") else v) for k, v in args.items()}
    y3, s3 = selective_state_update_triton(**lp, dt_softplus=True)
    assert y3.dtype == torch.bfloat16 and s3.dtype == torch.float32
    y4, s4 = selective_state_update_triton(**{k: as_f64(v) for k, v in args.items()}, dt_softplus=True)
    assert y4.dtype == s4.dtype == torch.float64
    assert_rel(y4, yr, 1e-12, "float64 y")
    assert_rel(s4, sr, 1e-12, "float64 state")


def test_decode_step_gradients_fall_back_to_torch_backward():
    inputs = make_inputs(l=1, seed=14, gB=2, gC=2)
    args = _step_args(inputs, 0)
    ref_in = {k: as_f64(v).requires_grad_() for k, v in args.items()}
    y, s = selective_state_update_ref(**ref_in, dt_softplus=True)
    (y.sin().sum() + s.cos().sum()).backward()
    fast_in = {k: v.clone().requires_grad_() for k, v in args.items()}
    y2, s2 = selective_state_update_triton(**fast_in, dt_softplus=True)
    (y2.sin().sum() + s2.cos().sum()).backward()
    assert_rel(y2, y, OUT_TOL, "y")
    assert_rel(s2, s, OUT_TOL, "state")
    for k in args:
        assert fast_in[k].grad.dtype == args[k].dtype
        assert_rel(fast_in[k].grad, ref_in[k].grad, GRAD_TOL, f"grad of {k}")
    # only some inputs require grad; only y feeds the loss
    part = {k: (v.clone().requires_grad_() if k in ("x", "A") else v) for k, v in args.items()}
    y3, _ = selective_state_update_triton(**part, dt_softplus=True)
    y3.sum().backward()
    assert part["x"].grad is not None and part["A"].grad is not None and part["B"].grad is None


# ------------------------------------------------------------------------------------ dispatcher and errors


def test_dispatcher_routes_to_triton():
    inputs = make_inputs(l=20, seed=15, gB=2)
    a = K.selective_scan(**inputs, delta_softplus=True, return_final_state=True, backend="ref")
    b = K.selective_scan(**inputs, delta_softplus=True, return_final_state=True, backend="triton")
    c = selective_scan_triton(**inputs, delta_softplus=True, return_final_state=True)
    assert_rel(b[0], a[0], OUT_TOL, "out")
    assert_rel(b[1], a[1], OUT_TOL, "state")
    assert torch.equal(b[0], c[0]) and torch.equal(b[1], c[1])
    args = _step_args(inputs, 0)
    y, s = K.selective_state_update(**args, dt_softplus=True, backend="triton")
    yr, sr = K.selective_state_update(**args, dt_softplus=True, backend="ref")
    assert_rel(y, yr, OUT_TOL, "step y")
    assert_rel(s, sr, OUT_TOL, "step state")
    if DEVICE == "cuda":
        assert torch.equal(K.selective_scan(**inputs, delta_softplus=True), c[0])  # auto picks Triton on CUDA


SCAN_ERRORS = [
    ("u 2-D", dict(u=torch.randn(2, 4)), "u must have 3 dimensions"),
    ("delta wrong l", dict(delta=torch.randn(2, 4, 6)), "delta must have shape (b, d, l) (2, 4, 5), got (2, 4, 6)"),
    ("A complex", dict(A=torch.randn(4, 3, dtype=torch.complex64)), "A must be a real floating-point tensor"),
    ("C groups not dividing d", dict(C=torch.randn(2, 3, 3, 5)), "groups g of C (3)"),
    (
        "initial_state wrong n",
        dict(initial_state=torch.randn(2, 4, 2)),
        "initial_state must have shape (b, d, n) (2, 4, 3), got (2, 4, 2)",
    ),
    ("D on another device", dict(D=torch.empty(4, device="meta")), "all tensors must be on one device"),
]


@pytest.mark.parametrize("case, changes, message", SCAN_ERRORS, ids=[c[0] for c in SCAN_ERRORS])
def test_scan_argument_errors(case, changes, message):
    """The Triton path refuses exactly what the reference refuses, with the same message."""
    base = make_inputs(b=2, d=4, n=3, l=5)
    base.update({k: (v.to(DEVICE) if v.device.type != "meta" else v) for k, v in changes.items()})
    for impl in (selective_scan_triton, lambda *a, **k: K.selective_scan(*a, **k, backend="triton")):
        with pytest.raises(KernelInputError) as info:
            impl(**base, delta_softplus=True)
        assert message in str(info.value)


def test_step_argument_errors():
    args = _step_args(make_inputs(b=2, d=4, n=3, l=1), 0)
    args["C"] = torch.randn(2, 3, 3, device=DEVICE)
    with pytest.raises(KernelInputError, match=r"groups g of C \(3\)"):
        selective_state_update_triton(**args)


# ------------------------------------------------------------------------------------ the test harness itself


@triton.jit
def _scan_probe_kernel(a_ptr, b_ptr, c_ptr, o_ptr, R: tl.constexpr, N: tl.constexpr, L: tl.constexpr):
    offs = (tl.arange(0, R)[:, None, None] * N + tl.arange(0, N)[None, :, None]) * L + tl.arange(0, L)[None, None, :]
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    c = tl.load(c_ptr + offs)
    _, fwd = tl.associative_scan((a, b), 2, _recurrence_combine)
    _, p, s = tl.associative_scan((a, tl.full([R, N, L], 1.0, tl.float32), c), 2, _adjoint_combine, reverse=True)
    tl.store(o_ptr + offs, fwd)
    tl.store(o_ptr + R * N * L + offs, p)
    tl.store(o_ptr + 2 * R * N * L + offs, s)


@pytest.mark.skipif(not interpreting(), reason="checks the interpreter-only scan used by this module")
def test_vectorised_interpreter_scan():
    """The vectorised interpreter scan of this module gives bitwise the interpreter's own results, for the two
    combines of the kernels (forward recurrence; reverse 3-tuple adjoint), and both match a plain loop."""
    from triton.runtime import interpreter

    gen = torch.Generator().manual_seed(0)
    R, N, L = 2, 4, 8
    a, b, c = torch.rand(3, R, N, L, generator=gen).unbind(0)
    fast = torch.empty(3, R, N, L)
    _scan_probe_kernel[(1,)](a, b, c, fast, R, N, L)
    slow = torch.empty(3, R, N, L)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.ScanOps, "generic_scan", _SLOW_SCAN)
        _scan_probe_kernel[(1,)](a, b, c, slow, R, N, L)
    assert torch.equal(fast, slow)
    h = torch.zeros(R, N)
    for t in range(L):
        h = a[..., t] * h + b[..., t]
        assert torch.allclose(fast[0, ..., t], h)
    m = torch.zeros(R, N)
    for t in reversed(range(L)):  # the adjoint s_t = c_t + a_{t+1} s_{t+1}; p_t = a_{t+1} ... a_{L-1}
        m = c[..., t] + (a[..., t + 1] * m if t + 1 < L else 0)
        assert torch.allclose(fast[2, ..., t], m)
        assert torch.allclose(fast[1, ..., t], a[..., t + 1 :].prod(-1))
