"""Triton token permutation: a counting sort of the routing choices, then row copies.

Choice ``p = token * topk + k`` goes to row ``start[e] + (choices of e before p)``: a per-block
histogram of the experts, an exclusive prefix sum over blocks and experts (torch ``cumsum`` on
the small ``[blocks, experts]`` table), and each choice's rank inside its block. Every row has
one writer, so neither pass needs atomics and the order is stable (token, then k).

Row copies: ``_scatter_rows`` writes each token's row to its ``topk`` destinations (permute, and
the backward of unpermute, which also reduces the weight gradients over the hidden dim);
``_gather_rows`` sums each token's ``topk`` rows back (unpermute, and the backward of permute).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.env import interpreter_enabled


# Choices per program of the counting sort: the rank pass compares a block with itself
# ([BLOCK_P, BLOCK_P]), the histogram is [BLOCK_P, experts]; 64 keeps both tiles small.
CHOICE_BLOCK = 64


def _row_blocks(hidden: int) -> tuple[int, int]:
    """(tokens, hidden columns) per program of the row copies."""
    if interpreter_enabled():
        return 32, min(256, triton.next_power_of_2(hidden))
    return 16, min(512, triton.next_power_of_2(hidden))


@triton.jit
def _histogram_kernel(experts_ptr, hist_ptr, num_choices, num_experts,
                      BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """hist[block, e] = number of choices of expert e in this block of choices."""
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    ex = tl.load(experts_ptr + p, mask=p < num_choices, other=-1)
    e = tl.arange(0, BLOCK_E)
    counts = tl.sum((ex[:, None] == e[None, :]).to(tl.int32), axis=0)  # [BLOCK_E]
    tl.store(hist_ptr + pid.to(tl.int64) * num_experts + e, counts.to(tl.int64),
             mask=e < num_experts)


@triton.jit
def _rank_kernel(experts_ptr, base_ptr, rows_ptr, num_choices, num_experts,
                 BLOCK_P: tl.constexpr):
    """rows[p] = base[block, e_p] + number of earlier choices of e_p in the same block; -1 for
    an unrouted choice (expert -1)."""
    pid = tl.program_id(0)
    i = tl.arange(0, BLOCK_P)
    p = pid * BLOCK_P + i
    ok = p < num_choices
    ex = tl.load(experts_ptr + p, mask=ok, other=-1)
    routed = ex >= 0
    before = (ex[:, None] == ex[None, :]) & (i[None, :] < i[:, None])
    rank = tl.sum(before.to(tl.int32), axis=1)
    base = tl.load(base_ptr + pid.to(tl.int64) * num_experts + ex, mask=ok & routed, other=0)
    tl.store(rows_ptr + p, tl.where(routed, base + rank, -1), mask=ok)


@triton.jit
def _scatter_rows_kernel(src_ptr, dst_ptr, rows_ptr, weights_ptr, other_ptr, grad_w_ptr,
                         num_tokens, hidden, TOPK: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                         GRAD_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dst[rows[t, k]] = weights[t, k] * src[t] (nothing for row -1); with GRAD_WEIGHTS also
    grad_w[t, k] = <src[t], other[rows[t, k]]> (0 for row -1). One program owns whole token
    rows."""
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    k_ids = tl.arange(0, BLOCK_K)[None, :]
    dots = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = t_ok[:, None] & (h < hidden)[None, :]
        x = tl.load(src_ptr + t[:, None].to(tl.int64) * hidden + h[None, :], mask=mask, other=0.0)
        for k in range(TOPK):
            row = tl.load(rows_ptr + t.to(tl.int64) * TOPK + k, mask=t_ok, other=-1)
            offsets = row[:, None] * hidden + h[None, :]
            routed = mask & (row >= 0)[:, None]  # row -1: an unrouted choice, no row
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + t.to(tl.int64) * TOPK + k, mask=t_ok, other=0.0)
                y = x.to(tl.float32) * w.to(tl.float32)[:, None]
            else:
                y = x
            tl.store(dst_ptr + offsets, y.to(dst_ptr.dtype.element_ty), mask=routed)
            if GRAD_WEIGHTS:
                o = tl.load(other_ptr + offsets, mask=routed, other=0.0).to(tl.float32)
                dot = tl.sum(x.to(tl.float32) * o, axis=1)
                dots += tl.where(k_ids == k, dot[:, None], 0.0)
    if GRAD_WEIGHTS:
        out = t[:, None].to(tl.int64) * TOPK + k_ids
        tl.store(grad_w_ptr + out, dots.to(grad_w_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & (k_ids < TOPK))


@triton.jit
def _gather_rows_kernel(src_ptr, dst_ptr, rows_ptr, weights_ptr, num_tokens, hidden,
                        TOPK: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """dst[t] = sum over k of weights[t, k] * src[rows[t, k]] (rows -1 left out), accumulated
    in fp32."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < num_tokens
    mask = t_ok[:, None] & (h < hidden)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for k in range(TOPK):
        row = tl.load(rows_ptr + t.to(tl.int64) * TOPK + k, mask=t_ok, other=-1)
        x = tl.load(src_ptr + row[:, None] * hidden + h[None, :],
                    mask=mask & (row >= 0)[:, None], other=0.0)
        x = x.to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + t.to(tl.int64) * TOPK + k, mask=t_ok, other=0.0)
            x = x * w.to(tl.float32)[:, None]
        acc += x
    tl.store(dst_ptr + t[:, None].to(tl.int64) * hidden + h[None, :],
             acc.to(dst_ptr.dtype.element_ty), mask=mask)


def permutation_rows(indices: torch.Tensor, num_experts: int, pad_to: int | None,
                     unrouted: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(row_map [tokens, topk] int64, tokens_per_expert (padded) [experts] int64, rows)``;
    with ``unrouted``, choices of expert -1 get row -1.

    The row count needs one device-to-host read when ``pad_to`` or ``unrouted`` is set (it
    sizes the output).
    """
    experts = indices.reshape(-1).to(torch.int64).contiguous()
    n = experts.numel()
    block_p = CHOICE_BLOCK
    blocks = triton.cdiv(n, block_p)
    hist = torch.empty(blocks, num_experts, dtype=torch.int64, device=indices.device)
    rows = torch.empty(n, dtype=torch.int64, device=indices.device)
    if n == 0:
        return rows.view(indices.shape), torch.zeros_like(hist.sum(0)), 0
    _histogram_kernel[(blocks,)](experts, hist, n, num_experts, BLOCK_P=block_p,
                                 BLOCK_E=triton.next_power_of_2(num_experts))
    counts = hist.sum(dim=0)  # [experts]
    padded = counts if pad_to is None else (counts + pad_to - 1) // pad_to * pad_to
    # base[b, e] = first row of expert e + its choices in the blocks before b
    base = (padded.cumsum(0) - padded)[None, :] + (hist.cumsum(0) - hist)
    _rank_kernel[(blocks,)](experts, base.contiguous(), rows, n, num_experts, BLOCK_P=block_p)
    total = n if pad_to is None and not unrouted else int(padded.sum())
    return rows.view(indices.shape), padded, total


def scatter_rows(src: torch.Tensor, row_map: torch.Tensor, num_rows: int,
                 weights: torch.Tensor | None = None, other: torch.Tensor | None = None,
                 zero_fill: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dst [num_rows, hidden]`` with ``dst[row_map[t, k]] = weights[t, k] * src[t]`` (rows
    nobody writes are zero when ``zero_fill``), and, given ``other``, the fp32 gradient of the
    weights ``<src[t], other[row_map[t, k]]>``."""
    tokens, topk = row_map.shape
    hidden = src.shape[1]
    alloc = torch.zeros if zero_fill else torch.empty
    dst = alloc(num_rows, hidden, dtype=src.dtype, device=src.device)
    grad_w = (torch.empty(tokens, topk, dtype=torch.float32, device=src.device)
              if other is not None else None)
    if tokens == 0:
        return dst, grad_w
    block_t, block_h = _row_blocks(hidden)
    _scatter_rows_kernel[(triton.cdiv(tokens, block_t),)](
        src, dst, row_map, weights if weights is not None else src,
        other if other is not None else src, grad_w if grad_w is not None else src,
        tokens, hidden, TOPK=topk, HAS_WEIGHTS=weights is not None,
        GRAD_WEIGHTS=other is not None, BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_K=triton.next_power_of_2(topk))
    return dst, grad_w


def gather_rows(src: torch.Tensor, row_map: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[tokens, hidden]`` in src's dtype: sum over k of ``weights[t, k] * src[row_map[t, k]]``."""
    tokens, topk = row_map.shape
    hidden = src.shape[1]
    dst = torch.empty(tokens, hidden, dtype=src.dtype, device=src.device)
    if tokens == 0 or hidden == 0:
        return dst
    block_t, block_h = _row_blocks(hidden)
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_h))
    _gather_rows_kernel[grid](src, dst, row_map, weights if weights is not None else src,
                              tokens, hidden, TOPK=topk, HAS_WEIGHTS=weights is not None,
                              BLOCK_T=block_t, BLOCK_H=block_h)
    return dst
