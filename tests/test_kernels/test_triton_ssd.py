"""Mamba-2 SSD scan and decode step on Triton (``kernels/ssd/triton_ops.py``) against the float64 sequential
reference (``kernels/ssd/ref.py``): outputs, final states and the gradients of every input.

Runs on CUDA tensors when a GPU is present, otherwise on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). Shapes are small: the interpreter runs every
program one after another in numpy. ``tiles=16`` cases lower the kernels' tile cap so that a chunk spans several
row / column tiles and p, n several blocks (the multi-tile paths a GPU takes at chunk size 256).

Tolerances (max-abs-diff / max-abs(reference)), as in test_ssd.py: float32 outputs and states 1e-5, gradients
1e-4 (measured: ~3e-7 and ~1e-6). Half precision: y is rounded to its dtype once at the end (fp16 2^-11, bf16
2^-8 relative; the interpreter rounds fp32 -> bf16 toward zero, up to 2^-7 = 7.8e-3); on top of that the GEMM
operands are rounded to the input dtype (the decay-weighted B and x, the float32 states read by C, as
mamba_ssm does for the tensor cores), so the float32-accumulated state carries about one ulp of the half dtype:
fp16 y 2e-3 / state 2e-3 / gradients 4e-3; bf16 y 1.2e-2 / state 1.2e-2 / gradients 2.5e-2. Under the
interpreter bf16 GEMMs run in float32 (its bf16 dot is broken), so there the bf16 state must match to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
from seqlab.kernels import KernelInputError
from seqlab.kernels._triton import interpreting, triton_available
from seqlab.kernels.ssd.ref import ssd_scan_ref, ssd_state_update_ref
from seqlab.testing import assert_rel, strided

if not triton_available():  # pragma: no cover - triton is a dev dependency; the conftest enables the interpreter
    pytest.skip(
        "Triton kernels cannot run here (no triton, or no CUDA and no TRITON_INTERPRET)", allow_module_level=True
    )

import seqlab.kernels.ssd.triton_ops as ssd_triton  # noqa: E402
from seqlab.kernels.ssd.triton_ops import ssd_scan_triton, ssd_state_update_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
OUT_TOL = 1e-5
GRAD_TOL = 1e-4
HALF_TOL = {  # (y, state, gradients); see the module docstring
    torch.float16: (2e-3, 2e-3, 4e-3),
    torch.bfloat16: (1.2e-2, 1e-5 if interpreting() else 1.2e-2, 2.5e-2),
}
INPUT_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


# ----------------------------------------------------------------------------------------------------- helpers


def make_inputs(
    b=1,
    l=37,
    h=2,
    p=3,
    g=1,
    n=5,
    *,
    D="h",
    z=True,
    dt_bias=True,
    softplus=True,
    init=True,
    dtype=torch.float32,
    seed=0,
    a_range=(-3.0, -0.3),
):
    """Random SSD inputs (keyword arguments of ssd_scan, chunk_size excluded) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    lo, hi = a_range
    if softplus:
        dt = rnd(b, l, h, scale=0.7) - 1.0
    else:
        dt = (torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 0.5 + 0.05).to(dtype).to(DEVICE)
    return dict(
        x=rnd(b, l, h, p),
        dt=dt,
        A=(torch.rand(h, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype).to(DEVICE),
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
        D={"h": rnd(h), "hp": rnd(h, p), None: None}[D],
        z=rnd(b, l, h, p) if z else None,
        dt_bias=rnd(h, scale=0.5) if dt_bias else None,
        dt_softplus=softplus,
        initial_state=rnd(b, h, p, n) if init else None,
    )


def as64(inputs: dict) -> dict:
    return {k: (v.detach().double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def run_scan(fn, inputs: dict, chunk_size: int, final=True):
    kw = dict(inputs)
    return fn(
        kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), chunk_size, return_final_state=final, **kw
    )


def grads_of(fn, inputs: dict, chunk_size: int, wy: torch.Tensor, ws: torch.Tensor):
    """y, final state and the gradients of <y, wy> + <final_state, ws> w.r.t. every tensor input."""
    leaves = {
        k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()
    }
    y, s = run_scan(fn, leaves, chunk_size)
    loss = (y.double() * wy.to(y.device)).sum() + (s.double() * ws.to(s.device)).sum()
    loss.backward()
    return y, s, {k: leaves[k].grad for k in INPUT_NAMES if isinstance(leaves.get(k), torch.Tensor)}


def weights(b, l, h, p, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, l, h, p, generator=gen, dtype=torch.float64),
        torch.randn(b, h, p, n, generator=gen, dtype=torch.float64),
    )


@pytest.fixture
def tiles(monkeypatch):
    """Lower the kernels' tile cap (and the state-passing block) for one test."""

    def set_tiles(cap):
        if cap is not None:
            monkeypatch.setattr(ssd_triton, "_TILE_CAP", cap)
            monkeypatch.setattr(ssd_triton, "_STATE_BLOCK", 64)

    return set_tiles


def _case_id(case):
    b, l, h, p, g, n, q, opts = case
    extra = ",".join(f"{k}={v}" for k, v in opts.items())
    return f"b{b}-l{l}-h{h}-p{p}-g{g}-n{n}-q{q}" + (f"-{extra}" if extra else "")


# ------------------------------------------------------------------------------------------------ forward

# (b, l, h, p, g, n, chunk_size, options): lengths 1, 20, 50, 63, 90, 257, 1000; chunk sizes 7 to 256;
# groups 1, 2 and g = h; D (h,) / (h, p) / none, z, dt_bias, softplus, initial_state on and off.
FWD_CASES = [
    (1, 1, 2, 4, 1, 8, 64, dict()),
    (2, 63, 2, 3, 1, 5, 16, dict(D="hp", init=False)),
    (1, 257, 2, 4, 2, 8, 256, dict(z=False)),  # one full chunk and a 1-step tail
    (1, 1000, 2, 4, 1, 8, 128, dict(D="hp")),
    (1, 20, 4, 3, 4, 5, 7, dict(softplus=False, dt_bias=False, D=None)),
    (1, 50, 2, 20, 1, 20, 32, dict(tiles=16, softplus=False)),
    (1, 90, 2, 3, 1, 4, 256, dict(z=False, D=None, init=False)),
]


@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_forward_matches_reference(case, tiles):
    b, l, h, p, g, n, q, opts = case
    opts = dict(opts)
    tiles(opts.pop("tiles", None))
    inputs = make_inputs(b, l, h, p, g, n, seed=l + q, **opts)
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), q)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_triton, inputs, q)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert y.shape == (b, l, h, p) and s.shape == (b, h, p, n) and y.is_contiguous()
    assert_rel(y, y_ref, OUT_TOL, "y")
    assert_rel(s, s_ref, OUT_TOL, "final state")
    y_only = run_scan(ssd_scan_triton, inputs, q, final=False)  # return_final_state=False: y alone
    assert isinstance(y_only, torch.Tensor) and torch.equal(y_only, y)


# ---------------------------------------------------------------------------------------------- gradients

GRAD_CASES = [
    (1, 1, 4, 3, 2, 5, 64, dict()),
    (1, 63, 4, 3, 2, 5, 32, dict(D="hp")),
    (1, 257, 2, 4, 1, 8, 64, dict(z=False)),
    (1, 70, 2, 20, 2, 20, 32, dict(softplus=False, init=False, D="hp", tiles=16)),
    (1, 1000, 1, 3, 1, 4, 128, dict(dt_bias=False)),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_gradients_match_reference(case, tiles):
    b, l, h, p, g, n, q, opts = case
    opts = dict(opts)
    tiles(opts.pop("tiles", None))
    inputs = make_inputs(b, l, h, p, g, n, seed=7 * l + q, **opts)
    wy, ws = weights(b, l, h, p, n, seed=l)
    y_ref, s_ref, g_ref = grads_of(ssd_scan_ref, as64(inputs), q, wy, ws)
    y, s, g_tri = grads_of(ssd_scan_triton, inputs, q, wy, ws)
    expected = {k for k in INPUT_NAMES if inputs.get(k) is not None}
    assert set(g_tri) == expected == set(g_ref)
    assert_rel(y, y_ref, OUT_TOL, "y")
    assert_rel(s, s_ref, OUT_TOL, "final state")
    for name in sorted(expected):
        assert g_tri[name].dtype == inputs[name].dtype and g_tri[name].shape == inputs[name].shape, name
        assert_rel(g_tri[name], g_ref[name], GRAD_TOL, f"d{name}")


def test_gradients_through_y_only_and_through_the_state_only():
    # the backward with one of the two output gradients absent (None): the other term alone must be right
    b, l, h, p, g, n, q = 1, 20, 2, 3, 1, 5, 16
    inputs = make_inputs(b, l, h, p, g, n, seed=3, D="hp")
    wy, ws = weights(b, l, h, p, n, seed=4)
    for only in ("y", "state"):
        wy_, ws_ = (wy, ws * 0) if only == "y" else (wy * 0, ws)
        _, _, g_ref = grads_of(ssd_scan_ref, as64(inputs), q, wy_, ws_)
        leaves = {
            k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()
        }
        y, s = run_scan(ssd_scan_triton, leaves, q)
        loss = (y.double() * wy_.to(DEVICE)).sum() if only == "y" else (s.double() * ws_.to(DEVICE)).sum()
        loss.backward()
        for name in g_ref:
            assert_rel(leaves[name].grad, g_ref[name], GRAD_TOL, f"d{name} (through {only} only)")


def test_strong_decay_stays_finite_and_accurate():
    # head 0: one huge step at the start of every chunk, then tiny ones, so the running sum jumps to about -500 and
    # the segment sums inside the chunk are small differences of large numbers (a float32 running sum would lose
    # them to ~3e-5); head 1: a steady -8 per step, about -500 per chunk.
    b, l, h, p, g, n, q = 1, 150, 2, 3, 1, 5, 64
    inputs = make_inputs(b, l, h, p, g, n, seed=17, softplus=False, dt_bias=False, a_range=(-40.0, -30.0))
    dt = inputs["dt"].clone()
    dt[:, :, 0] = 0.002
    dt[:, ::q, 0] = 15.0
    inputs["A"][1] = -80.0
    dt[:, :, 1] = 0.1
    inputs["dt"] = dt
    wy, ws = weights(b, l, h, p, n, seed=1)
    y_ref, s_ref, g_ref = grads_of(ssd_scan_ref, as64(inputs), q, wy, ws)
    y, s, g_tri = grads_of(ssd_scan_triton, inputs, q, wy, ws)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    for head in range(h):  # each head on its own scale, so a weak head cannot hide behind a strong one
        assert_rel(y[..., head, :], y_ref[..., head, :], OUT_TOL, f"y head {head}")
    assert_rel(s, s_ref, OUT_TOL, "final state")
    for name in g_ref:
        assert torch.isfinite(g_tri[name]).all(), name
        assert_rel(g_tri[name], g_ref[name], GRAD_TOL, f"d{name}")


def test_softplus_threshold_and_tails():
    # dt + dt_bias above softplus's threshold (20: the identity, gradient 1) and far below 0 (softplus ~ e^v)
    b, l, h, p, g, n, q = 1, 20, 2, 3, 1, 5, 16
    inputs = make_inputs(b, l, h, p, g, n, seed=21, init=False, a_range=(-0.1, -0.05))
    dt = inputs["dt"].clone()
    dt[:, ::3, 0] = 24.0 + dt[:, ::3, 0]
    dt[:, 1::3, 0] = -30.0 + dt[:, 1::3, 0]
    dt[:, :, 1] = -12.0 + dt[:, :, 1]  # softplus ~ 6e-6: log(1 + e^v) in float32 would be off by ~1e-2
    inputs["dt"] = dt
    wy, ws = weights(b, l, h, p, n, seed=5)
    y_ref, s_ref, g_ref = grads_of(ssd_scan_ref, as64(inputs), q, wy, ws)
    y, s, g_tri = grads_of(ssd_scan_triton, inputs, q, wy, ws)
    for head in range(h):  # head 1 is tiny: it gets its own scale
        assert_rel(y[..., head, :], y_ref[..., head, :], OUT_TOL, f"y head {head}")
        assert_rel(s[:, head], s_ref[:, head], OUT_TOL, f"final state head {head}")
    for name in g_ref:
        assert_rel(g_tri[name], g_ref[name], GRAD_TOL, f"d{name}")


def test_positive_and_zero_A_work():
    inputs = make_inputs(2, 80, 2, 3, 1, 5, seed=19, softplus=False, a_range=(-1.0, 0.2))
    inputs["A"][0] = 0.0
    inputs["A"][1] = 0.25
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), 32)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_triton, inputs, 32)
    assert_rel(y, y_ref, OUT_TOL, "y")
    assert_rel(s, s_ref, OUT_TOL, "final state")


# ------------------------------------------------------------------------------------ layouts and dtypes


def test_non_contiguous_inputs_and_output_gradients():
    b, l, h, p, g, n, q = 2, 24, 4, 3, 2, 5, 16
    base = make_inputs(b, l, h, p, g, n, seed=5, D="hp")
    # the same values as channels-last / strided / transposed views
    views = dict(
        base,
        x=base["x"].transpose(1, 2).contiguous().transpose(1, 2),  # (b, l, h, p) stored (b, h, l, p)
        dt=strided(base["dt"]),
        A=strided(base["A"]),
        B=base["B"].transpose(-1, -2).contiguous().transpose(-1, -2),
        C=torch.stack([base["C"], base["C"]], dim=-1)[..., 0],
        D=base["D"].t().contiguous().t(),
        z=base["z"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
        dt_bias=strided(base["dt_bias"]),
        initial_state=base["initial_state"].transpose(-1, -2).contiguous().transpose(-1, -2),
    )
    assert not any(views[k].is_contiguous() for k in INPUT_NAMES)
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(base), q)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_triton, views, q)
    assert_rel(y, y_ref, OUT_TOL, "y")
    assert_rel(s, s_ref, OUT_TOL, "final state")
    # gradients through the views, with non-contiguous output gradients: y's gradient arrives transposed and the
    # state's as a broadcast (stride-0) tensor
    wy, _ = weights(b, l, h, p, n, seed=6)
    leaves_ref = {
        k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in as64(base).items()
    }
    y_r, s_r = run_scan(ssd_scan_ref, leaves_ref, q)
    ((y_r.transpose(1, 2) * wy.transpose(1, 2)).sum() + s_r.sum()).backward()
    leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in views.items()}
    y_t, s_t = run_scan(ssd_scan_triton, leaves, q)
    ((y_t.double().transpose(1, 2) * wy.transpose(1, 2).to(DEVICE)).sum() + s_t.sum()).backward()
    for name in INPUT_NAMES:
        assert_rel(leaves[name].grad, leaves_ref[name].grad, GRAD_TOL, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(dtype):
    y_tol, s_tol, g_tol = HALF_TOL[dtype]
    b, l, h, p, g, n, q = 1, 40, 2, 4, 1, 8, 32
    inputs = make_inputs(b, l, h, p, g, n, seed=9, dtype=dtype, D="hp")
    wy, ws = weights(b, l, h, p, n, seed=2)
    y_ref, s_ref, g_ref = grads_of(ssd_scan_ref, as64(inputs), q, wy, ws)  # float64 truth of the rounded values
    y, s, g_tri = grads_of(ssd_scan_triton, inputs, q, wy, ws)
    assert y.dtype == dtype and s.dtype == torch.float32
    assert_rel(y, y_ref, y_tol, "y")
    assert_rel(s, s_ref, s_tol, "final state")
    for name in g_ref:
        assert g_tri[name].dtype == dtype, name
        assert_rel(g_tri[name], g_ref[name], g_tol, f"d{name}")
    # a common mix: activations in half precision, A, D, dt_bias and the state in float32
    mixed = dict(
        inputs,
        A=inputs["A"].float(),
        D=inputs["D"].float(),
        dt_bias=inputs["dt_bias"].float(),
        initial_state=inputs["initial_state"].float(),
    )
    with torch.no_grad():
        y_m, s_m = run_scan(ssd_scan_triton, mixed, q)
    assert y_m.dtype == dtype and s_m.dtype == torch.float32
    assert_rel(y_m, y_ref, y_tol, "y (mixed dtypes)")
    assert_rel(s_m, s_ref, s_tol, "final state (mixed dtypes)")


def test_float64_is_refused_with_a_pointer_to_the_other_backends():
    inputs = as64(make_inputs(1, 10, 2, 3, 1, 5, seed=1))
    with pytest.raises(KernelInputError, match="float64.*backend='chunked'"):
        run_scan(
            ssd_scan_triton, {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}, 8
        )
    st_in = torch.zeros(1, 2, 3, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(KernelInputError, match="float64"):
        ssd_state_update_triton(st_in, **_step_inputs(make_inputs(1, 1, 2, 3, 1, 5, seed=2), 0))


# ------------------------------------------------------------------------------------------- invariants


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    l=st.integers(1, 70),
    cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=2),
    chunk_size=st.sampled_from([16, 32, 64]),
    g=st.sampled_from([1, 2]),
    options=st.fixed_dictionaries({"D": st.sampled_from([None, "h", "hp"]), "z": st.booleans(), "init": st.booleans()}),
)
def test_splitting_and_threading_state_equals_one_pass(l, cuts, chunk_size, g, options):
    inputs = make_inputs(1, l, 2, 3, g, 5, seed=l, **options)
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), chunk_size)
    with torch.no_grad():
        y_one, s_one = run_scan(ssd_scan_triton, inputs, chunk_size)
        points = sorted({int(c * l) for c in cuts} - {0, l})
        bounds = [0, *points, l]
        state, ys = inputs["initial_state"], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = dict(inputs, initial_state=state)
            for k in ("x", "dt", "B", "C", "z"):
                if part[k] is not None:
                    part[k] = inputs[k][:, lo:hi]
            y_part, state = run_scan(ssd_scan_triton, part, chunk_size)
            ys.append(y_part)
    assert_rel(torch.cat(ys, dim=1), y_one, OUT_TOL, "y (split)")
    assert_rel(state, s_one, OUT_TOL, "final state (split)")
    assert_rel(y_one, y_ref, OUT_TOL, "y")
    assert_rel(s_one, s_ref, OUT_TOL, "final state")


def test_gradients_flow_through_a_threaded_state():
    # two calls chained through (final state -> initial_state): the gradient of the first call's final state
    # arrives from the second call's initial_state gradient; together they must equal one pass
    b, l, h, p, g, n, q, cut = 1, 50, 2, 3, 1, 5, 16, 21
    inputs = make_inputs(b, l, h, p, g, n, seed=8, D="hp")
    wy, ws = weights(b, l, h, p, n, seed=9)
    _, _, g_ref = grads_of(ssd_scan_ref, as64(inputs), q, wy, ws)
    leaves = {
        k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()
    }
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C", "z") else v) for k, v in leaves.items()}
    y1, s1 = run_scan(ssd_scan_triton, first, q)
    second = {k: (v[:, cut:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in leaves.items()}
    second["initial_state"] = s1
    y2, s2 = run_scan(ssd_scan_triton, second, q)
    y = torch.cat([y1, y2], dim=1)
    ((y.double() * wy.to(DEVICE)).sum() + (s2.double() * ws.to(DEVICE)).sum()).backward()
    for name in g_ref:
        assert_rel(leaves[name].grad, g_ref[name], GRAD_TOL, f"d{name}")


def test_empty_sequence_returns_the_initial_state():
    inputs = make_inputs(2, 0, 2, 3, 1, 5, seed=0)
    for grad in (False, True):
        s0 = inputs["initial_state"].clone().requires_grad_(grad)
        y, s = run_scan(ssd_scan_triton, dict(inputs, initial_state=s0), 8)
        assert y.shape == (2, 0, 2, 3)
        assert torch.equal(s, s0) and s is not s0
        if grad:
            s.sum().backward()
            assert torch.equal(s0.grad, torch.ones_like(s0))
    y, s = run_scan(ssd_scan_triton, dict(inputs, initial_state=None), 8)
    assert s.shape == (2, 2, 3, 5) and not s.any()


def test_inputs_are_not_modified():
    inputs = make_inputs(1, 40, 2, 3, 1, 5, seed=23, D="hp")
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    wy, ws = weights(1, 40, 2, 3, 5, seed=1)
    grads_of(ssd_scan_triton, inputs, 16, wy, ws)
    for k, v in before.items():
        assert torch.equal(inputs[k], v), k


def test_bad_arguments_are_refused_like_the_other_backends():
    b, l, h, p, g, n = 1, 10, 4, 3, 2, 5
    good = make_inputs(b, l, h, p, g, n, seed=1)
    for over in (
        dict(dt=torch.randn(b, l + 1, h)),
        dict(B=torch.randn(b, l, 3, n), C=torch.randn(b, l, 3, n)),
        dict(D=torch.randn(h, p + 1)),
        dict(initial_state=torch.randn(b, h, n, p)),
    ):
        args = dict(good, **{k: v.to(DEVICE) for k, v in over.items()})
        for fn in (ssd_scan_ref, ssd_scan_triton):
            with pytest.raises(KernelInputError) as info:
                run_scan(fn, args, 8)
            if fn is ssd_scan_ref:
                want = str(info.value)
            else:
                assert str(info.value) == want
    with pytest.raises(KernelInputError, match="chunk_size"):
        run_scan(ssd_scan_triton, good, 0)


# ---------------------------------------------------------------------------------------------- decode step


def _step_inputs(inputs, t):
    return dict(
        x=inputs["x"][:, t],
        dt=inputs["dt"][:, t],
        A=inputs["A"],
        B=inputs["B"][:, t],
        C=inputs["C"][:, t],
        D=inputs["D"],
        z=None if inputs["z"] is None else inputs["z"][:, t],
        dt_bias=inputs["dt_bias"],
        dt_softplus=inputs["dt_softplus"],
    )


@pytest.mark.parametrize(
    "opts",
    [dict(D="h"), dict(D="hp", z=False), dict(D=None, softplus=False, dt_bias=False)],
    ids=["D_h", "D_hp-no_z", "plain"],
)
def test_decode_steps_match_the_reference(opts):
    b, l, h, p, g, n = 2, 6, 4, 3, 2, 5
    inputs = make_inputs(b, l, h, p, g, n, seed=31, **opts)
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), 16)
    state, ys = inputs["initial_state"], []
    with torch.no_grad():
        for t in range(l):
            kept = state.clone()
            y_t, new_state = ssd_state_update_triton(state, **_step_inputs(inputs, t))
            assert torch.equal(state, kept)  # never mutated
            assert new_state.data_ptr() != state.data_ptr()
            assert y_t.shape == (b, h, p) and y_t.dtype == torch.float32 and new_state.dtype == torch.float32
            y_r, n_r = ssd_state_update_ref(as64({"s": state})["s"], **_step_inputs(as64(inputs), t))
            assert_rel(y_t, y_r, OUT_TOL, f"y step {t}")
            assert_rel(new_state, n_r, OUT_TOL, f"state step {t}")
            ys.append(y_t)
            state = new_state
    assert_rel(torch.stack(ys, dim=1), y_ref, OUT_TOL, "y (steps vs scan)")
    assert_rel(state, s_ref, OUT_TOL, "state (steps vs scan)")


def test_decode_step_layouts_and_dtypes():
    inputs = make_inputs(2, 3, 4, 3, 2, 5, seed=37, dtype=torch.bfloat16, D="hp")
    s0 = torch.randn(2, 4, 5, 3, device=DEVICE).transpose(-1, -2)  # a non-contiguous float32 state
    step = _step_inputs(inputs, 1)  # x, B, C, z: strided slices of the sequence
    with torch.no_grad():
        y, new = ssd_state_update_triton(s0, **step)
    assert y.dtype == torch.bfloat16 and new.dtype == torch.float32 and new.is_contiguous()
    y_ref, new_ref = ssd_state_update_ref(s0.double().cpu(), **_step_inputs(as64(inputs), 1))
    assert_rel(y, y_ref, HALF_TOL[torch.bfloat16][0], "y")
    assert_rel(new, new_ref, OUT_TOL, "state")


def test_decode_step_gradients_fall_back_to_the_torch_path():
    inputs = make_inputs(2, 1, 4, 3, 2, 5, seed=41, D="hp")
    gen = torch.Generator().manual_seed(2)
    s0 = torch.randn(2, 4, 3, 5, generator=gen).to(DEVICE)
    wy, ws = torch.randn(2, 4, 3, generator=gen).double(), torch.randn(2, 4, 3, 5, generator=gen).double()

    def grads(fn, base, state):
        leaves = {
            k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
            for k, v in _step_inputs(base, 0).items()
        }
        st_leaf = state.detach().clone().requires_grad_(True)
        y, new = fn(st_leaf, **leaves)
        ((y.double().cpu() * wy).sum() + (new.double().cpu() * ws).sum()).backward()
        out = {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}
        out["state"] = st_leaf.grad
        return out

    g_ref = grads(ssd_state_update_ref, as64(inputs), s0.double().cpu())
    g_tri = grads(ssd_state_update_triton, inputs, s0)
    for name in g_ref:
        assert_rel(g_tri[name], g_ref[name], GRAD_TOL, f"d{name}")


# ---------------------------------------------------------------------------------------------- dispatcher


def test_dispatcher_routes_to_the_triton_kernels(monkeypatch):
    inputs = make_inputs(1, 20, 2, 3, 1, 5, seed=29)
    kw = dict(inputs)
    args = (kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), 16)
    calls = []
    real = ssd_triton._SSDScanFn.apply
    monkeypatch.setattr(ssd_triton._SSDScanFn, "apply", lambda *a: calls.append(1) or real(*a))
    y_ref, s_ref = K.ssd_scan(
        *[a.double().cpu() if isinstance(a, torch.Tensor) else a for a in args],
        **as64(kw),
        return_final_state=True,
        backend="ref",
    )
    leaf = args[0].clone().requires_grad_(True)
    y, s = K.ssd_scan(leaf, *args[1:], **kw, return_final_state=True, backend="triton")
    assert calls, "backend='triton' did not reach the Triton autograd function"
    assert_rel(y, y_ref, OUT_TOL, "y")
    assert_rel(s, s_ref, OUT_TOL, "final state")
    st_in = torch.randn(1, 2, 3, 5, device=DEVICE)
    step = _step_inputs(inputs, 0)
    with torch.no_grad():
        y1, n1 = K.ssd_state_update(st_in, **step, backend="triton")
    y2, n2 = ssd_state_update_ref(st_in.double().cpu(), **_step_inputs(as64(inputs), 0))
    assert_rel(y1, y2, OUT_TOL, "step y")
    assert_rel(n1, n2, OUT_TOL, "step state")
