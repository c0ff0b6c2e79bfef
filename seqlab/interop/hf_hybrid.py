"""``JambaForCausalLM`` and ``BambaForCausalLM`` <-> seqlab hybrid stacks (Mamba + attention layers, each with a
gated-MLP or MoE feed-forward). Reached through ``seqlab.interop.hf.load`` / ``save``; docs/interop-hybrid.md.

Checked against transformers 5.25's models/jamba and models/bamba (configuration_*.py, modular_*.py).

Why Bamba for the Mamba-2 hybrid: its layer is exactly seqlab's ``Block`` (pre-norm mixer, residual, pre-norm
SwiGLU MLP, residual) with a Mamba-2 mixer that is transformers' Mamba2Mixer (gated RMSNorm, same tensor
names as seqlab's) or Llama attention with partial rotary, and nothing else. The other Mamba-2 hybrids in
transformers each add something seqlab's blocks do not compute: FalconH1 runs attention and Mamba-2 side by side
in one layer with muP multipliers, Zamba2 shares one attention block across layers (with LoRA adapters),
NemotronH uses relu^2 MLPs as separate layers, GraniteMoeHybrid scales embeddings, residuals and logits by
multipliers and adds shared experts.

Jamba (``model_type`` "jamba")
===========================================================  ============================================
HF ``JambaConfig``                                             seqlab ``BackboneConfig``
===========================================================  ============================================
layers with i % attn_layer_period == attn_layer_offset         layer_overrides {i: mixer "attention"}, the
                                                               rest ssm="mamba1" with mamba_inner_norms=True
                                                               (Jamba's dt/B/C RMSNorms)
layers with i % expert_layer_period == expert_layer_offset     layer_overrides {i: ffn "moe"} (num_experts
(when num_experts > 1)                                         > 1), the rest ffn="mlp"
intermediate_size                                              d_ffn (experts are as wide: moe_d_expert)
num_experts, num_experts_per_tok                               moe_experts, moe_top_k, moe_renormalize=False
                                                               (Jamba keeps the top-k softmax weights as
                                                               they are)
num_attention_heads, num_key_value_heads                       attn_heads, attn_kv_heads, attn_rope_dim=0
                                                               (Jamba's attention has no position encoding)
mamba_d_state, mamba_d_conv, mamba_expand, mamba_dt_rank       d_state, d_conv, expand, dt_rank
mamba_conv_bias, mamba_proj_bias, rms_norm_eps                 conv_bias, proj_bias, norm_eps
===========================================================  ============================================

Bamba (``model_type`` "bamba")
===========================================================  ============================================
attn_layer_indices                                             layer_overrides {i: mixer "attention"}, the
                                                               rest ssm="mamba2"; ffn="mlp" everywhere
mamba_n_heads, mamba_d_head, mamba_n_groups, mamba_d_state     d_inner / headdim, headdim, ngroups, d_state
mamba_d_conv, mamba_expand, mamba_chunk_size                   d_conv, expand, chunk_size
num_attention_heads, num_key_value_heads, attention_bias       attn_heads, attn_kv_heads, attn_bias/out_bias
rope_parameters (partial_rotary_factor, 0.5 by default)        attn_rope_theta, attn_rope_dim = head_dim *
                                                               partial_rotary_factor, attn_rope_scaling
===========================================================  ============================================

Refused with a ``ConfigError`` naming the field: hidden_act other than silu; Jamba: a non-null
sliding_window (transformers 5 ignores it, older versions used it in flash attention); Bamba: mlp_bias true,
a time_step_limit that clamps, rope types other than default/linear/llama3. Saving refuses layouts Jamba
cannot express (attention or MoE layers that are not one residue class ``i % period == offset``, MoE
layers whose gates are renormalised, experts narrower or wider than the dense MLP, attention with rotary
positions or biases) and Bamba cannot (MoE, attention without rotary positions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError
from seqlab.interop import hf_common as common
from seqlab.interop.hf import _decode_float
from seqlab.models import LanguageModel

# transformers 5.25's JambaConfig / BambaConfig defaults (config.json may leave them out)
JAMBA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536,
    "tie_word_embeddings": False,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "num_experts_per_tok": 2,
    "num_experts": 16,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "attn_layer_period": 8,
    "attn_layer_offset": 4,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": "auto",
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
}
BAMBA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128000,
    "tie_word_embeddings": False,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 262144,
    "attn_layer_indices": None,
    "mamba_n_heads": 128,
    "mamba_d_head": "auto",
    "mamba_n_groups": 1,
    "mamba_d_state": 256,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_chunk_size": 256,
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
    "time_step_limit": (0.0, math.inf),
    "attention_bias": False,
    "mlp_bias": False,
}

HYBRID_NAMES = common.Names(ffn="feed_forward", ffn_norm="pre_ff_layernorm", final_norm="model.final_layernorm.weight")


def _eps(cfg: Mapping[str, Any], where: str) -> float:
    eps = common.as_float(cfg, "rms_norm_eps", where)
    if eps <= 0:
        raise ConfigError(f"{where}: rms_norm_eps must be > 0, got {eps}")
    return eps


def _expand(cfg: Mapping[str, Any], where: str) -> int:
    value = cfg["mamba_expand"]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: mamba_expand is {value!r}; seqlab needs a positive integer")
    return value


def _mixer_layers(config: BackboneConfig, allowed: tuple[str, ...], family: str) -> tuple[list[int], list[int]]:
    """(attention layers, MoE layers), refusing mixer / ffn kinds ``family`` does not have."""
    attn, moe = [], []
    for i in range(config.n_layer):
        kind, ffn, _ = config.layer_spec(i)
        if kind not in allowed:
            raise ConfigError(f"layer {i} is mixer {kind!r}: {family} layers are {' or '.join(allowed)}")
        if ffn not in ("mlp", "moe"):
            raise ConfigError(
                f"layer {i} has ffn {ffn!r}: every {family} layer has a feed-forward (ffn 'mlp'"
                + (" or 'moe')" if family == "Jamba" else ")")
            )
        if kind == "attention":
            attn.append(i)
        if ffn == "moe":
            moe.append(i)
    return attn, moe


# ==================================================================================================
# Jamba
# ==================================================================================================
def jamba_config_from_hf(hf_config: Mapping[str, Any], where: str = "HF config") -> tuple[BackboneConfig, int, bool]:
    """``(BackboneConfig, vocab_size, tie_embeddings)`` for a JambaConfig dict."""
    cfg = common.merged(JAMBA_DEFAULTS, hf_config, where)
    common.require_silu(cfg, where, "Mamba mixers and gated MLPs")
    if cfg.get("sliding_window") is not None:
        raise ConfigError(
            f"{where}: sliding_window is {cfg['sliding_window']!r}; transformers 5's Jamba ignores it while older "
            "versions applied it in flash attention only, so what the model computes is ambiguous; set it to null"
        )
    n = common.as_int(cfg, "num_hidden_layers", where)
    pattern = {}
    for what in ("attn", "expert"):
        period = common.as_int(cfg, f"{what}_layer_period", where)
        offset = common.as_index(cfg, f"{what}_layer_offset", where)
        if offset >= period:
            raise ConfigError(f"{where}: {what}_layer_offset ({offset}) must be smaller than {what}_layer_period")
        pattern[what] = [i for i in range(n) if i % period == offset]
    experts = common.as_int(cfg, "num_experts", where)
    top_k = common.as_int(cfg, "num_experts_per_tok", where)
    moe_layers = pattern["expert"] if experts > 1 else []
    overrides: dict[int, dict[str, Any]] = {i: {"mixer": "attention"} for i in pattern["attn"]}
    for i in moe_layers:
        overrides.setdefault(i, {})["ffn"] = "moe"
    rank = cfg["mamba_dt_rank"]
    fields: dict[str, Any] = dict(
        d_model=common.as_int(cfg, "hidden_size", where),
        n_layer=n,
        ssm="mamba1",
        d_state=common.as_int(cfg, "mamba_d_state", where),
        d_conv=common.as_int(cfg, "mamba_d_conv", where),
        expand=_expand(cfg, where),
        dt_rank="auto" if rank == "auto" else common.as_int(cfg, "mamba_dt_rank", where),
        conv_bias=common.as_bool(cfg, "mamba_conv_bias", where),
        proj_bias=common.as_bool(cfg, "mamba_proj_bias", where),
        norm_eps=_eps(cfg, where),
        residual_in_fp32=False,
        ffn="mlp",
        d_ffn=common.as_int(cfg, "intermediate_size", where),
        layer_overrides=overrides,
    )
    if len(pattern["attn"]) < n:
        fields["mamba_inner_norms"] = True
    if pattern["attn"]:
        heads, kv, head_dim = common.attention_heads(cfg, where)
        fields.update(attn_heads=heads, attn_kv_heads=kv, attn_head_dim=head_dim, attn_rope_dim=0)
    if moe_layers:
        if top_k > experts:
            raise ConfigError(f"{where}: num_experts_per_tok ({top_k}) is more than num_experts ({experts})")
        fields.update(moe_experts=experts, moe_top_k=top_k, moe_renormalize=False)
    config = common.build_config(fields, where)
    return config, common.as_int(cfg, "vocab_size", where), common.as_bool(cfg, "tie_word_embeddings", where)


def jamba_config_to_hf(model: LanguageModel) -> dict[str, Any]:
    """The JambaConfig dict for ``model``; ``ConfigError`` naming the field for what Jamba cannot represent."""
    config = model.config
    n = config.n_layer
    attn, moe = _mixer_layers(config, ("mamba1", "attention"), "Jamba")
    common.check_saveable(config, model.embeddings.weight.dtype, "Jamba")
    if len(attn) < n and not config.mamba_inner_norms:
        raise ConfigError("mamba_inner_norms is not set: Jamba's Mamba-1 mixers normalise dt, B and C")
    out = common.common_hf_config(JAMBA, model)
    a_period, a_offset = common.layer_pattern(attn, n, "attention")
    out.update(attn_layer_period=a_period, attn_layer_offset=a_offset, intermediate_size=config.d_ffn_resolved)
    s = common.check_attention_saveable(config, "Jamba")
    if s is None:
        out.update(num_attention_heads=1, num_key_value_heads=1)
    else:
        if s.rope_dim:
            raise ConfigError(f"attn_rope_dim={s.rope_dim}: Jamba's attention has no rotary positions (set it to 0)")
        if s.bias:
            raise ConfigError("attn_bias=True: Jamba's attention projections have no biases")
        if s.head_dim * s.heads != config.d_model:
            raise ConfigError(
                f"attn_head_dim={s.head_dim}: Jamba's head_dim is hidden_size / num_attention_heads "
                f"({config.d_model} / {s.heads})"
            )
        out.update(num_attention_heads=s.heads, num_key_value_heads=s.kv_heads)
    if moe:
        m = config.moe_settings()
        if m.experts == 1:
            raise ConfigError("moe_experts=1: Jamba makes a one-expert layer a dense MLP; use ffn 'mlp' there")
        if m.d_expert != config.d_ffn_resolved:
            raise ConfigError(
                f"moe_d_expert={m.d_expert} but the dense width is {config.d_ffn_resolved}: Jamba's experts and "
                "MLPs share intermediate_size"
            )
        if m.top_k > 1 and m.renormalize is not False:
            raise ConfigError(
                f"moe_renormalize={m.renormalize!r} with moe_top_k={m.top_k}: Jamba's router does not "
                "renormalise the top-k weights; only moe_renormalize=False can be saved as Jamba"
            )
        e_period, e_offset = common.layer_pattern(moe, n, "MoE")
        out.update(
            num_experts=m.experts,
            num_experts_per_tok=m.top_k,
            expert_layer_period=e_period,
            expert_layer_offset=e_offset,
        )
    else:
        out.update(num_experts=1, num_experts_per_tok=1, expert_layer_period=1, expert_layer_offset=0)
    out.update(
        mamba_d_state=config.d_state,
        mamba_d_conv=config.d_conv,
        mamba_expand=config.expand,
        mamba_dt_rank=config.dt_rank,
        mamba_conv_bias=config.conv_bias,
        mamba_proj_bias=config.proj_bias,
    )
    return out


# ==================================================================================================
# Bamba
# ==================================================================================================
def _time_step_limit_ok(value: Any) -> bool:
    value = _decode_float(value)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return False
    low, high = (_decode_float(v) for v in value)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    return numbers and low <= 0 and high == math.inf


def bamba_config_from_hf(hf_config: Mapping[str, Any], where: str = "HF config") -> tuple[BackboneConfig, int, bool]:
    """``(BackboneConfig, vocab_size, tie_embeddings)`` for a BambaConfig dict."""
    cfg = common.merged(BAMBA_DEFAULTS, hf_config, where)
    common.require_silu(cfg, where, "Mamba-2 mixers and gated MLPs")
    common.refuse_true(cfg, "mlp_bias", where, "seqlab's gated MLP has no biases")
    if not _time_step_limit_ok(cfg["time_step_limit"]):
        raise ConfigError(
            f"{where}: time_step_limit is {cfg['time_step_limit']!r}; seqlab does not clamp dt, so only "
            "(0.0, inf) (no clamping) is supported"
        )
    n = common.as_int(cfg, "num_hidden_layers", where)
    indices = cfg["attn_layer_indices"] or []
    if not isinstance(indices, (list, tuple)) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in indices
    ):
        raise ConfigError(f"{where}: attn_layer_indices must be layer indices in [0, {n}), got {indices!r}")
    hidden = common.as_int(cfg, "hidden_size", where)
    expand = _expand(cfg, where)
    n_heads = common.as_int(cfg, "mamba_n_heads", where)
    d_head = expand * hidden // n_heads if cfg["mamba_d_head"] == "auto" else common.as_int(cfg, "mamba_d_head", where)
    if d_head * n_heads != expand * hidden:
        raise ConfigError(
            f"{where}: mamba_n_heads * mamba_d_head = {n_heads} * {d_head} must equal mamba_expand * hidden_size = "
            f"{expand * hidden}"
        )
    groups = common.as_int(cfg, "mamba_n_groups", where)
    if n_heads % groups:
        raise ConfigError(f"{where}: mamba_n_heads ({n_heads}) must be divisible by mamba_n_groups ({groups})")
    fields: dict[str, Any] = dict(
        d_model=hidden,
        n_layer=n,
        ssm="mamba2",
        d_state=common.as_int(cfg, "mamba_d_state", where),
        d_conv=common.as_int(cfg, "mamba_d_conv", where),
        expand=expand,
        headdim=d_head,
        ngroups=groups,
        chunk_size=common.as_int(cfg, "mamba_chunk_size", where),
        conv_bias=common.as_bool(cfg, "mamba_conv_bias", where),
        proj_bias=common.as_bool(cfg, "mamba_proj_bias", where),
        norm_eps=_eps(cfg, where),
        residual_in_fp32=False,
        ffn="mlp",
        d_ffn=common.as_int(cfg, "intermediate_size", where),
        layer_overrides={i: {"mixer": "attention"} for i in sorted(set(indices))},
    )
    if indices:
        heads, kv, head_dim = common.attention_heads(cfg, where)
        bias = common.as_bool(cfg, "attention_bias", where)
        # BambaConfig passes partial_rotary_factor=0.5 itself (a top-level key is overridden); rope_parameters wins
        rope_cfg = {k: v for k, v in cfg.items() if k != "partial_rotary_factor"}
        rope = common.rope_from_hf(rope_cfg, where, head_dim, default_partial=0.5, allow_partial=True)
        fields.update(
            attn_heads=heads, attn_kv_heads=kv, attn_head_dim=head_dim, attn_bias=bias, attn_out_bias=bias, **rope
        )
    config = common.build_config(fields, where)
    return config, common.as_int(cfg, "vocab_size", where), common.as_bool(cfg, "tie_word_embeddings", where)


def bamba_config_to_hf(model: LanguageModel) -> dict[str, Any]:
    """The BambaConfig dict for ``model``; ``ConfigError`` naming the field for what Bamba cannot represent."""
    config = model.config
    attn, moe = _mixer_layers(config, ("mamba2", "attention"), "Bamba")
    if moe:
        raise ConfigError(f"ffn 'moe' on layers {moe}: Bamba's feed-forwards are dense MLPs")
    common.check_saveable(config, model.embeddings.weight.dtype, "Bamba")
    out = common.common_hf_config(BAMBA, model)
    out.update(
        attn_layer_indices=attn,
        intermediate_size=config.d_ffn_resolved,
        mamba_n_heads=config.nheads,
        mamba_d_head=config.headdim,
        mamba_n_groups=config.ngroups,
        mamba_d_state=config.d_state,
        mamba_d_conv=config.d_conv,
        mamba_expand=config.expand,
        mamba_chunk_size=config.chunk_size,
        mamba_conv_bias=config.conv_bias,
        mamba_proj_bias=config.proj_bias,
        mlp_bias=False,
    )
    s = common.check_attention_saveable(config, "Bamba")
    if s is None:
        out.update(num_attention_heads=1, num_key_value_heads=1, attention_bias=False)
        return out
    if s.head_dim * s.heads != config.d_model:
        raise ConfigError(
            f"attn_head_dim={s.head_dim}: Bamba's head_dim is hidden_size / num_attention_heads "
            f"({config.d_model} / {s.heads})"
        )
    partial = s.rope_dim / s.head_dim
    if s.rope_dim == 0 or int(s.head_dim * partial) != s.rope_dim:
        raise ConfigError(
            f"attn_rope_dim={s.rope_dim} of attn_head_dim={s.head_dim}: Bamba's attention rotates "
            "int(head_dim * partial_rotary_factor) > 0 dims, which cannot express this"
        )
    out.update(
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        attention_bias=s.bias,
        rope_parameters=common.rope_to_hf(s, partial),
    )
    return out


JAMBA = common.Family("jamba", "JambaForCausalLM", HYBRID_NAMES, jamba_config_from_hf, jamba_config_to_hf)
BAMBA = common.Family("bamba", "BambaForCausalLM", HYBRID_NAMES, bamba_config_from_hf, bamba_config_to_hf)
