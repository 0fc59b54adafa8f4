"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 attention (qk norm) with routed experts, no shared
expert. Router: softmax over all experts, top-k, renormalised over the k when
``norm_topk_prob`` (megatron: top-k of the logits then softmax, ``moe_router_pre_softmax=False``);
otherwise not renormalised (``moe_router_pre_softmax=True``); the same choice as megatron-core's
``TopKRouter``, kept with ``moe_routing_backend=torch``, and on mswift's routing kernel
(:class:`mswift.models.router.HFTopKRouter`) with ``triton``. Experts are per-expert keys on disk.
Dense layers (``mlp_only_layers``, ``decoder_sparse_step``) become ``moe_layer_freq`` zeros."""
from __future__ import annotations

from mswift.models.family import (
    ATTENTION_RULES,
    DENSE_MLP_RULES,
    EMBEDDING_RULES,
    MOE_MLP_RULES,
    OUTPUT_RULES,
    QK_NORM_RULES,
    ModelFamily,
    decoder_fields,
    rope_fields,
)
from mswift.models.hf_config import HFConfigReader


def moe_layer_pattern(hf: HFConfigReader, num_layers: int) -> list[int]:
    """1 = MoE layer, 0 = dense MLP, as transformers' Qwen3MoeDecoderLayer decides."""
    step = hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers", []))
    return [0 if i in dense or (i + 1) % step else 1 for i in range(num_layers)]


def config_fields(hf: HFConfigReader) -> dict:
    hf.refuse_if("attention_bias", bool, "Qwen3-MoE checkpoints without attention biases only")
    hf.refuse_if("shared_expert_intermediate_size", bool, "no shared expert (Qwen2-MoE has one)")
    fields = {**decoder_fields(hf), **rope_fields(hf, ("default",)), "qk_layernorm": True}
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not isinstance(experts, int) or experts < 1:
        hf.problems.append(f"num_experts={experts!r}: expected a positive integer")
        experts = 1
    pattern = moe_layer_pattern(hf, fields["num_layers"])
    fields.update(
        num_experts=experts,
        moe_router_topk=hf.require("num_experts_per_tok"),
        moe_ffn_hidden_size=hf.require("moe_intermediate_size"),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        moe_router_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),  # HFTopKRouter's
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
        moe_layer_freq=None if all(pattern) else pattern,
    )
    return fields


FAMILY = ModelFamily(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    config_fields=config_fields,
    weight_rules=EMBEDDING_RULES + ATTENTION_RULES + QK_NORM_RULES + MOE_MLP_RULES
    + DENSE_MLP_RULES + OUTPUT_RULES,
    debug_config=dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        num_hidden_layers=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False,
    ),
)
