"""Model FLOPs of training, per token, from the model's shape: the numerator of MFU.

The convention is Megatron-LM's ``num_floating_point_operations`` (megatron/training/
training.py): a matrix product of ``[m, n] x [n, k]`` costs ``2mnk``; training runs each one
three times (forward, and the backward's data and weight gradients), so a token costs
``6 x`` the weights it multiplies, plus the attention products. Counted per token and layer:

- attention projections: q (heads x head dim), k and v (query groups x head dim each: GQA),
  and the output projection;
- core attention of a causal sequence of ``seq_length``: ``QK^T`` and ``softmax(.)V``, each
  ``2 x heads x head dim x seq_length / 2`` forward (a query sees half the sequence on average);
- MLP: two products, three with SwiGLU (gate, up, down); an MoE layer counts only the
  ``moe_router_topk`` experts a token goes to, plus the shared expert where there is one;
- the output layer over the padded vocabulary (what the GPU multiplies);
- where mswift differs from Megatron-LM: the MoE router's ``hidden x experts`` product is
  counted (Megatron-LM leaves it out; it is under 1% of a layer for common shapes).

Not counted, as in Megatron-LM: norms, RoPE, softmax, activations, the embedding lookup.
Packed sequences are counted as ``seq_length`` causal tokens, as Megatron-LM does: samples
shorter than ``seq_length`` attend over less, and so do Llama-4's chunked-attention layers
(``attention_chunk_size``), so for them this overstates the attention part.
"""
from __future__ import annotations

from mswift.config.schema import ModelConfig
from mswift.models.sizes import default_ffn_hidden_size

# forward + backward (data gradient + weight gradient) x 2 FLOPs per multiply-add
TRAIN_FLOPS_PER_MAC = 3 * 2


def attention_macs_per_token(model: ModelConfig, seq_length: int) -> float:
    """Multiply-adds of one attention layer's forward pass per token (projections + core)."""
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    q = model.num_attention_heads * head_dim
    kv = (model.num_query_groups or model.num_attention_heads) * head_dim
    projections = model.hidden_size * (q + 2 * kv) + q * model.hidden_size
    core = 2 * q * seq_length / 2  # QK^T and softmax(QK^T) V over half the causal sequence
    return projections + core


def mlp_macs_per_token(model: ModelConfig, moe: bool) -> float:
    """Multiply-adds of one MLP (dense, or MoE with only the routed experts) per token."""
    products = 3 if model.swiglu else 2
    if not moe:
        ffn = model.ffn_hidden_size or default_ffn_hidden_size(model.hidden_size, model.swiglu)
        return products * model.hidden_size * ffn
    ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size or \
        default_ffn_hidden_size(model.hidden_size, model.swiglu)
    shared = model.moe_shared_expert_intermediate_size or 0  # every token goes through it
    router = model.hidden_size * model.num_experts
    return products * model.hidden_size * (model.moe_router_topk * ffn + shared) + router


def moe_layers(model: ModelConfig) -> list[bool]:
    """For each layer, whether its MLP is a mixture of experts."""
    if model.num_experts is None:
        return [False] * model.num_layers
    if model.moe_layer_freq is None:
        return [True] * model.num_layers
    return [bool(flag) for flag in model.moe_layer_freq]


def train_flops_per_token(model: ModelConfig, seq_length: int, padded_vocab: int) -> float:
    """Model FLOPs of one training token (forward + backward) at ``seq_length``; see the module
    docstring for what is counted. Times tokens per second per GPU: achieved FLOP/s per GPU."""
    layers = moe_layers(model)
    macs = len(layers) * attention_macs_per_token(model, seq_length)
    macs += sum(mlp_macs_per_token(model, moe) for moe in layers)
    macs += model.hidden_size * padded_vocab  # output layer (tied or not, it is a product)
    return TRAIN_FLOPS_PER_MAC * macs
