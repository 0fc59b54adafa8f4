"""What a model family is: HF config -> mswift model settings, a layer spec and a weight map.

Each family module (``llama.py``, ``qwen2.py``, ...) defines one :class:`ModelFamily` named
``FAMILY``, built from the helpers here: the config.json translations the Llama-style families
share (read with :class:`mswift.models.hf_config.HFConfigReader`, which collects every
unsupported feature, by name, to refuse them all at once) and the ``*_RULES`` tables, the
weight-map rows (:mod:`mswift.models.weight_map`) they share.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from mswift.models.hf_config import HFConfigReader
from mswift.models.weight_map import (
    FUSED_GATE_UP,
    FUSED_QKV,
    REPLICATED,
    ROW_PARALLEL,
    VOCAB_PARALLEL,
    Rule,
    WeightMap,
)


def rope_parameters(hf: HFConfigReader) -> dict:
    """RoPE settings in one form: transformers 5 ``rope_parameters`` or 4.x ``rope_theta`` +
    ``rope_scaling`` (``type`` or ``rope_type``)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def rope_fields(hf: HFConfigReader, allowed: tuple[str, ...]) -> dict:
    """ModelConfig RoPE fields; other rope types are refused by name."""
    params = rope_parameters(hf)
    kind = params["rope_type"]
    fields = {"rotary_base": float(params["rope_theta"]), "rope_scaling_type": None}
    if kind not in allowed:
        hf.refuse("rope_parameters.rope_type", kind, f"supported: {', '.join(allowed)}")
    elif kind == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
        for key in missing:
            hf.problems.append(f"rope_parameters.{key}: missing (rope_type llama3 needs it)")
        fields.update(
            rope_scaling_type="llama3",
            rope_scaling_factor=float(params.get("factor", 8.0)),
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(params.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))),
        )
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        hf.refuse("partial_rotary_factor", factor, "RoPE on the whole head only")
    return fields


def decoder_fields(hf: HFConfigReader, tie_default: bool = False) -> dict:
    """ModelConfig fields every Llama-style decoder shares (GQA, RMSNorm, SwiGLU, RoPE)."""
    hidden = hf.require("hidden_size")
    heads = hf.require("num_attention_heads")
    head_dim = hf.get("head_dim") or hidden // heads
    hf.refuse_if("hidden_act", lambda v: v != "silu", "SwiGLU MLPs use silu", "silu")
    hf.refuse_if("use_sliding_window", bool, "sliding-window attention")
    types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in types):
        hf.refuse("layer_types", sorted(set(types)), "only full_attention layers")
    return dict(
        num_layers=hf.require("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=hf.require("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads", heads),
        kv_channels=head_dim,
        vocab_size=hf.require("vocab_size"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        swiglu=True,
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", tie_default),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        # Switched on by the families that have them; listed so that filling a run's model
        # section from config.json leaves no earlier value of theirs behind.
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False, num_experts=None,
        moe_layer_freq=None, moe_router_pre_softmax=False, moe_router_topk_scaling_factor=None,
        moe_router_score_function="softmax", moe_shared_expert_intermediate_size=None,
        moe_apply_probs_on_input=False, rotary_interleaved=False, nope_layers=None,
        qk_l2_norm=False, attention_chunk_size=None, attn_temperature_floor_scale=None,
        multi_latent_attention=False, q_lora_rank=None, moe_router_num_groups=None,
        moe_router_group_topk=None, moe_router_enable_expert_bias=False,
    )


@dataclass(frozen=True)
class HFLayout:
    """Where one architecture's checkpoint keeps the text model."""

    prefix: str = ""  # before every HF name of the weight map
    # Regexes of the checkpoint's other tensors (a vision tower), which megatron does not hold:
    # conversions and exports carry them through byte for byte.
    carried: tuple[str, ...] = ()
    # Likewise, when the checkpoint has them (DeepSeek-V3's multi-token-prediction layers,
    # which checkpoints saved by transformers lack).
    carried_if_present: tuple[str, ...] = ()

    @property
    def all_carried(self) -> tuple[str, ...]:
        return self.carried + self.carried_if_present


@dataclass(frozen=True)
class ModelFamily:
    """One HF architecture family, as the registry and the bridge see it."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    architectures: tuple[str, ...]  # config.json "architectures" (the causal-LM classes)
    # config.json (as a reader) -> ModelConfig fields; refuses unsupported features by name.
    config_fields: Callable[[HFConfigReader], dict]
    weight_rules: tuple[Rule, ...]
    # A tiny HF config (transformers kwargs) of this family, for tests and examples: every
    # feature the bridge maps (GQA, biases, tying, qk-norm, rope scaling, experts) switched on.
    debug_config: dict = field(default_factory=dict)
    # HF tensors that hold no weights and are dropped (e.g. old checkpoints' rotary inv_freq).
    ignored_tensors: tuple[str, ...] = ()
    # The spec of one layer, as megatron-core's get_gpt_decoder_block_spec builds layer specs
    # from a pattern: (ModelConfig, model-wide layer number from 0, the spec megatron-core built
    # for that layer, with mswift's modules) -> that layer's spec. None: megatron-core's spec
    # for every layer (MoE or dense by moe_layer_freq; qk-norm and biases by the config).
    layer_spec: Callable[[Any, int, Any], Any] | None = None
    # Whether megatron-core's TopKRouter chooses the experts and weights of transformers' router
    # for this family. True: its MoE layers keep megatron-core's router with
    # moe_routing_backend=torch and take mswift.models.router.HFTopKRouter (on mswift's routing
    # kernel) with triton. False: HFTopKRouter always, on the resolved backend (triton, or its
    # torch reference).
    mcore_router_exact: bool = True
    # Architectures whose checkpoints hold more than the text model, by name (the others keep
    # it at the top level, alone).
    hf_layouts: dict[str, HFLayout] = field(default_factory=dict)
    # (config.json, MTP modules trained: ModelConfig.mtp_num_layers or 0) -> regexes of tensors
    # carried when present (HFLayout.carried_if_present).
    carried_if_present: Callable[[dict, int], tuple[str, ...]] | None = None

    def hf_layout(self, config: dict, mtp_layers: int = 0) -> HFLayout:
        """The checkpoint layout of config.json's ``architectures``, for a model that trains
        ``mtp_layers`` multi-token-prediction modules."""
        layout = HFLayout()
        for arch in config.get("architectures") or []:
            if arch in self.hf_layouts:
                layout = self.hf_layouts[arch]
                break
        if self.carried_if_present is None:
            return layout
        return replace(layout, carried_if_present=layout.carried_if_present
                                   + self.carried_if_present(config, mtp_layers))

    def weight_map(self, config: dict, dims) -> WeightMap:
        """The weight map of a checkpoint with this config.json, for a model of ``dims``."""
        return WeightMap(self.weight_rules, dims, self.hf_layout(config).prefix)

    def block_spec(self, config, model, vp_stage: int | None = None,
                   attention_backend: str = "auto", transformer_impl: str = "auto",
                   moe_routing_backend: str = "torch"):
        """The layers of this pipeline stage (and virtual stage) plus the final norm, each
        layer's spec from :attr:`layer_spec`, MoE layers with the router
        :attr:`mcore_router_exact` and ``moe_routing_backend`` (resolved: ``torch`` or
        ``triton``) call for, or ``seq_aux_loss`` (HFTopKRouter: per packed sample).
        ``config``: the TransformerConfig; ``model``: the ModelConfig. (Imported here: offline
        conversions never load megatron-core.)"""
        from mswift.models.spec import gpt_block_spec

        router = None
        # (megatron-core's router takes a packed row as one sequence for seq_aux_loss)
        if config.num_moe_experts and (moe_routing_backend == "triton"
                                       or not self.mcore_router_exact
                                       or model.moe_router_load_balancing_type == "seq_aux_loss"):
            from mswift.models.router import router_builder, with_router

            router = router_builder(normalize=model.moe_router_norm_topk_prob,
                                    backend=moe_routing_backend)
        per_layer = None
        if self.layer_spec is not None or router is not None:
            def per_layer(layer, spec):
                if self.layer_spec is not None:
                    spec = self.layer_spec(model, layer, spec)
                return with_router(spec, router) if router is not None else spec
        return gpt_block_spec(config, vp_stage=vp_stage, attention_backend=attention_backend,
                              layer_spec=per_layer, transformer_impl=transformer_impl)

    def model_config_fields(self, config: dict) -> dict:
        hf = HFConfigReader(config, self.name)
        fields = {**self.config_fields(hf), "family": self.name}
        hf.raise_problems()
        return fields


# -- weight-map rows shared by the Llama-style families (HF names of LlamaForCausalLM) ---------

_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

EMBEDDING_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB_PARALLEL,
         (("V", "H"),)),
)
ATTENTION_RULES = (
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), REPLICATED,
         (("H",),)),
    Rule(_L + "self_attention.linear_qkv.weight",
         tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"), FUSED_QKV,
         (("Q", "H"), ("KV", "H"), ("KV", "H")), extra_state=True),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",),
         ROW_PARALLEL, (("H", "Q"),), extra_state=True),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), REPLICATED,
         (("H",),)),
)
QKV_BIAS_RULES = (
    Rule(_L + "self_attention.linear_qkv.bias",
         tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"), FUSED_QKV,
         (("Q",), ("KV",), ("KV",))),
)
QK_NORM_RULES = (
    Rule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
         REPLICATED, (("D",),)),
    Rule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
         REPLICATED, (("D",),)),
)
DENSE_MLP_RULES = (
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
         FUSED_GATE_UP, (("F", "H"), ("F", "H")), layers="dense", extra_state=True),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), ROW_PARALLEL,
         (("H", "F"),), layers="dense", extra_state=True),
)
_E = _L + "mlp.experts.local_experts.{expert}."
_HE = _H + "mlp.experts.{expert}."
MOE_MLP_RULES = (  # Qwen-MoE names: router `mlp.gate`, per-expert gate/up/down keys
    Rule(_L + "mlp.router.weight", (_H + "mlp.gate.weight",), REPLICATED, (("E", "H"),),
         layers="moe"),
    Rule(_E + "linear_fc1.weight", (_HE + "gate_proj.weight", _HE + "up_proj.weight"),
         FUSED_GATE_UP, (("FE", "H"), ("FE", "H")), layers="moe", extra_state=True),
    Rule(_E + "linear_fc2.weight", (_HE + "down_proj.weight",), ROW_PARALLEL, (("H", "FE"),),
         layers="moe", extra_state=True),
)
OUTPUT_RULES = (
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, (("H",),)),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB_PARALLEL, (("V", "H"),),
         when="untied", extra_state=True),
    # Tied: the last pipeline stage keeps its own copy of the embedding as the output layer.
    Rule("output_layer.weight", ("model.embed_tokens.weight",), VOCAB_PARALLEL, (("V", "H"),),
         when="tied", to_hf=False, extra_state=True),
)
# Buffers some older HF checkpoints saved; they are recomputed, not weights.
ROTARY_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
