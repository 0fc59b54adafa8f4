"""Varlen (packed THD) flash attention: Triton kernels and their torch reference."""
from .interface import BACKENDS, VarlenAttentionFunction, varlen_attention
from .packing import positions_from_cu_seqlens, split_cu_seqlens_at_chunks
from .reference import sample_attention_mask, varlen_attention_reference
from .temperature import llama4_attn_temperature_scale
from .validation import AttentionOptions, check_varlen_inputs

__all__ = [
    "BACKENDS",
    "AttentionOptions",
    "VarlenAttentionFunction",
    "check_varlen_inputs",
    "llama4_attn_temperature_scale",
    "positions_from_cu_seqlens",
    "sample_attention_mask",
    "split_cu_seqlens_at_chunks",
    "varlen_attention",
    "varlen_attention_reference",
]
