"""Mamba-3 on Triton (``kernels/mamba3/triton_ops.py``) against the float64 sequential reference
(``kernels/mamba3/ref.py``): outputs, all four final states, gradients of every input including the initial
state, odd lengths and an odd state size, channel blocks, packed rows against each sequence alone, state threading,
the decode step, bf16 inputs, and MIMO (rank 2 with all three MIMO weights, rank 3 per-rank output, its step).

Runs on CUDA tensors when a GPU is present, otherwise on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), where every program runs one after another in numpy: tiny shapes.

Tolerances (max-abs-diff / max-abs(reference)): float32 outputs and states 1e-5, gradients 1e-4 (float32 inputs,
compared with the reference run in float64 on the same values); float64 1e-10; bf16 outputs 1e-2 (one bf16 ulp,
2^-7, of the output's rounding), float32 states from bf16 inputs 1e-5, bf16 gradients 3e-2. The angle state is
compared on the circle (angles are kept in [0, 2 pi), so a value next to 2 pi may come back as one next to 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
from seqlab.kernels._triton import interpreting, triton_available
from seqlab.kernels.mamba3.ref import mamba3_scan_ref, mamba3_state_update_ref
from seqlab.testing import rel_err

if not triton_available():  # pragma: no cover - triton is a dev dependency; the conftest enables the interpreter
    pytest.skip(
        "Triton kernels cannot run here (no triton, or no CUDA and no TRITON_INTERPRET)", allow_module_level=True
    )

from seqlab.kernels.mamba3.triton_ops import mamba3_scan_triton, mamba3_state_update_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
OUT_TOL = 1e-5
GRAD_TOL = 1e-4
TOL64 = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _patch_language_once_per_launch():
    """Under the interpreter, every call of a device function (``tl.sum`` is one) re-patches triton.language
    (~5 ms, most of a kernel's time here); within one launch the first patch of each module is enough. Test-only
    speed-up (this module only): the same kernels, the same numbers."""
    if not interpreting():
        yield
        return
    from triton.runtime import interpreter

    real = interpreter._patch_lang
    patched: dict = {"ids": None}
    langs_of = (interpreter.tl, interpreter.tl.core)

    def once(fn):
        ids = {id(v) for v in fn.__globals__.values() if any(v is m for m in langs_of)}
        if patched["ids"] is not None:  # a device function inside a launch
            if ids <= patched["ids"]:
                return None
            patched["ids"] |= ids
            return real(fn)
        scope = real(fn)  # a launch: its scope is restored when the grid is done
        patched["ids"] = ids
        restore = scope.restore

        def done():
            patched["ids"] = None
            restore()

        scope.restore = done
        return scope

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter, "_patch_lang", once)
        yield


# ----------------------------------------------------------------------------------------------------- helpers


def make_inputs(b=2, l=5, h=2, p=3, g=1, n=6, a=2, *, D=True, z=True, init=True, rows=None, seed=0,
                dtype=torch.float32):  # fmt: skip
    """Random SISO inputs (keyword arguments of the scan, chunk_size left out); ``rows``: initial-state rows."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    def uni(lo, hi, *shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype).to(DEVICE)

    rows = b if rows is None else rows
    return dict(
        x=rnd(b, l, h, p),
        dt=uni(0.05, 0.8, b, l, h),
        A=uni(-2.0, -0.2, b, l, h),
        B=rnd(b, l, 1, g, n, scale=0.7),
        C=rnd(b, l, 1, g, n, scale=0.7),
        trap=rnd(b, l, h),
        angles=rnd(b, l, a, scale=1.5),
        B_bias=rnd(h, 1, n, scale=0.5),
        C_bias=rnd(h, 1, n, scale=0.5),
        D=rnd(h) if D else None,
        z=rnd(b, l, h, p) if z else None,
        initial_state=(
            (uni(0.0, 2 * math.pi, rows, h, a), rnd(rows, h, p, n), rnd(rows, 1, h, n), rnd(rows, h, p))
            if init
            else None
        ),
    )


def _map(inputs: dict, f) -> dict:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f(v)
        if isinstance(v, tuple):
            return tuple(one(t) for t in v)
        return v

    return {k: one(v) for k, v in inputs.items()}


def f64(inputs: dict) -> dict:
    return _map(inputs, lambda t: t.detach().to(torch.float64))


def leaves(inputs: dict) -> dict:
    """Fresh leaves that require grad, same values."""
    return _map(inputs, lambda t: t.detach().clone().requires_grad_())


def flat(inputs: dict) -> dict:
    """name -> tensor, the initial state's parts as ``initial_state[i]``."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, tuple):
            out.update({f"{k}[{i}]": t for i, t in enumerate(v)})
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out


def grads(inputs: dict) -> dict:
    return {k: t.grad for k, t in flat(inputs).items()}


def loss_of(y, state, seed=1):
    """A random linear function of y and all four final states (the gradient reaches every input)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for t in (y, *state):
        w = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        total = total + (t * w).sum()
    return total


def angle_err(got, want) -> float:
    if want.numel() == 0:
        return 0.0 if got.shape == want.shape else math.inf
    d = torch.remainder(got.double() - want.double() + math.pi, 2 * math.pi) - math.pi
    return (d.abs().max() / max(1.0, want.double().abs().max().item())).item()


def assert_states(got, want, tol, what=""):
    assert len(got) == 4
    assert angle_err(got[0], want[0]) <= tol, f"{what} angle state: {angle_err(got[0], want[0]):.2e}"
    for i, name in ((1, "ssm"), (2, "k"), (3, "v")):
        assert got[i].shape == want[i].shape, f"{what} {name} state shape {got[i].shape} != {want[i].shape}"
        err = rel_err(got[i].double(), want[i].double())
        assert err <= tol, f"{what} {name} state: relative error {err:.2e} > {tol:.0e}"


def check_against_ref(inputs, *, out_tol, grad_tol, **kw):
    """Triton (autograd forward + Triton backward) vs the float64 reference on the same values: y, the final
    states, the no-grad forward, and the gradient of every input (incl. the four initial states)."""
    ref_in = leaves(f64(inputs))
    ref_y, ref_state = mamba3_scan_ref(**ref_in, return_final_state=True)
    loss_of(ref_y, ref_state).backward()
    tri_in = leaves(inputs)
    y, state = mamba3_scan_triton(**tri_in, return_final_state=True, **kw)
    assert y.dtype == inputs["x"].dtype and y.shape == ref_y.shape
    want_sdt = torch.float64 if inputs["x"].dtype == torch.float64 else torch.float32
    assert all(s.dtype == want_sdt for s in state)
    assert rel_err(y.double(), ref_y) <= out_tol, f"y: {rel_err(y.double(), ref_y):.2e}"
    assert_states(state, ref_state, out_tol)
    with torch.no_grad():
        y2 = mamba3_scan_triton(**inputs, **kw)
    assert torch.equal(y2, y.detach())
    loss_of(y, state).backward()
    got, want, given = grads(tri_in), grads(ref_in), flat(tri_in)
    assert got.keys() == want.keys()
    for name, g_ref in want.items():
        g = got[name]
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == given[name].dtype and g.shape == given[name].shape, name
        err = rel_err(g.double(), g_ref)
        assert err <= grad_tol, f"gradient of {name}: relative error {err:.2e} > {grad_tol:.0e}"


# ----------------------------------------------------------------------------------------------------- scan


CASES = {
    # name: (make_inputs kwargs, scan kwargs)
    "full": (dict(b=2, l=3), {}),
    "bare_one_position_groups": (dict(b=1, l=1, h=4, g=2, D=False, z=False, init=False), {}),
    "odd_length_odd_state": (dict(b=1, l=19, h=1, n=7, a=3, D=True, z=False), {}),
    "channel_blocks": (dict(b=1, l=5, h=1, p=5, a=3), dict(block_p=2)),  # 3 blocks of 2 value channels, one partial
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_reference(case):
    shape, kw = CASES[case]
    check_against_ref(make_inputs(**shape), out_tol=OUT_TOL, grad_tol=GRAD_TOL, **kw)


def test_float64_is_exact():
    check_against_ref(make_inputs(b=1, l=4, h=1, dtype=torch.float64), out_tol=TOL64, grad_tol=TOL64, block_p=2)


def test_gradients_through_the_output_only_and_the_state_only():
    """Each half of the backward's sources alone (a bug that cancels between them would show here)."""
    inputs = make_inputs(b=1, l=4, h=1, seed=3)
    for which in ("y", "state"):
        ref_in, tri_in = leaves(f64(inputs)), leaves(inputs)
        for fn, inp in ((mamba3_scan_ref, ref_in), (mamba3_scan_triton, tri_in)):
            y, state = fn(**inp, return_final_state=True)
            loss = loss_of(y, ()) if which == "y" else loss_of(state[1], state[2:])
            loss.backward()
        got, want = grads(tri_in), grads(ref_in)
        for name, g_ref in want.items():
            if g_ref is None:  # no path from this input to the loss (C, D, z to the state)
                assert got[name] is None or not got[name].any(), f"{which}: gradient of {name}"
                continue
            assert rel_err(got[name].double(), g_ref) <= GRAD_TOL, f"{which}: gradient of {name}"


def test_bf16_inputs_compute_in_float32():
    inputs = make_inputs(b=1, l=5, dtype=torch.bfloat16, seed=2)
    inputs["initial_state"] = tuple(t.float() for t in inputs["initial_state"])  # states are float32
    ref_in = leaves(f64(inputs))
    ref_y, ref_state = mamba3_scan_ref(**ref_in, return_final_state=True)
    loss_of(ref_y, ref_state).backward()
    tri_in = leaves(inputs)
    y, state = mamba3_scan_triton(**tri_in, return_final_state=True)
    assert y.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in state)
    assert rel_err(y.double(), ref_y) <= 1e-2
    assert_states(state, ref_state, OUT_TOL, "bf16")
    loss_of(y, state).backward()
    got = grads(tri_in)
    for name, g_ref in grads(ref_in).items():
        assert got[name].dtype == (torch.float32 if name.startswith("initial_state") else torch.bfloat16), name
        assert rel_err(got[name].double(), g_ref) <= 3e-2, f"gradient of {name}"


def test_strided_inputs():
    """Inputs as views with gaps (e.g. slices of one projection): the kernels read them through their strides."""
    base = make_inputs(b=2, l=4, h=2, p=3, seed=4)

    def gappy(t):
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]

    inputs = dict(base)
    for k in ("x", "B", "C", "z", "angles"):
        inputs[k] = gappy(base[k])
    inputs["dt"] = base["dt"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inputs["x"].is_contiguous() and not inputs["dt"].is_contiguous()
    with torch.no_grad():
        y, state = mamba3_scan_triton(**inputs, return_final_state=True)
        y0, state0 = mamba3_scan_triton(**base, return_final_state=True)
    assert torch.equal(y, y0)
    for s, s0 in zip(state, state0):
        assert torch.equal(s, s0)


def test_two_calls_threading_the_state_equal_one_call():
    inputs = make_inputs(b=1, l=7, dtype=torch.float64, seed=5)
    with torch.no_grad():
        y, state = mamba3_scan_triton(**inputs, return_final_state=True)
        first = {k: (v[:, :3] if k not in ("B_bias", "C_bias", "D", "initial_state") else v) for k, v in inputs.items()}
        second = {
            k: (v[:, 3:] if k not in ("B_bias", "C_bias", "D", "initial_state") else v) for k, v in inputs.items()
        }
        y1, s1 = mamba3_scan_triton(**first, return_final_state=True)
        y2, s2 = mamba3_scan_triton(**{**second, "initial_state": s1}, return_final_state=True)
    assert rel_err(torch.cat([y1, y2], dim=1), y) <= TOL64
    assert_states(s2, state, TOL64)


def test_empty_sequence_returns_the_initial_state():
    inputs = make_inputs(b=2, l=0, seed=6)
    y, state = mamba3_scan_triton(**inputs, return_final_state=True)
    assert y.shape == (2, 0, 2, 3)
    for s, s0 in zip(state, inputs["initial_state"]):
        assert torch.equal(s, s0)


# ----------------------------------------------------------------------------------------------------- packed rows


def split_packed(inputs: dict, bounds: list[int]) -> list[dict]:
    """Each sequence of a packed row as its own batch-1 input (its initial-state row)."""
    per_position = ("x", "dt", "A", "B", "C", "trap", "angles", "z")
    out = []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        one = {k: (v[:, s:e] if k in per_position and v is not None else v) for k, v in inputs.items()}
        if inputs["initial_state"] is not None:
            one["initial_state"] = tuple(t[i : i + 1] for t in inputs["initial_state"])
        out.append(one)
    return out


def check_packed_equals_alone(inputs: dict, lengths: list[int], tol: float):
    """Triton on one packed row against the reference run on each sequence alone: outputs, per-sequence final
    states, and the gradients of every input (incl. each sequence's initial state). Returns the packed y."""
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.int64, device=DEVICE)
    tri_in = leaves(inputs)
    y, state = mamba3_scan_triton(**tri_in, return_final_state=True, cu_seqlens=cu)
    assert all(s.shape[0] == len(lengths) for s in state)
    loss_of(y, state).backward()
    ref_in = leaves(f64(inputs))
    pieces = [mamba3_scan_ref(**one, return_final_state=True) for one in split_packed(ref_in, bounds)]
    ref_y = torch.cat([p[0] for p in pieces], dim=1)
    ref_state = tuple(torch.cat([p[1][j] for p in pieces], dim=0) for j in range(4))
    loss_of(ref_y, ref_state).backward()
    assert rel_err(y.double(), ref_y) <= tol
    assert_states(state, ref_state, tol, "packed")
    got = grads(tri_in)
    for name, g_ref in grads(ref_in).items():
        assert rel_err(got[name].double(), g_ref) <= tol, f"gradient of {name}"
    return y.detach()


def test_packed_equals_each_sequence_alone_with_gradients():
    """One packed row (lengths 1, 5, 3, with per-sequence initial states), float32 against the float64 reference
    on each sequence alone; and the dispatcher's seq_idx spelling reaches the same kernel."""
    lengths = [1, 5, 3]
    inputs = make_inputs(b=1, l=sum(lengths), h=1, rows=len(lengths), seed=7)
    y = check_packed_equals_alone(inputs, lengths, GRAD_TOL)
    with torch.no_grad():
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)
        y2 = K.mamba3_scan(**inputs, seq_idx=seq_idx.to(DEVICE), backend="triton")
    assert torch.equal(y2, y)


@settings(max_examples=3, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    r=st.sampled_from([1, 2]),
    init=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_packed_random_mixes_equal_each_sequence_alone(lengths, r, init, seed):
    """Random length mixes, SISO or MIMO, float64: outputs, states and every gradient equal the sequences alone."""
    shape = dict(b=1, l=sum(lengths), h=1, p=2, n=4, a=1, rows=len(lengths), init=init, seed=seed, dtype=torch.float64)
    inputs = make_inputs(**shape) if r == 1 else mimo_inputs(r, **shape)
    check_packed_equals_alone(inputs, lengths, TOL64)


# ----------------------------------------------------------------------------------------------------- decode step


def test_step_matches_reference_step_and_is_differentiable():
    full = make_inputs(b=2, l=1, h=2, g=2, seed=8)
    step = {k: (v[:, 0] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in full.items()}
    state = step.pop("initial_state")
    tri_state = tuple(t.clone() for t in state)
    tri_in = leaves(step)
    tri_state = tuple(t.requires_grad_() for t in tri_state)
    y, new = mamba3_state_update_triton(tri_state, **tri_in)
    for s, s0 in zip(tri_state, state):
        assert torch.equal(s.detach(), s0)  # the state passed in is not written
    ref_in = leaves(f64(step))
    ref_state = tuple(t.detach().double().requires_grad_() for t in state)
    ref_y, ref_new = mamba3_state_update_ref(ref_state, **ref_in)
    assert y.shape == ref_y.shape == (2, 2, 3)
    assert rel_err(y.double(), ref_y) <= OUT_TOL
    assert_states(new, ref_new, OUT_TOL, "step")
    loss_of(y, new).backward()
    loss_of(ref_y, ref_new).backward()
    got, want = grads(tri_in), grads(ref_in)
    for name, g_ref in want.items():
        assert rel_err(got[name].double(), g_ref) <= GRAD_TOL, f"gradient of {name}"
    for i, (s, s_ref) in enumerate(zip(tri_state, ref_state)):
        assert rel_err(s.grad.double(), s_ref.grad) <= GRAD_TOL, f"gradient of state[{i}]"
    # and the dispatcher's entry point
    with torch.no_grad():
        y2, _ = K.mamba3_state_update(state, **step, backend="triton")
    assert torch.equal(y2, y.detach())


def test_step_after_scan_continues_the_scan():
    inputs = make_inputs(b=1, l=4, dtype=torch.float64, seed=9)
    with torch.no_grad():
        y, _ = mamba3_scan_triton(**inputs, return_final_state=True)
        head = {
            k: (v[:, :3] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in inputs.items()
        }
        _, s = mamba3_scan_triton(**head, return_final_state=True)
        last = {k: v[:, 3] for k, v in inputs.items() if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z")}
        y_last, _ = mamba3_state_update_triton(s, **last, B_bias=inputs["B_bias"], C_bias=inputs["C_bias"],
                                               D=inputs["D"])  # fmt: skip
    assert rel_err(y_last, y[:, 3]) <= TOL64


# ----------------------------------------------------------------------------------------------------- MIMO


def mimo_inputs(r=2, *, mo=True, z=True, seed=11, **kw):
    """SISO inputs made MIMO: rank-r B / C / biases / initial k, and the mimo_x / mimo_z / mimo_o weights."""
    inputs = make_inputs(z=z, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    b, l, _, g, n = inputs["B"].shape
    h, p = inputs["x"].shape[2:]
    dtype = inputs["x"].dtype

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    inputs.update(
        B=rnd(b, l, r, g, n, scale=0.7),
        C=rnd(b, l, r, g, n, scale=0.7),
        B_bias=rnd(h, r, n, scale=0.5),
        C_bias=rnd(h, r, n, scale=0.5),
        mimo_x=rnd(h, r, p),
        mimo_z=rnd(h, r, p) if z else None,
        mimo_o=rnd(h, r, p) if mo else None,
    )
    if inputs["initial_state"] is not None:
        th, ssm, _, v = inputs["initial_state"]
        inputs["initial_state"] = (th, ssm, rnd(th.shape[0], r, h, n).to(th.dtype), v)
    return inputs


def test_mimo_matches_reference():
    """Rank 2 with mimo_x / mimo_z / mimo_o, the gate, D, the initial state, two B/C groups, rotary pairs
    (i, i + n/2): outputs, states and the gradients of every input incl. the three MIMO weights."""
    check_against_ref(mimo_inputs(b=1, l=4, h=2, g=2, n=8, a=2), out_tol=OUT_TOL, grad_tol=GRAD_TOL)


def test_mimo_per_rank_output_is_exact_in_float64():
    """mimo_o=None: y per rank (b, l, r, h, p), ungated; rank 3 runs in 4 lanes (one masked)."""
    inputs = mimo_inputs(r=3, mo=False, z=False, b=1, l=3, h=1, n=6, a=3, dtype=torch.float64)
    check_against_ref(inputs, out_tol=TOL64, grad_tol=TOL64)
    with torch.no_grad():
        assert mamba3_scan_triton(**inputs).shape == (1, 3, 3, 1, 3)


def test_mimo_step_matches_reference_step():
    full = mimo_inputs(b=2, l=1, h=2, g=1, n=6, a=1, seed=12)
    step = {k: (v[:, 0] if k in ("x", "dt", "A", "B", "C", "trap", "angles", "z") else v) for k, v in full.items()}
    state = step.pop("initial_state")
    with torch.no_grad():
        y, new = mamba3_state_update_triton(state, **step)
        ref_y, ref_new = mamba3_state_update_ref(tuple(t.double() for t in state), **f64(step))
    assert rel_err(y.double(), ref_y) <= OUT_TOL
    assert_states(new, ref_new, OUT_TOL, "MIMO step")
