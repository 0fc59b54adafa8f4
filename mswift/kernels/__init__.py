"""mswift's Triton kernels, each with a plain torch reference.

The kernel families live in the repository's top-level ``kernels/`` folder and are installed as
``mswift.kernels.<family>`` (see setup.py); this package re-exports their public functions.
"""
from .attention import (VarlenAttentionFunction, llama4_attn_temperature_scale,
                        positions_from_cu_seqlens, split_cu_seqlens_at_chunks, varlen_attention,
                        varlen_attention_reference)

__all__ = [
    "VarlenAttentionFunction",
    "llama4_attn_temperature_scale",
    "positions_from_cu_seqlens",
    "split_cu_seqlens_at_chunks",
    "varlen_attention",
    "varlen_attention_reference",
]
