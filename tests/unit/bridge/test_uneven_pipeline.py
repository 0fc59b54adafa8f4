"""Uneven pipelines (Megatron-LM's ``decoder_first/last_pipeline_num_layers``): the legacy
format's stage layers equal megatron-core's own offsets and counts (``get_transformer_layer_
offset`` / ``get_num_layers_to_build`` on a real TransformerConfig), the layout checks name a
split that does not add up, and HF -> legacy at PP2 (2 + 3 layers) -> HF is bit-exact with the
layers where megatron-core builds them (the logits at that split: test_deepseek_v3_logits)."""
import pytest
import torch

from mswift.bridge.convert import hf_to_mcore, mcore_to_hf, reshard
from mswift.bridge.layout import Layout
from mswift.bridge.legacy import FILE, chunk_layers, read_layout
from mswift.runtime.layout_checks import pipeline_split_problems
from mswift.testing.hf_models import save_tiny_hf_model
from test_dist_bytes import assert_same_hf

# (num_layers, pp, vpp, first, last)
SPLITS = [(5, 2, None, 2, 3), (5, 2, None, 2, None), (5, 2, None, None, 1), (10, 4, None, 1, 3),
          (9, 3, None, None, 1), (16, 3, 2, 2, 4), (12, 3, 2, None, 4), (8, 2, 2, None, None)]


@pytest.mark.parametrize("num_layers,pp,vpp,first,last", SPLITS)
def test_stage_layers_are_megatron_cores(num_layers, pp, vpp, first, last):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    assert pipeline_split_problems(num_layers, pp, vpp or 1, first, last) == []
    config = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=2,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               virtual_pipeline_model_parallel_size=vpp,
                               num_layers_in_first_pipeline_stage=first,
                               num_layers_in_last_pipeline_stage=last)
    layout = Layout(pp=pp, vpp=vpp, first=first, last=last)
    seen = []
    for rank in range(pp):
        for stage in range(vpp or 1):
            vp_stage = stage if vpp else None
            start = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=rank)
            count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=rank)
            assert chunk_layers(layout, rank, stage, num_layers) == range(start, start + count)
            seen += range(start, start + count)
    assert sorted(seen) == list(range(num_layers))


@pytest.mark.parametrize("num_layers,pp,vpp,first,last,named", [
    (5, 2, 1, 2, 2, "decoder_first_pipeline_num_layers=2, decoder_last_pipeline_num_layers=2: "
                    "must add up to num_layers=5"),
    (10, 4, 1, 1, 2, "the other 7 of num_layers=10 layers must split evenly over the 2 other"),
    (12, 2, 2, 3, None, "decoder_first_pipeline_num_layers=3: must be divisible by "
                        "virtual_pipeline_model_parallel_size=2"),
    (5, 2, 1, 6, None, "the other -1 of num_layers=5 layers"),
    (5, 2, 1, None, None, "pipeline_model_parallel_size=2: must divide num_layers=5"),
])
def test_a_split_that_does_not_add_up_is_named(num_layers, pp, vpp, first, last, named):
    problems = pipeline_split_problems(num_layers, pp, vpp, first, last)
    assert any(named in p for p in problems), problems


@pytest.fixture(scope="module")
def llama5(tmp_path_factory):
    return save_tiny_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama5",
                              dtype=torch.bfloat16, num_hidden_layers=5)


def stage_layers(root, stage: int) -> set[int]:
    state = torch.load(root / "iter_0000000" / f"mp_rank_00_{stage:03d}" / FILE,
                       weights_only=False)
    return {int(k.split(".")[2]) for k in state["model"] if k.startswith("decoder.layers.")}


def test_hf_to_legacy_at_an_uneven_split_and_back_is_bit_exact(llama5, tmp_path):
    root = hf_to_mcore(llama5, tmp_path / "pp2", "legacy", pp=2, first=2, last=3,
                       progress=False)
    layout, _ = read_layout(root)
    assert (layout.pp, layout.first, layout.last) == (2, 2, 3)
    assert stage_layers(root, 0) == {0, 1} and stage_layers(root, 1) == {0, 1, 2}
    first = torch.load(root / "iter_0000000" / "mp_rank_00_000" / FILE, weights_only=False)
    second = torch.load(root / "iter_0000000" / "mp_rank_00_001" / FILE, weights_only=False)
    # global layer 2 is the second stage's layer 0 (HF's layer 2, by its bytes)
    from mswift.bridge.hf_io import HFCheckpoint

    hf = HFCheckpoint(llama5)
    assert torch.equal(second["model"]["decoder.layers.0.self_attention.linear_proj.weight"],
                       hf.read("model.layers.2.self_attn.o_proj.weight"))
    assert torch.equal(first["model"]["decoder.layers.1.self_attention.linear_proj.weight"],
                       hf.read("model.layers.1.self_attn.o_proj.weight"))
    assert_same_hf(mcore_to_hf(root, tmp_path / "back", progress=False), llama5)
    # resharded to the other uneven split (3 + 2) and back to even-less PP1: still the same
    other = reshard(root, tmp_path / "pp2b", tp=1, pp=2, ep=1, first=3, last=2,
                    progress=False)
    assert stage_layers(other, 0) == {0, 1, 2} and stage_layers(other, 1) == {0, 1}
    assert_same_hf(mcore_to_hf(other, tmp_path / "back2", progress=False), llama5)


def test_an_uneven_split_that_does_not_fit_is_refused(llama5, tmp_path, capsys):
    from mswift.bridge.cli import hf_to_mcore_main

    argv = ["--hf-dir", str(llama5), "--out", str(tmp_path / "bad"), "--format", "legacy",
            "--pp", "2", "--decoder-first-pipeline-num-layers", "2",
            "--decoder-last-pipeline-num-layers", "2"]
    assert hf_to_mcore_main(argv) == 2
    assert "must add up to num_layers=5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
