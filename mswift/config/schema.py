"""mswift's settings: one keyword-only dataclass per section, Megatron-LM's names where one exists.

Every field is documented where it is defined; ``choices`` in a field's metadata lists the values
it accepts. Each section validates itself in ``__post_init__`` and reports every problem at once
(:class:`ConfigError`), so a user fixes all of them in one go.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional


class ConfigError(ValueError):
    """A setting a user got wrong. The message names each offending key and what it expects."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


# megatron-core 0.16.1's selective recompute modules that mswift's layers have.
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "shared_experts", "layernorm", "mla_up_proj")
# The rest of megatron-core's list, and why mswift refuses them.
NOT_RECOMPUTED = {
    "moe_act": "needs megatron-core's grouped-GEMM experts; not offered yet (moe_grouped_gemm "
               "experts are not tested with it)",
}


def choice(default, choices, doc=""):
    return field(default=default, metadata={"choices": tuple(choices), "doc": doc})


def _check_section(section) -> list[str]:
    """Problems common to every section: choices, and numbers that must be positive."""
    problems = []
    for f in fields(section):
        value = getattr(section, f.name)
        allowed = f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            problems.append(f"{f.name}={value!r}: expected one of {', '.join(map(str, allowed))}")
        if f.metadata.get("positive") and value is not None and value <= 0:
            problems.append(f"{f.name}={value!r}: expected a positive number")
    return problems


def positive(default, doc=""):
    return field(default=default, metadata={"positive": True, "doc": doc})


def field_doc(f) -> str:
    """The one-line description of a settings field (every field has one)."""
    return f.metadata.get("doc", "")


def setting(default, doc, factory=None):
    """A field with its one-line description (``--list-settings`` prints it)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


class _Section:
    def __post_init__(self):
        problems = _check_section(self) + self.extra_problems()
        if problems:
            raise ConfigError(problems)

    def extra_problems(self) -> list[str]:
        return []


@dataclass(kw_only=True)
class ModelConfig(_Section):
    """The transformer's shape (a GPT-style decoder built by megatron-core)."""

    # HF model directory (config.json + safetensors) to start from: its config.json fills the
    # fields below (mswift.models.registry.apply_hf_model) and its weights are loaded into the
    # sharded model (mswift.bridge.load_hf_into_model).
    hf_model: Optional[str] = setting(None, "HF model folder to start from (config + weights)")
    num_layers: int = positive(2, "transformer layers")
    hidden_size: int = positive(64, "model width H")
    ffn_hidden_size: Optional[int] = setting(
        None, "dense MLP width; default 4*H (or 8/3*H rounded for swiglu)")
    num_attention_heads: int = positive(4, "query heads")
    num_query_groups: Optional[int] = setting(
        None, "key/value heads (GQA); None = one per query head")
    kv_channels: Optional[int] = setting(
        None, "head dim; None = hidden_size / num_attention_heads")
    vocab_size: int = positive(256, "tokenizer vocabulary (padded for TP by the model builder)")
    make_vocab_size_divisible_by: int = positive(
        128, "pad the vocabulary to a multiple of this x TP")
    max_position_embeddings: int = positive(4096, "longest sequence the position encoding covers")
    normalization: str = choice("RMSNorm", ("RMSNorm", "LayerNorm"), "normalization layer")
    norm_epsilon: float = positive(1e-5, "epsilon of the normalization layers")
    swiglu: bool = setting(True, "gated SiLU MLP (Llama/Qwen); False = GELU MLP")
    position_embedding_type: str = choice("rope", ("rope", "learned_absolute", "none"),
                                         "how positions are encoded")
    rotary_base: float = positive(10000.0, "RoPE theta")
    # RoPE frequency scaling; None = plain RoPE. "llama3" = Llama-3.1's smooth low/high-frequency
    # interpolation, with the four rope_* numbers below (HF rope_parameters of the same names).
    # "yarn" = YaRN (DeepSeek-V3; multi-latent attention only): rope_scaling_factor and
    # rope_original_max_position_embeddings with the yarn_* numbers below.
    rope_scaling_type: Optional[str] = choice(None, (None, "llama3", "yarn"),
                                           "RoPE frequency scaling; None = plain RoPE")
    rope_scaling_factor: float = positive(8.0, "llama3: factor")
    rope_low_freq_factor: float = positive(1.0, "llama3: low_freq_factor")
    rope_high_freq_factor: float = positive(4.0, "llama3: high_freq_factor")
    rope_original_max_position_embeddings: int = positive(
        8192, "llama3: original_max_position_embeddings (context length before scaling)")
    # YaRN (HF rope_parameters beta_fast, beta_slow, mscale, mscale_all_dim): the cos/sin are
    # scaled by mscale(factor, yarn_mscale) / mscale(factor, yarn_mscale_all_dim) and the softmax
    # scale by mscale(factor, yarn_mscale_all_dim)^2, as DeepSeek-V3 does.
    yarn_beta_fast: float = positive(32.0, "yarn: beta_fast (extrapolation boundary)")
    yarn_beta_slow: float = positive(1.0, "yarn: beta_slow (interpolation boundary)")
    yarn_mscale: float = setting(1.0, "yarn: mscale")
    yarn_mscale_all_dim: float = setting(0.0, "yarn: mscale_all_dim")
    # Multi-latent attention (DeepSeek-V2/V3; megatron-core's MLATransformerConfig): q and kv
    # pass through low-rank latents; heads have qk_head_dim dims without RoPE plus
    # qk_pos_emb_head_dim with it (shared by all heads in k), values v_head_dim.
    multi_latent_attention: bool = setting(False, "multi-latent attention (DeepSeek-V3)")
    q_lora_rank: Optional[int] = setting(None, "MLA: query latent width; None = no q latent")
    kv_lora_rank: int = positive(512, "MLA: key/value latent width")
    qk_head_dim: int = positive(128, "MLA: q/k head dims without RoPE (HF qk_nope_head_dim)")
    qk_pos_emb_head_dim: int = positive(64, "MLA: q/k head dims with RoPE (HF qk_rope_head_dim)")
    v_head_dim: int = positive(128, "MLA: value head dim")
    untie_embeddings_and_output_weights: bool = setting(
        True, "separate output layer; false = tied to the input embedding")
    add_bias_linear: bool = setting(False, "biases in every linear layer")
    add_qkv_bias: bool = setting(False, "biases on q/k/v only (Qwen2)")
    qk_layernorm: bool = setting(False, "RMSNorm on q and k heads (Qwen3)")
    # Layer implementation (Megatron-LM's --transformer-impl): transformer_engine = megatron-core's
    # Transformer Engine spec (layernorm fused into the next linear layer, TE GEMMs, FP8);
    # local = megatron-core's own modules with mswift's norm (never apex); auto =
    # transformer_engine when TE imports and a CUDA device exists, else local
    # (mswift.models.impl).
    transformer_impl: str = choice(
        "auto", ("auto", "local", "transformer_engine"),
        "layer implementation; auto = transformer_engine when TE runs here, else local")
    # Core attention: local = megatron-core's DotProductAttention (no packed sequences);
    # torch / triton = mswift's varlen attention on its torch reference / Triton kernels;
    # te = Transformer Engine's fused attention (packed THD batches; transformer_engine layers,
    # bf16/fp16 only); auto = te when TE runs here with transformer_engine layers and bf16/fp16,
    # else triton with CUDA, else torch.
    attention_backend: str = choice(
        "auto", ("auto", "local", "torch", "triton", "te"),
        "core attention; auto = te (TE layers, bf16/fp16), else triton with CUDA, else torch")
    # mswift's Triton kernels inside megatron-core's layers (mswift.models.kernel_modules):
    # triton = the token permutation of the MoE dispatchers on mswift.kernels.permute /
    # unpermute (mswift.models.moe_dispatch) and a family's router on mswift.kernels.topk_routing
    # (mswift.models.router.HFTopKRouter); torch = megatron-core's own permutation and router
    # (DeepSeek-V3, whose HF router megatron-core's does not reproduce: HFTopKRouter on the
    # torch reference); auto = triton with CUDA, else torch.
    moe_routing_backend: str = choice(
        "auto", ("auto", "torch", "triton"),
        "MoE router + token permutation; auto = mswift's Triton kernels with CUDA, else torch")
    # triton = RMSNorm, SwiGLU and the vocab-parallel cross-entropy on mswift's Triton kernels;
    # torch = mswift's norm on torch, megatron-core's own SwiGLU and cross-entropy; auto =
    # triton with CUDA, else torch. Rotary embedding stays megatron-core's either way.
    fused_kernels: str = choice(
        "auto", ("auto", "torch", "triton"),
        "RMSNorm, SwiGLU, cross-entropy; auto = mswift's Triton kernels with CUDA, else torch")
    attention_dropout: float = setting(0.0, "dropout on attention probabilities")
    hidden_dropout: float = setting(0.0, "dropout after attention and MLP")
    init_method_std: float = positive(0.02, "std of the random initial weights")
    # Mixture of experts (num_experts=None means a dense model).
    num_experts: Optional[int] = setting(None, "experts per MoE layer; None = dense model")
    moe_router_topk: int = positive(2, "experts each token is routed to")
    moe_ffn_hidden_size: Optional[int] = setting(None, "expert MLP width; default ffn_hidden_size")
    # Megatron-LM's --moe-grouped-gemm: each MoE layer runs its local experts' GEMMs grouped:
    # Transformer Engine's grouped MLP where TE runs, else mswift's (torch._grouped_mm on CUDA
    # bf16, one GEMM per expert otherwise). Checkpoints load either way (same torch_dist keys;
    # the bridge maps the legacy keys of both layouts).
    moe_grouped_gemm: bool = setting(False, "run the local experts' GEMMs as one grouped GEMM")
    moe_token_dispatcher_type: str = choice(
        "alltoall", ("alltoall", "allgather"), "how tokens reach their experts' ranks")
    moe_aux_loss_coeff: float = setting(0.0, "weight of the load-balancing loss")
    moe_router_load_balancing_type: str = choice(
        "aux_loss", ("aux_loss", "seq_aux_loss", "none"), "load-balancing loss kind")
    # How router logits become expert weights. softmax + pre_softmax=false: top-k of the logits,
    # softmax over the k chosen (= softmax over all, renormalised over the top k; Qwen3-MoE with
    # norm_topk_prob). pre_softmax=true: softmax over all experts, then top-k, not renormalised.
    moe_router_score_function: str = choice("softmax", ("softmax", "sigmoid"),
                                            "router logits -> scores")
    moe_router_pre_softmax: bool = setting(False, "softmax over all experts before top-k")
    moe_router_topk_scaling_factor: Optional[float] = setting(
        None, "multiply the top-k weights (None = 1)")
    # Which layers are MoE: one 1 (MoE) or 0 (dense MLP of ffn_hidden_size) per layer;
    # None = every layer is MoE when num_experts is set.
    moe_layer_freq: Optional[list[int]] = setting(None, "0/1 per layer: which are MoE")
    moe_shared_expert_intermediate_size: Optional[int] = setting(
        None, "width of the shared expert every MoE layer adds; None = no shared expert")
    # Group-limited routing (DeepSeek-V3's n_group / topk_group): experts form this many equal
    # groups and each token chooses only among the best moe_router_group_topk groups.
    moe_router_num_groups: Optional[int] = setting(None, "expert groups; None = no groups")
    moe_router_group_topk: Optional[int] = setting(None, "groups each token may choose from")
    # Aux-loss-free balancing (DeepSeek-V3's e_score_correction_bias = megatron-core's
    # expert_bias): a per-expert bias added to the scores for the choice only, moved by
    # moe_router_bias_update_rate after each step towards equal load.
    moe_router_enable_expert_bias: bool = setting(False, "expert bias in the choice of experts")
    moe_router_bias_update_rate: float = setting(1e-3, "step of the expert-bias update")
    # mswift's HF-exact router (deepseek_v3 family): divide the top-k weights by their sum
    # (HF norm_topk_prob); megatron-core's own router decides by moe_router_pre_softmax.
    moe_router_norm_topk_prob: bool = setting(True, "HF router: renormalise the top-k weights")
    # Llama-4 routing: the router weight scales the expert's input instead of its output.
    moe_apply_probs_on_input: bool = setting(False, "router weight scales the expert input (top-1)")
    # The HF family whose per-layer specs build the model (set from config.json); None = the
    # same megatron-core layer for every layer. The settings below need the llama4 family.
    family: Optional[str] = setting(None, "HF family that builds the layers (from config.json)")
    rotary_interleaved: bool = setting(
        False, "RoPE rotates adjacent pairs (Llama-4) instead of the two halves of a head")
    # 0/1 per layer: 1 = no position encoding in that layer (Llama-4's NoPE layers).
    nope_layers: Optional[list[int]] = setting(None, "0/1 per layer: 1 = NoPE layer")
    qk_l2_norm: bool = setting(
        False, "q and k heads scaled to unit RMS (no weights) on RoPE layers (Llama-4)")
    attention_chunk_size: Optional[int] = setting(
        None, "RoPE layers attend inside aligned chunks of this many tokens of a sample")
    # NoPE layers scale q by log1p(floor((pos + 1) / floor_scale)) * attn_temperature_scale + 1,
    # pos = position inside the sample (Llama-4 attention temperature tuning); None = off.
    attn_temperature_floor_scale: Optional[float] = setting(
        None, "NoPE layers' query temperature: floor_scale; None = off")
    attn_temperature_scale: float = setting(0.1, "NoPE layers' query temperature: attn_scale")
    # Multi-token prediction (DeepSeek-V3; Megatron-LM's names): megatron-core's MTP block on the
    # last pipeline stage, mtp_num_layers modules each predicting one token further (the
    # embedding and output layer shared with the main model). Its loss, summed over the loss
    # tokens and divided by the main loss's token count, is added times
    # mtp_loss_scaling_factor / mtp_num_layers (the DeepSeek-V3 report's lambda / D). None: no MTP
    # (an HF checkpoint's MTP layers are then carried through conversions untouched).
    mtp_num_layers: Optional[int] = positive(
        None, "multi-token-prediction modules trained after the decoder; None = off")
    mtp_loss_scaling_factor: float = positive(
        0.1, "MTP loss weight lambda (the depths' losses summed, divided by D)")

    def extra_problems(self):
        problems = []
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            problems.append(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: set kv_channels (the head dim) explicitly"
            )
        groups = self.num_query_groups
        if groups is not None and (groups <= 0 or self.num_attention_heads % groups):
            problems.append(
                f"num_query_groups={groups}: expected a positive divisor of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_experts is not None and self.moe_router_topk > self.num_experts:
            problems.append(
                f"moe_router_topk={self.moe_router_topk}: expected at most num_experts="
                f"{self.num_experts}"
            )
        freq = self.moe_layer_freq
        if freq is not None and (len(freq) != self.num_layers or set(freq) - {0, 1}
                                 or self.num_experts is None):
            problems.append(
                f"moe_layer_freq={freq}: expected one 0 or 1 per layer (num_layers="
                f"{self.num_layers}), with num_experts set"
            )
        problems += self._layer_pattern_problems()
        if (self.rope_scaling_type == "llama3"
                and self.rope_high_freq_factor < self.rope_low_freq_factor):
            problems.append(
                f"rope_high_freq_factor={self.rope_high_freq_factor}: expected at least "
                f"rope_low_freq_factor={self.rope_low_freq_factor}"
            )
        return problems

    def _layer_pattern_problems(self) -> list[str]:
        problems = []
        nope = self.nope_layers
        if nope is not None and (len(nope) != self.num_layers or set(nope) - {0, 1}):
            problems.append(f"nope_layers={nope}: expected one 0 or 1 per layer (num_layers="
                            f"{self.num_layers})")
        llama4_only = {"qk_l2_norm": self.qk_l2_norm,
                       "attention_chunk_size": self.attention_chunk_size,
                       "attn_temperature_floor_scale": self.attn_temperature_floor_scale}
        for key, value in llama4_only.items():
            if value and self.family != "llama4":
                problems.append(f"{key}={value!r}: only the llama4 family's layers have it "
                                f"(family={self.family!r})")
        for key in ("attention_chunk_size", "attn_temperature_floor_scale"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                problems.append(f"{key}={value!r}: expected a positive number or None")
        if self.rope_scaling_type == "yarn" and not self.multi_latent_attention:
            problems.append("rope_scaling_type=yarn: only with multi_latent_attention=true "
                            "(megatron-core applies YaRN in MLA layers only)")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None) or (
                groups is not None and not 0 < group_topk <= groups):
            problems.append(f"moe_router_num_groups={groups}, moe_router_group_topk="
                            f"{group_topk}: expected both None or 0 < group_topk <= num_groups")
        if self.mtp_num_layers and not self.untie_embeddings_and_output_weights:
            problems.append(f"mtp_num_layers={self.mtp_num_layers}: needs "
                            "untie_embeddings_and_output_weights=true (mswift maps the MTP "
                            "layers of DeepSeek-V3, whose embedding and head are untied)")
        if self.moe_apply_probs_on_input and self.moe_router_topk != 1:
            problems.append(f"moe_apply_probs_on_input=true: needs moe_router_topk=1, got "
                            f"{self.moe_router_topk}")
        return problems


@dataclass(kw_only=True)
class ParallelConfig(_Section):
    """How the model is split over ranks (megatron-core's parallel_state)."""

    tensor_model_parallel_size: int = positive(1, "TP: split each layer's matrices")
    pipeline_model_parallel_size: int = positive(1, "PP: split the layers into stages")
    # Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B.
    virtual_pipeline_model_parallel_size: Optional[int] = setting(
        None, "virtual pipeline stages per rank (interleaved 1F1B)")
    # Uneven pipelines (Megatron-LM's names; megatron-core's num_layers_in_first/last_
    # pipeline_stage): the first / last stage's layer count, the other layers split evenly
    # among the stages between.
    decoder_first_pipeline_num_layers: Optional[int] = setting(
        None, "layers of the first pipeline stage; None = an even split")
    decoder_last_pipeline_num_layers: Optional[int] = setting(
        None, "layers of the last pipeline stage; None = an even split")
    expert_model_parallel_size: int = positive(1, "EP: split the experts")
    expert_tensor_parallel_size: Optional[int] = setting(
        None, "TP inside experts; None = same as TP")
    context_parallel_size: int = positive(1, "CP: split the sequence for attention")
    sequence_parallel: bool = setting(
        False, "split activations outside attention/MLP over TP ranks")
    use_distributed_optimizer: bool = setting(
        True, "shard optimizer state over data-parallel ranks")

    def extra_problems(self):
        problems = []
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size < 2):
            problems.append(
                f"virtual_pipeline_model_parallel_size={vpp}: expected a positive number, "
                "with pipeline_model_parallel_size > 1"
            )
        for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            value = getattr(self, name)
            if value is not None and (value < 1 or self.pipeline_model_parallel_size < 2):
                problems.append(f"{name}={value}: expected a positive number, with "
                                "pipeline_model_parallel_size > 1")
        etp = self.expert_tensor_parallel_size
        if etp is not None and etp < 1:
            problems.append(f"expert_tensor_parallel_size={etp}: expected a positive number")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            problems.append("sequence_parallel=true: needs tensor_model_parallel_size > 1")
        return problems


@dataclass(kw_only=True)
class DataConfig(_Section):
    """Where training tokens come from (see mswift/data/)."""

    # Local files or folders: .jsonl / .json / .parquet / .csv (chat or text rows), or, with
    # tokenizer=byte, plain text files read as bytes. Several are mixed (dataset_ratios).
    dataset: list[str] = setting(None, "training files or folders", factory=list)
    # Passes over each dataset per epoch (0.5 = every other row); None = 1.0 each.
    dataset_ratios: Optional[list[float]] = setting(
        None, "passes over each dataset per epoch; None = 1.0 each")
    # Held-out data evaluated every eval_interval steps (same formats as dataset).
    eval_dataset: list[str] = setting(None, "held-out files or folders", factory=list)
    # A Hugging Face tokenizer folder, or "byte" (UTF-8 bytes as ids, vocab 256, plain text
    # files). None = the tokenizer in hf_model's folder, or "byte" when hf_model is not set.
    tokenizer: Optional[str] = setting(None, "HF tokenizer folder or 'byte'; None = hf_model's")
    seq_length: int = positive(128, "tokens per packed sequence (or padded row)")
    row_format: str = choice("auto", ("auto", "messages", "sharegpt", "alpaca", "text"),
                             "row layout of the data files; auto = detected")
    text_key: str = setting("text", "the field of a text row that holds the document")
    # Chat template: auto = the tokenizer's own chat_template, else mswift's matching one.
    template: str = choice("auto", ("auto", "tokenizer", "llama3", "llama4", "deepseek_v3",
                                    "qwen2_5", "qwen3"), "chat template (sft)")
    # sft: which tokens carry loss (pt mode always trains on every token).
    loss_on: str = choice("assistant", ("assistant", "last_assistant", "all"),
                          "sft: which tokens carry loss")
    append_eod: bool = setting(
        True, "end every text row with the tokenizer's end-of-sequence token")
    packing: bool = setting(
        True, "several samples per sequence (cu_seqlens), else one padded per row")
    packing_window: int = positive(1000, "samples sorted together by first-fit-decreasing")
    overlong: str = choice("truncate", ("truncate", "drop"), "samples over seq_length")
    on_bad_row: str = choice("error", ("error", "skip"), "stop at a bad row, or skip + count")
    shuffle_buffer: int = setting(
        10000, "samples in the seeded shuffle buffer; 0 keeps file order")

    # Pre-training on megatron-core indexed files (PREFIX.bin / PREFIX.idx, written by
    # `mswift preprocess`), instead of dataset; mode=pt only. Megatron-LM's --data-path: one
    # PREFIX, [weight, PREFIX, weight, PREFIX, ...] (weights normalized), or [PREFIX, PREFIX, ...]
    # (each weighted by its size). On the command line also one string: "0.7 a 0.3 b".
    data_path: list[str] = setting(None, "indexed PREFIX.bin/.idx files (Megatron-LM --data-path)",
                                   factory=list)
    # data_path: train,valid,test weights over each file's documents (Megatron-LM's --split);
    # the valid part is evaluated every eval_interval steps.
    split: str = setting("969,30,1", "data_path: train,valid,test weights (Megatron-LM --split)")
    # data_path: folder for megatron-core's index caches (shuffle / sample indices). None =
    # Megatron-LM's default, PREFIX/cache/ next to the data; where that folder is not writable,
    # SAVE/data_cache (save must then be set).
    data_cache_path: Optional[str] = setting(None, "data_path: folder for the index caches")
    # data_path: Megatron-LM's document boundary settings. Documents are packed end to end into
    # sequences of seq_length tokens, each ended by its end-of-document (EOD) token.
    # reset_position_ids: position ids restart at 0 after every EOD (else 0..seq_length-1).
    reset_position_ids: bool = setting(False, "data_path: position ids restart after each EOD")
    # reset_attention_mask: attention stays inside each document (cu_seqlens at every EOD:
    # needs a varlen attention_backend); false = one causal sequence per row, across documents.
    reset_attention_mask: bool = setting(
        False, "data_path: attention stays inside each document")
    # eod_mask_loss: no loss on the prediction made at an EOD token (the next document's first
    # token).
    eod_mask_loss: bool = setting(False, "data_path: no loss on predictions made at an EOD")

    def extra_problems(self):
        from mswift.config.data_path import parse_data_path, parse_split

        problems = []
        ratios = self.dataset_ratios
        if ratios is not None and len(ratios) != len(self.dataset):
            problems.append(f"dataset_ratios: {len(ratios)} values for {len(self.dataset)} "
                            "datasets")
        for check, value in ((parse_data_path, self.data_path), (parse_split, self.split)):
            if value or check is parse_split:
                try:
                    check(value)
                except ValueError as err:
                    problems.append(str(err))
        if self.data_path and (self.dataset or self.eval_dataset):
            problems.append("data_path and dataset/eval_dataset: expected one of them "
                            "(data_path's valid split is its evaluation data)")
        return problems


@dataclass(kw_only=True)
class TrainingConfig(_Section):
    """The optimisation loop."""

    train_iters: int = positive(10, "optimizer steps to train for")
    micro_batch_size: int = positive(1, "samples per rank per forward pass")
    global_batch_size: Optional[int] = setting(
        None, "samples per step; None = micro x data-parallel")
    lr: float = setting(3e-4, "peak learning rate (0 = no update: e.g. a load/export dry run)")
    min_lr: float = setting(0.0, "learning rate at the end of the decay")
    lr_warmup_iters: int = setting(
        0, "steps of linear warmup to lr: step k at lr * k / lr_warmup_iters (step 1 above 0)")
    lr_decay_style: str = choice("cosine", ("constant", "linear", "cosine"),
                                 "learning-rate decay after warmup")
    lr_decay_iters: Optional[int] = setting(None, "steps over which lr decays; None = train_iters")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    adam_beta1: float = setting(0.9, "Adam beta1")
    adam_beta2: float = setting(0.95, "Adam beta2")
    adam_eps: float = positive(1e-8, "Adam epsilon")
    clip_grad: float = setting(1.0, "global grad-norm clip; 0 = off")
    bf16: bool = setting(False, "train in bfloat16 (fp32 master weights)")
    fp16: bool = setting(False, "train in float16 with loss scaling")
    # FP8 GEMMs through Transformer Engine (Megatron-LM's --fp8-format; needs
    # transformer_impl=transformer_engine or auto on a machine with TE): e4m3 everywhere, or
    # hybrid (e4m3 forward, e5m2 gradients). Weights, norms and attention stay in bf16/fp16.
    fp8: Optional[str] = choice(None, (None, "e4m3", "hybrid"),
                                "FP8 GEMMs via Transformer Engine; None = off")
    # How FP8 scales are chosen (Megatron-LM's --fp8-recipe): delayed (amax history),
    # tensorwise (current scaling), blockwise (DeepSeek-V3 style 128-blocks, Hopper),
    # mxfp8 (Blackwell).
    fp8_recipe: str = choice("delayed", ("delayed", "tensorwise", "blockwise", "mxfp8"),
                             "FP8 scaling recipe (with fp8 set)")
    # Activation recompute (Megatron-LM's --recompute-*, passed to megatron-core's
    # TransformerConfig): keep less for backward and compute it again there. full = only each
    # recomputed layer's input is kept and the whole layer runs again in backward; which layers
    # by recompute_method: uniform = every layer, in groups of recompute_num_layers (one
    # checkpoint per group), block = the first recompute_num_layers layers of each (virtual)
    # pipeline stage only. selective = every layer, only the parts in recompute_modules.
    recompute_granularity: Optional[str] = choice(
        None, (None, "full", "selective"), "activation recompute; None = keep all activations")
    recompute_method: Optional[str] = choice(
        None, (None, "uniform", "block"),
        "full recompute: uniform = all layers in groups, block = first N layers per stage")
    recompute_num_layers: Optional[int] = setting(
        None, "full recompute: layers per group (uniform) or per stage (block)")
    # selective: core_attn = the attention over q, k, v (mswift's varlen attention or
    # megatron-core's); mlp = dense MLPs; moe = whole MoE layers (router, dispatch, experts);
    # shared_experts = MoE shared experts; layernorm = the input and pre-MLP norms (their output
    # is dropped and recomputed when the next module's gradient arrives); mla_up_proj = MLA's
    # up projections and RoPE (multi_latent_attention models). None = [core_attn]
    # (megatron-core's default). moe_act is not offered: it needs grouped-GEMM experts
    # (moe_grouped_gemm), with which it is not tested yet.
    recompute_modules: Optional[list[str]] = setting(
        None, "selective recompute: of core_attn, mlp, moe, shared_experts, layernorm, "
        "mla_up_proj; None = [core_attn]")
    seed: int = setting(1234, "random seed (model init, data order)")
    log_interval: int = positive(1, "print a progress line every N steps")
    # MFU's denominator; None = the device's dense bf16 peak from mswift's table of NVIDIA GPUs
    # (mswift.runtime.device.BF16_PEAK_FLOPS), and no MFU on a device it does not know.
    peak_tflops: Optional[float] = positive(
        None, "dense peak TFLOP/s of one device for MFU; None = known GPUs' bf16 peak")
    # pt: loss on every token; sft: loss on the tokens data.loss_on selects (chat templates).
    mode: str = choice("pt", ("pt", "sft"), "pt = loss on every token; sft = chat loss mask")
    # Parameters whose names match one of these regular expressions are not trained
    # (e.g. "embedding", "decoder.layers.[0-3]\\."); none = train everything.
    freeze_parameters: list[str] = setting(
        None, "regexes of parameter names not to train", factory=list)
    exit_interval: Optional[int] = setting(
        None, "save and exit when the step is a multiple of this")
    exit_duration_in_mins: Optional[float] = setting(
        None, "save and exit after this much wall time")
    # SIGTERM / SIGUSR1 (SLURM preemption): every rank saves at the next step and exits 0.
    exit_signal_handler: bool = setting(True, "save and exit 0 on SIGTERM / SIGUSR1")
    # A step whose loss or gradients are not finite on any rank never updates parameters;
    # skip it (up to max_skipped_steps in a row) or stop the run.
    nonfinite_policy: str = choice("skip", ("skip", "stop"), "on a non-finite step")
    max_skipped_steps: int = positive(5, "non-finite steps in a row before stopping")
    eval_interval: Optional[int] = setting(
        None, "evaluate eval_dataset at step 0 (before training; not on resume) and every N "
        "steps")
    eval_iters: int = positive(1, "global batches per evaluation")

    def extra_problems(self):
        problems = []
        if self.bf16 and self.fp16:
            problems.append("bf16 and fp16: expected at most one of them to be true")
        if self.fp8 is not None and not (self.bf16 or self.fp16):
            problems.append(f"fp8={self.fp8}: needs bf16=true or fp16=true (the weights and "
                            "everything that is not an FP8 GEMM run in 16 bits)")
        if self.lr < 0 or self.min_lr < 0:
            problems.append(f"lr={self.lr}, min_lr={self.min_lr}: expected numbers >= 0")
        if self.min_lr > self.lr:
            problems.append(f"min_lr={self.min_lr}: expected at most lr={self.lr}")
        if self.lr_warmup_iters < 0:
            problems.append(f"lr_warmup_iters={self.lr_warmup_iters}: expected >= 0")
        return problems + self.recompute_problems()

    def recompute_problems(self) -> list[str]:
        """The recompute settings among themselves (against the model and pipeline stages:
        mswift.runtime.layout_checks)."""
        granularity, method = self.recompute_granularity, self.recompute_method
        layers, modules = self.recompute_num_layers, self.recompute_modules
        problems = []
        if granularity == "full":
            if method is None:
                problems.append("recompute_granularity=full: needs recompute_method=uniform or "
                                "block")
            if layers is None or layers < 1:
                problems.append(f"recompute_num_layers={layers}: recompute_granularity=full "
                                "needs a positive number of layers")
        else:
            for key, value in (("recompute_method", method), ("recompute_num_layers", layers)):
                if value is not None:
                    problems.append(f"{key}={value!r}: only for recompute_granularity=full "
                                    f"(it is {granularity!r})")
        if modules is not None:
            if granularity != "selective":
                problems.append(f"recompute_modules={modules}: only for recompute_granularity="
                                f"selective (it is {granularity!r})")
            for module in modules:
                if module in NOT_RECOMPUTED:
                    problems.append(f"recompute_modules: {module} {NOT_RECOMPUTED[module]}")
            unknown = [m for m in modules if m not in RECOMPUTE_MODULES + tuple(NOT_RECOMPUTED)]
            if unknown or not modules:
                problems.append(f"recompute_modules={modules}: expected a non-empty list of "
                                f"{', '.join(RECOMPUTE_MODULES)}")
        return problems


@dataclass(kw_only=True)
class CheckpointConfig(_Section):
    """Saving and resuming (megatron-core's reshardable torch_dist format)."""

    # A save folder that holds another run's checkpoints or metrics.jsonl is refused before
    # start unless load names the same folder (mswift.train.save_dir).
    save: Optional[str] = setting(None, "directory for checkpoints; None = do not save")
    load: Optional[str] = setting(
        None, "checkpoint directory to start from; load = save resumes that run")
    save_interval: Optional[int] = setting(
        None, "save every N steps (and at the end when save is set)")
    ckpt_format: str = choice("torch_dist", ("torch_dist",), "checkpoint format")
    no_load_optim: bool = setting(False, "load weights only: fresh optimizer (fine-tuning)")
    no_load_rng: bool = setting(False, "do not restore the random state from load")
    # Keep the newest N of the checkpoints this run saved under save (older ones are deleted
    # after a newer one is complete; a checkpoint it did not save is never deleted); None keeps
    # all.
    save_total_limit: Optional[int] = setting(
        None, "keep the newest N checkpoints this run saved; None = all")
    # At the end of training also write the model as HF safetensors to SAVE/hf (needs hf_model:
    # its config and tokenizer files are copied along).
    save_hf: bool = setting(False, "also write SAVE/hf as HF safetensors at the end")

    def extra_problems(self):
        problems = []
        for name in ("save_interval", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name}={value}: expected a positive number")
        return problems


@dataclass(kw_only=True)
class MswiftConfig:
    """All settings of a run, one attribute per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

