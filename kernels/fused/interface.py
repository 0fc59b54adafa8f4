"""Public fused ops: Triton kernels with autograd, or the torch reference.

``backend="auto"`` runs the Triton kernels on CUDA tensors or under Triton's CPU interpreter
(``TRITON_INTERPRET=1``) and the torch reference otherwise (and for float64). Triton is imported
only when its backend runs, so importing this module never pins the interpreter setting.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..attention.env import use_triton
from ..attention.packing import positions_from_cu_seqlens
from .reference import (cross_entropy_reference, rms_norm_reference, rotary_reference,
                        swiglu_reference)
from .validation import (check_cross_entropy_inputs, check_rms_norm_inputs,
                         check_rotary_inputs, check_swiglu_inputs)


class RMSNormFunction(torch.autograd.Function):
    """``apply(x, weight, eps, zero_centered_gamma) -> y``; weight may be None."""

    @staticmethod
    def forward(ctx, x, weight, eps, zero_centered_gamma):
        from .triton_norm import rms_norm_forward

        y, rstd = rms_norm_forward(x, weight, eps, zero_centered_gamma)
        ctx.save_for_backward(x, weight, rstd)
        ctx.zero_centered_gamma = zero_centered_gamma
        return y

    @staticmethod
    def backward(ctx, grad):
        from .triton_norm import rms_norm_backward

        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(grad.contiguous(), x, weight, rstd, ctx.zero_centered_gamma)
        return dx, dw, None, None


class RotaryFunction(torch.autograd.Function):
    """``apply(x [tokens, heads, dim], cos, sin, positions [tokens], start, layout) -> y``."""

    @staticmethod
    def forward(ctx, x, cos, sin, positions, start, layout):
        from .triton_rotary import rotate

        ctx.save_for_backward(cos, sin, positions)
        ctx.start, ctx.layout = start, layout
        return rotate(x, cos, sin, positions, start, in_interleaved=layout != "half",
                      out_interleaved=layout == "interleaved")

    @staticmethod
    def backward(ctx, grad):
        from .triton_rotary import rotate

        cos, sin, positions = ctx.saved_tensors
        # the inverse rotation, reading the forward's output layout, writing its input layout
        dx = rotate(grad.contiguous(), cos, sin, positions, ctx.start,
                    in_interleaved=ctx.layout == "interleaved",
                    out_interleaved=ctx.layout != "half", inverse=True)
        return dx, None, None, None, None, None


class SwiGLUFunction(torch.autograd.Function):
    """``apply(x [..., 2I]) -> silu(x[..., :I]) * x[..., I:]``."""

    @staticmethod
    def forward(ctx, x):
        from .triton_swiglu import swiglu_forward

        ctx.save_for_backward(x)
        return swiglu_forward(x)

    @staticmethod
    def backward(ctx, grad):
        from .triton_swiglu import swiglu_backward

        (x,) = ctx.saved_tensors
        return swiglu_backward(grad.contiguous(), x)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """``apply(logits [rows, width], targets [rows], vocab_start, real_width, group, inplace)
    -> loss [rows] fp32``."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, real_width, group, inplace):
        from .triton_cross_entropy import cross_entropy_partials

        row_max, row_sum, picked = cross_entropy_partials(logits, targets, vocab_start,
                                                          real_width)
        if group is not None:  # the same three all-reduces as megatron-core's
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            row_sum = row_sum * torch.exp(row_max - global_max)  # shard without real columns: 0
            dist.all_reduce(row_sum, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(picked, op=dist.ReduceOp.SUM, group=group)
            row_max = global_max
        ctx.save_for_backward(logits, targets, row_max, row_sum)
        ctx.vocab_start, ctx.real_width, ctx.inplace = vocab_start, real_width, inplace
        return torch.log(row_sum) + row_max - picked

    @staticmethod
    def backward(ctx, grad_loss):
        from .triton_cross_entropy import cross_entropy_grad

        logits, targets, row_max, row_sum = ctx.saved_tensors
        grad = cross_entropy_grad(logits, targets, row_max, row_sum,
                                  grad_loss.float().contiguous(), ctx.vocab_start,
                                  ctx.real_width, ctx.inplace)
        return grad, None, None, None, None, None


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
             zero_centered_gamma: bool = False, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``.

    Statistics in fp32; the normalised value is rounded to x's dtype before the weight
    multiplies, as HF's ``LlamaRMSNorm`` and mswift's ``Norm`` do, and the result has the dtype
    ``weight * x`` would have. ``x [..., hidden]``, any leading shape and hidden size.
    ``weight=None`` is Llama-4's weightless qk norm (``Llama4TextL2Norm``);
    ``zero_centered_gamma`` uses ``weight + 1`` (megatron-core's option).

    Sequence parallelism: the weight gradient sums this rank's tokens only, nothing is reduced
    across ranks here; megatron-core all-reduces it over the TP group because the weight is
    marked ``sequence_parallel`` (as mswift's ``Norm`` marks its parameters).
    """
    check_rms_norm_inputs(x, weight, eps)
    if not use_triton(x, backend):
        return rms_norm_reference(x, weight, eps, zero_centered_gamma)
    return RMSNormFunction.apply(_contiguous(x), weight, float(eps), bool(zero_centered_gamma))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 positions: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                 layout: str = "half", rotary_at: str = "first",
                 backend: str = "auto") -> torch.Tensor:
    """Rotary position embedding of ``x [..., heads, head_dim]`` (q or k; a shared MLA key is
    one head).

    Args:
        cos, sin: ``[table_rows, rotary_dim / 2]``, one angle per rotated pair, already scaled
            (YaRN's mscale, HF's ``attention_scaling``). HF rotary modules return
            ``cat(freqs, freqs)``-wide tables: pass ``cos[..., :rotary_dim // 2]``; Llama-4's
            complex ``freqs_cis`` is ``(freqs_cis.real, freqs_cis.imag)``.
        positions: table row of every token, broadcast to ``x.shape[:-2]``; or
        cu_seqlens: offsets of packed samples in ``x [tokens, heads, head_dim]``: positions
            restart at 0 in each sample (tokens past the last offset count on from it).
        layout: ``"half"`` pairs ``(i, i + rotary_dim/2)`` (HF ``rotate_half``: Llama, Qwen);
            ``"interleaved"`` pairs ``(2i, 2i + 1)`` written back in place (Llama-4's complex
            rope, megatron-core ``rotary_interleaved``); ``"deinterleaved"`` reads interleaved
            pairs and writes the rotated pairs half-split (DeepSeek-V3's ``rope_interleave``,
            megatron-core's MLA rope).
        rotary_at: rotate the ``"first"`` ``rotary_dim`` channels of each head (partial rotary,
            megatron-core) or the ``"last"`` (MLA: the rope part follows the nope part).
    Returns ``x``'s shape and dtype, computed in fp32; differentiable w.r.t. ``x`` (the tables
    are constants).
    """
    check_rotary_inputs(x, cos, sin, positions, cu_seqlens, layout, rotary_at)
    token_shape = x.shape[:-2]
    if cu_seqlens is not None:
        positions = positions_from_cu_seqlens(cu_seqlens, total=x.shape[0])
    positions = positions.expand(token_shape)
    if not use_triton(x, backend):
        return rotary_reference(x, cos, sin, positions, layout, rotary_at)
    heads, head_dim = x.shape[-2:]
    start = 0 if rotary_at == "first" else head_dim - 2 * cos.shape[1]
    y = RotaryFunction.apply(_contiguous(x).view(-1, heads, head_dim), _contiguous(cos),
                             _contiguous(sin), positions.reshape(-1).contiguous(), start, layout)
    return y.view(x.shape)


def swiglu(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [..., gate | up]`` (``[..., 2I] -> [..., I]``): megatron-core
    chunks ``linear_fc1``'s output into gate then up. Computed in fp32, returned in x's dtype."""
    check_swiglu_inputs(x)
    if not use_triton(x, backend):
        return swiglu_reference(x)
    return SwiGLUFunction.apply(_contiguous(x))


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *,
                                 vocab_size: int | None = None, vocab_start: int | None = None,
                                 group=None, inplace_backward: bool = False,
                                 backend: str = "auto") -> torch.Tensor:
    """Per-token cross-entropy of logits split over the vocabulary (megatron-core's
    ``vocab_parallel_cross_entropy``), reading the logits in their own dtype.

    Args:
        logits: ``[..., width]`` this rank's vocabulary shard (fp16, bf16, fp32).
        targets: ``[...]`` global token ids, each ``< vocab_size``.
        vocab_size: the real vocabulary size; ids at or past it (Megatron's padded rows) never
            enter the softmax and get zero gradient, whatever their logits hold. Default: every
            column of every rank is real.
        vocab_start: the first id of this shard; default ``rank(group) * width`` (megatron-core's
            even split), 0 without a group.
        group: the tensor-parallel process group to all-reduce the max, the sum of
            exponentials and the target logit over; None for unsplit logits.
        inplace_backward: write the logits' gradient into the logits' own buffer (Triton path;
            saves a logits-sized buffer; the logits must not be read after the backward).
    Returns the fp32 loss ``[...]`` (no reduction, no label smoothing). The gradient w.r.t.
    the logits has their dtype.
    """
    width = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else 0
    ranks, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    vocab_size = width * ranks if vocab_size is None else vocab_size
    vocab_start = rank * width if vocab_start is None else vocab_start
    check_cross_entropy_inputs(logits, targets, vocab_size, vocab_start)
    real_width = min(max(vocab_size - vocab_start, 0), width)
    if not use_triton(logits, backend):
        return cross_entropy_reference(logits, targets, vocab_start, real_width, group)
    loss = VocabParallelCrossEntropyFunction.apply(
        _contiguous(logits).view(-1, width), targets.reshape(-1), vocab_start, real_width,
        group, bool(inplace_backward))
    return loss.view(targets.shape)
