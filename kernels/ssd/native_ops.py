"""Mamba-2 SSD scan and decode step on the compiled CPU kernels (``kernels/csrc/ssd.c``): the ``"native"`` backend.

The C kernel walks the recurrence position by position per (sequence, head), with the (p, n) state in L1 and one
scalar exp per step (``ssd.c`` documents the layouts and the backward). Same arguments, results, dtypes and
argument checks as ``ssd_scan_chunked`` / ``ssd_state_update_chunked``:

- the math runs in float64 when any input is float64, else in float32 (bf16/fp16 inputs are converted on the
  way in); y comes back in x.dtype, the final state in the compute dtype;
- gradients of every floating input (x, dt, A, B, C, D of either shape, z, dt_bias, initial_state) come from the
  C backward, which recomputes the states from checkpoints stored every block of positions (no per-position
  state is kept);
- packed rows (``cu_seqlens``) run natively: every sequence is its own walk, with its own initial and final state;
- ``states_at`` splits the call at the positions and threads the state (``scan_in_pieces``): exact, and the
  prefix is never re-run.

Delegated to the chunked functions, explicitly: everything when the C library cannot be built here, and a decode
step (``ssd_state_update_native``) whose inputs require grad (the C step has no backward).
"""

from __future__ import annotations

import ctypes

import torch

from .._native import native_library, num_threads, ptr
from .._states_at import check_positions, scan_in_pieces
from .._validate import records_grad
from .chunked import ssd_scan_chunked, ssd_state_update_chunked
from .ref import check_packed_args, check_scan_args, check_step_args

__all__ = ["ssd_scan_native", "ssd_state_update_native"]

_SOURCE = "ssd.c"

# The backward recomputes a block of K + 1 states into a per-thread buffer: sized to stay in a 512 KiB L2 with
# room for the inputs it streams.
_BUFFER_BYTES = 256 << 10


def _block_len(p: int, n: int, dtype: torch.dtype) -> int:
    per_state = p * n * (8 if dtype == torch.float64 else 4)
    return max(4, min(64, _BUFFER_BYTES // per_state - 1))


def _i64(v: int) -> ctypes.c_int64:
    return ctypes.c_int64(int(v))


def _int(v: int) -> ctypes.c_int:
    return ctypes.c_int(int(v))


def _fn(lib, name: str, cd: torch.dtype):
    return getattr(lib, f"{name}_{'d' if cd == torch.float64 else 'f'}")


def _inner_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels take any strides but the last dim's, which must be 1 (the vectorised dim)."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(*tensors, ndim: int) -> torch.Tensor:
    """The leading ``ndim`` element strides of each tensor (zeros for None), as the int64 table the C code reads."""
    out = []
    for t in tensors:
        out += list(t.stride()[:ndim]) if t is not None else [0] * ndim
    return torch.tensor(out, dtype=torch.int64)


def _segments(rows_bounds, block: int) -> tuple[torch.Tensor, int]:
    """The C segment table (row, start, end, first checkpoint) and the number of checkpoints in all."""
    table, base = [], 0
    for row, start, end in rows_bounds:
        table += [row, start, end, base]
        base += -(-(end - start) // block)
    return torch.tensor(table, dtype=torch.int64), base


def _forward(lib, seg, nseg, nchunks, K, x, dt, A, B, C, D, z, dt_bias, softplus, init, train):
    """Run the C forward. Returns y (contiguous, compute dtype), the final states (nseg, h, p, n) and, when
    ``train``, the pre-gate output (with z) and the checkpoints."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    cd = x.dtype
    st = _strides(x, dt, B, C, z, ndim=3)
    y = torch.empty((b, l, h, p), dtype=cd)
    final = torch.empty((nseg, h, p, n), dtype=cd)
    yraw = torch.empty((b, l, h, p), dtype=cd) if train and z is not None else None
    ckpt = torch.empty((nchunks, h, n, p), dtype=cd) if train else None
    _fn(lib, "ssd_fwd", cd)(
        *(_i64(v) for v in (nseg,)),
        ptr(seg),
        *(_i64(v) for v in (l, h, p, g, n)),
        *(ptr(t) for t in (x, dt, A, B, C, D, z, dt_bias)),
        _int(int(softplus)),
        ptr(st),
        ptr(init),
        ptr(y),
        ptr(yraw),
        ptr(final),
        ptr(ckpt),
        _i64(K),
        _int(num_threads()),
    )
    return y, final, yraw, ckpt


class _SSDNative(torch.autograd.Function):
    """y, final states of the C walk; the backward is the C adjoint walk over the saved checkpoints. Inputs are
    already in the compute dtype with a contiguous last dim; D is (h, p) (or None)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, init, softplus, seg, nseg, nchunks, K):
        lib = native_library(_SOURCE)
        y, final, yraw, ckpt = _forward(lib, seg, nseg, nchunks, K, x, dt, A, B, C, D, z, dt_bias, softplus, init, True)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, yraw, ckpt, seg)
        ctx.softplus, ctx.nseg, ctx.K, ctx.has_init = softplus, nseg, K, init is not None
        return y, final

    @staticmethod
    def backward(ctx, gy, gfinal):
        x, dt, A, B, C, D, z, dt_bias, yraw, ckpt, seg = ctx.saved_tensors
        lib = native_library(_SOURCE)
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        cd, nseg = x.dtype, ctx.nseg
        threads = num_threads()
        hg = h // g
        by_thread = threads < hg
        R = threads if by_thread else hg
        gy = torch.zeros((b, l, h, p), dtype=cd) if gy is None else gy.to(cd).contiguous()
        gfinal = None if gfinal is None else gfinal.to(cd).contiguous()
        gx = torch.empty((b, l, h, p), dtype=cd)
        gdt = torch.empty((b, l, h), dtype=cd)
        gz = torch.empty((b, l, h, p), dtype=cd) if z is not None else None
        gB = torch.zeros((R, b, l, g, n), dtype=cd)
        gC = torch.zeros((R, b, l, g, n), dtype=cd)
        gA = torch.empty((nseg, h), dtype=cd)
        gD = torch.empty((nseg, h, p), dtype=cd) if D is not None else None
        gbias = torch.empty((nseg, h), dtype=cd)
        ginit = torch.empty((nseg, h, p, n), dtype=cd)
        st = _strides(x, dt, B, C, z, ndim=3)
        _fn(lib, "ssd_bwd", cd)(
            _i64(nseg),
            ptr(seg),
            *(_i64(v) for v in (l, h, p, g, n, b)),
            *(ptr(t) for t in (x, dt, A, B, C, D, z, dt_bias)),
            _int(int(ctx.softplus)),
            ptr(st),
            ptr(yraw),
            ptr(gy),
            ptr(gfinal),
            ptr(ckpt),
            _i64(ctx.K),
            *(ptr(t) for t in (gx, gdt, gz, gB, gC)),
            _int(int(by_thread)),
            *(ptr(t) for t in (gA, gD, gbias, ginit)),
            _int(threads),
        )
        gB = gB[0] if R == 1 else gB.sum(0)
        gC = gC[0] if R == 1 else gC.sum(0)
        return (
            gx,
            gdt,
            gA.sum(0),
            gB,
            gC,
            None if gD is None else gD.sum(0),
            gz,
            None if dt_bias is None else gbias.sum(0),
            ginit if ctx.has_init else None,
            None,
            None,
            None,
            None,
            None,
        )


def ssd_scan_native(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
    states_at=None,
    cu_seqlens=None,
):
    """SSD scan on the compiled CPU kernel; same signature and results as ``ssd_scan_chunked``.

    ``chunk_size`` is validated and otherwise unused (the walk is sequential). ``states_at``: the call is split at
    the positions and the state threaded (``scan_in_pieces``). ``cu_seqlens`` (packed rows, batch 1): native, one
    walk per sequence with initial and final states (N, h, p, n). Where the C library cannot be built, the chunked
    function runs instead."""
    lib = native_library(_SOURCE)
    if lib is None:
        return ssd_scan_chunked(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, return_final_state, states_at,
            cu_seqlens,
        )  # fmt: skip
    if cu_seqlens is not None:
        dims, cu, N = check_packed_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, states_at, cu_seqlens)
        bounds = [int(v) for v in cu.cpu()]
        rows = [(0, bounds[i], bounds[i + 1]) for i in range(N)]
    elif states_at is not None:
        positions = check_positions(states_at, x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else 0)
        fixed = dict(A=A, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)
        sequences = dict(x=x, dt=dt, B=B, C=C, z=z)
        run = lambda **kw: ssd_scan_native(**kw, **fixed)  # noqa: E731
        return scan_in_pieces(run, sequences, 1, x.shape[1], initial_state, positions, return_final_state)
    else:
        dims = check_scan_args(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
        rows = [(i, 0, dims.l) for i in range(dims.b)]
    cd = dims.compute_dtype
    h, p = dims.h, dims.p
    K = _block_len(p, dims.n, cd)
    seg, nchunks = _segments(rows, K)
    xc, dtc, Ac, Bc, Cc, zc = (_inner_contiguous(None if t is None else t.to(cd)) for t in (x, dt, A, B, C, z))
    Dc = None if D is None else (D.to(cd)[:, None].expand(h, p) if D.dim() == 1 else D.to(cd)).contiguous()
    biasc = None if dt_bias is None else dt_bias.to(cd).contiguous()
    init = None if initial_state is None else initial_state.to(cd).contiguous()
    Ac = Ac.contiguous()
    if records_grad(x, dt, A, B, C, D, z, dt_bias, initial_state):
        meta = (bool(dt_softplus), seg, len(rows), nchunks, K)
        y, final = _SSDNative.apply(xc, dtc, Ac, Bc, Cc, Dc, zc, biasc, init, *meta)
    else:
        args = (xc, dtc, Ac, Bc, Cc, Dc, zc, biasc, bool(dt_softplus), init, False)
        y, final, _, _ = _forward(lib, seg, len(rows), nchunks, K, *args)
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y


def ssd_state_update_native(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step on the compiled CPU kernel: returns (y (b, h, p), new_state (b, h, p, n)); the state passed
    in is not modified. Same results as ``ssd_state_update_chunked``, which runs instead when any input requires
    grad (the C step has no backward) or the C library cannot be built."""
    lib = native_library(_SOURCE)
    if lib is None or records_grad(state, x, dt, A, B, C, D, z, dt_bias):
        return ssd_state_update_chunked(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    dims = check_step_args(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias)
    b, h, p, g, n, cd = dims.b, dims.h, dims.p, dims.g, dims.n, dims.compute_dtype
    xc, dtc, Bc, Cc, zc = (_inner_contiguous(None if t is None else t.to(cd)) for t in (x, dt, B, C, z))
    s0 = state.to(cd).contiguous()
    Dc = None if D is None else (D.to(cd)[:, None].expand(h, p) if D.dim() == 1 else D.to(cd)).contiguous()
    biasc = None if dt_bias is None else dt_bias.to(cd).contiguous()
    Ac = A.to(cd).contiguous()
    st = _strides(xc, dtc, Bc, Cc, zc, ndim=2)
    y = torch.empty((b, h, p), dtype=cd)
    new_state = torch.empty((b, h, p, n), dtype=cd)
    _fn(lib, "ssd_step", cd)(
        *(_i64(v) for v in (b, h, p, g, n)),
        *(ptr(t) for t in (s0, xc, dtc, Ac, Bc, Cc, Dc, zc, biasc)),
        _int(int(bool(dt_softplus))),
        ptr(st),
        ptr(y),
        ptr(new_state),
        _int(num_threads()),
    )
    return y.to(x.dtype), new_state
