"""Bad layouts fail before any process group or model exists, naming the setting."""
import pytest
import torch.distributed as dist

from mswift.config import ConfigError, load_config
from mswift.runtime import init_distributed, layout_problems

DENSE = ["num_layers=4", "num_attention_heads=4", "num_query_groups=4", "hidden_size=64"]
MOE = DENSE + ["num_experts=4", "moe_router_topk=2"]


def problems(overrides, world):
    return layout_problems(load_config(None, overrides), world)


def test_good_layouts_have_no_problems():
    assert problems(DENSE + ["tensor_model_parallel_size=2"], 2) == []
    assert problems(MOE + ["expert_model_parallel_size=2", "tensor_model_parallel_size=2",
                           "sequence_parallel=true"], 4) == []
    assert problems(DENSE + ["pipeline_model_parallel_size=2",
                             "virtual_pipeline_model_parallel_size=2"], 2) == []
    assert problems(DENSE + ["num_layers=5", "pipeline_model_parallel_size=2",
                             "decoder_first_pipeline_num_layers=2",
                             "decoder_last_pipeline_num_layers=3"], 2) == []


@pytest.mark.parametrize("overrides,world,expected", [
    (DENSE + ["tensor_model_parallel_size=3"], 3,
     "tensor_model_parallel_size=3: must divide num_attention_heads=4"),
    (DENSE + ["num_query_groups=2", "tensor_model_parallel_size=4"], 4,
     "tensor_model_parallel_size=4: must divide num_query_groups=2"),
    (MOE + ["expert_model_parallel_size=3"], 3,
     "expert_model_parallel_size=3: must divide num_experts=4"),
    (DENSE + ["tensor_model_parallel_size=2"], 3,
     "world size 3: not divisible by tensor_model_parallel_size (2)"),
    (DENSE + ["pipeline_model_parallel_size=3"], 3,
     "pipeline_model_parallel_size=3: must divide num_layers=4"),
    (DENSE + ["num_layers=7", "pipeline_model_parallel_size=3",
              "decoder_last_pipeline_num_layers=2"], 3,
     "decoder_last_pipeline_num_layers=2: the other 5 of num_layers=7 layers must split evenly"),
    (DENSE + ["expert_model_parallel_size=2"], 2,
     "expert_model_parallel_size=2: needs an MoE model"),
    (MOE + ["tensor_model_parallel_size=2"], 2, "sequence_parallel=false: MoE with"),
    (DENSE + ["global_batch_size=6", "micro_batch_size=4"], 1,
     "global_batch_size=6: must be a multiple of micro_batch_size (4)"),
])
def test_bad_layout_is_named(overrides, world, expected):
    found = problems(overrides, world)
    assert any(expected in p for p in found), found


def test_an_uneven_split_needs_a_pipeline():
    with pytest.raises(ConfigError, match="decoder_first_pipeline_num_layers=2: expected a "
                                          "positive number, with pipeline_model_parallel_size > 1"):
        load_config(None, DENSE + ["decoder_first_pipeline_num_layers=2"])


def test_init_fails_before_any_process_group(monkeypatch):
    # World size 3 for TP=2: init_distributed must refuse before rendezvous (which would hang
    # waiting for ranks 1 and 2 that do not exist).
    for key, value in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, DENSE + ["tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="world size 3"):
        init_distributed(cfg)
    assert not dist.is_initialized()


@pytest.mark.parametrize("overrides,expected", [
    (["recompute_granularity=full"], ["recompute_granularity=full: needs recompute_method",
                                      "recompute_num_layers=None: recompute_granularity=full"]),
    (["recompute_granularity=selective", "recompute_num_layers=2", "recompute_method=block"],
     ["recompute_method='block': only for recompute_granularity=full (it is 'selective')",
      "recompute_num_layers=2: only for recompute_granularity=full"]),
    (["recompute_modules=[mlp]"], ["recompute_modules=['mlp']: only for recompute_granularity="
                                   "selective (it is None)"]),
    (["recompute_granularity=selective", "recompute_modules=[moe_act,attn]"],
     ["recompute_modules: moe_act needs megatron-core's grouped-GEMM experts",
      "recompute_modules=['moe_act', 'attn']: expected a non-empty list of core_attn, mlp, moe"]),
    (["recompute_granularity=everything"], ["recompute_granularity='everything': expected one"]),
])
def test_recompute_settings_are_checked_together(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, DENSE + overrides)
    assert len(err.value.problems) == len(expected), err.value.problems
    for problem, want in zip(err.value.problems, expected):
        assert want in problem, err.value.problems


def test_recompute_against_the_model_and_stages():
    full = ["recompute_granularity=full", "pipeline_model_parallel_size=2"]
    assert problems(DENSE + full + ["recompute_method=uniform", "recompute_num_layers=2"], 2) == []
    assert problems(DENSE + full + ["recompute_method=uniform", "recompute_num_layers=3"], 2) == [
        "recompute_num_layers=3: recompute_method=uniform needs it to divide the 2 layers of "
        "each pipeline stage"]
    assert problems(DENSE + full + ["recompute_method=block", "recompute_num_layers=3"], 2) == [
        "recompute_num_layers=3: recompute_method=block recomputes at most the 2 layers of each "
        "pipeline stage"]
    selective = ["recompute_granularity=selective"]
    assert problems(DENSE + selective + ["recompute_modules=[moe,shared_experts,mla_up_proj]"],
                    1) == [
        "recompute_modules: moe: the model has no MoE layers to recompute",
        "recompute_modules: shared_experts: the model has no shared experts to recompute",
        "recompute_modules: mla_up_proj: the model has no multi-latent attention to recompute"]
    assert problems(MOE + selective + ["recompute_modules=[mlp]"], 1) == [
        "recompute_modules: mlp: the model has no dense MLP layers to recompute"]
    assert problems(MOE + selective + ["recompute_modules=[mlp]",
                                       "moe_layer_freq=[0,1,1,1]"], 1) == []
