"""States at chosen positions of a scan or conv (``states_at=``): what speculative decoding rolls back to.

``states_at`` is a strictly increasing sequence of positions ``p`` in ``1..l``: the state after the first ``p``
elements of this call (counted from ``initial_state``). The ops return them stacked on a new dim 1, e.g.
(b, k, d, n) for the selective scan.

- The causal conv's state is its last ``w - 1`` raw inputs, so the tail at ``p`` is a slice of
  ``cat(initial_state, x)``: every backend gets it for free (``conv_tails``).
- The ``ref`` scans walk the positions anyway and keep the states they pass.
- The ``chunked`` Mamba-1 scan copies them out of its blocks' second pass, which holds every position's state
  (without autograd; with autograd it splits as below).
- The ``chunked`` Mamba-2 scan computes them from the running sums of dt * A in one contraction (short calls;
  ``ssd/chunked.py``'s ``_states_at_direct``).
- The Mamba-3 scan (every backend) and the ``triton`` scans (and the chunked ones where the above does not apply)
  split the call at the positions and
  thread the state from piece to piece (``scan_in_pieces``): exact by the kernels' chunking contract, the prefix
  is never re-run, and the cost is one kernel call per requested position (k + 1 small calls for a verifier).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from .errors import KernelInputError


def check_positions(states_at, length: int) -> tuple[int, ...]:
    """``states_at`` as a tuple of ints, strictly increasing, each in ``1..length``; KernelInputError naming the
    offending value otherwise."""
    if isinstance(states_at, (str, bytes, torch.Tensor)) or not hasattr(states_at, "__iter__"):
        raise KernelInputError(f"states_at must be a list of int positions, got {type(states_at).__name__}")
    positions: list[int] = []
    for i, p in enumerate(states_at):
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise KernelInputError(f"states_at[{i}] = {p!r} is not an int position")
        p = int(p)
        if not 1 <= p <= length:
            raise KernelInputError(f"states_at[{i}] = {p} is outside 1..{length} (the length of this call)")
        if positions and p <= positions[-1]:
            raise KernelInputError(
                f"states_at[{i}] = {p} does not come after states_at[{i - 1}] = {positions[-1]}: "
                "positions must be strictly increasing"
            )
        positions.append(p)
    return tuple(positions)


def conv_tails(x: torch.Tensor, initial_state: torch.Tensor | None, width: int, positions) -> torch.Tensor:
    """The conv state (last ``width - 1`` inputs) after each position: (b, k, d, width - 1), in the dtype the
    conv's final state has (the initial state's, else x's)."""
    b, d, _ = x.shape
    dtype = initial_state.dtype if initial_state is not None else x.dtype
    prev = x.new_zeros(b, d, width - 1, dtype=dtype) if initial_state is None else initial_state
    full = torch.cat([prev.to(dtype), x.to(dtype)], dim=-1)  # position p of this call ends at column p + w - 2
    if not positions:
        return full.new_zeros(b, 0, d, width - 1)
    return torch.stack([full[:, :, p : p + width - 1] for p in positions], dim=1)


def scan_in_pieces(
    run: Callable, sequences: dict, time_dim: int, length: int, initial_state, positions, return_final_state: bool
):
    """Run a scan op (``run(initial_state=..., return_final_state=True, **pieces)``) on the pieces between the
    positions, threading the state. ``sequences`` names the per-position arguments (None allowed), cut along
    ``time_dim``. Returns (y, final_state, states) or (y, states) like the ``states_at`` ops."""
    bounds = [0, *positions] + ([length] if not positions or positions[-1] < length else [])
    state, ys, kept = initial_state, [], []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        pieces = {name: None if t is None else t.narrow(time_dim, start, stop - start) for name, t in sequences.items()}
        y, state = run(initial_state=state, return_final_state=True, **pieces)
        ys.append(y)
        if stop in positions:
            kept.append(state)
    y_all = torch.cat(ys, dim=time_dim)
    states = _stack_states(kept, state)
    return (y_all, state, states) if return_final_state else (y_all, states)


def _stack_states(kept: list, final):
    """The kept states on a new dim 1; a state that is a tuple of tensors (Mamba-3's) part by part."""
    if isinstance(final, tuple):
        return tuple(_stack_states([k[i] for k in kept], part) for i, part in enumerate(final))
    return torch.stack(kept, dim=1) if kept else final.new_zeros(final.shape[0], 0, *final.shape[1:])
