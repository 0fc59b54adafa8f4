"""Triton RMSNorm over the last dimension: fp32 statistics, one tile holds whole rows.

Forward ``y = w * round_x(x * rstd)`` where ``round_x`` rounds to the input dtype (as HF's
``LlamaRMSNorm`` does before the weight multiplies); ``rstd`` per row is kept for the backward.
Backward ``dx = rstd * (g w - n * mean(g w n))`` with ``n = x * rstd``, and the weight gradient
``sum over rows of g n``: each program walks a strided set of row blocks and writes its own fp32
partial row, summed in torch afterwards (deterministic, no atomics). The sum covers this rank's
rows only: under sequence parallelism megatron-core all-reduces the gradients of parameters
marked ``sequence_parallel`` (mswift's ``Norm`` marks its weight) over the TP group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.env import interpreter_enabled


def _blocks(hidden: int) -> tuple[int, int]:
    """(rows, columns) per tile: whole rows, about 4k elements (16k on GPU) per tile."""
    block_h = triton.next_power_of_2(hidden)
    budget = 4096 if interpreter_enabled() else 16384
    return max(1, min(64, budget // block_h)), block_h


def _num_warps(block_r: int, block_h: int) -> int:
    """More warps for wider tiles, so a thread holds at most ~64 fp32 values of a tile."""
    return min(16, max(4, block_r * block_h // 2048))


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, hidden, eps,
                             HAS_WEIGHT: tl.constexpr, W_OFFSET: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.arange(0, BLOCK_H)
    mask = (r < rows)[:, None] & (h < hidden)[None, :]
    offsets = r[:, None].to(tl.int64) * hidden + h[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / hidden + eps)  # [BLOCK_R]
    y = (x * rstd[:, None]).to(x_ptr.dtype.element_ty)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + h, mask=h < hidden, other=0.0).to(tl.float32) + W_OFFSET
        y = y.to(tl.float32) * w[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + r, rstd, mask=r < rows)


@triton.jit
def _rms_norm_backward_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, hidden,
                              HAS_WEIGHT: tl.constexpr, W_OFFSET: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    h = tl.arange(0, BLOCK_H)
    h_ok = h < hidden
    if HAS_WEIGHT:
        w = tl.load(w_ptr + h, mask=h_ok, other=0.0).to(tl.float32) + W_OFFSET
    dw = tl.zeros([BLOCK_H], tl.float32)
    for r0 in range(pid * BLOCK_R, rows, programs * BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < rows)[:, None] & h_ok[None, :]
        offsets = r[:, None].to(tl.int64) * hidden + h[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
        n = x * rstd[:, None]
        if HAS_WEIGHT:
            dw += tl.sum(g * n, axis=0)
            g = g * w[None, :]
        dot = tl.sum(g * n, axis=1) / hidden  # [BLOCK_R]
        dx = (g - n * dot[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(dw_ptr + pid.to(tl.int64) * hidden + h, dw, mask=h_ok)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                     zero_centered_gamma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd [rows] fp32)`` for contiguous ``x [..., hidden]``; y's dtype is x's promoted
    with the weight's (as ``weight * normed`` in torch)."""
    hidden = x.shape[-1]
    rows = x.numel() // max(hidden, 1)
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, rstd
    block_r, block_h = _blocks(hidden)
    _rms_norm_forward_kernel[(triton.cdiv(rows, block_r),)](
        x, weight if weight is not None else x, y, rstd, rows, hidden, eps,
        HAS_WEIGHT=weight is not None, W_OFFSET=1.0 if zero_centered_gamma else 0.0,
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=_num_warps(block_r, block_h))
    return y, rstd


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                      rstd: torch.Tensor, zero_centered_gamma: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx in x's dtype, dw in the weight's dtype or None)``; dw sums this rank's rows only."""
    hidden = x.shape[-1]
    rows = rstd.numel()
    dx = torch.empty_like(x)
    block_r, block_h = _blocks(hidden)
    programs = max(1, min(triton.cdiv(rows, block_r), 4 if interpreter_enabled() else 512))
    dw_partial = (torch.zeros(programs, hidden, dtype=torch.float32, device=x.device)
                  if weight is not None else None)
    if rows and hidden:
        _rms_norm_backward_kernel[(programs,)](
            grad, x, weight if weight is not None else x, rstd, dx,
            dw_partial if dw_partial is not None else rstd, rows, hidden,
            HAS_WEIGHT=weight is not None, W_OFFSET=1.0 if zero_centered_gamma else 0.0,
            BLOCK_R=block_r, BLOCK_H=block_h, num_warps=_num_warps(block_r, block_h))
    dw = dw_partial.sum(dim=0).to(weight.dtype) if weight is not None else None
    return dx, dw
