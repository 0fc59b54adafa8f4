"""mswift's Triton kernels, each with a plain torch reference (installed as ``mswift.kernels``)."""
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
