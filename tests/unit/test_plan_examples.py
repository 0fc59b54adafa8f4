"""The cluster examples for Llama-4 Scout and Maverick, planned by ``mswift plan`` on Meta's
released config.json files (shipped as test data; the examples' hf_model is a placeholder):
every pipeline stage fits an 80 GB H100 with the examples' recompute setting, and the model's
parameters are the published ones, counted here from config.json by formula."""
import json
from pathlib import Path

import pytest

from mswift.train.plan import GIB, main

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ROOT / "tests" / "data_files" / "llama4"
# example, released config, nodes of 8 GPUs, published total (text model) and active counts
EXAMPLES = {
    "scout": ("llama4_scout_32gpu.yaml", "scout_17b_16e_instruct_config.json", 4, 107.8e9),
    "maverick": ("llama4_maverick_128gpu.yaml", "maverick_17b_128e_instruct_config.json", 16,
                 400.7e9),
}


def llama4_counts(config: dict) -> tuple[int, int]:
    """(total, active per token) of a Llama-4 text model: GQA attention (the qk norm has no
    weights), two RMSNorm weights per layer, MoE layers of E routed SwiGLU experts + a shared
    one + a router, dense SwiGLU layers intermediate_size_mlp wide, untied embedding and head."""
    c = config.get("text_config", config)
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    d = c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = h * (q + 2 * kv) + q * h
    step = c["interleave_moe_layer_step"]
    moe_layers = c.get("moe_layers") or list(range(step - 1, layers, step))
    experts, topk = c["num_local_experts"], c["num_experts_per_tok"]
    expert = 3 * h * c["intermediate_size"]
    moe = experts * expert + expert + experts * h  # routed + shared + router
    dense = 3 * h * c["intermediate_size_mlp"]
    total = (layers * (attention + 2 * h) + len(moe_layers) * moe
             + (layers - len(moe_layers)) * dense + 2 * vocab * h + h)
    active = total - len(moe_layers) * (experts - topk) * expert
    return total, active


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_fits_h100_and_has_the_published_counts(name, tmp_path, capsys, monkeypatch):
    example, released, nodes, published = EXAMPLES[name]
    (tmp_path / "config.json").write_text((RELEASED / released).read_text())
    import mswift.train.plan as plan_module

    plans = []
    make_plan = plan_module.make_plan
    monkeypatch.setattr(plan_module, "make_plan",
                        lambda *a: plans.append(make_plan(*a)) or plans[-1])
    code = main(["--config", str(ROOT / "examples" / example), "--nnodes", str(nodes),
                 "--gpu-memory-gb", "80", f"hf_model={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0 and "verdict: 80 GiB GPUs: fits\n" in out, out
    plan = plans[0]
    room = (80 - 4) * GIB  # --reserve-gb 4 for the CUDA context, NCCL and fragmentation
    assert all(place.memory["total"] <= room for place in plan.places)
    # the examples need their recompute: without it some stage would not fit
    assert any(place.memory["total_no_recompute"] > room for place in plan.places)
    total, active = llama4_counts(json.loads((RELEASED / released).read_text()))
    assert plan.total_params == total and plan.active_params == active
    assert abs(total - published) < 0.05e9 and abs(active / 1e9 - 17) < 0.25  # "17B active"
    assert plan.build_seconds < 60
