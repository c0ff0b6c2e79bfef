"""The compiled CPU causal conv1d (``backend="native"``, csrc/conv1d.c) against the float64 sequential reference:
outputs, final states and the gradients of x, weight, bias and initial_state (through a loss that reads the
final state too), odd lengths (shorter than the kernel included), both layouts, silu or none, the one-step update.
"""

from __future__ import annotations

import pytest
import torch

from seqlab.kernels import _dispatch, _native
from seqlab.kernels.conv1d.native_ops import causal_conv1d_native, causal_conv1d_update_native
from seqlab.kernels.conv1d.ref import causal_conv1d_ref, causal_conv1d_update_ref
from seqlab.testing import assert_rel, channels_last, strided

pytestmark = pytest.mark.skipif(not _native.native_available("conv1d.c"), reason="no C compiler here")

F64 = 1e-12
F32 = 1e-5


def _inputs(b=2, d=21, l=37, w=4, dtype=torch.float64, seed=0, init=True, bias=True):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return dict(
        x=r(b, d, l),
        weight=r(d, w),
        bias=r(d) if bias else None,
        initial_state=r(b, d, w - 1) if init else None,
    )


def _run(fn, inputs, activation, seed=1, cu=None):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    kw = {} if cu is None else dict(cu_seqlens=cu)
    y, final = fn(**leaves, activation=activation, return_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    grads = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, grads)}
    return y, final, grads


def _compare(got, want, tol, what=""):
    assert_rel(got[0], want[0], tol, f"{what} out")
    assert_rel(got[1], want[1], tol, f"{what} final state")
    assert set(got[2]) == set(want[2])
    for k in want[2]:
        assert_rel(got[2][k], want[2][k], tol, f"{what} grad {k}")


@pytest.mark.parametrize("l", [1, 2, 3, 7, 37, 130])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_float64_matches_the_reference(l, activation):
    x = _inputs(l=l, seed=l)
    _compare(_run(causal_conv1d_native, x, activation), _run(causal_conv1d_ref, x, activation), F64, f"l={l}")


@pytest.mark.parametrize("w", [1, 2, 3])
@pytest.mark.parametrize("opts", [dict(), dict(init=False, bias=False)])
def test_widths_and_optional_inputs(w, opts):
    x = _inputs(l=9, w=w, **opts)
    _compare(_run(causal_conv1d_native, x, "silu"), _run(causal_conv1d_ref, x, "silu"), F64, f"w={w}")


def test_float32_and_the_mixer_layout():
    x = _inputs(l=37, dtype=torch.float32)
    want = _run(causal_conv1d_ref, {k: v.double() for k, v in x.items()}, "silu")
    plain = _run(causal_conv1d_native, x, "silu")
    _compare(plain, want, F32, "f32")
    cl = dict(x, x=channels_last(x["x"]), initial_state=strided(x["initial_state"]))
    got = _run(causal_conv1d_native, cl, "silu")
    assert got[0].stride(1) == 1  # position-major like x
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _compare(got, want, F32, "mixer layout")
    assert_rel(got[0], plain[0], F32, "layouts agree")  # two code paths (across channels / along positions)


def test_bf16_inputs():
    x = _inputs(l=20, dtype=torch.bfloat16)
    y, final, grads = _run(causal_conv1d_native, x, "silu")
    want_y, want_final = causal_conv1d_ref(**x, activation="silu", return_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16
    assert_rel(y.float(), want_y.float(), 1e-2, "bf16 out")
    assert torch.equal(final, want_final)
    assert all(g.dtype == torch.bfloat16 for g in grads.values())


def test_no_grad_equals_grad_path():
    x = _inputs(l=50, dtype=torch.float32)
    with torch.no_grad():
        y, final = causal_conv1d_native(**x, activation="silu", return_final_state=True)
    g = _run(causal_conv1d_native, x, "silu")
    torch.testing.assert_close(y, g[0], rtol=0, atol=0)
    torch.testing.assert_close(final, g[1], rtol=0, atol=0)


def test_packed_rows_equal_each_sequence_alone():
    lengths = [2, 9, 1, 20]
    x = _inputs(b=1, l=sum(lengths), init=False)
    x["initial_state"] = torch.randn(len(lengths), 21, 3, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    _compare(_run(causal_conv1d_native, x, "silu", cu=cu), _run(causal_conv1d_ref, x, "silu", cu=cu), F64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_is_one_step_of_the_conv(dtype, activation):
    x = _inputs(b=3, l=1, dtype=dtype)
    state = x["initial_state"].clone()
    y, new = causal_conv1d_update_native(x["x"][..., 0], state, x["weight"], x["bias"], activation)
    y_ref, new_ref = causal_conv1d_update_ref(x["x"][..., 0], state, x["weight"], x["bias"], activation)
    full, final = causal_conv1d_native(**x, activation=activation, return_final_state=True)
    tol = F64 if dtype == torch.float64 else F32
    assert_rel(y, y_ref, tol, "step y")
    assert torch.equal(new, new_ref)
    assert_rel(y, full[..., 0], tol, "step == conv")
    assert torch.equal(new, final)
    assert state.equal(x["initial_state"])  # not mutated


def test_public_op_picks_native_on_cpu():
    assert _dispatch.resolve_backend("auto", torch.zeros(1), op="causal_conv1d") == "native"
    assert _dispatch.implementation("causal_conv1d", "native") is causal_conv1d_native
