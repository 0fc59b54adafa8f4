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
    (DENSE + ["expert_model_parallel_size=2"], 2,
     "expert_model_parallel_size=2: needs an MoE model"),
    (MOE + ["tensor_model_parallel_size=2"], 2, "sequence_parallel=false: MoE with"),
    (DENSE + ["global_batch_size=6", "micro_batch_size=4"], 1,
     "global_batch_size=6: must be a multiple of micro_batch_size (4)"),
])
def test_bad_layout_is_named(overrides, world, expected):
    found = problems(overrides, world)
    assert any(expected in p for p in found), found


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
