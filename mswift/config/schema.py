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
    hf_model: Optional[str] = None
    num_layers: int = positive(2, "transformer layers")
    hidden_size: int = positive(64, "model width H")
    ffn_hidden_size: Optional[int] = None  # dense MLP width; default 4*H (or 8/3*H rounded for swiglu)
    num_attention_heads: int = positive(4, "query heads")
    num_query_groups: Optional[int] = None  # key/value heads (GQA); None = one per query head
    kv_channels: Optional[int] = None  # head dim; None = hidden_size / num_attention_heads
    vocab_size: int = positive(256, "tokenizer vocabulary (padded for TP by the model builder)")
    make_vocab_size_divisible_by: int = positive(128, "pad the vocabulary to a multiple of this x TP")
    max_position_embeddings: int = positive(4096, "longest sequence the position encoding covers")
    normalization: str = choice("RMSNorm", ("RMSNorm", "LayerNorm"))
    norm_epsilon: float = positive(1e-5)
    swiglu: bool = True  # gated SiLU MLP (Llama/Qwen); False = GELU MLP
    position_embedding_type: str = choice("rope", ("rope", "learned_absolute", "none"))
    rotary_base: float = positive(10000.0, "RoPE theta")
    # RoPE frequency scaling; None = plain RoPE. "llama3" = Llama-3.1's smooth low/high-frequency
    # interpolation, with the four rope_* numbers below (HF rope_parameters of the same names).
    rope_scaling_type: Optional[str] = choice(None, (None, "llama3"))
    rope_scaling_factor: float = positive(8.0, "llama3: factor")
    rope_low_freq_factor: float = positive(1.0, "llama3: low_freq_factor")
    rope_high_freq_factor: float = positive(4.0, "llama3: high_freq_factor")
    rope_original_max_position_embeddings: int = positive(
        8192, "llama3: original_max_position_embeddings (context length before scaling)")
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False  # biases in every linear layer
    add_qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    qk_layernorm: bool = False  # RMSNorm on q and k heads (Qwen3)
    # Core attention: local = megatron-core's DotProductAttention (no packed sequences);
    # torch / triton = mswift's varlen attention on its torch reference / Triton kernels;
    # auto = triton with CUDA, else torch.
    attention_backend: str = choice("auto", ("auto", "local", "torch", "triton"))
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_method_std: float = positive(0.02)
    # Mixture of experts (num_experts=None means a dense model).
    num_experts: Optional[int] = None
    moe_router_topk: int = positive(2)
    moe_ffn_hidden_size: Optional[int] = None  # expert MLP width; default ffn_hidden_size
    moe_token_dispatcher_type: str = choice("alltoall", ("alltoall", "allgather"))
    moe_aux_loss_coeff: float = 0.0
    moe_router_load_balancing_type: str = choice("aux_loss", ("aux_loss", "seq_aux_loss", "none"))
    # How router logits become expert weights. softmax + pre_softmax=false: top-k of the logits,
    # softmax over the k chosen (= softmax over all, renormalised over the top k; Qwen3-MoE with
    # norm_topk_prob). pre_softmax=true: softmax over all experts, then top-k, not renormalised.
    moe_router_score_function: str = choice("softmax", ("softmax", "sigmoid"))
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: Optional[float] = None  # multiply the top-k weights (None = 1)
    # Which layers are MoE: one 1 (MoE) or 0 (dense MLP of ffn_hidden_size) per layer;
    # None = every layer is MoE when num_experts is set.
    moe_layer_freq: Optional[list[int]] = None

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
        if (self.rope_scaling_type == "llama3"
                and self.rope_high_freq_factor <= self.rope_low_freq_factor):
            problems.append(
                f"rope_high_freq_factor={self.rope_high_freq_factor}: expected more than "
                f"rope_low_freq_factor={self.rope_low_freq_factor}"
            )
        return problems


@dataclass(kw_only=True)
class ParallelConfig(_Section):
    """How the model is split over ranks (megatron-core's parallel_state)."""

    tensor_model_parallel_size: int = positive(1, "TP: split each layer's matrices")
    pipeline_model_parallel_size: int = positive(1, "PP: split the layers into stages")
    # Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    expert_model_parallel_size: int = positive(1, "EP: split the experts")
    expert_tensor_parallel_size: Optional[int] = None  # TP inside experts; None = same as TP
    context_parallel_size: int = positive(1, "CP: split the sequence for attention")
    sequence_parallel: bool = False  # split activations outside attention/MLP over TP ranks
    use_distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks

    def extra_problems(self):
        problems = []
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size < 2):
            problems.append(
                f"virtual_pipeline_model_parallel_size={vpp}: expected a positive number, "
                "with pipeline_model_parallel_size > 1"
            )
        etp = self.expert_tensor_parallel_size
        if etp is not None and etp < 1:
            problems.append(f"expert_tensor_parallel_size={etp}: expected a positive number")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            problems.append("sequence_parallel=true: needs tensor_model_parallel_size > 1")
        return problems


@dataclass(kw_only=True)
class DataConfig(_Section):
    """Where training tokens come from."""

    # Text file(s) for the built-in byte-level corpus reader (the data issue adds datasets,
    # templates and packing).
    dataset: list[str] = field(default_factory=list)
    tokenizer: str = choice("byte", ("byte",), "byte = UTF-8 bytes as token ids (vocab 256)")
    seq_length: int = positive(128, "tokens per sample")


@dataclass(kw_only=True)
class TrainingConfig(_Section):
    """The optimisation loop."""

    train_iters: int = positive(10)
    micro_batch_size: int = positive(1, "samples per rank per forward pass")
    global_batch_size: Optional[int] = None  # samples per step; None = micro x data-parallel
    lr: float = positive(3e-4)
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = choice("cosine", ("constant", "linear", "cosine"))
    lr_decay_iters: Optional[int] = None  # None = train_iters
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = positive(1e-8)
    clip_grad: float = 1.0  # global grad-norm clip; 0 = off
    bf16: bool = False
    fp16: bool = False
    seed: int = 1234
    log_interval: int = positive(1)

    def extra_problems(self):
        problems = []
        if self.bf16 and self.fp16:
            problems.append("bf16 and fp16: expected at most one of them to be true")
        if self.min_lr > self.lr:
            problems.append(f"min_lr={self.min_lr}: expected at most lr={self.lr}")
        if self.lr_warmup_iters < 0:
            problems.append(f"lr_warmup_iters={self.lr_warmup_iters}: expected >= 0")
        return problems


@dataclass(kw_only=True)
class CheckpointConfig(_Section):
    """Saving and resuming (megatron-core's reshardable torch_dist format)."""

    save: Optional[str] = None  # directory for checkpoints; None = do not save
    load: Optional[str] = None  # checkpoint directory to start from
    save_interval: Optional[int] = None  # save every N steps (and at the end when save is set)
    ckpt_format: str = choice("torch_dist", ("torch_dist",))
    no_load_optim: bool = False  # load weights only: fresh optimizer (fine-tuning)
    no_load_rng: bool = False

    def extra_problems(self):
        if self.save_interval is not None and self.save_interval <= 0:
            return [f"save_interval={self.save_interval}: expected a positive number"]
        return []


@dataclass(kw_only=True)
class MswiftConfig:
    """All settings of a run, one attribute per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

