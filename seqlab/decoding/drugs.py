"""DRµGS (Deep Random micro-Glitch Sampling): the randomness of decoding put inside the model.

At chosen sites of chosen layers, every hidden vector v is turned by a small angle theta towards a random
direction: with u a Gaussian draw and u_hat the unit vector of its part orthogonal to v,
``v' = cos(theta) v + sin(theta) |v| u_hat``. The norm is kept and the angle between v and v' is exactly theta.
The next token is then picked as usual (argmax, or sampling). See docs/generation.md, "DRµGS".

``Drugs`` holds the settings (validated on construction); ``apply_drugs(model, drugs, generator)`` is a context
manager that installs the rotation on the model's blocks and mixers (their ``_perturb`` hook, None otherwise)
and removes it on exit, also after an exception. Inside it, only ``model.step`` calls (decode steps) are
perturbed while ``protect_prompt`` is set, and the first ``protect_first`` of them are left alone too.

Sites, and which vectors are turned (each its own random direction):

- ``"residual"``: the residual stream leaving the block (d_model per token);
- ``"mixer_in"``: the mixer's normalised input, ``"mixer_out"``: its output (d_model per token; any mixer kind);
- ``"x"``, ``"B"``, ``"C"``: the scan's inputs of a Mamba-1 or Mamba-2 mixer. Mamba-1: x is the whole d_inner
  vector (after the conv and SiLU; dt, B and C are projected from the unperturbed x), B and C each d_state.
  Mamba-2: x per head (headdim), B and C per group (d_state);
- ``"q"``, ``"k"``, ``"v"``, ``"attn_out"``: an attention layer's queries and keys (after the rotary embedding),
  values, and the attention output before ``o_proj``, per head (head_dim). Keys and values enter the KV cache
  perturbed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from seqlab.errors import InputError

BLOCK_SITES = ("residual", "mixer_in", "mixer_out")
MAMBA_SITES = ("x", "B", "C")
ATTENTION_SITES = ("q", "k", "v", "attn_out")
SITES = BLOCK_SITES + MAMBA_SITES + ATTENTION_SITES
PROFILES = ("constant", "linear-up", "linear-down", "peak-middle")

Profile = str | Sequence[float] | Callable[[int, int], float]


def profile_factors(profile: Profile, n_layer: int) -> list[float]:
    """The factor theta is multiplied by at each layer 0..n_layer-1.

    "constant": 1 everywhere; "linear-up": (i + 1) / n (strongest at the top); "linear-down": (n - i) / n;
    "peak-middle": a triangle, 1 at the middle layer(s), 1 / (half + 1) at both ends. A sequence gives one factor
    per layer (n_layer of them); a callable is called as ``profile(layer, n_layer)``."""
    n = n_layer
    if isinstance(profile, str):
        if profile == "constant":
            return [1.0] * n
        if profile == "linear-up":
            return [(i + 1) / n for i in range(n)]
        if profile == "linear-down":
            return [(n - i) / n for i in range(n)]
        if profile == "peak-middle":
            middle, half = (n - 1) / 2, (n - 1) / 2 + 1
            return [1 - abs(i - middle) / half for i in range(n)]
        raise InputError(f"Drugs.profile: unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    if callable(profile):
        factors: list[float] = []
        for i in range(n):
            value = profile(i, n)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InputError(f"Drugs.profile: the callable gave {value!r} for layer {i}: a finite number is needed")
            factors.append(float(value))
        return factors
    values = list(profile)
    if len(values) != n:
        raise InputError(f"Drugs.profile: {len(values)} factors for a model of {n} layers: give one per layer")
    return [float(v) for v in values]


@dataclass(frozen=True)
class Drugs:
    """DRµGS settings.

    ``theta``: the rotation angle in radians, finite, in [0, pi] (0: nothing changes, bit for bit).
    ``sites``: where to rotate (a name or a tuple of names from ``SITES``; see the module docstring).
    ``layers``: the layer indexes to perturb (None: all).
    ``profile``: theta over depth, ``theta_i = theta * factor_i`` (a name from ``PROFILES``, one factor per layer,
    or ``callable(layer, n_layer)``); every theta_i must lie in [0, pi].
    ``protect_prompt``: perturb only decode steps (``model.step``), never a multi-token forward such as a
    prompt's prefill run inside the context; False perturbs every call.
    ``protect_first``: the first this many decode steps inside the context are not perturbed, so the first
    ``protect_first`` generated tokens enter the state unperturbed (with the prompt protected, the first
    ``protect_first + 1`` generated tokens are those of plain decoding: the first comes from the prompt's logits).
    """

    theta: float
    sites: tuple[str, ...] | str = ("residual",)
    layers: tuple[int, ...] | None = None
    profile: Profile = "constant"
    protect_prompt: bool = True
    protect_first: int = 0

    def __post_init__(self) -> None:
        theta = self.theta
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta):
            raise InputError(f"Drugs.theta must be a finite number of radians in [0, pi], got {theta!r}")
        if not 0 <= theta <= math.pi:
            raise InputError(f"Drugs.theta must be in [0, pi] (radians), got {theta!r}")
        object.__setattr__(self, "theta", float(theta))
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        if not sites:
            raise InputError(f"Drugs.sites is empty: name at least one of {', '.join(SITES)}")
        unknown = [s for s in sites if s not in SITES]
        if unknown:
            raise InputError(f"Drugs.sites: unknown site(s) {', '.join(map(repr, unknown))}; known: {', '.join(SITES)}")
        object.__setattr__(self, "sites", tuple(dict.fromkeys(sites)))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, numbers.Integral) else tuple(self.layers)
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
                    raise InputError(f"Drugs.layers: {i!r} is not a layer index (an int >= 0)")
            if not layers:
                raise InputError("Drugs.layers is empty: give layer indexes, or None for every layer")
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in layers})))
        profile = self.profile
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise InputError(f"Drugs.profile: unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        elif not callable(profile):
            try:
                values = tuple(float(v) for v in profile)
            except (TypeError, ValueError):
                raise InputError(
                    f"Drugs.profile must be a name, a sequence of per-layer factors or a callable, got {profile!r}"
                ) from None
            bad = [v for v in values if not math.isfinite(v) or v < 0]
            if bad:
                raise InputError(f"Drugs.profile: factor {bad[0]!r} is not a finite number >= 0")
            object.__setattr__(self, "profile", values)
        if not isinstance(self.protect_prompt, bool):
            raise InputError(f"Drugs.protect_prompt must be True or False, got {self.protect_prompt!r}")
        first = self.protect_first
        if isinstance(first, bool) or not isinstance(first, numbers.Integral) or first < 0:
            raise InputError(f"Drugs.protect_first must be an int >= 0 (decode steps left alone), got {first!r}")

    def thetas(self, n_layer: int) -> list[float]:
        """theta per layer (0 for layers not chosen), checked to lie in [0, pi]."""
        factors = profile_factors(self.profile, n_layer)
        chosen = set(range(n_layer) if self.layers is None else self.layers)
        out = []
        for i, factor in enumerate(factors):
            value = self.theta * factor if i in chosen else 0.0
            if not 0 <= value <= math.pi:
                raise InputError(
                    f"Drugs.profile: layer {i} gets theta = {self.theta} x {factor} = {value}, outside [0, pi]"
                )
            out.append(value)
        return out

    def active(self, model, generator=None):
        """``apply_drugs(model, self, generator)``."""
        return apply_drugs(model, self, generator)


def rotate(v: torch.Tensor, theta: float, noise: torch.Tensor) -> torch.Tensor:
    """Each vector along the last dim of ``v`` turned by ``theta`` towards the part of ``noise`` (same shape)
    orthogonal to it: ``cos(theta) v + sin(theta) |v| u_hat``. Norms are kept; zero vectors stay zero. Computed in
    float64, returned in v's dtype. ``theta == 0`` returns ``v`` itself."""
    if theta == 0:
        return v
    if v.shape[-1] < 2:
        raise InputError(f"cannot rotate vectors of length {v.shape[-1]}: there is no direction orthogonal to them")
    x = v.double()
    u = noise.to(device=v.device, dtype=torch.float64)
    squared = (x * x).sum(-1, keepdim=True)
    tiny = torch.finfo(torch.float64).tiny
    u = u - (u * x).sum(-1, keepdim=True) / squared.clamp_min(tiny) * x
    u = u - (u * x).sum(-1, keepdim=True) / squared.clamp_min(tiny) * x  # twice: orthogonal to rounding
    u_hat = u / u.norm(dim=-1, keepdim=True).clamp_min(tiny)
    out = math.cos(theta) * x + math.sin(theta) * squared.sqrt() * u_hat
    return torch.where(squared > 0, out, x).to(v.dtype)


@dataclass(eq=False)
class DrugsHandle:
    """What ``apply_drugs`` yields. ``steps``: decode steps (``model.step`` calls) so far inside the context;
    ``rotations``: tensors rotated so far; ``thetas``: theta per layer; ``rows``: with one generator per row, the
    indexes (into that list) of the rows now in the batch, in batch order: set it when rows leave the batch."""

    drugs: Drugs
    thetas: list[float]
    generators: list[torch.Generator]
    rows: list[int] | None
    steps: int = 0
    rotations: int = 0
    armed: bool = False

    def noise(self, shape: torch.Size) -> torch.Tensor:
        """Standard normal draws of ``shape`` (batch first), on the generators' device."""
        if self.rows is None:
            gen = self.generators[0]
            return torch.randn(shape, generator=gen, device=gen.device)
        if len(self.rows) != shape[0]:
            raise InputError(
                f"DRµGS has one generator per row and handle.rows names {len(self.rows)} rows, but the batch has "
                f"{shape[0]}: set handle.rows to the rows in the batch"
            )
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device) for g in (self.generators[r] for r in self.rows)]
        )


def _mixer_kind(mixer) -> str:
    from seqlab.mixers.attention import AttentionMixer
    from seqlab.mixers.mamba1 import Mamba1Mixer
    from seqlab.mixers.mamba2 import Mamba2Mixer
    from seqlab.mixers.mamba3 import Mamba3Mixer

    if isinstance(mixer, Mamba3Mixer):
        return "mamba3"
    if isinstance(mixer, Mamba1Mixer):
        return "mamba1"
    if isinstance(mixer, Mamba2Mixer):
        return "mamba2"
    if isinstance(mixer, AttentionMixer):
        return "attention"
    return type(mixer).__name__


def _vector_sizes(mixer, kind: str) -> dict[str, int | None]:
    """The length of one rotated vector per mixer site (None: the whole last dim)."""
    if kind == "mamba1":
        return {"x": None, "B": None, "C": None}
    if kind == "mamba2":
        return {"x": mixer.headdim, "B": mixer.d_state, "C": mixer.d_state}
    if kind == "mamba3":  # x (..., h, p), B/C (..., r, g, n): one vector per head / rank and group
        return {"x": None, "B": None, "C": None}
    if kind == "attention":
        return {s: None for s in ATTENTION_SITES}
    return {}


def _hook(handle: DrugsHandle, layer: int, theta: float, sizes: dict[str, int | None]):
    """The ``_perturb`` callable of one block or mixer: rotates the tensors of its chosen sites when armed."""

    def perturb(site: str, t: torch.Tensor) -> torch.Tensor:
        if site not in sizes or not handle.armed:
            return t
        size = sizes[site]
        shape = t.shape
        vectors = t if size is None or size == shape[-1] else t.unflatten(-1, (-1, size))
        try:
            out = rotate(vectors, theta, handle.noise(vectors.shape))
        except InputError as err:
            raise InputError(f"DRµGS at layer {layer}, site {site!r}: {err}") from None
        handle.rotations += 1
        return out.reshape(shape)

    # seqlab.fused_step asks a hook whether it returns every tensor unchanged this step: a disarmed (protected)
    # step must equal plain decoding, so its blocks may run the compiled step
    perturb.idle = lambda: not handle.armed  # type: ignore[attr-defined]
    return perturb


def _plan(model, drugs: Drugs) -> tuple[list, list[float], dict[int, dict[str, dict[str, int | None]]]]:
    """The model's blocks, theta per layer, and per chosen layer the block and mixer sites with vector sizes."""
    from seqlab.blocks import BidirectionalBlock, Block

    backbone = getattr(model, "backbone", model)
    blocks = list(getattr(backbone, "layers", []))
    if not blocks or not all(isinstance(b, Block) for b in blocks):
        raise InputError(f"DRµGS needs a seqlab model (LanguageModel, SequenceModel), got {type(model).__name__}")
    if any(isinstance(b, BidirectionalBlock) for b in blocks):
        raise InputError("DRµGS perturbs decoding, and a bidirectional model cannot decode step by step")
    n = len(blocks)
    bad = [i for i in drugs.layers or () if i >= n]
    if bad:
        raise InputError(f"Drugs.layers: layer {bad[0]} is out of range for a model of {n} layers (0..{n - 1})")
    thetas = drugs.thetas(n)
    chosen = list(range(n)) if drugs.layers is None else list(drugs.layers)
    kinds = {i: _mixer_kind(blocks[i].mixer) for i in chosen}
    plan: dict[int, dict[str, dict[str, int | None]]] = {}
    for site in drugs.sites:
        where = [i for i in chosen if site in BLOCK_SITES or site in _vector_sizes(blocks[i].mixer, kinds[i])]
        if not where:
            family = "a Mamba (mamba1/mamba2/mamba3)" if site in MAMBA_SITES else "an attention"
            layers = ", ".join(f"{i}: {kinds[i]}" for i in chosen)
            raise InputError(
                f"Drugs.sites: {site!r} is a site of {family} layer, and none of the chosen layers has one "
                f"(layer mixers: {layers})"
            )
        for i in where:
            part = "block" if site in BLOCK_SITES else "mixer"
            size = None if site in BLOCK_SITES else _vector_sizes(blocks[i].mixer, kinds[i])[site]
            plan.setdefault(i, {}).setdefault(part, {})[site] = size
    return blocks, thetas, plan


def _as_generators(generator) -> tuple[list[torch.Generator], bool]:
    if generator is None:
        seed = int(torch.randint(0, 2**62, ()).item())  # from torch's global RNG: torch.manual_seed fixes it
        return [torch.Generator().manual_seed(seed)], False
    if isinstance(generator, torch.Generator):
        return [generator], False
    if isinstance(generator, Sequence) and generator and all(isinstance(g, torch.Generator) for g in generator):
        return list(generator), True
    raise InputError(
        f"DRµGS generator must be a torch.Generator, a list of them (one per row) or None, got {generator!r}"
    )


@contextmanager
def apply_drugs(model, drugs: Drugs, generator=None) -> Iterator[DrugsHandle]:
    """Install DRµGS on ``model`` for the duration of the ``with`` block; yields a ``DrugsHandle``.

    ``generator``: a seeded ``torch.Generator`` (the same seed gives the same rotations), a list of them with one
    per batch row (row i draws from ``generator[i]``, so a row gets the same rotations alone or in a batch; set
    ``handle.rows`` when rows leave the batch), or None (seeded from torch's global RNG). Every row, position, head
    and site gets its own random direction. The hooks are removed on exit, also after an exception.
    """
    if not isinstance(drugs, Drugs):
        raise InputError(f"apply_drugs needs a Drugs(theta=...), got {type(drugs).__name__}")
    blocks, thetas, plan = _plan(model, drugs)
    if any("_perturb" in vars(m) for b in blocks for m in (b, b.mixer)):
        raise InputError("DRµGS is already active on this model: one apply_drugs at a time")
    generators, per_row = _as_generators(generator)
    handle = DrugsHandle(drugs, thetas, generators, list(range(len(generators))) if per_row else None)
    handle.armed = not drugs.protect_prompt
    original_step = model.step if "step" not in vars(model) else None
    if original_step is None:
        raise InputError("DRµGS is already active on this model: one apply_drugs at a time")

    def step(*args, **kwargs):
        handle.armed = handle.steps >= drugs.protect_first
        try:
            return original_step(*args, **kwargs)
        finally:
            handle.steps += 1
            handle.armed = not drugs.protect_prompt

    installed = []
    try:
        for i, parts in plan.items():
            if thetas[i] == 0:
                continue  # theta 0 changes nothing: no hook at all
            for part, sizes in parts.items():
                module = blocks[i] if part == "block" else blocks[i].mixer
                module._perturb = _hook(handle, i, thetas[i], sizes)
                installed.append(module)
        model.step = step
        yield handle
    finally:
        for module in installed:
            del module._perturb
        if "step" in vars(model):
            del model.step
