"""HF config -> mswift model config per family, the weight maps against transformers' own
saved tensors, and refusals of what the bridge does not support (by name, all at once)."""
import json

import pytest

from mswift.bridge.hf_io import HFCheckpoint
from mswift.config import load_config
from mswift.models.errors import ModelError
from mswift.models.registry import (
    apply_hf_model,
    dims_for,
    families,
    model_config_from_hf,
    padded_vocab_for,
)
from mswift.models.weight_map import WeightMap
from mswift.testing.hf_models import save_tiny_hf_model, tiny_hf_config

FAMILIES = [f.name for f in families()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_hf_model(name, root / name) for name in FAMILIES}


def config_of(path):
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_map_names_and_shapes_are_transformers_own(saved, name):
    ckpt = HFCheckpoint(saved[name])
    family, model = model_config_from_hf(ckpt.config)
    assert family.name == name
    wmap = WeightMap(family.weight_rules, dims_for(model, padded_vocab_for(model, 1)))
    expected = wmap.hf_shapes()
    assert set(expected) == set(ckpt.names)
    assert all(ckpt.shape(n) == shape for n, shape in expected.items())


def test_config_translation(saved):
    _, llama = model_config_from_hf(config_of(saved["llama"]))
    assert (llama.rope_scaling_type, llama.rope_scaling_factor, llama.rope_low_freq_factor,
            llama.rope_high_freq_factor, llama.rope_original_max_position_embeddings) == (
        "llama3", 8.0, 2.0, 8.0, 128)
    assert (llama.num_layers, llama.num_query_groups, llama.kv_channels) == (4, 2, 16)
    assert llama.untie_embeddings_and_output_weights and not llama.add_qkv_bias
    _, qwen2 = model_config_from_hf(config_of(saved["qwen2"]))
    assert qwen2.add_qkv_bias and not qwen2.untie_embeddings_and_output_weights
    assert qwen2.rotary_base == 1e6 and qwen2.rope_scaling_type is None
    _, qwen3 = model_config_from_hf(config_of(saved["qwen3"]))
    assert qwen3.qk_layernorm and qwen3.kv_channels == 32 and qwen3.norm_epsilon == 1e-6
    _, moe = model_config_from_hf(config_of(saved["qwen3_moe"]))
    assert (moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size) == (4, 2, 32)
    assert moe.moe_router_score_function == "softmax" and moe.moe_router_pre_softmax is False
    assert moe.moe_layer_freq is None


def test_qwen3_moe_dense_layers_and_unnormalised_router():
    config = tiny_hf_config("qwen3_moe", norm_topk_prob=False, mlp_only_layers=[0],
                            num_hidden_layers=3, decoder_sparse_step=1).to_dict()
    _, model = model_config_from_hf(config)
    assert model.moe_layer_freq == [0, 1, 1] and model.moe_router_pre_softmax is True


def test_transformers_4_style_rope_config():
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 96, "vocab_size": 100, "rope_theta": 500000.0,
              "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    _, model = model_config_from_hf(config)
    assert model.rotary_base == 500000.0 and model.rope_scaling_factor == 32.0
    assert model.num_query_groups == 4  # no num_key_value_heads: one group per head


def test_unsupported_model_type_and_architecture():
    with pytest.raises(ModelError, match="model_type='gpt2' is not supported"):
        model_config_from_hf({"model_type": "gpt2"})
    config = tiny_hf_config("llama").to_dict()
    config["architectures"] = ["LlamaForSequenceClassification"]
    with pytest.raises(ModelError, match="LlamaForSequenceClassification"):
        model_config_from_hf(config)


def test_unsupported_features_all_named_at_once():
    config = tiny_hf_config("llama").to_dict()
    config.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
                  attention_bias=True, hidden_act="gelu")
    del config["vocab_size"]
    with pytest.raises(ModelError) as err:
        model_config_from_hf(config)
    text = str(err.value)
    for part in ("rope_type='yarn'", "attention_bias=True", "hidden_act='gelu'",
                 "vocab_size: missing"):
        assert part in text
    assert len(err.value.problems) == 4


@pytest.mark.parametrize("family,change,named", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window=True"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True"),
])
def test_family_specific_refusals(family, change, named):
    config = tiny_hf_config(family).to_dict()
    config.update(change)
    with pytest.raises(ModelError, match=named):
        model_config_from_hf(config)


def test_hf_model_setting_fills_the_model_section(saved):
    cfg = load_config(None, [f"hf_model={saved['qwen3_moe']}", "make_vocab_size_divisible_by=64",
                             "num_layers=99", "attention_backend=local", "add_bias_linear=true"])
    filled = apply_hf_model(cfg)
    assert filled.model.num_layers == 2 and filled.model.num_experts == 4
    assert not filled.model.add_bias_linear  # an HF setting: config.json decides
    assert filled.model.make_vocab_size_divisible_by == 64  # not HF settings: kept
    assert filled.model.attention_backend == "local"
    assert filled.model.hf_model == str(saved["qwen3_moe"])
    dense = apply_hf_model(load_config(None, [f"hf_model={saved['llama']}", "num_experts=8",
                                              "qk_layernorm=true"]))
    assert dense.model.num_experts is None and not dense.model.qk_layernorm
