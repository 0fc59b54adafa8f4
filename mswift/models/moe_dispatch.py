"""megatron-core's MoE token dispatchers with the token permutation on mswift's kernels.

megatron-core's ``MoELayer`` builds its dispatcher from ``moe_token_dispatcher_type``, and the
dispatchers call the module-level ``permute`` / ``unpermute`` of ``moe_utils`` (torch
``index_select`` + ``scatter_add``, or Transformer Engine's fused ops).
:func:`use_kernel_dispatchers` keeps everything of each built layer and swaps in a subclass of
the same dispatcher whose permutation steps call :func:`mswift.kernels.permute` /
:func:`mswift.kernels.unpermute` (a counting sort, no atomics) -- no fork of megatron-core:
the metadata, the all-to-all / all-gather, the sort by local expert and the shared-expert
overlap stay megatron-core's (with the CPU layer's gloo fixes).

The kernels take the routing as ``indices [tokens, topk]``; megatron-core's router hands over a
multi-hot ``routing_map [tokens, experts]``. Without token dropping every row has exactly
``topk`` experts, so the indices are its ``topk`` largest entries. The rows come out in
megatron-core's order (expert by expert, token order inside an expert), so the experts see the
same rows and the results equal megatron-core's up to the order of the sum over the ``topk``
outputs of a token.

The ``allgather`` dispatcher at EP > 1 gathers every rank's tokens and each rank permutes only
the choices of its own experts: the others become expert -1 (:func:`local_indices`), which
``permute(..., unrouted=True)`` gives no row and ``unpermute`` no term, so a token none of whose
choices is here comes back as zeros before the reduce-scatter, as from megatron-core's
``unpermute``.

Covered: dropless routing (no ``moe_expert_capacity_factor``, no router padding for
quantization) with the ``alltoall`` and ``allgather`` dispatchers at any EP / TP. Elsewhere --
token dropping, megatron-core's own TE fusion (``moe_permute_fusion``) -- the layer keeps
megatron-core's dispatcher unchanged.
"""
from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

from mswift.kernels import permute, unpermute


def routing_indices(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """``[tokens, topk]`` expert ids of a dropless multi-hot ``routing_map [tokens, experts]``
    (exactly ``topk`` True per row; their order in a row does not matter to the kernels)."""
    return routing_map.to(torch.int8).topk(topk, dim=1, sorted=False).indices


def local_indices(indices: torch.Tensor, local_experts: list[int]) -> torch.Tensor:
    """``indices`` (global expert ids) as one rank's experts see them: its consecutive
    ``local_experts`` numbered from 0, every other expert -1 (not routed here)."""
    local = indices - local_experts[0]
    return local.masked_fill((local < 0) | (local >= len(local_experts)), -1)


def permute_tokens(tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                   topk: int, backend: str, local_experts: list[int] | None = None):
    """megatron-core's ``permute(tokens, routing_map, probs)`` on mswift's kernels.

    ``tokens [tokens, hidden]``, ``probs [tokens, experts]`` (zero off the route);
    ``local_experts``: permute only the choices of these experts (the all-gather dispatcher
    at EP > 1), None: of all.
    Returns ``(permuted [rows, hidden], permuted_probs [rows], row_map [tokens, topk] (-1:
    not here), tokens_per_expert [experts here])``, ``rows`` the choices permuted;
    ``permuted_probs`` follows the rows and carries the gradient back to ``probs``.
    """
    indices = routing_indices(routing_map, topk)
    chosen = probs.gather(1, indices)  # [tokens, topk]
    num_experts = routing_map.shape[1]
    if local_experts is not None:
        indices, num_experts = local_indices(indices, local_experts), len(local_experts)
    permuted, row_map, tokens_per_expert = permute(
        tokens, indices, num_experts, unrouted=local_experts is not None, backend=backend)
    rows = permuted.shape[0]
    # choices not permuted here (row -1) write one extra slot, dropped
    targets = torch.where(row_map >= 0, row_map, rows).reshape(-1)
    permuted_probs = chosen.new_zeros(rows + 1).scatter(0, targets, chosen.reshape(-1))[:rows]
    return permuted, permuted_probs, row_map, tokens_per_expert


class KernelAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """All-to-all dispatcher whose first permutation (tokens -> all-to-all order, expert-major)
    and its inverse run on mswift's kernels; see the module doc."""

    backend = "triton"

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """megatron-core's steps before the all-to-all: the split metadata (``preprocess``), the
        shared expert's communication, the host copies at their point, then the permutation."""
        self.hidden_shape = hidden_states.shape
        self.probs, self.routing_map = probs, routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])  # [tokens, hidden]
        self.tokens_per_expert = self.preprocess(routing_map)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_permutation_1", self.tokens_per_expert)
        self.hidden_shape_before_permute = hidden_states.shape
        permuted, permuted_probs, self.row_map, _ = permute_tokens(
            hidden_states, probs, routing_map, self.config.moe_router_topk, self.backend)
        return permuted, permuted_probs

    def combine_postprocess(self, permutated_local_input_tokens):
        """Sum each token's expert outputs back (the router weights were applied by the
        experts), then add the shared expert's output."""
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(permutated_local_input_tokens)
            self.shared_experts.post_forward_comm()
        output = unpermute(permutated_local_input_tokens, self.row_map, backend=self.backend)
        self.row_map = None
        output = output.view(self.hidden_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        return output


class KernelAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """All-gather dispatcher whose permutation of the gathered tokens (at EP > 1: of the
    choices of this rank's experts) and its inverse run on mswift's kernels; see the module
    doc."""

    backend = "triton"

    def dispatch_postprocess(self, hidden_states, probs):
        self.hidden_shape_before_permute = hidden_states.shape
        local = self.local_expert_indices if self.ep_size > 1 else None
        permuted, self.local_probs, self.row_map, tokens_per_expert = permute_tokens(
            hidden_states, probs, self.routing_map, self.router_topk, self.backend, local)
        self.routing_map = None
        # megatron-core's experts split their rows by host counts
        return permuted, tokens_per_expert.cpu(), self.local_probs

    def combine_preprocess(self, hidden_states):
        out = unpermute(hidden_states, self.row_map, backend=self.backend)
        self.row_map = None
        return out


def kernel_dispatcher_class(config):
    """The kernel dispatcher for ``config``'s dispatcher type and routing, or None where
    megatron-core's own must stay (see the module doc)."""
    if (config.moe_expert_capacity_factor is not None or config.moe_pad_expert_input_to_capacity
            or config.moe_router_padding_for_quantization or config.moe_permute_fusion):
        return None
    if config.moe_token_dispatcher_type == "alltoall":
        return KernelAlltoAllTokenDispatcher
    if config.moe_token_dispatcher_type == "allgather":
        return KernelAllGatherTokenDispatcher
    return None


def use_kernel_dispatchers(model: torch.nn.Module, backend: str = "triton") -> int:
    """Give every ``MoELayer`` of ``model`` the kernel subclass of its dispatcher, built on the
    same process groups, where :func:`kernel_dispatcher_class` has one; returns how many.

    Done on the built model: megatron-core's ``MoELayer`` picks its dispatcher class itself
    (from the config), and a subclass of the layer in the spec would lose the process groups
    ``TransformerLayer`` passes only to ``MoELayer`` proper."""
    swapped = 0
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        old = layer.token_dispatcher
        dispatcher = kernel_dispatcher_class(layer.config)
        if dispatcher is None:
            continue
        groups = ProcessGroupCollection(ep=old.ep_group, expt_tp=old.tp_group,
                                        tp_ep=old.tp_ep_group)
        layer.token_dispatcher = dispatcher(layer.num_local_experts, layer.local_expert_indices,
                                            config=layer.config, pg_collection=groups)
        layer.token_dispatcher.backend = backend
        if old.shared_experts is not None:  # shared-expert overlap
            layer.token_dispatcher.set_shared_experts(old.shared_experts)
        swapped += 1
    return swapped
