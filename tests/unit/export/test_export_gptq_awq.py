"""``mswift export --quant w4a16-gptq / w4a16-awq`` of a tiny Llama (torch_dist) whose norms
have outlier channels: the exports load in transformers and generate, are closer to the 16-bit
model than RTN on held-out rows, GPTQ's files lower each linear's output error on
the calibration inputs (taken by hooks on transformers' model), and AWQ's norms are folded."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mswift.bridge.convert import hf_to_mcore
from mswift.export.calibration import calibration_samples
from mswift.export.cli import main
from mswift.export.qweight import dequantize, rtn_quantize
from mswift.testing.compressed import ct_decompressed
from mswift.testing.hf_models import read_safetensors_dir, save_tiny_hf_model

GROUP = 16
CALIB = 6


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_gptq_awq")
    hf = save_tiny_hf_model("llama", root / "hf", vocab_size=300, seed=5)
    state = read_safetensors_dir(hf)
    for name in state:  # a few channels 20x the rest, as trained LLMs have
        if name.endswith("layernorm.weight"):
            state[name][torch.arange(2, state[name].numel(), 13)] *= 20
    (file,) = hf.glob("*.safetensors")
    save_file(state, str(file), metadata={"format": "pt"})
    hf_to_mcore(hf, root / "ckpt", "torch_dist", progress=False)
    rows = [{"text": " ".join(f"w{(i * 11 + j * 17) % 290}" for j in range(24 + i))}
            for i in range(CALIB + 4)]
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"hf": hf, "calib": calib}
    for scheme in ("w4a16-gptq", "w4a16-awq"):
        out[scheme] = root / scheme
        assert main(["--load", str(root / "ckpt"), "--out", str(out[scheme]), "--quant", scheme,
                     "--group-size", str(GROUP), "--calib-dataset", str(calib),
                     "--calib-samples", str(CALIB), "--no-report", "--no-progress"]) == 0
    return out


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _rtn(folder):
    """The model of ``folder`` with RTN weights (what ``--quant w4a16-rtn`` writes, tested
    bit for bit in test_export.py)."""
    model = _load(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.copy_(dequantize(rtn_quantize(param, bits=4, group_size=GROUP)))
    return model


def test_exports_load_generate_and_beat_rtn_on_held_out_rows(exports):
    held_out = calibration_samples(exports["calib"], exports["hf"], 4, 64, skip=CALIB)
    reference = _load(exports["hf"])
    errors = {}
    for scheme in ("w4a16-gptq", "w4a16-awq", "w4a16-rtn"):
        if scheme == "w4a16-rtn":
            model = _rtn(exports["hf"])
        else:
            model = _load(exports[scheme])
            qc = json.loads((exports[scheme] / "config.json").read_text())["quantization_config"]
            assert qc["format"] == "pack-quantized"
            assert qc["config_groups"]["group_0"]["weights"]["group_size"] == GROUP
            with torch.no_grad():
                generated = model.generate(held_out[0][:, :5], max_new_tokens=3, do_sample=False)
            assert generated.shape == (1, 8)
        with torch.no_grad():
            errors[scheme] = sum((model(t).logits - reference(t).logits).pow(2).mean().item()
                                 for t in held_out)
    assert errors["w4a16-gptq"] < errors["w4a16-rtn"], errors
    assert errors["w4a16-awq"] < errors["w4a16-rtn"], errors


def test_gptq_lowers_every_linears_calibration_output_error(exports):
    """Per linear, ||(W - Q) X||^2 on the calibration inputs: GPTQ minimises it with the
    Hessian of exactly those inputs, so each linear's must sit below RTN's (a Hessian taken
    from the wrong linear, or none, would not)."""
    reference = _load(exports["hf"])
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in reference.named_modules():
        if name.endswith("proj"):
            module.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.setdefault(name + ".weight", []).append(
                    args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for tokens in calibration_samples(exports["calib"], exports["hf"], CALIB, 512):
            reference(tokens)
    gptq = ct_decompressed(exports["w4a16-gptq"], torch.float32)
    assert set(gptq) == set(inputs)
    for name, xs in inputs.items():
        x = torch.cat(xs)
        w = reference.get_parameter(name).detach()

        def error(quantized):
            return (x @ (quantized - w).T).pow(2).sum()

        rtn = dequantize(rtn_quantize(w, bits=4, group_size=GROUP))
        assert error(gptq[name]) < 0.9 * error(rtn), name


def test_awq_export_folds_its_scales_into_the_norms(exports):
    original = read_safetensors_dir(exports["hf"])
    stored = read_safetensors_dir(exports["w4a16-awq"])
    norms = [n for n in original if n.endswith("layernorm.weight")]
    assert norms and all(not torch.equal(stored[n], original[n]) for n in norms)
    assert torch.equal(stored["model.norm.weight"], original["model.norm.weight"])


def test_head_padding_is_dropped_from_o_proj_statistics(tmp_path):
    """SmolLM2 at TP2 calibrates with 12 heads (3 all-zero) but is exported with 9: o_proj's
    statistics must lose the padded heads' trailing input columns, the rest stay as they are."""
    from mswift.bridge.head_padding import write_padding_record
    from mswift.export.calibration import LinearStats, drop_head_padding

    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 12, "num_key_value_heads": 4}))
    x = torch.randn(10, 12 * 3)
    x[:, 9 * 3:] = 0  # the padded heads' attention outputs
    o_proj = LinearStats(x.T @ x, 10, x.abs().mean(0), x)
    q = torch.randn(10, 8)
    qkv = LinearStats(q.T @ q, 10, q.abs().mean(0), q)
    stats = {"model.layers.0.self_attn.o_proj.weight": o_proj,
             "model.layers.0.self_attn.q_proj.weight": qkv}
    assert drop_head_padding(stats, tmp_path) is stats  # no record: nothing to drop
    write_padding_record(tmp_path, {"original": {"num_attention_heads": 9,
                                                 "num_key_value_heads": 3},
                                    "padded": {"num_attention_heads": 12,
                                               "num_key_value_heads": 4}, "head_dim": 3})
    out = drop_head_padding(stats, tmp_path)
    real = x[:, :27]
    got = out["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(got.hessian, (x.T @ x)[:27, :27]) and got.tokens == 10
    torch.testing.assert_close(got.hessian, real.T @ real)
    torch.testing.assert_close(got.act_abs_mean, real.abs().mean(0))
    assert torch.equal(got.act_sample, real)
    assert out["model.layers.0.self_attn.q_proj.weight"] is qkv

