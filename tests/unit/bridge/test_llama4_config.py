"""Llama-4 config translation: the released Scout / Maverick config.json files (text part of
Llama4ForConditionalGeneration) against transformers' own reading of them, the RoPE frequencies
against transformers', and refusals by name."""
import json
from pathlib import Path

import pytest
import torch

from mswift.models import llama4
from mswift.models.errors import ModelError
from mswift.models.registry import model_config_from_hf
from mswift.testing.hf_models import tiny_hf_config

DATA = Path(__file__).resolve().parents[2] / "data_files" / "llama4"
SCOUT = json.loads((DATA / "scout_17b_16e_instruct_config.json").read_text())
MAVERICK = json.loads((DATA / "maverick_17b_128e_instruct_config.json").read_text())


def transformers_text_config(config: dict):
    """transformers' Llama4TextConfig of a released config (its ``attn_temperature_tuning: 4``
    cast to bool: the strict config class refuses the int)."""
    from transformers import Llama4TextConfig

    text = dict(config["text_config"])
    with pytest.raises(Exception, match="attn_temperature_tuning"):
        Llama4TextConfig(**text)
    text["attn_temperature_tuning"] = bool(text["attn_temperature_tuning"])
    return Llama4TextConfig(**text)


@pytest.mark.parametrize("config", [SCOUT, MAVERICK], ids=["scout", "maverick"])
def test_released_configs_translate_as_transformers_reads_them(config):
    hf = transformers_text_config(config)
    fields = llama4.FAMILY.model_config_fields(config)
    layers = hf.num_hidden_layers
    assert fields["num_layers"] == layers == 48
    freq = fields["moe_layer_freq"] or [1] * layers  # None: every layer (megatron's default)
    assert freq == [int(i in hf.moe_layers) for i in range(layers)]
    assert fields["nope_layers"] == [1 - r for r in hf.no_rope_layers]
    assert fields["num_experts"] == hf.num_local_experts
    assert fields["ffn_hidden_size"] == hf.intermediate_size_mlp == 16384
    assert fields["moe_ffn_hidden_size"] == fields["moe_shared_expert_intermediate_size"] \
        == hf.intermediate_size == 8192
    assert (fields["num_attention_heads"], fields["num_query_groups"], fields["kv_channels"]) \
        == (40, 8, 128)
    assert fields["qk_l2_norm"] == hf.use_qk_norm
    assert fields["attention_chunk_size"] == hf.attention_chunk_size == 8192
    assert fields["attn_temperature_floor_scale"] == hf.floor_scale == 8192
    assert fields["attn_temperature_scale"] == hf.attn_scale
    assert fields["rotary_interleaved"] and fields["moe_apply_probs_on_input"]
    assert fields["moe_router_score_function"] == "sigmoid" and fields["moe_router_topk"] == 1
    assert fields["untie_embeddings_and_output_weights"] and fields["vocab_size"] == 202048
    assert fields["family"] == "llama4"


def test_scout_and_maverick_differences():
    scout = llama4.FAMILY.model_config_fields(SCOUT)
    maverick = llama4.FAMILY.model_config_fields(MAVERICK)
    # Every layer MoE: megatron-core's default (None), whose torch_dist keys stack the layers.
    assert scout["moe_layer_freq"] is None and scout["num_experts"] == 16
    assert maverick["moe_layer_freq"] == [0, 1] * 24 and maverick["num_experts"] == 128
    assert scout["nope_layers"] == [0, 0, 0, 1] * 12
    assert scout["qk_l2_norm"] and not maverick["qk_l2_norm"]
    assert (scout["rope_scaling_type"], scout["rope_scaling_factor"],
            scout["rope_low_freq_factor"], scout["rope_high_freq_factor"],
            scout["rope_original_max_position_embeddings"]) == ("llama3", 16.0, 1.0, 1.0, 8192)
    assert maverick["rope_scaling_type"] is None and maverick["rotary_base"] == 500000.0


@pytest.mark.parametrize("freq, want", [
    (None, 1), ([1, 1, 1, 1], 1),  # every layer MoE: never a list, however it was written
    ([0, 1, 0, 1], [0, 1, 0, 1]),
])
def test_megatron_core_gets_every_layer_moe_as_1(freq, want):
    """A list, even of ones, makes megatron-core key each layer's experts apart in torch_dist,
    so checkpoints written for the stacked keys (the byte-copied ones) would not load."""
    from mswift.config import load_config
    from mswift.models.build import transformer_config

    given = [] if freq is None else [f"moe_layer_freq={freq}"]
    cfg = load_config(overrides=["num_layers=4", "num_experts=4", *given])
    assert transformer_config(cfg).moe_layer_freq == want


def test_scout_rope_frequencies_are_transformers_own():
    """megatron-core hard-codes low/high 1/4; mswift recomputes with Scout's 1/1 (factor 16)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mswift.config.schema import ModelConfig
    from mswift.models.rope import apply_rope_scaling

    hf = transformers_text_config(SCOUT)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    model = ModelConfig(**llama4.FAMILY.model_config_fields(SCOUT))
    rope = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=model.rotary_base,
                           use_cpu_initialization=True)
    unscaled = rope.inv_freq.clone()
    apply_rope_scaling(rope, model)
    assert torch.equal(rope.inv_freq, want)
    assert not torch.equal(unscaled, want)


def test_text_only_config_of_the_debug_model():
    _, model = model_config_from_hf(tiny_hf_config("llama4").to_dict())
    assert model.moe_layer_freq == [0, 1, 0, 1] and model.nope_layers == [0, 0, 0, 1]
    assert model.attention_chunk_size == 8 and model.attn_temperature_floor_scale == 4.0
    assert model.family == "llama4"


def test_refusals_named_at_once():
    config = tiny_hf_config("llama4").to_dict()
    config.update(num_experts_per_tok=2, attention_bias=True,
                  layer_types=["full_attention"] * 4)
    with pytest.raises(ModelError) as err:
        model_config_from_hf(config)
    text = str(err.value)
    for part in ("num_experts_per_tok=2", "attention_bias=True", "layer_types="):
        assert part in text
    with pytest.raises(ModelError, match="text_config: missing"):
        llama4.FAMILY.model_config_fields({"model_type": "llama4"})
