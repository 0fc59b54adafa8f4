"""Layer specs: megatron-core's local (non-Transformer-Engine) GPT spec with mswift's modules.

A spec is a tree of ``ModuleSpec``; swapping an implementation means replacing a class in the
tree, never editing a layer. :func:`gpt_block_spec` returns the block spec (layers + final norm)
with every torch norm replaced by :class:`mswift.models.norm.Norm` so tensor + sequence
parallelism work without Transformer Engine, and megatron-core's DotProductAttention by
:class:`mswift.models.attention.VarlenCoreAttention` so packed sequences do too.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from mswift.models.attention import VarlenCoreAttention, kernel_backend
from mswift.models.norm import Norm


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
    config: TransformerConfig, vp_stage: int | None = None, attention_backend: str = "auto",
    layer_spec: Callable[[int, ModuleSpec], ModuleSpec] | None = None,
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, plus the final norm.

    ``attention_backend``: ``local`` keeps megatron-core's DotProductAttention; ``torch``,
    ``triton`` and ``auto`` use :class:`VarlenCoreAttention` (packed sequences).
    ``layer_spec(layer, spec)``: the spec of model-wide layer ``layer`` (from 0), given the one
    built here (a family's per-layer choices, :attr:`mswift.models.family.ModelFamily.layer_spec`).
    """
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=False,
        normalization=config.normalization,
        vp_stage=vp_stage,
    )
    mapping = {WrappedTorchNorm: Norm}
    if attention_backend != "local":
        mapping[DotProductAttention] = ModuleSpec(
            module=VarlenCoreAttention, params={"backend": kernel_backend(attention_backend)}
        )
    spec = replace_modules(spec, mapping)
    if layer_spec is None:
        return spec
    numbers = stage_layer_numbers(config, len(spec.layer_specs), vp_stage)
    return dataclasses.replace(spec, layer_specs=[
        layer_spec(number, layer) for number, layer in zip(numbers, spec.layer_specs)])
