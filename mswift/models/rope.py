"""RoPE frequency scaling that megatron-core's GPTModel cannot be told about.

megatron-core 0.16's ``RotaryEmbedding(rope_scaling=True)`` implements Llama-3.1's scaling but
hard-codes ``low_freq_factor=1``, ``high_freq_factor=4`` and ``original_max_position_embeddings
=8192``; models that use other values (Llama-3.2 1B/3B use 32 for the factor, Llama-4 Scout uses
low = high = 1 and its own context length) would silently get other frequencies. The formula
itself is HF's (``_compute_llama3_parameters``), so the module's own helper is reused with the
model's numbers, in fp32 like transformers.
"""
from __future__ import annotations

import torch

from mswift.config.schema import ModelConfig


def apply_rope_scaling(rotary_pos_emb: torch.nn.Module, model: ModelConfig) -> None:
    """Replace ``rotary_pos_emb.inv_freq`` (plain RoPE frequencies) by the scaled ones."""
    if model.rope_scaling_type != "llama3":
        raise ValueError(f"rope_scaling_type={model.rope_scaling_type!r}: expected llama3 or None")
    rotary_pos_emb.inv_freq = rotary_pos_emb._apply_scaling(
        rotary_pos_emb.inv_freq,
        factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_low_freq_factor,
        high_freq_factor=model.rope_high_freq_factor,
        original_max_position_embeddings=model.rope_original_max_position_embeddings,
    )
