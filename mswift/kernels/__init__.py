"""mswift's Triton kernels, each with a plain torch reference.

The kernel families live in the repository's top-level ``kernels/`` folder and are installed as
``mswift.kernels.<family>`` (see setup.py); this package re-exports their public functions.
"""
from .attention import (VarlenAttentionFunction, llama4_attn_temperature_scale,
                        positions_from_cu_seqlens, split_cu_seqlens_at_chunks, varlen_attention,
                        varlen_attention_reference)
from .fused import apply_rotary, rms_norm, swiglu, vocab_parallel_cross_entropy
from .moe import (aux_loss_scores, permute, switch_load_balancing_loss, topk_routing, unpermute,
                  updated_expert_bias, z_loss)

__all__ = [
    "VarlenAttentionFunction",
    "apply_rotary",
    "aux_loss_scores",
    "llama4_attn_temperature_scale",
    "permute",
    "positions_from_cu_seqlens",
    "rms_norm",
    "split_cu_seqlens_at_chunks",
    "swiglu",
    "switch_load_balancing_loss",
    "topk_routing",
    "unpermute",
    "updated_expert_bias",
    "varlen_attention",
    "varlen_attention_reference",
    "vocab_parallel_cross_entropy",
    "z_loss",
]
