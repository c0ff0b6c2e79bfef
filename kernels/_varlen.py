"""Packed variable-length rows: several sequences laid end to end in one row, their boundaries as ``cu_seqlens``.

The convention is flash-attention's, mamba_ssm's and fla's: the input has batch 1 and length ``T``; ``cu_seqlens``
is a 1-D integer tensor ``[0, e_1, e_2, ..., T]`` (N + 1 entries for N sequences, strictly increasing, so no
sequence is empty); sequence ``i`` is ``[cu_seqlens[i], cu_seqlens[i + 1])``. A scan or conv resets its state at
every boundary (or starts sequence ``i`` from ``initial_state[i]``) and returns one final state per sequence,
stacked as a batch of N. Rows of a batch of packed rows are flattened into one row whose ``cu_seqlens`` include the
row boundaries (``flatten_rows``).

``seq_idx`` (mamba_ssm's other spelling) gives the sequence number per position, shape (1, T), 0, 0, ..., 1, 1, ...
(non-decreasing, starting at 0, steps of 0 or 1); ``cu_seqlens_from_seq_idx`` turns it into ``cu_seqlens``.
"""

from __future__ import annotations

import torch

from .errors import KernelInputError


def check_cu_seqlens(cu_seqlens, batch: int, length: int, name: str = "cu_seqlens") -> torch.Tensor:
    """``cu_seqlens`` checked against an input of ``batch`` rows of ``length``; returned as int64 on its device.

    KernelInputError names what is wrong: not a 1-D integer tensor, batch != 1, not starting at 0, not ending at
    ``length``, or not strictly increasing (an empty sequence) at the first offending index."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise KernelInputError(f"{name} must be a 1-D integer torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise KernelInputError(
            f"{name} must be a 1-D integer tensor, got shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    if cu_seqlens.numel() < 2:
        raise KernelInputError(f"{name} must hold at least 2 entries ([0, length]), got {cu_seqlens.numel()}")
    if batch != 1:
        raise KernelInputError(
            f"packed rows ({name}) need an input of batch 1 (sequences laid end to end), got batch {batch}; "
            "flatten a batch of packed rows into one row (seqlab.kernels.flatten_rows)"
        )
    values = cu_seqlens.detach().to("cpu", torch.int64)
    if int(values[0]) != 0:
        raise KernelInputError(f"{name}[0] must be 0, got {int(values[0])}")
    if int(values[-1]) != length:
        raise KernelInputError(f"{name}[-1] must be the input's length {length}, got {int(values[-1])}")
    steps = values[1:] - values[:-1]
    bad = (steps <= 0).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise KernelInputError(
            f"{name} must be strictly increasing (no empty sequence): {name}[{i + 1}] = {int(values[i + 1])} "
            f"does not exceed {name}[{i}] = {int(values[i])}"
        )
    return cu_seqlens.to(torch.int64)


def cu_seqlens_from_seq_idx(seq_idx, length: int | None = None) -> torch.Tensor:
    """``seq_idx`` (1, T) or (T,) of sequence numbers 0, 0, 1, 1, 1, 2, ... -> ``cu_seqlens`` (N + 1,) int64."""
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.is_floating_point() or seq_idx.dtype == torch.bool:
        raise KernelInputError(f"seq_idx must be an integer torch.Tensor, got {type(seq_idx).__name__}")
    if seq_idx.dim() == 2:
        if seq_idx.shape[0] != 1:
            raise KernelInputError(f"seq_idx must have shape (1, T) (batch 1, packed), got {tuple(seq_idx.shape)}")
        seq_idx = seq_idx[0]
    if seq_idx.dim() != 1 or seq_idx.numel() == 0:
        raise KernelInputError(f"seq_idx must have shape (1, T) with T >= 1, got {tuple(seq_idx.shape)}")
    if length is not None and seq_idx.numel() != length:
        raise KernelInputError(f"seq_idx has {seq_idx.numel()} positions, the input {length}")
    values = seq_idx.detach().to("cpu", torch.int64)
    if int(values[0]) != 0:
        raise KernelInputError(f"seq_idx must start at 0, got {int(values[0])}")
    steps = values[1:] - values[:-1]
    bad = ((steps != 0) & (steps != 1)).nonzero()
    if bad.numel():
        i = int(bad[0, 0]) + 1
        raise KernelInputError(
            f"seq_idx must count up by 0 or 1 per position: seq_idx[{i}] = {int(values[i])} follows "
            f"{int(values[i - 1])}"
        )
    starts = (steps == 1).nonzero().flatten() + 1
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), starts, torch.tensor([values.numel()])])
    return cu.to(seq_idx.device)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` (N + 1,) -> ``seq_idx`` (1, T) int64: the sequence number of every position."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    idx = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(idx, lengths).unsqueeze(0)


def resolve_packing(cu_seqlens, seq_idx, batch: int, length: int) -> torch.Tensor | None:
    """The ``cu_seqlens`` an op runs with, from either spelling (or None: not packed); both given is refused."""
    if cu_seqlens is not None and seq_idx is not None:
        raise KernelInputError("give cu_seqlens or seq_idx, not both")
    if seq_idx is not None:
        cu_seqlens = cu_seqlens_from_seq_idx(seq_idx, length)
    if cu_seqlens is None:
        return None
    return check_cu_seqlens(cu_seqlens, batch, length)


def flatten_rows(cu_seqlens_per_row: list[torch.Tensor], row_length: int) -> torch.Tensor:
    """A batch of packed rows (b, L), each with its own ``cu_seqlens``, as one row (1, b * L): the
    ``cu_seqlens`` of the flattened row (each row's boundaries shifted by its offset)."""
    parts = [torch.zeros(1, dtype=torch.int64)]
    for r, cu in enumerate(cu_seqlens_per_row):
        cu = check_cu_seqlens(cu, 1, row_length, name=f"cu_seqlens of row {r}")
        parts.append(cu[1:].cpu() + r * row_length)
    return torch.cat(parts)


def sequence_starts(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """A bool mask (length,): True at the first position of every sequence."""
    mask = torch.zeros(length, dtype=torch.bool, device=cu_seqlens.device)
    mask[cu_seqlens[:-1]] = True
    return mask
