import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mswift.models.norm import Norm


def config(normalization, sp=False):
    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                             normalization=normalization, sequence_parallel=sp,
                             tensor_model_parallel_size=2 if sp else 1)


def test_rmsnorm_matches_hf_llama():
    torch.manual_seed(0)
    norm, ref = Norm(config("RMSNorm"), 32, eps=1e-6), LlamaRMSNorm(32, eps=1e-6)
    weight = torch.randn(32)
    norm.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    x = torch.randn(5, 3, 32)
    torch.testing.assert_close(norm(x), ref(x), rtol=0, atol=1e-6)
    x16 = x.to(torch.bfloat16)
    torch.testing.assert_close(norm.to(torch.bfloat16)(x16), ref.to(torch.bfloat16)(x16))


def test_layernorm_matches_torch():
    torch.manual_seed(0)
    norm, ref = Norm(config("LayerNorm"), 32, eps=1e-5), torch.nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        for p in (ref.weight, ref.bias):
            p.normal_()
        norm.weight.copy_(ref.weight)
        norm.bias.copy_(ref.bias)
    x = torch.randn(4, 32)
    torch.testing.assert_close(norm(x), ref(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sp", [False, True])
def test_sequence_parallel_marks_params(sp):
    norm = Norm(config("LayerNorm", sp=sp), 32)
    assert [p.sequence_parallel for p in norm.parameters()] == [sp, sp]


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="normalization='BatchNorm'"):
        Norm(config("RMSNorm"), 32, normalization="BatchNorm")
