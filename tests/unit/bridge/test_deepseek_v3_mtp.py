"""DeepSeek-V3's multi-token-prediction layer (``model.layers.{num_hidden_layers}.*``, which
transformers neither builds nor saves) is carried through every conversion byte for byte:
HF -> torch_dist / legacy (PP2) -> HF gives back every tensor, MTP ones included, bit-exact;
a checkpoint saved by transformers (config with ``num_nextn_predict_layers`` but no MTP
tensors) still converts. The MTP tensors are written here with the release's names and shapes
(../shared/MODELS.md): ``enorm``, ``hnorm``, ``eh_proj`` [H, 2H], ``shared_head.norm``, a whole
MoE decoder layer, and the duplicated ``embed_tokens`` / ``shared_head.head`` [V, H]."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mswift.bridge.convert import hf_to_mcore, mcore_to_hf
from mswift.bridge.hf_io import HFCheckpoint
from mswift.testing.hf_models import save_tiny_hf_model
from test_dist_bytes import assert_same_hf

LAYERS, H, V = 4, 64, 250  # the family's debug config


def add_mtp_layer(path):
    """Write an MTP layer (layer ``LAYERS``) into the tiny checkpoint at ``path``: its decoder
    layer shaped like the last (MoE) layer, random values."""
    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(files[0])
    dtype = tensors["model.embed_tokens.weight"].dtype
    generator = torch.Generator().manual_seed(11)
    mtp = f"model.layers.{LAYERS}."
    shapes = {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H),
              "shared_head.norm.weight": (H,), "shared_head.head.weight": (V, H),
              "embed_tokens.weight": (V, H)}
    last = f"model.layers.{LAYERS - 1}."
    shapes.update({name[len(last):]: tuple(t.shape) for name, t in tensors.items()
                   if name.startswith(last)})
    assert "mlp.gate.e_score_correction_bias" in shapes and "self_attn.kv_b_proj.weight" in shapes
    for name, shape in shapes.items():
        tensors[mtp + name] = torch.randn(shape, generator=generator).to(dtype)
    save_file(tensors, files[0], metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {dtype: add_mtp_layer(save_tiny_hf_model("deepseek_v3", root / dtype,
                                                    dtype=getattr(torch, dtype)))
            for dtype in ("bfloat16", "float32")}


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
