"""Sampling a token from logits: the rule ``generate(do_sample=True)`` draws with, in C and in PyTorch.

One rule for every decode loop, so a sampled run is the same whichever loop runs it:

    s = (logits - max) / temperature, p = exp(s)      (float64; the top token's p is exactly 1)
    top_k  keeps s >= the k-th largest s              (ties with it stay)
    top_p  ranks the tokens by (p descending, id ascending) and keeps those whose mass ranked above them is
           < top_p * Z, Z the sum of p (the top token always stays)
    min_p  keeps p >= min_p                             (min_p times the top token's probability)
    draw   the first id whose running sum of p exceeds u * (the sum of p), u uniform in [0, 1)

The token is a function of the logits and one uniform ``u``. ``generate`` gives row i's t-th sampled token the
t-th uniform of row i's generator (:class:`Uniforms`), so a row samples the same alone or in a batch, step by
step or in the compiled many-steps loop (``seqlab.fused_step.fused_lm_greedy``), which runs the same C code
(kernels/csrc/seqlab_sample.h) as :func:`sample`. :func:`sample_reference` is that code's PyTorch twin (used
where the compiled kernels are not available; it can differ from the C code only where u * Z falls within
rounding of a boundary between two tokens' running sums).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from seqlab.errors import InputError

__all__ = ["SamplingOptions", "Uniforms", "probabilities", "sample", "sample_reference"]


@dataclass(frozen=True)
class SamplingOptions:
    """``temperature`` > 0; ``top_k`` (None: all), ``top_p`` in (0, 1] (None: 1), ``min_p`` in [0, 1) (None: 0),
    as ``generate`` checks them."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.temperature < math.inf:
            raise InputError(f"temperature must be finite and > 0 to sample, got {self.temperature!r}")
        check_filters(self.top_k, self.top_p, self.min_p)

    def struct(self):
        """The options as step.c's ``st_sampling``."""
        from seqlab.fused_step import _Sampling

        return _Sampling(
            float(self.temperature),
            0 if self.top_k is None else int(self.top_k),
            1.0 if self.top_p is None else float(self.top_p),
            0.0 if self.min_p is None else float(self.min_p),
        )


def check_filters(top_k, top_p, min_p) -> None:
    """InputError naming the first of ``top_k``, ``top_p``, ``min_p`` out of its range (``generate`` checks its
    arguments with it too)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and not 0 <= min_p < 1:
        raise InputError(f"min_p must be in [0, 1), got {min_p!r}")


def unsampleable(row: int) -> InputError:
    return InputError(
        f"cannot sample row {row}: its logits hold NaN or +inf, or are all -inf (the model's output is broken)"
    )


def _checked(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise InputError(f"logits must be (rows, vocab), got shape {tuple(logits.shape)}")
    x = logits.detach().to(torch.float64)
    bad = x.isnan().any(-1) | (x == math.inf).any(-1) | (x == -math.inf).all(-1)
    if bool(bad.any()):
        raise unsampleable(int(bad.nonzero()[0, 0]))
    return x


def _per_row(uniforms: torch.Tensor, rows: int, device) -> torch.Tensor:
    """(rows,) contiguous float64 uniforms on ``device``, or InputError if there is not one per row."""
    if uniforms.numel() != rows:
        raise InputError(f"uniforms must hold one value per row ({rows}), got {uniforms.numel()}")
    return uniforms.detach().to(device, torch.float64).contiguous().reshape(-1)


def _weights(x: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """(rows, V) float64 logits -> the unnormalised kept weights p of the module's rule."""
    s = (x - x.max(dim=-1, keepdim=True).values) / options.temperature
    p = torch.exp(s)
    vocab = x.shape[-1]
    if options.top_k is not None and options.top_k < vocab:
        kth = torch.topk(s, options.top_k, dim=-1).values[:, -1:]
        p = p.masked_fill(s < kth, 0.0)
    if options.top_p is not None and options.top_p < 1:
        total = p.cumsum(dim=-1)[:, -1:]  # summed in id order, as the C code sums
        ranked, order = torch.sort(p, dim=-1, descending=True, stable=True)  # ties: the lower id first
        before = torch.cat([torch.zeros_like(ranked[:, :1]), ranked.cumsum(dim=-1)[:, :-1]], dim=-1)
        drop = before >= options.top_p * total
        drop[:, 0] = False
        p = p.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
    if options.min_p is not None and options.min_p > 0:
        p = p.masked_fill(p < options.min_p, 0.0)
    return p


def probabilities(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """(rows, V) logits -> (rows, V) float64 on their device: the distribution :func:`sample` draws each row's
    token from (speculative decoding's target law too, ``seqlab.decoding.acceptance.Sampling``)."""
    p = _weights(_checked(logits), options)
    return p / p.sum(dim=-1, keepdim=True)


def sample_reference(logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """The module's rule in PyTorch (float64): one token per row of (rows, V) ``logits``, row j drawn with
    ``uniforms[j]`` in [0, 1). Returns (rows,) int64."""
    p = _weights(_checked(logits), options)
    running = p.cumsum(dim=-1)
    u = _per_row(uniforms, p.shape[0], running.device)[:, None]
    chosen = torch.searchsorted(running, u * running[:, -1:], right=True)[:, 0]  # first id with running > u Z
    return chosen.clamp_max(p.shape[-1] - 1)


def sample(logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """One token per row of (rows, V) ``logits`` by the module's rule, row j drawn with ``uniforms[j]``: the
    compiled sampler (the one the compiled decode loop runs) where the native kernels build, else
    :func:`sample_reference`. Returns (rows,) int64 on the logits' device."""
    from seqlab.fused_step import _library

    lib = _library()
    if lib is None or logits.device.type != "cpu" or logits.dim() != 2:
        return sample_reference(logits, uniforms, options).to(logits.device)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # bfloat16 and float16: exact in float32
    x = logits.detach().to(dtype).contiguous()
    u = _per_row(uniforms, x.shape[0], torch.device("cpu"))
    out = torch.empty(x.shape[0], dtype=torch.int64)
    run = lib.sl_sample_f64 if dtype == torch.float64 else lib.sl_sample_f32
    options_struct = options.struct()
    code = run(x.data_ptr(), x.shape[0], x.shape[1], ctypes.addressof(options_struct), u.data_ptr(), out.data_ptr())
    if code > 0:
        raise unsampleable(int(code) - 1)
    if code < 0:
        raise MemoryError("sampling failed: out of memory for its workspace")
    return out


class Uniforms:
    """The uniforms ``generate`` samples with: row i's t-th sampled token uses the t-th value of row i's
    generator, drawn as float64 in [0, 1) in blocks of :attr:`BLOCK` (so the values do not depend on how many
    steps a loop takes at a time). Only the blocks from the earliest position still asked for are kept."""

    BLOCK = 256

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)
        self._first = [0] * len(self.generators)  # index of the first block kept, per row
        self._blocks: list[list[torch.Tensor]] = [[] for _ in self.generators]

    def take(self, rows: Sequence[int], start: int, count: int) -> torch.Tensor:
        """(len(rows), count) float64: row rows[j]'s uniforms for tokens start .. start + count - 1. Blocks
        before ``start`` are dropped (the caller never asks for an earlier position again)."""
        first, last = start // self.BLOCK, (start + count - 1) // self.BLOCK
        out = []
        for i in rows:
            blocks = self._blocks[i]
            drop = min(first - self._first[i], len(blocks))
            if drop > 0:
                del blocks[:drop]
                self._first[i] += drop
            if self._first[i] < first:  # every kept block dropped: the skipped ones are still drawn, in order
                for _ in range(first - self._first[i]):
                    torch.rand(self.BLOCK, generator=self.generators[i], dtype=torch.float64)
                self._first[i] = first
            while self._first[i] + len(blocks) <= last:
                blocks.append(torch.rand(self.BLOCK, generator=self.generators[i], dtype=torch.float64))
            offset = start - self._first[i] * self.BLOCK
            values = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
            out.append(values[offset : offset + count])
        return torch.stack(out) if out else torch.empty(0, count, dtype=torch.float64)
