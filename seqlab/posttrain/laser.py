"""LASER: LAyer-SElective Rank reduction (issue 21; Sharma, Ash & Misra 2023, "The Truth is in There").

LASER replaces one chosen weight matrix W (out, in) of a trained model by its best rank-r approximation and keeps
the change when a held-out score improves. This module holds the library part, generic over models and scores:

* :class:`LowRankLinear`, the layer that stands in for an ``nn.Linear``: two factors ``left`` (out, r) and
  ``right`` (r, in) with ``W ~= left @ right``, computed as two thin matmuls (never the dense matrix). Mixers reach
  their projections only through ``project_rows`` / ``project_no_bias`` / module calls
  (``seqlab.mixers.base``), so any module with ``forward`` and ``matmul`` works there: Mamba-1 (in/x/dt/out
  projections), Mamba-2 (in/out), attention (q/k/v/o) and the dense MLP (gate_up/down).
* :func:`rank_for` (the rank rule) and :class:`Intervention` (which matrix, at which fraction ``rho`` of its
  maximum rank), :func:`intervention_targets` (what may be named), :func:`apply_interventions` (in place, with an
  exact undo) and :func:`laser_applied` (the same as a context manager).
* :func:`laser_search`: the baseline score, then every (layer, kind, rho) cell, then an optional greedy
  composition; a :class:`LaserReport` (JSON round trip, :func:`plot_heatmap`). :func:`stream_scorer` builds the
  usual score, held-out metric streamed with the state carried (``seqlab.streaming.stream_metric``).
* Storage: ``seqlab.checkpoint.save_model`` / ``load_model`` call :func:`save_low_rank` / :func:`load_low_rank`
  for a model with ``model.low_rank``, so the file holds the factors, not the dense matrices, and
  ``model_from_checkpoint`` rebuilds a LASER'd model like any model.
* :func:`densify`: back to an ordinary full-rank model with the same outputs (how a LASER'd model is quantized).

**The factorization.** ``torch.linalg.svd`` of W in float64 gives W = U diag(S) V^T with S sorted descending. The
truncated SVD keeps the r largest singular components, W_r = U_r diag(S_r) V_r^T, which by Eckart–Young is the
closest rank-r matrix to W in both the Frobenius norm (error sqrt(sum_{i>r} S_i^2)) and the spectral norm (error
S_{r+1}). The singular values are split evenly, ``left = U_r diag(sqrt(S_r))`` and ``right = diag(sqrt(S_r)) V_r^T``
(balanced factors: both have the same scale, which keeps a later fine-tune of the factors well conditioned), then
cast to the weight's dtype. ``method="random"`` is the control of the same size: it keeps r singular components
chosen uniformly at random without replacement (seeded), not the top r, so a gain that the top components give and
random ones do not is the rank reduction's and not the parameter count's.

**The rank rule.** ``rank_for((out, in), rho) = max(1, floor(rho * min(out, in)))``: LASER keeps a fraction rho in
(0, 1] of the maximum rank (the floor forgives float rounding of 1e-9, so ``0.29 * 100`` is 29). The factors hold
``r * (out + in)`` numbers against the matrix's ``out * in``; a rank where they would not be smaller is refused
(``ConfigError`` naming the layer) unless ``allow_larger=True``, and the search skips such cells.

**Naming.** An intervention names a target by its layer index and ``kind``, the target's module name after
``backbone.layers.{i}.``, as ``seqlab.quant.calibrate.linear_layers`` lists it: ``mixer.in_proj``,
``mixer.out_proj``, ``mixer.x_proj``, ``mixer.dt_proj``, ``mixer.q_proj`` ..., ``ffn.gate_up``, ``ffn.down``; an
MoE expert's slice of the stacked parameters is ``ffn.gate_up[3]`` / ``ffn.down[3]``, and ``ffn.gate_up[*]`` means
every expert of that part. The LM head, the embedding and MoE routers are never targets.

**MoE experts.** A ``MoEFeedForward`` holds all experts in two stacked parameters run by one fused function, which
cannot hold factors. So, as AQLM does for experts, the factors of a reduced expert are kept on the model
(``model._low_rank_experts``: target name -> (left, right)) and the stacked parameter's slice holds their product
in memory (computed from the stored factors, so a file round trip reproduces it bit for bit); the file stores the
factors only, and omits a stacked parameter all of whose experts are reduced. The stacked tensors in memory
therefore do not shrink (the file does, and ``seqlab.ffn.parameter_counts`` counts the factors); fine-tuning such
a model trains the stacked slices, not the factors (the next ``save_model`` writes the stored factors, not the
trained slices: reduce experts after, not before, a fine-tune).

**The layout on the model.** ``model.low_rank`` is JSON-able: ``{target name: {"rank": r, "shape": [out, in],
"rho": rho, "method": "svd" | "random"}}``, target names in full (``backbone.layers.1.ffn.gate_up[3]``). It is
what the file records under the metadata key ``"low_rank"`` (with a ``"format"`` number).

**Quantized models.** A model that is both quantized (``model.quantization``, ``seqlab.quant.quantize_model``) and
low-rank is refused, not supported: :func:`apply_interventions` refuses a quantized model (``ConfigError``),
``quantize_model`` (and ``quantize_weights``) a LASER'd one, ``save_model`` a model carrying both layouts and
``load_model`` a file recording both. They compose as "densify, then quantize": :func:`densify` turns every
low-rank layer back into an ``nn.Linear`` holding the product ``left @ right`` (the same outputs, to float
rounding), then ``quantize_model`` quantizes that dense model as any other (``seqlab quantize --densify`` does both).
That keeps LASER's weights, and so its quality, but not its parameter saving: AQLM stores every weight of the
dense matrix at its 2-3 bits, whatever its rank. The undone layout is recorded as ``model.laser_densified`` and,
once quantized, as ``model.quantization["laser"]`` in the quantized model file. (Quantizing the factors
themselves, which would keep both savings, is not done.)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, CorruptFileError, InputError
from seqlab.safetensors_io import check_weight_names

#: the fractions of the maximum rank the search tries by default (LASER's best cells are often very small ones)
DEFAULT_RHOS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
#: how the kept singular components are chosen
METHODS = ("svd", "random")
#: version of the "low_rank" metadata entry of a model file
LOW_RANK_FORMAT = 1
#: float slack of the rank rule's floor
_RHO_SLACK = 1e-9
_PREFIX = re.compile(r"^backbone\.layers\.(?P<layer>\d+)\.(?P<kind>.+)$")
_EXPERT = re.compile(r"^(?P<moe>.+)\.(?P<part>gate_up|down)\[(?P<e>\d+)\]$")


# ---------------------------------------------------------------------------------------------- the layer
class LowRankLinear(nn.Module):
    """A linear layer whose weight is the product ``left @ right`` of two factors: ``left`` (out_features, rank),
    ``right`` (rank, in_features), both parameters (gradients reach them, so a LASER'd model can be fine-tuned),
    and an optional ``bias`` (out_features,).

    ``forward(x) = F.linear(F.linear(x, right), left, bias)``: ``rank * (in + out)`` multiply-adds per row against
    ``in * out`` for the dense layer; ``matmul(x)`` is the same without the bias (``x @ W^T``, what
    ``seqlab.mixers.base.project_no_bias`` calls). A layer built with the constructor holds zero factors, to be
    filled by ``load_state_dict``; :meth:`from_linear` factorizes an ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LowRankLinear {name} must be a positive integer, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.left = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.right = nn.Parameter(torch.zeros(rank, in_features, **factory))
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """A layer holding copies of ``left`` (out, r), ``right`` (r, in) and ``bias`` (out,) or None."""
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ConfigError(f"factors must be (out, r) and (r, in), got {tuple(left.shape)} and {tuple(right.shape)}")
        out, rank = left.shape
        layer = cls(int(right.shape[1]), int(out), int(rank), bias is not None, device=left.device, dtype=left.dtype)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right.to(left.dtype))
            if bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(bias.to(left.dtype))
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, *, method: str = "svd", seed: int = 0, allow_larger: bool = False
    ) -> LowRankLinear:
        """The rank-``rank`` layer of ``linear``'s weight (:func:`factorize`: the truncated SVD, or with
        ``method="random"`` r singular components chosen at random with ``seed``), the bias copied. The layer
        gets the weight's dtype, device, ``requires_grad`` and ``linear``'s training flag; ``linear`` is untouched.
        A rank at which the factors would not be smaller than the matrix is a ConfigError unless
        ``allow_larger``."""
        weight = linear.weight
        out, inp = weight.shape
        _check_size(type(linear).__name__, (int(out), int(inp)), rank, allow_larger)
        left, right = factorize(weight.detach(), rank, method=method, seed=seed)
        layer = cls.from_factors(left, right, None if linear.bias is None else linear.bias.detach())
        for p in layer.parameters():
            p.requires_grad_(weight.requires_grad)
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.right), self.left, self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` without the bias."""
        return F.linear(F.linear(x, self.right), self.left)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) product ``left @ right``, for code that reads a layer's weight.
        Costs a fresh ``out * in`` tensor and ``out * in * rank`` multiply-adds on every read (differentiable; not a
        parameter, writing to it changes nothing): compute with :meth:`forward` / :meth:`matmul` instead."""
        return self.left @ self.right

    def parameter_saving(self) -> int:
        """Numbers saved against the dense weight: ``out * in - rank * (out + in)`` (the bias is the same)."""
        return self.out_features * self.in_features - self.rank * (self.out_features + self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


def factorize(weight: torch.Tensor, rank: int, *, method: str = "svd", seed: int = 0):
    """``(left, right)`` with ``left @ right`` the rank-``rank`` approximation of ``weight`` (out, in) (module
    docstring): the SVD in float64, the kept components' singular values split as sqrt on both sides, the factors
    cast to ``weight``'s dtype. ``method``: ``"svd"`` keeps the ``rank`` largest components (the truncated SVD, the
    best rank-r approximation); ``"random"`` keeps ``rank`` components drawn without replacement by a generator
    seeded with ``seed`` (kept in ascending index order)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if weight.dim() != 2:
        raise ConfigError(f"factorize needs a 2-D weight, got shape {tuple(weight.shape)}")
    full = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"rank must be an integer in 1..{full} (min of the weight's shape), got {rank!r}")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return _keep(u, s, vh, rank, method, seed, weight.dtype)


def _keep(u, s, vh, rank: int, method: str, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the kept components of an SVD (:func:`factorize`)."""
    if method == "svd":
        keep = torch.arange(rank, device=s.device)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        keep = torch.randperm(s.shape[0], generator=generator)[:rank].sort().values.to(s.device)
    root = s[keep].sqrt()
    return (u[:, keep] * root).to(dtype), (root[:, None] * vh[keep]).to(dtype)


# ---------------------------------------------------------------------------------------------- the rank rule
def _check_rho(rho: object) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or not 0 < rho <= 1:
        raise ConfigError(f"rho must be a number in (0, 1] (the fraction of the maximum rank kept), got {rho!r}")
    return float(rho)


def rank_for(shape: Sequence[int], rho: float) -> int:
    """The rank LASER keeps of an (out, in) matrix at fraction ``rho`` of its maximum rank:
    ``max(1, floor(rho * min(out, in)))`` (the floor with 1e-9 of float slack). ConfigError unless 0 < rho <= 1."""
    rho = _check_rho(rho)
    if len(shape) != 2 or min(int(v) for v in shape) < 1:
        raise ConfigError(f"rank_for needs an (out, in) shape of positive sizes, got {tuple(shape)}")
    return max(1, math.floor(rho * min(int(v) for v in shape) + _RHO_SLACK))


def factor_size(shape: Sequence[int], rank: int) -> int:
    """Numbers the factors of a rank-``rank`` (out, in) matrix hold: ``rank * (out + in)``."""
    return int(rank) * (int(shape[0]) + int(shape[1]))


def _check_size(name: str, shape: tuple[int, int], rank: int, allow_larger: bool) -> None:
    if not allow_larger and factor_size(shape, rank) >= shape[0] * shape[1]:
        raise ConfigError(
            f"{name}: rank {rank} factors of the {shape[0]}x{shape[1]} matrix hold {factor_size(shape, rank)} numbers, "
            f"not fewer than its {shape[0] * shape[1]}; pick a smaller rho or pass allow_larger=True"
        )


# ---------------------------------------------------------------------------------------------- naming
@dataclass(frozen=True)
class Intervention:
    """Reduce the target ``kind`` of layer ``layer`` (the name after ``backbone.layers.{layer}.``, e.g.
    ``mixer.in_proj``, ``ffn.down``, ``ffn.gate_up[3]`` or ``ffn.gate_up[*]`` for every expert) to the rank
    :func:`rank_for` gives at ``rho``."""

    layer: int
    kind: str
    rho: float

    @property
    def name(self) -> str:
        return f"backbone.layers.{self.layer}.{self.kind}"


@dataclass(eq=False)
class _Target:
    """One reducible matrix: an ``nn.Linear`` (``expert`` None) or expert ``expert`` of ``module.<part>``."""

    name: str
    layer: int
    kind: str
    module: nn.Module
    part: str | None = None
    expert: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.part is None:
            if isinstance(self.module, LowRankLinear):
                return (self.module.out_features, self.module.in_features)
            w = self.module.weight
            assert isinstance(w, torch.Tensor)
            return (int(w.shape[0]), int(w.shape[1]))
        stacked = getattr(self.module, self.part)
        return (int(stacked.shape[1]), int(stacked.shape[2]))


def _targets(model: nn.Module) -> dict[str, _Target]:
    """Every reducible matrix of ``model`` by full name, in module order: the targets of
    ``seqlab.quant.calibrate.linear_layers`` inside ``backbone.layers`` (MoE experts in index order, gate_up then
    down) and the layers already reduced (``LowRankLinear``)."""
    from seqlab.quant.calibrate import linear_layers

    listed: dict[str, list] = {}
    for t in linear_layers(model):
        key = t.name[: t.name.rindex(f".{t.part}[")] if t.part is not None else t.name
        listed.setdefault(key, []).append(t)
    out: dict[str, _Target] = {}
    for name, module in model.named_modules():
        found = [(t.name, t.module, t.part, t.expert) for t in listed.get(name, [])]
        if isinstance(module, LowRankLinear):
            found = [(name, module, None, None)]
        for full, owner, part, expert in found:
            match = _PREFIX.match(full)
            if match is not None:
                out[full] = _Target(full, int(match["layer"]), match["kind"], owner, part, expert)
    return out


def intervention_targets(model: nn.Module) -> list[tuple[int, str]]:
    """The ``(layer, kind)`` pairs :class:`Intervention` may name on ``model``, in module order: every target of
    ``seqlab.quant.calibrate.linear_layers`` inside ``backbone.layers`` (each MoE expert's slice as
    ``ffn.gate_up[e]`` / ``ffn.down[e]``; ``ffn.gate_up[*]`` is accepted as well), including layers already
    reduced."""
    return [(t.layer, t.kind) for t in _targets(model).values()]


def _wildcard_kinds(targets: Iterable[_Target]) -> dict[tuple[int, str], list[_Target]]:
    groups: dict[tuple[int, str], list[_Target]] = {}
    for t in targets:
        if t.expert is not None:
            groups.setdefault((t.layer, t.kind[: t.kind.rindex("[")] + "[*]"), []).append(t)
    return groups


def _resolve(model: nn.Module, intervention: Intervention | LaserCell, targets: dict[str, _Target]) -> list[_Target]:
    """The targets one intervention names (several for a ``[*]`` kind); ConfigError listing the valid ones."""
    if isinstance(intervention, LaserCell):
        intervention = intervention.intervention()
    if not isinstance(intervention, Intervention):
        raise ConfigError(f"interventions must be Intervention(layer, kind, rho), got {intervention!r}")
    layer, kind = intervention.layer, intervention.kind
    _check_rho(intervention.rho)
    layers = sorted({t.layer for t in targets.values()})
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in layers:
        valid = f"{layers[0]}..{layers[-1]}" if layers else "none"
        raise ConfigError(
            f"Intervention layer {layer!r} is not a layer of this model with reducible matrices ({valid})"
        )
    if not isinstance(kind, str):
        raise ConfigError(f"Intervention kind must be a string such as 'mixer.in_proj', got {kind!r}")
    own = [t for t in targets.values() if t.layer == layer]
    wild = _wildcard_kinds(own)
    if (layer, kind) in wild:
        return wild[(layer, kind)]
    hit = targets.get(intervention.name)
    if hit is None:
        kinds = [t.kind for t in own if t.expert is None]
        kinds += [k for _, k in wild]
        experts = [t.kind for t in own if t.expert is not None]
        if experts:
            kinds.append(f"{experts[0]} .. {experts[-1]}")
        raise ConfigError(f"layer {layer} has no reducible matrix {kind!r}; its kinds: {', '.join(kinds)}")
    return [hit]


# ---------------------------------------------------------------------------------------------- apply / revert
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _product(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An expert slice's value from its factors (the one formula used at apply and at load: bit-identical)."""
    return (left @ right).to(dtype)


def _seed_for(seed: int, name: str) -> int:
    """The random control's seed of one target: depends on the run's seed and the target only (not on the order)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


_MISSING = object()


class AppliedInterventions:
    """What :func:`apply_interventions` changed, and its exact undo: :meth:`revert` puts the original
    ``nn.Linear`` modules back (the same objects, never copied, so bit for bit) and each reduced expert slice's
    saved values, and restores ``model.low_rank``. Reverting twice is a no-op; several applications on one model
    are reverted in reverse order (else ConfigError). Also a context manager: ``with apply_interventions(model,
    [...]) as reduced:`` (``reduced`` is the model itself) reverts on exit, also when the block raises."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: list[tuple[nn.Module, str, nn.Module, LowRankLinear]] = []
        self.slices: list[tuple[torch.Tensor, int, torch.Tensor, str, tuple]] = []
        self.previous_layout: object = getattr(model, "low_rank", _MISSING)
        self.previous_experts: object = getattr(model, "_low_rank_experts", _MISSING)
        self.layout: dict[str, dict] = {}
        self.reverted = False
        self.stale = False

    def __enter__(self) -> nn.Module:
        """``with apply_interventions(model, [...]) as reduced:`` gives the (reduced) model and reverts on exit."""
        return self.model

    def __exit__(self, *exc) -> None:
        self.revert()

    @property
    def names(self) -> list[str]:
        """The full names of the reduced targets."""
        return list(self.layout)

    def revert(self) -> None:
        if self.reverted:
            return
        if self.stale:
            raise ConfigError(
                "this model was loaded from a LASER file or densified since these interventions: cannot revert them"
            )
        model = self.model
        stack = getattr(model, "_laser_undo", [])
        if stack and stack[-1] is not self:
            raise ConfigError("revert LASER interventions in the reverse order of applying them")
        for parent, leaf, _, installed in self.modules:
            if getattr(parent, leaf) is not installed:
                raise ConfigError("revert LASER interventions in the reverse order of applying them")
        experts = getattr(model, "_low_rank_experts", {})
        for _, _, _, name, factors in self.slices:
            if experts.get(name) is not factors:
                raise ConfigError("revert LASER interventions in the reverse order of applying them")
        for parent, leaf, original, _ in reversed(self.modules):
            setattr(parent, leaf, original)
        with torch.no_grad():
            for stacked, e, saved, _, _ in reversed(self.slices):
                stacked[e].copy_(saved)
        for attr, value in (("low_rank", self.previous_layout), ("_low_rank_experts", self.previous_experts)):
            if value is _MISSING:
                if hasattr(model, attr):
                    delattr(model, attr)
            else:
                setattr(model, attr, value)
        if stack:
            stack.pop()
        if not stack and hasattr(model, "_laser_undo"):
            delattr(model, "_laser_undo")
        self.reverted = True


def apply_interventions(
    model: nn.Module,
    interventions: Iterable[Intervention | LaserCell] | Intervention | LaserCell,
    *,
    method: str = "svd",
    seed: int = 0,
    allow_larger: bool = False,
    _svd_cache: dict | None = None,
) -> AppliedInterventions:
    """Reduce the named matrices of ``model`` in place and return the undo (:class:`AppliedInterventions`).

    ``interventions``: :class:`Intervention` objects (or a search's :class:`LaserCell` objects, e.g.
    ``report.composed``). Each ``nn.Linear`` target becomes a :class:`LowRankLinear` of rank
    ``rank_for(shape, rho)``; each MoE expert target's stacked slice takes the product of its factors (kept in
    ``model._low_rank_experts``); the layout is recorded in ``model.low_rank`` (module docstring).
    ``method``: ``"svd"`` (the truncated SVD) or ``"random"`` (the control: as many singular components, chosen
    at random with a seed derived from ``seed`` and the target's name). Everything is checked and factorized
    before the model changes: an unknown layer or kind, a bad rho, a target named twice or already reduced, a rank
    whose factors would not be smaller (unless ``allow_larger``) or a quantized model is a ConfigError and leaves
    the model as it was."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if getattr(model, "quantization", None):
        raise ConfigError(
            "this model is quantized (model.quantization is set): LASER works on a full-precision model; a model "
            "both quantized and low-rank is not supported"
        )
    if isinstance(interventions, (Intervention, LaserCell)):
        interventions = [interventions]
    wanted = [iv.intervention() if isinstance(iv, LaserCell) else iv for iv in interventions]
    targets = _targets(model)
    experts_now: dict = getattr(model, "_low_rank_experts", None) or {}
    plan: list[tuple[_Target, Intervention, int]] = []
    seen: set[str] = set()
    for iv in wanted:
        for t in _resolve(model, iv, targets):
            if t.name in seen:
                raise ConfigError(f"{t.name} is named by more than one intervention")
            seen.add(t.name)
            if isinstance(t.module, LowRankLinear) or t.name in experts_now:
                raise ConfigError(f"{t.name} is already low-rank: revert it before reducing it again")
            rank = rank_for(t.shape, iv.rho)
            _check_size(t.name, t.shape, rank, allow_larger)
            plan.append((t, iv, rank))
    # factorize everything first: a failure here leaves the model as it was
    made: list[tuple[_Target, Intervention, int, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for t, iv, rank in plan:
            weight = _weight_of(t).detach()
            left, right = _factors(weight, t.name, rank, method, seed, _svd_cache)
            made.append((t, iv, rank, left, right))
    undo = AppliedInterventions(model)
    layout = dict(getattr(model, "low_rank", None) or {})
    experts = dict(experts_now)
    with torch.no_grad():
        for t, iv, rank, left, right in made:
            if t.part is None:
                linear = t.module
                assert isinstance(linear, nn.Linear)
                layer = LowRankLinear.from_factors(left, right, None if linear.bias is None else linear.bias.detach())
                for p in layer.parameters():
                    p.requires_grad_(linear.weight.requires_grad)
                layer.train(linear.training)
                parent, leaf = _parent(model, t.name)
                setattr(parent, leaf, layer)
                undo.modules.append((parent, leaf, linear, layer))
            else:
                stacked = getattr(t.module, t.part)
                assert t.expert is not None
                saved = stacked[t.expert].detach().clone()
                factors = (left, right)
                stacked[t.expert].copy_(_product(left, right, stacked.dtype))
                experts[t.name] = factors
                undo.slices.append((stacked, t.expert, saved, t.name, factors))
            entry = {"rank": rank, "shape": list(t.shape), "rho": float(iv.rho), "method": method}
            layout[t.name] = entry
            undo.layout[t.name] = entry
    model.low_rank = layout  # type: ignore[assignment]
    model._low_rank_experts = experts  # type: ignore[assignment]
    stack: list[AppliedInterventions] = getattr(model, "_laser_undo", None) or []
    stack.append(undo)  # the open applications, reverted last first
    model._laser_undo = stack  # type: ignore[assignment]
    return undo


def _weight_of(t: _Target) -> torch.Tensor:
    if t.part is None:
        w = t.module.weight
        assert isinstance(w, torch.Tensor)
        return w
    return getattr(t.module, t.part)[t.expert]


def _factors(weight, name, rank, method, seed, cache):
    """:func:`factorize` of one target, reusing the search's SVD of that target when it has one."""
    if cache is None:
        return factorize(weight, rank, method=method, seed=_seed_for(seed, name))
    svd = cache.get(name)
    if svd is None:
        cache.clear()  # one target at a time: the search walks the cells target by target
        svd = cache[name] = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    u, s, vh = svd
    return _keep(u, s, vh, rank, method, _seed_for(seed, name), weight.dtype)


@contextlib.contextmanager
def laser_applied(
    model: nn.Module,
    interventions: Iterable[Intervention] | Intervention,
    *,
    method: str = "svd",
    seed: int = 0,
    allow_larger: bool = False,
) -> Iterator[AppliedInterventions]:
    """``with laser_applied(model, [...]):`` the model runs reduced inside the block and is restored exactly on
    exit, also when the block raises (:func:`apply_interventions` and :meth:`AppliedInterventions.revert`)."""
    undo = apply_interventions(model, interventions, method=method, seed=seed, allow_larger=allow_larger)
    try:
        yield undo
    finally:
        undo.revert()


# ---------------------------------------------------------------------------------------------- densify
#: the attribute :func:`densify` leaves on a model: the ``model.low_rank`` layout it turned back into dense weights
DENSIFIED_ATTR = "laser_densified"


def densify(model: nn.Module) -> nn.Module:
    """Turn a LASER'd model back into an ordinary full-rank model, in place, and return it: "densify, then
    quantize" is how LASER and AQLM compose (``seqlab.quant.quantize_model`` refuses a model with low-rank layers).

    Every :class:`LowRankLinear` becomes an ``nn.Linear`` whose weight is the product ``left @ right`` (computed in
    float64, rounded once to the factors' dtype; same device, the bias copied, ``requires_grad`` and the training
    flag kept), so the model computes what the LASER'd one did, to float rounding (one matmul instead of two).
    A reduced MoE expert's slice already holds its product in memory and is kept as it is (also when a fine-tune
    changed it since: densify keeps what the model computes), and its stored factors are dropped. ``model.low_rank``
    and ``model._low_rank_experts`` are removed, and undos of earlier :func:`apply_interventions` calls can no
    longer revert (ConfigError).

    What is kept: LASER's weights, hence its quality. What is not: its parameter saving; the dense model holds and
    stores every ``out * in`` weight (and AQLM then stores each at its 2-3 bits, factors or not).

    Provenance: the undone layout is kept as ``model.laser_densified`` (merged with an earlier densify's; target
    name -> ``{"rank", "shape", "rho", "method"}``). ``quantize_model`` copies it into the quantization record as
    ``model.quantization["laser"]``, which a quantized model file keeps (its ``"quantization"`` metadata entry) and
    ``load_model`` restores. A densified model saved *without* quantizing is a plain full-precision file that does
    not record it. A model with no low-rank layers is returned unchanged; a quantized one is a ConfigError."""
    if getattr(model, "quantization", None):
        raise ConfigError(
            "this model is quantized (model.quantization is set): densify turns a LASER'd full-precision model "
            "back into dense layers"
        )
    layout = dict(getattr(model, "low_rank", None) or {})
    experts = getattr(model, "_low_rank_experts", None) or {}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name in layout:  # check the bookkeeping first: nothing changes on a malformed model
        if _EXPERT.match(name):
            if name not in experts:
                raise ConfigError(f"model.low_rank names {name}, whose factors are not on the model")
        elif not any(name == n for n, _ in layers):
            raise ConfigError(f"model.low_rank names {name}, which is not a LowRankLinear of this model")
    dense: list[tuple[str, nn.Linear]] = []
    with torch.no_grad():
        for name, layer in layers:
            left = layer.left
            linear = nn.utils.skip_init(
                nn.Linear,
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                device=left.device,
                dtype=left.dtype,
            )
            linear.weight.copy_((left.to(torch.float64) @ layer.right.to(torch.float64)).to(left.dtype))
            if layer.bias is not None:
                assert linear.bias is not None
                linear.bias.copy_(layer.bias)
            for p in linear.parameters():
                p.requires_grad_(left.requires_grad)
            linear.train(layer.training)
            dense.append((name, linear))
    for name, linear in dense:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, linear)
    for undo in getattr(model, "_laser_undo", None) or []:
        undo.stale = True  # its saved modules and slices no longer describe this model
    for attr in ("_laser_undo", "low_rank", "_low_rank_experts"):
        if hasattr(model, attr):
            delattr(model, attr)
    if layout:
        previous = getattr(model, DENSIFIED_ATTR, None) or {}
        setattr(model, DENSIFIED_ATTR, {**previous, **json.loads(json.dumps(layout))})
    return model


# ---------------------------------------------------------------------------------------------- storage
def save_low_rank(path: str | os.PathLike, model: nn.Module, extra: dict | None = None) -> Path:
    """Write a LASER'd model (it has ``model.low_rank``) as a model file: the state dict as ``save_model`` writes
    it, in which each :class:`LowRankLinear` contributes ``<name>.left`` / ``.right`` (and its bias), plus each
    reduced expert's factors ``<moe>.gate_up[e].left`` / ``.right``; a stacked expert parameter all of whose experts
    are reduced is omitted (rebuilt from the factors on load). The layout goes under the metadata key
    ``"low_rank"``. ``seqlab.checkpoint.save_model`` calls this."""
    from seqlab.checkpoint import FORMAT_VERSION, MODEL_FORMAT, model_meta
    from seqlab.safetensors_io import write_tensors

    layout = getattr(model, "low_rank", None)
    if not layout:
        raise ConfigError("this model has no low-rank layers (no model.low_rank): use seqlab.checkpoint.save_model")
    if getattr(model, "quantization", None):
        raise ConfigError("this model is both quantized and low-rank, which seqlab does not support or store")
    experts = getattr(model, "_low_rank_experts", None) or {}
    tensors: dict[str, torch.Tensor] = {}
    covered: dict[str, set[int]] = {}
    for name in layout:
        match = _EXPERT.match(name)
        if match:
            if name not in experts:
                raise ConfigError(f"model.low_rank names {name}, whose factors are not on the model")
            left, right = experts[name]
            tensors[f"{name}.left"] = left.detach().cpu().clone()
            tensors[f"{name}.right"] = right.detach().cpu().clone()
            covered.setdefault(f"{match['moe']}.{match['part']}", set()).add(int(match["e"]))
        elif not isinstance(model.get_submodule(name), LowRankLinear):
            raise ConfigError(f"model.low_rank names {name}, which is a {type(model.get_submodule(name)).__name__}")
    for name, tensor in model.state_dict().items():
        if name in covered and len(covered[name]) == tensor.shape[0]:
            continue  # every expert is stored as factors
        tensors[name] = tensor.detach().cpu().clone()
    meta = model_meta(model)
    meta["low_rank"] = {"format": LOW_RANK_FORMAT, "layers": json.loads(json.dumps(layout))}
    meta.update(extra or {})
    return write_tensors(path, tensors, kind=MODEL_FORMAT, version=FORMAT_VERSION, meta=meta)


def _entry(path, name: str, entry) -> tuple[int, tuple[int, int]]:
    try:
        rank = entry["rank"]
        out, inp = (int(v) for v in entry["shape"])
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out, inp):
            raise ValueError(f"rank {rank!r}")
    except Exception as exc:  # noqa: BLE001 - any malformed entry is the file's fault
        raise CorruptFileError(f"{path}: low_rank entry of {name} is malformed ({exc})") from None
    return rank, (out, inp)


def load_low_rank(path: str | os.PathLike, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Load a LASER'd model file's ``tensors`` and ``meta`` (already read and fingerprint-checked by
    ``seqlab.checkpoint.load_model``) into ``model``, a freshly built model of the recorded config: every tensor is
    checked first (names, shapes, dtypes, each recorded layer against the model), then the plain tensors are
    loaded, each recorded ``nn.Linear`` becomes a :class:`LowRankLinear` holding the file's factors (and the bias
    the file holds) and each recorded expert slice takes the product of its factors. On any mismatch a
    ``CorruptFileError`` names the file and the tensor, and ``model`` is left as it was.

    ``model`` may also be reduced already with the same layout (every recorded target at the same rank and shape:
    resuming the fine-tune of a LASER'd model loads its checkpoint into the live model, whose factors the optimizer
    holds); the factors are then loaded in place, and earlier :func:`apply_interventions` undos of ``model`` can no
    longer revert (ConfigError). A model reduced otherwise is refused."""
    entry = meta.get("low_rank")
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict):
        raise CorruptFileError(f"{path}: the low_rank entry is not a JSON object with 'layers'")
    if entry.get("format") != LOW_RANK_FORMAT:
        raise CorruptFileError(
            f"{path}: low_rank format {entry.get('format')!r}; this seqlab reads format {LOW_RANK_FORMAT}"
        )
    if meta.get("quantization") is not None:
        raise CorruptFileError(f"{path}: records both quantization and low_rank, which seqlab does not support")
    if getattr(model, "quantization", None):
        raise CorruptFileError(f"{path}: load a low-rank file into a full-precision model, not a quantized one")
    layers: dict = entry["layers"]
    existing = getattr(model, "low_rank", None) or {}
    if existing:
        mine = {n: (e.get("rank"), list(e.get("shape", []))) for n, e in existing.items()}
        theirs = {
            n: (e.get("rank"), list(e.get("shape", []))) if isinstance(e, dict) else None for n, e in layers.items()
        }
        if mine != theirs:
            raise CorruptFileError(
                f"{path}: the model is reduced with another layout than the file's; load into a freshly built model"
            )
    own = model.state_dict()
    factor_names: set[str] = set()
    linear_names: set[str] = set()
    covered: dict[str, set[int]] = {}
    plan: list[tuple[str, int, tuple[int, int], re.Match | None]] = []
    for name, item in layers.items():
        rank, shape = _entry(path, name, item)
        expert = _EXPERT.match(name)
        try:
            if expert:
                stacked = getattr(model.get_submodule(expert["moe"]), expert["part"])
                e = int(expert["e"])
                have = tuple(stacked.shape[1:]) if isinstance(stacked, torch.Tensor) and e < stacked.shape[0] else None
                dtype = stacked.dtype
            else:
                layer = model.get_submodule(name)
                have, dtype = None, None
                if isinstance(layer, nn.Linear) and name not in existing:
                    have, dtype = tuple(layer.weight.shape), layer.weight.dtype
                elif isinstance(layer, LowRankLinear) and name in existing and layer.rank == rank:
                    have, dtype = (layer.out_features, layer.in_features), layer.left.dtype
        except AttributeError:
            have, dtype = None, None
        if have != shape or _PREFIX.match(name) is None:
            raise CorruptFileError(f"{path}: low-rank layer {name} ({list(shape)}) does not match the model ({have})")
        for suffix, want in ((".left", (shape[0], rank)), (".right", (rank, shape[1]))):
            tensor = tensors.get(name + suffix)
            if tensor is None:
                raise CorruptFileError(f"{path}: the low-rank layer {name} has no {name + suffix}")
            if tuple(tensor.shape) != want or tensor.dtype != dtype:
                raise CorruptFileError(
                    f"{path}: {name + suffix} is {tuple(tensor.shape)} {tensor.dtype}, expected {want} {dtype}"
                )
            factor_names.add(name + suffix)
        if expert:
            covered.setdefault(f"{expert['moe']}.{expert['part']}", set()).add(int(expert["e"]))
        else:
            linear_names.add(name)
        plan.append((name, rank, shape, expert))
    expected = {
        n
        for n in own
        if not (n.endswith(".weight") and n[: -len(".weight")] in linear_names)
        and not (n in covered and len(covered[n]) == own[n].shape[0])
    }
    present = set(tensors) - (factor_names - set(own))
    check_weight_names(path, tensors, own, present, expected)
    for name in present:
        if tensors[name].dtype != own[name].dtype:
            raise CorruptFileError(f"{path}: {name} has dtype {tensors[name].dtype}, the model's is {own[name].dtype}")
    for name in sorted(factor_names):  # every factor finite: a NaN would poison the whole layer silently
        if not bool(torch.isfinite(tensors[name]).all()):
            raise CorruptFileError(f"{path}: {name} holds a NaN or an infinity")
    # everything checked: now change the model
    experts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for name in present:
            own[name].copy_(tensors[name])
        for name, _, _, expert in plan:
            if expert:
                stacked = getattr(model.get_submodule(expert["moe"]), expert["part"])
                left = tensors[name + ".left"].to(stacked.device)
                right = tensors[name + ".right"].to(stacked.device)
                stacked[int(expert["e"])].copy_(_product(left, right, stacked.dtype))
                experts[name] = (left, right)
                continue
            linear = model.get_submodule(name)
            if isinstance(linear, LowRankLinear):  # reduced already (same layout): loaded in place above
                continue
            assert isinstance(linear, nn.Linear)
            device = linear.weight.device
            layer = LowRankLinear.from_factors(
                tensors[name + ".left"].to(device),
                tensors[name + ".right"].to(device),
                None if linear.bias is None else linear.bias.detach(),
            )
            for p in layer.parameters():
                p.requires_grad_(linear.weight.requires_grad)
            layer.train(linear.training)
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, layer)
    for undo in getattr(model, "_laser_undo", None) or []:
        undo.stale = True  # its saved originals no longer describe this model
    if hasattr(model, "_laser_undo"):
        delattr(model, "_laser_undo")
    model.low_rank = json.loads(json.dumps(layers))
    model._low_rank_experts = experts  # type: ignore[assignment]
    return meta


# ---------------------------------------------------------------------------------------------- the search
@dataclass
class LaserCell:
    """One (layer, kind, rho) cell of a search: ``rank`` the kept rank (per expert for a ``[*]`` kind),
    ``params_saved`` the numbers the factors save against the matrices (summed over experts), ``score`` and
    ``delta`` = score - baseline (None when ``skipped``, which then says why)."""

    layer: int
    kind: str
    rho: float
    rank: int
    params_saved: int
    score: float | None = None
    delta: float | None = None
    skipped: str | None = None

    def intervention(self) -> Intervention:
        """This cell's :class:`Intervention` (a cell may also be passed to :func:`apply_interventions` as is)."""
        return Intervention(self.layer, self.kind, self.rho)


@dataclass
class LaserReport:
    """What :func:`laser_search` found. ``baseline``: the unmodified model's score; ``cells``: every cell in
    search order; ``best``: the best scored cell (None if none was scored; it may not beat the baseline: see
    :meth:`improves`); ``composed``: the cells the greedy composition kept, and ``composed_score`` their joint
    score (the baseline when it kept none or did not run)."""

    baseline: float
    cells: list[LaserCell] = field(default_factory=list)
    best: LaserCell | None = None
    composed: list[LaserCell] = field(default_factory=list)
    composed_score: float | None = None
    method: str = "svd"
    lower_is_better: bool = True
    rhos: list[float] = field(default_factory=list)

    def improves(self, score: float) -> bool:
        """Whether ``score`` beats the baseline (in the report's direction)."""
        return _better(score, self.baseline, self.lower_is_better)

    @property
    def interventions(self) -> list[Intervention]:
        """The composed interventions (apply them with :func:`apply_interventions`)."""
        return [c.intervention() for c in self.composed]

    def to_json(self) -> dict:
        """The report as a JSON-able object (``json.dumps`` it; non-finite scores become the strings "NaN",
        "Infinity", "-Infinity", so the text is strict JSON)."""
        return _encode(asdict(self))

    @classmethod
    def from_json(cls, data: str | dict) -> LaserReport:
        """The report :meth:`to_json` gave (the object, or its JSON text)."""
        raw = _decode(json.loads(data) if isinstance(data, str) else data)
        try:
            cells = [LaserCell(**c) for c in raw["cells"]]
            best = LaserCell(**raw["best"]) if raw.get("best") else None
            composed = [LaserCell(**c) for c in raw.get("composed", [])]
            return cls(
                baseline=raw["baseline"], cells=cells, best=best, composed=composed,
                composed_score=raw.get("composed_score"), method=raw.get("method", "svd"),
                lower_is_better=raw.get("lower_is_better", True), rhos=list(raw.get("rhos", [])),
            )  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise InputError(f"not a LASER report: {exc!r}") from None


_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, str) and value in _SPECIAL:
        return _SPECIAL[value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _better(a: float, b: float, lower_is_better: bool) -> bool:
    if not math.isfinite(a):
        return False
    return a < b if lower_is_better else a > b


def _score(score: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    with torch.no_grad():
        value = score(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"score must return a float, got {type(value).__name__} for {what}")
    return float(value)


def laser_search(
    model: nn.Module,
    score: Callable[[nn.Module], float],
    *,
    layers: Iterable[int] | None = None,
    kinds: Iterable[str] | None = None,
    rhos: Iterable[float] = DEFAULT_RHOS,
    compose: int = 0,
    method: str = "svd",
    seed: int = 0,
    progress: bool = False,
    lower_is_better: bool = True,
) -> LaserReport:
    """Search single LASER interventions on ``model`` (and optionally their greedy composition); the model is
    left exactly as it was (every candidate is applied, scored and reverted; nothing is copied).

    ``score(model) -> float``: the caller's held-out measure (e.g. :func:`stream_scorer`); run under
    ``torch.no_grad``; lower is better unless ``lower_is_better=False``. ``layers``: layer indices (None: all with
    reducible matrices). ``kinds``: target kinds (None: every kind of each layer, MoE experts as ``ffn.gate_up[*]``
    / ``ffn.down[*]``, one cell per part rather than per expert; name ``ffn.gate_up[3]`` to search one expert); a
    kind is searched in the chosen layers that have it (in the order given), and one that none has is a
    ConfigError. ``rhos``: the fractions of the maximum rank (:func:`rank_for`), default :data:`DEFAULT_RHOS`.

    Order: the baseline (the unmodified model), then every (layer, kind, rho) cell, target by target (one SVD per
    target, reused over its rhos); a cell whose factors would not be smaller than its matrix is recorded as skipped,
    not scored. Then, when ``compose > 0``: the best ``compose`` cells that beat the baseline, best first, each on a
    target no better cell took already, are tried in turn on top of those kept so far, and each is kept only when
    the joint score beats the best joint score yet. ``method``/``seed``: as in :func:`apply_interventions` (the
    ``"random"`` control). ``progress=True`` shows a tqdm bar over the cells."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(compose, bool) or not isinstance(compose, int) or compose < 0:
        raise ConfigError(f"compose must be an integer >= 0, got {compose!r}")
    if not callable(score):
        raise ConfigError(f"score must be a callable score(model) -> float, got {type(score).__name__}")
    rho_list = [_check_rho(r) for r in rhos]
    if not rho_list:
        raise ConfigError("rhos is empty: give at least one fraction in (0, 1]")
    if getattr(model, "quantization", None):
        raise ConfigError("this model is quantized (model.quantization is set): LASER searches a full-precision model")
    targets = _targets(model)
    free = {n: t for n, t in targets.items() if not isinstance(t.module, LowRankLinear)}
    free = {n: t for n, t in free.items() if n not in (getattr(model, "_low_rank_experts", None) or {})}
    all_layers = sorted({t.layer for t in free.values()})
    if layers is None:
        chosen = all_layers
    else:
        chosen = list(dict.fromkeys(layers))
        bad = [x for x in chosen if isinstance(x, bool) or not isinstance(x, int) or x not in all_layers]
        if bad:
            raise ConfigError(f"layers {bad} are not layers of this model with reducible matrices: {all_layers}")
    # the (layer, kind) pairs to search, each with its targets
    pairs: list[tuple[int, str, list[_Target]]] = []
    wanted = None if kinds is None else list(dict.fromkeys([kinds] if isinstance(kinds, str) else kinds))
    for layer in chosen:
        own = [t for t in free.values() if t.layer == layer]
        wild = _wildcard_kinds(own)
        available = {t.kind: [t] for t in own}
        available.update({k: ts for (_, k), ts in wild.items()})
        if wanted is None:
            names = [t.kind for t in own if t.expert is None] + [k for _, k in wild]
        else:
            names = [k for k in wanted if k in available]
        pairs.extend((layer, k, available[k]) for k in names)
    if wanted is not None:
        found = {k for _, k, _ in pairs}
        unknown = [k for k in wanted if k not in found]
        if unknown:
            every = sorted(
                {t.kind for t in free.values() if t.expert is None} | {k for _, k in _wildcard_kinds(free.values())}
            )
            raise ConfigError(
                f"kinds {unknown} name no reducible matrix of the chosen layers; kinds: {', '.join(every)}"
            )

    report = LaserReport(
        baseline=_score(score, model, "the baseline"), method=method, lower_is_better=lower_is_better, rhos=rho_list
    )
    if not math.isfinite(report.baseline):
        raise InputError(f"the unmodified model scores {report.baseline}: the score must be finite to compare with")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs) * len(rho_list), unit="cell", desc="LASER")
    cache: dict = {}
    try:
        for layer, kind, group in pairs:
            cache.clear()
            for rho in rho_list:
                rank = rank_for(group[0].shape, rho)
                saved = sum(t.shape[0] * t.shape[1] - factor_size(t.shape, rank) for t in group)
                cell = LaserCell(layer, kind, rho, rank, saved)
                if saved <= 0 or any(factor_size(t.shape, rank) >= t.shape[0] * t.shape[1] for t in group):
                    cell.skipped = "the factors would not be smaller than the matrix"
                else:
                    caches = cache if len(group) == 1 else None
                    undo = apply_interventions(
                        model, [cell.intervention()], method=method, seed=seed, _svd_cache=caches
                    )
                    try:
                        cell.score = _score(score, model, f"layer {layer} {kind} rho {rho}")
                    finally:
                        undo.revert()
                    cell.delta = cell.score - report.baseline
                report.cells.append(cell)
                if bar is not None:
                    bar.update(1)
    finally:
        cache.clear()
        if bar is not None:
            bar.close()
    scored = [c for c in report.cells if c.score is not None and math.isfinite(c.score)]
    if scored:
        pick = min if lower_is_better else max
        report.best = pick(scored, key=lambda c: c.score)  # type: ignore[arg-type,return-value]
    report.composed_score = report.baseline
    if compose:
        _compose(model, score, report, compose, method, seed, pairs)
    return report


def _compose(model, score, report: LaserReport, compose: int, method: str, seed: int, pairs) -> None:
    """The greedy composition of :func:`laser_search` (its docstring)."""
    members = {(layer, kind): {t.name for t in group} for layer, kind, group in pairs}
    winners = [c for c in report.cells if c.score is not None and report.improves(c.score)]
    winners.sort(key=lambda c: float(c.score) if report.lower_is_better else -float(c.score))  # type: ignore[arg-type]
    candidates: list[LaserCell] = []
    taken: set[str] = set()
    for cell in winners:
        names = members[(cell.layer, cell.kind)]
        if names & taken:
            continue
        candidates.append(cell)
        taken |= names
        if len(candidates) == compose:
            break
    kept: list[LaserCell] = []
    best = report.baseline
    for cell in candidates:
        trial = [c.intervention() for c in [*kept, cell]]
        undo = apply_interventions(model, trial, method=method, seed=seed)
        try:
            value = _score(score, model, f"the composition of {len(trial)} interventions")
        finally:
            undo.revert()
        if _better(value, best, report.lower_is_better):
            kept.append(cell)
            best = value
    report.composed = kept
    report.composed_score = best


def stream_scorer(adapter, pieces_factory, *, device=None) -> Callable[[nn.Module], float]:
    """A ``score(model)`` for :func:`laser_search`: the adapter's metric (e.g. bits per byte) of the model over a
    held-out stream, streamed with the state carried (``seqlab.streaming.stream_metric``, exact under any split).

    ``adapter``: anything with the adapter protocol's ``position_metric`` (duck-typed; a domain adapter).
    ``pieces_factory``: a callable returning a fresh iterable of encoded pieces of the stream on each call, or a
    re-iterable collection of them (a list); a one-shot iterator is refused, since every candidate re-reads the
    stream. A stream with no predicted position is an InputError when scored."""
    from seqlab.streaming import stream_metric

    if callable(pieces_factory):
        make = pieces_factory
    else:
        if isinstance(pieces_factory, Iterator) or not isinstance(pieces_factory, Iterable):
            raise InputError(
                "pieces_factory must be a callable returning the pieces, or a list of them (not a one-shot iterator)"
            )
        pieces = pieces_factory

        def make():
            return pieces

    def score(model: nn.Module) -> float:
        value, count = stream_metric(model, adapter, make(), device=device)
        if value is None or count == 0:
            raise InputError("the held-out stream predicts no position: nothing to score")
        return float(value)

    return score


def plot_heatmap(report: LaserReport, path: str | os.PathLike) -> Path:
    """Draw the search as a grid of heatmaps, one per kind (layers down, rhos across), coloured by delta score on
    a diverging colormap centred at 0 (blue: better than the baseline, red: worse, in the report's direction;
    grey: skipped or not searched; symmetric-log scale, so a gain of a thousandth of the largest change still
    shows), each cell annotated with its delta, the best cell outlined and starred. The PNG
    is written atomically (``seqlab.io.atomic_write_bytes``). Needs matplotlib (the ``demo`` extra)."""
    from seqlab._deps import require_module
    from seqlab.io import atomic_write_bytes

    matplotlib = require_module("matplotlib", "plot_heatmap")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import SymLogNorm

    kinds = list(dict.fromkeys(c.kind for c in report.cells))
    if not kinds:
        raise InputError("the report has no cells to plot")
    rhos = report.rhos or sorted({c.rho for c in report.cells})
    layers = sorted({c.layer for c in report.cells})
    sign = 1.0 if report.lower_is_better else -1.0  # so that blue is always "better"
    finite = [abs(c.delta) for c in report.cells if c.delta is not None and math.isfinite(c.delta)]
    span = max(finite) if finite and max(finite) > 0 else 1.0
    # Symmetric log: the few catastrophic cells (rank 1 of an early in_proj) would otherwise bleach the small
    # gains that the search is looking for.
    norm = SymLogNorm(linthresh=span / 1000, vmin=-span, vmax=span, base=10)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#cccccc")
    cols = 2 if len(kinds) == 4 else min(3, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(1.5 + 0.9 * len(rhos) * cols, 1.0 + (0.6 + 0.4 * len(layers)) * rows),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for index, kind in enumerate(kinds):
        ax = axes[index // cols][index % cols]
        grid = torch.full((len(layers), len(rhos)), math.nan, dtype=torch.float64)
        for c in report.cells:
            if c.kind == kind and c.delta is not None and c.rho in rhos:
                grid[layers.index(c.layer), rhos.index(c.rho)] = sign * c.delta
        image = ax.imshow(grid.numpy(), cmap=cmap, norm=norm, aspect="auto")
        for i in range(len(layers)):
            for j in range(len(rhos)):
                value = float(grid[i, j])
                if math.isfinite(value):
                    shade = float(norm(value))  # white text on the darkest cells
                    colour = "white" if shade < 0.15 or shade > 0.85 else "black"
                    ax.text(j, i, f"{sign * value:+.3g}", ha="center", va="center", fontsize=6, color=colour)
        best = report.best
        if best is not None and best.kind == kind and best.rho in rhos:
            i, j = layers.index(best.layer), rhos.index(best.rho)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
            ax.text(j + 0.35, i - 0.25, "*", ha="center", va="center", fontsize=12, fontweight="bold")
        ax.set_title(kind, fontsize=9)
        ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos], fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_xlabel("rho", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    for index in range(len(kinds), rows * cols):
        axes[index // cols][index % cols].axis("off")
    direction = "lower" if report.lower_is_better else "higher"
    fig.suptitle(f"LASER ({report.method}): score - baseline {report.baseline:.4g} ({direction} is better)", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="delta score (symlog; blue: better)")
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


__all__ = [
    "DEFAULT_RHOS",
    "LOW_RANK_FORMAT",
    "METHODS",
    "AppliedInterventions",
    "Intervention",
    "LaserCell",
    "LaserReport",
    "LowRankLinear",
    "apply_interventions",
    "factor_size",
    "factorize",
    "intervention_targets",
    "laser_applied",
    "laser_search",
    "load_low_rank",
    "plot_heatmap",
    "rank_for",
    "save_low_rank",
    "stream_scorer",
]
