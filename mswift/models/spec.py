"""Layer specs: megatron-core's GPT block spec, local or Transformer Engine, with mswift's modules.

A spec is a tree of ``ModuleSpec``; swapping an implementation means replacing a class in the
tree, never editing a layer. :func:`gpt_block_spec` returns the block spec (layers + final norm)
for ``transformer_impl`` (:mod:`mswift.models.impl` resolves ``auto``):

* ``local``: megatron-core's local spec, with every norm it may pick -- torch's
  (``WrappedTorchNorm``) or, when apex imports, apex's ``FusedLayerNorm``, which refuses RMSNorm
  -- replaced by :class:`mswift.models.norm.Norm`, so tensor + sequence parallelism work and the
  model does not depend on apex being installed; ``MLASelfAttention`` by
  :class:`mswift.models.mla.MLAttention` (megatron-core's loses part of k's gradient at TP > 1);
* ``transformer_engine``: megatron-core's TE spec (``TELayerNormColumnParallelLinear``: the
  norm fused into the next linear layer; ``TENorm`` for the final, qk and MoE norms; TE's
  GEMMs). Its checkpoint keys are the local spec's (see :func:`_same_keys_as_local`).

Core attention, per resolved ``attention_backend``: ``te`` keeps ``TEDotProductAttention``;
``torch`` / ``triton`` put :class:`mswift.models.attention.VarlenCoreAttention` in its place
(megatron-core builds core attention with the same arguments whatever the class), ``local``
megatron-core's ``DotProductAttention``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from mswift.config.schema import ConfigError
from mswift.models.attention import VarlenCoreAttention
from mswift.models.grouped_experts import (
    grouped_experts_spec,
    te_grouped_experts_spec,
    with_grouped_experts,
)
from mswift.models.impl import (
    resolve_attention_backend,
    resolve_grouped_experts,
    resolve_transformer_impl,
    te_machine_problems,
    te_setting_problems,
)
from mswift.models.mla import MLAttention
from mswift.models.norm import Norm

# Every norm class megatron-core's local spec can choose (its module-level ``LNImpl``: apex's
# FusedLayerNorm when apex imports, else WrappedTorchNorm; RMSNorm layers always get
# WrappedTorchNorm, the final norm gets LNImpl). The TE spec asks for FusedLayerNorm for qk
# norms with TE < 1.9.
FOREIGN_NORMS = (WrappedTorchNorm, FusedLayerNorm)
# megatron-core's local spec saves each layer's norms under the name of the linear layer TE
# fuses them into (its ``sharded_state_dict_keys_map``); the TE spec does so by construction,
# except before an MoE layer, where TE keeps a separate TENorm ``pre_mlp_layernorm``.
_PRE_MLP_NORM_AS_FUSED = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def replace_modules(spec, mapping: dict):
    """Copy of a spec tree (ModuleSpec / submodule dataclasses / lists) with classes replaced.

    ``mapping`` maps a class to a class or to a ``ModuleSpec`` (a class plus constructor params).
    """
    if isinstance(spec, type):
        return mapping.get(spec, spec)
    if isinstance(spec, ModuleSpec):
        module = replace_modules(spec.module, mapping)
        params = dict(spec.params)
        if isinstance(module, ModuleSpec):
            module, params = module.module, {**params, **module.params}
        return dataclasses.replace(
            spec,
            module=module,
            params=params,
            submodules=replace_modules(spec.submodules, mapping),
        )
    if isinstance(spec, list):
        return [replace_modules(item, mapping) for item in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {
            f.name: replace_modules(getattr(spec, f.name), mapping)
            for f in dataclasses.fields(spec)
            if f.init
        }
        return dataclasses.replace(spec, **changes)
    return spec


def stage_layer_numbers(config: TransformerConfig, count: int,
                        vp_stage: int | None = None) -> list[int]:
    """Model-wide numbers (from 0) of the ``count`` layers this pipeline (virtual) stage builds,
    as megatron-core's get_gpt_decoder_block_spec picks them."""
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        return list(layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage))
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return list(range(offset, offset + count))


def gpt_block_spec(
    config: TransformerConfig,
    vp_stage: int | None = None,
    attention_backend: str = "auto",
    layer_spec: Callable[[int, ModuleSpec], ModuleSpec] | None = None,
    transformer_impl: str = "auto",
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, plus the final norm.

    ``attention_backend`` / ``transformer_impl``: the settings (``auto`` resolved here; see
    :func:`mswift.models.impl.layer_choice`). A setting that needs Transformer Engine where it
    cannot run is a :class:`ConfigError`.
    ``layer_spec(layer, spec)``: the spec of model-wide layer ``layer`` (from 0), given the one
    built here (a family's per-layer choices, :attr:`mswift.models.family.ModelFamily.layer_spec`).
    """
    half = bool(config.bf16 or config.fp16)
    problems = te_setting_problems(transformer_impl, attention_backend, config.fp8, half)
    problems += te_machine_problems(transformer_impl, attention_backend, config.fp8)
    if problems:
        raise ConfigError(problems)
    impl = resolve_transformer_impl(transformer_impl)
    backend = resolve_attention_backend(attention_backend, transformer_impl, half)
    use_te = impl == "transformer_engine"
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=config.normalization,
        vp_stage=vp_stage,
    )
    mapping = {norm: Norm for norm in FOREIGN_NORMS}
    mapping[MLASelfAttention] = MLAttention
    core = _core_attention(backend)
    if core is not None:
        mapping[_te_attention() if use_te else DotProductAttention] = core
    spec = replace_modules(spec, mapping)
    if use_te:
        spec = _same_keys_as_local(spec)
    grouped = resolve_grouped_experts(bool(config.num_moe_experts and config.moe_grouped_gemm))
    if grouped is not None:
        spec = with_grouped_experts(
            spec, te_grouped_experts_spec() if grouped == "te" else grouped_experts_spec())
    if layer_spec is None:
        return spec
    numbers = stage_layer_numbers(config, len(spec.layer_specs), vp_stage)
    return dataclasses.replace(spec, layer_specs=[
        layer_spec(number, layer) for number, layer in zip(numbers, spec.layer_specs)])


def mtp_block_spec(config: TransformerConfig, block_spec: TransformerBlockSubmodules,
                   transformer_impl: str, vp_stage: int | None = None):
    """megatron-core's multi-token-prediction block for this (virtual) pipeline stage, or None
    where it builds none (MTP sits on the last stage). Each MTP module's decoder layer is
    ``block_spec``'s last layer (mswift's modules, the family's per-layer choices: DeepSeek-V3's
    MTP layer is one of its MoE layers); its ``enorm`` / ``hnorm`` / final norm are mswift's
    norm, like every other norm of the model."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    use_te = resolve_transformer_impl(transformer_impl) == "transformer_engine"
    spec = get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=use_te,
                                  vp_stage=vp_stage)
    if spec is None:
        return None
    return replace_modules(spec, {norm: Norm for norm in FOREIGN_NORMS})


def _core_attention(backend: str):
    """What replaces the spec's own core attention (None: keep it)."""
    if backend in ("torch", "triton"):
        return ModuleSpec(module=VarlenCoreAttention, params={"backend": backend})
    if backend == "local":
        return DotProductAttention
    return None  # te on the TE spec


def _te_attention():
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention


def _same_keys_as_local(spec: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """The TE spec with its MoE layers' ``pre_mlp_layernorm`` saved under the local spec's key
    (``mlp.linear_fc1.layer_norm_weight``), so a torch_dist checkpoint loads in either spec and
    in mswift's bridge (:mod:`mswift.bridge.dist_bytes`). Dense layers already agree: TE stores
    ``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``,
    which the local spec maps its ``input_layernorm`` / ``pre_mlp_layernorm`` to."""
    layers = []
    for layer in spec.layer_specs:
        sub = layer.submodules
        # attention's norm fused (not MLA) and the pre-MLP norm separate (an MoE layer)
        if sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is not IdentityOp:
            keys = {**sub.sharded_state_dict_keys_map, **_PRE_MLP_NORM_AS_FUSED}
            layer = dataclasses.replace(
                layer, submodules=dataclasses.replace(sub, sharded_state_dict_keys_map=keys))
        layers.append(layer)
    return dataclasses.replace(spec, layer_specs=layers)
