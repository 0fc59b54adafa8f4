"""Llama-4 attention temperature tuning and per-sample positions of a packed batch.

Hugging Face's Llama-4 scales the queries of its no-RoPE layers before attention
(``Llama4TextAttention.forward``, https://huggingface.co/papers/2501.19399):
``q = (q * scale[pos]).to(q.dtype)`` with
``scale = log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`` computed in fp32. HF uses the
token's position in its sequence; in a packed batch that is the position inside its sample
(``mswift.kernels.positions_from_cu_seqlens``), so a packed sample is scaled as it would be alone.
"""
from __future__ import annotations

import torch


def llama4_attn_temperature_scale(positions: torch.Tensor, floor_scale: float,
                                  attn_scale: float) -> torch.Tensor:
    """fp32 per-token query scale ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1``.

    ``positions``: integer positions of any shape; the result has the same shape. Multiply
    q ``[tokens, heads, dim]`` by ``scale[:, None, None]`` and cast back to q's dtype.
    """
    if floor_scale <= 0:
        raise ValueError(f"floor_scale must be positive, got {floor_scale!r}")
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0

