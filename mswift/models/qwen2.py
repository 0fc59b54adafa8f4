"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama-style with q/k/v biases (no o_proj bias);
small sizes tie the embeddings. Sliding-window attention is refused."""
from __future__ import annotations

from mswift.models.family import (
    ATTENTION_RULES,
    DENSE_MLP_RULES,
    EMBEDDING_RULES,
    OUTPUT_RULES,
    QKV_BIAS_RULES,
    ROTARY_BUFFERS,
    ModelFamily,
    decoder_fields,
    rope_fields,
)
from mswift.models.hf_config import HFConfigReader


def config_fields(hf: HFConfigReader) -> dict:
    return {**decoder_fields(hf), **rope_fields(hf, ("default",)), "add_qkv_bias": True}


FAMILY = ModelFamily(
    name="qwen2",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    config_fields=config_fields,
    weight_rules=EMBEDDING_RULES + ATTENTION_RULES + QKV_BIAS_RULES + DENSE_MLP_RULES
    + OUTPUT_RULES,
    ignored_tensors=ROTARY_BUFFERS,
    debug_config=dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        num_hidden_layers=2, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
)
