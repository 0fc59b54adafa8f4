"""Triton top-k routing: one program routes a block of tokens with all experts in one tile.

Forward: scores (sigmoid, or softmax over all experts) in fp32, optional group limit (a group's
score is the sum of its two best biased scores; ``group_topk`` groups are kept), then ``topk``
rounds of "best remaining expert, lower id on ties", weights gathered from the unbiased scores.
Backward recomputes the scores from the logits and the saved indices (nothing else is kept).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.env import interpreter_enabled
from .reference import NORMALIZE_EPS
from .validation import RoutingOptions

EPS_C = tl.constexpr(NORMALIZE_EPS)


def _blocks(num_experts: int, topk: int, num_groups: int) -> dict:
    block_e = triton.next_power_of_2(num_experts)
    # about 4k fp32 values per tile; under the interpreter fewer, larger programs run faster
    block_t = 32 if interpreter_enabled() else max(1, min(64, 4096 // block_e))
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(topk),
                BLOCK_G=triton.next_power_of_2(num_groups))


@triton.jit
def _load_scores(logits_ptr, stride, num_tokens, num_experts, pid,
                 SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Token ids, expert ids, fp32 logits (-inf outside the experts) and scores of a block."""
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    mask = (t < num_tokens)[:, None] & e_ok[None, :]
    x = tl.load(logits_ptr + t[:, None].to(tl.int64) * stride + e[None, :], mask=mask, other=0.0)
    x = tl.where(e_ok[None, :], x.to(tl.float32), float("-inf"))  # [BLOCK_T, BLOCK_E]
    if SIGMOID:
        score = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        score = p / tl.sum(p, axis=1)[:, None]
    return t, e, x, score


@triton.jit
def _best(values, ids, eligible, SENTINEL: tl.constexpr):
    """Per row: the largest eligible value and its lowest id (ids along axis 1)."""
    cand = tl.where(eligible, values, float("-inf"))
    best = tl.max(cand, axis=1)
    hit = eligible & (cand == best[:, None])
    return best, tl.min(tl.where(hit, ids, SENTINEL), axis=1)


@triton.jit
def _group_limit(choice, e, e_ok, group_size,
                 NUM_GROUPS: tl.constexpr, GROUP_TOPK: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):
    """True for experts in the GROUP_TOPK groups with the best top-2 sums (ties: lower group)."""
    gid = e // group_size
    g_ids = tl.arange(0, BLOCK_G)[None, :]
    group_score = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
    for g in range(NUM_GROUPS):
        in_g = ((gid == g) & e_ok)[None, :]
        first, first_id = _best(choice, e[None, :], in_g, BLOCK_E)
        second, _ = _best(choice, e[None, :], in_g & (e[None, :] != first_id[:, None]), BLOCK_E)
        group_score = tl.where(g_ids == g, (first + second)[:, None], group_score)
    kept = tl.zeros([BLOCK_T, BLOCK_G], tl.int32)
    for _ in range(GROUP_TOPK):
        _, pick = _best(group_score, g_ids, (kept == 0) & (g_ids < NUM_GROUPS), BLOCK_G)
        kept = tl.where(g_ids == pick[:, None], 1, kept)
    keep = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    for g in range(NUM_GROUPS):
        kept_g = tl.sum(tl.where(g_ids == g, kept, 0), axis=1)  # [BLOCK_T]
        keep = tl.where((gid == g)[None, :] & (kept_g > 0)[:, None], 1, keep)
    return keep > 0


@triton.jit
def _routing_forward_kernel(
    logits_ptr, bias_ptr, weights_ptr, indices_ptr, num_tokens, num_experts, stride, group_size,
    scaling, TOPK: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    RANK_LOGITS: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_TOPK: tl.constexpr,
    NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    t, e, x, score = _load_scores(logits_ptr, stride, num_tokens, num_experts, pid,
                                  SIGMOID, BLOCK_T, BLOCK_E)
    e_ok = e < num_experts
    choice = score
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        choice = score + bias[None, :]
    if NUM_GROUPS > 1:
        keep = _group_limit(choice, e, e_ok, group_size, NUM_GROUPS, GROUP_TOPK,
                            BLOCK_T, BLOCK_E, BLOCK_G)
        choice = tl.where(keep, choice, float("-inf"))
    if RANK_LOGITS:
        key = x
    else:
        key = choice
    k_ids = tl.arange(0, BLOCK_K)[None, :]
    taken = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    weights = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    indices = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for k in range(TOPK):
        _, pick = _best(key, e[None, :], (taken == 0) & e_ok[None, :], BLOCK_E)
        hit = e[None, :] == pick[:, None]
        taken = tl.where(hit, 1, taken)
        w = tl.sum(tl.where(hit, score, 0.0), axis=1)
        weights = tl.where(k_ids == k, w[:, None], weights)
        indices = tl.where(k_ids == k, pick[:, None], indices)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + EPS_C)
    weights = weights * scaling
    out = t[:, None].to(tl.int64) * TOPK + k_ids
    mask = (t < num_tokens)[:, None] & (k_ids < TOPK)
    tl.store(weights_ptr + out, weights, mask=mask)
    tl.store(indices_ptr + out, indices.to(tl.int64), mask=mask)


@triton.jit
def _routing_backward_kernel(
    logits_ptr, indices_ptr, grad_w_ptr, grad_logits_ptr, num_tokens, num_experts, stride,
    grad_stride, scaling, TOPK: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t, e, x, score = _load_scores(logits_ptr, stride, num_tokens, num_experts, pid,
                                  SIGMOID, BLOCK_T, BLOCK_E)
    k_ids = tl.arange(0, BLOCK_K)[None, :]
    t_ok = (t < num_tokens)[:, None]
    pairs = t[:, None].to(tl.int64) * TOPK + k_ids
    kmask = t_ok & (k_ids < TOPK)
    picks = tl.load(indices_ptr + pairs, mask=kmask, other=0).to(tl.int32)  # [BLOCK_T, BLOCK_K]
    # d loss / d (chosen unbiased score), through the scaling and the renormalisation
    h = tl.load(grad_w_ptr + pairs, mask=kmask, other=0.0).to(tl.float32) * scaling
    if NORMALIZE:
        chosen = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
        for k in range(TOPK):
            pick = tl.sum(tl.where(k_ids == k, picks, 0), axis=1)
            s = tl.sum(tl.where(e[None, :] == pick[:, None], score, 0.0), axis=1)
            chosen = tl.where(k_ids == k, s[:, None], chosen)
        denom = tl.sum(chosen, axis=1)[:, None] + EPS_C
        h = (h - tl.sum(h * (chosen / denom), axis=1)[:, None]) / denom
    g = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)  # d loss / d score, per expert
    for k in range(TOPK):
        pick = tl.sum(tl.where(k_ids == k, picks, 0), axis=1)
        h_k = tl.sum(tl.where(k_ids == k, h, 0.0), axis=1)
        g += tl.where(e[None, :] == pick[:, None], h_k[:, None], 0.0)
    if SIGMOID:
        dx = g * score * (1.0 - score)
    else:
        dx = score * (g - tl.sum(g * score, axis=1)[:, None])
    mask = t_ok & (e < num_experts)[None, :]
    tl.store(grad_logits_ptr + t[:, None].to(tl.int64) * grad_stride + e[None, :],
             dx.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def routing_forward(logits: torch.Tensor, expert_bias: torch.Tensor | None, opts: RoutingOptions
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [tokens, topk] fp32, indices [tokens, topk] int64)`` from the Triton kernel."""
    tokens, experts = logits.shape
    weights = torch.empty(tokens, opts.topk, dtype=torch.float32, device=logits.device)
    indices = torch.empty(tokens, opts.topk, dtype=torch.int64, device=logits.device)
    if tokens == 0:
        return weights, indices
    blocks = _blocks(experts, opts.topk, opts.num_groups)
    grid = (triton.cdiv(tokens, blocks["BLOCK_T"]),)
    bias = expert_bias.contiguous() if expert_bias is not None else logits  # unread if no bias
    _routing_forward_kernel[grid](
        logits, bias, weights, indices, tokens, experts, logits.stride(0),
        experts // opts.num_groups, opts.scaling_factor, TOPK=opts.topk, SIGMOID=opts.sigmoid,
        HAS_BIAS=expert_bias is not None, RANK_LOGITS=opts.rank_logits,
        NUM_GROUPS=opts.num_groups, GROUP_TOPK=opts.group_topk, NORMALIZE=opts.normalize,
        **blocks)
    return weights, indices


def routing_backward(grad_weights: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor,
                     opts: RoutingOptions) -> torch.Tensor:
    """Gradient of the loss w.r.t. the logits (in their dtype), given d loss / d weights."""
    tokens, experts = logits.shape
    grad_logits = torch.empty_like(logits)
    if tokens == 0:
        return grad_logits
    blocks = _blocks(experts, opts.topk, opts.num_groups)
    blocks.pop("BLOCK_G")
    grid = (triton.cdiv(tokens, blocks["BLOCK_T"]),)
    _routing_backward_kernel[grid](
        logits, indices, grad_weights.contiguous(), grad_logits, tokens, experts,
        logits.stride(0), grad_logits.stride(0), opts.scaling_factor, TOPK=opts.topk,
        SIGMOID=opts.sigmoid, NORMALIZE=opts.normalize, **blocks)
    return grad_logits
