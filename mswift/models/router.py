"""An MoE router for megatron-core's ``MoELayer`` that chooses experts as transformers does.

megatron-core's ``TopKRouter`` differs from the HF routers in how it chooses: with expert groups
it scores a group by the sum of its top ``topk / group_topk`` scores, where DeepSeek-V3 sums the
top 2 whatever top-k is (the two agree only when ``topk == 2 * group_topk``), and with sigmoid
scores it always renormalises the top-k weights, where HF does so only under
``norm_topk_prob``. :class:`HFTopKRouter` keeps everything else of ``TopKRouter`` -- the gating
linear, z-loss, token dropping, the auxiliary losses (``aux_loss``, ``seq_aux_loss``,
``global_aux_loss``), and the expert bias (``expert_bias``, DeepSeek-V3's
``e_score_correction_bias``) with its per-step update, which megatron-core's
``finalize_model_grads`` does for every module that has an ``expert_bias`` -- and makes the
choice with :func:`mswift.kernels.topk_routing` (Triton kernel or torch reference, as
``moe_routing_backend`` resolves).

:meth:`mswift.models.family.ModelFamily.block_spec` puts it in every MoE layer's spec
(:func:`with_router`): always for families whose HF router megatron-core's does not reproduce
(DeepSeek-V3), and for the others with ``moe_routing_backend=triton``, so that the choice runs
on mswift's routing kernel.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    router_gating_linear,
)
from megatron.core.transformer.moe.router import TopKRouter

from mswift.kernels import topk_routing


class HFTopKRouter(TopKRouter):
    """``TopKRouter`` whose top-k choice and weights are transformers' (see the module doc).

    ``normalize``: divide the chosen weights by their sum (HF ``norm_topk_prob``); ``backend``:
    :func:`mswift.kernels.topk_routing`'s (``auto``, ``triton``, ``torch``).
    """

    def __init__(self, config, pg_collection=None, normalize: bool = True,
                 backend: str = "auto"):
        if config.moe_router_load_balancing_type == "sinkhorn":
            raise ValueError("moe_router_load_balancing_type=sinkhorn: not an HF router; use "
                             "aux_loss, seq_aux_loss, global_aux_loss or none")
        super().__init__(config=config, pg_collection=pg_collection)
        self.normalize = normalize
        self.backend = backend

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (fp64 when ``moe_router_dtype`` says so), as the HF routers
        compute them whatever the activations' dtype."""
        dtype = torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32
        return router_gating_linear(input, self.weight, self.bias, dtype)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``(probs [tokens, experts], routing_map [tokens, experts] bool)`` as megatron-core's
        dispatchers take them: the HF weights at the chosen experts, zero elsewhere."""
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)  # [tokens, experts]
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        weights, indices = topk_routing(
            logits, self.topk, score_function=self.score_function,
            expert_bias=self.expert_bias, num_groups=self.config.moe_router_num_groups or 1,
            group_topk=self.config.moe_router_group_topk, normalize=self.normalize,
            scaling_factor=self.config.moe_router_topk_scaling_factor or 1.0,
            backend=self.backend)  # [tokens, topk] each
        probs = torch.zeros_like(logits, dtype=weights.dtype).scatter(1, indices, weights)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=self.config.moe_router_fusion,
                padding_mask=padding_mask)
            padded = padding_mask is not None
            probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=padded)
            probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, seq_length, bsz,
                                             with_padding_mask=padded)
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map,
                                                with_padding_mask=padded)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map


def router_builder(normalize: bool, backend: str = "auto"):
    """What ``MoESubmodules.router`` takes (``MoELayer`` calls it with ``config`` and
    ``pg_collection``): an :class:`HFTopKRouter` with these settings."""
    return functools.partial(HFTopKRouter, normalize=normalize, backend=backend)


def with_router(spec, router):
    """A layer spec with ``router`` in its MoE submodules (a dense layer's spec unchanged)."""
    mlp = spec.submodules.mlp
    if not isinstance(mlp.submodules, MoESubmodules):
        return spec
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, router=router))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))
