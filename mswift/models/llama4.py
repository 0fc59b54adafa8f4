"""Llama-4 text model (``Llama4ForCausalLM``; the text part of ``Llama4ForConditionalGeneration``
configs, ``text_config``): Scout (16 experts, every layer MoE) and Maverick (128 experts, every
second layer MoE).

What differs from Llama-3, and where mswift does it:
- MoE layers ``moe_layers`` (default every ``interleave_moe_layer_step``-th from step - 1) ->
  ``moe_layer_freq``; dense layers are ``intermediate_size_mlp`` wide. A top-1 router: sigmoid of
  the chosen logit, which scales the expert's *input* (``moe_apply_probs_on_input``), plus a
  shared expert ``intermediate_size`` wide. megatron-core's ``TopKRouter`` makes the same
  choice (kept with ``moe_routing_backend=torch``); ``triton`` puts
  :class:`mswift.models.router.HFTopKRouter` on mswift's routing kernel in its place.
- NoPE layers (``no_rope_layers``: HF's 1 = RoPE, 0 = none; default every
  ``no_rope_layer_interval``-th) -> ``nope_layers`` (megatron-core's ``no_rope_freq``).
- RoPE on complex pairs (``rotary_interleaved``), ``llama3`` frequency scaling with the model's
  own factors (:mod:`mswift.models.rope`).
- ``use_qk_norm``: a weightless RMS norm of q and k on RoPE layers only. HF applies it after RoPE,
  megatron-core before: RoPE rotates pairs, which keeps a head's norm, so the two agree.
- Chunked attention (``attention_chunk_size``) on RoPE layers and query temperature tuning
  (``floor_scale``, ``attn_scale``) on NoPE layers, by position inside each packed sample:
  :class:`mswift.models.attention.VarlenCoreAttention`, set per layer by :func:`layer_spec`.
"""
from __future__ import annotations

from mswift.models.family import (
    ATTENTION_RULES,
    EMBEDDING_RULES,
    OUTPUT_RULES,
    HFLayout,
    ModelFamily,
    decoder_fields,
    rope_fields,
)
from mswift.models.hf_config import HFConfigReader
from mswift.models.weight_map import (
    FUSED_GATE_UP,
    INPUT_MAJOR_GATE_UP,
    INPUT_MAJOR_ROW_PARALLEL,
    REPLICATED,
    ROW_PARALLEL,
    Rule,
)

# transformers' Llama4TextConfig defaults, for keys an older config.json leaves out.
_DEFAULTS = dict(rms_norm_eps=1e-5, rope_theta=500000.0, no_rope_layer_interval=4,
                 attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192,
                 attn_scale=0.1, use_qk_norm=True, interleave_moe_layer_step=1,
                 num_experts_per_tok=1, tie_word_embeddings=False)


def text_reader(hf: HFConfigReader) -> HFConfigReader:
    """The reader of the text model: ``text_config`` of a ``llama4`` (multimodal) config, the
    config itself for ``llama4_text``; problems are collected in ``hf``'s list."""
    config = hf.config.get("text_config") if hf.get("model_type") == "llama4" else hf.config
    if not isinstance(config, dict):
        hf.problems.append("text_config: missing from config.json (a llama4 model needs it)")
        config = {}
    text = HFConfigReader({**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}},
                          hf.family)
    text.problems = hf.problems
    return text


def layer_patterns(hf: HFConfigReader, num_layers: int) -> tuple[list[int], list[int]]:
    """(MoE 0/1, NoPE 0/1) per layer, as transformers' Llama4TextConfig derives them."""
    step = hf.get("interleave_moe_layer_step")
    moe = hf.get("moe_layers")
    if moe is None:
        moe = range(step - 1, num_layers, step) if isinstance(step, int) and step > 0 else []
    moe = set(moe)
    if not moe or moe - set(range(num_layers)):
        hf.refuse("moe_layers", sorted(moe), f"expected layer numbers below {num_layers}, "
                  "at least one")
    rope = hf.get("no_rope_layers") or [
        int((i + 1) % hf.get("no_rope_layer_interval") != 0) for i in range(num_layers)]
    if len(rope) < num_layers or set(rope[:num_layers]) - {0, 1}:
        hf.refuse("no_rope_layers", rope, f"expected a 0 or 1 for each of {num_layers} layers")
        rope = [1] * num_layers
    return ([int(i in moe) for i in range(num_layers)],
            [1 - int(r) for r in rope[:num_layers]])


def config_fields(hf: HFConfigReader) -> dict:
    text = text_reader(hf)
    text.refuse_if("attention_bias", bool, "Llama-4 checkpoints without attention biases only")
    text.refuse_if("num_experts_per_tok", lambda v: v != 1,
                   "top-1 routing only (the score scales the expert input)")
    layer_types = text.get("layer_types")
    # decoder_fields refuses every layer type but full attention: checked here instead.
    decoder = HFConfigReader({k: v for k, v in text.config.items() if k != "layer_types"},
                             hf.family)
    decoder.problems = hf.problems
    fields = {**decoder_fields(decoder), **rope_fields(text, ("default", "llama3"))}
    moe, nope = layer_patterns(text, fields["num_layers"])
    chunk = text.get("attention_chunk_size")
    if layer_types is not None:
        expected = ["chunked_attention" if chunk and not n else "full_attention" for n in nope]
        if list(layer_types) != expected:
            text.refuse("layer_types", layer_types, f"expected {expected} (chunked attention "
                        "on the RoPE layers when attention_chunk_size is set)")
    width = text.require("intermediate_size")
    fields.update(
        ffn_hidden_size=text.require("intermediate_size_mlp"),
        num_experts=text.require("num_local_experts"),
        moe_router_topk=1,
        moe_ffn_hidden_size=width,
        moe_shared_expert_intermediate_size=width,
        moe_router_score_function="sigmoid",
        moe_apply_probs_on_input=True,
        moe_router_norm_topk_prob=False,  # HFTopKRouter: the sigmoid of the top-1 logit as is
        moe_aux_loss_coeff=0.0,  # transformers' Llama4ForCausalLM adds no load-balancing loss
        # Every layer MoE (Scout): None, megatron-core's default, as for Qwen3-MoE; a list makes
        # megatron-core key each layer apart in torch_dist checkpoints (non-homogeneous layers).
        moe_layer_freq=None if all(moe) else moe,
        rotary_interleaved=True,
        nope_layers=nope if any(nope) else None,
        qk_l2_norm=bool(text.get("use_qk_norm")),
        attention_chunk_size=chunk or None,
        # Meta's released Scout config says 4 here, which transformers' strict config class
        # rejects; any true value switches tuning on.
        attn_temperature_floor_scale=(float(text.require("floor_scale"))
                                      if text.get("attn_temperature_tuning") else None),
        attn_temperature_scale=float(text.get("attn_scale")),
    )
    return fields


def layer_spec(model, layer: int, spec):
    """Layer ``layer``'s spec: NoPE layers get query temperature tuning and no qk norm; RoPE
    layers get chunked attention and the weightless qk norm (when the model has them)."""
    import dataclasses

    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mswift.models.attention import VarlenCoreAttention
    from mswift.models.norm import WeightlessRMSNorm

    nope = bool(model.nope_layers and model.nope_layers[layer])
    params = {}
    if nope and model.attn_temperature_floor_scale:
        params["temperature"] = (model.attn_temperature_floor_scale,
                                 model.attn_temperature_scale)
    if not nope and model.attention_chunk_size:
        params["chunk_size"] = model.attention_chunk_size
    attention = spec.submodules.self_attention
    core = attention.submodules.core_attention
    if params and not (isinstance(core, ModuleSpec) and core.module is VarlenCoreAttention):
        raise ValueError(f"attention_backend={model.attention_backend}: Llama-4's chunked "
                         "attention and temperature tuning need mswift's attention (torch, "
                         "triton or auto)")
    if params:
        core = dataclasses.replace(core, params={**core.params, **params})
    norm = WeightlessRMSNorm if model.qk_l2_norm and not nope else IdentityOp
    submodules = dataclasses.replace(attention.submodules, core_attention=core,
                                     q_layernorm=norm, k_layernorm=norm)
    attention = dataclasses.replace(attention, submodules=submodules)
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=attention))


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
_FF = _H + "feed_forward."
_SHARED = _L + "mlp.shared_experts."
_E = _L + "mlp.experts.local_experts.{expert}."
MLP_RULES = (
    Rule(_L + "mlp.linear_fc1.weight", (_FF + "gate_proj.weight", _FF + "up_proj.weight"),
         FUSED_GATE_UP, (("F", "H"), ("F", "H")), layers="dense", extra_state=True),
    Rule(_L + "mlp.linear_fc2.weight", (_FF + "down_proj.weight",), ROW_PARALLEL,
         (("H", "F"),), layers="dense", extra_state=True),
    Rule(_L + "mlp.router.weight", (_FF + "router.weight",), REPLICATED, (("E", "H"),),
         layers="moe"),
    # The shared expert is as wide as a routed one (intermediate_size) in every Llama-4.
    Rule(_SHARED + "linear_fc1.weight", (_FF + "shared_expert.gate_proj.weight",
                                         _FF + "shared_expert.up_proj.weight"),
         FUSED_GATE_UP, (("FE", "H"), ("FE", "H")), layers="moe", extra_state=True),
    Rule(_SHARED + "linear_fc2.weight", (_FF + "shared_expert.down_proj.weight",),
         ROW_PARALLEL, (("H", "FE"),), layers="moe", extra_state=True),
    # Routed experts: one stacked, input-major tensor per layer ([E, H, 2FE] and [E, FE, H]).
    Rule(_E + "linear_fc1.weight", (_FF + "experts.gate_up_proj[{expert}]",),
         INPUT_MAJOR_GATE_UP, (("H", "FE2"),), layers="moe", extra_state=True),
    Rule(_E + "linear_fc2.weight", (_FF + "experts.down_proj[{expert}]",),
         INPUT_MAJOR_ROW_PARALLEL, (("FE", "H"),), layers="moe", extra_state=True),
)

FAMILY = ModelFamily(
    name="llama4",
    model_types=("llama4_text", "llama4"),
    architectures=("Llama4ForCausalLM", "Llama4ForConditionalGeneration"),
    config_fields=config_fields,
    weight_rules=EMBEDDING_RULES + ATTENTION_RULES + MLP_RULES + OUTPUT_RULES,
    layer_spec=layer_spec,
    # The released checkpoints (Scout, Maverick): the text model under ``language_model.``
    # (``language_model.model.*``, ``language_model.lm_head.weight``), beside the vision tower
    # and its projector, which mswift does not train and carries through untouched. Key names
    # as transformers 5.25's Llama4ForConditionalGeneration saves and loads them (no renaming
    # on load), the same as in the released safetensors.
    hf_layouts={"Llama4ForConditionalGeneration": HFLayout(
        prefix="language_model.", carried=(r"vision_model\..+", r"multi_modal_projector\..+"))},
    # Every feature on at small sizes: chunks of 8 and floor_scale 4 are passed by a 40-token
    # sequence; layers 1, 3 MoE (Maverick-like step 2), layer 3 NoPE; 3 query heads per group.
    debug_config=dict(
        vocab_size=250, hidden_size=96, intermediate_size=48, intermediate_size_mlp=80,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_hidden_layers=4,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        no_rope_layer_interval=4, attention_chunk_size=8, attn_temperature_tuning=True,
        floor_scale=4, attn_scale=0.1, use_qk_norm=True, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 16},
    ),
)
