"""Plain torch references of the fused ops: the semantics the Triton kernels must reproduce.

Each computes in fp32 (float64 stays float64) and rounds where the Hugging Face / megatron-core
code it stands for rounds, so that fp32 results match those implementations to rounding error.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                       zero_centered_gamma: bool = False) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with fp32 statistics, as HF's
    ``LlamaRMSNorm`` and mswift's ``Norm``; without a weight, Llama-4's ``L2Norm``."""
    x32 = x.to(_compute_dtype(x))
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is None:
        return normed
    return (weight + 1 if zero_centered_gamma else weight) * normed


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, layout: str, rotary_at: str) -> torch.Tensor:
    """Rotate pairs of ``x [..., heads, head_dim]`` by the angles of table row ``positions``.

    ``cos``/``sin`` are ``[table_rows, rotary_dim / 2]`` (one entry per rotated pair);
    ``positions`` broadcasts to ``x.shape[:-2]``. Pair ``i`` is ``(x[i], x[i + half])`` for
    ``"half"`` and ``(x[2i], x[2i + 1])`` otherwise; ``"interleaved"`` writes the pair back in
    place, ``"half"`` and ``"deinterleaved"`` write ``(out[i], out[i + half])``.
    """
    half = cos.shape[-1]
    start = 0 if rotary_at == "first" else x.shape[-1] - 2 * half
    rot = x[..., start:start + 2 * half].to(_compute_dtype(x))  # [..., heads, rotary_dim]
    c = cos[positions].to(rot.dtype).unsqueeze(-2)  # [..., 1, half]
    s = sin[positions].to(rot.dtype).unsqueeze(-2)
    if layout == "half":
        x1, x2 = rot[..., :half], rot[..., half:]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    if layout == "interleaved":
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        out = torch.cat((o1, o2), dim=-1)
    return torch.cat((x[..., :start], out.to(x.dtype), x[..., start + 2 * half:]), dim=-1)


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [..., gate | up]`` (megatron-core's order), in fp32."""
    gate, up = x.to(_compute_dtype(x)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                            real_width: int, group=None) -> torch.Tensor:
    """Per-token fp32 loss of this rank's vocabulary shard ``logits [..., width]``, with the
    columns at or past ``real_width`` (padded vocabulary) kept out of the softmax.

    Across ``group`` the max, the sum of exponentials and the target logit are all-reduced as
    megatron-core's ``vocab_parallel_cross_entropy`` does. The all-reduced parts enter as
    constants (``local + (total - local).detach()``), so each rank's logits get exactly the
    gradient of its own shard.
    """
    x = logits.to(_compute_dtype(logits))
    width = x.shape[-1]
    x = x.masked_fill(torch.arange(width, device=x.device) >= real_width, float("-inf"))
    local_max = x.detach().amax(dim=-1)  # [...]
    global_max = local_max.clone()
    local_target = targets.long() - vocab_start
    is_local = (local_target >= 0) & (local_target < real_width)
    picked = x.gather(-1, local_target.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(is_local, picked, torch.zeros_like(picked))
    if group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(x - global_max.unsqueeze(-1)).sum(dim=-1)
    if group is not None:
        sum_exp, picked = (_all_reduce_sum_constant_rest(t, group) for t in (sum_exp, picked))
    return torch.log(sum_exp) + global_max - picked


def _all_reduce_sum_constant_rest(local: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``local`` over the group, differentiable w.r.t. this rank's part only."""
    total = local.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return local + (total - local.detach())
