"""``mswift export`` under several ranks: each rank's calibration statistics against the inputs
transformers' model feeds the same linears (whatever the layout: tensor / pipeline / expert /
data parallel, sequence parallel), every linear owned by exactly one rank, and exports at TP2
x PP2 and data parallel equal to the one-process export."""
from __future__ import annotations

import json

import pytest
import torch

from mswift.bridge.convert import hf_to_mcore
from mswift.testing.compressed import ct_decompressed
from mswift.testing.hf_models import read_safetensors_dir, save_tiny_hf_model
from mswift.testing.ranks import run_ranks

pytestmark = pytest.mark.slow

# 3 query heads per key-value group, a vocabulary no multiple of 128 x TP, hidden 72 and
# intermediate 96: group size 24 divides both, the 128 blocks of nothing
LLAMA = dict(vocab_size=300, hidden_size=72, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=96)
GROUP = 24


def _samples(count: int, vocab: int, length: int) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (1, length - i % 3), generator=torch.Generator()
                          .manual_seed(100 + i)) for i in range(count)]


def _rank_stats(ckpt, layout: dict, samples):
    """This rank's statistics (tensors) at ``layout``."""
    from mswift.bridge.convert import conversion_layout
    from mswift.bridge.layout import HFModel
    from mswift.export.calibration import stats_windows
    from mswift.export.model import MegatronModel

    hf = HFModel.open(ckpt / "hf")
    model = MegatronModel(hf, ckpt, max(s.shape[1] for s in samples),
                          conversion_layout(hf, **layout))
    stats, layers = {}, []
    for window in stats_windows(model, samples, 1, progress=False):  # a layer per window
        stats.update(window)
        layers.append(sorted({n.split(".")[2] for n in window}))
    return layers, {n: (s.hessian, s.tokens, s.act_abs_mean, s.act_sample)
                    for n, s in stats.items()}


def _transformers_inputs(hf_dir, samples) -> dict[str, torch.Tensor]:
    """Each linear's input rows in transformers' model, in calibration order (an expert's:
    the rows routed to it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name.endswith("proj"):
            module.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(
                name + ".weight", []).append(args[0].reshape(-1, args[0].shape[-1])))
    experts = model.config.to_dict().get("num_local_experts")
    def routed(i, x, chosen):  # transformers runs fused experts: their rows from the router
        for e in range(experts):
            for p in ("gate", "up"):
                inputs.setdefault(f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight",
                                  []).append(x[(chosen == e).any(-1)])

    for i, layer in enumerate(model.model.layers):
        if experts:
            layer.mlp.gate.register_forward_hook(
                lambda mod, args, out, i=i: routed(i, args[0], out[2]))
    with torch.no_grad():
        for tokens in samples:
            model(tokens)
    return {n: torch.cat(xs) for n, xs in inputs.items()}


@pytest.mark.parametrize("family, layout, world, count, used", [
    # (a dense model's tensor and pipeline parallel statistics: the TP2 x PP2 export below)
    # sequence parallel (MoE at TP2), experts over 2 ranks, 2 data-parallel ranks: 5 samples,
    # the incomplete last step left out
    ("qwen3_moe", dict(tp=2, ep=2), 4, 5, 4),
])
def test_rank_statistics_are_transformers_inputs_each_linear_on_one_rank(
        tmp_path, family, layout, world, count, used):
    overrides = LLAMA if family == "llama" else {"vocab_size": 300}
    hf = save_tiny_hf_model(family, tmp_path / "hf", seed=5, **overrides)
    hf_to_mcore(hf, tmp_path / "ckpt", "torch_dist", progress=False)
    samples = _samples(count, 300, 14)  # lengths 14, 13, 12, ...
    results = run_ranks(world, _rank_stats, tmp_path / "ckpt", layout, samples, timeout=600)
    # one calibration pass per decoder layer (1 byte of statistics at once), on every rank;
    # each rank owns linears of both layers
    assert [layers for layers, _ in results] == [[["0"], ["1"]]] * world
    per_rank = [stats for _, stats in results]
    owned = [n for stats in per_rank for n in stats]
    assert len(owned) == len(set(owned))  # one owner each
    if family == "qwen3_moe":  # sequence parallel at TP2: each cut to an even length
        samples = [s[:, : s.shape[1] // 2 * 2] for s in samples]
    inputs = _transformers_inputs(hf, samples[:used])
    down = {n for n in owned if "experts" in n and "down_proj" in n}
    assert set(owned) - down == set(inputs)
    merged = {n: s for stats in per_rank for n, s in stats.items()}
    for name, x in inputs.items():
        hessian, tokens, abs_mean, sample = merged[name]
        assert tokens == x.shape[0], name
        torch.testing.assert_close(hessian, x.t() @ x, rtol=1e-4, atol=1e-3, msg=name)
        torch.testing.assert_close(abs_mean, x.abs().mean(0), rtol=1e-4, atol=1e-4, msg=name)
        if "experts" in name:  # the same rows, in the order the dispatcher delivers them
            key = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0))
            sample, x = sample[(sample @ key).argsort()], x[(x @ key).argsort()]
        torch.testing.assert_close(sample, x, rtol=1e-4, atol=1e-4, msg=name)
    for name in down:  # an expert's down_proj reads the tokens its gate/up read
        assert merged[name][1] == merged[name.replace("down", "up")][1]


def _rank_export(argv):
    from mswift.export.cli import main

    return main(argv)


def _export(ckpt, out, world: int, *extra) -> None:
    argv = ["--load", str(ckpt), "--out", str(out), "--no-progress", *extra]
    if world == 1:
        from mswift.export.cli import main

        assert main(argv) == 0
    else:
        assert run_ranks(world, _rank_export, argv, timeout=600) == [0] * world


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_ranks")
    hf = save_tiny_hf_model("llama", root / "hf", seed=7, **LLAMA)
    hf_to_mcore(hf, root / "ckpt", "legacy", tp=2, progress=False)  # of another layout
    rows = [{"text": " ".join(f"w{(i * 7 + j * 13) % 290}" for j in range(18 + i))}
            for i in range(10)]
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# under ranks, 10 KiB of statistics at once: one decoder layer per calibration pass (2 passes
# per pipeline stage at PP2), against one pass in one process
@pytest.mark.parametrize("quant, world, layout", [
    ("w4a16-gptq", 4, ["--tp", "2", "--pp", "2", "--calib-memory-gib", "0.00001"]),
    # 2 data-parallel ranks, 5 samples: the last step's stand-in row
    ("w4a16-awq", 2, ["--calib-memory-gib", "0.00001"]),
])
def test_export_under_ranks_equals_the_one_process_export(llama, quant, world, layout):
    common = ["--quant", quant, "--group-size", str(GROUP), "--calib-dataset",
              str(llama / "calib.jsonl"), "--calib-samples", "5", "--eval-samples", "3"]
    one, many = llama / f"{quant}-1", llama / f"{quant}-{world}"
    _export(llama / "ckpt", one, 1, *common)
    _export(llama / "ckpt", many, world, *common, *layout)
    a, b = read_safetensors_dir(one), read_safetensors_dir(many)
    assert set(a) == set(b)
    qa, qb = ct_decompressed(one, torch.float32), ct_decompressed(many, torch.float32)
    assert set(qa) == set(qb) and len(qa) == 4 * 7
    for name in a:
        if name.endswith(("weight_packed", "weight_scale", "weight_shape")):
            continue
        # norms (AWQ folds its scales into them), embeddings, lm_head
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=1e-3, atol=1e-5,
                                   msg=name)
    worst = 1.0
    for name, w in qa.items():
        # the same integers but where fp32 sums over other shards round a tie the other way
        same = (w == qb[name]).float().mean().item()
        worst = min(worst, same)
        assert same > 0.995, (name, same)
    print(f"{quant}: at least {worst:.4f} of each linear's weights equal")
    ra, rb = (json.loads((f / "quant_report.json").read_text()) for f in (one, many))
    assert ra["eval_rows"] == rb["eval_rows"] == 3 and rb["ranks"] == world
    for key in ("ppl_16bit", "ppl_quantized"):
        assert rb[key] == pytest.approx(ra[key], rel=2e-3), key
    assert (one / "config.json").read_text() == (many / "config.json").read_text()
