"""Mamba-1 selective scan: the compiled CPU path (``csrc/scan.c``, built on first use by ``kernels/_native.py``).

Same signatures, checks and results as ``chunked.py``. One pass over the sequence per (batch row, block of
channels), the block's state in L1, vectorised across consecutive channels, parallel over the blocks with
OpenMP; softplus(delta + delta_bias), the D * u skip and the silu(z) gate are fused in. Inputs are read in place
through their strides (the Mamba-1 mixer's position-major views and contiguous (b, d, l) alike), and the output
has u's layout.

float32 runs in float32 with a vectorised polynomial exp (relative error ~1e-7, exactly 0 for large negative
arguments); float64 runs in float64 with libm's exp (what the tests compare to the sequential reference to
~1e-12); bf16 / fp16 inputs are converted to float32 first and the output converted back, as the other paths do.

Autograd: a ``torch.autograd.Function`` whose forward also stores the state before every ``CHECKPOINT``-th
position (a 1 / CHECKPOINT fraction of the (b, d, l, n) states); its backward, also in C, recomputes each
chunk's states from its checkpoint, newest chunk first, and runs the adjoint recurrence, giving the gradients of
u, delta, A, B, C, D, z, delta_bias and initial_state (no double backward).

Packed rows (``cu_seqlens``) run natively: the walk restarts the state at every sequence start. B and C with
different group counts are first repeated to a common one (as ``chunked`` does). ``states_at`` splits the call
at the positions and threads the state (``kernels/_states_at.py``). Nothing is delegated to ``chunked``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .._layout import empty_like_layout
from .._native import native_library, num_threads, ptr
from .._states_at import check_positions, scan_in_pieces
from .._validate import records_grad
from ..errors import KernelInputError
from .chunked import _common_groups
from .ref import check_scan_args, check_state_update_args, compute_dtype

__all__ = ["selective_scan_native", "selective_state_update_native"]

#: positions between the states the forward keeps for the backward
CHECKPOINT = 64

_I64 = ctypes.c_int64
_P = ctypes.c_void_p


class _ScanArgs(ctypes.Structure):
    # mirrors sl_scan_args in csrc/scan.c (same order)
    _fields_ = [(f, _I64) for f in ("b", "d", "l", "n", "g", "K", "nseq", "softplus", "P")]
    _fields_ += [(f, _I64 * 3) for f in ("su", "sdt", "sz", "sy", "sgy", "sgu", "sgdt", "sgz")]
    _fields_ += [("sA", _I64 * 2), ("sB", _I64 * 4), ("sC", _I64 * 4)]
    _fields_ += [(f, _P) for f in ("u", "dt", "A", "B", "C", "D", "dbias", "z", "h0", "y", "hT", "ckpt", "cu")]
    _fields_ += [(f, _P) for f in ("gy", "ghT", "gu", "gdt", "gA", "gB", "gC", "gD", "gdbias", "gz", "gh0")]


class _StepArgs(ctypes.Structure):
    # mirrors sl_step_args in csrc/scan.c
    _fields_ = [(f, _I64) for f in ("b", "d", "n", "g")]
    _fields_ += [("sstate", _I64 * 3)]
    _fields_ += [(f, _I64 * 2) for f in ("sx", "sdt", "sz", "sA")]
    _fields_ += [("sB", _I64 * 3), ("sC", _I64 * 3), ("sy", _I64 * 2), ("snew", _I64 * 3)]
    _fields_ += [(f, _P) for f in ("state", "x", "dt", "A", "B", "C", "D", "dbias", "z", "y", "new_state")]
    _fields_ += [("softplus", _I64)]


_STEP_WORDS = ctypes.sizeof(_StepArgs) // 8


def _lib() -> ctypes.CDLL:
    lib = native_library("scan.c")
    if lib is None:  # the dispatcher checks first; a direct call on a machine without a compiler lands here
        raise RuntimeError("seqlab's compiled scan kernels (csrc/scan.c) cannot be built or loaded here")
    return lib


@functools.cache
def _fn(name: str, cdt: torch.dtype):
    return getattr(_lib(), f"{name}_{'d' if cdt == torch.float64 else 'f'}")


def _strides(t: torch.Tensor | None, k: int):
    return (_I64 * k)(*(t.stride() if t is not None else (0,) * k))


def _c(t: torch.Tensor | None, cdt: torch.dtype, dense: bool = False) -> torch.Tensor | None:
    """``t`` in the compute dtype (no copy when it already has it: strides are passed to C); ``dense``: also
    contiguous (the per-channel vectors and the states, which C indexes densely)."""
    if t is None:
        return None
    t = t.detach().to(cdt)
    return t.contiguous() if dense else t


def _inputs(tensors, cdt):
    """(u, delta, A, B, C, D, z, delta_bias, h0) for C: D, delta_bias and h0 dense, the rest by strides."""
    return [_c(t, cdt, dense=i in (5, 7, 8)) for i, t in enumerate(tensors)]


def _fill(args: _ScanArgs, u, dt, A, B, C, D, z, dbias, h0, cu, softplus: bool) -> None:
    b, d, l = u.shape
    args.b, args.d, args.l, args.n, args.g = b, d, l, A.shape[1], B.shape[1]
    args.K, args.softplus = CHECKPOINT, int(softplus)
    args.nseq = 0 if cu is None else cu.numel() - 1
    args.su, args.sdt, args.sz = _strides(u, 3), _strides(dt, 3), _strides(z, 3)
    args.sA, args.sB, args.sC = _strides(A, 2), _strides(B, 4), _strides(C, 4)
    args.u, args.dt, args.A, args.B, args.C = ptr(u), ptr(dt), ptr(A), ptr(B), ptr(C)
    args.D, args.dbias, args.z, args.h0, args.cu = ptr(D), ptr(dbias), ptr(z), ptr(h0), ptr(cu)


def _forward(u, dt, A, B, C, D, z, dbias, h0, cu, softplus, cdt, want_ckpt):
    """Run the C forward on compute-dtype tensors; returns (y (cdt, u's layout), final state, checkpoints)."""
    b, d, l = u.shape
    n = A.shape[1]
    rows = b if cu is None else cu.numel() - 1
    args = _ScanArgs()
    _fill(args, u, dt, A, B, C, D, z, dbias, h0, cu, softplus)
    y = empty_like_layout(u, cdt)
    hT = torch.empty(rows, d, n, dtype=cdt)
    ckpt = torch.empty(b, d, -(-l // CHECKPOINT), n, dtype=cdt) if want_ckpt else None
    args.sy = _strides(y, 3)
    args.y, args.hT, args.ckpt = ptr(y), ptr(hT), ptr(ckpt)
    _fn("sl_scan_fwd", cdt)(ctypes.byref(args), num_threads())
    return y, hT, ckpt


class _NativeScan(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias, h0) -> (out, final_state), forward and backward in C."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, dbias, h0, cu, softplus, cdt):
        ctx.set_materialize_grads(False)
        ins = _inputs((u, delta, A, B, C, D, z, dbias, h0), cdt)
        y, hT, ckpt = _forward(*ins, cu, softplus, cdt, True)
        ctx.save_for_backward(*ins, ckpt)
        ctx.cu, ctx.softplus, ctx.cdt = cu, softplus, cdt
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, dbias, h0)]
        return y, hT

    @staticmethod
    def backward(ctx, gy, g_final):
        u, dt, A, B, C, D, z, dbias, h0, ckpt = ctx.saved_tensors
        cdt, cu = ctx.cdt, ctx.cu
        b, d, l = u.shape
        n, g = A.shape[1], B.shape[1]
        rows = b if cu is None else cu.numel() - 1
        P = max(1, min(num_threads(), -(-(d // g) // 16)))  # channel slices per group (own gB / gC partials)
        args = _ScanArgs()
        _fill(args, u, dt, A, B, C, D, z, dbias, h0, cu, ctx.softplus)
        args.K, args.P = CHECKPOINT, P
        gy_c = None if gy is None else gy.to(cdt)
        gf_c = None if g_final is None else g_final.to(cdt).contiguous()
        gu, gdt = empty_like_layout(u, cdt), empty_like_layout(u, cdt)
        gz = None if z is None else empty_like_layout(u, cdt)
        gA = torch.empty(b, d, n, dtype=cdt)
        gB = torch.zeros(P, b, g, n, l, dtype=cdt)
        gC = torch.zeros(P, b, g, n, l, dtype=cdt)
        gD = None if D is None else torch.empty(b, d, dtype=cdt)
        gbias = None if dbias is None else torch.empty(b, d, dtype=cdt)
        gh0 = torch.empty(rows, d, n, dtype=cdt)
        args.sgy, args.sgu, args.sgdt, args.sgz = _strides(gy_c, 3), _strides(gu, 3), _strides(gdt, 3), _strides(gz, 3)
        args.ckpt, args.gy, args.ghT = ptr(ckpt), ptr(gy_c), ptr(gf_c)
        args.gu, args.gdt, args.gA, args.gB, args.gC = ptr(gu), ptr(gdt), ptr(gA), ptr(gB), ptr(gC)
        args.gD, args.gdbias, args.gz, args.gh0 = ptr(gD), ptr(gbias), ptr(gz), ptr(gh0)
        _fn("sl_scan_bwd", cdt)(ctypes.byref(args), num_threads())
        grads = [gu, gdt, gA.sum(0), gB.sum(0), gC.sum(0)]
        grads += [None if gD is None else gD.sum(0), gz, None if gbias is None else gbias.sum(0)]
        grads += [None if h0 is None else gh0]
        out = []
        for grad, dtype, need in zip(grads, ctx.dtypes, ctx.needs_input_grad):
            out.append(grad.to(dtype) if grad is not None and need else None)
        return (*out, None, None, None)


def selective_scan_native(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
    *,
    chunk_size=None,
    block_elems=None,
    states_at=None,
    cu_seqlens=None,
):
    """Compiled Mamba-1 selective scan (see the module docstring); arguments and results as
    ``selective_scan_chunked``: out (b, d, l) in u.dtype laid out like u, or (out, final_state (b, d, n) float32,
    float64 for float64 inputs). ``chunk_size`` / ``block_elems`` are accepted for signature parity and ignored
    (the compiled kernel has no tiling to tune). ``cu_seqlens`` (packed rows, batch 1): initial / final states
    (N, d, n), one per sequence. ``states_at``: as ``chunked``, (…, states (b, k, d, n)) last."""
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    if cu_seqlens is not None and states_at is not None:
        raise KernelInputError("states_at cannot be combined with cu_seqlens (packed rows)")
    if u.device.type != "cpu":
        raise KernelInputError(f"the native selective scan runs on CPU tensors; u is on {u.device}")
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if states_at is not None:
        positions = check_positions(states_at, l)
        fixed = dict(A=A, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus)
        sequences = dict(u=u, delta=delta, B=B, C=C, z=z)
        run = lambda **kw: selective_scan_native(**kw, **fixed)  # noqa: E731
        return scan_in_pieces(run, sequences, -1, l, initial_state, positions, return_final_state)
    if l == 0:
        out = u.new_empty(b, d, 0)
        if not return_final_state:
            return out
        if initial_state is None:
            return out, torch.zeros(b, d, n, dtype=cdt)
        return out, initial_state.to(cdt) * 1
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    B4, C4 = _common_groups(B4, C4)
    cu = None if cu_seqlens is None else cu_seqlens.to(device="cpu", dtype=torch.int64).contiguous()
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if records_grad(*tensors):
        y, final = _NativeScan.apply(u, delta, A, B4, C4, D, z, delta_bias, initial_state, cu, delta_softplus, cdt)
    else:
        ins = _inputs((u, delta, A, B4, C4, D, z, delta_bias, initial_state), cdt)
        y, final, _ = _forward(*ins, cu, delta_softplus, cdt, False)
    out = y.to(u.dtype)
    return (out, final) if return_final_state else out


def selective_state_update_native(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One Mamba-1 decode step in one C call (arguments and results as ``selective_state_update_chunked``):
    (y (b, d) in x.dtype, new_state (b, d, n) float32, or float64 when any input is). ``state`` is not mutated.
    With autograd recording, the differentiable ``chunked`` step runs instead (the C step has no backward)."""
    b, d, n = check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    if records_grad(state, x, dt, A, B, C, D, z, dt_bias):
        from .chunked import selective_state_update_chunked

        return selective_state_update_chunked(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if x.device.type != "cpu":
        raise KernelInputError(f"the native state update runs on CPU tensors; x is on {x.device}")
    cdt = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    B3 = B if B.dim() == 3 else B.unsqueeze(1)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    if B3.shape[1] != C3.shape[1]:
        B3, C3 = _common_groups(B3, C3)
    ins = [_c(t, cdt) for t in (state, x, dt, A, B3, C3, D, z, dt_bias)]
    st, x_, dt_, A_, B_, C_, D_, z_, bias_ = ins
    D_ = None if D_ is None else D_.contiguous()
    bias_ = None if bias_ is None else bias_.contiguous()
    y = torch.empty(b, d, dtype=cdt)
    new_state = torch.empty(b, d, n, dtype=cdt)
    # One flat int64 array in _StepArgs' field order (every field is 8 bytes): a decode step is latency-bound, and
    # filling a ctypes Structure field by field costs more than the C step itself at small sizes.
    z_strides = z_.stride() if z_ is not None else (0, 0)
    vals = [b, d, n, B_.shape[1], *st.stride(), *x_.stride(), *dt_.stride(), *z_strides, *A_.stride()]
    vals += [*B_.stride(), *C_.stride(), *y.stride(), *new_state.stride()]
    vals += [0 if t is None else t.data_ptr() for t in (st, x_, dt_, A_, B_, C_, D_, bias_, z_, y, new_state)]
    vals.append(int(dt_softplus))
    args = (_I64 * _STEP_WORDS)(*vals)
    _fn("sl_scan_step", cdt)(args, num_threads())
    return y.to(x.dtype), new_state
