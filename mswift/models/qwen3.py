"""Qwen3 dense (``Qwen3ForCausalLM``): Llama-style with RMSNorm on each q and k head before
RoPE (megatron-core's ``qk_layernorm``), an explicit ``head_dim``, no biases."""
from __future__ import annotations

from mswift.models.family import (
    ATTENTION_RULES,
    DENSE_MLP_RULES,
    EMBEDDING_RULES,
    OUTPUT_RULES,
    QK_NORM_RULES,
    ModelFamily,
    decoder_fields,
    rope_fields,
)
from mswift.models.hf_config import HFConfigReader


def config_fields(hf: HFConfigReader) -> dict:
    hf.refuse_if("attention_bias", bool, "Qwen3 checkpoints without attention biases only")
    return {**decoder_fields(hf), **rope_fields(hf, ("default",)), "qk_layernorm": True}


FAMILY = ModelFamily(
    name="qwen3",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    config_fields=config_fields,
    weight_rules=EMBEDDING_RULES + ATTENTION_RULES + QK_NORM_RULES + DENSE_MLP_RULES
    + OUTPUT_RULES,
    debug_config=dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        num_hidden_layers=2, head_dim=32, tie_word_embeddings=False,
    ),
)
