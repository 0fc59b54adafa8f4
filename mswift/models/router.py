"""An MoE router for megatron-core's ``MoELayer`` that chooses experts as transformers does.

megatron-core's ``TopKRouter`` differs from the HF routers in how it chooses: with expert groups
it scores a group by the sum of its top ``topk / group_topk`` scores, where DeepSeek-V3 sums the
top 2 whatever top-k is (the two agree only when ``topk == 2 * group_topk``), and with sigmoid
scores it always renormalises the top-k weights, where HF does so only under
``norm_topk_prob``. :class:`HFTopKRouter` keeps everything else of ``TopKRouter`` -- the gating
linear, z-loss, token dropping, the auxiliary losses (``aux_loss``, ``global_aux_loss``; its
own ``seq_aux_loss``, DeepSeek-V3's sequence-wise loss over each packed sample, where
megatron-core 0.16.1 takes the whole packed row as one sequence), and the expert bias
(``expert_bias``, DeepSeek-V3's ``e_score_correction_bias``) with its per-step update, which
megatron-core's ``finalize_model_grads`` does for every module that has an ``expert_bias`` --
and makes the choice with :func:`mswift.kernels.topk_routing` (Triton kernel or torch
reference, as ``moe_routing_backend`` resolves).

:meth:`mswift.models.family.ModelFamily.block_spec` puts it in every MoE layer's spec
(:func:`with_router`): always for families whose HF router megatron-core's does not reproduce
(DeepSeek-V3), and for the others with ``moe_routing_backend=triton``, so that the choice runs
on mswift's routing kernel, or with ``seq_aux_loss``.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
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
        if (config.context_parallel_size > 1
                and config.moe_router_load_balancing_type == "seq_aux_loss"):
            raise ValueError("context_parallel_size > 1: HFTopKRouter's seq_aux_loss counts "
                             "each sample's tokens on the TP ranks only")
        super().__init__(config=config, pg_collection=pg_collection)
        self.normalize = normalize
        self.backend = backend
        # The micro-batch's sample boundaries when it is packed (THD), set before each layer's
        # forward (:func:`with_sample_bounds`); None: each row is a sequence.
        self.cu_seqlens = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (fp64 when ``moe_router_dtype`` says so), as the HF routers
        compute them whatever the activations' dtype."""
        dtype = torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32
        return router_gating_linear(input, self.weight, self.bias, dtype)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``(probs [tokens, experts], routing_map [tokens, experts] bool)`` as megatron-core's
        dispatchers take them: the HF weights at the chosen experts, zero elsewhere."""
        bsz = logits.shape[1]
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
            probs = self._apply_sample_aux_loss(probs, aux_scores, aux_map, bsz)
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map,
                                                with_padding_mask=padded)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    def _apply_sample_aux_loss(self, probs, scores, routing_map, bsz: int):
        """DeepSeek-V3's complementary sequence-wise balance loss (``seq_aux_loss``), each
        packed sample a sequence (megatron-core 0.16.1 takes a packed row as one): per sample of
        T real tokens, ``coeff * sum_i f_i P_i`` with ``f_i = E / (k T) * (tokens choosing i)``
        and ``P_i = mean over its tokens of the normalised score``, averaged over the samples
        that have real tokens. ``scores`` / ``routing_map`` ``[tokens, experts]``: megatron-core's
        scores for the auxiliary losses (sigmoid normalised per token, padding rows zero) and
        their top-k (no bias, no groups). Under sequence parallelism this rank holds a slice of
        the tokens: the counts are summed over TP, and each rank's loss is its tokens' share
        (the router weight's gradient is summed over TP), so the gradients are TP1's."""
        coeff = self.get_aux_loss_coeff("seq_aux_loss")
        if coeff == 0:
            return probs
        tokens, experts = scores.shape
        samples, sample = self._sample_of_each_token(tokens, bsz, scores.device)
        counts = torch.zeros(samples, experts, dtype=torch.float32, device=scores.device)
        counts.index_add_(0, sample, routing_map.float())
        counts = reduce_from_tensor_model_parallel_region(counts, self.tp_cp_group)
        length = counts.sum(-1) / self.topk  # real tokens per sample
        score_sums = torch.zeros(samples, experts, dtype=scores.dtype, device=scores.device)
        score_sums = score_sums.index_add(0, sample, scores)
        real = length > 0
        per_sample = (counts * score_sums).sum(-1)[real] / length[real] ** 2
        aux_loss = per_sample.sum() * (experts * coeff / self.topk) / real.sum().clamp(min=1)
        # scaled by the real tokens of the whole micro-batch (megatron-core: this rank's, which
        # under SP divides the gradient by TP)
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, aux_loss, "seq_load_balancing_loss", self.tp_cp_group,
            valid_token_count=length.sum())

    def _sample_of_each_token(self, tokens: int, bsz: int, device):
        """(number of samples, sample index of each of this rank's ``tokens`` routed tokens):
        the packed samples of :attr:`cu_seqlens` (this rank's sequence slice of the one THD row
        under sequence parallelism), else the rows (tokens are ``[seq, batch]`` flattened)."""
        if self.cu_seqlens is None:
            return bsz, torch.arange(tokens, device=device) % bsz
        first = 0
        if self.config.sequence_parallel:
            first = tokens * torch.distributed.get_rank(self.tp_group)
        positions = torch.arange(first, first + tokens, device=device)
        bounds = self.cu_seqlens.to(device=device, dtype=torch.int64)
        return bounds.numel() - 1, torch.bucketize(positions, bounds[1:], right=True)


def with_sample_bounds(model) -> None:
    """Give every :class:`HFTopKRouter` in ``model`` its layer's packed sample boundaries
    (``packed_seq_params.cu_seqlens_q``, None when not packed) at each forward of the layer
    (a recomputation's too), for the sequence-wise loss."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for layer in model.modules():
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if isinstance(layer, TransformerLayer) and isinstance(router, HFTopKRouter):
            layer.register_forward_pre_hook(functools.partial(_set_bounds, router),
                                            with_kwargs=True)


def _set_bounds(router, layer, args, kwargs):
    packed = kwargs.get("packed_seq_params")
    router.cu_seqlens = packed.cu_seqlens_q if packed is not None else None


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
