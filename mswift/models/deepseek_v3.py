"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; V3-0324 and the same architecture at other sizes).

What differs from Llama-3, and where mswift does it:
- Multi-latent attention (megatron-core's ``MLASelfAttention`` on ``MLATransformerConfig``,
  :func:`mswift.models.build.mla_fields`): q through a ``q_lora_rank`` latent (or one
  ``q_proj`` when ``q_lora_rank`` is null), k/v through a ``kv_lora_rank`` latent; heads of
  ``qk_nope_head_dim`` + ``qk_rope_head_dim`` (the RoPE part of k shared by all heads) and
  values of ``v_head_dim``, run by mswift's varlen core attention (different q/k and v dims,
  packed sequences). HF rotates interleaved pairs (``rope_interleave``); megatron-core's MLA
  de-interleaves the same way, so no weight is permuted.
- YaRN: megatron-core's MLA RoPE with the model's factor, betas and mscales; the softmax scale
  ``qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2`` is megatron-core's as well.
- The first ``first_k_dense_replace`` layers are dense (``intermediate_size``); the others MoE
  with ``n_routed_experts`` of ``moe_intermediate_size`` plus a shared expert
  ``n_shared_experts * moe_intermediate_size`` wide.
- Router (:class:`mswift.models.router.HFTopKRouter` in every MoE layer whatever
  ``moe_routing_backend`` says, since megatron-core's differs: ``mcore_router_exact=False``):
  sigmoid scores, ``e_score_correction_bias`` (megatron-core's ``expert_bias``) added for the
  choice only, groups scored by their top-2 biased scores (``n_group``, ``topk_group``), weights
  from the unbiased scores, renormalised when ``norm_topk_prob``, times
  ``routed_scaling_factor``.
- Balancing: the expert bias moves after each step (``moe_router_bias_update_rate``); a
  balancing loss only when asked (``moe_aux_loss_coeff``, default 0: transformers'
  ``DeepseekV3ForCausalLM`` adds none), e.g. the paper's sequence-wise one
  (``moe_router_load_balancing_type=seq_aux_loss``, each packed sample a sequence:
  :meth:`mswift.models.router.HFTopKRouter._apply_sample_aux_loss`).

Multi-token prediction: the release's MTP modules (``model.layers.{num_hidden_layers + i}.*``,
``num_nextn_predict_layers`` of them) are megatron-core's MTP block (``mtp.layers.{i}.*``) when
the model trains them (``mtp_num_layers``, :data:`MTP_RULES`), else carried through every
conversion byte for byte (:func:`mtp_tensors`), never dropped. As DeepSeek's reference
(vLLM / SGLang's DeepSeek MTP, which run the released weights) and megatron-core both compute
it: ``eh_proj([enorm(embedding of token i+1); hnorm(h_i)])`` with ``h_i`` the main model's
final-normed hidden state, the decoder layer, ``shared_head.norm`` (megatron-core's MTP
``final_layernorm``), then the output layer. The release stores the module's ``embed_tokens``
and ``shared_head.head`` as copies of the main model's, which megatron-core shares: a load
refuses a checkpoint whose copies differ from ``model.embed_tokens`` / ``lm_head``, and an
export writes them from those (``Rule.copies``), so HF -> mcore -> HF gives them back bit for
bit and a trained model's copies follow its embedding and head.

Quantized sources: the released FP8 checkpoint (``weight_scale_inv`` 128 x 128 blocks; router,
norms, embeddings, head and the MTP layer's ``eh_proj`` / copies kept in bf16) and AWQ GEMM
ones are read by :mod:`mswift.bridge.quantized`, which dequantizes each slice as it is read
(the 576-row ``kv_a_proj_with_mqa``'s ragged last block included) and refuses other methods by
name; an FP8 model is written back as FP8.
"""
from __future__ import annotations

from dataclasses import replace

from mswift.models.family import (
    DENSE_MLP_RULES,
    EMBEDDING_RULES,
    MOE_MLP_RULES,
    OUTPUT_RULES,
    ModelFamily,
    decoder_fields,
    rope_parameters,
)
from mswift.models.hf_config import HFConfigReader
from mswift.models.weight_map import (
    COLUMN_PARALLEL,
    FUSED_GATE_UP,
    REPLICATED,
    ROW_PARALLEL,
    Rule,
)

# HF DeepseekV3RMSNorm's default, which the q / kv latent norms keep whatever rms_norm_eps is;
# megatron-core builds them with the model's epsilon.
LATENT_NORM_EPS = 1e-6


def yarn_fields(hf: HFConfigReader) -> dict:
    """ModelConfig RoPE fields (plain or YaRN), as transformers computes DeepSeek-V3's."""
    params = rope_parameters(hf)
    kind = params["rope_type"]
    fields = {"rotary_base": float(params["rope_theta"]), "rope_scaling_type": None}
    if kind not in ("default", "yarn"):
        hf.refuse("rope_parameters.rope_type", kind, "supported: default, yarn")
        return fields
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        hf.refuse("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"],
                  "RoPE on the whole qk_rope_head_dim only")
    if kind == "default":
        return fields
    original = params.get("original_max_position_embeddings")
    if not original:
        hf.problems.append("rope_parameters.original_max_position_embeddings: missing (YaRN "
                           "needs it)")
        original = 1
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if params.get("attention_factor") is not None:
        hf.refuse("rope_parameters.attention_factor", params["attention_factor"],
                  "derived from factor, mscale and mscale_all_dim only")
    if params.get("truncate", True) is not True:
        hf.refuse("rope_parameters.truncate", params["truncate"], "megatron-core's YaRN "
                  "rounds the correction range")
    if mscale_all_dim and not mscale:
        hf.refuse("rope_parameters.mscale", mscale, "needs a nonzero mscale when "
                  "mscale_all_dim is set")
    both = bool(mscale and mscale_all_dim)
    fields.update(
        rope_scaling_type="yarn",
        rope_scaling_factor=float(factor),
        rope_original_max_position_embeddings=int(original),
        yarn_beta_fast=float(params.get("beta_fast") or 32.0),
        yarn_beta_slow=float(params.get("beta_slow") or 1.0),
        # transformers: cos/sin scaled by mscale(f, mscale) / mscale(f, mscale_all_dim) when
        # both are set, else by mscale(f, 1); megatron-core always takes the ratio.
        yarn_mscale=float(mscale) if both else 1.0,
        yarn_mscale_all_dim=float(mscale_all_dim) if mscale_all_dim else 0.0,
    )
    return fields


def config_fields(hf: HFConfigReader) -> dict:
    hf.refuse_if("attention_bias", bool, "MLA projections without biases only")
    hf.refuse_if("rope_interleave", lambda v: v is False, "interleaved RoPE pairs only (as the "
                 "released checkpoints)", default=True)
    hf.refuse_if("rms_norm_eps", lambda v: v != LATENT_NORM_EPS, "the q/kv latent norms use "
                 f"{LATENT_NORM_EPS} in transformers and rms_norm_eps in megatron-core",
                 default=LATENT_NORM_EPS)
    hf.refuse_if("scoring_func", lambda v: v not in (None, "sigmoid"), "sigmoid scores only")
    hf.refuse_if("topk_method", lambda v: v not in (None, "noaux_tc"), "noaux_tc only")
    hf.refuse_if("moe_layer_freq", lambda v: v not in (None, 1), "every layer past "
                 "first_k_dense_replace is MoE (as in transformers)")
    fields = {**decoder_fields(hf), **yarn_fields(hf)}
    nope, rope = hf.require("qk_nope_head_dim"), hf.require("qk_rope_head_dim")
    layers = fields["num_layers"]
    dense = hf.get("first_k_dense_replace", 0)
    if not isinstance(dense, int) or not 0 <= dense < layers:
        hf.refuse("first_k_dense_replace", dense, f"expected 0..{layers - 1}")
        dense = 0
    groups, group_topk = hf.get("n_group", 1), hf.get("topk_group", 1)
    expert_width = hf.require("moe_intermediate_size")
    shared = hf.get("n_shared_experts", 0)
    fields.update(
        multi_latent_attention=True,
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf.require("kv_lora_rank"),
        qk_head_dim=nope,
        qk_pos_emb_head_dim=rope,
        v_head_dim=hf.require("v_head_dim"),
        kv_channels=nope + rope,
        num_query_groups=None,
        qk_layernorm=True,  # megatron-core builds the q / kv latent norms only then
        num_experts=hf.require("n_routed_experts"),
        moe_router_topk=hf.require("num_experts_per_tok"),
        moe_ffn_hidden_size=expert_width,
        moe_shared_expert_intermediate_size=expert_width * shared if shared else None,
        moe_router_score_function="sigmoid",
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=group_topk if groups > 1 else None,
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        moe_router_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layer_freq=[0] * dense + [1] * (layers - dense),
    )
    return fields


def mtp_tensors(config: dict, trained: int) -> tuple[str, ...]:
    """Regexes of the tensors of the MTP layers the model does not train: the layers after the
    last decoder layer, past the ``trained`` first ones."""
    first = config.get("num_hidden_layers", 0)
    return tuple(rf"model\.layers\.{n}\..+" for n in range(
        first + trained, first + (config.get("num_nextn_predict_layers") or 0)))


_L = "decoder.layers.{layer}."
_A = _L + "self_attention."
_H = "model.layers.{layer}."
_HA = _H + "self_attn."
_SHARED = _L + "mlp.shared_experts."
_HS = _H + "mlp.shared_experts."
# MLA projections as megatron-core's local spec builds them: every linear column-parallel
# (the down projections' outputs are gathered again), the latent norms whole on every rank.
LAYER_RULES = (
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), REPLICATED,
         (("H",),)),
    Rule(_A + "linear_q_down_proj.weight", (_HA + "q_a_proj.weight",), COLUMN_PARALLEL,
         (("QL", "H"),), when="q_lora", extra_state=True),
    Rule(_A + "q_layernorm.weight", (_HA + "q_a_layernorm.weight",), REPLICATED, (("QL",),),
         when="q_lora"),
    Rule(_A + "linear_q_up_proj.weight", (_HA + "q_b_proj.weight",), COLUMN_PARALLEL,
         (("QH", "QL"),), when="q_lora", extra_state=True),
    Rule(_A + "linear_q_proj.weight", (_HA + "q_proj.weight",), COLUMN_PARALLEL,
         (("QH", "H"),), when="no_q_lora", extra_state=True),
    Rule(_A + "linear_kv_down_proj.weight", (_HA + "kv_a_proj_with_mqa.weight",),
         COLUMN_PARALLEL, (("KVA", "H"),), extra_state=True),
    Rule(_A + "kv_layernorm.weight", (_HA + "kv_a_layernorm.weight",), REPLICATED,
         (("KVL",),)),
    Rule(_A + "linear_kv_up_proj.weight", (_HA + "kv_b_proj.weight",), COLUMN_PARALLEL,
         (("KVB", "KVL"),), extra_state=True),
    Rule(_A + "linear_proj.weight", (_HA + "o_proj.weight",), ROW_PARALLEL, (("H", "VO"),),
         extra_state=True),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), REPLICATED,
         (("H",),)),
    Rule(_L + "mlp.router.expert_bias", (_H + "mlp.gate.e_score_correction_bias",), REPLICATED,
         (("E",),), layers="moe", fp32=True),
    Rule(_SHARED + "linear_fc1.weight", (_HS + "gate_proj.weight", _HS + "up_proj.weight"),
         FUSED_GATE_UP, (("FS", "H"), ("FS", "H")), layers="moe", extra_state=True),
    Rule(_SHARED + "linear_fc2.weight", (_HS + "down_proj.weight",), ROW_PARALLEL,
         (("H", "FS"),), layers="moe", extra_state=True),
)

# The MTP modules: each one's decoder layer as the decoder's (megatron-core's
# ``mtp.layers.{mtp}.transformer_layer.*``, HF's layer num_hidden_layers + mtp), its norms and
# projection, and the copies the release keeps of the embedding and the output layer.
_M = "mtp.layers.{mtp}."
MTP_RULES = tuple(replace(r, mcore=r.mcore.replace(_L, _M + "transformer_layer."))
                  for r in LAYER_RULES + DENSE_MLP_RULES + MOE_MLP_RULES) + (
    Rule(_M + "enorm.weight", (_H + "enorm.weight",), REPLICATED, (("H",),)),
    Rule(_M + "hnorm.weight", (_H + "hnorm.weight",), REPLICATED, (("H",),)),
    Rule(_M + "eh_proj.weight", (_H + "eh_proj.weight",), COLUMN_PARALLEL, (("H", "H2"),),
         extra_state=True),
    Rule(_M + "final_layernorm.weight", (_H + "shared_head.norm.weight",), REPLICATED,
         (("H",),)),
)
_MTP_COPIES = {"model.embed_tokens.weight": ("model.layers.{mtp_layer}.embed_tokens.weight",),
               "lm_head.weight": ("model.layers.{mtp_layer}.shared_head.head.weight",)}
SHARED_RULES = tuple(replace(r, copies=_MTP_COPIES.get(r.hf[0], ()) if r.to_hf else ())
                     for r in EMBEDDING_RULES + OUTPUT_RULES)

FAMILY = ModelFamily(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    architectures=("DeepseekV3ForCausalLM",),
    config_fields=config_fields,
    weight_rules=SHARED_RULES + LAYER_RULES + DENSE_MLP_RULES + MOE_MLP_RULES + MTP_RULES,
    mcore_router_exact=False,
    carried_if_present=mtp_tensors,
    # Every feature on at small sizes: q LoRA, YaRN (factor 4 over 16 original positions, so a
    # 40-token sequence runs past it), layer 0 dense and 3 MoE layers (PP2 splits 4 evenly),
    # 8 experts in 4 groups with top-3 of the best 2 groups (megatron-core's group score would
    # sum the top 3 / 2 = 1 per group), a shared expert, 6 heads, a vocabulary of 250 (padded
    # to 256).
    debug_config=dict(
        vocab_size=250, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, rms_norm_eps=1e-6, max_position_embeddings=64,
        tie_word_embeddings=False, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
)
