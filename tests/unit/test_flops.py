"""Model FLOPs per training token (mswift.models.flops): by hand, against torch's FLOP counter on
the transformers models, and against the 6 x parameters rule on a Llama-3-8B shape."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mswift.config.schema import ModelConfig
from mswift.models.flops import train_flops_per_token
from mswift.models.registry import model_config_from_hf
from mswift.testing.hf_models import tiny_hf_config


def test_hand_count_of_a_tiny_gqa_moe_model():
    # 6 query heads of dim 12 in 2 KV groups (3 per group), hidden 72; layer 0 dense SwiGLU of
    # width 100, layer 1 MoE: 5 experts of width 40, top-2, and a shared expert of width 56;
    # padded vocabulary 384; seq 50.
    model = ModelConfig(num_layers=2, hidden_size=72, num_attention_heads=6, num_query_groups=2,
                        kv_channels=12, ffn_hidden_size=100, num_experts=5, moe_router_topk=2,
                        moe_ffn_hidden_size=40, moe_layer_freq=[0, 1], vocab_size=300,
                        moe_shared_expert_intermediate_size=56)
    q, kv = 6 * 12, 2 * 12
    attention = 72 * q + 72 * kv + 72 * kv + q * 72 + q * 50  # qkv, out; QK^T + PV over s/2
    dense = 3 * 72 * 100
    moe = 2 * 3 * 72 * 40 + 3 * 72 * 56 + 72 * 5  # two routed experts, the shared, the router
    logits = 72 * 384
    macs = 2 * attention + dense + moe + logits
    assert train_flops_per_token(model, 50, 384) == 6 * macs

    gelu = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, swiglu=False)
    # GELU MLP: 2 products of default width 4H; heads of 16, one KV head per query head
    assert train_flops_per_token(gelu, 10, 128) == 6 * (
        4 * 64 * 64 + 64 * 10 + 2 * 64 * 256 + 64 * 128)


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("qwen3_moe", {"mlp_only_layers": [0]}),  # a dense layer, then an MoE one (top-2 of 4)
])
def test_forward_third_matches_torch_flop_counter_on_the_hf_model(family, overrides):
    """torch counts every matrix product transformers runs (eager attention computes the full
    s x s scores, twice the causal half counted here; eager experts run only routed tokens)."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, hidden_size=72, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=12, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             experts_implementation="eager").eval()
    seq = 40
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, seq), generator=generator)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens)
    mc = model_config_from_hf(config.to_dict())[1]
    forward = train_flops_per_token(mc, seq, config.vocab_size) / 3 * seq
    masked_half = mc.num_layers * 2 * (6 * 12) * seq * seq  # the scores above the diagonal
    assert counter.get_total_flops() == forward + masked_half


def test_llama3_8b_within_a_few_percent_of_six_times_parameters():
    """6 N per token counts the input embedding (no FLOPs) and leaves out attention scores:
    at seq 2048 the two nearly cancel (-6.5% and +3.4%)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     tie_word_embeddings=False)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(hf).parameters())
    assert 8.0e9 < params < 8.1e9
    model = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                        num_attention_heads=32, num_query_groups=8, vocab_size=128256)
    flops = train_flops_per_token(model, 2048, 128256)
    assert flops / (6 * params) == pytest.approx(1, abs=0.04)
    # exactly: 6 x (parameters - embedding - norms) + 6 x layers x q-width x seq
    norms = 4096 * (2 * 32 + 1)
    matmul_params = params - 128256 * 4096 - norms
    assert flops == 6 * matmul_params + 6 * 32 * 4096 * 2048
