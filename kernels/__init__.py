"""seqlab.kernels: the scan, SSD, causal-conv and decode-step ops behind every mixer.

Each op has a float64-capable sequential reference (backend ``"ref"``, the truth), a vectorised, chunked
PyTorch path (``"chunked"``, the fast CPU path) and Triton kernels (``"triton"``, CUDA or the Triton
interpreter), in the subpackages ``scan/`` (Mamba-1 selective scan), ``ssd/`` (Mamba-2) and ``conv1d/``, each
with the modules ``ref``, ``chunked`` and ``triton_ops``. ``_dispatch.BACKEND_TABLE`` names every op's
function per backend; the functions here dispatch through it:

``backend="auto"`` (default) picks Triton for CUDA tensors when Triton kernels are available and the chunked
path otherwise; ``"ref"``, ``"chunked"`` and ``"triton"`` force one (``"torch"``, the old name of
``"chunked"``, still works with a FutureWarning). Signatures follow mamba_ssm so code ports.

Shapes (b batch, l length, d channels, n state size, g groups, h heads, p head dim, w conv width):

- ``selective_scan(u, delta, A, B, C, ...)``: u/delta/z (b, d, l), A (d, n), B/C (b, n, l) or (b, g, n, l),
  state (b, d, n).
- ``ssd_scan(x, dt, A, B, C, chunk_size, ...)``: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n),
  state (b, h, p, n).
- ``causal_conv1d(x, weight, ...)``: x (b, d, l), weight (d, w), state (b, d, w - 1): the last w - 1 inputs.
- decode steps take one element and return ``(y, new_state)`` without touching the state passed in.
"""

if __name__ != "seqlab.kernels":  # this folder imported as a bare 'kernels' from a checkout's root: seqlab/_checkout.py
    from seqlab._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from ._dispatch import (  # noqa: F401
        BACKEND_TABLE,
        BACKENDS,
        DEPRECATED_BACKENDS,
        KernelBackendError,
        KernelInputError,
        canonical_backend,
        causal_conv1d,
        causal_conv1d_update,
        mamba3_scan,
        mamba3_state_update,
        resolve_backend,
        selective_scan,
        selective_state_update,
        ssd_scan,
        ssd_state_update,
        triton_available,
    )
    from ._varlen import cu_seqlens_from_seq_idx, flatten_rows, seq_idx_from_cu_seqlens  # noqa: F401

__all__ = [
    "BACKENDS",
    "BACKEND_TABLE",
    "DEPRECATED_BACKENDS",
    "KernelBackendError",
    "KernelInputError",
    "canonical_backend",
    "causal_conv1d",
    "causal_conv1d_update",
    "cu_seqlens_from_seq_idx",
    "flatten_rows",
    "mamba3_scan",
    "mamba3_state_update",
    "resolve_backend",
    "seq_idx_from_cu_seqlens",
    "selective_scan",
    "selective_state_update",
    "ssd_scan",
    "ssd_state_update",
    "triton_available",
]
