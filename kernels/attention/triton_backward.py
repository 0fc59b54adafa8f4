"""Backward Triton kernels of varlen attention, without atomics.

Three launches, each writing its outputs exactly once:
1. ``delta = rowsum(dO * O)`` per query and head (fp32);
2. dK/dV: one program owns ``BLOCK_N`` keys of one kv head and loops over the query heads of
   its group and the query tiles its mask reaches, accumulating dK and dV in registers;
3. dQ: one program owns ``BLOCK_M`` queries of one head and loops over the key tiles.
Probabilities are recomputed from the forward's log-sum-exp: ``P = exp(S * scale - lse)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (LOG2E_C, choose_block_sizes, dot_precision, key_range, needs_upcast,
                            padded_dim, query_range, sample_bounds, visible_mask)
from .triton_forward import mask_flags
from .validation import AttentionOptions


@triton.jit
def _delta_kernel(O, DO, DELTA, total, stride_ot, stride_oh, stride_dot, stride_doh,
                  stride_delta_h, DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK: tl.constexpr):
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < total) & (offs_d[None, :] < DIM_V)
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + h * stride_delta_h + rows64, tl.sum(o * do, 1), mask=rows < total)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    scale, left, right, chunk, group,
    DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(1)
    kv_h = tl.program_id(2)
    q_start, len_q, k_start, len_k = sample_bounds(cu_seqlens_q, cu_seqlens_k, b)
    n_start = tl.program_id(0) * BLOCK_N
    if n_start >= len_k:
        return
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_k = (k_start + offs_n).to(tl.int64)
    k_mask = offs_n[:, None] < len_k
    k = tl.load(K + rows_k[:, None] * stride_kt + kv_h * stride_kh + offs_dqk[None, :],
                mask=k_mask & (offs_dqk[None, :] < DIM_QK), other=0.0)
    v = tl.load(V + rows_k[:, None] * stride_vt + kv_h * stride_vh + offs_dv[None, :],
                mask=k_mask & (offs_dv[None, :] < DIM_V), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    j_last = tl.minimum(n_start + BLOCK_N, len_k) - 1
    lo, hi = query_range(n_start, j_last, len_q, len_k, left, right, chunk,
                         HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
    scale_log2 = scale * LOG2E_C
    for g in range(group):
        h = kv_h * group + g
        for m_start in range(lo, hi, BLOCK_M):
            offs_m = m_start + tl.arange(0, BLOCK_M)
            rows_q = (q_start + offs_m).to(tl.int64)
            q_mask = offs_m[:, None] < hi
            q = tl.load(Q + rows_q[:, None] * stride_qt + h * stride_qh + offs_dqk[None, :],
                        mask=q_mask & (offs_dqk[None, :] < DIM_QK), other=0.0)
            do = tl.load(DO + rows_q[:, None] * stride_dot + h * stride_doh + offs_dv[None, :],
                         mask=q_mask & (offs_dv[None, :] < DIM_V), other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + h * stride_lse_h + rows_q, mask=offs_m < hi, other=0.0)
            delta = tl.load(DELTA + h * stride_lse_h + rows_q, mask=offs_m < hi, other=0.0)
            # transposed tiles: keys along rows, queries along columns
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            mask_t = visible_mask(offs_m[None, :], offs_n[:, None], len_q, len_k, left, right,
                                  chunk, HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
            p_t = tl.where(mask_t, tl.exp2(s_t * scale_log2 - lse[None, :] * LOG2E_C), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    out_mask = offs_n[:, None] < len_k
    tl.store(DK + rows_k[:, None] * stride_dkt + kv_h * stride_dkh + offs_dqk[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=out_mask & (offs_dqk[None, :] < DIM_QK))
    tl.store(DV + rows_k[:, None] * stride_dvt + kv_h * stride_dvh + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask & (offs_dv[None, :] < DIM_V))


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    scale, left, right, chunk, group,
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
    q_mask = offs_m[:, None] < len_q
    q = tl.load(Q + rows_q[:, None] * stride_qt + h * stride_qh + offs_dqk[None, :],
                mask=q_mask & (offs_dqk[None, :] < DIM_QK), other=0.0)
    do = tl.load(DO + rows_q[:, None] * stride_dot + h * stride_doh + offs_dv[None, :],
                 mask=q_mask & (offs_dv[None, :] < DIM_V), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse_log2 = tl.load(LSE + h * stride_lse_h + rows_q, mask=offs_m < len_q, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + h * stride_lse_h + rows_q, mask=offs_m < len_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    i_last = tl.minimum(m_start + BLOCK_M, len_q) - 1
    lo, hi = key_range(m_start, i_last, len_q, len_k, left, right, chunk,
                       HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
    scale_log2 = scale * LOG2E_C
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        mask = visible_mask(offs_m[:, None], offs_n[None, :], len_q, len_k, left, right, chunk,
                            HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
        p = tl.where(mask, tl.exp2(s * scale_log2 - lse_log2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + rows_q[:, None] * stride_dqt + h * stride_dqh + offs_dqk[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask & (offs_dqk[None, :] < DIM_QK))


def _common_args(q, k, v, opts: AttentionOptions, blocks_m: int, blocks_n: int, blocks) -> dict:
    dim_qk, dim_v = q.shape[2], v.shape[2]
    return dict(
        scale=opts.softmax_scale, group=q.shape[1] // k.shape[1], **mask_flags(opts),
        DIM_QK=dim_qk, DIM_V=dim_v, BLOCK_DQK=padded_dim(dim_qk), BLOCK_DV=padded_dim(dim_v),
        BLOCK_M=blocks_m, BLOCK_N=blocks_n,
        UPCAST=needs_upcast(q.dtype), PRECISION=dot_precision(q.dtype),
        num_warps=blocks.bwd_num_warps, num_stages=blocks.bwd_num_stages,
    )


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, opts: AttentionOptions):
    """Gradients of :func:`attention_forward`. Returns dq, dk, dv shaped like q, k, v."""
    total_q, heads, dim_qk = q.shape
    num_samples = cu_seqlens_q.numel() - 1
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if num_samples == 0 or total_q == 0 or k.shape[0] == 0 or max_seqlen_q == 0:
        return dq, dk, dv
    blocks = choose_block_sizes(dim_qk, v.shape[2])
    delta = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)  # [heads, total_q]
    delta_block = 64 if v.shape[2] <= 128 else 32  # [rows, dv] fp32 tiles in registers
    _delta_kernel[(triton.cdiv(total_q, delta_block), heads)](
        out, dout, delta, total_q, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), DIM_V=v.shape[2], BLOCK_DV=padded_dim(v.shape[2]), BLOCK=delta_block,
    )
    strides_in = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                  dout.stride(0), dout.stride(1))
    assert lse.stride(0) == delta.stride(0) == total_q and lse.stride(1) == 1
    _dkdv_kernel[(triton.cdiv(max_seqlen_k, blocks.dkdv_n), num_samples, k.shape[1])](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, *strides_in,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        **_common_args(q, k, v, opts, blocks.dkdv_m, blocks.dkdv_n, blocks),
    )
    _dq_kernel[(triton.cdiv(max_seqlen_q, blocks.dq_m), num_samples, heads)](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, *strides_in,
        dq.stride(0), dq.stride(1), lse.stride(0),
        **_common_args(q, k, v, opts, blocks.dq_m, blocks.dq_n, blocks),
    )
    return dq, dk, dv
