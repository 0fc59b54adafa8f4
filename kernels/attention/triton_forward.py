"""Forward Triton kernel of varlen attention (FlashAttention-2 style online softmax).

One program owns ``BLOCK_M`` queries of one head of one sample and walks the keys that its
mask can reach in ``BLOCK_N`` steps, keeping a running row max and row sum in fp32 (base-2
exponentials, the softmax scale folded in). It writes the output and the natural-log
log-sum-exp that the backward recomputes probabilities from.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (LN2_C, LOG2E, choose_block_sizes, dot_precision, key_range,
                            needs_upcast, padded_dim, sample_bounds, visible_mask)
from .validation import AttentionOptions


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse_h, scale_log2, left, right, chunk, group,
    DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, len_q, k_start, len_k = sample_bounds(cu_seqlens_q, cu_seqlens_k, b)
    m_start = tl.program_id(0) * BLOCK_M
    if m_start >= len_q:
        return
    kv_h = h // group
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_q = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows_q[:, None] * stride_qt + h * stride_qh + offs_dqk[None, :],
                mask=(offs_m[:, None] < len_q) & (offs_dqk[None, :] < DIM_QK), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    i_last = tl.minimum(m_start + BLOCK_M, len_q) - 1
    lo, hi = key_range(m_start, i_last, len_q, len_k, left, right, chunk,
                       HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        rows_k = (k_start + offs_n).to(tl.int64)
        k = tl.load(K + rows_k[:, None] * stride_kt + kv_h * stride_kh + offs_dqk[None, :],
                    mask=(offs_n[:, None] < hi) & (offs_dqk[None, :] < DIM_QK), other=0.0)
        v = tl.load(V + rows_k[:, None] * stride_vt + kv_h * stride_vh + offs_dv[None, :],
                    mask=(offs_n[:, None] < hi) & (offs_dv[None, :] < DIM_V), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        mask = visible_mask(offs_m[:, None], offs_n[None, :], len_q, len_k, left, right, chunk,
                            HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2_C, float("-inf"))
    rows_o = (q_start + offs_m).to(tl.int64)
    tl.store(O + rows_o[:, None] * stride_ot + h * stride_oh + offs_dv[None, :],
             out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < len_q) & (offs_dv[None, :] < DIM_V))
    tl.store(LSE + h * stride_lse_h + rows_o, lse, mask=offs_m < len_q)


def mask_flags(opts: AttentionOptions) -> dict:
    """Compile-time switches and run-time values of the mask, shared by all launches."""
    return dict(
        left=max(opts.window_left, 0), right=max(opts.window_right, 0),
        chunk=max(opts.chunk_size, 1),
        HAS_LEFT=opts.window_left >= 0, HAS_RIGHT=opts.window_right >= 0,
        HAS_CHUNK=opts.chunk_size > 0,
    )


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, opts: AttentionOptions):
    """Launch the forward kernel: out ``[total_q, heads, dv]``, fp32 lse ``[heads, total_q]``."""
    total_q, heads, dim_qk = q.shape
    dim_v = v.shape[2]
    num_samples = cu_seqlens_q.numel() - 1
    # zeros/-inf: tokens after the last sample (padding) are never visited by a program
    out = torch.zeros(total_q, heads, dim_v, dtype=q.dtype, device=q.device)
    lse = torch.full((heads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if num_samples == 0 or total_q == 0 or max_seqlen_q == 0:
        return out, lse
    blocks = choose_block_sizes(dim_qk, dim_v)
    grid = (triton.cdiv(max_seqlen_q, blocks.fwd_m), num_samples, heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        opts.softmax_scale * LOG2E, group=heads // k.shape[1], **mask_flags(opts),
        DIM_QK=dim_qk, DIM_V=dim_v, BLOCK_DQK=padded_dim(dim_qk), BLOCK_DV=padded_dim(dim_v),
        BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n,
        UPCAST=needs_upcast(q.dtype), PRECISION=dot_precision(q.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out, lse
