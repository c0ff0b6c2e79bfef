"""Calibration for weight quantization (issue 20): which layers are quantizable, and each one's input second moment.

``linear_layers(model)`` lists the quantization targets: every linear map of every block kind (Mamba-1 in/x/dt/out
projections, Mamba-2 in/out projections, attention q/k/v/o, dense MLP gate_up/down, and each MoE expert's gate_up
and down). MoE experts are *not* ``nn.Linear`` modules: a ``MoEFeedForward`` holds all experts in two stacked
parameters ``gate_up`` (E, 2f, d) and ``down`` (E, d, f); each expert's slice is listed as its own target named
``<moe>.gate_up[e]`` / ``<moe>.down[e]`` (``LinearTarget.expert`` = e). The LM head is listed only with
``head=True`` (it is tied to the embedding by default, so quantizing it quantizes the embedding table too), MoE
routers only with ``router=True`` (tiny, and a flipped routing decision costs more than its bits save). The
embedding lookup itself is never a target here: its "input" is a one-hot token, so its X^T X is just the diagonal
of token counts. SSM parameters (A, D, dt bias, conv) are not linear maps and stay full precision.

``collect_input_moments(model, windows)`` runs the calibration windows through the model and accumulates, for every
target, ``xtx`` = sum over tokens of x x^T (float64, in x in) of the inputs x that reached it, and ``count``, the
number of those tokens. How inputs are seen:

* Linear maps: Mamba's mixers call ``F.linear`` on (row slices of) their weights directly (``project_rows`` for
  in_proj, ``F.linear(dt, dt_proj.weight)`` for dt_proj), so module forward hooks would miss them. The collector
  instead watches every ``F.linear`` call through a ``torch.overrides.TorchFunctionMode`` and credits the call to
  the target whose weight (or whose weight's base, for a slice) it uses. A fused projection computed as several
  row slices of one weight on the same input tensor is counted once (the same input object is not counted twice
  in a row for one target).
* MoE experts: a forward pre-hook on each ``MoEFeedForward`` gets the layer's input h, routes it exactly as the
  layer does at evaluation (``seqlab.ffn.moe.route``, no jitter, no capacity), and for each expert adds the tokens
  routed to it (gate_up's input) and their SiLU-gated activations silu(h W_gate^T) * (h W_up^T) (down's input).
  The gate weight multiplies the expert's *output*, so it is not part of either input. ``count`` of an expert
  target is the number of tokens routed to that expert.

Streaming: each window (b, l) starts from a fresh state and goes through in chunks of ``chunk_size`` tokens with
the recurrent state threaded (``out = model(ids[:, i:j], state)``, ``state = out.state``), which the model
contract makes exact under any chunking, so the moments do not depend on ``chunk_size`` beyond float rounding while
activation memory stays bounded by one chunk. Bidirectional models cannot stream and take each window whole.
Memory kept across the run: one (in, in) float64 matrix per target. Everything runs under ``torch.no_grad`` with
the model in eval mode (each module's training flag is restored afterwards); the watcher and every hook are
removed in a ``finally`` block, also when a window fails.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from seqlab.errors import ConfigError, InputError
from seqlab.ffn.moe import MoEFeedForward, route

#: default tokens per forward call when streaming a window
DEFAULT_CHUNK = 2048


@dataclass(eq=False)
class Moments:
    """A layer's calibration statistics: ``xtx`` = sum of x x^T (in, in) float64 over the ``count`` input tokens
    x that reached it. ``xtx / count`` is the mean second moment; GPTQ and AQLM use ``xtx`` as is."""

    xtx: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (..., in) as tokens."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if rows.shape[0]:
            self.xtx.addmm_(rows.t(), rows)
            self.count += int(rows.shape[0])


@dataclass(eq=False)
class LinearTarget:
    """One quantizable linear map. ``name``: the ``nn.Linear``'s module name, or ``<moe>.gate_up[e]`` /
    ``<moe>.down[e]`` for expert e of the ``MoEFeedForward`` named ``<moe>``. ``module``: the ``nn.Linear`` or the
    ``MoEFeedForward``. ``part``: None for an ``nn.Linear``, else ``"gate_up"`` or ``"down"``; ``expert``: the
    expert index (None for an ``nn.Linear``)."""

    name: str
    module: nn.Module
    part: str | None = None
    expert: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight this target quantizes (a view into the module's parameter)."""
        if self.part is None:
            weight = self.module.weight
            assert isinstance(weight, torch.Tensor)
            return weight
        stacked = getattr(self.module, self.part)
        return stacked[self.expert]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


def linear_layers(model: nn.Module, *, head: bool = False, router: bool = False) -> list[LinearTarget]:
    """The quantization targets of ``model`` in module order (see the module docstring): every ``nn.Linear``
    inside ``model.backbone`` except MoE routers (unless ``router``), each MoE expert's gate_up and down, and the
    LM head ``lm_head`` when ``head`` (tied to the embedding by default)."""
    targets: list[LinearTarget] = []
    routers = {id(m.router) for m in model.modules() if isinstance(m, MoEFeedForward)}
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            for part in ("gate_up", "down"):
                experts = getattr(module, part).shape[0]
                targets.extend(LinearTarget(f"{name}.{part}[{e}]", module, part, e) for e in range(experts))
        elif isinstance(module, nn.Linear):
            if id(module) in routers and not router:
                continue
            if name.startswith("backbone.") or (head and name == "lm_head"):
                targets.append(LinearTarget(name, module))
    return targets


def select_targets(model: nn.Module, layers) -> list[LinearTarget]:
    """The targets ``layers`` picks: None: ``linear_layers(model)``; a callable: those of ``linear_layers(model)``
    whose name it accepts; an iterable of names: those targets (head and routers may be named)."""
    if layers is None:
        return linear_layers(model)
    if callable(layers):
        return [t for t in linear_layers(model) if layers(t.name)]
    if isinstance(layers, str):
        layers = [layers]
    wanted = list(layers)
    everything = {t.name: t for t in linear_layers(model, head=True, router=True)}
    unknown = [n for n in wanted if n not in everything]
    if unknown:
        raise ConfigError(f"layers names no quantizable linear layer of this model: {unknown}")
    return [everything[n] for n in dict.fromkeys(wanted)]


class _LinearWatcher(TorchFunctionMode):
    """Credits each ``F.linear`` call to the target whose weight (or a slice of it) it uses."""

    def __init__(self, by_weight: dict[int, tuple[str, Moments]]) -> None:
        super().__init__()
        self.by_weight = by_weight
        self.last_input: dict[str, weakref.ref] = {}
        self.suspended = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not self.suspended:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            base = weight if weight._base is None else weight._base
            hit = self.by_weight.get(id(base))
            if hit is not None:
                name, moments = hit
                last = self.last_input.get(name)
                if last is None or last() is not x:
                    moments.add(x)
                    self.last_input[name] = weakref.ref(x)
        return func(*args, **kwargs)


def _moe_hook(layer: MoEFeedForward, wanted: dict[tuple[str, int], Moments], watcher: _LinearWatcher):
    """A forward pre-hook adding the layer's expert inputs to ``wanted[(part, e)]`` (see the module docstring)."""
    settings = layer.settings
    f = settings.d_expert

    def hook(module, args):
        x = args[0]
        h = x.reshape(-1, x.shape[-1])
        watcher.suspended = True  # routing here must not count as a second router call
        try:
            _, experts, _ = route(h, layer.router.weight, settings.top_k, 0.0, renormalize=settings.renormalize)
            for e in range(settings.experts):
                need_up, need_down = ("gate_up", e) in wanted, ("down", e) in wanted
                if not (need_up or need_down):
                    continue
                rows = h[(experts == e).any(dim=1)]
                if need_up:
                    wanted[("gate_up", e)].add(rows)
                if need_down:
                    weights = layer.gate_up[e].to(rows.dtype)
                    act = F.silu(rows @ weights[:f].t()) * (rows @ weights[f:].t())
                    wanted[("down", e)].add(act)
        finally:
            watcher.suspended = False

    return hook


def _check_window(index: int, window, vocab: int | None) -> torch.Tensor:
    """The window as a (b, l) int64 tensor (a 1-D window is one row), its ids checked against the vocabulary."""
    if not isinstance(window, torch.Tensor) or window.dtype.is_floating_point or window.dtype == torch.bool:
        kind = window.dtype if isinstance(window, torch.Tensor) else type(window).__name__
        raise InputError(f"calibration window {index} must be an integer torch.Tensor of token ids, got {kind}")
    if window.dim() == 1:
        window = window.unsqueeze(0)
    if window.dim() != 2:
        raise InputError(f"calibration window {index} must be (batch, length), got shape {tuple(window.shape)}")
    if window.numel() and vocab is not None:
        low, high = int(window.min()), int(window.max())
        bad = low if low < 0 else high if high >= vocab else None
        if bad is not None:
            raise InputError(
                f"calibration window {index} has token id {bad}, outside the model's vocabulary [0, {vocab})"
            )
    return window.long()


def collect_input_moments(
    model: nn.Module,
    windows: Iterable[torch.Tensor],
    *,
    layers: Iterable[str] | Callable[[str], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Moments]:
    """{target name: Moments} of the inputs that reached each selected target while ``windows`` ran through
    ``model`` (a seqlab ``LanguageModel``); see the module docstring for how, and for the streaming.

    ``windows``: an iterable of LongTensor token windows (b, l) (a 1-D window is one sequence; a lone tensor is one
    window), each streamed from a fresh state in chunks of ``chunk_size`` tokens. ``layers``: None for
    ``linear_layers(model)``, a predicate on those names, or a list of target names (the head ``"lm_head"`` and
    routers may be named). ``progress``: called as ``progress(windows_done, tokens_done)`` after each window.
    Raises InputError for an empty calibration set or a window with token ids outside the vocabulary (naming the
    window and the id)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(windows, torch.Tensor):  # one window, not an iterable of its rows
        windows = [windows]
    targets = select_targets(model, layers)
    device = next(model.parameters()).device
    moments = {
        t.name: Moments(torch.zeros(t.in_features, t.in_features, dtype=torch.float64, device=device)) for t in targets
    }
    by_weight: dict[int, tuple[str, Moments]] = {}
    experts: dict[int, tuple[MoEFeedForward, dict[tuple[str, int], Moments]]] = {}
    for t in targets:
        if t.part is None:
            by_weight[id(t.module.weight)] = (t.name, moments[t.name])
        else:
            assert isinstance(t.module, MoEFeedForward) and t.expert is not None
            experts.setdefault(id(t.module), (t.module, {}))[1][(t.part, t.expert)] = moments[t.name]
    vocab = getattr(model, "vocab_size", None)
    streams = not getattr(getattr(model, "config", None), "bidirectional", False)
    watcher = _LinearWatcher(by_weight)
    modes = {m: m.training for m in model.modules()}
    handles = []
    tokens = 0
    count = 0
    try:
        model.eval()
        for layer, wanted in experts.values():
            handles.append(layer.register_forward_pre_hook(_moe_hook(layer, wanted, watcher)))
        with torch.no_grad(), watcher:
            for index, window in enumerate(windows):
                ids = _check_window(index, window, vocab).to(device)
                length = ids.shape[1]
                step = chunk_size if streams else max(length, 1)
                state = None
                for start in range(0, length, step):
                    out = model(ids[:, start : start + step], state)
                    state = out.state
                    watcher.last_input.clear()
                tokens += ids.numel()
                count = index + 1
                if progress is not None:
                    progress(count, tokens)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if tokens == 0:
        what = "no windows" if count == 0 else f"{count} windows, no tokens"
        raise InputError(f"the calibration set is empty ({what})")
    return moments
