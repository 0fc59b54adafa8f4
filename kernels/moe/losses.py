"""Router load-balancing terms as megatron-core 0.16.1 computes them (torch only).

These are small reductions over ``[tokens, experts]`` next to the routing kernel; megatron-core's
own versions are the reference (``switch_load_balancing_loss_func``, ``z_loss_func``,
``compute_routing_scores_for_aux_loss`` and ``get_updated_expert_bias`` in
``megatron/core/transformer/moe/moe_utils.py``). Token counts across ranks are the caller's
business: these functions never communicate.
"""
from __future__ import annotations

import torch

from .reference import NORMALIZE_EPS, stable_topk
from .validation import SCORE_FUNCTIONS


def aux_loss_scores(logits: torch.Tensor, topk: int, score_function: str = "softmax"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and token counts the auxiliary loss uses: ``(scores [tokens, experts],
    tokens_per_expert [experts] int64)``.

    As megatron-core's router computes them for the loss (not for dispatch): softmax in fp32, or
    sigmoid normalised over all experts (in the logits' dtype); experts counted by a plain top-k
    of those scores, without expert bias or groups (ties: lower expert id first).
    """
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(dim=-1, keepdim=True) + NORMALIZE_EPS)
    chosen = stable_topk(scores.detach(), topk)
    tokens_per_expert = torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1])
    return scores, tokens_per_expert


def switch_load_balancing_loss(scores: torch.Tensor, tokens_per_expert: torch.Tensor,
                               total_num_tokens: int, topk: int, coeff: float) -> torch.Tensor:
    """Switch Transformer's loss ``E * sum_i f_i * P_i`` times ``coeff``.

    ``f_i = tokens_per_expert[i] / (total_num_tokens * topk)`` and
    ``P_i = sum over the local tokens of scores[:, i] / total_num_tokens``: pass counts and the
    token total of the level to balance at (micro-batch, or summed over ranks for the global
    loss), and the local ``scores``.
    """
    num_experts = scores.shape[-1]
    per_expert = scores.sum(dim=0)  # [experts]
    return torch.sum(per_expert * tokens_per_expert) * (
        num_experts * coeff / (topk * total_num_tokens * total_num_tokens))


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE's router z-loss: ``coeff * mean over tokens of logsumexp(logits)^2``."""
    return torch.mean(torch.square(torch.logsumexp(logits, dim=-1))) * coeff


def updated_expert_bias(tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor,
                        update_rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts by
    ``update_rate``, lower it for over-loaded ones (sign of mean count - count).

    ``tokens_per_expert`` must already be summed over the ranks that share the router (megatron-
    core all-reduces it over tensor x data x context parallel ranks first).
    """
    with torch.no_grad():
        counts = tokens_per_expert.float()
        offset = counts.sum(dim=-1, keepdim=True) / counts.shape[-1] - counts
        return expert_bias + torch.sign(offset) * update_rate
