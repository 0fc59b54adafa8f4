"""mswift's grouped expert MLP: all local experts' GEMMs of an MoE layer in one call.

``moe_grouped_gemm: true`` without Transformer Engine puts :func:`grouped_experts_spec` in the
MoE layers: megatron-core's ``TEGroupedMLP`` (its dispatch of the rows, the activation with the
router weights, the sharded checkpoint keys) built on :class:`ColumnGroupedLinear` /
:class:`RowGroupedLinear` in place of TE's ``GroupedLinear``. Where TE runs, TE's own grouped
MLP is used (:func:`mswift.models.impl.resolve_grouped_experts`).

Checkpoints: the parameters are named as TE's (``linear_fc1.weight0``, ``weight1``, ... one per
local expert, each ``[out, in]`` like a per-expert linear layer), so the plain state dict (the
legacy format) has ``TEGroupedMLP``'s keys, and :meth:`GroupedLinear.sharded_state_dict` gives
each expert's weight the key and global offsets ``SequentialMLP`` gives it
(``...mlp.experts.experts.linear_fc1.weight``, the global expert as a prepended axis), so a
torch_dist checkpoint loads with grouped GEMMs on or off. The bridge names the legacy keys of
both layouts (:func:`mswift.models.weight_map.local_spec_name`).

The GEMMs: ``torch._grouped_mm`` (one kernel over every expert's rows) for CUDA bf16 tensors
whose rows are 16-byte aligned, which is what it accepts on the GPU; else one ``matmul`` per
expert, the CPU path.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
)
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import GroupedMLP, TEGroupedMLP
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

from mswift.runtime.device import local_device


def grouped_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands (``x [rows, in]``, an expert's
    ``weight [out, in]``): CUDA bf16 with both row lengths a multiple of 16 bytes."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and x.shape[1] % 8 == 0
            and weight.shape[0] % 8 == 0)


class GroupedMM(torch.autograd.Function):
    """``apply(x, ends, *weights)``: one ``torch._grouped_mm`` over every expert's rows. The
    weights are stacked for the call and again in backward, never kept: a stacked copy saved
    for backward would hold every expert weight of every layer until then."""

    @staticmethod
    def forward(ctx, x, ends, *weights):
        ctx.save_for_backward(x, ends, *weights)
        return torch._grouped_mm(x, torch.stack(weights).transpose(1, 2), offs=ends)

    @staticmethod
    def backward(ctx, grad):
        x, ends, *weights = ctx.saved_tensors
        grad = grad.contiguous()  # [rows, out]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad, torch.stack(weights), offs=ends)
        # [experts, out, in]: expert e's grad^T x over its rows (zero without rows)
        grad_w = torch._grouped_mm(grad.t(), x, offs=ends).to(weights[0].dtype)
        return (grad_x, None, *grad_w.unbind(0))


def grouped_matmul(x: torch.Tensor, weights, rows: list[int],
                   use_grouped_mm: bool | None = None) -> torch.Tensor:
    """``[rows, out]``: each expert's consecutive rows of ``x [rows, in]`` times its
    ``weights[e] [out, in]`` transposed; ``rows`` per expert (zeros allowed).
    ``use_grouped_mm``: None decides by :func:`grouped_mm_usable`."""
    weights = list(weights)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_usable(x, weights[0])
    if use_grouped_mm:
        ends = torch.tensor(rows, device=x.device).cumsum(0).to(torch.int32)
        return GroupedMM.apply(x, ends, *weights)
    return torch.cat([part @ w.t() for part, w in zip(x.split(rows), weights)])


class GroupedLinear(torch.nn.Module):
    """``num_gemms`` expert linear layers without bias, each split over the expert-TP ranks
    along ``partition_dim`` (0: column-parallel fc1, 1: row-parallel fc2), with TE
    ``GroupedLinear``'s constructor and ``forward(x, rows) -> (out, None)``. No communication:
    megatron-core's MoE dispatchers gather and reduce the expert-TP shares themselves."""

    partition_dim = 0

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config,
                 init_method, bias: bool, skip_bias_add: bool, is_expert: bool,
                 tp_comm_buffer_name: str | None = None, pg_collection=None):
        super().__init__()
        if bias:
            raise ValueError("moe_grouped_gemm=true: mswift's grouped experts have no biases "
                             "(add_bias_linear=true); use moe_grouped_gemm=false")
        assert is_expert, "grouped linear layers are expert layers"
        self.num_gemms = num_gemms
        self._tp_group, self._ep_group = pg_collection.expt_tp, pg_collection.ep
        self._expt_dp_group = pg_collection.expt_dp
        tp_rank, tp_size = get_pg_rank(self._tp_group), get_pg_size(self._tp_group)
        shape = [output_size, input_size]
        shape[self.partition_dim] //= tp_size
        expert_parallel = config.expert_model_parallel_size > 1
        for i in range(num_gemms):
            if config.use_cpu_initialization:
                weight = torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype))
                if config.perform_initialization:
                    _initialize_affine_weight_cpu(
                        weight, output_size, input_size, shape[self.partition_dim],
                        self.partition_dim, init_method, rank=tp_rank, world_size=tp_size)
            else:
                weight = torch.nn.Parameter(torch.empty(
                    *shape, dtype=config.params_dtype, device=local_device()))
                if config.perform_initialization:
                    _initialize_affine_weight_gpu(weight, init_method, self.partition_dim,
                                                  is_expert=True)
            # what _initialize_affine_weight_* mark when they initialise
            weight.tensor_model_parallel = True
            weight.partition_dim, weight.partition_stride = self.partition_dim, 1
            # expert parameters are reduced over the expert-data-parallel group
            weight.allreduce = not expert_parallel
            self.register_parameter(f"weight{i}", weight)

    def forward(self, x: torch.Tensor, rows: list[int]):
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        return grouped_matmul(x, weights, rows), None

    def get_extra_state(self):
        """None, as megatron-core's linear layers keep (the checkpoints hold the entry)."""
        return None

    def set_extra_state(self, state):
        pass

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a torch_dist load hands back every expert's (None) extra state; the module keeps one
        for i in range(1, self.num_gemms):
            state_dict.pop(f"{prefix}_extra_state{i}", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """``{prefix}weight{i}`` / ``{prefix}_extra_state{i}`` -> the sharded tensors
        ``SequentialMLP``'s expert ``i`` saves (key ``{prefix}weight``, the global expert id on
        a prepended axis), as TE's ``GroupedLinear`` maps its own (``TEGroupedMLP`` moves the
        prefix under ``experts.``)."""
        local = self.num_gemms
        first = get_pg_rank(self._ep_group) * local
        experts = get_pg_size(self._ep_group) * local
        out = {}
        for i in range(local):
            state = {f"{i}.weight": getattr(self, f"weight{i}"), f"{i}._extra_state": None}
            offsets = (*sharded_offsets, (len(sharded_offsets), first + i, experts))
            sub = make_sharded_tensors_for_checkpoint(
                state, "", {f"{i}.weight": self.partition_dim}, offsets,
                tp_group=self._tp_group, dp_cp_group=metadata["dp_cp_group"])
            replace_prefix_for_sharding(sub, f"{i}.", prefix)
            out[f"{prefix}weight{i}"] = sub[f"{i}.weight"]
            out[f"{prefix}_extra_state{i or ''}"] = sub[f"{i}._extra_state"]  # as TE names them
        # replicated over the expert-data-parallel ranks, as SequentialMLP's experts
        for sharded in out.values():
            sharded.replica_id = (*sharded.replica_id[:2], get_pg_rank(self._expt_dp_group))
        return out


class ColumnGroupedLinear(GroupedLinear):
    """Grouped fc1: each expert's output features split over the expert-TP ranks."""

    partition_dim = 0


class RowGroupedLinear(GroupedLinear):
    """Grouped fc2: each expert's input features split over the expert-TP ranks."""

    partition_dim = 1


def grouped_experts_spec(activation_func=None) -> ModuleSpec:
    """The experts of an MoE layer as mswift's grouped MLP; ``activation_func``: the module
    spec the MLPs apply under ``use_te_activation_func`` (None: the config's function)."""
    return ModuleSpec(module=TEGroupedMLP, submodules=MLPSubmodules(
        linear_fc1=ColumnGroupedLinear, linear_fc2=RowGroupedLinear,
        activation_func=activation_func))


def te_grouped_experts_spec() -> ModuleSpec:
    """Transformer Engine's grouped MLP (``TEGroupedMLP`` on TE's ``GroupedLinear``), as
    megatron-core's TE spec builds it."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    provider = TESpecProvider()
    module, submodules = provider.grouped_mlp_modules(True, False)
    submodules.activation_func = provider.activation_func()
    return ModuleSpec(module=module, submodules=submodules)


def with_grouped_experts(spec, experts: ModuleSpec):
    """A block spec whose MoE layers have ``experts`` in place of megatron-core's legacy
    ``GroupedMLP`` (what its local spec picks under ``moe_grouped_gemm``, which needs the
    ``grouped_gemm`` package and stores other checkpoint keys); other layers unchanged."""
    layers = []
    for layer in spec.layer_specs:
        mlp = layer.submodules.mlp
        moe = isinstance(mlp.submodules, MoESubmodules)
        if moe and mlp.submodules.experts.module is GroupedMLP:
            mlp = dataclasses.replace(
                mlp, submodules=dataclasses.replace(mlp.submodules, experts=experts))
            layer = dataclasses.replace(
                layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))
        layers.append(layer)
    return dataclasses.replace(spec, layer_specs=layers)

