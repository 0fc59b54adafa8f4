"""The supported HF model families, found by config.json's ``model_type`` / ``architectures``.

Adding a family = one module with a ``FAMILY`` (see :mod:`mswift.models.family`) and a line in
``_FAMILY_MODULES``.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from mswift.config.schema import ConfigError, ModelConfig, MswiftConfig
from mswift.models.errors import ModelError
from mswift.models.family import ModelFamily
from mswift.models.hf_config import read_hf_config
from mswift.models.sizes import default_ffn_hidden_size, padded_vocab_size
from mswift.models.weight_map import Dims

_FAMILY_MODULES = ("llama", "qwen2", "qwen3", "qwen3_moe", "llama4", "deepseek_v3")


def families() -> list[ModelFamily]:
    return [importlib.import_module(f"mswift.models.{m}").FAMILY for m in _FAMILY_MODULES]


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (a ModelConfig's ``family`` setting)."""
    by_name = {f.name: f for f in families()}
    if name not in by_name:
        raise ValueError(f"family={name!r}: expected one of {', '.join(sorted(by_name))}")
    return by_name[name]


def family_for(config: dict, where: str = "config.json") -> ModelFamily:
    """The family of an HF config; refuses an unknown ``model_type`` or architecture by name."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    known = families()
    by_type = {t: f for f in known for t in f.model_types}
    if model_type not in by_type:
        supported = ", ".join(sorted(by_type))
        raise ModelError(f"{where}: model_type={model_type!r} is not supported (supported: "
                          f"{supported})")
    family = by_type[model_type]
    other = [a for a in archs if a not in family.architectures]
    if other:
        raise ModelError(f"{where}: architectures={other} not supported for model_type "
                          f"{model_type!r} (supported: {', '.join(family.architectures)})")
    return family


def model_config_from_hf(config: dict, where: str = "config.json", **overrides
                         ) -> tuple[ModelFamily, ModelConfig]:
    """The family and mswift ModelConfig of an HF config (``overrides``: other ModelConfig
    fields, e.g. ``make_vocab_size_divisible_by``)."""
    family = family_for(config, where)
    fields = family.model_config_fields(config)
    try:
        model = ModelConfig(**{**fields, **overrides})
    except ConfigError as err:
        raise ModelError(err.problems, headline=f"{where}: values mswift cannot use") from None
    check_mtp_layers(family, config, model, where)
    return family, model


def check_mtp_layers(family: ModelFamily, config: dict, model: ModelConfig, where: str) -> None:
    """Refuse ``mtp_num_layers`` where the checkpoint has no such multi-token-prediction layers
    to load: a family without MTP weight rules, or fewer than config.json counts."""
    wanted = model.mtp_num_layers or 0
    if not wanted:
        return
    if not any(rule.per_mtp for rule in family.weight_rules):
        raise ModelError(f"{where}: mtp_num_layers={wanted}: the {family.name} family has no "
                         "multi-token-prediction layers to load (deepseek_v3 has)")
    stored = config.get("num_nextn_predict_layers") or 0
    if stored < wanted:
        raise ModelError(f"{where}: mtp_num_layers={wanted}: the checkpoint has "
                         f"num_nextn_predict_layers={stored} MTP layers")


def apply_hf_model(cfg: MswiftConfig) -> MswiftConfig:
    """``cfg`` with its model section filled from ``cfg.model.hf_model``'s config.json.

    The model's shape and numerics come from config.json; settings that are not part of the HF
    model (vocabulary padding, hidden dropout, attention backend, MoE dispatcher and load
    balancing) keep their values from ``cfg``.
    """
    if cfg.model.hf_model is None:
        return cfg
    path = Path(cfg.model.hf_model)
    config = read_hf_config(path)
    family = family_for(config, where=str(path / "config.json"))
    fields = family.model_config_fields(config)
    try:
        model = dataclasses.replace(cfg.model, **fields)
    except ConfigError as err:
        raise ModelError(err.problems, headline=f"{path / 'config.json'}: values mswift "
                                                 "cannot use") from None
    check_mtp_layers(family, config, model, str(path / "config.json"))
    return dataclasses.replace(cfg, model=model)


def dims_for(model: ModelConfig, padded_vocab: int) -> Dims:
    """The sizes a weight map needs, for a model padded to ``padded_vocab`` rows."""
    heads = model.num_attention_heads
    experts = model.num_experts or 0
    freq = model.moe_layer_freq or [1] * model.num_layers
    return Dims(
        num_layers=model.num_layers,
        hidden=model.hidden_size,
        heads=heads,
        groups=model.num_query_groups or heads,
        head_dim=model.kv_channels or model.hidden_size // heads,
        ffn=model.ffn_hidden_size or default_ffn_hidden_size(model.hidden_size, model.swiglu),
        vocab=model.vocab_size,
        padded_vocab=padded_vocab,
        tied=not model.untie_embeddings_and_output_weights,
        experts=experts,
        moe_ffn=model.moe_ffn_hidden_size or model.ffn_hidden_size or 0,
        moe_layers=tuple(bool(f) for f in freq) if experts else (),
        shared_ffn=model.moe_shared_expert_intermediate_size or 0,
        mtp_layers=model.mtp_num_layers or 0,
        **(dict(q_lora_rank=model.q_lora_rank or 0, kv_lora_rank=model.kv_lora_rank,
                qk_nope_dim=model.qk_head_dim, qk_rope_dim=model.qk_pos_emb_head_dim,
                v_head_dim=model.v_head_dim) if model.multi_latent_attention else {}),
    )


def padded_vocab_for(model: ModelConfig, tp: int) -> int:
    return padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
