"""Public MoE routing and token permutation: Triton kernels with autograd, or the torch reference.

``backend="auto"`` runs the Triton kernels on CUDA tensors or under Triton's CPU interpreter
(``TRITON_INTERPRET=1``) and the torch reference otherwise (and for float64). Triton is imported
only when its backend runs, so importing this module never pins the interpreter setting.
"""
from __future__ import annotations

import torch

from ..attention.env import use_triton
from .reference import permute_reference, topk_routing_reference, unpermute_reference
from .validation import (RoutingOptions, check_permute_inputs, check_routing_inputs,
                         check_unpermute_inputs)


class TopkRoutingFunction(torch.autograd.Function):
    """``apply(logits, expert_bias, opts) -> (weights, indices)``; differentiable in the logits
    through the weights (indices and the expert bias get no gradient, as in the HF routers)."""

    @staticmethod
    def forward(ctx, logits, expert_bias, opts: RoutingOptions):
        from .triton_routing import routing_forward

        weights, indices = routing_forward(logits, expert_bias, opts)
        ctx.save_for_backward(logits, indices)
        ctx.opts = opts
        ctx.mark_non_differentiable(indices)
        return weights, indices

    @staticmethod
    def backward(ctx, grad_weights, _grad_indices):
        from .triton_routing import routing_backward

        logits, indices = ctx.saved_tensors
        return routing_backward(grad_weights, logits, indices, ctx.opts), None, None


class PermuteFunction(torch.autograd.Function):
    """``apply(tokens, indices, num_experts, pad_to, unrouted) -> (permuted, row_map,
    tokens_per_expert)``."""

    @staticmethod
    def forward(ctx, tokens, indices, num_experts, pad_to, unrouted):
        from .triton_permute import permutation_rows, scatter_rows

        row_map, tokens_per_expert, num_rows = permutation_rows(indices, num_experts, pad_to,
                                                                unrouted)
        permuted, _ = scatter_rows(tokens, row_map, num_rows, zero_fill=pad_to is not None)
        ctx.save_for_backward(row_map)
        ctx.mark_non_differentiable(row_map, tokens_per_expert)
        return permuted, row_map, tokens_per_expert

    @staticmethod
    def backward(ctx, grad_permuted, _grad_rows, _grad_counts):
        from .triton_permute import gather_rows

        (row_map,) = ctx.saved_tensors
        return gather_rows(grad_permuted.contiguous(), row_map), None, None, None, None


class UnpermuteFunction(torch.autograd.Function):
    """``apply(expert_out, row_map, weights) -> out``; weights may be None."""

    @staticmethod
    def forward(ctx, expert_out, row_map, weights):
        from .triton_permute import gather_rows

        out = gather_rows(expert_out, row_map, weights)
        grad_weights = weights is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(row_map, weights, expert_out if grad_weights else None)
        ctx.num_rows = expert_out.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .triton_permute import scatter_rows

        row_map, weights, expert_out = ctx.saved_tensors
        # padding rows (more rows than choices) are the only rows no choice writes; with
        # unrouted choices (row -1, never padded) there are fewer rows than choices
        grad_expert_out, grad_weights = scatter_rows(
            grad_out.contiguous(), row_map, ctx.num_rows, weights=weights, other=expert_out,
            zero_fill=ctx.num_rows != row_map.numel())
        if grad_weights is not None:
            grad_weights = grad_weights.to(weights.dtype)
        return grad_expert_out, None, grad_weights


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def topk_routing(logits: torch.Tensor, topk: int, *, score_function: str = "softmax",
                 expert_bias: torch.Tensor | None = None, num_groups: int = 1,
                 group_topk: int | None = None, normalize: bool = False,
                 scaling_factor: float = 1.0, backend: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``topk`` experts per token and their weights, as the Hugging Face routers do.

    Args:
        logits: ``[tokens, experts]`` router logits (any float dtype; computed in fp32, float64
            in float64 on the torch backend).
        topk: experts per token, 1..experts.
        score_function: ``"softmax"`` over all experts (Qwen3-MoE, Mixtral) or ``"sigmoid"``
            per expert (DeepSeek-V3, Llama-4).
        expert_bias: ``[experts]`` added to the scores for the choice only (DeepSeek-V3's
            ``e_score_correction_bias``, megatron-core's ``expert_bias``); no gradient.
        num_groups, group_topk: group-limited routing: experts form ``num_groups`` equal groups
            (at least 2 experts each); a group's score is the sum of its two best (biased)
            scores; experts outside the ``group_topk`` best groups are not chosen unless ``topk``
            exceeds the experts left (then they follow, as in transformers).
        normalize: divide the chosen weights by their sum (``+ 1e-20``, as DeepSeek-V3).
        scaling_factor: multiplies the weights last (DeepSeek-V3's ``routed_scaling_factor``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    Returns:
        ``weights [tokens, topk]`` fp32 (float64 for float64 logits), from the unbiased scores,
        differentiable w.r.t. the logits; ``indices [tokens, topk]`` int64, best first.

    Ranking: on the logits when there is neither a bias nor groups (Llama-4's router ranks
    logits; sigmoid and softmax keep their order), else on score + bias (DeepSeek-V3). Ties go
    to the lower expert id (and the lower group id), on both backends; ``torch.topk``, which
    the HF routers call, leaves the order of ties unspecified.

    The three HF routers: DeepSeek-V3 ``sigmoid, expert_bias=e_score_correction_bias,
    num_groups=n_group, group_topk=topk_group, normalize=norm_topk_prob,
    scaling_factor=routed_scaling_factor``; Llama-4 ``sigmoid`` (the weights are
    ``sigmoid(chosen logit)``, for any top-k); Qwen3-MoE ``softmax, normalize=norm_topk_prob``.
    """
    opts = check_routing_inputs(logits, topk, score_function, expert_bias, num_groups,
                                group_topk, normalize, scaling_factor)
    if not use_triton(logits, backend):
        return topk_routing_reference(logits, expert_bias, opts)
    return TopkRoutingFunction.apply(_contiguous(logits), expert_bias, opts)


def permute(tokens: torch.Tensor, indices: torch.Tensor, num_experts: int, *,
            pad_to: int | None = None, unrouted: bool = False, backend: str = "auto"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each token's row once per chosen expert, grouped by expert.

    Args:
        tokens: ``[tokens, hidden]`` (fp16, bf16, fp32; float64 on the torch backend).
        indices: ``[tokens, topk]`` expert ids (int32/int64), e.g. from :func:`topk_routing`.
        num_experts: the number of experts (ids ``0..num_experts-1``).
        pad_to: round each expert's row count up to a multiple of this (a GEMM tile); the
            padding rows are zero and follow that expert's real rows.
        unrouted: ``indices`` may hold -1, a choice routed to none of these experts (another
            expert-parallel rank's, as the all-gather dispatcher sees them): it gets no row,
            its ``row_map`` entry is -1, and :func:`unpermute` adds nothing for it. The row
            count is then read back to the host once. Not with ``pad_to``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    Returns:
        ``permuted [rows, hidden]``: expert 0's rows first, then expert 1's, ...; inside an
        expert in token order (then k), so the order is deterministic. ``rows`` is
        ``tokens * topk`` (less the unrouted choices) plus the padding.
        ``row_map [tokens, topk]`` int64: the row of ``permuted`` holding choice ``(t, k)``.
        ``tokens_per_expert [num_experts]`` int64: each expert's row count *including* its
        padding (the segment lengths a grouped GEMM walks); without ``pad_to`` these are the
        real counts, which are otherwise ``torch.bincount(indices.flatten(), minlength=E)``.
    Differentiable w.r.t. ``tokens`` (the gradient sums each token's ``topk`` rows).
    """
    check_permute_inputs(tokens, indices, num_experts, pad_to, unrouted)
    if not use_triton(tokens, backend):
        return permute_reference(tokens, indices, num_experts, pad_to, unrouted)
    return PermuteFunction.apply(_contiguous(tokens), indices, num_experts, pad_to, unrouted)


def unpermute(expert_out: torch.Tensor, row_map: torch.Tensor,
              weights: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Sum each token's expert outputs back into token order: the inverse of :func:`permute`.

    ``out[t] = sum over k of weights[t, k] * expert_out[row_map[t, k]]`` (plain sum when
    ``weights`` is None: Llama-4 scales the expert *input* instead; no term for an unrouted
    choice, row -1: a token with none routed gets zeros), accumulated in fp32 and
    returned ``[tokens, hidden]`` in ``expert_out``'s dtype. Padding rows are never read.
    ``row_map`` must come from :func:`permute` (each row named at most once). Differentiable
    w.r.t. ``expert_out`` (padding rows get zero) and ``weights``.
    """
    check_unpermute_inputs(expert_out, row_map, weights)
    if not use_triton(expert_out, backend):
        return unpermute_reference(expert_out, row_map, weights)
    return UnpermuteFunction.apply(_contiguous(expert_out), row_map,
                                   None if weights is None else _contiguous(weights))
