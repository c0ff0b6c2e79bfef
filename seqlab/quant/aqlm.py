"""AQLM: additive multi-codebook quantization of one weight matrix (Egiazarian et al. 2024, "Extreme Compression of
Large Language Models via Additive Quantization").

Representation
--------------
Each group of ``g`` consecutive input weights of an output row is the sum of ``M`` codewords, one from each of ``M``
codebooks of ``2^B`` vectors of length ``g``, times a per-output-channel scale::

    W_hat[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m]]

with ``codes`` int64 ``(out, G, M)``, ``codebooks`` float32 ``(M, 2^B, g)`` and ``scales`` float32 ``(out,)``, where
``G = in_features // g``. Codebooks and scales are stored as fp16; ``quantize_aqlm`` returns them already rounded to
fp16-representable values, so what is stored is what was optimised.

Objective
---------
The calibration objective is the output error on calibration inputs ``X`` (rows are samples, ``in`` columns)::

    L = ||(W - W_hat) X^T||^2 = trace(E H E^T),   E = W - W_hat,   H = X^T X   (in x in, symmetric PSD)

``H = None`` means the identity (plain weight MSE). ``L`` is a sum of independent per-row terms ``e_o H e_o^T``, so
given codebooks and scales the codes of each output row can be chosen on their own.

Algorithm (``quantize_aqlm``)
-----------------------------
1. **Scales**: ``scales[o]`` = RMS of row ``o``, so every scaled row ``W[o] / scales[o]`` has unit RMS and one set of
   codebooks fits rows of very different magnitudes.
2. **Residual k-means**: all scaled groups (``out * G`` vectors of length ``g``) are clustered into ``2^B`` centres
   (Lloyd iterations, random-sample initialisation from a seeded generator); codebook ``m`` is fitted to the residual
   left by codebooks ``0..m-1``. The assignments are the initial codes.
3. **Alternate** for at most ``max_rounds`` rounds, stopping early when a round improves ``L`` by less than ``tol``
   (relative):

   a. **Codes by beam search** on ``L`` with codebooks and scales fixed, one row at a time (vectorised over rows).
      Each row keeps ``beam_size`` distinct candidate code assignments, all starting from the current codes. The
      sweep visits every (group ``j``, codebook ``m``) position once; at each position every beam is expanded by all
      ``2^B`` values of its code there, and the ``beam_size`` best expansions (over all beams) become the new beams.
      Because ``L`` is quadratic in ``W_hat``, the change from replacing codeword ``c`` by ``c'`` at group ``j`` is
      exact and cheap: with ``r = e H`` and ``d = s (c' - c)``, ``dL = -2 <d, r_j> + d^T H_jj d``, which expands into
      one ``(rows * beams, g + 1) x (g + 1, 2^B)`` product per position (the last column carries the precomputed
      ``c'^T H_jj c'``); ``r`` is then updated by ``d H[j-block, :]`` (within a group only ``r``'s own entries; the
      rest once per group). This is the paper's idea (exploit the quadratic form and search codes one position at a time
      with a beam); our simplification is the schedule: exactly one sweep per round, positions in a fixed order
      (group-major, then codebook), the beams collapsed to the best one at the end of the sweep; we do not claim to
      reproduce the reference implementation's search schedule. The beams stay distinct with no bookkeeping: they
      all start from the same codes (only one is live at first) and a sweep visits each position once, so at a
      position every live beam still holds the starting code there and two beams differ elsewhere; their expansions
      are therefore all distinct code assignments. With ``beam_size=1`` this is exact greedy coordinate descent.

      *Never increases L*: every beam's expansions include keeping its current code (change 0), so the best beam's
      objective can only go down from the row's starting codes; after the sweep the best beam's objective is
      recomputed exactly (float64, from scratch) and a row keeps its old codes unless the new ones are strictly better,
      so float32 drift in the incremental updates can never make it worse.
   b. **Codebooks and scales by Adam** on ``L`` with codes fixed (``adam_steps`` steps; the scales are learned as a
      multiplier of their current values so one learning rate suits both). The best parameters seen (including the
      starting ones) are kept, so this step never increases ``L`` either.
   c. **Closed-form scales**: with codes and codebooks fixed ``L`` is a one-dimensional quadratic in each row's scale,
      minimised by ``s_o = (w_o H v_o^T) / (v_o H v_o^T)`` with ``v_o`` the unscaled reconstruction; applied when it
      lowers ``L`` (it does, up to rounding).

   Hence the recorded objective (``AQLMWeight.history``: after initialisation, then after each round) never increases.
   It is measured before the final rounding of codebooks and scales to fp16, which moves ``L`` by well under 1%.
Everything is seeded from ``seed`` and runs on the CPU generator: the result is deterministic for a seed.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from seqlab.errors import ConfigError, InputError

__all__ = [
    "AQLMConfig",
    "AQLMProgress",
    "AQLMWeight",
    "objective",
    "quantize_aqlm",
]

# Elements of one (rows x candidates) score block in the beam search and of one (vectors x centres) distance block in
# k-means: bounds the working memory (~4 MiB of float32) whatever the codebook size; blocks this size stay in cache,
# measured several times faster than 64 MiB ones on a 2-core CPU.
_BLOCK_ELEMENTS = 1 << 20


#: the scale layouts of ``AQLMConfig.scales``
SCALE_LAYOUTS = ("row", "none")


@dataclass(frozen=True)
class AQLMConfig:
    """``num_codebooks`` (M) codebooks of ``2^codebook_bits`` (2^B) codewords of length ``group_size`` (g), and the
    scale layout ``scales``: ``"row"`` (one fp16 scale per output row, as AQLM does: rows of very different
    magnitudes share the codebooks) or ``"none"`` (no scales: the codebooks carry the magnitudes; 16 bits per row
    fewer)."""

    num_codebooks: int = 2
    codebook_bits: int = 8
    group_size: int = 8
    scales: str = "row"

    def __post_init__(self) -> None:
        if self.scales not in SCALE_LAYOUTS:
            raise ConfigError(f"AQLMConfig.scales must be one of {', '.join(SCALE_LAYOUTS)}, got {self.scales!r}")
        for name, low, high in (("num_codebooks", 1, None), ("codebook_bits", 1, 16), ("group_size", 1, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"AQLMConfig.{name} must be an int, got {value!r}")
            if value < low or (high is not None and value > high):
                allowed = f"in {low}..{high}" if high is not None else f">= {low}"
                raise ConfigError(f"AQLMConfig.{name} must be {allowed}, got {value}")

    @property
    def codebook_size(self) -> int:
        """Codewords per codebook, ``2^B``."""
        return 1 << self.codebook_bits

    @property
    def name(self) -> str:
        """``"MxBgG"``, e.g. ``"2x8g8"``: M codebooks of B bits over groups of g (per-row scales);
        ``"MxBgG-noscale"`` without scales."""
        base = f"{self.num_codebooks}x{self.codebook_bits}g{self.group_size}"
        return base if self.scales == "row" else f"{base}-noscale"

    @classmethod
    def parse(cls, text: str) -> AQLMConfig:
        """The config named ``"MxBgG"`` (e.g. ``"1x16g8"``) or ``"MxBgG-noscale"``; ``ConfigError`` naming the text
        otherwise."""
        match = re.fullmatch(r"\s*(\d+)x(\d+)g(\d+)(-noscale)?\s*", str(text))
        if match is None:
            raise ConfigError(
                f"AQLM config {text!r} is not of the form 'MxBgG' or 'MxBgG-noscale' (e.g. '2x8g8', '1x16g8')"
            )
        m, b, g = (int(v) for v in match.groups()[:3])
        return cls(num_codebooks=m, codebook_bits=b, group_size=g, scales="none" if match.group(4) else "row")


@dataclass
class AQLMWeight:
    """One quantized weight matrix; see the module docstring for the layout.

    ``history`` is the calibration objective after initialisation and after each round of ``quantize_aqlm`` (empty
    for a weight built by hand); it is not part of the stored format."""

    codes: Tensor
    codebooks: Tensor
    scales: Tensor
    config: AQLMConfig
    history: list[float] = field(default_factory=list, compare=False)

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1]) * self.config.group_size

    def dequantize(self, as_stored: bool = False) -> Tensor:
        """The ``(out, in)`` float32 matrix ``W_hat``. ``as_stored=True`` first rounds codebooks and scales to fp16,
        as a checkpoint stores them (a no-op for weights made by ``quantize_aqlm``, which are already rounded)."""
        codebooks = self.codebooks.float()
        scales = self.scales.float()
        if as_stored:
            codebooks = codebooks.half().float()
            scales = scales.half().float()
        return _reconstruct(self.codes, codebooks, scales)

    def storage_bits(self) -> int:
        """Exact storage bits: codes ``out * G * M * B``, codebooks ``M * 2^B * g * 16`` (fp16), scales ``out * 16``
        (none with ``scales="none"``)."""
        cfg = self.config
        out, groups = int(self.codes.shape[0]), int(self.codes.shape[1])
        codes = out * groups * cfg.num_codebooks * cfg.codebook_bits
        codebooks = cfg.num_codebooks * cfg.codebook_size * cfg.group_size * 16
        return codes + codebooks + (out * 16 if cfg.scales == "row" else 0)

    def bits_per_parameter(self) -> float:
        """``storage_bits() / (out * in)``: codebook and scale overhead included."""
        return self.storage_bits() / (self.out_features * self.in_features)


@dataclass(frozen=True)
class AQLMProgress:
    """What ``quantize_aqlm`` reports to a ``progress`` callback: after initialisation (``round == 0``) and after each
    round. ``objective`` is ``L``; ``relative`` is ``L / trace(W H W^T)`` (the error relative to the weight's own
    output energy)."""

    round: int
    max_rounds: int
    objective: float
    relative: float
    seconds: float


def _reconstruct(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """``W_hat`` from the parts (differentiable in codebooks and scales)."""
    out, groups, m = codes.shape
    k = codebooks.shape[1]
    flat = codes + k * torch.arange(m, device=codes.device).view(1, 1, m)
    summed = F.embedding(flat, codebooks.reshape(m * k, -1)).sum(dim=2)  # (out, G, g)
    return (summed.reshape(out, groups * codebooks.shape[-1]) * scales.view(-1, 1)).float()


def _row_losses(weight: Tensor, w_hat: Tensor, h: Tensor | None) -> Tensor:
    """Per-row ``e_o H e_o^T`` in float64."""
    e = weight.double() - w_hat.double()
    if h is None:
        return (e * e).sum(dim=1)
    return ((e @ h.double()) * e).sum(dim=1)


def objective(weight: Tensor, w_hat: Tensor, xtx: Tensor | None = None) -> float:
    """``trace((W - W_hat) XtX (W - W_hat)^T)`` = ``||(W - W_hat) X^T||^2`` for ``xtx = X^T X``; ``xtx=None`` is the
    identity (squared Frobenius error). Computed in float64."""
    weight = _check_weight(weight, "weight")
    if tuple(w_hat.shape) != tuple(weight.shape):
        raise InputError(f"w_hat has shape {tuple(w_hat.shape)}, the weight {tuple(weight.shape)}")
    h = _check_xtx(xtx, weight.shape[1])
    return float(_row_losses(weight, w_hat, h).sum())


def _check_weight(weight: object, name: str) -> Tensor:
    if not isinstance(weight, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise InputError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(weight.shape)})")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise InputError(f"{name} has {bad} non-finite values (NaN or inf)")
    return weight.detach().float().cpu()


def _check_xtx(xtx: object, in_features: int) -> Tensor | None:
    if xtx is None:
        return None
    if not isinstance(xtx, Tensor):
        raise InputError(f"xtx must be a torch.Tensor or None, got {type(xtx).__name__}")
    if tuple(xtx.shape) != (in_features, in_features):
        raise InputError(
            f"xtx must have shape (in_features, in_features) = ({in_features}, {in_features}), got {tuple(xtx.shape)}"
        )
    if not xtx.is_floating_point():
        raise InputError(f"xtx must be a floating-point tensor, got {xtx.dtype}")
    if not bool(torch.isfinite(xtx).all()):
        bad = int((~torch.isfinite(xtx)).sum())
        raise InputError(f"xtx has {bad} non-finite values (NaN or inf)")
    h = xtx.detach().double().cpu()
    return ((h + h.T) / 2).float()


def _kmeans(data: Tensor, k: int, iters: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of ``data`` (N, g) into ``k`` centres; returns (centres (k, g), assignment (N,)).

    Initialisation: ``k`` distinct data points drawn by the seeded generator (when ``N < k`` the points are reused with
    a little seeded noise so the centres differ). An empty cluster keeps its centre."""
    n, g = data.shape
    if n >= k:
        centres = data[torch.randperm(n, generator=gen)[:k]].clone()
    else:
        pick = torch.cat([torch.randperm(n, generator=gen), torch.randint(0, n, (k - n,), generator=gen)])
        centres = data[pick].clone()
        spread = data.std() if n > 1 else torch.tensor(1.0)
        centres[n:] += 1e-2 * float(spread) * torch.randn(k - n, g, generator=gen)
    assign = _nearest(data, centres)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k).to(data.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled].unsqueeze(1)
        new = _nearest(data, centres)
        if torch.equal(new, assign):
            break
        assign = new
    return centres, assign


def _nearest(data: Tensor, centres: Tensor) -> Tensor:
    """Index of the nearest centre of each row of ``data`` (squared Euclidean), in blocks bounded by memory."""
    norms = (centres * centres).sum(dim=1)
    step = max(1, _BLOCK_ELEMENTS // centres.shape[0])
    out = torch.empty(data.shape[0], dtype=torch.int64)
    for start in range(0, data.shape[0], step):
        block = data[start : start + step]
        out[start : start + step] = torch.addmm(norms, block, centres.T, alpha=-2).argmin(dim=1)
    return out


def _residual_kmeans(groups: Tensor, config: AQLMConfig, iters: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Codebooks (M, K, g) and codes (N, M): codebook m clusters the residual left by codebooks 0..m-1."""
    residual = groups.clone()
    books, codes = [], []
    for _ in range(config.num_codebooks):
        centres, assign = _kmeans(residual, config.codebook_size, iters, gen)
        residual -= centres[assign]
        books.append(centres)
        codes.append(assign)
    return torch.stack(books), torch.stack(codes, dim=1)


def _beam_search(
    weight: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    h: Tensor,
    beam_size: int,
) -> Tensor:
    """One beam-search sweep over every (group, codebook) position, per row; see the module docstring. Returns new
    codes (out, G, M); a row's codes change only when its exact objective strictly decreases."""
    out, groups, m_books = codes.shape
    k, g = codebooks.shape[1], codebooks.shape[2]
    beam = max(1, beam_size)
    # c'^T H_jj c' for every codebook, group and codeword: (M, G, K)
    blocks = torch.stack([h[j * g : (j + 1) * g, j * g : (j + 1) * g] for j in range(groups)])  # (G, g, g)
    chc = torch.einsum("mkg,jgh,mkh->mjk", codebooks, blocks, codebooks)
    old_losses = _row_losses(weight, _reconstruct(codes, codebooks, scales), h)
    new_codes = codes.clone()
    rows_per_block = max(1, _BLOCK_ELEMENTS // (beam * k))
    for start in range(0, out, rows_per_block):
        stop = min(out, start + rows_per_block)
        s = scales[start:stop]
        rows = stop - start
        bc = codes[start:stop].unsqueeze(1).repeat(1, beam, 1, 1)  # (R, beam, G, M)
        e = weight[start:stop] - _reconstruct(codes[start:stop], codebooks, s)
        r0 = e @ h
        rb = r0.unsqueeze(1).repeat(1, beam, 1)  # (R, beam, in): e_b H for each beam
        lb = torch.full((rows, beam), math.inf)
        lb[:, 0] = (r0 * e).sum(dim=1)  # only beam 0 is alive at the start: the others are copies of it
        s1 = s.view(rows, 1, 1)
        row_index = torch.arange(rows).unsqueeze(1)
        sq = (s * s).view(rows, 1, 1).expand(rows, beam, 1)
        for j in range(groups):
            cols = slice(j * g, (j + 1) * g)
            hj = blocks[j]
            # Within group j only r's entries in the group (rj) and H_jj are needed: the full (R, beam, in) residual
            # and the codes are re-gathered once per group through the composed parent index ``origin``.
            local = bc[:, :, j, :].clone()  # (R, beam, M)
            rj = rb[:, :, cols].clone()
            moved = torch.zeros(rows, beam, g)  # total change of W_hat's group j in each beam since the group began
            origin = torch.arange(beam).expand(rows, beam)
            for m in range(m_books):
                book = codebooks[m]  # (K, g)
                cur = local[:, :, m]  # (R, beam)
                cw = book[cur]  # (R, beam, g)
                chw = cw @ hj
                q = rj + s1 * chw
                base = lb + 2 * s1.squeeze(2) * (cw * rj).sum(-1) + sq.squeeze(2) * (chw * cw).sum(-1)
                base = base.masked_fill(~torch.isfinite(lb), math.inf)  # beams not live yet expand to nothing
                # scores[b, c'] = base_b - 2 s q_b . c' + s^2 c'^T H_jj c' as one product with an augmented column
                lhs = torch.cat([-2 * s1 * q, sq], dim=2).reshape(rows * beam, g + 1)
                rhs = torch.cat([book, chc[m, j].unsqueeze(1)], dim=1)  # (K, g + 1)
                scores = torch.addmm(base.reshape(rows * beam, 1), lhs, rhs.T)
                values, flat = scores.reshape(rows, beam * k).topk(beam, dim=1, largest=False)
                parent = flat // k
                value = flat % k
                local = local[row_index, parent]  # (advanced indexing: faster than gather here, and a copy)
                old = local[:, :, m]
                d = s1 * (book[value] - book[old])  # (R, beam, g)
                rj = rj[row_index, parent] - d @ hj
                moved = moved[row_index, parent] + d
                origin = origin[row_index, parent]
                local[:, :, m] = value
                lb = values
            bc = bc[row_index, origin]
            bc[:, :, j, :] = local
            rb = rb[row_index, origin] - moved @ h[cols, :]
        best = lb.argmin(dim=1)
        new_codes[start:stop] = bc[torch.arange(rows), best]
    new_losses = _row_losses(weight, _reconstruct(new_codes, codebooks, scales), h)
    keep_old = ~(new_losses < old_losses)
    new_codes[keep_old] = codes[keep_old]
    return new_codes


def _adam(
    weight: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    h: Tensor,
    steps: int,
    lr: float,
    norm: float,
    learn_scales: bool = True,
) -> tuple[Tensor, Tensor, float]:
    """Adam on codebooks and (``learn_scales``) scale multipliers with codes fixed; returns the best (codebooks,
    scales, loss) seen."""
    books = codebooks.clone().requires_grad_(True)
    mult = torch.ones_like(scales, requires_grad=learn_scales)
    opt = torch.optim.Adam([books, mult] if learn_scales else [books], lr=lr)
    best_books, best_scales = codebooks.clone(), scales.clone()
    best = math.inf
    for step in range(steps + 1):
        # L = sum((e H) * e) with e = W - W_hat and dL/dW_hat = -2 e H (H symmetric): one (out, in) x (in, in) product
        # per step, handed to autograd as W_hat's gradient, instead of the three that autograd would do through L.
        w_hat = _reconstruct(codes, books, scales * mult)
        with torch.no_grad():
            e = weight - w_hat
            r = e @ h
            value = float((r * e).sum()) / norm
        if value < best:
            best = value
            best_books, best_scales = books.detach().clone(), (scales * mult).detach().clone()
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        w_hat.backward(gradient=r.mul_(-2 / norm))
        opt.step()
    return best_books, best_scales, best * norm


def _closed_form_scales(weight: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, h: Tensor) -> Tensor:
    """Per-row minimiser of ``L`` over the scale alone: ``(w H v^T) / (v H v^T)`` with ``v`` the unscaled rows."""
    v = _reconstruct(codes, codebooks, torch.ones_like(scales)).double()
    hv = v @ h.double()
    den = (hv * v).sum(dim=1)
    num = (hv * weight.double()).sum(dim=1)
    ok = den > 0
    new = scales.double().clone()
    new[ok] = num[ok] / den[ok]
    return new.float()


def quantize_aqlm(
    weight: Tensor,
    xtx: Tensor | None,
    config: AQLMConfig | None = None,
    *,
    beam_size: int = 8,
    max_rounds: int = 8,
    adam_steps: int = 50,
    lr: float = 3e-3,
    kmeans_iters: int = 20,
    seed: int = 0,
    tol: float = 1e-3,
    progress: Callable[[AQLMProgress], object] | bool | None = None,
    num_threads: int | None = None,
) -> AQLMWeight:
    """Quantize ``weight`` (out, in) with AQLM, minimising ``||(W - W_hat) X^T||^2`` for ``xtx = X^T X`` (``None``:
    identity). See the module docstring for the algorithm and why it never increases the objective.

    ``max_rounds=0`` returns the initialisation (RMS scales, residual k-means codebooks and codes). ``progress`` is a
    callable receiving an ``AQLMProgress`` after initialisation and each round, or ``True`` for a tqdm bar. The
    returned ``history`` lists the objective after initialisation and each round; codebooks and scales come back
    rounded to fp16-representable values (what a checkpoint stores).

    ``num_threads`` sets torch's intra-op threads for the call (restored after): the work is many small tensor
    operations, which run several times faster on one thread than on two when the CPU is shared with other jobs."""
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ConfigError(f"num_threads must be an int >= 1 or None, got {num_threads!r}")
    saved = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _quantize(weight, xtx, config, beam_size, max_rounds, adam_steps, lr, kmeans_iters, seed, tol, progress)
    finally:
        if num_threads is not None:
            torch.set_num_threads(saved)


def _quantize(
    weight: Tensor,
    xtx: Tensor | None,
    config: AQLMConfig | None,
    beam_size: int,
    max_rounds: int,
    adam_steps: int,
    lr: float,
    kmeans_iters: int,
    seed: int,
    tol: float,
    progress: Callable[[AQLMProgress], object] | bool | None,
) -> AQLMWeight:
    config = AQLMConfig() if config is None else config
    if not isinstance(config, AQLMConfig):
        raise ConfigError(f"config must be an AQLMConfig, got {type(config).__name__}")
    w = _check_weight(weight, "weight")
    out, in_features = w.shape
    g = config.group_size
    if in_features % g != 0:
        raise InputError(
            f"group_size {g} does not divide in_features {in_features} (weight shape {tuple(w.shape)}, "
            f"config {config.name})"
        )
    h_opt = _check_xtx(xtx, in_features)
    for name, value, low in (("beam_size", beam_size, 1), ("max_rounds", max_rounds, 0), ("adam_steps", adam_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
        raise ConfigError(f"kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"tol must be a finite number >= 0, got {tol!r}")

    started = time.perf_counter()
    h = torch.eye(in_features) if h_opt is None else h_opt
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // g
    norm = float(_row_losses(w, torch.zeros_like(w), h).sum())
    norm = norm if norm > 0 else 1.0

    # (1) scales: row RMS (ones without scales), (2) residual k-means on the scaled groups
    learn_scales = config.scales == "row"
    scales = w.pow(2).mean(dim=1).sqrt() if learn_scales else torch.ones(out)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = (w / scales.unsqueeze(1)).reshape(out * groups, g)
    codebooks, flat_codes = _residual_kmeans(scaled, config, kmeans_iters, gen)
    codes = flat_codes.reshape(out, groups, config.num_codebooks)

    def loss_of(c: Tensor, books: Tensor, sc: Tensor) -> float:
        return float(_row_losses(w, _reconstruct(c, books, sc), h).sum())

    current = loss_of(codes, codebooks, scales)
    history = [current]
    bar = None
    callback: Callable[[AQLMProgress], object] | None = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_rounds, desc=f"AQLM {config.name} {out}x{in_features}", leave=False)
    elif callable(progress):
        callback = progress

    def report(round_index: int) -> None:
        event = AQLMProgress(round_index, max_rounds, current, current / norm, time.perf_counter() - started)
        if callback is not None:
            callback(event)
        if bar is not None:
            if round_index > 0:
                bar.update(1)
            bar.set_postfix(relative=f"{event.relative:.4g}")

    report(0)
    try:
        for round_index in range(1, max_rounds + 1):
            previous = current
            # (3a) codes by beam search (never worse per row)
            codes = _beam_search(w, codes, codebooks, scales, h, beam_size)
            current = loss_of(codes, codebooks, scales)
            # (3b) codebooks and scales by Adam (best seen, start included)
            if adam_steps > 0:
                books, new_scales, _ = _adam(w, codes, codebooks, scales, h, adam_steps, lr, norm, learn_scales)
                trial = loss_of(codes, books, new_scales)
                if trial < current:
                    codebooks, scales, current = books, new_scales, trial
            # (3c) closed-form per-row scales
            if learn_scales:
                new_scales = _closed_form_scales(w, codes, codebooks, scales, h)
                trial = loss_of(codes, codebooks, new_scales)
                if trial < current:
                    scales, current = new_scales, trial
            history.append(current)
            report(round_index)
            if previous <= 0 or (previous - current) / previous < tol:
                break
    finally:
        if bar is not None:
            bar.close()

    # stored precision: fp16 codebooks and scales
    codebooks = codebooks.half().float()
    scales = scales.half().float()
    if not (bool(torch.isfinite(codebooks).all()) and bool(torch.isfinite(scales).all())):
        raise InputError("the quantized codebooks or scales overflow fp16; the weight's values are too large")
    return AQLMWeight(codes=codes, codebooks=codebooks, scales=scales, config=config, history=history)
