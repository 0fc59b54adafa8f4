"""Mixture-of-experts routing and token permutation: Triton kernels and their torch reference."""
from .interface import (PermuteFunction, TopkRoutingFunction, UnpermuteFunction, permute,
                        topk_routing, unpermute)
from .losses import aux_loss_scores, switch_load_balancing_loss, updated_expert_bias, z_loss
from .reference import permute_reference, topk_routing_reference, unpermute_reference
from .validation import RoutingOptions, check_routing_inputs

__all__ = [
    "PermuteFunction",
    "RoutingOptions",
    "TopkRoutingFunction",
    "UnpermuteFunction",
    "aux_loss_scores",
    "check_routing_inputs",
    "permute",
    "permute_reference",
    "switch_load_balancing_loss",
    "topk_routing",
    "topk_routing_reference",
    "unpermute",
    "unpermute_reference",
    "updated_expert_bias",
    "z_loss",
]
