"""Build megatron-core GPT model chunks from mswift's config (the model's shape + the layout).

The model is built for the current rank's place in the layout: its pipeline stage (and virtual
stages), its tensor-parallel slice and its experts. Parallel state must be initialised first
(:func:`mswift.runtime.init_distributed`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from mswift.config.schema import MswiftConfig
from mswift.models.impl import layer_choice, resolve_kernel_backend
from mswift.models.kernel_modules import (
    KernelLossGPTModel,
    check_activations,
    uses_fused_swiglu,
    with_kernels,
)
from mswift.models.moe_dispatch import use_kernel_dispatchers
from mswift.models.registry import family_named
from mswift.models.rope import apply_rope_scaling
from mswift.models.router import with_sample_bounds
from mswift.models.sizes import default_ffn_hidden_size, padded_vocab_size  # noqa: F401
from mswift.models.spec import gpt_block_spec, mtp_block_spec
from mswift.models.vocab_padding import mask_padded_vocabulary
from mswift.runtime.device import cuda_available, local_device


def params_dtype(cfg: MswiftConfig) -> torch.dtype:
    if cfg.training.bf16:
        return torch.bfloat16
    if cfg.training.fp16:
        return torch.float16
    return torch.float32


def transformer_config(cfg: MswiftConfig) -> TransformerConfig:
    """megatron-core's TransformerConfig for ``cfg`` (validated by megatron-core itself)."""
    m, par = cfg.model, cfg.parallel
    dtype = params_dtype(cfg)
    ffn = m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.swiglu)
    moe = {}
    if m.num_experts is not None:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or ffn,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_pre_softmax=m.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
            # All MoE as 1, never a list of ones: a list makes megatron-core key each layer's
            # experts apart in torch_dist, so byte-copied checkpoints would not load.
            moe_layer_freq=1 if m.moe_layer_freq is None or all(m.moe_layer_freq)
            else list(m.moe_layer_freq),
            moe_grouped_gemm=m.moe_grouped_gemm,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_apply_probs_on_input=m.moe_apply_probs_on_input,
            moe_router_num_groups=m.moe_router_num_groups,
            moe_router_group_topk=m.moe_router_group_topk,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        )
    config_class, mla = TransformerConfig, {}
    if m.multi_latent_attention:
        config_class, mla = MLATransformerConfig, mla_fields(m)
    return config_class(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=ffn,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        # The MLPs apply the activation module of their spec (mswift's fused SwiGLU) to
        # linear_fc1's whole output (mswift.models.kernel_modules).
        use_te_activation_func=uses_fused_swiglu(m.swiglu,
                                                 resolve_kernel_backend(m.fused_kernels)),
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        rotary_interleaved=m.rotary_interleaved,
        no_rope_freq=list(m.nope_layers) if m.nope_layers is not None else None,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=par.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=par.decoder_last_pipeline_num_layers,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.training.bf16,
        fp16=cfg.training.fp16,
        # FP8 GEMMs inside Transformer Engine's layers (refused on the local spec by
        # gpt_block_spec); megatron-core wraps each layer's forward in TE's fp8 autocast.
        fp8=cfg.training.fp8,
        fp8_recipe=cfg.training.fp8_recipe,
        **recompute_settings(cfg),
        # With CUDA, megatron-core's GPU initialisation (Megatron-LM's default): each rank
        # creates and draws its own slices on its device, from the model-parallel RNG streams,
        # so a random start differs between tensor-parallel sizes (a start from HF weights or a
        # checkpoint does not). Without CUDA, each weight is drawn whole on the CPU and this
        # rank keeps its slice: TP-invariant, and the only choice on the CPU layer.
        use_cpu_initialization=not cuda_available(),
        # Loss is a sum over tokens; gradients are divided by the global token count.
        calculate_per_token_loss=True,
        mtp_num_layers=m.mtp_num_layers,
        mtp_loss_scaling_factor=m.mtp_loss_scaling_factor,
        **moe,
        **mla,
    )


def mla_fields(m) -> dict:
    """MLATransformerConfig's own fields for ``m`` (a ModelConfig with multi-latent attention).

    megatron-core's MLA layers build their own RoPE (``rope``, or ``yarn`` with the model's
    numbers) and take the softmax scale ``mscale(rotary_scaling_factor, mscale_all_dim)^2 /
    sqrt(q/k head dim)``: without YaRN the factor must be 1 so that the scale is plain.
    """
    yarn = m.rope_scaling_type == "yarn"
    return dict(
        q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank,
        qk_head_dim=m.qk_head_dim,
        qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
        v_head_dim=m.v_head_dim,
        rope_type="yarn" if yarn else "rope",
        rotary_base=m.rotary_base,
        rotary_scaling_factor=m.rope_scaling_factor if yarn else 1.0,
        original_max_position_embeddings=m.rope_original_max_position_embeddings,
        beta_fast=m.yarn_beta_fast,
        beta_slow=m.yarn_beta_slow,
        mscale=m.yarn_mscale,
        mscale_all_dim=m.yarn_mscale_all_dim if yarn else 0.0,
    )


def recompute_settings(cfg: MswiftConfig) -> dict:
    """TransformerConfig's activation-recompute fields from the training section (checked
    there and in mswift.runtime.layout_checks). Full recompute wraps each group of layers in
    megatron-core's tensor_parallel.checkpoint, selective the chosen submodules; both restore
    the RNG states (CPU layer: the CPU generator) before the forward runs again."""
    tr = cfg.training
    if tr.recompute_granularity is None:
        return {}
    settings = dict(recompute_granularity=tr.recompute_granularity,
                    recompute_method=tr.recompute_method,
                    recompute_num_layers=tr.recompute_num_layers)
    if tr.recompute_modules is not None:
        settings["recompute_modules"] = list(tr.recompute_modules)
    return settings


def build_model(cfg: MswiftConfig, config: TransformerConfig | None = None) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving)."""
    config = config or transformer_config(cfg)
    m = cfg.model
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by,
                              cfg.parallel.tensor_model_parallel_size)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    family = family_named(m.family) if m.family is not None else None
    impl, backend = layer_choice(m, cfg.training)
    moe_kernels = resolve_kernel_backend(m.moe_routing_backend)
    fused = resolve_kernel_backend(m.fused_kernels)
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        if family is not None:
            spec = family.block_spec(config, m, vp_stage=vp_stage, attention_backend=backend,
                                     transformer_impl=impl, moe_routing_backend=moe_kernels)
        else:
            spec = gpt_block_spec(config, vp_stage=vp_stage, attention_backend=backend,
                                  transformer_impl=impl)
        spec = with_kernels(spec, config, fused)
        mtp = None
        if m.mtp_num_layers:
            mtp = mtp_block_spec(config, spec, impl, vp_stage)
            mtp = with_kernels(mtp, config, fused) if mtp is not None else None
        chunk = (KernelLossGPTModel if fused == "triton" else GPTModel)(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                              vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                              vp_stage=vp_stage),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
            rotary_base=m.rotary_base,
            vp_stage=vp_stage,
            mtp_block_spec=mtp,
        )
        if fused == "triton":
            chunk.real_vocab_size, chunk.loss_backend = m.vocab_size, fused
        if config.use_te_activation_func:
            check_activations(chunk)
        if moe_kernels == "triton":
            use_kernel_dispatchers(chunk, moe_kernels)
        with_sample_bounds(chunk)  # packed samples for HFTopKRouter's sequence-wise loss
        if m.rope_scaling_type == "llama3":
            apply_rope_scaling(chunk.rotary_pos_emb, m)
        # Padded vocabulary rows: zero, and never in a softmax (loss, eval, sampling).
        mask_padded_vocabulary(chunk, m.vocab_size, vocab,
                               parallel_state.get_tensor_model_parallel_rank(),
                               cfg.parallel.tensor_model_parallel_size)
        # Modules of mswift's own (norms) are created on the CPU; megatron-core's are already on
        # the device. megatron-core's rotary frequencies are not a buffer and stay where GPU
        # initialisation put them. A build under ``torch.device("meta")`` (mswift plan) stays
        # there: meta tensors have no data to move.
        if torch.get_default_device().type != "meta":
            chunk = chunk.to(local_device())
        chunks.append(chunk)
    return chunks
