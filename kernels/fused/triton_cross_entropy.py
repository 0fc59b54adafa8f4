"""Triton vocab-parallel cross-entropy that reads the logits in their own dtype, never an fp32
copy of them.

Forward: one program per token row walks this rank's real columns (``< real_width``; padded
vocabulary columns are never loaded, whatever they hold) with an online max / sum of
exponentials, and picks the target's logit when the target is in this shard. The caller
all-reduces the three fp32 ``[tokens]`` vectors over the TP group. Backward: ``grad = g *
(exp(l - max) / sum - [col == target])`` per column tile, written in the logits' dtype (into the
logits' own buffer when asked), zero on padded columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.env import interpreter_enabled


def _block_v(width: int) -> int:
    return min(triton.next_power_of_2(max(width, 1)), 256 if interpreter_enabled() else 4096)


@triton.jit
def _ce_forward_kernel(logits_ptr, targets_ptr, max_ptr, sum_ptr, picked_ptr, width,
                       real_width, vocab_start, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * width
    m = -float("inf")
    s = 0.0
    for v0 in range(0, real_width, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        logit = tl.load(base + cols, mask=cols < real_width, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(logit, axis=0))
        # -inf logits (and a row of them) contribute nothing, without inf - inf = nan
        p = tl.where(logit == -float("inf"), 0.0, tl.exp(logit - m_new))
        s = s * tl.where(m == -float("inf"), 0.0, tl.exp(m - m_new)) + tl.sum(p, axis=0)
        m = m_new
    target = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
    here = (target >= 0) & (target < real_width)
    picked = tl.load(base + target, mask=here, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    tl.store(picked_ptr + row, picked)


@triton.jit
def _ce_backward_kernel(logits_ptr, targets_ptr, max_ptr, sum_ptr, g_ptr, grad_ptr, width,
                        real_width, vocab_start, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    real = cols < real_width
    logit = tl.load(logits_ptr + row * width + cols, mask=real, other=-float("inf"))
    m = tl.load(max_ptr + row)
    scale = tl.load(g_ptr + row).to(tl.float32) / tl.load(sum_ptr + row)
    target = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
    p = tl.where(real, tl.exp(logit.to(tl.float32) - m) * scale, 0.0)
    grad = p - tl.where(real & (cols == target), tl.load(g_ptr + row).to(tl.float32), 0.0)
    tl.store(grad_ptr + row * width + cols, grad.to(grad_ptr.dtype.element_ty),
             mask=cols < width)


def cross_entropy_partials(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                           real_width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(max, sum of exp(l - max), target logit or 0)`` per row of contiguous
    ``logits [rows, width]`` over this shard's real columns."""
    rows, width = logits.shape
    out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_forward_kernel[(rows,)](logits, targets, out[0], out[1], out[2], width, real_width,
                                    vocab_start, BLOCK_V=_block_v(real_width))
    return out[0], out[1], out[2]


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor,
                       row_sum: torch.Tensor, grad_loss: torch.Tensor, vocab_start: int,
                       real_width: int, inplace: bool) -> torch.Tensor:
    """d loss / d logits in the logits' dtype (written over ``logits`` when ``inplace``)."""
    rows, width = logits.shape
    grad = logits if inplace else torch.empty_like(logits)
    if rows and width:
        block_v = _block_v(width)
        _ce_backward_kernel[(rows, triton.cdiv(width, block_v))](
            logits, targets, row_max, row_sum, grad_loss, grad, width, real_width, vocab_start,
            BLOCK_V=block_v)
    return grad
