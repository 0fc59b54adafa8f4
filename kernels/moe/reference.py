"""Plain torch references of the MoE routing and token permutation kernels.

They are the ``backend="torch"`` path (autograd gives their gradients) and the ground truth the
Triton kernels are tested against. Routing uses the same torch ops as transformers' routers
(``sigmoid``, ``softmax(dtype=float32)``, ``gather``, ``/ (sum + 1e-20)``), so its weights equal
theirs bit for bit; only the order of tied experts is fixed here (lower expert id first) where
``torch.topk`` leaves it to its implementation.
"""
from __future__ import annotations

import torch

from .validation import RoutingOptions

NORMALIZE_EPS = 1e-20  # DeepSeek-V3's router adds it; a no-op in fp32 for softmax sums (>= 1/E)


def stable_topk(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, ties broken by the lower index."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]


def routing_dtype(logits: torch.Tensor) -> torch.dtype:
    """Routing computes in fp32 (as the HF routers do), float64 logits in float64."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def routing_scores(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Scores of every expert: sigmoid, or softmax over all experts."""
    x = logits.to(routing_dtype(logits))
    return torch.sigmoid(x) if sigmoid else torch.softmax(x, dim=-1)


def _group_mask(choice: torch.Tensor, opts: RoutingOptions) -> torch.Tensor:
    """``[tokens, experts]`` True inside the ``group_topk`` groups with the best top-2 sums."""
    tokens, experts = choice.shape
    per_group = experts // opts.num_groups
    grouped = choice.view(tokens, opts.num_groups, per_group)  # [tokens, groups, per_group]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [tokens, groups]
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, stable_topk(group_scores, opts.group_topk), True)
    return kept.repeat_interleave(per_group, dim=1)


def topk_routing_reference(logits: torch.Tensor, expert_bias: torch.Tensor | None,
                           opts: RoutingOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [tokens, topk] fp32, indices [tokens, topk] int64)``; see ``topk_routing``."""
    scores = routing_scores(logits, opts.sigmoid)
    choice = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    if opts.num_groups > 1:
        choice = choice.masked_fill(~_group_mask(choice, opts), float("-inf"))
    key = logits.to(scores.dtype) if opts.rank_logits else choice
    indices = stable_topk(key, opts.topk)
    weights = scores.gather(1, indices)
    if opts.normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + NORMALIZE_EPS)
    return weights * opts.scaling_factor, indices


def permutation_rows(indices: torch.Tensor, num_experts: int, pad_to: int | None,
                     unrouted: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Destination row of every routing choice, expert-major and stable (argsort); with
    ``unrouted``, choices of expert -1 get row -1.

    Returns ``(row_map [tokens, topk] int64, tokens_per_expert [experts] int64 (padded counts),
    total rows)``. Expert ``e``'s rows start at the sum of the padded counts of experts < e.
    """
    flat = indices.reshape(-1).to(torch.int64)  # choice p = token * topk + k
    routed = flat >= 0
    # expert -1 sorts last, as an extra expert whose rows are then dropped
    key = torch.where(routed, flat, num_experts)
    counts = torch.bincount(key, minlength=num_experts + 1)
    padded = counts[:num_experts] if pad_to is None else (
        (counts[:num_experts] + pad_to - 1) // pad_to * pad_to)
    starts = torch.cat([padded.cumsum(0) - padded, padded.sum().view(1)])
    order = torch.argsort(key, stable=True)  # choices by (expert, token, k)
    sorted_experts = key[order]
    first_of_expert = (counts.cumsum(0) - counts)[sorted_experts]  # in the unpadded order
    rank = torch.arange(flat.numel(), device=flat.device) - first_of_expert
    rows = torch.empty_like(flat)
    rows[order] = starts[sorted_experts] + rank
    rows = torch.where(routed, rows, -1)
    total = flat.numel() if pad_to is None and not unrouted else int(padded.sum())
    return rows.view(indices.shape), padded, total


def permute_reference(tokens: torch.Tensor, indices: torch.Tensor, num_experts: int,
                      pad_to: int | None = None, unrouted: bool = False):
    """``(permuted [rows, hidden], row_map, tokens_per_expert)``; see ``permute``."""
    row_map, tokens_per_expert, total = permutation_rows(indices, num_experts, pad_to, unrouted)
    topk = indices.shape[1]
    sources = tokens.repeat_interleave(topk, dim=0)  # [tokens * topk, hidden], choice order
    rows = row_map.reshape(-1)
    # unrouted choices (row -1) go to one extra row, dropped
    rows = torch.where(rows >= 0, rows, total)
    permuted = tokens.new_zeros(total + 1, tokens.shape[1]).index_copy(0, rows, sources)
    return permuted[:total], row_map, tokens_per_expert


def unpermute_reference(expert_out: torch.Tensor, row_map: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[tokens, hidden]`` in expert_out's dtype: sum over k of ``weights * expert_out[row]``
    (nothing for row -1), accumulated in fp32 (float64 stays float64)."""
    tokens, topk = row_map.shape
    acc = torch.promote_types(expert_out.dtype, torch.float32)
    rows = row_map.reshape(-1)
    # row -1 (an unrouted choice) reads an extra zero row
    padded_out = torch.cat([expert_out, expert_out.new_zeros(1, expert_out.shape[1])])
    rows = torch.where(rows >= 0, rows, expert_out.shape[0])
    gathered = padded_out.index_select(0, rows).view(tokens, topk, expert_out.shape[1]).to(acc)
    if weights is not None:  # gathered: [tokens, topk, hidden]
        gathered = gathered * weights.to(acc).unsqueeze(-1)
    return gathered.sum(dim=1).to(expert_out.dtype)
