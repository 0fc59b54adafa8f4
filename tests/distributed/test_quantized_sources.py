"""FP8-block and AWQ checkpoints loaded into megatron-core at TP2 (Llama, DeepSeek-V3) and EP2
(Qwen3-MoE) give the logits of transformers' model of their dequantized weights (fp32, 1e-4),
and a TP2 model saved straight back to HF writes the FP8 file bit for bit (weights and scales;
DeepSeek-V3's MTP layer, stored FP8 as released, is carried beside the model, not saved here).
Ragged dims: hidden 216, MLP 328, expert MLP 136, DeepSeek-V3's kv_a_proj_with_mqa 136 + 8;
vocab 250."""
import pytest
import torch

from mswift.testing import run_ranks
from mswift.testing.hf_models import (
    add_tiny_mtp_layer,
    hf_logits,
    read_safetensors_dir,
    save_tiny_hf_model,
)
from mswift.testing.quant_checkpoints import save_awq_checkpoint, save_fp8_checkpoint, save_twin

TOL = 1e-4
SIZES = dict(hidden_size=216, intermediate_size=328, num_attention_heads=6,
             num_key_value_heads=2, num_hidden_layers=2)
MODELS = {"llama": ("llama", SIZES, {"tp": 2}),
          "qwen3_moe": ("qwen3_moe", {**SIZES, "head_dim": 32, "moe_intermediate_size": 136},
                        {"ep": 2}),
          # the family's debug config (q LoRA, 4 layers, layer 0 dense) with an MTP layer
          "deepseek_v3": ("deepseek_v3", {"kv_lora_rank": 136}, {"tp": 2})}
MTP_PREFIX = "model.layers.4."  # deepseek_v3's MTP layer (after its 4 decoder layers)


def run_cases(cases, tokens):
    from mswift.bridge import verify
    from mswift.bridge.dtypes import torch_dtype
    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model, save_model_to_hf
    from mswift.bridge.hf_io import HFCheckpoint
    from mswift.bridge.quantized import export_plan

    out = {}
    for case in cases:
        hf = HFModel.open(case["dir"])
        layout = Layout(**case["layout"])
        chunks = build_chunks(hf.run_config(layout, seq_length=tokens.shape[1]))
        wmap = hf.weight_map(hf.padded_vocab(layout.tp))
        load_hf_into_model(chunks, hf.hf_dir, wmap, hf.ignored_tensors)  # MTP: carried
        out[case["id"]] = megatron_logits(chunks, tokens, hf.model.vocab_size)
        if case.get("save"):
            ckpt = HFCheckpoint(hf.hf_dir)  # the stored dtypes: FP8 weights as FP8
            stored = {name: ckpt.kind(name) for name in ckpt.names}
            kinds, encoder, _ = export_plan(hf.hf_dir, wmap.hf_shapes(), stored, None)
            save_model_to_hf(chunks, wmap, case["save"],
                             {name: torch_dtype(kind) for name, kind in kinds.items()},
                             encoder=encoder)
    for case in cases:  # run_verify: main would end the process group
        if case.get("verify"):
            args = verify.parser().parse_args(["--hf-dir", case["dir"], "--tp", "2",
                                               "--seq-len", "12"])
            out[f"{case['id']}-verify"] = verify.run_verify(args)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(5))
    cases, references = [], {}
    for model, (family, sizes, layout) in MODELS.items():
        plain = save_tiny_hf_model(family, root / model, seed=7, **sizes)
        if family == "deepseek_v3":
            add_tiny_mtp_layer(plain)
        for kind, save in (("fp8", save_fp8_checkpoint), ("awq", save_awq_checkpoint)):
            cid = f"{model}-{kind}"
            quantized = save(plain, root / cid)
            references[cid] = hf_logits(save_twin(quantized, root / f"{cid}-twin"), tokens)
            case = {"id": cid, "dir": str(quantized), "layout": layout}
            if kind == "fp8":
                case["save"] = str(root / f"{cid}-saved")
            if family == "deepseek_v3":
                case["verify"] = True
            cases.append(case)
    per_rank = run_ranks(2, run_cases, sorted(cases, key=lambda c: sorted(c["layout"])), tokens,
                         timeout=300)
    return per_rank, references, {c["id"]: c for c in cases}


@pytest.mark.parametrize("cid", [f"{m}-{k}" for m in MODELS for k in ("fp8", "awq")])
def test_logits_equal_the_dequantized_model(setup, cid):
    per_rank, references, _ = setup
    for result in per_rank:
        diff = (result[cid] - references[cid]).abs().max().item()
        assert diff <= TOL, f"{cid}: max abs logit diff {diff:.3e}"


@pytest.mark.parametrize("kind", ["fp8", "awq"])
def test_verify_passes_a_quantized_deepseek_v3_against_its_dequantized_model(setup, kind):
    """``mswift verify --hf-dir`` on the quantized files: megatron-core at TP2 against
    transformers' model of the dequantized weights (exit code 0: within 1e-4)."""
    per_rank, _, _ = setup
    assert [result[f"deepseek_v3-{kind}-verify"] for result in per_rank] == [0, 0]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_sharded_fp8_model_saves_the_fp8_file(setup, model):
    _, _, cases = setup
    case = cases[f"{model}-fp8"]
    original, saved = (read_safetensors_dir(case[k]) for k in ("dir", "save"))
    original = {n: t for n, t in original.items() if not n.startswith(MTP_PREFIX)}
    assert set(saved) == set(original)
    for name, tensor in original.items():
        got = saved[name]
        assert got.dtype == tensor.dtype, name
        if tensor.dtype == torch.float8_e4m3fn:
            got, tensor = got.view(torch.uint8), tensor.view(torch.uint8)
        assert torch.equal(got, tensor), name
