"""The Mamba-1 selective scan's sequential-walk Triton forward (``_ss_fwd_walk_kernel``, the default forward of
``selective_scan_triton``) against the float64 sequential reference, and against the chunk-tile forward it
replaced (``fwd_kernel="tile"``, kept for side-by-side GPU timing).

test_triton_selective_scan.py runs its whole matrix on the default forward (the walk); this file covers what is
particular to the walk: its own tiling knobs (positions unrolled per step, channels per program) at odd lengths,
the chunk states it stores for the unchanged backward (gradients of every input, the initial state included),
packed rows, bf16 / float64, the position-major layout a Mamba mixer passes, and the tile forward still agreeing.
Runs on CUDA when present, else on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), where the walk costs a few milliseconds per position and program: lengths stay small.

Tolerances (max-abs-diff / max-abs(reference)) as in test_triton_selective_scan.py: float32 1e-5 (outputs,
states), 1e-4 (gradients); bf16 8e-3 (4x for gradients); float64 1e-12.
"""

from __future__ import annotations

import pytest
import torch

from seqlab.kernels import KernelInputError
from seqlab.kernels._triton import interpreting, triton_available
from seqlab.kernels.scan.ref import selective_scan_ref
from seqlab.testing import as_f64, assert_rel, channels_last, scan_inputs, vectorised_generic_scan

if not triton_available():  # pragma: no cover - triton is a dev dependency; the conftest enables the interpreter
    pytest.skip(
        "Triton kernels cannot run here (no triton, or no CUDA and no TRITON_INTERPRET)", allow_module_level=True
    )

from seqlab.kernels.scan.triton_ops import FORWARD_KERNELS, selective_scan_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _fast_interpreter_scan():
    """Under the interpreter, the backward's tl.associative_scan runs as seqlab.testing.vectorised_generic_scan
    (bitwise the interpreter's own fold, ~10x faster; see test_triton_selective_scan.py)."""
    if not interpreting():
        yield
        return
    from triton.runtime import interpreter

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.ScanOps, "generic_scan", vectorised_generic_scan)
        yield


OUT_TOL = 1e-5
GRAD_TOL = 1e-4
BF16_TOL = 8e-3


def make_inputs(**kwargs):
    return {k: (None if v is None else v.to(DEVICE)) for k, v in scan_inputs(**kwargs).items()}


def reference(inputs, softplus, *, cu_seqlens=None):
    return selective_scan_ref(
        **{k: as_f64(v) for k, v in inputs.items()},
        delta_softplus=softplus,
        return_final_state=True,
        cu_seqlens=cu_seqlens,
    )


def check_grads(inputs, softplus, tol=GRAD_TOL, out_tol=OUT_TOL, cu_seqlens=None, **tiling):
    """Outputs, final state and the gradients of every input (through both) against the reference."""
    names = [k for k, v in inputs.items() if v is not None]
    ref_in = {k: (as_f64(v).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref_out, ref_state = selective_scan_ref(
        **ref_in, delta_softplus=softplus, return_final_state=True, cu_seqlens=cu_seqlens
    )
    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    g_state = torch.randn(ref_state.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ref_grads = torch.autograd.grad(
        (ref_out * g_out).sum() + (ref_state * g_state).sum(), [ref_in[k] for k in names], allow_unused=True
    )
    fast_in = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out, state = selective_scan_triton(
        **fast_in, delta_softplus=softplus, return_final_state=True, cu_seqlens=cu_seqlens, **tiling
    )
    assert_rel(out, ref_out, out_tol, f"out (autograd forward), {tiling}")
    assert_rel(state, ref_state, OUT_TOL, f"final state (autograd forward), {tiling}")
    loss = (out.double() * g_out).sum() + (state.double() * g_state).sum()
    grads = torch.autograd.grad(loss, [fast_in[k] for k in names], allow_unused=True)
    for k, g, rg in zip(names, grads, ref_grads):
        if rg is None:
            assert g is None or g.abs().max() == 0, k
            continue
        assert g is not None and g.shape == inputs[k].shape and g.dtype == inputs[k].dtype, k
        assert_rel(g, rg, tol, f"grad of {k}, {tiling}")


# ------------------------------------------------------------------------------------ forward against the reference

# (l, inputs, softplus, tiling): odd lengths around the unroll (walk_chunk) and the stored-state chunk (block_l),
# channel blocks that split a group unevenly, B / C groups with different counts, every option on and off
WALK_CASES = [
    (1, dict(gB=2, gC=2), True, dict(walk_chunk=4, block_l=4)),
    (3, dict(D=False, z=False, bias=False, positive_delta=True), False, dict(walk_chunk=2, block_l=2)),
    (7, dict(gB=4, gC=2, bias=False), True, dict(walk_chunk=4, block_l=2, block_d=1)),
    (37, dict(gB=2, gC=None, init=False), True, dict(walk_chunk=8, block_l=4, block_d=2)),
    (19, dict(d=6, n=5, gB=3, gC=2), True, dict(walk_chunk=16, block_l=8, block_d=2)),
]


@pytest.mark.parametrize("l, kw, softplus, tiling", WALK_CASES, ids=[f"l{c[0]}-{i}" for i, c in enumerate(WALK_CASES)])
def test_walk_matches_reference(l, kw, softplus, tiling):
    """No-grad forward (no chunk states stored) and the autograd forward + the unchanged backward."""
    inputs = make_inputs(l=l, seed=100 + l, **kw)
    ref_out, ref_state = reference(inputs, softplus)
    with torch.no_grad():
        out, state = selective_scan_triton(**inputs, delta_softplus=softplus, return_final_state=True, **tiling)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert_rel(out, ref_out, OUT_TOL, "out")
    assert_rel(state, ref_state, OUT_TOL, "final state")
    check_grads(inputs, softplus, **tiling)


def test_walk_and_tile_forwards_agree_and_feed_one_backward():
    """Both forwards give the same outputs, final state and (through the chunk states each stores for the
    backward) the same gradients, including the initial state's."""
    inputs = make_inputs(l=21, seed=5, gB=2, gC=2)
    assert set(FORWARD_KERNELS) == {"walk", "tile"}
    results = {}
    for kernel in FORWARD_KERNELS:
        fast_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, state = selective_scan_triton(
            **fast_in, delta_softplus=True, return_final_state=True, block_l=8, fwd_kernel=kernel
        )
        (out.square().sum() + state.sin().sum()).backward()
        results[kernel] = (out.detach(), state.detach(), {k: v.grad for k, v in fast_in.items()})
    (wo, ws, wg), (to, ts, tg) = results["walk"], results["tile"]
    assert_rel(wo, to, OUT_TOL, "out")
    assert_rel(ws, ts, OUT_TOL, "state")
    for k in inputs:
        assert_rel(wg[k], tg[k], GRAD_TOL, f"grad of {k}")
    assert wg["initial_state"].abs().max() > 0


def test_long_walk_many_unrolled_steps():
    """l = 200 over steps of 8 positions (25 steps, the last partly past the end) with chunk states every 4."""
    inputs = make_inputs(b=1, d=2, n=2, l=200, seed=9)
    check_grads(inputs, True, walk_chunk=8, block_l=4)


def test_float64_is_exact():
    inputs = {k: as_f64(v) for k, v in make_inputs(l=19, seed=11, gB=2).items()}
    ref_out, ref_state = reference(inputs, True)
    out, state = selective_scan_triton(**inputs, delta_softplus=True, return_final_state=True, walk_chunk=4)
    assert out.dtype == state.dtype == torch.float64
    assert_rel(out, ref_out, 1e-12, "out")
    assert_rel(state, ref_state, 1e-12, "state")
    check_grads(inputs, True, tol=1e-12, out_tol=1e-12, walk_chunk=4, block_l=4)


def test_bf16_inputs():
    """bf16 activations (A, D, delta_bias fp32 as in a Mamba mixer): bf16 output, fp32 state, within a bf16 ulp."""
    inputs = make_inputs(l=23, seed=12, gB=2, gC=2, dtype=torch.bfloat16)
    for k in ("A", "D", "delta_bias", "initial_state"):
        inputs[k] = inputs[k].float()
    ref_out, ref_state = reference(inputs, True)
    with torch.no_grad():
        out, state = selective_scan_triton(**inputs, delta_softplus=True, return_final_state=True, walk_chunk=8)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_rel(out, ref_out, BF16_TOL, "out")
    assert_rel(state, ref_state, BF16_TOL, "state")
    check_grads(inputs, True, tol=4 * BF16_TOL, out_tol=BF16_TOL, walk_chunk=8, block_l=8)


def test_position_major_layout():
    """u / delta / z position-major (the transposes a Mamba-1 mixer passes), B / C (.., n, l) views of (.., l, n):
    same results, and the output keeps u's layout."""
    inputs = make_inputs(l=17, seed=13, gB=2, gC=2)
    moved = dict(inputs)
    for k in ("u", "delta", "z"):
        moved[k] = channels_last(inputs[k])
    for k in ("B", "C"):
        moved[k] = inputs[k].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert moved["u"].stride(1) == 1
    with torch.no_grad():
        out, state = selective_scan_triton(**moved, delta_softplus=True, return_final_state=True, walk_chunk=4)
    ref_out, ref_state = reference(inputs, True)
    assert out.stride(1) == 1
    assert_rel(out, ref_out, OUT_TOL, "out")
    assert_rel(state, ref_state, OUT_TOL, "state")
    check_grads(moved, True, walk_chunk=4, block_l=4)


# ------------------------------------------------------------------------------------ packed rows


def _packed(lengths, seed, init=True):
    total = sum(lengths)
    inputs = make_inputs(b=1, d=3, n=2, l=total, seed=seed, gB=None, gC=None, init=False)
    if init:
        gen = torch.Generator().manual_seed(seed + 1)
        inputs["initial_state"] = torch.randn(len(lengths), 3, 2, generator=gen).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return inputs, cu


@pytest.mark.parametrize("init", [True, False])
def test_packed_rows_equal_each_sequence_alone(init):
    """Sequences of odd lengths packed in one row (starts / ends inside and on the edges of the unrolled steps):
    each sequence's outputs and final state are those of that sequence run alone by the reference."""
    lengths = [5, 1, 8, 3]
    inputs, cu = _packed(lengths, seed=21, init=init)
    with torch.no_grad():
        out, finals = selective_scan_triton(
            **inputs, delta_softplus=True, return_final_state=True, cu_seqlens=cu, walk_chunk=4, block_l=4
        )
    assert finals.shape == (len(lengths), 3, 2)
    for i, (s0, s1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = {k: (v[..., s0:s1] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
        alone["initial_state"] = None if not init else inputs["initial_state"][i : i + 1]
        ref_out, ref_state = reference(alone, True)
        assert_rel(out[..., s0:s1], ref_out, OUT_TOL, f"sequence {i} out")
        assert_rel(finals[i : i + 1], ref_state, OUT_TOL, f"sequence {i} final state")


def test_packed_rows_gradients():
    """Gradients of every input, the per-sequence initial states included, against the packed reference."""
    inputs, cu = _packed([4, 7, 2], seed=23)
    check_grads(inputs, True, cu_seqlens=cu, walk_chunk=4, block_l=2)


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fwd_kernel="scan"), "fwd_kernel must be one of"),
        (dict(walk_chunk=0), "walk_chunk must be a positive int"),
        (dict(walk_chunk=2.0), "walk_chunk must be a positive int"),
    ],
)
def test_bad_forward_options(kwargs, message):
    inputs = make_inputs(l=3, seed=1)
    with pytest.raises(KernelInputError, match=message):
        selective_scan_triton(**inputs, delta_softplus=True, **kwargs)
