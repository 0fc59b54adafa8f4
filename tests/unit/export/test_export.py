"""``mswift export`` of a tiny Llama converted to torch_dist: W4A16 RTN files checked against
compressed-tensors' own decompression and transformers, calibration statistics against hooks
on transformers' model, bad input refused with nothing written."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mswift.bridge.convert import hf_to_mcore
from mswift.export.cli import main
from mswift.export.qweight import dequantize, rtn_quantize
from mswift.testing.compressed import ct_decompressed
from mswift.testing.hf_models import read_safetensors_dir, save_tiny_hf_model

GROUP = 16  # divides hidden 64 and intermediate 96


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    hf = save_tiny_hf_model("llama", root / "hf", vocab_size=300, seed=3)
    hf_to_mcore(hf, root / "ckpt", "torch_dist", progress=False)
    rows = [{"text": " ".join(f"w{(i * 7 + j * 13) % 290}" for j in range(20 + i))}
            for i in range(12)]
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "hf": hf, "ckpt": root / "ckpt", "calib": calib}


def export(model, out, *extra):
    return main(["--load", str(model["ckpt"]), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def w4(model):
    out = model["root"] / "w4"
    assert export(model, out, "--quant", "w4a16-rtn", "--group-size", str(GROUP),
                  "--calib-dataset", str(model["calib"]), "--calib-samples", "4",
                  "--eval-samples", "4") == 0
    return out


def test_w4a16_rtn_files_are_rtn_of_the_checkpoint_bit_for_bit(model, w4):
    original = read_safetensors_dir(model["hf"])
    decompressed = ct_decompressed(w4)
    linears = {n for n, t in original.items() if n.endswith("proj.weight")}
    assert set(decompressed) == linears and len(linears) == 4 * 7
    for name in linears:
        qw = rtn_quantize(original[name].float(), bits=4, group_size=GROUP)
        # compressed-tensors dequantizes in the scale's dtype (bf16): q * scale rounded to it
        assert decompressed[name].dtype == torch.bfloat16
        assert torch.equal(decompressed[name], dequantize(qw, torch.bfloat16)), name
    stored = read_safetensors_dir(w4)
    assert torch.equal(stored["lm_head.weight"], original["lm_head.weight"])
    assert torch.equal(stored["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    qc = json.loads((w4 / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == GROUP


def test_w4a16_loads_in_transformers_with_the_dequantized_logits(model, w4):
    from transformers import AutoModelForCausalLM

    tokens = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 8]])
    loaded = AutoModelForCausalLM.from_pretrained(w4, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(model["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in ct_decompressed(w4, torch.float32).items():
            reference.get_parameter(name).copy_(weight)
        want = reference(tokens).logits
        got = loaded(tokens).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        generated = loaded.generate(tokens, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)
    # the report: the rows after the 4 calibration samples, through transformers' models
    from mswift.export.calibration import calibration_samples

    rows = calibration_samples(model["calib"], model["hf"], 4, 512, skip=4)
    original = AutoModelForCausalLM.from_pretrained(model["hf"], dtype=torch.float32).eval()

    def ppl(m):
        with torch.no_grad():
            losses = [m(t, labels=t).loss.item() * (t.shape[1] - 1) for t in rows]
        return math.exp(sum(losses) / sum(t.shape[1] - 1 for t in rows))

    report = json.loads((w4 / "quant_report.json").read_text())
    assert report["eval_rows"] == 4 and report["eval_tokens"] == sum(t.shape[1] for t in rows)
    assert report["ppl_16bit"] == pytest.approx(ppl(original), rel=1e-4)
    assert report["ppl_quantized"] == pytest.approx(ppl(loaded), rel=1e-4)
    assert report["max_abs_logit_diff"] > report["mean_abs_logit_diff"] > 0
    with torch.no_grad():  # KL(16-bit || quantized) per position, transformers' distributions
        kl = [torch.nn.functional.kl_div(loaded(t).logits.log_softmax(-1).double(),
                                         original(t).logits.log_softmax(-1).double(),
                                         log_target=True, reduction="sum").item()
              for t in rows]
    assert report["mean_kl"] == pytest.approx(sum(kl) / sum(t.shape[1] for t in rows),
                                              rel=1e-3)
    assert (w4 / "quant_report.md").is_file()


def test_calibration_statistics_match_transformers_inputs(model):
    from transformers import AutoModelForCausalLM

    from mswift.bridge.layout import HFModel
    from mswift.export.calibration import calibration_samples, collect_stats
    from mswift.export.model import MegatronModel
    from mswift.runtime import destroy_distributed

    samples = calibration_samples(model["calib"], model["hf"], 3, 16)
    assert [s.shape[1] for s in samples] == [16, 16, 16]
    try:
        stats = collect_stats(MegatronModel(HFModel.open(model["ckpt"] / "hf"), model["ckpt"],
                                            16), samples, progress=False)
    finally:
        destroy_distributed()
    hf = AutoModelForCausalLM.from_pretrained(model["hf"], dtype=torch.float32).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in hf.named_modules():
        if name.endswith("proj"):
            module.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.setdefault(name, []).append(
                    args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for tokens in samples:
            hf(tokens)
    assert set(stats) == {n + ".weight" for n in inputs}
    assert stats["model.layers.0.self_attn.q_proj.weight"] is stats[
        "model.layers.0.self_attn.v_proj.weight"]  # one input, one object
    for name, xs in inputs.items():
        x = torch.cat(xs)
        s = stats[name + ".weight"]
        assert s.tokens == 48 and s.act_sample.shape == x.shape
        torch.testing.assert_close(s.hessian, x.t() @ x, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(s.act_abs_mean, x.abs().mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.act_sample, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--quant", "w3-magic"], "--quant w3-magic: unknown scheme"),
    (["--quant", "w4a16-rtn", "--group-size", "48"], "does not divide its 64 input features"),
    (["--quant", "fp8-block"], "is [64, 64], not a multiple of the 128x128 blocks"),
    (["--quant", "int8", "--eval-dataset", "EMPTY"], "EMPTY: no usable rows"),
    (["--quant", "int8", "--tp", "2"], "layout TP2 PP1 EP1 does not fit"),
    (["--quant", "int8", "--calib-memory-gib", "0"], "--calib-memory-gib 0.0: expected a positive"),
])
def test_bad_input_is_refused_before_anything_is_written(model, capsys, monkeypatch, extra,
                                                        message):
    empty = model["root"] / "empty.jsonl"
    empty.write_text("")
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    message = message.replace("EMPTY", str(empty))
    out = model["root"] / "refused"
    assert export(model, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not os.path.lexists(out) and not os.path.lexists(str(out) + ".tmp")


def test_moe_expert_statistics_hold_the_tokens_routed_to_each_expert(tmp_path):
    from transformers import AutoModelForCausalLM

    from mswift.bridge.layout import HFModel
    from mswift.export.calibration import collect_stats
    from mswift.export.model import MegatronModel
    from mswift.runtime import destroy_distributed

    hf = save_tiny_hf_model("qwen3_moe", tmp_path / "hf", vocab_size=300, seed=6)
    hf_to_mcore(hf, tmp_path / "ckpt", "torch_dist", progress=False)
    samples = [torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    try:
        stats = collect_stats(MegatronModel(HFModel.open(tmp_path / "ckpt" / "hf"),
                                            tmp_path / "ckpt", 12), samples, progress=False)
    finally:
        destroy_distributed()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    routed: dict[int, list] = {}
    for i, layer in enumerate(model.model.layers):  # transformers' router: input, top-k experts
        layer.mlp.gate.register_forward_hook(
            lambda mod, args, out, i=i: routed.setdefault(i, []).append((args[0], out[2])))
    with torch.no_grad():
        for tokens in samples:
            model(tokens)
    for i, calls in routed.items():
        x = torch.cat([c[0] for c in calls])
        chosen = torch.cat([c[1] for c in calls])
        counts = []
        for e in range(4):
            rows = x[(chosen == e).any(dim=-1)]
            s = stats[f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight"]
            assert s is stats[f"model.layers.{i}.mlp.experts.{e}.up_proj.weight"]
            assert s.tokens == rows.shape[0] == stats[
                f"model.layers.{i}.mlp.experts.{e}.down_proj.weight"].tokens
            torch.testing.assert_close(s.hessian, rows.t() @ rows, rtol=1e-4, atol=1e-3)
            counts.append(s.tokens)
        assert sum(counts) == 24 * 2 and min(counts) < max(counts)  # top-2 of 24 tokens
    assert "model.layers.0.mlp.gate.weight" not in stats  # the router is not quantized
