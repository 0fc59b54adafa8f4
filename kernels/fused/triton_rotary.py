"""Triton rotary position embedding over ``[tokens, heads, head_dim]`` rows.

A program takes a block of tokens, loads their cos/sin table rows once (by position, so packed
samples restart at 0) and rotates every head. The rotated slice is ``rotary_dim`` wide at
``start`` (0, or ``head_dim - rotary_dim`` for MLA's rope part); the rest of the head is copied.
Pair ``i`` is read from ``(i, i + half)`` or, interleaved, ``(2i, 2i + 1)`` and written the same
two ways, so one kernel covers rotate-half (Llama / Qwen), interleaved (Llama-4, megatron-core's
``rotary_interleaved``) and interleaved-in / half-out (DeepSeek-V3's ``rope_interleave``,
megatron-core's MLA rope). The backward is the inverse rotation (sin negated) with the read and
write layouts swapped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.env import interpreter_enabled


@triton.jit
def _rotary_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, pos_ptr, tokens, heads, head_dim, half,
                   start, sin_sign, IN_INTERLEAVED: tl.constexpr, OUT_INTERLEAVED: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < tokens
    i = tl.arange(0, BLOCK_HALF)
    pair_mask = t_ok[:, None] & (i < half)[None, :]
    pos = tl.load(pos_ptr + t, mask=t_ok, other=0).to(tl.int64)
    table = pos[:, None] * half + i[None, :]
    c = tl.load(cos_ptr + table, mask=pair_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=pair_mask, other=0.0).to(tl.float32) * sin_sign
    if IN_INTERLEAVED:
        in1, in2 = start + 2 * i, start + 2 * i + 1
    else:
        in1, in2 = start + i, start + half + i
    if OUT_INTERLEAVED:
        out1, out2 = start + 2 * i, start + 2 * i + 1
    else:
        out1, out2 = start + i, start + half + i
    d = tl.arange(0, BLOCK_D)
    passed = (d < start) | ((d >= start + 2 * half) & (d < head_dim))
    pass_mask = t_ok[:, None] & passed[None, :]
    for h in range(heads):
        row = (t.to(tl.int64) * heads + h) * head_dim  # [BLOCK_T]
        x1 = tl.load(x_ptr + row[:, None] + in1[None, :], mask=pair_mask, other=0.0)
        x2 = tl.load(x_ptr + row[:, None] + in2[None, :], mask=pair_mask, other=0.0)
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        tl.store(y_ptr + row[:, None] + out1[None, :], y1.to(y_ptr.dtype.element_ty),
                 mask=pair_mask)
        tl.store(y_ptr + row[:, None] + out2[None, :], y2.to(y_ptr.dtype.element_ty),
                 mask=pair_mask)
        keep = tl.load(x_ptr + row[:, None] + d[None, :], mask=pass_mask, other=0.0)
        tl.store(y_ptr + row[:, None] + d[None, :], keep, mask=pass_mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
           start: int, in_interleaved: bool, out_interleaved: bool,
           inverse: bool = False) -> torch.Tensor:
    """Rotate contiguous ``x [tokens, heads, head_dim]``; ``positions [tokens]`` index the
    contiguous ``cos``/``sin [rows, half]`` tables; ``inverse`` rotates by minus the angle."""
    tokens, heads, head_dim = x.shape
    half = cos.shape[-1]
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    block_t = 16 if interpreter_enabled() else 32
    _rotary_kernel[(triton.cdiv(tokens, block_t),)](
        x, y, cos, sin, positions, tokens, heads, head_dim, half, start,
        -1.0 if inverse else 1.0, IN_INTERLEAVED=in_interleaved,
        OUT_INTERLEAVED=out_interleaved, BLOCK_T=block_t,
        BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
        BLOCK_D=triton.next_power_of_2(head_dim))
    return y
