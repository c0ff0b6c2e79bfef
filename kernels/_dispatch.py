"""The dispatcher behind ``seqlab.kernels``: one table of every op's backends, and the one pick that reads it."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch

from ._native import native_available, native_unavailable_reason
from ._states_at import check_positions, conv_tails, scan_in_pieces
from ._triton import triton_available
from ._varlen import cu_seqlens_from_seq_idx
from .errors import KernelBackendError, KernelInputError

BACKENDS = ("auto", "ref", "chunked", "triton", "native")

# Old spellings still accepted, with a FutureWarning naming the new one (nothing stored on disk records a backend).
DEPRECATED_BACKENDS = {"torch": "chunked"}

# op -> {backend -> "module:function"}, modules relative to this package. Imported only when picked, so CPU users
# never import triton.
BACKEND_TABLE: dict[str, dict[str, str]] = {
    "selective_scan": {
        "ref": "scan.ref:selective_scan_ref",
        "chunked": "scan.chunked:selective_scan_chunked",
        "triton": "scan.triton_ops:selective_scan_triton",
        "native": "scan.native_ops:selective_scan_native",
    },
    "selective_state_update": {
        "ref": "scan.ref:selective_state_update_ref",
        "chunked": "scan.chunked:selective_state_update_chunked",
        "triton": "scan.triton_ops:selective_state_update_triton",
        "native": "scan.native_ops:selective_state_update_native",
    },
    "ssd_scan": {
        "ref": "ssd.ref:ssd_scan_ref",
        "chunked": "ssd.chunked:ssd_scan_chunked",
        "triton": "ssd.triton_ops:ssd_scan_triton",
        "native": "ssd.native_ops:ssd_scan_native",
    },
    "ssd_state_update": {
        "ref": "ssd.ref:ssd_state_update_ref",
        "chunked": "ssd.chunked:ssd_state_update_chunked",
        "triton": "ssd.triton_ops:ssd_state_update_triton",
        "native": "ssd.native_ops:ssd_state_update_native",
    },
    "causal_conv1d": {
        "ref": "conv1d.ref:causal_conv1d_ref",
        "chunked": "conv1d.chunked:causal_conv1d_chunked",
        "triton": "conv1d.triton_ops:causal_conv1d_triton",
        "native": "conv1d.native_ops:causal_conv1d_native",
    },
    "causal_conv1d_update": {
        "ref": "conv1d.ref:causal_conv1d_update_ref",
        "chunked": "conv1d.chunked:causal_conv1d_update_chunked",
        "triton": "conv1d.triton_ops:causal_conv1d_update_triton",
        "native": "conv1d.native_ops:causal_conv1d_update_native",
    },
    "mamba3_scan": {
        "ref": "mamba3.ref:mamba3_scan_ref",
        "chunked": "mamba3.chunked:mamba3_scan_chunked",
        "triton": "mamba3.triton_ops:mamba3_scan_triton",
        "native": "mamba3.native_ops:mamba3_scan_native",
    },
    "mamba3_state_update": {
        "ref": "mamba3.ref:mamba3_state_update_ref",
        "chunked": "mamba3.chunked:mamba3_state_update_chunked",
        "triton": "mamba3.triton_ops:mamba3_state_update_triton",
        "native": "mamba3.native_ops:mamba3_state_update_native",
    },
}


# op -> the C source (in csrc/) of its compiled CPU kernels: "auto" picks "native" for CPU tensors when it builds
NATIVE_SOURCES: dict[str, str] = {
    "selective_scan": "scan.c",
    "selective_state_update": "scan.c",
    "ssd_scan": "ssd.c",
    "ssd_state_update": "ssd.c",
    "causal_conv1d": "conv1d.c",
    "causal_conv1d_update": "conv1d.c",
    "mamba3_scan": "mamba3.c",
    "mamba3_state_update": "mamba3.c",
}


def _packing(cu_seqlens, seq_idx, x: torch.Tensor, length_dim: int, states_at) -> dict:
    """The ``cu_seqlens=`` keyword an implementation gets: {} when the call is not packed (so implementations
    without packed support are called exactly as before). ``seq_idx`` becomes ``cu_seqlens`` here; the boundaries
    themselves are checked once, by the implementation's argument checks (``ref.py``), as every argument is."""
    if cu_seqlens is None and seq_idx is None:
        return {}
    if cu_seqlens is not None and seq_idx is not None:
        raise KernelInputError("give cu_seqlens or seq_idx, not both")
    if states_at is not None:
        raise KernelInputError("states_at cannot be combined with cu_seqlens/seq_idx (packed rows)")
    if seq_idx is not None:
        length = x.shape[length_dim] if isinstance(x, torch.Tensor) and x.dim() > length_dim else None
        cu_seqlens = cu_seqlens_from_seq_idx(seq_idx, length)
    return {"cu_seqlens": cu_seqlens}


def canonical_backend(backend: str, *, stacklevel: int = 1) -> str:
    """``backend`` as one of BACKENDS: a deprecated spelling ("torch") becomes its new name with a FutureWarning;
    anything else not in BACKENDS raises KernelInputError. The warning points at the caller (``stacklevel=1``),
    or that many frames further out."""
    if isinstance(backend, str) and backend in DEPRECATED_BACKENDS:
        new = DEPRECATED_BACKENDS[backend]
        warnings.warn(
            f"backend={backend!r} is deprecated: use backend={new!r} (the same vectorised PyTorch path)",
            FutureWarning,
            stacklevel=stacklevel + 1,
        )
        return new
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str | None = None, stacklevel: int = 1) -> str:
    """Turn ``backend`` (one of BACKENDS) into the concrete backend for these tensors (``stacklevel``: as in
    ``canonical_backend``). "auto" is Triton for CUDA tensors (where Triton runs), else the compiled CPU kernels
    of ``op`` for CPU tensors where they build here (``op`` None: the selective scan's), else "chunked"."""
    backend = canonical_backend(backend, stacklevel=stacklevel + 1)
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    if backend == "auto":
        if on_cuda:
            return "triton" if triton_available() else "chunked"
        on_cpu = all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))
        return "native" if on_cpu and native_available(NATIVE_SOURCES[op or "selective_scan"]) else "chunked"
    if backend == "triton" and not triton_available():
        from ._triton import triton_import_error

        reason = triton_import_error() or "no CUDA device is visible and TRITON_INTERPRET is not set"
        raise KernelBackendError(
            f"backend='triton' was asked for, but seqlab's Triton kernels cannot run here ({reason}); "
            "use backend='chunked' (vectorised PyTorch, any device) or backend='auto'"
        )
    if backend == "native":
        if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors):
            raise KernelBackendError("backend='native' runs on CPU tensors only; use backend='auto' or 'triton'")
        source = NATIVE_SOURCES[op or "selective_scan"]
        if not native_available(source):
            raise KernelBackendError(
                f"backend='native' was asked for, but seqlab's compiled CPU kernels cannot run here "
                f"({native_unavailable_reason(source)}); use backend='chunked' or backend='auto'"
            )
    return backend


def implementation(op: str, backend: str) -> Callable:
    """The function that runs ``op`` on the concrete ``backend`` (not "auto"), read from BACKEND_TABLE."""
    try:
        target = BACKEND_TABLE[op][backend]
    except KeyError:
        raise KernelBackendError(f"{op} has no {backend!r} implementation") from None
    module, function = target.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), function)


def _pick(op: str, backend: str, tensor: torch.Tensor) -> Callable:
    # stacklevel 3: a deprecated backend's warning points at the code that called the public op
    return implementation(op, resolve_backend(backend, tensor, op=op, stacklevel=3))


def selective_scan(
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
    states_at=None,
    cu_seqlens=None,
    seq_idx=None,
    backend="auto",
):
    """Mamba-1 selective scan. Returns y (b, d, l), or (y, final_state) with ``return_final_state``.

    Packed rows (``cu_seqlens`` (N + 1,) or ``seq_idx`` (1, l); batch 1, see ``kernels/_varlen.py``): the state
    restarts at every sequence (from zeros, or from ``initial_state`` (N, d, n)), and ``final_state`` is (N, d, n),
    one per sequence.

    ``states_at`` (strictly increasing positions in 1..l): also return the states after those positions,
    (b, k, d, n), as the last item: (y, final_state, states) or (y, states). ``ref`` keeps them as it walks,
    ``chunked`` copies them out of its blocks (without autograd); ``triton`` splits the call at the positions and
    threads the state (``kernels/_states_at.py``)."""
    fn = _pick("selective_scan", backend, u)
    packed = _packing(cu_seqlens, seq_idx, u, 2, states_at)
    if states_at is None:
        return fn(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=delta_softplus,
            initial_state=initial_state,
            return_final_state=return_final_state,
            **packed,
        )
    fixed = dict(A=A, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus)
    positions = check_positions(states_at, u.shape[-1] if isinstance(u, torch.Tensor) and u.dim() == 3 else 0)
    if fn.__name__ in ("selective_scan_ref", "selective_scan_chunked"):
        return fn(
            u,
            delta,
            B=B,
            C=C,
            z=z,
            initial_state=initial_state,
            return_final_state=return_final_state,
            states_at=positions,
            **fixed,
        )
    sequences = dict(u=u, delta=delta, B=B, C=C, z=z)
    return scan_in_pieces(
        lambda **kw: fn(**kw, **fixed), sequences, -1, u.shape[-1], initial_state, positions, return_final_state
    )


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, backend="auto"):
    """One Mamba-1 decode step: state (b, d, n), x/dt/z (b, d), B/C (b, n) or (b, g, n) -> (y, new_state)."""
    return _pick("selective_state_update", backend, x)(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
    )


def ssd_scan(
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
    *,
    states_at=None,
    cu_seqlens=None,
    seq_idx=None,
    backend="auto",
):
    """Mamba-2 SSD scan. Returns y (b, l, h, p), or (y, final_state) with ``return_final_state``.

    Packed rows (``cu_seqlens`` / ``seq_idx``, batch 1): as ``selective_scan``; states (N, h, p, n).

    ``states_at`` (strictly increasing positions in 1..l): also return the states after those positions,
    (b, k, h, p, n), as the last item, as ``selective_scan`` does (``chunked``: directly from the segment sums
    for short calls, ``ssd/chunked.py``; ``triton``: split and threaded)."""
    fn = _pick("ssd_scan", backend, x)
    packed = _packing(cu_seqlens, seq_idx, x, 1, states_at)
    if states_at is None:
        return fn(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            z=z,
            dt_bias=dt_bias,
            dt_softplus=dt_softplus,
            initial_state=initial_state,
            return_final_state=return_final_state,
            **packed,
        )
    fixed = dict(A=A, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)
    positions = check_positions(states_at, x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else 0)
    if fn.__name__ in ("ssd_scan_ref", "ssd_scan_chunked"):
        return fn(
            x,
            dt,
            B=B,
            C=C,
            z=z,
            initial_state=initial_state,
            return_final_state=return_final_state,
            states_at=positions,
            **fixed,
        )
    sequences = dict(x=x, dt=dt, B=B, C=C, z=z)
    return scan_in_pieces(
        lambda **kw: fn(**kw, **fixed), sequences, 1, x.shape[1], initial_state, positions, return_final_state
    )


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, backend="auto"):
    """One Mamba-2 decode step: state (b, h, p, n), x/z (b, h, p), dt (b, h), B/C (b, g, n) -> (y, new_state)."""
    return _pick("ssd_state_update", backend, x)(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
    )


def causal_conv1d(
    x,
    weight,
    bias=None,
    activation=None,
    initial_state=None,
    return_final_state=False,
    *,
    states_at=None,
    cu_seqlens=None,
    seq_idx=None,
    backend="auto",
):
    """Causal depthwise conv1d over (b, d, l). Returns y, or (y, final_state (b, d, w - 1)).

    Packed rows (``cu_seqlens`` / ``seq_idx``, batch 1): no tap reaches across a boundary; sequence i starts from
    ``initial_state[i]`` (N, d, w - 1) or zeros, and ``final_state`` is (N, d, w - 1): each sequence's last
    w - 1 inputs (its initial state's tail where the sequence is shorter).

    ``states_at`` (strictly increasing positions in 1..l): also return the conv states (the last w - 1 inputs)
    after those positions, (b, k, d, w - 1), as the last item: (y, final_state, states) or (y, states)."""
    packed = _packing(cu_seqlens, seq_idx, x, 2, states_at)
    out = _pick("causal_conv1d", backend, x)(
        x,
        weight,
        bias=bias,
        activation=activation,
        initial_state=initial_state,
        return_final_state=return_final_state,
        **packed,
    )
    if states_at is None:
        return out
    positions = check_positions(states_at, x.shape[-1])
    tails = conv_tails(x, initial_state, weight.shape[1], positions)
    return (*out, tails) if return_final_state else (out, tails)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, backend="auto"):
    """One conv step: x (b, d), conv_state (b, d, w - 1) -> (y (b, d), new_state)."""
    return _pick("causal_conv1d_update", backend, x)(x, conv_state, weight, bias=bias, activation=activation)


def mamba3_scan(
    x,
    dt,
    A,
    B,
    C,
    trap,
    angles,
    B_bias,
    C_bias,
    chunk_size=64,
    D=None,
    z=None,
    mimo_x=None,
    mimo_z=None,
    mimo_o=None,
    initial_state=None,
    return_final_state=False,
    *,
    states_at=None,
    cu_seqlens=None,
    seq_idx=None,
    backend="auto",
):
    """Mamba-3 scan (exponential-trapezoidal, rotary state, SISO or MIMO): ``kernels/mamba3/`` documents the
    equations and shapes. Returns y, or (y, final_state) with ``return_final_state``; the state is the tuple
    (angle, ssm, k, v). Packed rows (``cu_seqlens`` / ``seq_idx``, batch 1): one state per sequence.

    ``states_at`` (strictly increasing positions in 1..l): also the states after those positions as the last item,
    a tuple of the four parts each stacked on a new dim 1 ((b, k, h, a), ...): every backend splits the call at
    the positions and threads the state (``scan_in_pieces``)."""
    packed = _packing(cu_seqlens, seq_idx, x, 1, states_at)
    fn = _pick("mamba3_scan", backend, x)
    fixed = dict(B_bias=B_bias, C_bias=C_bias, chunk_size=chunk_size, D=D, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o)
    sequences = dict(x=x, dt=dt, A=A, B=B, C=C, trap=trap, angles=angles, z=z)
    if states_at is None:
        return fn(**sequences, **fixed, initial_state=initial_state, return_final_state=return_final_state, **packed)
    positions = check_positions(states_at, x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else 0)
    return scan_in_pieces(
        lambda **kw: fn(**kw, **fixed), sequences, 1, x.shape[1], initial_state, positions, return_final_state
    )


def mamba3_state_update(
    state,
    x,
    dt,
    A,
    B,
    C,
    trap,
    angles,
    B_bias,
    C_bias,
    D=None,
    z=None,
    mimo_x=None,
    mimo_z=None,
    mimo_o=None,
    *,
    backend="auto",
):
    """One Mamba-3 decode step: the inputs of ``mamba3_scan`` without the length dim -> (y, new_state)."""
    return _pick("mamba3_state_update", backend, x)(
        state, x, dt, A, B, C, trap, angles, B_bias, C_bias, D=D, z=z, mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o
    )
