"""DeepSeek-V3 stored the released ways: FP8 (float8_e4m3fn + 128 x 128 ``weight_scale_inv``;
router, embeddings, head, norms and the MTP layer's ``eh_proj`` / copies left in bf16, as
released) and AWQ GEMM, with an MTP layer. Converted to megatron, both equal the conversion of
their fp32-dequantized twin (MTP mapped by ``mtp_num_layers`` included); HF(FP8) -> megatron
-> HF gives back every stored tensor bit for bit, weights and scales, MTP ones included, with
the MTP layer carried in ``hf/`` and with it trained. The logits: tests/distributed/
test_quantized_sources.py. Ragged blocks: ``kv_a_proj_with_mqa`` has 136 + 8 = 144 rows (the
latent / RoPE split inside the second block), ``q_b_proj`` 6 x 24 = 144."""
import pytest
import torch

from mswift.bridge.convert import hf_to_mcore, mcore_to_hf
from mswift.bridge.hf_io import HFCheckpoint
from mswift.testing.hf_models import add_tiny_mtp_layer, save_tiny_hf_model
from mswift.testing.quant_checkpoints import save_awq_checkpoint, save_fp8_checkpoint, save_twin
from test_quantized import assert_same_files

LAYERS = 4  # the family's debug config; the MTP layer is model.layers.4
SIZES = dict(kv_lora_rank=136)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv3_quant")
    plain = add_tiny_mtp_layer(save_tiny_hf_model("deepseek_v3", root / "plain", **SIZES))
    bf16 = add_tiny_mtp_layer(save_tiny_hf_model("deepseek_v3", root / "bf16", seed=3,
                                                 dtype=torch.bfloat16, **SIZES))
    out = {"root": root, "fp8": save_fp8_checkpoint(plain, root / "fp8"),
           "awq": save_awq_checkpoint(plain, root / "awq"),
           "fp8_bf16": save_fp8_checkpoint(bf16, root / "fp8_bf16")}
    for name in ("fp8", "awq"):
        out[name + "_twin"] = save_twin(out[name], root / f"{name}_twin")
    return out


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_left_behind():
    """The conversions here leave a one-rank process group initialised in this process (cause
    not found yet); later in-process tests (test_dist_bytes) require that none is."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_stored_the_released_way(dirs):
    raw = HFCheckpoint(dirs["fp8_bf16"])
    fp8 = {n for n in raw.names if raw.kind(n).name == "float8_e4m3fn"}
    mtp = f"model.layers.{LAYERS}."
    assert {mtp + "self_attn.kv_a_proj_with_mqa.weight", mtp + "mlp.experts.0.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight"} <= fp8
    assert raw.shape("model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv") == (2, 1)
    for plain in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                  mtp + "eh_proj.weight", mtp + "embed_tokens.weight",
                  mtp + "shared_head.head.weight"):
        assert raw.kind(plain).name == "bfloat16", plain


def _rank_files(root):
    return {path.parent.name: torch.load(path, weights_only=False)["model"]
            for path in sorted(root.glob("iter_*/mp_rank_*/model_optim_rng.pt"))}


@pytest.mark.parametrize("kind", ["fp8", "awq"])
def test_converted_weights_equal_the_twins(dirs, kind):
    """TP2 slices start inside scale blocks; the MTP layer trained (mapped to mtp.layers.0)."""
    root = dirs["root"]
    for source in (kind, kind + "_twin"):
        hf_to_mcore(dirs[source], root / f"mc_{source}", "legacy", tp=2, mtp_num_layers=1,
                    progress=False)
    got, want = _rank_files(root / f"mc_{kind}"), _rank_files(root / f"mc_{kind}_twin")
    assert set(got) == set(want) == {"mp_rank_00", "mp_rank_01"}
    for rank, tensors in want.items():
        assert set(got[rank]) == set(tensors)
        assert any(n.startswith("mtp.layers.0.transformer_layer.mlp.experts") for n in tensors)
        for name, tensor in tensors.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(got[rank][name], tensor), (kind, rank, name)


@pytest.mark.parametrize("fmt,tp,mtp", [("legacy", 2, None), ("torch_dist", 1, 1),
                                        ("legacy", 1, 1)])
def test_fp8_round_trip_is_bit_exact(dirs, fmt, tp, mtp):
    src, out = dirs["fp8_bf16"], dirs["root"] / f"rt-{fmt}-{tp}-{mtp}"
    hf_to_mcore(src, out, fmt, tp=tp, mtp_num_layers=mtp, progress=False)
    carried = HFCheckpoint(out / "hf").names if list((out / "hf").glob("model*.safetensors")) \
        else []
    if mtp is None:  # the MTP layer carried as stored: FP8 weights with their scales
        assert f"model.layers.{LAYERS}.self_attn.q_b_proj.weight_scale_inv" in carried
    else:
        assert not carried
    back = mcore_to_hf(out, out.with_name(out.name + "-hf"), progress=False)
    assert_same_files(back, src)
    assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()
