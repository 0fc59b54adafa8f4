"""DeepSeek-V3's multi-token-prediction layer (``model.layers.{num_hidden_layers}.*``, which
transformers neither builds nor saves) is carried through every conversion byte for byte
without ``mtp_num_layers``, and mapped to megatron-core's MTP block with it: either way
HF -> torch_dist / legacy (PP2, MTP on the last stage) -> HF gives back every tensor, MTP ones
included, bit-exact; a mapped conversion refuses a checkpoint whose MTP ``embed_tokens`` /
``shared_head.head`` differ from the main model's (megatron-core shares those); a checkpoint
saved by transformers (config with ``num_nextn_predict_layers`` but no MTP tensors) still
converts. The MTP tensors are written here with the release's names and shapes
(../shared/MODELS.md): ``enorm``, ``hnorm``, ``eh_proj`` [H, 2H], ``shared_head.norm``, a whole
MoE decoder layer, and the duplicated ``embed_tokens`` / ``shared_head.head`` [V, H]."""
import json

import pytest
import torch

from mswift.bridge.convert import hf_to_mcore, mcore_to_hf
from mswift.bridge.errors import BridgeError
from mswift.bridge.hf_io import HFCheckpoint
from mswift.testing.hf_models import add_tiny_mtp_layer, save_tiny_hf_model
from test_dist_bytes import assert_same_hf

LAYERS = 4  # the family's debug config


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {dtype: add_tiny_mtp_layer(save_tiny_hf_model("deepseek_v3", root / dtype,
                                                         dtype=getattr(torch, dtype)),
                                      same_copies=False)
            for dtype in ("bfloat16", "float32")}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The MTP layer as released: its embed_tokens / shared_head.head equal the main ones."""
    root = tmp_path_factory.mktemp("released")
    return add_tiny_mtp_layer(save_tiny_hf_model("deepseek_v3", root / "bf16",
                                                 dtype=torch.bfloat16))


@pytest.mark.parametrize("fmt,pp", [("torch_dist", 1), ("legacy", 2)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_mtp_layer_round_trips_bit_exact(hf, tmp_path, dtype, fmt, pp):
    src = hf[dtype]
    mtp = [n for n in HFCheckpoint(src).names if n.startswith(f"model.layers.{LAYERS}.")]
    assert len(mtp) > 20
    root = hf_to_mcore(src, tmp_path / "mcore", fmt, pp=pp, progress=False)
    assert set(HFCheckpoint(root / "hf").names) == set(mtp)  # the sidecar: MTP tensors only
    back = mcore_to_hf(root, tmp_path / "back", progress=False)
    assert set(mtp) <= set(HFCheckpoint(back).names)
    assert_same_hf(back, src)  # every tensor, MTP ones included, bit for bit


def test_a_checkpoint_without_its_mtp_layer_still_converts(tmp_path):
    """transformers saves no MTP tensors even when config.json counts an MTP layer."""
    src = save_tiny_hf_model("deepseek_v3", tmp_path / "hf", num_nextn_predict_layers=1)
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1
    root = hf_to_mcore(src, tmp_path / "mcore", "torch_dist", progress=False)
    assert_same_hf(mcore_to_hf(root, tmp_path / "back", progress=False), src)


def _stored_mtp_names(root, fmt):
    """The parameter names of the MTP block stored in a megatron checkpoint."""
    if fmt == "legacy":
        files = sorted(root.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
        return {k for f in files for k in torch.load(f, weights_only=False)["model"]
                if k.startswith("mtp.") and not k.endswith("_extra_state")}
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(next(root.glob("iter_*")))).read_metadata().state_dict_metadata
    return {k for k in keys if k.startswith("mtp.") and "_extra_state" not in k}


@pytest.mark.parametrize("fmt,pp,grouped", [("torch_dist", 1, False), ("legacy", 2, False),
                                           ("legacy", 1, True)])
def test_trained_mtp_layer_round_trips_bit_exact(released, tmp_path, fmt, pp, grouped):
    root = hf_to_mcore(released, tmp_path / "mcore", fmt, pp=pp, progress=False,
                       mtp_num_layers=1, grouped_experts=grouped)
    assert not list((root / "hf").glob("*.safetensors"))  # nothing carried: all in megatron
    stored = _stored_mtp_names(root, fmt)
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight",
                 "transformer_layer.self_attention.linear_kv_up_proj.weight"):
        assert any(name.endswith(part) for name in stored), part
    back = mcore_to_hf(root, tmp_path / "back", progress=False)
    assert_same_hf(back, released)  # the copies written from the main tensors, bit for bit


def test_mtp_copies_that_differ_from_the_main_tensors_are_refused(hf, tmp_path):
    with pytest.raises(BridgeError, match=rf"model\.layers\.{LAYERS}\.embed_tokens\.weight: "
                                          r"differs from model\.embed_tokens\.weight"):
        hf_to_mcore(hf["float32"], tmp_path / "mcore", "torch_dist", progress=False,
                    mtp_num_layers=1)


def test_mtp_settings_are_checked_by_name():
    from mswift.config.schema import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="mtp_num_layers=0: expected a positive number"):
        ModelConfig(mtp_num_layers=0, untie_embeddings_and_output_weights=True)
    with pytest.raises(ConfigError, match="mtp_num_layers=1: needs "
                                          "untie_embeddings_and_output_weights=true"):
        ModelConfig(mtp_num_layers=1, untie_embeddings_and_output_weights=False)


def test_mtp_layers_the_checkpoint_lacks_are_refused_by_name(tmp_path):
    from mswift.bridge.layout import HFModel
    from mswift.models.errors import ModelError

    plain = save_tiny_hf_model("deepseek_v3", tmp_path / "dsv3")  # num_nextn_predict_layers 0
    with pytest.raises(ModelError, match="mtp_num_layers=1: the checkpoint has "
                                         "num_nextn_predict_layers=0"):
        HFModel.open(plain, mtp_num_layers=1)
    llama = save_tiny_hf_model("llama", tmp_path / "llama", tie_word_embeddings=False)
    with pytest.raises(ModelError, match="the llama family has no multi-token-prediction"):
        HFModel.open(llama, mtp_num_layers=1)
