"""Attention layer -> Mamba-2 layer: the student's layer options and its weights from the teacher's attention.

The mapping (Mamba in the Llama, Wang et al. 2024: V -> x, K -> B, Q -> C, O -> out_proj), worked out for
seqlab's ``Mamba2Mixer`` layout (in_proj rows ``z | x | B | C | dt``, depthwise conv over ``x | B | C`` followed
by SiLU, SSD scan, gated per-group RMSNorm, out_proj). An attention layer with ``H`` query heads, ``KV``
key/value heads and head size ``P`` becomes a Mamba-2 layer with:

- ``nheads = H`` and ``headdim = P`` (so ``d_inner = H * P``; ``expand = H * P / d_model`` must be an integer);
- ``d_state = P`` and ``ngroups = H``. Not ``ngroups = KV``: Mamba-2 ties B and C to the same groups, so C = Q
  needs one group per query head; GQA's shared K and V are repeated per query head (the rows of x and B are
  copies, which the student may then learn apart), exactly as attention repeats them;
- x rows = V (repeated), B rows = K (repeated), C rows = Q, out_proj = O (biases copied when attention has
  them); the dt rows are zero, so dt = softplus(dt_bias) is the constant ``1 / sqrt(P)``: the scan then
  accumulates ``dt * (C_t . B_s) x_s``, the attention score's ``q.k / sqrt(P)`` times v;
- conv1d = identity (last tap 1, the others 0, bias 0); D = 0; A_log such that the per-step decay
  ``exp(dt * A)`` is ``decay`` (default 0.9; 1 is linear attention's infinite memory, which A_log can hardly
  learn away: on a trained byte-level teacher, decay 0.999 made attention init worse than random init after
  equal training, 0.9 made it better, at 50% and 100% replacement: docs/distill.md);
- the z gate: its rows have zero weight and a bias of ``GATE_BIAS`` (the layer gets ``proj_bias=True``), so
  ``silu(z)`` is the same constant on every channel. A zero-weight z without a bias would make the gate
  ``silu(0) = 0``, a dead layer; with a constant gate, the gated norm reduces to the plain per-head RMSNorm
  (it is scale-invariant per group, so the constant drops out up to eps), and z can learn a real gate later.

Two nonlinearities of the Mamba-2 layer have no counterpart in attention and stay: the SiLU after the conv
(so the layer starts as linear attention with the feature map SiLU on q, k and v) and the per-head RMSNorm of
the output (group size ``d_inner / ngroups = P``). The norm takes the place of linear attention's normaliser
(the sum of scores, unsafe here since SiLU scores can be negative): each head's output is scaled to unit RMS,
then by the norm's weight (1 here; ``calibrate_norms`` then sets it to the teacher's output scale, which
``seqlab.distill.distill`` does on the first training window). Rotary positions are dropped (the recurrence's
order and decay carry position). ``tests/test_distill.py`` checks that such a layer with no decay equals this
normalised SiLU linear attention computed directly in float64.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from seqlab.config import ATTN_FIELDS, AttentionSettings, BackboneConfig, LayerOverride
from seqlab.errors import ConfigError

#: the z rows' bias: silu(5) = 4.97, a constant gate in silu's near-linear range (see the module docstring)
GATE_BIAS = 5.0
#: the default per-step decay exp(dt * A) of a mapped layer (measured: docs/distill.md, "attention vs random init")
DEFAULT_DECAY = 0.9
#: the smallest -A a mapped layer gets (A_log stays finite; exp(-dt * 1e-30 * L) is 1 in float64)
MIN_NEG_A = 1e-30
INIT_KINDS = ("attention", "random")


def attention_layers(config: BackboneConfig) -> list[int]:
    """The indices of a config's attention layers."""
    return [i for i in range(config.n_layer) if config.layer_spec(i)[0] == "attention"]


def choose_layers(config: BackboneConfig, replace) -> list[int]:
    """The attention layers to replace: ``replace`` is a fraction in (0, 1] of them (spread evenly over the
    stack, rounded to at least one) or a list of layer indices (each must be an attention layer)."""
    attn = attention_layers(config)
    if not attn:
        raise ConfigError("the teacher has no attention layer to replace")
    if isinstance(replace, (int, float)) and not isinstance(replace, bool):
        fraction = float(replace)
        if not (0 < fraction <= 1) or not math.isfinite(fraction):
            raise ConfigError(f"--replace as a fraction must be in (0, 1], got {replace!r}")
        count = max(1, round(fraction * len(attn)))
        # evenly spread: position k of count takes the attention layer at the centre of its share of the stack
        picks = sorted({attn[min(len(attn) - 1, int((k + 0.5) * len(attn) / count))] for k in range(count)})
        return picks
    if isinstance(replace, str) or not isinstance(replace, Iterable):
        raise ConfigError(f"--replace must be a fraction or a list of layer indices, got {replace!r}")
    layers = []
    for value in replace:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"--replace layer indices must be ints, got {value!r}")
        if value not in attn:
            raise ConfigError(f"--replace names layer {value}, which is not an attention layer (those are {attn})")
        layers.append(value)
    if not layers or len(set(layers)) != len(layers):
        raise ConfigError(f"--replace needs distinct attention layers, got {list(replace)}")
    return sorted(layers)


def mamba2_options(settings: AttentionSettings, d_model: int, where: str = "") -> dict:
    """The Mamba-2 layer options (``LayerOverride.options``) that mirror an attention layer's heads."""
    d_inner = settings.heads * settings.head_dim
    if d_inner % d_model:
        raise ConfigError(
            f"{where}attention heads * head_dim = {d_inner} is not a multiple of d_model ({d_model}): a Mamba-2 "
            "layer's d_inner is expand * d_model, so it cannot keep the attention heads"
        )
    return {
        "expand": d_inner // d_model,
        "headdim": settings.head_dim,
        "d_state": settings.head_dim,
        "ngroups": settings.heads,
        "proj_bias": True,
    }


def student_config(teacher: BackboneConfig, layers: Sequence[int], settings: dict[int, AttentionSettings]):
    """The teacher's config with ``layers`` turned into Mamba-2 layers (their feed-forwards kept)."""
    overrides = dict(teacher.layer_overrides)
    for i in layers:
        old = overrides.get(i)
        options = mamba2_options(settings[i], teacher.d_model, f"layer {i}: ")
        overrides[i] = LayerOverride(mixer="mamba2", ffn=old.ffn if old else None, options=options)
    kept_attention = any(teacher.layer_spec(i)[0] == "attention" for i in range(teacher.n_layer) if i not in layers)
    cleared: dict[str, Any] = {} if kept_attention else {name: None for name in ATTN_FIELDS}
    return dataclasses.replace(teacher, layer_overrides=overrides, **cleared)


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


def _repeat_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """Rows of kv_heads heads -> rows of heads heads, each kv head repeated for its query heads (GQA's order)."""
    rows = weight.reshape(kv_heads, -1, *weight.shape[1:])
    return rows.repeat_interleave(heads // kv_heads, dim=0).reshape(-1, *weight.shape[1:])


@torch.no_grad()
def init_from_attention(mixer: Any, attn: Any, decay: float = DEFAULT_DECAY) -> None:
    """Set a Mamba-2 mixer (built with ``mamba2_options(attn.settings, d_model)``) from an attention mixer's
    weights, in place (see the module docstring). ``decay`` in (0, 1]: the per-step decay of the state."""
    if not (0 < decay <= 1):
        raise ConfigError(f"decay must be in (0, 1], got {decay!r}")
    heads, kv, hd = attn.heads, attn.kv_heads, attn.head_dim
    if (mixer.nheads, mixer.headdim, mixer.d_state, mixer.ngroups) != (heads, hd, hd, heads):
        raise ConfigError(
            f"layer {mixer.layer_idx}: the Mamba-2 layer has nheads {mixer.nheads}, headdim {mixer.headdim}, d_state "
            f"{mixer.d_state}, ngroups {mixer.ngroups}; the attention layer needs {heads}, {hd}, {hd}, {heads}"
        )
    d_inner = heads * hd
    weight = torch.zeros_like(mixer.in_proj.weight)
    # rows: z (d_inner) | x (d_inner) | B (heads * hd) | C (heads * hd) | dt (heads)
    x_rows, b_rows, c_rows = (
        slice(d_inner, 2 * d_inner),
        slice(2 * d_inner, 3 * d_inner),
        slice(3 * d_inner, 4 * d_inner),
    )
    weight[x_rows] = _repeat_heads(attn.v_proj.weight, kv, heads)
    weight[b_rows] = _repeat_heads(attn.k_proj.weight, kv, heads)
    weight[c_rows] = attn.q_proj.weight
    mixer.in_proj.weight.copy_(weight)
    if mixer.in_proj.bias is not None:
        bias = torch.zeros_like(mixer.in_proj.bias)
        bias[:d_inner] = GATE_BIAS
        if attn.q_proj.bias is not None:
            bias[x_rows] = _repeat_heads(attn.v_proj.bias, kv, heads)
            bias[b_rows] = _repeat_heads(attn.k_proj.bias, kv, heads)
            bias[c_rows] = attn.q_proj.bias
        mixer.in_proj.bias.copy_(bias)
    conv = torch.zeros_like(mixer.conv1d.weight)
    conv[:, 0, -1] = 1.0  # the causal conv's last tap is the current element
    mixer.conv1d.weight.copy_(conv)
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.zero_()
    dt = 1.0 / math.sqrt(hd)
    mixer.dt_bias.fill_(_inverse_softplus(dt))
    mixer.A_log.fill_(math.log(max(-math.log(decay) / dt, MIN_NEG_A)))
    mixer.D.zero_()
    mixer.norm.weight.fill_(1.0)
    mixer.out_proj.weight.copy_(attn.o_proj.weight)
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.zero_()
        if attn.o_proj.bias is not None:
            mixer.out_proj.bias.copy_(attn.o_proj.bias)


@torch.no_grad()
def calibrate_norms(teacher: Any, student: Any, layers: Sequence[int], input_ids: torch.Tensor) -> None:
    """Set each mapped layer's gated-norm weight to the per-channel RMS of the teacher's attention output
    before O (its input to ``o_proj``) on ``input_ids``, in place. The mapped layer normalises each head to
    unit RMS; with this weight its output before out_proj has the teacher's scale per channel (on a trained
    byte-level teacher this lowered the starting KL at 50% replacement from 1.44 to 1.16 nats per byte)."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i in layers:

        def keep(module, args, output, i=i):
            captured[i] = args[0].detach().float().pow(2).mean(dim=tuple(range(args[0].dim() - 1))).sqrt()

        hooks.append(teacher.backbone.layers[i].mixer.o_proj.register_forward_hook(keep))
    try:
        teacher(input_ids, None, return_state=False)
    finally:
        for hook in hooks:
            hook.remove()
    for i in layers:
        weight = student.backbone.layers[i].mixer.norm.weight
        weight.copy_(captured[i].clamp_min(1e-6).to(weight.dtype))


def build_student(
    teacher: Any,
    layers: Sequence[int],
    init: str = "attention",
    decay: float = DEFAULT_DECAY,
    seed: int = 0,
    base: Any = None,
):
    """The student of a ``LanguageModel`` teacher: its config with ``layers`` as Mamba-2 layers; every other
    weight (embeddings, norms, MLPs, kept attention layers, head) copied from ``base`` (default the teacher);
    replaced layers that ``base`` has as attention layers are initialised from them (``init="attention"``) or
    by Mamba-2's own initialisation (``init="random"``, seeded by ``seed``). A ``base`` student of an earlier
    stage keeps its already-replaced layers. The student carries the teacher's ``adapter_info``."""
    from seqlab.mixers import AttentionMixer, Mamba2Mixer
    from seqlab.models import LanguageModel

    if init not in INIT_KINDS:
        raise ConfigError(f"--init must be one of {INIT_KINDS}, got {init!r}")
    if not isinstance(teacher, LanguageModel):
        raise ConfigError(f"the teacher must be a LanguageModel, got {type(teacher).__name__}")
    if teacher.config.bidirectional:
        raise ConfigError("the teacher is bidirectional: distillation replaces causal attention layers")
    base = teacher if base is None else base
    teacher_layers = teacher.backbone.layers
    settings = {}
    for i in layers:
        mixer = teacher_layers[i].mixer
        if not isinstance(mixer, AttentionMixer):
            raise ConfigError(f"layer {i} of the teacher is not an attention layer")
        settings[i] = mixer.settings
    config = student_config(teacher.config, layers, settings)
    device = next(teacher.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        student = LanguageModel(config, teacher.vocab_size, tie_embeddings=teacher.tie_embeddings)
    finally:
        torch.random.set_rng_state(generator_state)
    student = student.to(device=device, dtype=next(teacher.parameters()).dtype)
    own = student.state_dict()
    copied = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    fresh = [i for i in layers if isinstance(base.backbone.layers[i].mixer, AttentionMixer)]
    for i in fresh:  # a fresh Mamba-2 mixer: nothing of the attention layer's names carries over
        copied = {k: v for k, v in copied.items() if not k.startswith(f"backbone.layers.{i}.mixer.")}
    student.load_state_dict(copied, strict=False)
    for i in fresh:
        mixer = student.backbone.layers[i].mixer
        assert isinstance(mixer, Mamba2Mixer)
        if init == "attention":
            init_from_attention(mixer, base.backbone.layers[i].mixer, decay)
    if getattr(teacher, "adapter_info", None) is not None:
        student.adapter_info = teacher.adapter_info
    return student


def stage_groups(layers: Sequence[int], stages: int) -> list[list[int]]:
    """``layers`` split into ``stages`` progressive groups, interleaved so each stage's layers spread over the
    stack (stage k adds layers k, k + stages, ...); a stage count above the layer count is capped."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"--stages must be an int >= 1, got {stages!r}")
    stages = min(stages, len(layers))
    return [list(layers[k::stages]) for k in range(stages)]
