"""Layer specs: megatron-core's local (non-Transformer-Engine) GPT spec with mswift's modules.

A spec is a tree of ``ModuleSpec``; swapping an implementation means replacing a class in the
tree, never editing a layer. :func:`gpt_block_spec` returns the block spec (layers + final norm)
with every torch norm replaced by :class:`mswift.models.norm.Norm` so tensor + sequence
parallelism work without Transformer Engine.
"""
from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from mswift.models.norm import Norm


def replace_modules(spec, mapping: dict):
    """Copy of a spec tree (ModuleSpec / submodule dataclasses / lists) with classes replaced."""
    if isinstance(spec, type):
        return mapping.get(spec, spec)
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(
            spec,
            module=replace_modules(spec.module, mapping),
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


def gpt_block_spec(
    config: TransformerConfig, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, plus the final norm."""
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=False,
        normalization=config.normalization,
        vp_stage=vp_stage,
    )
    return replace_modules(spec, {WrappedTorchNorm: Norm})
