"""The other formats of ``mswift export``: W8A8 int, FP8 per channel and per 128x128 block
(compressed-tensors), DeepSeek-V3's own FP8 block layout, a tiny Qwen3-MoE (experts quantized,
routers kept) exported alike from a TP1 and a TP2/EP2 checkpoint, and the 16-bit export."""
from __future__ import annotations

import json

import pytest
import torch

from mswift.bridge.convert import hf_to_mcore
from mswift.export.cli import main
from mswift.export.qweight import dequantize, dequantize_fp8, fp8_quantize, rtn_quantize
from mswift.testing.compressed import ct_decompressed
from mswift.testing.hf_models import read_safetensors_dir, save_tiny_hf_model

TOKENS = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 8]])


def fake_quantize_input(x: torch.Tensor, activations: str | None) -> torch.Tensor:
    """A linear's input as W8A8 / FP8 schemes quantize it dynamically, written out from the
    symmetric rule: per token (``int8``, ``fp8``) or per 128 columns (``fp8-group``),
    ``scale = max|x| / 127.5`` (int8: (127 - -128) / 2) or ``/ 448`` (e4m3)."""
    if activations is None:
        return x
    shape = x.shape
    groups = x.reshape(*shape[:-1], -1, 128) if activations == "fp8-group" else x.unsqueeze(-2)
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    if activations == "int8":
        scale = absmax / 127.5
        q = torch.clamp(torch.round(groups / scale), -128, 127)
    else:
        scale = absmax / 448.0
        q = (groups / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (q * scale).reshape(shape)


ACTIVATIONS = {"int8": "int8", "fp8-channel": "fp8", "fp8-block": "fp8-group"}


def reference_logits(hf_dir, weights: dict[str, torch.Tensor], tmp_path,
                     activations: str | None = None, bf16_experts: bool = False
                     ) -> torch.Tensor:
    """transformers' fp32 logits of the HF model at ``hf_dir`` with ``weights`` replaced,
    saved as a plain checkpoint (transformers fuses a MoE's experts itself when loading),
    each quantized linear's input quantized as ``activations`` says; ``bf16_experts``: the
    fused experts held in bf16 (as transformers holds the experts it dequantizes)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "reference"
    folder.mkdir()
    tensors = {**read_safetensors_dir(hf_dir), **{n: w.float() for n, w in weights.items()}}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if bf16_experts and name.endswith("mlp.experts"):
            module.to(torch.bfloat16)
        if name.endswith("proj"):
            module.register_forward_pre_hook(
                lambda mod, args: (fake_quantize_input(args[0], activations),))
    with torch.no_grad():
        return model(TOKENS).logits


def loaded_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert model.generate(TOKENS, max_new_tokens=3, do_sample=False).shape == (1, 11)
        return model(TOKENS).logits


def export(ckpt, out, *extra) -> None:
    assert main(["--load", str(ckpt), "--out", str(out), "--no-progress", "--no-report",
                 *extra]) == 0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Every quantized dimension a multiple of 128 (compressed-tensors' FP8 blocks)."""
    root = tmp_path_factory.mktemp("formats")
    hf = save_tiny_hf_model("llama", root / "hf", vocab_size=300, seed=5, hidden_size=128,
                            intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                            head_dim=32, num_hidden_layers=2)
    hf_to_mcore(hf, root / "ckpt", "torch_dist", progress=False)
    return hf, root / "ckpt"


@pytest.mark.parametrize("scheme, fmt", [("int8", "int-quantized"),
                                         ("fp8-channel", "float-quantized"),
                                         ("fp8-block", "float-quantized")])
def test_scheme_files_and_transformers_logits(llama, tmp_path, scheme, fmt):
    hf, ckpt = llama
    export(ckpt, tmp_path / scheme, "--quant", scheme)
    out = tmp_path / scheme
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt and qc["quant_method"] == "compressed-tensors"
    original = read_safetensors_dir(hf)
    decompressed = ct_decompressed(out)
    assert set(decompressed) == {n for n in original if n.endswith("proj.weight")}
    for name, got in decompressed.items():
        w = original[name].float()
        if scheme == "int8":
            want = dequantize(rtn_quantize(w, bits=8, group_size=w.shape[1]), got.dtype)
        else:
            want = dequantize_fp8(fp8_quantize(w, None if scheme == "fp8-channel" else
                                               (128, 128)), got.dtype)
        assert torch.equal(got, want), name
    want = reference_logits(hf, ct_decompressed(out, torch.float32), tmp_path,
                            ACTIVATIONS[scheme])
    torch.testing.assert_close(loaded_logits(out), want, rtol=0, atol=1e-4)


def test_deepseek_v3_fp8_block_is_deepseeks_layout_read_back_bit_exact(tmp_path):
    from mswift.bridge.quantized import open_checkpoint

    hf = save_tiny_hf_model("deepseek_v3", tmp_path / "hf", vocab_size=300, seed=2)
    hf_to_mcore(hf, tmp_path / "ckpt", "torch_dist", progress=False)
    export(tmp_path / "ckpt", tmp_path / "fp8", "--quant", "fp8-block")
    out = tmp_path / "fp8"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                  "weight_block_size": [128, 128]}
    stored, original = read_safetensors_dir(out), read_safetensors_dir(hf)
    back = open_checkpoint(out)  # the bridge's reader of DeepSeek's release layout
    quantized = [n for n in original if n.endswith(("proj.weight", "proj_with_mqa.weight"))]
    assert quantized and "model.layers.1.mlp.experts.7.down_proj.weight" in quantized
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in quantized  # as released
    for name in quantized:
        assert stored[name].dtype == torch.float8_e4m3fn
        assert stored[name + "_scale_inv"].dtype == torch.float32
        want = dequantize_fp8(fp8_quantize(original[name].float(), (128, 128)))
        assert torch.equal(back.read(name), want), name
    assert torch.equal(stored["model.layers.1.mlp.gate.weight"],
                       original["model.layers.1.mlp.gate.weight"])
    loaded_logits(out)  # transformers dequantizes it on CPU (to bf16) and generates


def test_qwen3_moe_tp2_ep2_export_equals_tp1_experts_quantized_router_kept(tmp_path):
    hf = save_tiny_hf_model("qwen3_moe", tmp_path / "hf", vocab_size=300, seed=4)
    hf_to_mcore(hf, tmp_path / "tp1", "torch_dist", progress=False)
    hf_to_mcore(hf, tmp_path / "tp2ep2", "legacy", tp=2, ep=2, progress=False)
    for ckpt in ("tp1", "tp2ep2"):
        export(tmp_path / ckpt, tmp_path / f"w4-{ckpt}", "--quant", "w4a16-rtn",
               "--group-size", "16")
    one, two = tmp_path / "w4-tp1", tmp_path / "w4-tp2ep2"
    assert (one / "config.json").read_text() == (two / "config.json").read_text()
    files = sorted(p.name for p in one.glob("*.safetensors"))
    assert files == sorted(p.name for p in two.glob("*.safetensors"))
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    qc = json.loads((one / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    original, stored = read_safetensors_dir(hf), read_safetensors_dir(one)
    decompressed = ct_decompressed(one)
    experts = [n for n in original if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3 and set(experts) <= set(decompressed)
    for name in experts:
        qw = rtn_quantize(original[name].float(), bits=4, group_size=16)
        assert torch.equal(decompressed[name], dequantize(qw, torch.bfloat16)), name
    assert torch.equal(stored["model.layers.1.mlp.gate.weight"],
                       original["model.layers.1.mlp.gate.weight"])
    # transformers dequantizes the experts it fuses in the scale's dtype (bf16) and keeps them
    # (and runs them) in it, the linears it keeps compressed in the model's (fp32)
    weights = {n: (decompressed[n] if n in experts else w)
               for n, w in ct_decompressed(one, torch.float32).items()}
    want = reference_logits(hf, weights, tmp_path, bf16_experts=True)
    torch.testing.assert_close(loaded_logits(one), want, rtol=0, atol=1e-5)


def test_none_is_the_16bit_export(llama, tmp_path):
    hf, ckpt = llama
    export(ckpt, tmp_path / "plain", "--quant", "none")
    got, want = read_safetensors_dir(tmp_path / "plain"), read_safetensors_dir(hf)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_report_of_a_checkpoint_with_padded_heads(tmp_path):
    """A model padded for TP (SmolLM2's 9 heads -> 12; tied embeddings, as SmolLM2): the megatron
    model keeps the padding, the export drops it; the report's perplexities are transformers'
    on the same rows (the export loads: lm_head, not stored, is in the ignore list)."""
    import math

    from transformers import AutoModelForCausalLM

    from mswift.bridge.head_padding import pad_heads, write_padding_record
    from mswift.export.calibration import calibration_samples

    original = save_tiny_hf_model("llama", tmp_path / "hf", vocab_size=300, seed=7,
                                  num_attention_heads=6, num_key_value_heads=3, hidden_size=96,
                                  num_hidden_layers=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    config, state = model.config, dict(model.state_dict())
    padding = pad_heads(state, config, tp=2)  # 3 KV groups -> 4, as examples/smollm2 does
    padded = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    padded.load_state_dict(state)
    padded.save_pretrained(tmp_path / "padded")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "padded" / name).write_bytes((original / name).read_bytes())
    write_padding_record(tmp_path / "padded", padding)
    hf_to_mcore(tmp_path / "padded", tmp_path / "ckpt", "torch_dist", progress=False)
    rows = tmp_path / "rows.jsonl"
    words = [" ".join(f"w{(i * 11 + j * 5) % 290}" for j in range(16)) for i in range(3)]
    rows.write_text("".join(json.dumps({"text": text}) + "\n" for text in words))
    out = tmp_path / "w4"
    assert main(["--load", str(tmp_path / "ckpt"), "--out", str(out), "--no-progress",
                 "--quant", "w4a16-rtn", "--group-size", "16", "--eval-dataset", str(rows)]) == 0
    assert read_safetensors_dir(out)["model.layers.0.self_attn.o_proj.weight_packed"].shape[1] \
        == 96 * 4 // 32  # o_proj's 96 real input columns, packed 8 a word
    samples = calibration_samples(rows, original, 16, 512)

    def ppl(folder):
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            losses = [m(t, labels=t).loss.item() * (t.shape[1] - 1) for t in samples]
        return math.exp(sum(losses) / sum(t.shape[1] - 1 for t in samples))

    report = json.loads((out / "quant_report.json").read_text())
    assert report["eval_rows"] == 3
    assert report["ppl_16bit"] == pytest.approx(ppl(original), rel=1e-4)
    assert report["ppl_quantized"] == pytest.approx(ppl(out), rel=1e-4)


def test_llama4_stacked_experts_are_quantized_per_expert_and_load_in_transformers(tmp_path):
    """Llama-4 stores its routed experts stacked ([E, H, 2I] gate;up and [E, I, H] down,
    input-major); transformers, given a quantization config, builds a Linear per expert, so
    the export writes each expert's weights ([out, in]) compressed in their place."""
    import re

    from transformers import AutoModelForImageTextToText

    from mswift.testing.hf_models import save_tiny_llama4_multimodal

    hf = save_tiny_llama4_multimodal(tmp_path / "hf", seed=3)
    hf_to_mcore(hf, tmp_path / "ckpt", "torch_dist", progress=False)
    rows = [{"text": " ".join(f"w{(i * 7 + j * 13) % 200}" for j in range(20 + i))}
            for i in range(6)]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for quant in ("w4a16-rtn", "w4a16-gptq"):
        assert main(["--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / quant),
                     "--no-progress", "--quant", quant, "--group-size", "16", "--calib-dataset",
                     str(calib), "--calib-samples", "4", "--eval-samples", "2"]) == 0
    out = tmp_path / "w4a16-rtn"
    gptq = ct_decompressed(tmp_path / "w4a16-gptq", torch.float32)
    original, stored = read_safetensors_dir(hf), read_safetensors_dir(out)
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in stored)
    decompressed = ct_decompressed(out, torch.float32)
    stacked = {n: t for n, t in original.items()
               if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert len(stacked) == 4  # layers 1 and 3 are MoE
    for name, t in stacked.items():
        experts, inner = t.shape[0], t.shape[2] // 2
        for e in range(experts):
            prefix = name.rsplit(".", 1)[0] + f".{e}."
            if name.endswith("down_proj"):
                want = {prefix + "down_proj.weight": t[e].t()}
            else:
                want = {prefix + "gate_proj.weight": t[e][:, :inner].t(),
                        prefix + "up_proj.weight": t[e][:, inner:].t()}
            for n, w in want.items():  # RTN of each expert's own [out, in] weight
                qw = rtn_quantize(w.float(), bits=4, group_size=16)
                assert torch.equal(decompressed[n], dequantize(qw)), n
                assert gptq[n].shape == w.shape, n
    experts = [n for n in decompressed if re.search(r"experts\.\d+\.", n)]
    assert len(experts) == 2 * 4 * 3 and set(gptq) == set(decompressed)
    # the loaded model's logits are the reference's with the dequantized weights put back
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.tensor([[5, 17, 150, 3, 99, 42, 7, 8]])
    with torch.no_grad():
        for name, w in decompressed.items():
            if name not in experts:
                reference.get_parameter(name).copy_(w)
        for name, t in stacked.items():
            inner = t.shape[2] // 2
            prefix = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if name.endswith("down_proj"):
                    rebuilt = decompressed[f"{prefix}.{e}.down_proj.weight"].t()
                else:
                    rebuilt = torch.cat([decompressed[f"{prefix}.{e}.gate_proj.weight"].t(),
                                         decompressed[f"{prefix}.{e}.up_proj.weight"].t()], 1)
                assert rebuilt.shape == (t.shape[1], 2 * inner if "gate" in name else t.shape[2])
                reference.get_parameter(name)[e].copy_(rebuilt)
        torch.testing.assert_close(model(input_ids=tokens).logits,
                                   reference(input_ids=tokens).logits, rtol=0, atol=1e-4)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "language_model.model.layers.1.feed_forward.router" in qc["ignore"]
    assert "vision_model.patch_embedding.linear" in qc["ignore"]  # a Linear kept 16-bit
    report = json.loads((out / "quant_report.json").read_text())
    assert report["quantized_weights"] == len(decompressed)


def test_deepseek_v3_w4a16_gptq_experts_and_mla_load_in_transformers(tmp_path):
    """DeepSeek-V3 (MLA's low-rank projections, shared and routed experts, a dense first
    layer) calibrated and GPTQ-quantized: every linear compressed, the router kept, and
    transformers' logits those of the dequantized weights."""
    hf = save_tiny_hf_model("deepseek_v3", tmp_path / "hf", vocab_size=300, seed=2)
    hf_to_mcore(hf, tmp_path / "ckpt", "torch_dist", progress=False, tp=2, ep=2)
    rows = [{"text": " ".join(f"w{(i * 7 + j * 13) % 290}" for j in range(24 + i))}
            for i in range(8)]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "w4"
    assert main(["--load", str(tmp_path / "ckpt"), "--out", str(out), "--no-progress",
                 "--quant", "w4a16-gptq", "--group-size", "8", "--calib-dataset", str(calib),
                 "--calib-samples", "6", "--eval-samples", "2"]) == 0
    original = read_safetensors_dir(hf)
    decompressed = ct_decompressed(out)
    linears = {n for n in original if n.endswith(("proj.weight", "proj_with_mqa.weight"))}
    assert set(decompressed) == linears
    assert {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
            "model.layers.1.mlp.shared_experts.down_proj.weight",
            "model.layers.1.mlp.experts.7.up_proj.weight"} <= linears
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.gate" in qc["ignore"]
    assert torch.equal(read_safetensors_dir(out)["model.layers.1.mlp.gate.weight"],
                       original["model.layers.1.mlp.gate.weight"])
    experts = {n for n in linears if ".mlp.experts." in n}
    weights = {n: (decompressed[n] if n in experts else w)
               for n, w in ct_decompressed(out, torch.float32).items()}
    want = reference_logits(hf, weights, tmp_path, bf16_experts=True)
    torch.testing.assert_close(loaded_logits(out), want, rtol=0, atol=1e-4)
    # AWQ's groups are Llama-style layers': refused by name, nothing written
    assert main(["--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "awq"),
                 "--quant", "w4a16-awq", "--calib-dataset", str(calib)]) == 2
    assert not (tmp_path / "awq").exists() and not (tmp_path / "awq.tmp").exists()
