"""GPTQ-style second-order quantization (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022): the fair baseline of issue 20 next to round-to-nearest.

The objective of one layer is ||W X - W_hat X||^2 = trace((W - W_hat) X^T X (W - W_hat)^T) (``layer_error``), with
X (tokens, in) the layer's calibration inputs, summarised by ``xtx`` = X^T X (``seqlab.quant.calibrate``). GPTQ
quantizes the input columns one at a time, in order, and after each column moves the not-yet-quantized columns to
absorb that column's rounding error (the Optimal Brain Surgeon update restricted to the remaining columns):

    H = 2 X^T X + damping * I            (damping = damp * mean(diag(2 X^T X)))
    U = the upper Cholesky factor of H^-1 (H^-1 = U^T U)
    for column j:  q_j = grid(w_j);  e_j = (w_j - q_j) / U[j, j];  w_k -= e_j * U[j, k] for every k > j

Using the rows of the Cholesky factor of H^-1 instead of re-inverting H after each column is the paper's
reformulation (it is what the sequential eliminations give, and it is numerically stable). Updates of columns past
the current block of ``block_size`` columns are batched into one matrix product per block ("lazy batch"); the
results do not depend on ``block_size`` beyond float rounding.

The grid is RTN's (``seqlab.quant.rtn``): per (row, group of ``group_size`` columns) an fp16 zero and scale from the
group's min/max. As in the paper's grouped variant, a group's grid is fixed when its first column comes up, from
the *current* weights of that group's columns, i.e. after the errors of all earlier columns were spread into them.

Dead inputs (a zero diagonal of X^T X: an input that was zero on every calibration token) have no effect on the
objective; they get H[j, j] = 1 so the factorisation exists, which decouples them (no error flows into or out of
them), so their weights are rounded to nearest as they are. (The reference implementation zeroes them instead;
keeping them means an input that is silent in the calibration set but not at inference keeps its weights.)
"""

from __future__ import annotations

import torch

from seqlab.errors import ConfigError, InputError
from seqlab.quant.rtn import (
    ScalarQuantWeight,
    check_bits,
    check_group_size,
    check_weight,
    group_grid,
    round_to_grid,
)


def layer_error(weight: torch.Tensor, w_hat: torch.Tensor, xtx: torch.Tensor) -> float:
    """trace((W - W_hat) XtX (W - W_hat)^T) in float64: the summed squared output error ||W X - W_hat X||^2 over
    the calibration tokens whose inputs gave ``xtx`` = X^T X (in, in). ``weight`` and ``w_hat`` are (out, in)."""
    if weight.shape != w_hat.shape:
        raise InputError(f"weight {tuple(weight.shape)} and w_hat {tuple(w_hat.shape)} differ in shape")
    d = weight.detach().double() - w_hat.detach().double()
    x = _check_xtx(xtx, d.shape[1])
    return float(((d @ x) * d).sum().item())


def _check_xtx(xtx: torch.Tensor, in_features: int) -> torch.Tensor:
    """xtx as float64 after checking it is a finite (in, in) tensor."""
    if not isinstance(xtx, torch.Tensor) or not xtx.is_floating_point():
        kind = xtx.dtype if isinstance(xtx, torch.Tensor) else type(xtx).__name__
        raise InputError(f"xtx must be a floating-point torch.Tensor (in, in), got {kind}")
    if tuple(xtx.shape) != (in_features, in_features):
        raise InputError(f"xtx must have shape ({in_features}, {in_features}) for this weight, got {tuple(xtx.shape)}")
    x = xtx.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise InputError("xtx has non-finite values")
    return x


def inverse_hessian_factor(xtx: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (2 xtx + damping I)^-1 in float64, with dead inputs (zero
    diagonal) given H[j, j] = 1 first; ``dead`` the boolean mask of those inputs. Raises InputError when H is not
    positive definite even after damping (xtx is not a second-moment matrix, or ``damp`` is too small)."""
    h = 2.0 * xtx.to(torch.float64)
    h = (h + h.t()) / 2
    diag = torch.diagonal(h)
    dead = diag <= 0
    if dead.any():
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise InputError(
            f"2 X^T X + damping is not positive definite (damp={damp}): xtx is not a sum of x x^T, or raise damp"
        )
    hinv = torch.cholesky_inverse(chol)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if info.item() != 0:
        raise InputError(f"the inverse Hessian lost positive definiteness (damp={damp}): raise damp")
    return u, dead


def quantize_gptq(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> ScalarQuantWeight:
    """Quantize ``weight`` (out, in) on RTN's per-group grid by GPTQ (see the module docstring).

    ``xtx``: the layer's input second moment X^T X (in, in), e.g. ``collect_input_moments(...)[name].xtx``;
    ``bits``: 2..8; ``group_size``: divides ``in``; ``damp``: damping as a fraction of the mean diagonal of H
    (the paper's 1%); ``block_size``: columns per lazy-batch block (speed only). Works in float64; deterministic.
    """
    check_bits(bits)
    w = check_weight(weight).clone()
    out_features, in_features = w.shape
    check_group_size(group_size, in_features)
    x = _check_xtx(xtx, in_features)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ConfigError(f"damp must be a positive number, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ConfigError(f"block_size must be a positive int, got {block_size!r}")
    u, _dead = inverse_hessian_factor(x, float(damp))
    n_groups = in_features // group_size
    q = torch.zeros(out_features, in_features, dtype=torch.float64)
    scales = torch.zeros(out_features, n_groups, dtype=torch.float16)
    zeros = torch.zeros(out_features, n_groups, dtype=torch.float16)
    scale = zero = scales[:, 0]
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = w[:, start:stop].clone()  # updated in place column by column
        errors = torch.zeros_like(block)
        u_block = u[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % group_size == 0:
                scale, zero = _group_grid_now(w, block, errors, u, start, stop, i, group_size, bits)
                scales[:, col // group_size] = scale
                zeros[:, col // group_size] = zero
            wc = block[:, i]
            code = round_to_grid(wc, scale, zero, bits)
            w_hat = zero.double() + scale.double() * code
            q[:, col] = code
            err = (wc - w_hat) / u_block[i, i]
            block[:, i + 1 :].addr_(err, u_block[i, i + 1 :], alpha=-1.0)
            errors[:, i] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return ScalarQuantWeight(q=q.to(torch.uint8), scales=scales, zeros=zeros, bits=bits, group_size=group_size)


def _group_grid_now(
    w: torch.Tensor,
    block: torch.Tensor,
    errors: torch.Tensor,
    u: torch.Tensor,
    start: int,
    stop: int,
    i: int,
    group_size: int,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of the group starting at column start + i, from its columns' current values: those inside the
    block from ``block`` (up to date), those past the block from ``w`` minus the block's errors so far (the lazy
    update not applied yet), so the grid does not depend on ``block_size``."""
    col = start + i
    end = col + group_size
    inside = block[:, i : min(end, stop) - start]
    if end > stop:
        pending = errors[:, :i] @ u[start : start + i, stop:end]
        current = torch.cat([inside, w[:, stop:end] - pending], dim=1)
    else:
        current = inside
    return group_grid(current, bits)
