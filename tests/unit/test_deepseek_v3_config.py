"""DeepSeek-V3's config.json -> mswift settings, what is refused by name, and an MTP layer that
config.json does not count refused rather than dropped (counted ones are carried through:
tests/unit/bridge/test_deepseek_v3_mtp.py)."""
import pytest
import torch

from mswift.bridge.errors import BridgeError
from mswift.bridge.hf_io import HFCheckpoint
from mswift.models.errors import ModelError
from mswift.models.registry import dims_for, model_config_from_hf, padded_vocab_for
from mswift.models.weight_map import WeightMap
from mswift.testing.hf_models import save_tiny_hf_model, tiny_hf_config


def translated(**overrides):
    return model_config_from_hf(tiny_hf_config("deepseek_v3", **overrides).to_dict())[1]


def test_debug_config_translation():
    m = translated()
    assert m.multi_latent_attention and m.qk_layernorm
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim,
            m.v_head_dim) == (48, 32, 16, 8, 12)
    assert (m.rope_scaling_type, m.rope_scaling_factor, m.rope_original_max_position_embeddings,
            m.yarn_mscale, m.yarn_mscale_all_dim) == ("yarn", 4.0, 16, 1.0, 1.0)
    assert m.moe_layer_freq == [0, 1, 1, 1] and m.ffn_hidden_size == 80
    assert (m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size,
            m.moe_shared_expert_intermediate_size) == (8, 3, 24, 24)
    assert (m.moe_router_score_function, m.moe_router_num_groups, m.moe_router_group_topk,
            m.moe_router_enable_expert_bias, m.moe_router_topk_scaling_factor,
            m.moe_router_norm_topk_prob) == ("sigmoid", 4, 2, True, 2.5, True)
    assert translated(q_lora_rank=None).q_lora_rank is None


def test_yarn_mscales_as_transformers_reads_them():
    """Without mscale_all_dim, transformers scales cos/sin by mscale(factor) and leaves the
    softmax scale alone: megatron-core gets mscale 1 and mscale_all_dim 0 for the same."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16, "mscale": 0.7}
    m = translated(rope_parameters=rope)
    assert (m.yarn_mscale, m.yarn_mscale_all_dim) == (1.0, 0.0)
    plain = translated(rope_parameters={"rope_type": "default", "rope_theta": 5.0})
    assert plain.rope_scaling_type is None and plain.rotary_base == 5.0


@pytest.mark.parametrize("change,named", [
    ({"rope_interleave": False}, "rope_interleave=False"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "original_max_position_embeddings": 16, "mscale_all_dim": 1.0}},
     "rope_parameters.mscale=None"),
])
def test_unsupported_settings_refused_by_name(change, named):
    with pytest.raises(ModelError, match=named.replace(".", r"\.").replace("(", r"\(")):
        translated(**change)


def test_mtp_layer_tensors_are_refused(tmp_path):
    """A checkpoint with an MTP layer (model.layers.{num_hidden_layers}.*) that its config.json
    does not count (num_nextn_predict_layers 0) is refused by name, not converted without it."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_hf_model("deepseek_v3", tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.4.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    ckpt = HFCheckpoint(path)
    family, model = model_config_from_hf(ckpt.config)
    wmap = WeightMap(family.weight_rules, dims_for(model, padded_vocab_for(model, 1)))
    with pytest.raises(BridgeError, match=r"model\.layers\.4\.eh_proj\.weight: unexpected"):
        ckpt.check_tensors(wmap.hf_shapes(), family.name, family.ignored_tensors)
