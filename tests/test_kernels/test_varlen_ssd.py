"""Packed rows (cu_seqlens / seq_idx) in the Mamba-2 SSD scan: every backend against each sequence run alone.

The truth is the float64 reference run on each sequence by itself (its own slice of x, dt, B, C, z and its own
initial state), concatenated: outputs, the N final states, and the gradients of <y, wy> + <final, wf> with respect
to every input (x, dt, A, B, C, D, z, dt_bias and the (N, h, p, n) initial states). The packed calls must match it:
ref exactly (float64), chunked in float64 (1e-9) and float32, Triton (float32, interpreter on CPU) at the
tolerances of tests/test_kernels/test_triton_ssd.py. Boundaries are placed inside a chunk, on a chunk edge, with
sequences longer than a chunk and of length 1.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
from seqlab.kernels import KernelInputError
from seqlab.kernels._triton import interpreting, triton_available
from seqlab.kernels.ssd.chunked import ssd_scan_chunked
from seqlab.kernels.ssd.ref import ssd_scan_ref
from seqlab.testing import assert_rel

INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
PER_POSITION = ("x", "dt", "B", "C", "z")


def make_packed(lengths, h=2, p=3, g=1, n=4, *, D="h", z=True, dt_bias=True, softplus=True, init=True, seed=0):
    """float64 inputs of one packed row of ``len(lengths)`` sequences, and its cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    T, N = sum(lengths), len(lengths)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    dt = rnd(1, T, h, scale=0.7) - 1.0 if softplus else torch.rand(1, T, h, generator=gen, dtype=torch.float64) * 0.5
    inputs = dict(
        x=rnd(1, T, h, p),
        dt=dt,
        A=-(torch.rand(h, generator=gen, dtype=torch.float64) * 2.0 + 0.2),
        B=rnd(1, T, g, n),
        C=rnd(1, T, g, n),
        D={"h": rnd(h), "hp": rnd(h, p), None: None}[D],
        z=rnd(1, T, h, p) if z else None,
        dt_bias=rnd(h, scale=0.5) if dt_bias else None,
        initial_state=rnd(N, h, p, n) if init else None,
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    wy = rnd(1, T, h, p)
    wf = rnd(N, h, p, n)
    return inputs, cu, softplus, wy, wf


def leaves(inputs, dtype, device="cpu"):
    return {
        k: (v.detach().to(device=device, dtype=dtype).requires_grad_(True) if v is not None else None)
        for k, v in inputs.items()
    }


def call(fn, inp, chunk_size, softplus, **kw):
    args = {k: v for k, v in inp.items() if k not in ("x", "dt", "A", "B", "C")}
    return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size, dt_softplus=softplus, **args, **kw)


def loss_and_grads(y, final, inp, wy, wf):
    loss = (y.double() * wy.to(y.device)).sum()
    if wf is not None:
        loss = loss + (final.double() * wf.to(final.device)).sum()
    loss.backward()
    return {k: inp[k].grad for k in INPUTS if inp.get(k) is not None}


def alone(inputs, cu, softplus, wy, wf):
    """The truth: the float64 reference on each sequence by itself."""
    inp = leaves(inputs, torch.float64)
    ys, finals = [], []
    bounds = cu.tolist()
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        one = {k: (v[:, a:b] if k in PER_POSITION and v is not None else v) for k, v in inp.items()}
        if inp["initial_state"] is not None:
            one["initial_state"] = inp["initial_state"][i : i + 1]
        y, s = call(ssd_scan_ref, one, 4, softplus, return_final_state=True)
        ys.append(y)
        finals.append(s)
    y, final = torch.cat(ys, dim=1), torch.cat(finals, dim=0)
    return y.detach(), final.detach(), loss_and_grads(y, final, inp, wy, wf)


def packed(fn, inputs, cu, softplus, wy, wf, chunk_size, dtype, device="cpu"):
    """The packed call; ``wf=None``: without the final states (the loss is <y, wy> alone)."""
    inp = leaves(inputs, dtype, device)
    if wf is None:
        y = call(fn, inp, chunk_size, softplus, cu_seqlens=cu.to(device))
        return y.detach(), None, loss_and_grads(y, None, inp, wy, None)
    y, final = call(fn, inp, chunk_size, softplus, return_final_state=True, cu_seqlens=cu.to(device))
    return y.detach(), final.detach(), loss_and_grads(y, final, inp, wy, wf)


def check(got, want, tol_out, tol_grad, what=""):
    (y, s, grads), (y0, s0, grads0) = got, want
    assert y.shape == y0.shape
    assert_rel(y.double().cpu(), y0, tol_out, f"{what} y")
    if s is not None:
        assert s.shape == s0.shape
        assert_rel(s.double().cpu(), s0, tol_out, f"{what} final states")
    assert set(grads) == set(grads0)
    for k in grads0:
        assert_rel(grads[k].double().cpu(), grads0[k], tol_grad, f"{what} d{k}")


# (lengths, chunk_size, options): a boundary inside a chunk, on a chunk edge, a sequence longer than a chunk
# (spanning several), sequences of length 1 (also first and last), groups g < h, D (h,) / (h, p) / none.
CASES = [
    ([3, 1, 4, 1, 12], 4, dict(g=2, h=4)),
    ([4, 4, 8], 4, dict(D="hp")),  # every boundary on a chunk edge
    ([1, 1, 1, 1, 1], 2, dict(z=False)),
    ([13, 2, 9], 5, dict(softplus=False, dt_bias=False, D=None)),
    ([6, 7], 64, dict(init=False)),  # everything in one chunk
    ([1, 10, 1], 3, dict(init=False, z=False, g=2, h=2)),
    ([1] * 20 + [5, 2] + [1] * 12, 16, dict()),  # 16 starts in one chunk: running sums down to -16 * 1024
]


def _case_id(case):
    lengths, q, opts = case
    return "-".join(map(str, lengths)) + f"-q{q}" + "".join(f"-{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ref_packed_is_each_sequence_alone(case):
    lengths, q, opts = case
    data = make_packed(lengths, **opts)
    check(packed(ssd_scan_ref, *data, q, torch.float64), alone(*data), 1e-12, 1e-12, "ref")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunked_packed_is_each_sequence_alone(case):
    lengths, q, opts = case
    data = make_packed(lengths, **opts)
    truth = alone(*data)
    check(packed(ssd_scan_chunked, *data, q, torch.float64), truth, 1e-9, 1e-9, "chunked float64")
    check(packed(ssd_scan_chunked, *data, q, torch.float32), truth, 1e-5, 1e-4, "chunked float32")
    inputs, cu, softplus, wy, wf = data
    y_only = alone(inputs, cu, softplus, wy, torch.zeros_like(wf))
    check(packed(ssd_scan_chunked, inputs, cu, softplus, wy, None, q, torch.float64), y_only, 1e-9, 1e-9, "y only")
    # the no_grad driver (in-place blocks, split running sums) and y without the final states
    inputs, cu, softplus = data[:3]
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        inp = {k: (v.to(dtype) if v is not None else None) for k, v in inputs.items()}
        with torch.no_grad():
            y, s = call(ssd_scan_chunked, inp, q, softplus, return_final_state=True, cu_seqlens=cu)
            y_only = call(ssd_scan_chunked, inp, q, softplus, cu_seqlens=cu)
        assert_rel(y.double(), truth[0], tol, "no_grad y")
        assert_rel(s.double(), truth[1], tol, "no_grad final states")
        assert torch.equal(y_only, y)


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 11), min_size=1, max_size=5),
    q=st.integers(1, 8),
    g2=st.booleans(),
    init=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_random_length_mixes(lengths, q, g2, init, seed):
    data = make_packed(lengths, h=2, g=2 if g2 else 1, init=init, seed=seed)
    truth = alone(*data)
    check(packed(ssd_scan_chunked, *data, q, torch.float64), truth, 1e-9, 1e-9, "chunked float64")


def test_a_jump_never_leaks_across_a_boundary_under_strong_or_weak_decay():
    """A decays from ~0 (states carried unchanged for the whole row if nothing stopped them) to very strong."""
    for a_scale in (1e-6, 50.0):
        inputs, cu, softplus, wy, wf = make_packed([5, 3, 9], h=2, seed=3)
        inputs["A"] = inputs["A"] * a_scale
        truth = alone(inputs, cu, softplus, wy, wf)
        check(packed(ssd_scan_chunked, inputs, cu, softplus, wy, wf, 4, torch.float64), truth, 1e-9, 1e-9)
        check(packed(ssd_scan_chunked, inputs, cu, softplus, wy, wf, 4, torch.float32), truth, 1e-5, 1e-4)


def test_seq_idx_is_cu_seqlens_and_the_dispatcher_passes_it():
    inputs, cu, softplus, _, _ = make_packed([3, 1, 6], h=2)
    seq_idx = K.seq_idx_from_cu_seqlens(cu)
    want = call(ssd_scan_ref, inputs, 4, softplus, return_final_state=True, cu_seqlens=cu)
    for backend in ("ref", "chunked"):
        by_cu = call(K.ssd_scan, inputs, 4, softplus, return_final_state=True, cu_seqlens=cu, backend=backend)
        by_idx = call(K.ssd_scan, inputs, 4, softplus, return_final_state=True, seq_idx=seq_idx, backend=backend)
        for a, b, w in zip(by_cu, by_idx, want):
            assert torch.equal(a, b)
            assert_rel(a, w, 1e-9, backend)


@pytest.mark.parametrize("fn", [ssd_scan_ref, ssd_scan_chunked], ids=["ref", "chunked"])
def test_bad_packed_calls_are_refused_naming_the_argument(fn):
    inputs, cu, softplus, _, _ = make_packed([3, 4], h=2)
    two = {k: (torch.cat([v, v]) if k in PER_POSITION and v is not None else v) for k, v in inputs.items()}
    two["initial_state"] = None
    with pytest.raises(KernelInputError, match="batch 1"):
        call(fn, two, 4, softplus, cu_seqlens=cu)
    wrong = dict(inputs, initial_state=inputs["initial_state"][:1])
    with pytest.raises(KernelInputError, match="initial_state.*one row per packed sequence"):
        call(fn, wrong, 4, softplus, cu_seqlens=cu)
    with pytest.raises(KernelInputError, match="cu_seqlens"):
        call(fn, inputs, 4, softplus, cu_seqlens=torch.tensor([0, 3, 3, 7]))
    with pytest.raises(KernelInputError, match="states_at"):
        call(fn, inputs, 4, softplus, cu_seqlens=cu, states_at=[2])
    with pytest.raises(KernelInputError, match="states_at"):
        call(K.ssd_scan, inputs, 4, softplus, cu_seqlens=cu, states_at=[2], backend="chunked")


def test_one_sequence_is_the_unpacked_call():
    inputs, cu, softplus, _, _ = make_packed([11], h=2)
    for fn in (ssd_scan_ref, ssd_scan_chunked):
        y, s = call(fn, inputs, 4, softplus, return_final_state=True, cu_seqlens=cu)
        y0, s0 = call(fn, inputs, 4, softplus, return_final_state=True)
        assert_rel(y, y0, 1e-12)
        assert_rel(s, s0, 1e-12)


# ------------------------------------------------------------------------------------------------ Triton

TRITON_CASES = [
    # initial states and z: the initial-state term enters before the gate (the kernel then runs without z)
    ([3, 1, 6, 1, 5], 8, dict(p=4)),
    # no initial states: the gate stays inside the kernel; a boundary on the chunk edge and one inside
    ([8, 5, 1, 2], 8, dict(init=False, D="hp")),
]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_packed_is_each_sequence_alone(case):
    from seqlab.kernels.ssd.triton_ops import ssd_scan_triton

    device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    lengths, q, opts = case
    data = make_packed(lengths, **opts)
    truth = alone(*data)
    got = packed(ssd_scan_triton, *data, q, torch.float32, device)
    check(got, truth, 1e-5, 1e-4, "triton")
    inputs, cu, softplus = data[:3]
    inp = {k: (v.to(device=device, dtype=torch.float32) if v is not None else None) for k, v in inputs.items()}
    with torch.no_grad():
        y = call(ssd_scan_triton, inp, q, softplus, cu_seqlens=cu.to(device))
    assert_rel(y.double().cpu(), truth[0], 1e-5, "triton no_grad y")
    with pytest.raises(KernelInputError, match="initial_state.*one row per packed sequence"):
        bad = dict(inp, initial_state=torch.zeros(1, *inp["x"].shape[2:], inp["B"].shape[-1], device=device))
        call(ssd_scan_triton, bad, q, softplus, cu_seqlens=cu.to(device))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_packed_multi_tile_segments_and_gradients_through_y_only(monkeypatch):
    """Tiles of 16 steps under chunks of 32: the per-sequence kernels (first-chunk initial-state terms, last-chunk
    final states) loop over several row tiles: the middle sequence has 27 steps in its first chunk and 18 in its
    last one."""
    import seqlab.kernels.ssd.triton_ops as ssd_triton
    from seqlab.kernels.ssd.triton_ops import ssd_scan_triton

    monkeypatch.setattr(ssd_triton, "_TILE_CAP", 16)
    monkeypatch.setattr(ssd_triton, "_STATE_BLOCK", 64)
    device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    inputs, cu, softplus, wy, wf = make_packed([5, 45, 2], h=2, p=3, n=4, D="hp", seed=7)
    truth = alone(inputs, cu, softplus, wy, wf)
    check(packed(ssd_scan_triton, inputs, cu, softplus, wy, wf, 32, torch.float32, device), truth, 1e-5, 1e-4)
    y_only = alone(inputs, cu, softplus, wy, torch.zeros_like(wf))
    got = packed(ssd_scan_triton, inputs, cu, softplus, wy, None, 32, torch.float32, device)
    check(got, y_only, 1e-5, 1e-4, "triton, y only")


def test_chunked_blocks_of_one_chunk_carry_injections_and_captures(monkeypatch):
    """The drivers cut the row into blocks of chunks; with one chunk per block every injection (an initial state
    joining the state leaving its first chunk) and every captured entering state crosses a block boundary."""
    from seqlab.kernels.ssd import chunked

    monkeypatch.setattr(chunked, "_BLOCK_ELEMS", 1)
    data = make_packed([2, 9, 1, 7, 3], h=2, seed=11)
    truth = alone(*data)
    check(packed(ssd_scan_chunked, *data, 3, torch.float64), truth, 1e-9, 1e-9, "autograd driver")
    inputs, cu, softplus = data[:3]
    with torch.no_grad():
        y, s = call(ssd_scan_chunked, inputs, 3, softplus, return_final_state=True, cu_seqlens=cu)
    assert_rel(y, truth[0], 1e-9, "no_grad y")
    assert_rel(s, truth[1], 1e-9, "no_grad final states")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_packed_half_precision_and_the_dispatcher():
    """fp16 inputs (fp16 GEMM operands, float32 states) at test_triton_ssd.py's half tolerances, and the public op
    with seq_idx routing a packed call to the Triton kernels."""
    from seqlab.kernels.ssd.triton_ops import ssd_scan_triton

    device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    data = make_packed([3, 6, 2], h=2, p=4, n=4, seed=5)
    truth = alone(*data)
    y, s, grads = packed(ssd_scan_triton, *data, 8, torch.float16, device)
    assert y.dtype == torch.float16 and s.dtype == torch.float32
    assert grads["initial_state"].dtype == torch.float16
    check((y, s, grads), truth, 2e-3, 4e-3, "fp16")
    inputs, cu, softplus = data[:3]
    inp = {k: (v.to(device=device, dtype=torch.float32) if v is not None else None) for k, v in inputs.items()}
    seq_idx = K.seq_idx_from_cu_seqlens(cu).to(device)
    y, s = call(K.ssd_scan, inp, 8, softplus, return_final_state=True, seq_idx=seq_idx, backend="triton")
    assert_rel(y.double().cpu(), truth[0], 1e-5, "dispatcher y")
    assert_rel(s.double().cpu(), truth[1], 1e-5, "dispatcher final states")
