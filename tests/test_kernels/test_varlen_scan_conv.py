"""Packed rows (``cu_seqlens`` / ``seq_idx``, kernels/_varlen.py) in the Mamba-1 selective scan and the causal conv1d,
every backend (ref, chunked, triton): a packed call must equal running each sequence alone.

The truth is the float64 reference run on every sequence by itself (its own slice of the inputs, its own row of
the initial states), the outputs concatenated and the final states stacked. Compared: the output, the final
states (N rows) and the gradients of every input, the per-sequence initial states included, through a loss
that reads both the output and the final states (or the output alone). float64 runs must agree to 1e-12;
float32 ones to the tolerances of the existing kernel tests (relative: outputs / states 1e-5, gradients 1e-4;
the conv's states hold raw inputs and are exact). Triton runs through its interpreter on CPU tensors (the
conftest sets TRITON_INTERPRET=1 when there is no GPU) with tiny shapes and few cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlab.kernels as K
from seqlab.kernels import KernelInputError
from seqlab.kernels._triton import interpreting, triton_available
from seqlab.kernels._varlen import seq_idx_from_cu_seqlens
from seqlab.kernels.conv1d.chunked import causal_conv1d_chunked
from seqlab.kernels.conv1d.ref import causal_conv1d_ref
from seqlab.kernels.scan.chunked import selective_scan_chunked
from seqlab.kernels.scan.ref import selective_scan_ref
from seqlab.testing import assert_rel, channels_last, scan_inputs, vectorised_generic_scan

TRITON = triton_available()
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
F64_TOL = 1e-12
OUT_TOL = 1e-5
GRAD_TOL = 1e-4
SEQ = ("u", "delta", "B", "C", "z")  # the scan inputs with a length dim (last)
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton kernels cannot run here")


_vectorised_generic_scan = vectorised_generic_scan


@pytest.fixture(autouse=True, scope="module")
def _fast_interpreter_scan():
    if not (TRITON and interpreting()):
        yield
        return
    from triton.runtime import interpreter

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.ScanOps, "generic_scan", _vectorised_generic_scan)
        yield


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)


def _loss_and_grads(out, final, leaves, seed, with_final=True):
    """Gradients of sum(y * gy) (+ sum(final * gf)) with fixed random gy / gf (float64, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    loss = (out * gy).sum()
    if with_final:
        gf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final)
        loss = loss + (final * gf).sum()
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {k: (torch.zeros_like(leaves[k]) if g is None else g) for k, g in zip(names, grads)}


def _leaves(inputs, dtype):
    return {
        k: None if v is None else v.detach().to(DEVICE, dtype).requires_grad_(v.is_floating_point())
        for k, v in inputs.items()
    }


# ------------------------------------------------------------------------------------------------- the scan


def scan_case(lengths, *, gB=None, gC=None, D=True, z=True, bias=True, init=True, seed=0, d=4, n=3):
    """Packed scan inputs (batch 1): the usual random inputs, initial_state (N, d, n)."""
    l = int(sum(lengths))
    inputs = scan_inputs(1, d, n, l, gB=gB, gC=gC, D=D, z=z, bias=bias, init=False, dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs["initial_state"] = torch.randn(len(lengths), d, n, generator=gen, dtype=torch.float64) if init else None
    return inputs


def scan_alone(leaves, cu, softplus):
    """The truth: the float64 reference on every sequence alone."""
    cu = cu.tolist()
    ys, finals = [], []
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        part = {k: (v[..., s:e] if k in SEQ and v is not None else v) for k, v in leaves.items()}
        h0 = leaves["initial_state"]
        part["initial_state"] = None if h0 is None else h0[i : i + 1]
        part = {k: (None if v is None else v.to(torch.float64)) for k, v in part.items()}
        y, f = selective_scan_ref(**part, delta_softplus=softplus, return_final_state=True)
        ys.append(y)
        finals.append(f)
    return torch.cat(ys, dim=-1), torch.cat(finals, dim=0)


def check_scan(run, inputs, lengths, *, dtype, softplus=True, with_final=True, seed=0):
    """``run(cu_seqlens=..., **leaves)`` -> (y, final) against ``scan_alone``: values and gradients."""
    cu = cu_of(lengths)
    truth_leaves = _leaves(inputs, torch.float64)
    want_y, want_f = scan_alone(truth_leaves, cu, softplus)
    want_g = _loss_and_grads(want_y, want_f, truth_leaves, seed, with_final)
    leaves = _leaves(inputs, dtype)
    y, final = run(cu_seqlens=cu.to(DEVICE), delta_softplus=softplus, **leaves)
    assert final.shape == (len(lengths), *want_f.shape[1:])
    got_g = _loss_and_grads(y, final, leaves, seed, with_final)
    with torch.no_grad():  # the inference path (no autograd) must give the same numbers
        y_ng, f_ng = run(cu_seqlens=cu.to(DEVICE), delta_softplus=softplus, **leaves)
    out_tol = F64_TOL if dtype == torch.float64 else OUT_TOL
    grad_tol = F64_TOL if dtype == torch.float64 else GRAD_TOL
    for what, got, want in (("y", y, want_y), ("final", final, want_f), ("y no_grad", y_ng, want_y)):
        assert_rel(got, want, out_tol, what)
    assert_rel(f_ng, want_f, out_tol, "final no_grad")
    assert set(got_g) == set(want_g)
    for k in want_g:
        assert_rel(got_g[k], want_g[k], grad_tol, f"grad {k}")


def run_dispatch(op, backend, **fixed):
    def run(**kw):
        return getattr(K, op)(**kw, **fixed, return_final_state=True, backend=backend)

    return run


lengths_st = st.lists(st.integers(1, 13), min_size=1, max_size=5)


@settings(max_examples=12, deadline=None)
@given(
    lengths=lengths_st,
    init=st.booleans(),
    with_final=st.booleans(),
    grouped=st.booleans(),
    seed=st.integers(0, 99),
)
def test_scan_ref_and_chunked_match_each_sequence_alone(lengths, init, with_final, grouped, seed):
    """float64 ref / chunked and float32 chunked (blocks of 2 chunks of 4 positions, so starts, ends and block
    edges fall everywhere) against each sequence alone."""
    groups = dict(gB=2, gC=4) if grouped else {}
    inputs = scan_case(lengths, init=init, seed=seed, **groups)
    check_scan(run_dispatch("selective_scan", "ref"), inputs, lengths, dtype=torch.float64, with_final=with_final)
    tiny = dict(chunk_size=4, block_elems=4 * 3 * 4 * 2)  # b d n T C: 2 chunks of 4 per block

    def chunked(**kw):
        return selective_scan_chunked(**kw, return_final_state=True, **tiny)

    check_scan(chunked, inputs, lengths, dtype=torch.float64, with_final=with_final, seed=seed)
    check_scan(chunked, inputs, lengths, dtype=torch.float32, with_final=with_final, seed=seed)


VARIANTS = [
    dict(),  # B / C (b, n, l), z, D, delta_bias, softplus, initial states
    dict(gB=2, gC=4),  # grouped B / C with different group counts
    dict(gB=4, gC=4, z=False, D=False, bias=False, softplus=False),
    dict(z=False, init=False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "grouped", "bare", "no-z-no-init"])
def test_scan_chunked_variants_default_tiling(variant):
    """The dispatcher's chunked path with its default tiling (one block), every Mamba-1 option."""
    variant = dict(variant)
    softplus = variant.pop("softplus", True)
    lengths = [5, 1, 17, 2]
    inputs = scan_case(lengths, **variant)
    run = run_dispatch("selective_scan", "chunked")
    check_scan(run, inputs, lengths, dtype=torch.float32, softplus=softplus)


@needs_triton
@settings(max_examples=2, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=4), init=st.booleans(), seed=st.integers(0, 99))
def test_scan_triton_matches_each_sequence_alone(lengths, init, seed):
    """float32 Triton (chunks of 8 positions) against each sequence alone: starts / ends inside chunks and on
    their edges, with and without initial states."""
    inputs = scan_case(lengths, init=init, seed=seed, gB=2, d=2, n=2)
    from seqlab.kernels.scan.triton_ops import selective_scan_triton

    def run(**kw):
        return selective_scan_triton(**kw, return_final_state=True, block_l=8)

    check_scan(run, inputs, lengths, dtype=torch.float32, seed=seed)


@needs_triton
def test_scan_triton_bare_float64():
    """The dispatcher's Triton path on the bare scan (no z / D / delta_bias / softplus; B and C with 2 groups),
    float64 (exact), the output alone in the loss (the initial states get their gradient through y)."""
    variant = dict(VARIANTS[2], gB=2, gC=2, d=2, n=2)
    softplus = variant.pop("softplus")
    lengths = [3, 9, 1, 6]
    inputs = scan_case(lengths, **variant)
    check_scan(
        run_dispatch("selective_scan", "triton"),
        inputs,
        lengths,
        dtype=torch.float64,
        softplus=softplus,
        with_final=False,
    )


def test_scan_chunked_position_major_inputs():
    """u / delta / z stored position-major (as a Mamba mixer hands them over) take the chunked path's other work
    layout; packed rows must not care."""
    lengths = [6, 1, 9]
    inputs = scan_case(lengths)

    def run(**kw):
        for k in ("u", "delta", "z"):
            kw[k] = channels_last(kw[k])
        assert kw["u"].stride(1) == 1
        return selective_scan_chunked(**kw, return_final_state=True, chunk_size=4)

    check_scan(run, inputs, lengths, dtype=torch.float32)


def test_scan_one_sequence_is_the_unpacked_call():
    """cu_seqlens = [0, l] is the plain call (to rounding: the initial state enters through the drive)."""
    inputs = scan_case([11])
    leaves = {k: None if v is None else v.float() for k, v in inputs.items()}
    a = selective_scan_chunked(**leaves, delta_softplus=True, return_final_state=True, cu_seqlens=cu_of([11]))
    b = selective_scan_chunked(**leaves, delta_softplus=True, return_final_state=True)
    for got, want in zip(a, b):
        assert_rel(got, want, 1e-6, "one sequence")


# ------------------------------------------------------------------------------------------------- the conv


def conv_case(lengths, w, *, bias=True, init=True, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "x": r(1, d, int(sum(lengths))),
        "weight": r(d, w),
        "bias": r(d) if bias else None,
        "initial_state": r(len(lengths), d, w - 1) if init else None,
    }


def conv_alone(leaves, cu, activation):
    """The truth: the float64 reference on every sequence alone (a sequence shorter than w - 1 keeps part of its
    initial state in its final state)."""
    cu = cu.tolist()
    ys, finals = [], []
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        h0 = leaves["initial_state"]
        y, f = causal_conv1d_ref(
            leaves["x"][..., s:e].double(),
            leaves["weight"].double(),
            None if leaves["bias"] is None else leaves["bias"].double(),
            activation,
            None if h0 is None else h0[i : i + 1].double(),
            return_final_state=True,
        )
        ys.append(y)
        finals.append(f)
    return torch.cat(ys, dim=-1), torch.cat(finals, dim=0)


def check_conv(run, inputs, lengths, *, dtype, activation="silu", with_final=True, seed=0):
    cu = cu_of(lengths)
    truth_leaves = _leaves(inputs, torch.float64)
    want_y, want_f = conv_alone(truth_leaves, cu, activation)
    want_g = _loss_and_grads(want_y, want_f, truth_leaves, seed, with_final)
    leaves = _leaves(inputs, dtype)
    y, final = run(cu_seqlens=cu.to(DEVICE), activation=activation, **leaves)
    assert final.shape == want_f.shape and final.dtype == dtype
    got_g = _loss_and_grads(y, final, leaves, seed, with_final)
    with torch.no_grad():
        y_ng, f_ng = run(cu_seqlens=cu.to(DEVICE), activation=activation, **leaves)
    out_tol = F64_TOL if dtype == torch.float64 else OUT_TOL
    grad_tol = F64_TOL if dtype == torch.float64 else GRAD_TOL
    assert_rel(y, want_y, out_tol, "y")
    assert_rel(y_ng, want_y, out_tol, "y no_grad")
    assert torch.equal(final.detach(), want_f.detach().to(dtype))  # raw inputs: exact
    assert torch.equal(f_ng, want_f.detach().to(dtype))
    for k in want_g:
        assert_rel(got_g[k], want_g[k], grad_tol, f"grad {k}")


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    w=st.integers(1, 4),
    init=st.booleans(),
    bias=st.booleans(),
    silu=st.booleans(),
    with_final=st.booleans(),
    seed=st.integers(0, 99),
)
def test_conv_ref_and_chunked_match_each_sequence_alone(lengths, w, init, bias, silu, with_final, seed):
    inputs = conv_case(lengths, w, init=init, bias=bias, seed=seed)
    act = "silu" if silu else None
    check_conv(run_dispatch("causal_conv1d", "ref"), inputs, lengths, dtype=torch.float64, activation=act)
    for dtype in (torch.float64, torch.float32):

        def chunked(**kw):
            return causal_conv1d_chunked(**kw, return_final_state=True, block_elems=3 * 4)  # blocks of 4 positions

        check_conv(chunked, inputs, lengths, dtype=dtype, activation=act, with_final=with_final, seed=seed)


@needs_triton
@settings(max_examples=4, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    w=st.integers(2, 4),
    init=st.booleans(),
    seed=st.integers(0, 99),
)
def test_conv_triton_matches_each_sequence_alone(lengths, w, init, seed):
    inputs = conv_case(lengths, w, init=init, seed=seed)
    from seqlab.kernels.conv1d.triton_ops import causal_conv1d_triton

    def run(**kw):
        return causal_conv1d_triton(**kw, return_final_state=True, block_l=16, block_d=2)

    check_conv(run, inputs, lengths, dtype=torch.float32, seed=seed)
    check_conv(run_dispatch("causal_conv1d", "triton"), inputs, lengths, dtype=torch.float64, activation=None)


# ------------------------------------------------------------------------------------------------- spellings, errors


def test_seq_idx_spelling_equals_cu_seqlens():
    lengths = [4, 1, 6]
    cu = cu_of(lengths)
    seq_idx = seq_idx_from_cu_seqlens(cu)
    inputs = {k: None if v is None else v.float() for k, v in scan_case(lengths).items()}
    a = K.selective_scan(**inputs, delta_softplus=True, return_final_state=True, cu_seqlens=cu, backend="chunked")
    b = K.selective_scan(**inputs, delta_softplus=True, return_final_state=True, seq_idx=seq_idx, backend="chunked")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    conv = {k: None if v is None else v.float() for k, v in conv_case(lengths, 4).items()}
    a = K.causal_conv1d(**conv, activation="silu", return_final_state=True, cu_seqlens=cu, backend="chunked")
    b = K.causal_conv1d(**conv, activation="silu", return_final_state=True, seq_idx=seq_idx, backend="chunked")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


BACKENDS = ["ref", "chunked"] + (["triton"] if TRITON else [])

BAD_CU = [
    ("batch 2", lambda l: cu_of([l]), 2, "batch"),
    ("not ending at l", lambda l: torch.tensor([0, 3, l - 1]), 1, "length"),
    ("empty sequence", lambda l: torch.tensor([0, 3, 3, l]), 1, "strictly increasing"),
    ("float dtype", lambda l: torch.tensor([0.0, 3.0, float(l)]), 1, "integer"),
]


def _scan_call(backend, b, l, cu, init_rows=2, **extra):
    inputs = {k: None if v is None else v.float() for k, v in scan_case([3, l - 3]).items()}
    if b != 1:
        inputs = {k: (torch.cat([v] * b) if k in SEQ and v is not None else v) for k, v in inputs.items()}
    inputs["initial_state"] = torch.zeros(init_rows, 4, 3)
    return K.selective_scan(**inputs, return_final_state=True, cu_seqlens=cu, backend=backend, **extra)


def _conv_call(backend, b, l, cu, init_rows=2, **extra):
    conv = {k: None if v is None else v.float() for k, v in conv_case([3, l - 3], 4).items()}
    conv["x"] = torch.cat([conv["x"]] * b)
    conv["initial_state"] = torch.zeros(init_rows, 3, 3)
    return K.causal_conv1d(**conv, return_final_state=True, cu_seqlens=cu, backend=backend, **extra)


@pytest.mark.parametrize("call", [_scan_call, _conv_call], ids=["scan", "conv"])
@pytest.mark.parametrize("case", BAD_CU, ids=[c[0] for c in BAD_CU])
def test_bad_cu_seqlens_is_named(call, case):
    _, make, b, words = case
    with pytest.raises(KernelInputError, match=words):
        call("chunked", b, 8, make(8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", [_scan_call, _conv_call], ids=["scan", "conv"])
def test_initial_state_with_batch_rows_is_refused(call, backend):
    """Packed rows: initial_state needs one row per sequence (N = 2 here), not one per batch row (1)."""
    with pytest.raises(KernelInputError, match=r"initial_state.*one row per sequence.*N = 2"):
        call(backend, 1, 8, cu_of([3, 5]), init_rows=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_implementations_check_cu_seqlens_themselves(backend):
    """Called directly (not through the dispatcher), each implementation still checks cu_seqlens."""
    from seqlab.kernels._dispatch import implementation

    inputs = {k: None if v is None else v.float() for k, v in scan_case([3, 5]).items()}
    with pytest.raises(KernelInputError, match="cu_seqlens"):
        implementation("selective_scan", backend)(**inputs, cu_seqlens=torch.tensor([0, 3, 7]))
    conv = {k: None if v is None else v.float() for k, v in conv_case([3, 5], 4).items()}
    with pytest.raises(KernelInputError, match="cu_seqlens"):
        implementation("causal_conv1d", backend)(**conv, cu_seqlens=torch.tensor([0, 3, 3, 8]))


@pytest.mark.parametrize("call", [_scan_call, _conv_call], ids=["scan", "conv"])
def test_states_at_with_packing_is_refused(call):
    with pytest.raises(KernelInputError, match="states_at"):
        call("chunked", 1, 8, cu_of([3, 5]), states_at=[2])


@pytest.mark.parametrize("call", [_scan_call, _conv_call], ids=["scan", "conv"])
def test_both_spellings_at_once_are_refused(call):
    """The dispatcher takes cu_seqlens or seq_idx; both at once is refused before any backend runs."""
    with pytest.raises(KernelInputError, match="cu_seqlens or seq_idx, not both"):
        call("chunked", 1, 8, cu_of([3, 5]), seq_idx=torch.tensor([[0] * 3 + [1] * 5]))


@needs_triton
def test_conv_triton_many_short_sequences_position_major():
    """Triton conv: more (sequence, slot) columns than one tile (the final / initial-state tiles loop), sequences
    shorter than w - 1, a backward split over several programs, and a position-major x (a mixer's layout)."""
    from seqlab.kernels.conv1d.triton_ops import causal_conv1d_triton

    lengths = [1, 2, 5, 1, 3, 4]
    inputs = conv_case(lengths, 4)
    inputs["x"] = channels_last(inputs["x"])

    def run(**kw):
        assert kw["x"].stride(1) == 1  # position-major
        return causal_conv1d_triton(**kw, return_final_state=True, block_l=8, block_d=4, bwd_chunk=1)

    check_conv(run, inputs, lengths, dtype=torch.float32)
