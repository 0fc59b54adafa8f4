"""Model sizes derived from settings (no megatron-core import, so offline tools stay light)."""
from __future__ import annotations


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's rule: pad the vocabulary to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    if not swiglu:
        return 4 * hidden_size
    return 64 * -(-(8 * hidden_size // 3) // 64)  # 8/3 H rounded up to a multiple of 64
