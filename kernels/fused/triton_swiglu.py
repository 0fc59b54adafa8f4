"""Triton SwiGLU: ``y = silu(gate) * up`` for rows ``[gate | up]`` (megatron-core's chunk order),
in fp32, and its backward ``d gate = g up sig (1 + gate (1 - sig))``, ``d up = g silu(gate)``
written into one ``[rows, 2I]`` gradient."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.env import interpreter_enabled


def _blocks(width: int) -> tuple[int, int]:
    block_i = min(triton.next_power_of_2(width), 256 if interpreter_enabled() else 1024)
    return max(1, 2048 // block_i), block_i


@triton.jit
def _swiglu_kernel(x_ptr, g_ptr, y_ptr, dx_ptr, rows, width, BACKWARD: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (r < rows)[:, None] & (i < width)[None, :]
    gate_at = r[:, None].to(tl.int64) * (2 * width) + i[None, :]
    gate = tl.load(x_ptr + gate_at, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + gate_at + width, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    out_at = r[:, None].to(tl.int64) * width + i[None, :]
    if BACKWARD:
        g = tl.load(g_ptr + out_at, mask=mask, other=0.0).to(tl.float32)
        d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dx_ptr + gate_at, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + gate_at + width, (g * silu).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + out_at, (silu * up).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    width = x.shape[-1] // 2
    rows = x.numel() // max(x.shape[-1], 1)
    out = (torch.empty_like(x) if grad is not None
           else torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device))
    if out.numel() == 0:
        return out
    block_r, block_i = _blocks(width)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_i))
    _swiglu_kernel[grid](x, grad if grad is not None else x, out, out, rows, width,
                         BACKWARD=grad is not None, BLOCK_R=block_r, BLOCK_I=block_i)
    return out


def swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    """``[..., I]`` in x's dtype for contiguous ``x [..., 2I]``."""
    return _launch(x, None)


def swiglu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[..., 2I]`` gradient w.r.t. x (x's dtype) for contiguous ``grad [..., I]``."""
    return _launch(x, grad)
