"""Argument checks shared by the Triton and torch MoE routing and permutation paths.

Shapes, dtypes and option values are always checked. The values of expert indices and row
maps are only checked on the CPU: reading them from a GPU would force a device sync per call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCORE_FUNCTIONS = ("softmax", "sigmoid")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class RoutingOptions:
    """Resolved, validated options of one ``topk_routing`` call."""

    topk: int
    sigmoid: bool  # score function: sigmoid (True) or softmax over all experts (False)
    num_groups: int  # 1: no group-limited routing
    group_topk: int  # groups kept per token (== num_groups when there are no groups)
    normalize: bool
    scaling_factor: float
    # Experts are ranked on the raw logits when neither a bias nor groups are in play: the same
    # order as the (monotone) scores, with fp32 ties in the scores broken by the logits, as
    # Llama-4's router does. Otherwise on score + bias, as DeepSeek-V3's router does.
    rank_logits: bool


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_routing_inputs(logits, topk, score_function, expert_bias, num_groups, group_topk,
                         normalize, scaling_factor) -> RoutingOptions:
    """Raise ValueError on bad user input; return the resolved options."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [tokens, experts] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else logits!r}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be a floating point tensor, got {logits.dtype}")
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError("logits must have at least one expert column")
    topk = _check_int("topk", topk, 1, num_experts)
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
    if expert_bias is not None:
        is_tensor = isinstance(expert_bias, torch.Tensor)
        if not is_tensor or tuple(expert_bias.shape) != (num_experts,):
            got = tuple(expert_bias.shape) if is_tensor else expert_bias
            raise ValueError(f"expert_bias must be a [{num_experts}] tensor (one value per "
                             f"expert), got {got!r}")
        if not expert_bias.is_floating_point() or expert_bias.device != logits.device:
            raise ValueError(f"expert_bias must be a floating point tensor on {logits.device}, "
                             f"got {expert_bias.dtype} on {expert_bias.device}")
    num_groups = _check_int("num_groups", num_groups, 1)
    if num_groups > 1:
        if num_experts % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide the number of experts "
                             f"({num_experts}): groups must be of equal size")
        if num_experts // num_groups < 2:
            raise ValueError(f"num_groups={num_groups} leaves {num_experts // num_groups} expert "
                             f"per group; a group's score is the sum of its top-2 scores, so "
                             f"each group needs at least 2 experts")
        if group_topk is None:
            raise ValueError(f"num_groups={num_groups} needs group_topk (the number of groups "
                             f"kept per token)")
        group_topk = _check_int("group_topk", group_topk, 1, num_groups)
    elif group_topk not in (None, 1):
        raise ValueError(f"group_topk={group_topk!r} needs num_groups > 1")
    scaling_factor = float(scaling_factor)
    return RoutingOptions(
        topk=topk,
        sigmoid=score_function == "sigmoid",
        num_groups=num_groups,
        group_topk=group_topk if num_groups > 1 else 1,
        normalize=bool(normalize),
        scaling_factor=scaling_factor,
        rank_logits=expert_bias is None and num_groups == 1,
    )


def check_permute_inputs(tokens, indices, num_experts, pad_to, unrouted: bool = False) -> None:
    """Raise ValueError on bad ``permute`` arguments."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a [tokens, hidden] tensor")
    if tokens.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"tokens must be a floating point tensor, got {tokens.dtype}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[1] < 1:
        raise ValueError("indices must be a [tokens, topk] tensor of expert ids, topk >= 1")
    if indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} rows but tokens has {tokens.shape[0]}")
    if indices.device != tokens.device:
        raise ValueError(f"tokens and indices must be on one device, got {tokens.device} and "
                         f"{indices.device}")
    _check_int("num_experts", num_experts, 1)
    if pad_to is not None:
        _check_int("pad_to", pad_to, 1)
        if unrouted:
            raise ValueError("pad_to and unrouted=True together are not supported")
    if indices.device.type == "cpu" and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        lowest = -1 if unrouted else 0
        if low < lowest or high >= num_experts:
            ids = f"[0, {num_experts}) or -1 (unrouted)" if unrouted else f"[0, {num_experts})"
            raise ValueError(f"indices must be expert ids in {ids}, got values from {low} to "
                             f"{high}")


def check_unpermute_inputs(expert_out, row_map, weights) -> None:
    """Raise ValueError on bad ``unpermute`` arguments."""
    if not isinstance(expert_out, torch.Tensor) or expert_out.dim() != 2:
        raise ValueError("expert_out must be a [rows, hidden] tensor")
    if expert_out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"expert_out must be a floating point tensor, got {expert_out.dtype}")
    if (not isinstance(row_map, torch.Tensor) or row_map.dim() != 2
            or row_map.dtype != torch.int64):
        raise ValueError("row_map must be the int64 [tokens, topk] tensor returned by permute")
    if row_map.device != expert_out.device:
        raise ValueError(f"expert_out and row_map must be on one device, got {expert_out.device} "
                         f"and {row_map.device}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != row_map.shape:
            raise ValueError(f"weights must be a {tuple(row_map.shape)} tensor (one per routing "
                             f"choice) or None")
        if not weights.is_floating_point() or weights.device != row_map.device:
            raise ValueError(f"weights must be a floating point tensor on {row_map.device}")
    if row_map.device.type == "cpu" and row_map.numel():
        low, high = int(row_map.min()), int(row_map.max())
        if low < -1 or high >= expert_out.shape[0]:
            raise ValueError(f"row_map points at rows {low}..{high} but expert_out has "
                             f"{expert_out.shape[0]} rows")
