"""Argument checks shared by the Triton and torch varlen attention paths.

Shapes, dtypes and option values are always checked. The contents of ``cu_seqlens`` are only
checked when they live on the CPU: reading them from a GPU would force a device sync on every
attention call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionOptions:
    """Resolved, validated options of one varlen attention call."""

    softmax_scale: float
    causal: bool
    window_left: int  # -1: unbounded
    window_right: int  # -1: unbounded; 0 whenever causal
    chunk_size: int  # 0: no chunking


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor of sample offsets, got {cu!r:.80}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be torch.int32 (as in FlashAttention), got {cu.dtype}")
    if cu.device.type != "cpu":
        return  # no device sync: the contents of GPU offsets are trusted
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] > total:
        raise ValueError(f"{name} ends at {values[-1]} but the packed tensor has {total} tokens")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(
            f"max_seqlen {max_seqlen} is smaller than the longest sample ({max(lengths)}) in {name}"
        )


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be [total_tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same tokens and kv heads"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )


def _is_int(value) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError):
        return False


def _check_window(window_size) -> tuple[int, int]:
    """A ``(left, right)`` pair from a tuple, list or 2-element tensor, as FlashAttention takes."""
    if isinstance(window_size, torch.Tensor):
        if window_size.numel() != 2 or window_size.is_floating_point():
            raise ValueError(f"window_size must be a (left, right) pair of ints, got a tensor "
                             f"of shape {tuple(window_size.shape)} and dtype {window_size.dtype}")
        window_size = window_size.flatten().tolist()
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a (left, right) pair, got {window_size!r}")
    if not all(_is_int(w) for w in window_size):
        raise ValueError(f"window_size entries must be ints, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    return left, right


def check_flash_attn_extras(dropout_p, softcap, alibi_slopes, block_table,
                            return_attn_probs, return_lse) -> None:
    """Refuse, by name, the arguments of ``flash_attn_varlen_func`` that mswift does not implement.

    Values that FlashAttention itself treats as "off" pass: ``dropout_p == 0``, ``softcap <= 0``
    (its rule: anything > 0 activates softcapping), ``alibi_slopes`` and ``block_table`` None.
    """
    if float(dropout_p) != 0.0:
        raise ValueError(f"dropout_p must be 0.0: mswift's varlen attention has no attention "
                         f"dropout, got dropout_p={dropout_p!r}")
    if float(softcap) > 0.0:
        raise ValueError(f"softcap must be 0.0: mswift's varlen attention does not implement "
                         f"logit softcapping, got softcap={softcap!r}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None: mswift's varlen attention does not "
                         "implement ALiBi")
    if block_table is not None:
        raise ValueError("block_table must be None: mswift's varlen attention has no paged "
                         "KV cache")
    if return_attn_probs and return_lse:
        raise ValueError("return_attn_probs and return_lse: pass one of them, not both "
                         "(return_attn_probs gives (out, lse, S_dmask), return_lse (out, lse))")


def check_varlen_inputs(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    softmax_scale, causal, window_size, chunk_size,
) -> AttentionOptions:
    """Raise ValueError on bad user input; return the resolved options."""
    _check_tensors(q, k, v)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of samples, "
            f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} offsets"
        )
    if int(max_seqlen_q) < 0 or int(max_seqlen_k) < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen_q}, {max_seqlen_k}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], int(max_seqlen_q))
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], int(max_seqlen_k))
    left, right = _check_window(window_size)
    if causal:
        right = 0  # FlashAttention: causal means a right window of 0
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2])
    elif not math.isfinite(float(softmax_scale)):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return AttentionOptions(
        softmax_scale=float(softmax_scale),
        causal=bool(causal),
        window_left=left,
        window_right=right,
        chunk_size=int(chunk_size) if chunk_size is not None else 0,
    )
