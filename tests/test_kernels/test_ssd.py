"""Mamba-2 SSD scan: the chunked torch path against the float64 sequential reference, and the reference itself
against a hand computation.

Tolerances (max-abs-diff / max-abs(reference)): outputs and final states 1e-5, gradients 1e-4, for the float32
torch path against the float64 reference on the same (float32-representable) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
import seqlab.kernels.ssd.chunked as ssd_chunked_module
from seqlab.kernels import KernelInputError
from seqlab.kernels.ssd.chunked import ssd_scan_chunked, ssd_state_update_chunked
from seqlab.kernels.ssd.ref import ssd_scan_ref, ssd_state_update_ref
from seqlab.testing import rel_err as rel

OUT_TOL = 1e-5
GRAD_TOL = 1e-4
INPUT_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


# ----------------------------------------------------------------------------------------------------- helpers


def make_inputs(
    b=2,
    l=37,
    h=4,
    p=3,
    g=2,
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
    dt_scale=1.0,
):
    """Random SSD inputs as a dict of keyword arguments (chunk_size not included)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    lo, hi = a_range
    if softplus:
        dt = rnd(b, l, h, scale=0.7 * dt_scale) - 1.0
    else:
        dt = (torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 0.5 + 0.05).mul(dt_scale).to(dtype)
    inputs = dict(
        x=rnd(b, l, h, p),
        dt=dt,
        A=(torch.rand(h, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype),
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
        D={"h": rnd(h), "hp": rnd(h, p), None: None}[D],
        z=rnd(b, l, h, p) if z else None,
        dt_bias=rnd(h, scale=0.5) if dt_bias else None,
        dt_softplus=softplus,
        initial_state=rnd(b, h, p, n) if init else None,
    )
    return inputs


def as64(inputs: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def run_scan(fn, inputs: dict, chunk_size: int):
    kw = dict(inputs)
    return fn(
        kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), chunk_size, return_final_state=True, **kw
    )


def grads_of(fn, inputs: dict, chunk_size: int, wy: torch.Tensor, ws: torch.Tensor):
    """Gradients of <y, wy> + <final_state, ws> w.r.t. every tensor input."""
    leaves = {
        k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()
    }
    y, s = run_scan(fn, leaves, chunk_size)
    loss = (y.double() * wy).sum() + (s.double() * ws).sum()
    loss.backward()
    return y, s, {k: leaves[k].grad for k in INPUT_NAMES if isinstance(leaves.get(k), torch.Tensor)}


@pytest.fixture
def small_blocks(monkeypatch):
    """Force the no_grad driver to cut even small test inputs into several blocks of chunks."""

    def set_chunks_per_block(b, h, q, chunks):
        monkeypatch.setattr(ssd_chunked_module, "_BLOCK_ELEMS", b * h * q * q * chunks)

    return set_chunks_per_block


# ------------------------------------------------------------------------------------ the reference by hand


def _softplus(v: float) -> float:
    return v if v > 20 else math.log1p(math.exp(v))


def _silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def test_reference_matches_a_hand_computation():
    # b = h = p = n = g = 1, l = 2, every option on
    xs, dts, Bs, Cs, zs = [2.0, -1.0], [0.5, -0.25], [3.0, 0.5], [1.5, -2.0], [1.0, -0.5]
    A, D, bias, s0 = -0.7, 0.25, 0.1, 0.3
    state, want = s0, []
    for x, dt, B, C, z in zip(xs, dts, Bs, Cs, zs):
        d = _softplus(dt + bias)
        state = math.exp(d * A) * state + d * x * B
        want.append((state * C + D * x) * _silu(z))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    y, s = ssd_scan_ref(
        t(xs).view(1, 2, 1, 1),
        t(dts).view(1, 2, 1),
        t([A]),
        t(Bs).view(1, 2, 1, 1),
        t(Cs).view(1, 2, 1, 1),
        1,
        D=t([D]),
        z=t(zs).view(1, 2, 1, 1),
        dt_bias=t([bias]),
        dt_softplus=True,
        initial_state=t([s0]).view(1, 1, 1, 1),
        return_final_state=True,
    )
    assert y.flatten().tolist() == pytest.approx(want, rel=1e-13, abs=1e-13)
    assert s.item() == pytest.approx(state, rel=1e-13)


def test_reference_matches_a_hand_computation_without_options():
    # y_1 = C_1 dt_1 x_1 B_1; y_2 = C_2 (e^{dt_2 A} dt_1 x_1 B_1 + dt_2 x_2 B_2)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    y, s = ssd_scan_ref(
        t([1.0, 2.0]).view(1, 2, 1, 1),
        t([0.5, 1.0]).view(1, 2, 1),
        t([-math.log(2.0)]),
        t([2.0, 1.0]).view(1, 2, 1, 1),
        t([3.0, -1.0]).view(1, 2, 1, 1),
        5,
        return_final_state=True,
    )
    h1 = 0.5 * 1.0 * 2.0  # 1.0
    h2 = 0.5 * h1 + 1.0 * 2.0 * 1.0  # e^{-ln 2} = 0.5 -> 2.5
    assert y.flatten().tolist() == pytest.approx([3.0 * h1, -1.0 * h2], rel=1e-14)
    assert s.item() == pytest.approx(h2, rel=1e-14)


def test_reference_step_matches_a_hand_computation():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    state = t([[[[0.3, -0.1]]]])  # (b, h, p, n) = (1, 1, 1, 2)
    d = _softplus(0.2 + 0.1)
    y, new = ssd_state_update_ref(
        state,
        t([[[2.0]]]),
        t([[0.2]]),
        t([-0.7]),
        t([[[3.0, 1.0]]]),
        t([[[1.5, -2.0]]]),
        D=t([0.25]),
        z=t([[[1.0]]]),
        dt_bias=t([0.1]),
        dt_softplus=True,
    )
    decay = math.exp(d * -0.7)
    s0 = decay * 0.3 + d * 2.0 * 3.0
    s1 = decay * -0.1 + d * 2.0 * 1.0
    assert new.flatten().tolist() == pytest.approx([s0, s1], rel=1e-14)
    assert y.item() == pytest.approx((s0 * 1.5 + s1 * -2.0 + 0.25 * 2.0) * _silu(1.0), rel=1e-14)
    assert state.flatten().tolist() == [0.3, -0.1]  # untouched


# ------------------------------------------------------------------------------- torch path vs reference

# (b, l, h, p, g, n, chunk_size, options): lengths 1, 2, 63, 64, 65, 257, 1000; chunk sizes 1, 7, 16, 64, 256;
# groups 1, 2, h; with and without D (both shapes), z, dt_bias, softplus, initial_state.
CASES = [
    (1, 1, 4, 3, 1, 5, 64, dict()),
    (2, 1, 4, 3, 4, 5, 1, dict(D=None, z=False)),
    (1, 2, 4, 3, 2, 5, 1, dict(D="hp")),
    (2, 2, 4, 3, 1, 5, 7, dict(init=False, dt_bias=False, softplus=False)),
    (1, 63, 4, 4, 1, 8, 64, dict()),
    (2, 63, 4, 3, 2, 5, 16, dict(D="hp", init=False)),
    (1, 64, 4, 4, 4, 8, 64, dict(z=False)),
    (2, 64, 6, 3, 3, 5, 7, dict(D=None, softplus=False)),
    (1, 65, 4, 4, 1, 8, 64, dict(D="hp")),
    (2, 65, 4, 3, 2, 5, 16, dict(dt_bias=False)),
    (1, 257, 4, 4, 1, 8, 64, dict()),
    (2, 257, 4, 3, 4, 5, 256, dict(D="hp", z=False)),
    (1, 257, 2, 5, 2, 6, 7, dict(init=False)),
    (1, 257, 4, 3, 2, 5, 1, dict(D=None, softplus=False, dt_bias=False)),
    (1, 1000, 4, 4, 1, 8, 64, dict(D="hp")),
    (2, 1000, 4, 3, 2, 5, 256, dict(z=False, init=False)),
    (1, 1000, 4, 3, 4, 4, 16, dict()),
]


def _case_id(case):
    b, l, h, p, g, n, q, opts = case
    extra = ",".join(f"{k}={v}" for k, v in opts.items())
    return f"b{b}-l{l}-h{h}-p{p}-g{g}-n{n}-q{q}" + (f"-{extra}" if extra else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_path_matches_reference(case):
    b, l, h, p, g, n, q, opts = case
    inputs = make_inputs(b, l, h, p, g, n, seed=l + q, **opts)
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), q)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_chunked, inputs, q)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert y.shape == (b, l, h, p) and s.shape == (b, h, p, n)
    assert rel(y, y_ref) <= OUT_TOL
    assert rel(s, s_ref) <= OUT_TOL


GRAD_CASES = [
    (1, 1, 4, 3, 2, 5, 64, dict()),
    (2, 2, 4, 3, 4, 5, 1, dict(D="hp")),
    (1, 63, 4, 3, 1, 5, 16, dict(D="hp")),
    (2, 65, 4, 3, 2, 4, 64, dict()),
    (1, 64, 4, 3, 2, 4, 7, dict(softplus=False)),
    (1, 257, 4, 3, 4, 4, 64, dict()),
    (1, 130, 2, 3, 1, 4, 256, dict(D="hp")),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_gradients_match_reference(case):
    b, l, h, p, g, n, q, opts = case
    inputs = make_inputs(b, l, h, p, g, n, seed=7 * l + q, **opts)
    gen = torch.Generator().manual_seed(l)
    wy = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    ws = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    y_ref, s_ref, g_ref = grads_of(ssd_scan_ref, as64(inputs), q, wy, ws)
    y, s, g_fast = grads_of(ssd_scan_chunked, inputs, q, wy, ws)
    expected = {k for k in INPUT_NAMES if inputs.get(k) is not None}
    assert set(g_fast) == expected == set(g_ref)
    assert rel(y, y_ref) <= OUT_TOL and rel(s, s_ref) <= OUT_TOL
    for name in sorted(expected):
        assert g_fast[name].dtype == inputs[name].dtype
        assert rel(g_fast[name], g_ref[name]) <= GRAD_TOL, name
    # the autograd driver and the no_grad driver compute the same thing
    with torch.no_grad():
        y_ng, s_ng = run_scan(ssd_scan_chunked, inputs, q)
    assert rel(y_ng, y) <= 1e-6 and rel(s_ng, s) <= 1e-6


@pytest.mark.parametrize("chunks_per_block", [1, 2, 3])
def test_blocked_no_grad_driver_matches_reference(small_blocks, chunks_per_block):
    b, l, h, p, g, n, q = 2, 150, 4, 3, 2, 5, 16  # 9 full chunks + a 6-step tail
    small_blocks(b, h, q, chunks_per_block)
    inputs = make_inputs(b, l, h, p, g, n, seed=chunks_per_block)
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), q)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_chunked, inputs, q)
    assert rel(y, y_ref) <= OUT_TOL and rel(s, s_ref) <= OUT_TOL
    # and the autograd driver, blocked the same way
    y_g, s_g = run_scan(ssd_scan_chunked, {**inputs, "x": inputs["x"].clone().requires_grad_(True)}, q)
    assert rel(y_g, y_ref) <= OUT_TOL and rel(s_g, s_ref) <= OUT_TOL


def test_single_batch_single_group_writes_the_output_in_place():
    # b == 1, g == 1, float32: the no_grad driver accumulates straight into the output (no final copy)
    inputs = make_inputs(1, 200, 4, 8, 1, 6, seed=3)
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), 32)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_chunked, inputs, 32)
    assert y.is_contiguous()
    assert rel(y, y_ref) <= OUT_TOL and rel(s, s_ref) <= OUT_TOL


def test_result_does_not_depend_on_chunk_size():
    inputs = make_inputs(2, 300, 4, 3, 2, 5, seed=11, D="hp")
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), 1)
    for q in (1, 7, 16, 64, 256, 299, 300, 301, 1000):
        with torch.no_grad():
            y, s = run_scan(ssd_scan_chunked, inputs, q)
        assert rel(y, y_ref) <= OUT_TOL and rel(s, s_ref) <= OUT_TOL, q
    # the reference ignores chunk_size entirely
    y2, s2 = run_scan(ssd_scan_ref, as64(inputs), 64)
    assert torch.equal(y2, y_ref) and torch.equal(s2, s_ref)


def test_non_contiguous_inputs():
    b, l, h, p, g, n, q = 2, 70, 4, 3, 2, 5, 16
    base = make_inputs(b, l, h, p, g, n, seed=5, D="hp")
    gen = torch.Generator().manual_seed(5)
    # the same values, stored as transposed / strided views
    x = base["x"].transpose(1, 2).contiguous().transpose(1, 2)  # (b, l, h, p) from (b, h, l, p)
    dt_wide = torch.randn(b, l, 2 * h, generator=gen)
    dt_wide[..., ::2] = base["dt"]
    dt = dt_wide[..., ::2]
    B = base["B"].transpose(-1, -2).contiguous().transpose(-1, -2)
    C = torch.stack([base["C"], base["C"]], dim=-1)[..., 0]
    z = base["z"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    D = base["D"].t().contiguous().t()
    A = torch.stack([base["A"], base["A"]], dim=1)[:, 1]
    s0 = base["initial_state"].transpose(-1, -2).contiguous().transpose(-1, -2)
    views = dict(base, x=x, dt=dt, B=B, C=C, z=z, D=D, A=A, initial_state=s0)
    assert not any(views[k].is_contiguous() for k in ("x", "dt", "B", "C", "z", "D", "A", "initial_state"))
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(base), q)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_chunked, views, q)
    assert rel(y, y_ref) <= OUT_TOL and rel(s, s_ref) <= OUT_TOL
    y_r2, s_r2 = run_scan(ssd_scan_ref, as64(views), q)
    assert rel(y_r2, y_ref) <= 1e-12 and rel(s_r2, s_ref) <= 1e-12
    # gradients through strided views
    wy = torch.randn(b, l, h, p, dtype=torch.float64, generator=gen)
    ws = torch.randn(b, h, p, n, dtype=torch.float64, generator=gen)
    _, _, g_ref = grads_of(ssd_scan_ref, as64(base), q, wy, ws)
    _, _, g_fast = grads_of(ssd_scan_chunked, views, q, wy, ws)
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) <= GRAD_TOL, name


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.2e-2)])
def test_half_precision_inputs(dtype, tol):
    inputs = make_inputs(2, 100, 4, 3, 2, 5, seed=9, dtype=dtype, D="hp")
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), 32)  # the float64 truth of the same rounded values
    with torch.no_grad():
        y, s = run_scan(ssd_scan_chunked, inputs, 32)
    assert y.dtype == dtype and s.dtype == torch.float32
    assert rel(y, y_ref) <= tol  # y is rounded to dtype once at the end
    assert rel(s, s_ref) <= OUT_TOL  # the state is accumulated and returned in float32
    # the reference in the same dtypes agrees too
    y_r, s_r = run_scan(ssd_scan_ref, inputs, 32)
    assert y_r.dtype == dtype and s_r.dtype == torch.float32
    assert rel(y_r, y_ref) <= tol and rel(s_r, s_ref) <= OUT_TOL
    # a common mix: activations in half precision, A and D parameters in float32
    mixed = dict(inputs, A=inputs["A"].float(), D=inputs["D"].float())
    with torch.no_grad():
        y_m, s_m = run_scan(ssd_scan_chunked, mixed, 32)
    assert y_m.dtype == dtype and s_m.dtype == torch.float32 and rel(y_m, y_ref) <= tol


def test_float64_inputs_run_in_float64():
    inputs = as64(make_inputs(2, 90, 4, 3, 2, 5, seed=13))
    y_ref, s_ref = run_scan(ssd_scan_ref, inputs, 16)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_chunked, inputs, 16)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    assert rel(y, y_ref) <= 1e-12 and rel(s, s_ref) <= 1e-12


@pytest.mark.parametrize("q", [64, 256])
def test_strong_decay_stays_finite_and_accurate(q):
    b, l, h, p, g, n = 1, 300, 4, 3, 1, 5
    inputs = make_inputs(b, l, h, p, g, n, seed=17, softplus=False, dt_bias=False, a_range=(-40.0, -30.0))
    dt = inputs["dt"].clone()
    # head 0: one huge step at the start of every chunk, then tiny ones: the running sum jumps to about -500 and
    # the segment sums inside the chunk are small differences of large numbers (a naive cumsum difference loses
    # them). head 1: a steady -8 per step, about -500 per 64 steps. heads 2, 3: the random rates above.
    dt[:, :, 0] = 0.002
    dt[:, ::q, 0] = 15.0
    inputs["A"][1] = -80.0
    dt[:, :, 1] = 0.1
    inputs["dt"] = dt
    a_sums = (dt * inputs["A"])[0, :q].sum(0)
    assert (a_sums[:2] < -450).all()
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), q)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_chunked, inputs, q)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel(y, y_ref) <= OUT_TOL and rel(s, s_ref) <= OUT_TOL
    for head in range(h):  # each head on its own scale, so a weak head cannot hide behind a strong one
        assert rel(y[..., head, :], y_ref[..., head, :]) <= OUT_TOL, head
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(b, l, h, p, dtype=torch.float64, generator=gen)
    ws = torch.randn(b, h, p, n, dtype=torch.float64, generator=gen)
    _, _, g_ref = grads_of(ssd_scan_ref, as64(inputs), q, wy, ws)
    _, _, g_fast = grads_of(ssd_scan_chunked, inputs, q, wy, ws)
    for name in g_ref:
        assert torch.isfinite(g_fast[name]).all(), name
        assert rel(g_fast[name], g_ref[name]) <= GRAD_TOL, name


def test_positive_and_zero_A_work():
    # A > 0 makes the state grow: keep the growth within float32 range (about e^3 here)
    inputs = make_inputs(2, 80, 4, 3, 2, 5, seed=19, softplus=False, dt_scale=0.5, a_range=(-1.0, 0.2))
    inputs["A"][0] = 0.0
    inputs["A"][1] = 0.25
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), 32)
    with torch.no_grad():
        y, s = run_scan(ssd_scan_chunked, inputs, 32)
    assert rel(y, y_ref) <= OUT_TOL and rel(s, s_ref) <= OUT_TOL


def test_empty_sequence_returns_the_initial_state():
    inputs = make_inputs(2, 0, 4, 3, 2, 5, seed=0)
    for fn in (ssd_scan_ref, ssd_scan_chunked):
        for grad in (False, True):
            s0 = inputs["initial_state"].clone().requires_grad_(grad)
            y, s = run_scan(fn, dict(inputs, initial_state=s0), 8)
            assert y.shape == (2, 0, 4, 3)
            assert torch.equal(s, s0) and s is not s0
            if grad:
                s.sum().backward()
                assert torch.equal(s0.grad, torch.ones_like(s0))


def test_inputs_are_not_modified():
    inputs = make_inputs(2, 70, 4, 3, 2, 5, seed=23, D="hp")
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    for fn in (ssd_scan_ref, ssd_scan_chunked):
        with torch.no_grad():
            run_scan(fn, inputs, 16)
        run_scan(fn, inputs, 16)
    for k, v in before.items():
        assert torch.equal(inputs[k], v), k


def test_outputs_do_not_alias_the_reused_scratch_buffers():
    first = make_inputs(1, 300, 4, 8, 1, 6, seed=43)
    second = make_inputs(2, 200, 4, 8, 2, 6, seed=44, D="hp")
    with torch.no_grad():
        y1, s1 = run_scan(ssd_scan_chunked, first, 64)
        kept = (y1.clone(), s1.clone())
        run_scan(ssd_scan_chunked, second, 64)
        run_scan(ssd_scan_chunked, first, 16)
    assert torch.equal(y1, kept[0]) and torch.equal(s1, kept[1])


def test_concurrent_calls_from_threads_agree():
    import threading

    cases = [make_inputs(1, 260, 4, 8, 1, 6, seed=50 + i) for i in range(4)]
    with torch.no_grad():
        want = [run_scan(ssd_scan_chunked, c, 32) for c in cases]
    got = [None] * len(cases)

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                got[i] = run_scan(ssd_scan_chunked, cases[i], 32)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (y, s), (yw, sw) in zip(got, want):  # BLAS may block differently under load: not bit for bit
        assert rel(y, yw) <= 1e-6 and rel(s, sw) <= 1e-6


def test_return_final_state_false_returns_y_only():
    inputs = make_inputs(1, 20, 4, 3, 2, 5, seed=2)
    kw = dict(inputs)
    for fn in (ssd_scan_ref, ssd_scan_chunked):
        y = fn(
            kw["x"],
            kw["dt"],
            kw["A"],
            kw["B"],
            kw["C"],
            8,
            D=kw["D"],
            z=kw["z"],
            dt_bias=kw["dt_bias"],
            dt_softplus=True,
            initial_state=kw["initial_state"],
        )
        assert isinstance(y, torch.Tensor) and y.shape == (1, 20, 4, 3)


def test_dispatcher_routes_to_both_backends():
    inputs = make_inputs(1, 40, 4, 3, 2, 5, seed=29)
    kw = dict(inputs)
    args = (kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), 16)
    y_ref, s_ref = K.ssd_scan(*args, **kw, return_final_state=True, backend="ref")
    for backend in ("chunked", "auto"):
        y, s = K.ssd_scan(*args, **kw, return_final_state=True, backend=backend)
        assert rel(y, y_ref) <= OUT_TOL and rel(s, s_ref) <= OUT_TOL
    st_in = torch.randn(1, 4, 3, 5)
    step = dict(D=kw["D"], z=args[0][:, 0] * 0 + 1, dt_bias=kw["dt_bias"], dt_softplus=True)
    y1, n1 = K.ssd_state_update(
        st_in, args[0][:, 0], args[1][:, 0], args[2], args[3][:, 0], args[4][:, 0], **step, backend="ref"
    )
    y2, n2 = K.ssd_state_update(
        st_in, args[0][:, 0], args[1][:, 0], args[2], args[3][:, 0], args[4][:, 0], **step, backend="chunked"
    )
    assert rel(y2, y1) <= OUT_TOL and rel(n2, n1) <= OUT_TOL


# ------------------------------------------------------------------------------------------- invariants


@settings(max_examples=25, deadline=None)
@given(
    l=st.integers(1, 160),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=4),
    chunk_size=st.integers(1, 70),
    g=st.sampled_from([1, 2, 4]),
    options=st.fixed_dictionaries({"D": st.sampled_from([None, "h", "hp"]), "z": st.booleans(), "init": st.booleans()}),
    seed=st.integers(0, 2**16),
)
def test_splitting_and_threading_state_equals_one_pass(l, cuts, chunk_size, g, options, seed):
    inputs = make_inputs(1, l, 4, 3, g, 5, seed=seed, **options)
    with torch.no_grad():
        y_one, s_one = run_scan(ssd_scan_chunked, inputs, chunk_size)
        points = sorted({int(c * l) for c in cuts} - {0, l})
        bounds = [0, *points, l]
        state, ys = inputs["initial_state"], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = dict(inputs, initial_state=state)
            for k in ("x", "dt", "B", "C", "z"):
                if part[k] is not None:
                    part[k] = inputs[k][:, lo:hi]
            y_part, state = run_scan(ssd_scan_chunked, part, chunk_size)
            ys.append(y_part)
    assert rel(torch.cat(ys, dim=1), y_one) <= OUT_TOL
    assert rel(state, s_one) <= OUT_TOL


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


@pytest.mark.parametrize("D", ["h", "hp", None])
def test_decode_steps_equal_the_scan(D):
    b, l, h, p, g, n = 2, 40, 4, 3, 2, 5
    inputs = make_inputs(b, l, h, p, g, n, seed=31, D=D)
    with torch.no_grad():
        y_scan, s_scan = run_scan(ssd_scan_chunked, inputs, 16)
    y_ref, s_ref = run_scan(ssd_scan_ref, as64(inputs), 16)
    for step_fn in (ssd_state_update_chunked, ssd_state_update_ref):
        state, ys = inputs["initial_state"], []
        for t in range(l):
            kept = state.clone()
            y_t, new_state = step_fn(state, **_step_inputs(inputs, t))
            assert torch.equal(state, kept)  # never mutated
            assert new_state.data_ptr() != state.data_ptr()
            assert y_t.shape == (b, h, p) and new_state.shape == (b, h, p, n)
            ys.append(y_t)
            state = new_state
        y_steps = torch.stack(ys, dim=1)
        assert rel(y_steps, y_scan) <= OUT_TOL and rel(state, s_scan) <= OUT_TOL
        assert rel(y_steps, y_ref) <= OUT_TOL and rel(state, s_ref) <= OUT_TOL


def test_decode_step_dtypes_and_float64():
    inputs = make_inputs(2, 3, 4, 3, 2, 5, seed=37, dtype=torch.bfloat16)
    s0 = torch.randn(2, 4, 3, 5)
    y, new = ssd_state_update_chunked(s0, **_step_inputs(inputs, 0))
    assert y.dtype == torch.bfloat16 and new.dtype == torch.float32
    y_ref, new_ref = ssd_state_update_ref(s0.double(), **_step_inputs(as64(inputs), 0))
    assert rel(y, y_ref) <= 1.2e-2 and rel(new, new_ref) <= OUT_TOL
    y64, new64 = ssd_state_update_chunked(s0.double(), **_step_inputs(as64(inputs), 0))
    assert y64.dtype == torch.float64 and new64.dtype == torch.float64
    assert rel(y64, y_ref) <= 1e-13 and rel(new64, new_ref) <= 1e-13


def test_decode_step_gradients_match_reference():
    inputs = make_inputs(2, 1, 4, 3, 2, 5, seed=41, D="hp")
    gen = torch.Generator().manual_seed(2)
    s0 = torch.randn(2, 4, 3, 5, generator=gen)
    wy, ws = torch.randn(2, 4, 3, generator=gen).double(), torch.randn(2, 4, 3, 5, generator=gen).double()

    def grads(fn, base, state):
        leaves = {
            k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
            for k, v in _step_inputs(base, 0).items()
        }
        st_leaf = state.detach().clone().requires_grad_(True)
        y, new = fn(st_leaf, **leaves)
        ((y.double() * wy).sum() + (new.double() * ws).sum()).backward()
        out = {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}
        out["state"] = st_leaf.grad
        return out

    g_ref = grads(ssd_state_update_ref, as64(inputs), s0.double())
    g_fast = grads(ssd_state_update_chunked, inputs, s0)
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) <= GRAD_TOL, name


def test_blocks_cover_the_sequence_in_bounded_pieces():
    for l, q, b, h in [(0, 8, 1, 4), (1, 64, 1, 16), (8192, 64, 1, 16), (1000, 7, 3, 8), (500, 256, 2, 16)]:
        spans = list(ssd_chunked_module._blocks(l, q, b, h))
        covered = 0
        for start, c, qq in spans:
            assert start == covered
            assert qq == q or (c == 1 and qq < q and start + qq == l)
            assert c == 1 or b * h * qq * qq * c <= ssd_chunked_module._BLOCK_ELEMS
            covered += c * qq
        assert covered == l


# ------------------------------------------------------------------------------------------- bad inputs

SCAN_FNS = [ssd_scan_ref, ssd_scan_chunked]
STEP_FNS = [ssd_state_update_ref, ssd_state_update_chunked]


def _scan_args(**over):
    b, l, h, p, g, n = 2, 10, 4, 3, 2, 5
    args = dict(
        x=torch.randn(b, l, h, p),
        dt=torch.randn(b, l, h),
        A=-torch.rand(h),
        B=torch.randn(b, l, g, n),
        C=torch.randn(b, l, g, n),
        chunk_size=4,
        D=torch.randn(h),
        z=torch.randn(b, l, h, p),
        dt_bias=torch.randn(h),
        initial_state=torch.randn(b, h, p, n),
    )
    args.update(over)
    return args


def _call_scan(fn, args):
    a = dict(args)
    return fn(a.pop("x"), a.pop("dt"), a.pop("A"), a.pop("B"), a.pop("C"), a.pop("chunk_size"), **a)


# (override, words that must all appear in the message)
SCAN_ERRORS = [
    (dict(x=torch.randn(2, 10, 12)), ["x", "4 dimensions", "(2, 10, 12)"]),
    (dict(x=[[1.0]]), ["x", "torch.Tensor", "list"]),
    (dict(x=torch.ones(2, 10, 4, 3, dtype=torch.int64)), ["x", "floating", "torch.int64"]),
    (dict(dt=torch.randn(2, 10, 4, 1)), ["dt", "3 dimensions", "(2, 10, 4, 1)"]),
    (dict(dt=torch.randn(2, 9, 4)), ["dt", "(b, l, h)", "(2, 10, 4)", "(2, 9, 4)"]),
    (dict(dt=torch.randn(2, 10, 3)), ["dt", "(2, 10, 4)", "(2, 10, 3)"]),
    (dict(dt=torch.ones(2, 10, 4, dtype=torch.int32)), ["dt", "floating", "torch.int32"]),
    (dict(dt=None), ["dt", "torch.Tensor", "NoneType"]),
    (dict(A=None), ["A", "torch.Tensor", "NoneType"]),
    (dict(A=torch.randn(4, 5)), ["A", "1 dimensions", "(4, 5)"]),
    (dict(A=torch.randn(3)), ["A", "(h,)", "(4,)", "(3,)"]),
    (dict(A=torch.ones(4, dtype=torch.int64)), ["A", "floating"]),
    (dict(B=torch.randn(2, 10, 5)), ["B", "4 dimensions", "(2, 10, 5)"]),
    (dict(B=torch.randn(3, 10, 2, 5)), ["B", "(b, l, g, n)", "(3, 10, 2, 5)"]),
    (dict(B=torch.randn(2, 11, 2, 5)), ["B", "(2, 10, '*', '*')", "(2, 11, 2, 5)"]),
    (dict(B=torch.ones(2, 10, 2, 5, dtype=torch.int16)), ["B", "floating", "torch.int16"]),
    (dict(C=torch.randn(2, 10, 2, 6)), ["C", "(b, l, g, n)", "(2, 10, 2, 5)", "(2, 10, 2, 6)"]),
    (dict(C=torch.randn(2, 10, 1, 5)), ["C", "(2, 10, 2, 5)", "(2, 10, 1, 5)"]),
    (dict(C=torch.randn(2, 10, 10)), ["C", "4 dimensions"]),
    (dict(C=torch.ones(2, 10, 2, 5, dtype=torch.bool)), ["C", "floating", "torch.bool"]),
    (
        dict(B=torch.randn(2, 10, 3, 5), C=torch.randn(2, 10, 3, 5)),
        ["x.shape[2] (heads h)", "(4)", "B.shape[2] (groups g)", "(3)", "divisible"],
    ),
    (dict(chunk_size=0), ["chunk_size", "positive int", "0"]),
    (dict(chunk_size=-64), ["chunk_size", "positive int", "-64"]),
    (dict(chunk_size=64.0), ["chunk_size", "positive int", "64.0"]),
    (dict(chunk_size=True), ["chunk_size", "positive int", "True"]),
    (dict(chunk_size=None), ["chunk_size", "positive int", "None"]),
    (dict(chunk_size="64"), ["chunk_size", "positive int", "'64'"]),
    (dict(D=torch.randn(5)), ["D", "(h,)", "(4,)", "(5,)"]),
    (dict(D=torch.randn(4, 4)), ["D", "(h, p)", "(4, 3)", "(4, 4)"]),
    (dict(D=torch.randn(4, 3, 1)), ["D", "1 or 2 dimensions", "(4, 3, 1)"]),
    (dict(D=torch.ones(4, dtype=torch.int64)), ["D", "floating"]),
    (dict(z=torch.randn(2, 10, 4)), ["z", "4 dimensions"]),
    (dict(z=torch.randn(2, 10, 4, 2)), ["z", "(b, l, h, p)", "(2, 10, 4, 3)", "(2, 10, 4, 2)"]),
    (dict(z=torch.ones(2, 10, 4, 3, dtype=torch.int64)), ["z", "floating"]),
    (dict(dt_bias=torch.randn(4, 1)), ["dt_bias", "1 dimensions", "(4, 1)"]),
    (dict(dt_bias=torch.randn(2)), ["dt_bias", "(h,)", "(4,)", "(2,)"]),
    (dict(dt_bias=torch.ones(4, dtype=torch.int64)), ["dt_bias", "floating"]),
    (dict(initial_state=torch.randn(2, 4, 3)), ["initial_state", "4 dimensions", "(2, 4, 3)"]),
    (dict(initial_state=torch.randn(2, 4, 5, 3)), ["initial_state", "(b, h, p, n)", "(2, 4, 3, 5)", "(2, 4, 5, 3)"]),
    (dict(initial_state=torch.randn(1, 4, 3, 5)), ["initial_state", "(2, 4, 3, 5)", "(1, 4, 3, 5)"]),
    (dict(initial_state=torch.ones(2, 4, 3, 5, dtype=torch.int64)), ["initial_state", "floating"]),
    (dict(initial_state=torch.randn(2, 4, 3, 5, device="meta")), ["one device", "initial_state on meta", "x on cpu"]),
]


@pytest.mark.parametrize("fn", SCAN_FNS, ids=["ref", "chunked"])
@pytest.mark.parametrize("override,words", SCAN_ERRORS, ids=[str(i) for i in range(len(SCAN_ERRORS))])
def test_scan_rejects_bad_arguments_naming_them(fn, override, words):
    with pytest.raises(KernelInputError) as info:
        _call_scan(fn, _scan_args(**override))
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_numpy_integer_chunk_size_is_accepted():
    np = pytest.importorskip("numpy")
    args = _scan_args(chunk_size=np.int64(4))
    y_ref = _call_scan(ssd_scan_ref, args)
    with torch.no_grad():
        y = _call_scan(ssd_scan_chunked, args)
    assert rel(y, y_ref) <= OUT_TOL


def _step_args(**over):
    b, h, p, g, n = 2, 4, 3, 2, 5
    args = dict(
        state=torch.randn(b, h, p, n),
        x=torch.randn(b, h, p),
        dt=torch.randn(b, h),
        A=-torch.rand(h),
        B=torch.randn(b, g, n),
        C=torch.randn(b, g, n),
        D=torch.randn(h, p),
        z=torch.randn(b, h, p),
        dt_bias=torch.randn(h),
    )
    args.update(over)
    return args


STEP_ERRORS = [
    (dict(state=torch.randn(2, 4, 3)), ["state", "4 dimensions", "(2, 4, 3)"]),
    (dict(state=torch.ones(2, 4, 3, 5, dtype=torch.int64)), ["state", "floating"]),
    (dict(x=torch.randn(2, 4)), ["x", "3 dimensions"]),
    (dict(x=torch.randn(2, 4, 4)), ["x", "(b, h, p)", "(2, 4, 3)", "(2, 4, 4)"]),
    (dict(x=torch.ones(2, 4, 3, dtype=torch.int64)), ["x", "floating"]),
    (dict(dt=torch.randn(2, 4, 1)), ["dt", "2 dimensions"]),
    (dict(dt=torch.randn(3, 4)), ["dt", "(b, h)", "(2, 4)", "(3, 4)"]),
    (dict(A=torch.randn(4, 3, 5)), ["A", "1 dimensions"]),
    (dict(A=torch.randn(2)), ["A", "(h,)", "(4,)", "(2,)"]),
    (dict(B=torch.randn(2, 5)), ["B", "3 dimensions"]),
    (dict(B=torch.randn(2, 2, 6)), ["B", "(b, g, n)", "(2, '*', 5)", "(2, 2, 6)"]),
    (dict(C=torch.randn(2, 1, 5)), ["C", "(b, g, n)", "(2, 2, 5)", "(2, 1, 5)"]),
    (dict(C=torch.randn(2, 2, 5, 1)), ["C", "3 dimensions"]),
    (
        dict(B=torch.randn(2, 3, 5), C=torch.randn(2, 3, 5)),
        ["state.shape[1] (heads h)", "B.shape[1] (groups g)", "divisible"],
    ),
    (dict(D=torch.randn(4, 2)), ["D", "(h, p)", "(4, 3)", "(4, 2)"]),
    (dict(D=torch.randn(3)), ["D", "(h,)", "(4,)", "(3,)"]),
    (dict(z=torch.randn(2, 4, 2)), ["z", "(b, h, p)", "(2, 4, 2)"]),
    (dict(z=torch.randn(2, 4)), ["z", "3 dimensions"]),
    (dict(dt_bias=torch.randn(5)), ["dt_bias", "(h,)", "(5,)"]),
    (dict(dt_bias=torch.randn(4, 1)), ["dt_bias", "1 dimensions"]),
    (dict(x=torch.randn(2, 4, 3, device="meta")), ["one device", "x on meta", "state on cpu"]),
    (dict(state=None), ["state", "torch.Tensor", "NoneType"]),
    (dict(dt=torch.ones(2, 4, dtype=torch.int64)), ["dt", "floating"]),
    (dict(A=torch.ones(4, dtype=torch.int64)), ["A", "floating"]),
    (dict(B=torch.ones(2, 2, 5, dtype=torch.int64)), ["B", "floating"]),
    (dict(C=torch.ones(2, 2, 5, dtype=torch.int64)), ["C", "floating"]),
    (dict(D=torch.randn(4, 3, 1)), ["D", "1 or 2 dimensions"]),
    (dict(D=torch.ones(4, 3, dtype=torch.int64)), ["D", "floating"]),
    (dict(z=torch.ones(2, 4, 3, dtype=torch.int64)), ["z", "floating"]),
    (dict(dt_bias=torch.ones(4, dtype=torch.int64)), ["dt_bias", "floating"]),
]


@pytest.mark.parametrize("fn", STEP_FNS, ids=["ref", "chunked"])
@pytest.mark.parametrize("override,words", STEP_ERRORS, ids=[str(i) for i in range(len(STEP_ERRORS))])
def test_step_rejects_bad_arguments_naming_them(fn, override, words):
    with pytest.raises(KernelInputError) as info:
        fn(**_step_args(**override))
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_silu_gate_matches_torch_definition():
    # the reference uses F.silu; the fast path builds silu as z * sigmoid(z): the same function
    z = torch.linspace(-30, 30, 1001, dtype=torch.float64)
    assert torch.allclose(F.silu(z), z * torch.sigmoid(z), rtol=1e-15, atol=1e-300)
