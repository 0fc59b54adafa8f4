"""Llama-2 / Llama-3 / Llama-3.1+ (``LlamaForCausalLM``): GQA, SwiGLU, RMSNorm, RoPE with
optional ``llama3`` frequency scaling; no biases. Tied embeddings (Llama-3.2 1B/3B) included."""
from __future__ import annotations

from mswift.models.family import (
    ATTENTION_RULES,
    DENSE_MLP_RULES,
    EMBEDDING_RULES,
    OUTPUT_RULES,
    ROTARY_BUFFERS,
    ModelFamily,
    decoder_fields,
    rope_fields,
)
from mswift.models.hf_config import HFConfigReader


def config_fields(hf: HFConfigReader) -> dict:
    hf.refuse_if("attention_bias", bool, "Llama checkpoints without attention biases only")
    hf.refuse_if("mlp_bias", bool, "Llama checkpoints without MLP biases only")
    hf.refuse_if("pretraining_tp", lambda v: v not in (None, 1), "pretraining_tp must be 1")
    return {**decoder_fields(hf), **rope_fields(hf, ("default", "llama3"))}


FAMILY = ModelFamily(
    name="llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    config_fields=config_fields,
    weight_rules=EMBEDDING_RULES + ATTENTION_RULES + DENSE_MLP_RULES + OUTPUT_RULES,
    ignored_tensors=ROTARY_BUFFERS,
    debug_config=dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        num_hidden_layers=4, tie_word_embeddings=False, rope_theta=10000.0,
        # low/high/original differ from megatron-core's hard-coded 1/4/8192 on purpose
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                      "high_freq_factor": 8.0, "original_max_position_embeddings": 128},
    ),
)
