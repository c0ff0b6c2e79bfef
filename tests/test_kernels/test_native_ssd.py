"""The compiled CPU Mamba-2 SSD kernels (``backend="native"``, kernels/csrc/ssd.c) against the sequential reference.

Truth: ``ssd_scan_ref`` in float64. The native kernel in float64 must match it to ~1e-12 (the same recurrence, a
different summation order), in float32 to 1e-5 (outputs, states) and 1e-4 (gradients), on the same
float32-representable inputs. Gradients are those of <y, wy> + <final, wf> with respect to every input, the
initial state, dt_bias and D (both shapes) included. Two kinds of shapes: tiny odd ones (p = 3, n = 5), which run
the kernel's generic loops, and p = 16, n = 32, which run its vector paths (float32 and float64).
"""

from __future__ import annotations

import pytest
import torch

import seqlab.kernels as K
from seqlab.kernels import KernelInputError
from seqlab.kernels._dispatch import NATIVE_SOURCES, resolve_backend
from seqlab.kernels._native import native_available
from seqlab.kernels.ssd.chunked import ssd_scan_chunked, ssd_state_update_chunked
from seqlab.kernels.ssd.native_ops import ssd_scan_native, ssd_state_update_native
from seqlab.kernels.ssd.ref import ssd_scan_ref, ssd_state_update_ref
from seqlab.testing import assert_rel, strided, tiny_lm

pytestmark = pytest.mark.skipif(not native_available("ssd.c"), reason="the C kernels cannot be built here")

INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
F64_TOL = 1e-12
OUT_TOL = 1e-5
GRAD_TOL = 1e-4


def make_inputs(b=2, l=37, h=4, p=3, g=2, n=5, *, D="h", z=True, dt_bias=True, softplus=True, init=True, seed=0):
    """float64 SSD inputs (keyword arguments of ssd_scan, chunk_size excluded)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    if softplus:
        dt = rnd(b, l, h, scale=0.7) - 1.0
    else:
        dt = torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    return dict(
        x=rnd(b, l, h, p),
        dt=dt,
        A=-(torch.rand(h, generator=gen, dtype=torch.float64) * 2.7 + 0.3),
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
        D={"h": rnd(h), "hp": rnd(h, p), None: None}[D],
        z=rnd(b, l, h, p) if z else None,
        dt_bias=rnd(h, scale=0.5) if dt_bias else None,
        dt_softplus=softplus,
        initial_state=rnd(b, h, p, n) if init else None,
    )


def run(fn, inputs: dict, dtype=torch.float64, seed=1, **extra):
    """(y, final, {name: grad}) of fn on ``inputs`` cast to ``dtype``, for the loss <y, wy> + <final, wf> (the
    weights drawn from ``seed``, so that two runs with one seed use the same loss)."""
    leaves = {
        k: (v.to(dtype).clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()
    }
    y, final = fn(chunk_size=8, return_final_state=True, **leaves, **extra)
    gen = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    wf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    ((y * wy).sum() + (final * wf).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}
    return y.detach(), final.detach(), grads


def compare(got, want, out_tol, grad_tol, what=""):
    y, final, grads = got
    y_ref, final_ref, grads_ref = want
    assert y.shape == y_ref.shape and final.shape == final_ref.shape
    assert_rel(y, y_ref, out_tol, f"{what} y")
    assert_rel(final, final_ref, out_tol, f"{what} final state")
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert grads[name] is not None, f"{what}: no gradient for {name}"
        assert grads[name].shape == grads_ref[name].shape, name
        assert_rel(grads[name], grads_ref[name], grad_tol, f"{what} d{name}")


# ------------------------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("l", [1, 3, 7, 37, 130])
def test_float64_matches_reference_odd_lengths(l):
    inputs = make_inputs(l=l)
    compare(run(ssd_scan_native, inputs), run(ssd_scan_ref, inputs), F64_TOL, F64_TOL, f"l={l}")


@pytest.mark.parametrize(
    "options",
    [
        dict(D="hp"),
        dict(D=None),
        dict(z=False),
        dict(init=False),
        dict(dt_bias=False),
        dict(softplus=False),
        dict(g=1),
        dict(g=4),
        dict(b=1, h=2, g=1, z=False, init=False, dt_bias=False, D=None),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_float64_options(options):
    inputs = make_inputs(l=45, **options)
    compare(run(ssd_scan_native, inputs), run(ssd_scan_ref, inputs), F64_TOL, F64_TOL, str(options))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("D", ["h", "hp"])
def test_vector_paths(dtype, D):
    """p = 16, n = 32: the kernel's vector loops (forward and backward) in both precisions; l = 150 spans several
    backward blocks."""
    inputs = make_inputs(b=1, l=150, h=4, p=16, g=2, n=32, D=D)
    tol = (F64_TOL, F64_TOL) if dtype == torch.float64 else (OUT_TOL, GRAD_TOL)
    compare(run(ssd_scan_native, inputs, dtype), run(ssd_scan_ref, inputs), *tol, f"{dtype} D={D}")


@pytest.mark.parametrize("l", [1, 7, 130])
def test_float32_matches_reference_and_chunked(l):
    inputs = {k: (v.float().double() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(l=l).items()}
    native = run(ssd_scan_native, inputs, torch.float32)
    compare(native, run(ssd_scan_ref, inputs), OUT_TOL, GRAD_TOL, "float32 vs ref")
    compare(native, run(ssd_scan_chunked, inputs, torch.float32), OUT_TOL, GRAD_TOL, "float32 vs chunked")
    assert native[0].dtype == torch.float32 and native[1].dtype == torch.float32


def test_only_the_final_state_or_only_y_carries_gradient():
    inputs = make_inputs(l=20)
    for pick in (0, 1):
        grads = []
        for fn in (ssd_scan_native, ssd_scan_ref):
            leaves = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            out = fn(chunk_size=8, return_final_state=True, **leaves)
            (out[pick] ** 2).sum().backward()
            grads.append({k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)})
        for name, want in grads[1].items():
            if want is None:  # the final state does not depend on z and D: zeros here, no gradient in ref
                want = torch.zeros_like(inputs[name])
            assert_rel(grads[0][name], want, F64_TOL, f"output {pick} d{name}")


def test_strong_decay_stays_finite():
    """exp(dt A) underflows to 0 (dt A ~ -1000): no NaN or inf in outputs or gradients, and still the reference."""
    inputs = make_inputs(l=30)
    inputs["A"] = torch.full((4,), -400.0, dtype=torch.float64)
    inputs["dt"] = inputs["dt"] + 4.0
    for dtype in (torch.float32, torch.float64):
        y, final, grads = run(ssd_scan_native, inputs, dtype)
        assert torch.isfinite(y).all() and torch.isfinite(final).all()
        assert all(torch.isfinite(g).all() for g in grads.values())
    compare(run(ssd_scan_native, inputs), run(ssd_scan_ref, inputs), F64_TOL, F64_TOL, "strong decay")


def test_bfloat16_inputs():
    inputs = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(l=23).items()}
    y, final = ssd_scan_native(chunk_size=8, return_final_state=True, **inputs)
    y_ref, final_ref = ssd_scan_ref(chunk_size=8, return_final_state=True, **inputs)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_rel(y, y_ref, 1e-2, "bf16 y")  # both round y to bfloat16 from float32 math
    assert_rel(final, final_ref, OUT_TOL, "bf16 final state")
    got, want = run(ssd_scan_native, inputs, torch.bfloat16), run(ssd_scan_ref, inputs, torch.bfloat16)
    for name in want[2]:
        assert got[2][name].dtype == torch.bfloat16
        assert_rel(got[2][name], want[2][name], 2e-2, f"bf16 d{name}")


def test_strided_inputs_and_no_grad():
    """Views with gaps (the mixer passes slices of one projection) give the contiguous results, with and without
    autograd."""
    inputs = make_inputs(l=19)
    views = {k: (strided(v) if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    compare(run(ssd_scan_native, views), run(ssd_scan_ref, inputs), F64_TOL, F64_TOL, "strided")
    with torch.no_grad():
        y, final = ssd_scan_native(chunk_size=8, return_final_state=True, **views)
    y_ref, final_ref = ssd_scan_ref(chunk_size=8, return_final_state=True, **inputs)
    assert_rel(y, y_ref, F64_TOL, "no_grad y")
    assert_rel(final, final_ref, F64_TOL, "no_grad final")


def test_zero_length_and_state_is_a_copy():
    inputs = make_inputs(l=0)
    y, final = ssd_scan_native(chunk_size=8, return_final_state=True, **inputs)
    assert y.shape == (2, 0, 4, 3)
    assert torch.equal(final, inputs["initial_state"]) and final.data_ptr() != inputs["initial_state"].data_ptr()


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_does_not_change_results(threads):
    """dB/dC of heads sharing a group are summed over per-head or per-thread buffers (4 heads per group: per
    thread with 3 threads, per head with 1): the same numbers either way."""
    inputs = make_inputs(l=40, h=4, g=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run(ssd_scan_native, inputs)
    finally:
        torch.set_num_threads(before)
    compare(got, run(ssd_scan_ref, inputs), F64_TOL, F64_TOL, f"threads={threads}")


def test_bad_arguments_are_named():
    inputs = make_inputs(l=5)
    inputs["dt"] = inputs["dt"][:, :, :2]
    with pytest.raises(KernelInputError, match="dt"):
        ssd_scan_native(chunk_size=8, **inputs)
    with pytest.raises(KernelInputError, match="chunk_size"):
        ssd_scan_native(chunk_size=0, **make_inputs(l=5))


# ------------------------------------------------------------------------------------- states_at, packed rows


def test_states_at_matches_reference():
    inputs = make_inputs(l=21)
    positions = [1, 8, 9, 21]
    y, final, states = K.ssd_scan(chunk_size=8, return_final_state=True, states_at=positions, backend="native",
                                  **inputs)  # fmt: skip
    y_ref, final_ref, states_ref = ssd_scan_ref(chunk_size=8, return_final_state=True, states_at=positions, **inputs)
    assert states.shape == (2, 4, 4, 3, 5)
    for got, want, what in ((y, y_ref, "y"), (final, final_ref, "final"), (states, states_ref, "states")):
        assert_rel(got, want, F64_TOL, what)
    y2, states2 = ssd_scan_native(chunk_size=8, states_at=positions, **inputs)  # called directly, too
    assert_rel(states2, states_ref, F64_TOL, "direct states_at")


@pytest.mark.parametrize("init", [True, False])
def test_packed_equals_each_sequence_alone(init):
    lengths = [1, 9, 3, 16, 7]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = make_inputs(b=1, l=sum(lengths), init=False)
    if init:
        inputs["initial_state"] = torch.randn(len(lengths), 4, 3, 5, dtype=torch.float64)
    got = run(ssd_scan_native, inputs, cu_seqlens=cu)

    leaves = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ys, finals = [], []
    for i in range(len(lengths)):
        piece = dict(leaves)
        for k in ("x", "dt", "B", "C", "z"):
            piece[k] = leaves[k][:, cu[i] : cu[i + 1]]
        piece["initial_state"] = leaves["initial_state"][i : i + 1] if init else None
        y_i, f_i = ssd_scan_ref(chunk_size=8, return_final_state=True, **piece)
        ys.append(y_i)
        finals.append(f_i)
    y, final = torch.cat(ys, dim=1), torch.cat(finals)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    wf = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    ((y * wy).sum() + (final * wf).sum()).backward()
    want = (y.detach(), final.detach(), {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)})
    compare(got, want, F64_TOL, F64_TOL, "packed")
    # and the public op with seq_idx spells the same call
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    with torch.no_grad():
        y2, final2 = K.ssd_scan(chunk_size=8, return_final_state=True, seq_idx=seq_idx, backend="native", **inputs)
    assert_rel(y2, want[0], F64_TOL, "seq_idx y")
    assert_rel(final2, want[1], F64_TOL, "seq_idx final")


# ------------------------------------------------------------------------------------------------- decode step


@pytest.mark.parametrize("shape", [dict(p=3, n=5), dict(p=16, n=32)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_update_is_one_scan_step(shape, dtype):
    inputs = {
        k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(l=1, D="hp", **shape).items()
    }
    state = inputs.pop("initial_state")
    step = {k: (v[:, 0] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    state_before = state.clone()
    y, new_state = ssd_state_update_native(state, **step)
    assert torch.equal(state, state_before)  # the state passed in is not modified
    y_scan, final = ssd_scan_native(chunk_size=8, initial_state=state, return_final_state=True, **inputs)
    y_ref, new_ref = ssd_state_update_ref(state, **step)
    tol = F64_TOL if dtype == torch.float64 else OUT_TOL
    assert y.dtype == y_ref.dtype and new_state.dtype == new_ref.dtype
    assert_rel(y, y_ref, tol, "step y")
    assert_rel(new_state, new_ref, tol, "step state")
    assert_rel(y, y_scan[:, 0], tol, "step vs scan y")
    assert_rel(new_state, final, tol, "step vs scan state")


def test_state_update_with_grad_delegates_to_chunked():
    inputs = make_inputs(l=1)
    state = inputs.pop("initial_state").requires_grad_()
    step = {k: (v[:, 0] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    y, new_state = ssd_state_update_native(state, **step)
    y.sum().backward()
    y_c, _ = ssd_state_update_chunked(state.detach(), **step)
    assert_rel(y, y_c, F64_TOL, "step y")
    assert state.grad is not None


# ----------------------------------------------------------------------------------------------- a tiny model


def test_tiny_mamba2_model_native_equals_ref():
    """The whole model in float64 on the native kernels gives the reference's logits, state and gradients. Where
    another op of the model (the conv) has no C kernel here, "auto" runs this one natively and that one chunked."""
    ids = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(3))
    all_native = all(native_available(NATIVE_SOURCES[op]) for op in ("ssd_scan", "causal_conv1d"))
    assert resolve_backend("auto", ids.double(), op="ssd_scan") == "native"
    results = []
    for backend in ("native" if all_native else "auto", "ref"):
        model = tiny_lm("mamba2", vocab=32, seed=1).double().set_backend(backend)
        out = model(ids)
        loss = out.logits.square().mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), out.state, grads))
    (logits, state, grads), (logits_ref, state_ref, grads_ref) = results
    assert_rel(logits, logits_ref, 1e-10, "logits")
    assert set(grads) == set(grads_ref) and grads
    for name in grads_ref:
        assert_rel(grads[name], grads_ref[name], 1e-9, f"d{name}")
    flat = torch.utils._pytree.tree_leaves(state)
    flat_ref = torch.utils._pytree.tree_leaves(state_ref)
    assert len(flat) == len(flat_ref) and flat
    for a, b in zip(flat, flat_ref):
        if isinstance(a, torch.Tensor):
            assert_rel(a, b, 1e-10, "model state")
