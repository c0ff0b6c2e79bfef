"""Mamba-3 scan: the float64 sequential reference pinned by a hand computation, the decode step against the scan,
packed rows against each sequence alone, the chunked torch path against the reference (outputs, all four final
states, gradients of every input incl. the initial state), and the argument checks.

Tolerances (max-abs-diff / max-abs(reference)): outputs and final states 1e-5, gradients 1e-4, for the float32
chunked path against the float64 reference on the same (float32-representable) inputs; 1e-10 in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
from seqlab.kernels import KernelInputError
from seqlab.kernels.mamba3.chunked import mamba3_scan_chunked, mamba3_state_update_chunked
from seqlab.kernels.mamba3.ref import mamba3_scan_ref, mamba3_state_update_ref
from seqlab.testing import rel_err as rel

OUT_TOL = 1e-5
GRAD_TOL = 1e-4
TOL64 = 1e-10
TENSOR_NAMES = ("x", "dt", "A", "B", "C", "trap", "angles", "B_bias", "C_bias", "D", "z", "mimo_x", "mimo_z", "mimo_o")


# ----------------------------------------------------------------------------------------------------- helpers


def make_inputs(b=2, l=7, h=4, p=3, r=1, g=2, n=8, a=2, *, D=True, z=True, init=True, rows=None, seed=0,
                dtype=torch.float64, mimo_o=True):  # fmt: skip
    """Random Mamba-3 inputs as a dict of keyword arguments (chunk_size not included); ``rows`` = rows of the
    initial state (default b; N sequences when packed)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    def uni(lo, hi, *shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    rows = b if rows is None else rows
    mimo = r > 1
    inputs = dict(
        x=rnd(b, l, h, p),
        dt=uni(0.05, 0.8, b, l, h),
        A=uni(-2.0, -0.2, b, l, h),
        B=rnd(b, l, r, g, n, scale=0.7),
        C=rnd(b, l, r, g, n, scale=0.7),
        trap=rnd(b, l, h),
        angles=rnd(b, l, a, scale=1.5),
        B_bias=rnd(h, r, n, scale=0.5),
        C_bias=rnd(h, r, n, scale=0.5),
        D=rnd(h) if D else None,
        z=rnd(b, l, h, p) if z else None,
        mimo_x=rnd(h, r, p) if mimo else None,
        mimo_z=rnd(h, r, p) if mimo and z else None,
        mimo_o=rnd(h, r, p) if mimo and mimo_o else None,
        initial_state=(
            (uni(0.0, 2 * math.pi, rows, h, a), rnd(rows, h, p, n), rnd(rows, r, h, n), rnd(rows, h, p))
            if init
            else None
        ),
    )
    return inputs


def cast(inputs: dict, dtype) -> dict:
    def c(v):
        if isinstance(v, torch.Tensor):
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(c(t) for t in v)
        return v

    return {k: c(v) for k, v in inputs.items()}


def run_scan(fn, inputs: dict, chunk_size: int = 16, **kw):
    args = dict(inputs)
    pos = [args.pop(k) for k in ("x", "dt", "A", "B", "C", "trap", "angles", "B_bias", "C_bias")]
    return fn(*pos, chunk_size, return_final_state=True, **args, **kw)


def leaves_of(inputs: dict) -> dict:
    def leaf(v):
        if isinstance(v, torch.Tensor):
            return v.detach().clone().requires_grad_(True)
        if isinstance(v, tuple):
            return tuple(leaf(t) for t in v)
        return v

    return {k: leaf(v) for k, v in inputs.items()}


def grads_of(inputs: dict) -> dict:
    out = {k: inputs[k].grad for k in TENSOR_NAMES if isinstance(inputs.get(k), torch.Tensor)}
    if inputs.get("initial_state") is not None:
        for i, part in enumerate(inputs["initial_state"]):
            out[f"initial_state[{i}]"] = part.grad
    return out


def loss_of(y, state, seed=1):
    """A random linear functional of y and all four final-state parts (float64)."""
    gen = torch.Generator().manual_seed(seed)
    total = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    for part in state:
        total = total + (part.double() * torch.randn(part.shape, generator=gen, dtype=torch.float64)).sum()
    return total


def run_with_grads(fn, inputs: dict, chunk_size: int = 16, **kw):
    leaves = leaves_of(inputs)
    y, s = run_scan(fn, leaves, chunk_size, **kw)
    loss_of(y, s).backward()
    return y, s, grads_of(leaves)


def angle_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest circular distance between two angle tensors (mod 2 pi)."""
    d = (got.double() - want.double() + math.pi) % (2 * math.pi) - math.pi
    return d.abs().max().item() if d.numel() else 0.0


def assert_states_close(got, want, tol):
    assert angle_err(got[0], want[0]) < tol * 2 * math.pi
    for i in range(1, 4):
        assert rel(got[i], want[i]) < tol, i


# ------------------------------------------------------------------------------------ the reference by hand


def test_reference_matches_a_hand_computation():
    # h = p = n/2 = a = r = g = b = 1, l = 2. Both steps: dt = 1, A = -ln 2 (alpha = e^{A dt} = 1/2),
    # trap = 0 (sigmoid = 1/2: beta = (1 - 1/2) * dt * alpha = 1/4, gamma = 1/2 * dt = 1/2),
    # angles = atanh(1/2) (tanh * pi * dt = pi/2 per step: angle 0 -> pi/2 -> pi), D = 1/2, no z, zero start.
    # A rotation by theta maps the pair (u, w) to (u cos - w sin, u sin + w cos): by pi/2 (u, w) -> (-w, u),
    # by pi (u, w) -> (-u, -w).
    # step 1: B + B_bias = (1, -1) + (0, 1) = (1, 0) -> k1 = (0, 1); C + C_bias = (1, 2) + (0, -1) = (1, 1)
    #         -> q1 = (-1, 1); x1 = 2.
    #         h1 = gamma * x1 k1^T = 1/2 * 2 * (0, 1) = (0, 1);  y1 = h1 . q1 + D x1 = 1 + 1 = 2.
    # step 2: B + B_bias = (2, -1) + (0, 1) = (2, 0) -> k2 = (-2, 0); C + C_bias = (1, 1) + (0, -1) = (1, 0)
    #         -> q2 = (-1, 0); x2 = 1.
    #         h2 = alpha h1 + beta x1 k1^T + gamma x2 k2^T = (0, 1/2) + 1/4 * 2 * (0, 1) + 1/2 * (-2, 0) = (-1, 1)
    #         y2 = h2 . q2 + D x2 = 1 + 1/2 = 3/2.
    # final state: angle pi, ssm [[-1, 1]], k = k2 = (-2, 0), v = x2 = 1.
    t = lambda v, *shape: torch.tensor(v, dtype=torch.float64).view(*shape)  # noqa: E731
    inputs = dict(
        x=t([2.0, 1.0], 1, 2, 1, 1),
        dt=t([1.0, 1.0], 1, 2, 1),
        A=t([-math.log(2.0)] * 2, 1, 2, 1),
        B=t([1.0, -1.0, 2.0, -1.0], 1, 2, 1, 1, 2),
        C=t([1.0, 2.0, 1.0, 1.0], 1, 2, 1, 1, 2),
        trap=t([0.0, 0.0], 1, 2, 1),
        angles=t([math.atanh(0.5)] * 2, 1, 2, 1),
        B_bias=t([0.0, 1.0], 1, 1, 2),
        C_bias=t([0.0, -1.0], 1, 1, 2),
        D=t([0.5], 1),
    )
    want_y = t([2.0, 1.5], 1, 2, 1, 1)
    want = (t([math.pi], 1, 1, 1), t([-1.0, 1.0], 1, 1, 1, 2), t([-2.0, 0.0], 1, 1, 1, 2), t([1.0], 1, 1, 1))
    for fn in scan_backends():
        y, s = run_scan(fn, inputs, chunk_size=1)  # chunked: one chunk per position, the state passed between
        assert (y - want_y).abs().max() < 1e-12
        assert angle_err(s[0], want[0]) < 1e-12
        for i in range(1, 4):
            assert (s[i] - want[i]).abs().max() < 1e-12, i
    # the decode step, position by position
    zero = (torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1))
    state = tuple(z.double() for z in zero)
    for step in step_backends():
        state = tuple(z.double() for z in zero)
        for i in range(2):
            kw = {k: (v[:, i] if k not in ("B_bias", "C_bias", "D") else v) for k, v in inputs.items()}
            y_i, state = step(state, **kw)
            assert (y_i - want_y[:, i]).abs().max() < 1e-12
        assert angle_err(state[0], want[0]) < 1e-12
        for i in range(1, 4):
            assert (state[i] - want[i]).abs().max() < 1e-12


def test_mimo_reference_matches_a_hand_computation():
    # h = p = g = b = l = a = 1, n = 2, r = 2: one step with a previous k, v in the state. dt = 1, A = -ln 2,
    # trap = 0 (alpha = 1/2, beta = 1/4, gamma = 1/2), angle 0 -> pi/2 ((u, w) -> (-w, u)), D = 1, x = 1.
    # mimo_x = (2, 1): v = x * mimo_x = (2, 1) per rank, and the previous v (x_prev = 1) projects the same: (2, 1).
    # previous k (ranks): (1, 0), (0, 1)  ->  KV_prev = 2 (1, 0) + 1 (0, 1) = (2, 1)
    # B + B_bias (ranks): (1, 0), (0, 1) -> k = (0, 1), (-1, 0)  ->  KV = 2 (0, 1) + 1 (-1, 0) = (-1, 2)
    # h = beta KV_prev + gamma KV = (1/2, 1/4) + (-1/2, 1) = (0, 5/4)
    # C + C_bias (ranks): (1, 0), (1, 1) -> q = (0, 1), (-1, 1);  y_r = h . q_r + D v_r = (5/4 + 2, 5/4 + 1)
    # gate z = 1, mimo_z = (1, -1): y_r * silu(z * mimo_z[r]); then sum_r mimo_o[r] y_r with mimo_o = (1, -2).
    t = lambda v, *shape: torch.tensor(v, dtype=torch.float64).view(*shape)  # noqa: E731
    inputs = dict(
        x=t([1.0], 1, 1, 1, 1),
        dt=t([1.0], 1, 1, 1),
        A=t([-math.log(2.0)], 1, 1, 1),
        B=t([0.5, 0.0, 0.0, 2.0], 1, 1, 2, 1, 2),
        C=t([1.0, 1.0, 1.0, 0.0], 1, 1, 2, 1, 2),
        trap=t([0.0], 1, 1, 1),
        angles=t([math.atanh(0.5)], 1, 1, 1),
        B_bias=t([0.5, 0.0, 0.0, -1.0], 1, 2, 2),
        C_bias=t([0.0, -1.0, 0.0, 1.0], 1, 2, 2),
        D=t([1.0], 1),
        mimo_x=t([2.0, 1.0], 1, 2, 1),
        initial_state=(
            t([0.0], 1, 1, 1),
            t([0.0, 0.0], 1, 1, 1, 2),
            t([1.0, 0.0, 0.0, 1.0], 1, 2, 1, 2),
            t([1.0], 1, 1, 1),
        ),
    )
    ranks = t([3.25, 2.25], 1, 1, 2, 1, 1)
    silu = lambda v: v / (1.0 + math.exp(-v))  # noqa: E731
    gated = 3.25 * silu(1.0) * 1.0 + 2.25 * silu(-1.0) * -2.0
    want = (
        t([math.pi / 2], 1, 1, 1),
        t([0.0, 1.25], 1, 1, 1, 2),
        t([0.0, 1.0, -1.0, 0.0], 1, 2, 1, 2),
        t([1.0], 1, 1, 1),
    )
    with_gate = dict(inputs, z=t([1.0], 1, 1, 1, 1), mimo_z=t([1.0, -1.0], 1, 2, 1), mimo_o=t([1.0, -2.0], 1, 2, 1))
    for fn in scan_backends():
        y, s = run_scan(fn, inputs, chunk_size=4)
        assert (y - ranks).abs().max() < 1e-12
        for i in range(4):
            assert (s[i] - want[i]).abs().max() < 1e-12, i
        y, _ = run_scan(fn, with_gate, chunk_size=4)
        assert abs(y.item() - gated) < 1e-12
    for step in step_backends():
        kw = {
            k: (v[:, 0] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in with_gate.items()
        }
        y, s = step(kw.pop("initial_state"), **kw)
        assert abs(y.item() - gated) < 1e-12
        for i in range(4):
            assert (s[i] - want[i]).abs().max() < 1e-12, i


def test_rotary_layouts():
    # n = 8, a = 2, angles (pi/2, pi): a rotation maps (u, w) to (u cos - w sin, u sin + w cos)
    from seqlab.kernels.mamba3.ref import rotate

    v = torch.arange(8, dtype=torch.float64)
    angle = torch.tensor([math.pi / 2, math.pi], dtype=torch.float64)
    # SISO: interleaved pairs (0, 1) by pi/2 -> (-1, 0), (2, 3) by pi -> (-2, -3); dims 4..7 unrotated
    assert torch.allclose(rotate(v, angle, mimo=False), torch.tensor([-1.0, 0, -2, -3, 4, 5, 6, 7], dtype=v.dtype))
    # MIMO: halves, pairs (0, 4) by pi/2 -> (-4, 0), (1, 5) by pi -> (-1, -5); dims 2, 3, 6, 7 unrotated
    assert torch.allclose(rotate(v, angle, mimo=True), torch.tensor([-4.0, -1, 2, 3, 0, -5, 6, 7], dtype=v.dtype))


SCAN_BACKEND_NAMES = ["ref", "chunked"]


def scan_backends():
    return [mamba3_scan_ref, mamba3_scan_chunked]


def step_backends():
    return [mamba3_state_update_ref, mamba3_state_update_chunked]


# ------------------------------------------------------------------------------------------- step == scan


@pytest.mark.parametrize("r", [1, 2])
def test_step_equals_scan_position_by_position(r):
    inputs = make_inputs(b=2, l=5, r=r, seed=3)
    y, final = run_scan(mamba3_scan_ref, inputs)
    for step in step_backends():
        state = inputs["initial_state"]
        for t in range(5):
            kw = {k: inputs[k][:, t] for k in ("x", "dt", "A", "B", "C", "trap", "angles", "z")}
            kw.update({k: inputs[k] for k in ("B_bias", "C_bias", "D", "mimo_x", "mimo_z", "mimo_o")})
            before = tuple(s.clone() for s in state)
            y_t, state = step(state, **kw)
            assert rel(y_t, y[:, t]) < TOL64
            if t == 0:  # the state passed in is not modified
                for u, w in zip(before, inputs["initial_state"]):
                    assert torch.equal(u, w)
        assert_states_close(state, final, TOL64)


# --------------------------------------------------------------------------------------------- packed rows


def split_packed(inputs: dict, bounds: list[int]) -> list[dict]:
    """The per-sequence inputs (batch 1) of a packed call."""
    parts = []
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        one = {}
        for k, v in inputs.items():
            if k == "initial_state":
                one[k] = None if v is None else tuple(t[i : i + 1] for t in v)
            elif k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") and v is not None:
                one[k] = v[:, s:e]
            else:
                one[k] = v
        parts.append(one)
    return parts


def check_packed_equals_alone(fn, lengths, r, init, chunk_size, seed, grads=True, tol=TOL64):
    bounds = [0]
    for n_ in lengths:
        bounds.append(bounds[-1] + n_)
    inputs = make_inputs(b=1, l=bounds[-1], r=r, init=init, rows=len(lengths), seed=seed)
    cu = torch.tensor(bounds)
    if grads:
        y, s, g = run_with_grads(fn, inputs, chunk_size, cu_seqlens=cu)
    else:
        y, s = run_scan(fn, inputs, chunk_size, cu_seqlens=cu)
    assert all(part.shape[0] == len(lengths) for part in s)
    # each sequence alone, its gradients accumulated on shared leaves (the same loss, split per sequence)
    leaves = leaves_of(inputs)
    ys, ss = [], []
    for one in split_packed(leaves, bounds):
        y1, s1 = run_scan(fn, one, chunk_size)
        ys.append(y1)
        ss.append(s1)
    y_alone = torch.cat(ys, dim=1)
    s_alone = tuple(torch.cat([s1[j] for s1 in ss], dim=0) for j in range(4))
    assert rel(y, y_alone) < tol
    assert_states_close(s, s_alone, tol)
    if grads:
        loss_of(y_alone, s_alone).backward()
        g_alone = grads_of(leaves)
        for k, v in g.items():
            assert rel(v, g_alone[k]) < tol, k


@pytest.mark.parametrize("r", [1, 2])
def test_ref_packed_equals_each_sequence_alone(r):
    check_packed_equals_alone(mamba3_scan_ref, [3, 1, 4], r, init=True, chunk_size=4, seed=5)
    check_packed_equals_alone(mamba3_scan_ref, [2, 5], r, init=False, chunk_size=4, seed=6, grads=False)


def test_ref_mimo_without_mimo_o_returns_per_rank_outputs():
    inputs = make_inputs(b=1, l=4, r=2, z=False, mimo_o=False, seed=8)
    y, _ = run_scan(mamba3_scan_ref, inputs)
    assert y.shape == (1, 4, 2, 4, 3)
    mo = make_inputs(b=1, l=4, r=2, z=False, seed=9)["mimo_o"]
    y_o, _ = run_scan(mamba3_scan_ref, dict(inputs, mimo_o=mo))
    assert rel(torch.einsum("blrhp,hrp->blhp", y, mo), y_o) < TOL64


# -------------------------------------------------------------------------------------------- argument checks


def _st(**shapes):
    """A (angle, ssm, k, v) state for _bad's sizes (b 1, h 4, a 1, p 2, r 2, n 4), one part's shape changed."""
    want = dict(angle=(1, 4, 1), ssm=(1, 4, 2, 4), k=(1, 2, 4, 4), v=(1, 4, 2))
    want.update(shapes)
    return tuple(torch.zeros(*want[k], dtype=torch.float64) for k in ("angle", "ssm", "k", "v"))


def _bad(**changes):
    inputs = make_inputs(b=1, l=3, h=4, p=2, r=2, g=2, n=4, a=1, seed=2)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    "changes, name",
    [
        (dict(x=torch.zeros(1, 3, 4)), "x"),
        (dict(dt=torch.zeros(1, 3, 5, dtype=torch.float64)), "dt"),
        (dict(A=torch.zeros(1, 2, 4, dtype=torch.float64)), "A"),
        (dict(B=torch.zeros(1, 3, 2, 3, 4, dtype=torch.float64), C=torch.zeros(1, 3, 2, 3, 4, dtype=torch.float64)),
         "heads h"),  # h = 4 not divisible by g = 3
        (dict(C=torch.zeros(1, 3, 1, 2, 4, dtype=torch.float64)), "C"),
        (dict(trap=torch.zeros(1, 3, dtype=torch.float64)), "trap"),
        (dict(angles=torch.zeros(1, 3, 3, dtype=torch.float64)), "angles"),  # a = 3 > n/2 = 2
        (dict(B_bias=torch.zeros(4, 1, 4, dtype=torch.float64)), "B_bias"),
        (dict(C_bias=torch.zeros(4, 2, 3, dtype=torch.float64)), "C_bias"),
        (dict(D=torch.zeros(3, dtype=torch.float64)), "D"),
        (dict(z=torch.zeros(1, 3, 4, 3, dtype=torch.float64)), "z"),
        (dict(mimo_x=None), "mimo_x"),
        (dict(mimo_x=torch.zeros(4, 2, 3, dtype=torch.float64)), "mimo_x"),
        (dict(mimo_z=None), "mimo_z"),
        (dict(mimo_o=None), "mimo_o"),
        (dict(initial_state=_st(angle=(1, 4, 2))), "angle"),
        (dict(initial_state=_st(ssm=(1, 4, 2, 3))), "ssm"),
        (dict(initial_state=_st(k=(1, 1, 4, 4))), "(k)"),
        (dict(initial_state=_st(v=(2, 4, 2))), "(v)"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_argument(changes, name):
    for backend in SCAN_BACKEND_NAMES:
        with pytest.raises(KernelInputError, match=re_escape(name)):
            run_scan(K.mamba3_scan, _bad(**changes), backend=backend)


def re_escape(s):
    import re

    return re.escape(s)


def test_bad_inputs_siso_refuses_mimo_weights_and_bad_packing():
    inputs = make_inputs(b=1, l=3, r=1, seed=2)
    with pytest.raises(KernelInputError, match="mimo_x"):
        run_scan(K.mamba3_scan, dict(inputs, mimo_x=torch.zeros(4, 1, 3, dtype=torch.float64)), backend="ref")
    with pytest.raises(KernelInputError, match="initial_state"):  # 1 row of initial state for 2 sequences
        run_scan(K.mamba3_scan, inputs, backend="ref", cu_seqlens=torch.tensor([0, 1, 3]))
    with pytest.raises(KernelInputError, match="cu_seqlens"):
        run_scan(K.mamba3_scan, inputs, backend="ref", cu_seqlens=torch.tensor([0, 2, 2, 3]))
    with pytest.raises(KernelInputError, match="state"):
        step_kw = {k: inputs[k][:, 0] for k in ("x", "dt", "A", "B", "C", "trap", "angles")}
        bad_state = tuple(t[:, :2] for t in inputs["initial_state"])
        K.mamba3_state_update(bad_state, **step_kw, B_bias=inputs["B_bias"], C_bias=inputs["C_bias"], backend="ref")


# ------------------------------------------------------------------------------------ chunked vs reference

CASES = [  # r, l, D, z, init
    (1, 1, True, True, True),
    (1, 7, False, False, False),
    (1, 37, True, True, True),
    (1, 37, True, False, False),
    (2, 1, True, True, True),
    (2, 7, True, False, True),
    (2, 37, True, True, True),
    (2, 37, False, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("r, l, D, z, init", CASES)
def test_chunked_matches_reference(r, l, D, z, init, dtype):
    """Outputs, all four final states and the gradients of every input (incl. the initial state, the biases and
    the MIMO weights) of the chunked path (chunk 16, g = 2 < h = 4) against the float64 reference."""
    inputs = cast(make_inputs(b=2, l=l, r=r, D=D, z=z, init=init, seed=10 * l + r), dtype)
    y_ref, s_ref, g_ref = run_with_grads(mamba3_scan_ref, cast(inputs, torch.float64))
    y, s, g = run_with_grads(mamba3_scan_chunked, inputs, 16)
    out_tol, grad_tol = (TOL64, TOL64) if dtype == torch.float64 else (OUT_TOL, GRAD_TOL)
    assert y.dtype == dtype and all(part.dtype == dtype for part in s)
    assert rel(y, y_ref) < out_tol
    assert_states_close(s, s_ref, out_tol)
    assert set(g) == set(g_ref)
    for k in g_ref:
        assert g[k] is not None, k
        assert rel(g[k], g_ref[k]) < grad_tol, k


def test_chunked_per_rank_output_matches_reference():
    inputs = make_inputs(b=1, l=19, r=2, z=False, mimo_o=False, seed=4)
    y_ref, s_ref, g_ref = run_with_grads(mamba3_scan_ref, inputs)
    y, s, g = run_with_grads(mamba3_scan_chunked, inputs, 8)
    assert y.shape == (1, 19, 2, 4, 3)
    assert rel(y, y_ref) < TOL64
    assert_states_close(s, s_ref, TOL64)
    for k in g_ref:
        assert rel(g[k], g_ref[k]) < TOL64, k


@pytest.mark.parametrize("r", [1, 2])
def test_chunked_bf16_inputs_compute_in_fp32(r):
    inputs = cast(make_inputs(b=1, l=21, r=r, seed=7), torch.bfloat16)
    y, s = run_scan(mamba3_scan_chunked, inputs, 8)
    y_ref, s_ref = run_scan(mamba3_scan_ref, cast(inputs, torch.float64))
    assert y.dtype == torch.bfloat16 and s[1].dtype == torch.float32
    assert rel(y, y_ref) < 2e-2
    assert rel(s[1], s_ref[1]) < 1e-4  # the state never left float32


@pytest.mark.parametrize("fn", [mamba3_scan_ref, mamba3_scan_chunked], ids=["ref", "chunked"])
@pytest.mark.parametrize("r", [1, 2])
def test_two_calls_threading_the_state_equal_one_call(fn, r):
    inputs = make_inputs(b=2, l=23, r=r, seed=11)
    y, s = run_scan(fn, inputs, 8)
    first = {k: (v[:, :10] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in inputs.items()}
    second = {
        k: (v[:, 10:] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in inputs.items()
    }
    y1, s1 = run_scan(fn, first, 8)
    y2, s2 = run_scan(fn, dict(second, initial_state=s1), 8)
    assert rel(torch.cat([y1, y2], dim=1), y) < TOL64
    assert_states_close(s2, s, TOL64)


# ------------------------------------------------------------------------------------ packed rows, chunked


@pytest.mark.parametrize("r", [1, 2])
def test_chunked_packed_equals_each_sequence_alone(r):
    # sequences shorter than, equal to and longer than a chunk; several starting and ending inside one chunk
    check_packed_equals_alone(mamba3_scan_chunked, [3, 1, 4, 9, 2], r, init=True, chunk_size=4, seed=12)
    check_packed_equals_alone(mamba3_scan_chunked, [5, 8, 1], r, init=False, chunk_size=4, seed=13)


@settings(max_examples=8, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=5),
    r=st.sampled_from([1, 2]),
    init=st.booleans(),
    chunk=st.sampled_from([3, 4, 16]),
)
def test_chunked_packed_random_mixes(lengths, r, init, chunk):
    check_packed_equals_alone(mamba3_scan_chunked, lengths, r, init=init, chunk_size=chunk, seed=sum(lengths))


def test_packed_chunked_matches_packed_reference_in_float32():
    lengths = [6, 1, 13, 3]
    inputs = cast(make_inputs(b=1, l=sum(lengths), r=2, rows=4, seed=14), torch.float32)
    cu = torch.tensor([0, 6, 7, 20, 23])
    y_ref, s_ref, g_ref = run_with_grads(mamba3_scan_ref, cast(inputs, torch.float64), cu_seqlens=cu)
    y, s, g = run_with_grads(mamba3_scan_chunked, inputs, 4, cu_seqlens=cu)
    assert rel(y, y_ref) < OUT_TOL
    assert_states_close(s, s_ref, OUT_TOL)
    for k in g_ref:
        assert rel(g[k], g_ref[k]) < GRAD_TOL, k


# ------------------------------------------------------------------------------------------- the dispatcher


@pytest.mark.parametrize("backend", ["ref", "chunked"])
def test_dispatcher_backends(backend):
    inputs = make_inputs(b=1, l=9, r=2, rows=2, seed=15)
    want_y, want_s = run_scan(mamba3_scan_ref, inputs, cu_seqlens=torch.tensor([0, 4, 9]))
    y, s = run_scan(K.mamba3_scan, inputs, 4, cu_seqlens=torch.tensor([0, 4, 9]), backend=backend)
    assert rel(y, want_y) < TOL64
    assert_states_close(s, want_s, TOL64)
    y2, _ = run_scan(K.mamba3_scan, inputs, 4, seq_idx=torch.tensor([[0] * 4 + [1] * 5]), backend=backend)
    assert rel(y2, want_y) < TOL64
    step_kw = {k: inputs[k][:, 0] for k in ("x", "dt", "A", "B", "C", "trap", "angles", "z")}
    step_kw.update({k: inputs[k] for k in ("B_bias", "C_bias", "D", "mimo_x", "mimo_z", "mimo_o")})
    state = tuple(t[:1] for t in inputs["initial_state"])
    y_step, new_state = K.mamba3_state_update(state, **step_kw, backend=backend)
    assert rel(y_step, want_y[:, 0]) < TOL64
    assert all(isinstance(part, torch.Tensor) for part in new_state)
    # not packed, the default backend ("auto" on CPU tensors: chunked)
    unpacked = make_inputs(b=2, l=5, r=1, seed=16)
    y_auto = K.mamba3_scan(*[unpacked[k] for k in ("x", "dt", "A", "B", "C", "trap", "angles", "B_bias", "C_bias")])
    assert rel(y_auto, run_scan(mamba3_scan_ref, dict(unpacked, initial_state=None, D=None, z=None))[0]) < TOL64


@pytest.mark.parametrize("backend", ["ref", "chunked"])
def test_dispatcher_states_at_equals_the_state_after_each_prefix(backend):
    """``states_at``: the four state parts after positions 1, 6 and 11 of one call (each stacked on dim 1) are the
    final states of calls over those prefixes; the output and final state are those of the plain call."""
    inputs = make_inputs(b=2, l=11, r=2, seed=17)
    y, s, at = run_scan(K.mamba3_scan, inputs, 4, states_at=[1, 6, 11], backend=backend)
    want_y, want_s = run_scan(mamba3_scan_ref, inputs)
    assert rel(y, want_y) < TOL64
    assert_states_close(s, want_s, TOL64)
    assert all(part.shape[1] == 3 for part in at)
    for i, p in enumerate((1, 6, 11)):
        prefix = {
            k: (v[:, :p] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in inputs.items()
        }
        assert_states_close(tuple(part[:, i] for part in at), run_scan(mamba3_scan_ref, prefix)[1], TOL64)
    with pytest.raises(KernelInputError, match="states_at"):
        run_scan(K.mamba3_scan, inputs, 4, states_at=[3], cu_seqlens=torch.tensor([0, 11]), backend=backend)
