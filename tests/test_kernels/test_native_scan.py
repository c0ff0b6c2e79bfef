"""The compiled CPU selective scan (``backend="native"``, csrc/scan.c) against the float64 sequential reference.

float64 runs the C kernel in double with libm's exp and must match the reference to ~1e-12 (outputs, final
states and the gradients of every input, initial_state / delta_bias / D / z included); float32 runs the
vectorised polynomial exp and is compared loosely. Odd lengths straddle the backward's checkpoint interval
(CHECKPOINT = 64) and the channel blocks are left partial by d = 20 (8 or 16 float lanes, 4 or 8 double lanes).
"""

from __future__ import annotations

import pytest
import torch

import seqlab.kernels as K
from seqlab.kernels import _dispatch, _native
from seqlab.kernels.scan import native_ops
from seqlab.kernels.scan.chunked import selective_scan_chunked
from seqlab.kernels.scan.native_ops import selective_scan_native, selective_state_update_native
from seqlab.kernels.scan.ref import selective_scan_ref, selective_state_update_ref
from seqlab.testing import as_f64, assert_rel, channels_last, scan_inputs, strided, tiny_lm

pytestmark = pytest.mark.skipif(not _native.native_available("scan.c"), reason="no C compiler here")

F64 = 1e-12
F32_OUT = 2e-5
F32_GRAD = 1e-4
SEQ = ("u", "delta", "z")  # (b, d, l) inputs (B / C are (b, [g,] n, l))


def _run(fn, x, softplus=True, cu=None, seed=0, grad=True):
    """(out, final, grads by name) of fn on fresh leaves of ``x``, the loss reading out and final."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(grad) for k, v in x.items()}
    out, final = fn(**leaves, delta_softplus=softplus, return_final_state=True, cu_seqlens=cu)
    if not grad:
        return out, final, {}
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    gf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    loss = (out.to(torch.float64) * gy.to(torch.float64)).sum() + (final.to(torch.float64) * gf.to(torch.float64)).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out, final, dict(zip(names, grads))


def _compare(got, want, tol_out, tol_grad, what=""):
    assert_rel(got[0], want[0], tol_out, f"{what} out")
    assert_rel(got[1], want[1], tol_out, f"{what} final state")
    assert set(got[2]) == set(want[2])
    for k in want[2]:
        assert_rel(got[2][k], want[2][k], tol_grad, f"{what} grad {k}")


@pytest.mark.parametrize("l", [1, 3, 7, 37, 130])
def test_float64_matches_the_reference_with_every_gradient(l):
    x = scan_inputs(b=2, d=20, n=5, l=l, dtype=torch.float64, seed=l)
    _compare(_run(selective_scan_native, x), _run(selective_scan_ref, x), F64, F64, f"l={l}")


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("opts", [dict(), dict(D=False, z=False, bias=False, init=False)])
def test_float64_optional_inputs_and_no_softplus(softplus, opts):
    x = scan_inputs(b=1, d=9, n=3, l=70, dtype=torch.float64, positive_delta=not softplus, **opts)
    got, want = _run(selective_scan_native, x, softplus), _run(selective_scan_ref, x, softplus)
    _compare(got, want, F64, F64)


@pytest.mark.parametrize("groups", [(2, 2), (4, 1), (1, 2)])
def test_groups(groups):
    gB, gC = groups
    x = scan_inputs(b=2, d=24, n=4, l=37, gB=gB, gC=gC, dtype=torch.float64)
    _compare(_run(selective_scan_native, x), _run(selective_scan_ref, x), F64, F64)


@pytest.mark.parametrize("l", [3, 130])
def test_float32_matches_the_reference(l):
    x = scan_inputs(b=2, d=40, n=6, l=l, seed=3)
    got = _run(selective_scan_native, x)
    want = _run(selective_scan_ref, {k: as_f64(v) for k, v in x.items()})
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _compare(got, want, F32_OUT, F32_GRAD, "f32")


def test_float32_large_negative_decays_give_zero_not_nan():
    """exp(delta A) far below float range must decay the state to exactly 0 (the fast exp's lower edge)."""
    x = scan_inputs(b=1, d=16, n=4, l=9, a_range=(-400.0, -200.0), positive_delta=True, delta_scale=3.0, bias=False)
    out, final, _ = _run(selective_scan_native, x, softplus=False, grad=False)
    want = _run(selective_scan_ref, {k: as_f64(v) for k, v in x.items()}, softplus=False, grad=False)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert_rel(out, want[0], F32_OUT, "out")
    assert_rel(final, want[1], F32_OUT, "final")


def test_mixer_layout_and_strided_inputs_are_read_in_place():
    """The Mamba-1 mixer passes u / delta / z as transposes of contiguous (b, l, d) and B / C as (b, n, l) views
    of a (b, l, k) projection; the output keeps u's layout."""
    b, d, n, l = 2, 20, 4, 37
    x = scan_inputs(b=b, d=d, n=n, l=l, dtype=torch.float64)
    want = _run(selective_scan_ref, x)
    proj = torch.randn(b, l, 3 + 2 * n, dtype=torch.float64)
    proj[:, :, 3 : 3 + n] = x["B"].transpose(1, 2)
    proj[:, :, 3 + n :] = x["C"].transpose(1, 2)
    y = dict(x)
    y.update({k: channels_last(x[k]) for k in SEQ})
    y["B"], y["C"] = proj[:, :, 3 : 3 + n].transpose(1, 2), proj[:, :, 3 + n :].transpose(1, 2)
    y["A"] = strided(x["A"])
    got = _run(selective_scan_native, y)
    assert got[0].stride(1) == 1  # position-major like u
    _compare(got, want, F64, F64, "mixer layout")


def test_bf16_inputs():
    x = scan_inputs(b=1, d=16, n=4, l=37, dtype=torch.bfloat16)
    out, final, grads = _run(selective_scan_native, x)
    ref_out, ref_final, _ = _run(selective_scan_ref, x, grad=False)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_rel(out.float(), ref_out.float(), 2e-2, "bf16 out")
    assert_rel(final, ref_final, 1e-4, "bf16 final")
    assert all(g.dtype == x[k].dtype for k, g in grads.items())


def test_packed_rows_equal_each_sequence_alone():
    d, n, lengths = 12, 3, [5, 1, 70, 31]
    x = scan_inputs(b=1, d=d, n=n, l=sum(lengths), dtype=torch.float64, init=False)
    x["initial_state"] = torch.randn(len(lengths), d, n, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    got = _run(selective_scan_native, x, cu=cu)
    want = _run(selective_scan_ref, x, cu=cu)
    _compare(got, want, F64, F64, "packed")
    # and each sequence alone through the native kernel
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: v[..., s:e] if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}
        part["initial_state"] = x["initial_state"][i : i + 1]
        out, final = selective_scan_native(**part, delta_softplus=True, return_final_state=True)
        assert_rel(got[0][..., s:e], out, F64, f"packed seq {i} out")
        assert_rel(got[1][i : i + 1], final, F64, f"packed seq {i} final")


def test_no_grad_path_equals_the_grad_path_and_chunked():
    x = scan_inputs(b=2, d=20, n=4, l=130)
    with torch.no_grad():
        out, final = selective_scan_native(**x, delta_softplus=True, return_final_state=True)
        ch_out, ch_final = selective_scan_chunked(**x, delta_softplus=True, return_final_state=True)
    g_out, g_final, _ = _run(selective_scan_native, x)
    torch.testing.assert_close(out, g_out, rtol=0, atol=0)
    torch.testing.assert_close(final, g_final, rtol=0, atol=0)
    assert_rel(out, ch_out, F32_OUT, "vs chunked")
    assert_rel(final, ch_final, F32_OUT, "vs chunked final")


def test_states_at_and_empty_sequence():
    x = scan_inputs(b=1, d=8, n=3, l=20, dtype=torch.float64)
    out, final, states = selective_scan_native(**x, delta_softplus=True, return_final_state=True, states_at=[3, 20])
    want = selective_scan_ref(**x, delta_softplus=True, return_final_state=True, states_at=[3, 20])
    for a, b in zip((out, final, states), want):
        assert_rel(a, b, F64)
    empty = {k: v[..., :0] if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}
    out, final = selective_scan_native(**empty, return_final_state=True)
    assert out.shape == (1, 8, 0)
    assert_rel(final, x["initial_state"], 0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grouped", [False, True])
def test_state_update_is_one_step_of_the_scan(dtype, grouped):
    b, d, n = 3, 20, 5
    x = scan_inputs(b=b, d=d, n=n, l=1, gB=2 if grouped else None, gC=2 if grouped else None, dtype=dtype)
    args = dict(
        state=x["initial_state"],
        x=x["u"][..., 0],
        dt=x["delta"][..., 0],
        A=x["A"],
        B=x["B"][..., 0],
        C=x["C"][..., 0],
        D=x["D"],
        z=x["z"][..., 0],
        dt_bias=x["delta_bias"],
        dt_softplus=True,
    )
    y, new = selective_state_update_native(**args)
    y_ref, new_ref = selective_state_update_ref(**args)
    out, final = selective_scan_native(**x, delta_softplus=True, return_final_state=True)
    tol = F64 if dtype == torch.float64 else F32_OUT
    assert_rel(y, y_ref, tol, "step y")
    assert_rel(new, new_ref, tol, "step state")
    assert_rel(y, out[..., 0], tol, "step == scan y")
    assert_rel(new, final, tol, "step == scan state")
    assert args["state"].equal(x["initial_state"])  # not mutated


def test_public_op_picks_native_on_cpu():
    assert K.resolve_backend("auto", torch.zeros(1), op="selective_scan") == "native"
    assert _dispatch.implementation("selective_scan", "native") is selective_scan_native
    assert native_ops.CHECKPOINT > 1


def _lm_run(backend):
    model = tiny_lm("mamba1").double().set_backend(backend)
    ids = torch.randint(0, 32, (2, 45), generator=torch.Generator().manual_seed(0))
    logits, state = model(ids)
    loss = logits.pow(2).mean() + sum(t.pow(2).sum() for t in state.tensors().values())
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), {k: v.detach() for k, v in state.tensors().items()}, grads


def test_tiny_language_model_native_equals_ref_in_float64():
    """Logits, final state and every parameter gradient of a tiny Mamba-1 LM agree between the backends."""
    logits_ref, state_ref, grads_ref = _lm_run("ref")
    logits_nat, state_nat, grads_nat = _lm_run("native")
    assert_rel(logits_nat, logits_ref, 1e-10, "logits")
    assert set(state_nat) == set(state_ref) and state_ref
    for k in state_ref:
        assert_rel(state_nat[k], state_ref[k], 1e-10, f"state {k}")
    assert set(grads_nat) == set(grads_ref) and grads_ref
    for k in grads_ref:
        assert_rel(grads_nat[k], grads_ref[k], 1e-9, f"grad {k}")
