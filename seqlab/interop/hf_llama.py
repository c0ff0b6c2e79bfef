"""``LlamaForCausalLM`` <-> a seqlab attention stack (``ssm="attention"``, ``ffn="mlp"``).

Checked against transformers 5.25's models/llama (configuration_llama.py, modeling_llama.py) and
modeling_rope_utils.py. Reached through ``seqlab.interop.hf.load`` / ``save``; see docs/interop-hybrid.md.

=====================================================  ============================================
HF ``LlamaConfig``                                       seqlab ``BackboneConfig``
=====================================================  ============================================
hidden_size, num_hidden_layers, intermediate_size        d_model, n_layer, d_ffn (ffn="mlp")
num_attention_heads, num_key_value_heads, head_dim       attn_heads, attn_kv_heads, attn_head_dim
rope_parameters / rope_theta + rope_scaling              attn_rope_theta, attn_rope_scaling (linear,
                                                         llama3), attn_rope_dim = head_dim
attention_bias                                           attn_bias and attn_out_bias
rms_norm_eps                                             norm_eps (residual_in_fp32=False)
vocab_size, tie_word_embeddings                          LanguageModel(vocab_size, tie_embeddings)
=====================================================  ============================================

Refused with a ``ConfigError`` naming the field: hidden_act other than silu, mlp_bias true, a rope_type
other than default/linear/llama3 (dynamic, yarn, longrope ...), a partial_rotary_factor below 1 (Llama
rotates the whole head). Weights: see ``seqlab.interop.hf_common`` (gate_proj and up_proj are stacked into
seqlab's fused ``gate_up``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from seqlab.config import BackboneConfig
from seqlab.errors import ConfigError
from seqlab.interop import hf_common as common
from seqlab.models import LanguageModel

# transformers 5.25's LlamaConfig defaults (config.json may leave them out)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
}

NAMES = common.Names(ffn="mlp", ffn_norm="post_attention_layernorm", final_norm="model.norm.weight")


def config_from_hf(hf_config: Mapping[str, Any], where: str = "HF config") -> tuple[BackboneConfig, int, bool]:
    """``(BackboneConfig, vocab_size, tie_embeddings)`` for a LlamaConfig dict; ``ConfigError`` naming the field
    for what seqlab does not compute the same way."""
    cfg = common.merged(DEFAULTS, hf_config, where)
    common.require_silu(cfg, where, "gated MLPs")
    common.refuse_true(cfg, "mlp_bias", where, "seqlab's gated MLP has no biases")
    heads, kv, head_dim = common.attention_heads(cfg, where)
    bias = common.as_bool(cfg, "attention_bias", where)
    eps = common.as_float(cfg, "rms_norm_eps", where)
    if eps <= 0:
        raise ConfigError(f"{where}: rms_norm_eps must be > 0, got {eps}")
    fields: dict[str, Any] = dict(
        d_model=common.as_int(cfg, "hidden_size", where),
        n_layer=common.as_int(cfg, "num_hidden_layers", where),
        ssm="attention",
        ffn="mlp",
        d_ffn=common.as_int(cfg, "intermediate_size", where),
        norm_eps=eps,
        residual_in_fp32=False,
        attn_heads=heads,
        attn_kv_heads=kv,
        attn_head_dim=head_dim,
        attn_bias=bias,
        attn_out_bias=bias,
        **common.rope_from_hf(cfg, where, head_dim, default_partial=1.0, allow_partial=False),
    )
    config = common.build_config(fields, where)
    return config, common.as_int(cfg, "vocab_size", where), common.as_bool(cfg, "tie_word_embeddings", where)


def config_to_hf(model: LanguageModel) -> dict[str, Any]:
    """The LlamaConfig dict for ``model``; ``ConfigError`` naming the field for what Llama cannot represent."""
    config = model.config
    specs = [config.layer_spec(i) for i in range(config.n_layer)]
    for i, (kind, ffn, _) in enumerate(specs):
        if kind != "attention" or ffn != "mlp":
            raise ConfigError(
                f"layer {i} is mixer {kind!r} with ffn {ffn!r}: LlamaForCausalLM layers are attention + 'mlp'"
            )
    common.check_saveable(config, model.embeddings.weight.dtype, "Llama")
    s = common.check_attention_saveable(config, "Llama")
    assert s is not None  # every layer is an attention layer
    if s.rope_dim != s.head_dim:
        raise ConfigError(
            f"attn_rope_dim={s.rope_dim} with attn_head_dim={s.head_dim}: Llama rotates the whole head; "
            "cannot save partial (or no) rotary as LlamaForCausalLM"
        )
    out = common.common_hf_config(LLAMA, model)
    out.update(
        intermediate_size=config.d_ffn_resolved,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        attention_bias=s.bias,
        mlp_bias=False,
        rope_parameters=common.rope_to_hf(s, None),
    )
    return out


LLAMA = common.Family("llama", "LlamaForCausalLM", NAMES, config_from_hf, config_to_hf)
