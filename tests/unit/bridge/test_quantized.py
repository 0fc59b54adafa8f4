"""FP8-block and AWQ sources: dequantized as read (against an independent torch dequantization),
slices read only their bytes, FP8 written back bit for bit, plain exports without
quantization_config. Tiny Llama with dims that are not multiples of 128 (ragged blocks and
groups; TP2 slices start inside a block, a group and a packed word)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mswift.bridge.convert import hf_to_mcore, mcore_to_hf
from mswift.bridge.errors import BridgeError
from mswift.bridge.quantized import encode_fp8, open_checkpoint, unpack_awq
from mswift.testing.hf_models import read_safetensors_dir, save_tiny_hf_model
from mswift.testing.quant_checkpoints import (
    BLOCK,
    fp8_dequantize,
    pack_nibbles,
    save_awq_checkpoint,
    save_fp8_checkpoint,
    save_twin,
)

# hidden 216 = 128 + 88, MLP 328 = 2 x 128 + 72, 3 query heads per KV group, vocab 250
LLAMA = dict(hidden_size=216, intermediate_size=328, num_attention_heads=6,
             num_key_value_heads=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    plain = save_tiny_hf_model("llama", root / "plain", **LLAMA)
    plain_bf16 = save_tiny_hf_model("llama", root / "plain_bf16", dtype=torch.bfloat16, seed=1,
                                    **LLAMA)
    out = {"root": root, "fp8": save_fp8_checkpoint(plain, root / "fp8"),
           "awq": save_awq_checkpoint(plain, root / "awq"),
           "fp8_bf16": save_fp8_checkpoint(plain_bf16, root / "fp8_bf16")}
    for name in ("fp8", "awq", "fp8_bf16"):
        out[name + "_twin"] = save_twin(out[name], root / f"{name}_twin")
    return out


def stored(path):
    """Tensors with FP8 ones as their bytes (torch.equal compares fp8 only through this)."""
    return {k: v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v
            for k, v in read_safetensors_dir(path).items()}


def assert_same_files(a, b):
    a, b = stored(a), stored(b)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", ["fp8", "awq"])
def test_reader_equals_independent_dequantization(dirs, kind):
    ckpt = open_checkpoint(dirs[kind])
    twin = read_safetensors_dir(dirs[kind + "_twin"])
    assert sorted(ckpt.names) == sorted(twin)
    quantized = 0
    for name, ref in twin.items():
        assert torch.equal(ckpt.read(name), ref), name
        if ref.dim() != 2 or ckpt.shape(name) != tuple(ref.shape):
            continue
        quantized += name.startswith("model.layers.")
        for dim in (0, 1):
            size = ref.shape[dim]
            for start, stop in ((0, size // 2), (size // 2, size), (3, size - 5), (size - 2, size - 1)):
                got = ckpt.read(name, dim, start, stop)
                assert torch.equal(got, ref.narrow(dim, start, stop - start)), (name, dim, start)
    assert quantized == 2 * 7


def test_awq_nibble_order():
    # AutoAWQ packs column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i] into nibble i of word c
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_awq(word).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]
    values = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_awq(pack_nibbles(values)), values.int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_requantization_with_stored_scales_is_exact(dtype):
    """Every finite e4m3 value, times scales across 2^-24..2^6, dequantized to the training
    dtype, quantized again with the same scales: the same bytes, ragged blocks included."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    q = codes[torch.randint(0, len(codes), (200, 328), generator=gen)].view(torch.float8_e4m3fn)
    q[:3, :len(codes)] = codes.view(torch.float8_e4m3fn)  # each value at least once
    scale = torch.exp2(torch.empty(2, 3).uniform_(-24, 6, generator=gen))
    w = fp8_dequantize(q, scale).to(dtype)
    q2, scale2, fresh = encode_fp8(w, scale, BLOCK)
    assert fresh == 0 and torch.equal(scale2, scale)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_fp8_trained_blocks_get_fresh_scales():
    gen = torch.Generator().manual_seed(1)
    w0 = 0.1 * torch.randn(200, 328, generator=gen)
    block_amax = torch.stack([torch.stack([w0[i:i + 128, j:j + 128].abs().max()
                                           for j in (0, 128, 256)]) for i in (0, 128)])
    scale = block_amax / 448
    q = (w0 / scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :328]).to(
        torch.float8_e4m3fn)
    w = fp8_dequantize(q, scale)
    w[150, 300] += 1.0  # a training step changed the ragged corner block (1, 2)
    q2, scale2, fresh = encode_fp8(w, scale, BLOCK)
    assert fresh == 1
    assert torch.allclose(scale2[1, 2], w[128:, 256:].abs().max() / 448, rtol=0, atol=0)
    kept = torch.ones(2, 3, dtype=torch.bool)
    kept[1, 2] = False
    assert torch.equal(scale2[kept], scale[kept])
    assert torch.equal(q2[:128].view(torch.uint8), q[:128].view(torch.uint8))
    back = fp8_dequantize(q2, scale2)
    corner = (back - w)[128:, 256:].abs().max()
    assert corner <= w[128:, 256:].abs().max() / 16  # within e4m3's relative step
    assert torch.isclose(back[150, 300], w[150, 300], rtol=1e-6, atol=0)  # the amax: 448 * s


def test_tp_slice_reads_only_its_rows_and_scale_blocks(tmp_path):
    """A TP2 row slice (column-parallel layers) of a large FP8 weight reads half of it
    (``/proc/self/io``: bytes this process read) and its scale rows, not the whole tensor.
    (A column slice reads the file span from its first to its last byte, as for plain
    tensors: :class:`~mswift.bridge.safetensors_file.SafetensorsFile`.)"""
    (tmp_path / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}))
    q = torch.zeros(1000, 4000, dtype=torch.float8_e4m3fn)
    save_file({"w.weight": q, "w.weight_scale_inv": torch.ones(8, 32)},
              tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)

    def read_bytes(*args):
        before = _rchar()
        ckpt.read("w.weight", *args)
        return _rchar() - before

    whole = read_bytes()
    assert whole >= 4_000_000
    half = read_bytes(0, 500, 1000)
    assert half <= 0.5 * whole + 5 * 32 * 4, (half, whole)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def test_converted_weights_equal_the_twins(dirs):
    """hf_to_mcore of a quantized source == of its dequantized twin, rank file by rank file."""
    for kind in ("fp8", "awq"):
        for source in (kind, kind + "_twin"):
            hf_to_mcore(dirs[source], dirs["root"] / f"mc_{source}", "legacy", tp=2,
                        progress=False)
        for rank in ("mp_rank_00", "mp_rank_01"):
            got, want = (torch.load(dirs["root"] / f"mc_{s}/iter_0000000/{rank}/model_optim_rng.pt",
                                    weights_only=False)["model"] for s in (kind, kind + "_twin"))
            assert set(got) == set(want)
            for name, tensor in want.items():
                if isinstance(tensor, torch.Tensor):
                    assert torch.equal(got[name], tensor), (kind, rank, name)


@pytest.mark.parametrize("fmt,tp,dtype", [("legacy", 2, None), ("legacy", 1, "fp32"),
                                          ("torch_dist", 1, None)])
def test_fp8_round_trip_is_bit_exact(dirs, fmt, tp, dtype):
    out = dirs["root"] / f"rt-{fmt}-{tp}-{dtype}"
    hf_to_mcore(dirs["fp8_bf16"], out, fmt, tp=tp, dtype=dtype, progress=False)
    mcore_to_hf(out, out.with_name(out.name + "-hf"), progress=False)
    assert_same_files(out.with_name(out.name + "-hf"), dirs["fp8_bf16"])
    for name in ("config.json", "tokenizer.json"):
        assert ((out.with_name(out.name + "-hf") / name).read_bytes()
                == (dirs["fp8_bf16"] / name).read_bytes())


@pytest.mark.parametrize("kind,dtype", [("fp8_bf16", "bf16"), ("awq", None)])
def test_plain_exports(dirs, kind, dtype):
    """--dtype bf16 of an FP8 model, and any export of an AWQ one: bf16 weights (the twin's,
    cast), config.json without quantization_config."""
    mc, out = dirs["root"] / f"plain-{kind}", dirs["root"] / f"plain-{kind}-hf"
    hf_to_mcore(dirs[kind], mc, "legacy", progress=False, dtype="fp32")
    mcore_to_hf(mc, out, progress=False, dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    got, twin = read_safetensors_dir(out), read_safetensors_dir(dirs[kind + "_twin"])
    assert set(got) == set(twin)
    for name, tensor in twin.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name],
                                                                 tensor.bfloat16()), name


def test_bad_quantization_config_is_refused(dirs, tmp_path):
    config = json.loads((dirs["fp8"] / "config.json").read_text())
    config["quantization_config"].update(weight_block_size=[128], scale_fmt="ue8m0")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BridgeError) as err:
        open_checkpoint(tmp_path)
    assert "weight_block_size" in str(err.value) and "scale_fmt" in str(err.value)
    config["quantization_config"] = {"quant_method": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BridgeError, match="gptq"):
        open_checkpoint(tmp_path)
