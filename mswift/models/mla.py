"""Multi-latent attention's kv down projection with the right gradient at TP > 1.

megatron-core 0.16.1's local MLA spec builds ``linear_kv_down_proj`` column-parallel: each TP
rank computes its columns of ``[kv latent (kv_lora_rank) | k RoPE part (qk_pos_emb_head_dim)]``
and ``MLASelfAttention`` all-gathers them. The latent feeds ``linear_kv_up_proj``, whose input
gradient is summed over TP, but the k RoPE part -- shared by all heads -- is used by each rank's
own heads only, so its gradient on a rank is that rank's heads' share, and the all-gather's
backward hands each rank its own columns of it: the other ranks' shares are lost (a TP2 run
drifts 1.4e-3 off TP1 by step 2). (TE's MLA spec makes the down projections duplicated linears
instead, whose weight gradients are reduced over TP with sequence parallelism only; mswift keeps
the column-parallel weights, so TP1 and TP2 checkpoints keep their keys and shards.)

:class:`MLAttention` makes that projection return its gathered output, with the RoPE part's
gradient summed over TP, so that ``MLASelfAttention`` takes its branch for a whole
("duplicated") projection:

* without sequence parallelism the RoPE columns' gradient is all-reduced over TP;
* with it, the output is scattered back to this rank's sequence slice, and ``MLASelfAttention``
  all-gathers the RoPE part over the sequence, whose backward (reduce-scatter) sums the ranks'
  shares.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.utils import get_pg_size


class MLAttention(MLASelfAttention):
    """megatron-core's ``MLASelfAttention`` whose column-parallel ``linear_kv_down_proj`` (the
    local spec's) returns its output whole, the RoPE part's gradient summed over TP (see the
    module doc). Same parameters, shards and checkpoint keys. (A forward hook, because
    ``MLASelfAttention`` accepts only megatron-core's own classes for that projection.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        projection = self.linear_kv_down_proj
        if type(projection) is ColumnParallelLinear and get_pg_size(projection.tp_group) > 1:
            projection.register_forward_hook(_whole_kv_down_projection)


def _whole_kv_down_projection(projection, args, outputs):
    """Forward hook: ``(output [s, b, (kv_lora_rank + rope) / TP], bias)`` -> the output
    gathered over TP, ``[s / TP (with SP) or s, b, kv_lora_rank + rope]``."""
    output, bias = outputs
    config, group = projection.config, projection.tp_group
    output = gather_from_tensor_model_parallel_region(output, group=group)
    if projection.sequence_parallel:
        return scatter_to_sequence_parallel_region(output, group=group), bias
    latent, rope = torch.split(output, [config.kv_lora_rank, config.qk_pos_emb_head_dim], dim=-1)
    return torch.cat([latent, _SumGradOverTP.apply(rope, group)], dim=-1), bias


class _SumGradOverTP(torch.autograd.Function):
    """Identity whose backward all-reduces the gradient over ``group``. (megatron-core's
    ``copy_to_tensor_model_parallel_region`` reduces a contiguous copy of a non-contiguous
    gradient and returns the unreduced one -- as this slice's gradient from ``torch.cat`` is.)"""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return input_.view_as(input_)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None

