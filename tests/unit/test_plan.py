"""``mswift plan`` on real HF configs: parameter counts against the published ones and against
counts derived here from config.json by formula; shards over places add up to the model; a
layout that does not divide is refused with the message ``mswift train`` gives."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mswift.config import ConfigError, load_config
from mswift.models.registry import apply_hf_model
from mswift.train.plan import GIB, main, make_plan, replication

CONFIGS = Path(__file__).resolve().parents[1] / "data_files" / "hf_configs"


def hf_counts(name: str, padded_vocab: int) -> tuple[int, int, int]:
    """(total, active per token, padded-vocabulary total) of a Llama / Qwen3-MoE config.json,
    by formula: GQA attention, SwiGLU MLPs (3 matrices), RMSNorm weights, qk-norm on Qwen3."""
    c = json.loads((CONFIGS / name / "config.json").read_text())
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = h * (q + 2 * kv) + q * h + (2 * d if c["model_type"] == "qwen3_moe" else 0)
    norms = 2 * h
    if "num_experts" in c:
        experts = c["num_experts"] * 3 * h * c["moe_intermediate_size"]
        router = c["num_experts"] * h
        active_experts = c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"]
        mlp, active_mlp = experts + router, active_experts + router
    else:
        mlp = active_mlp = 3 * h * c["intermediate_size"]
    heads = 1 if c["tie_word_embeddings"] else 2
    ends = heads * vocab * h + h  # embedding (+ lm_head) + final norm
    total = layers * (attention + norms + mlp) + ends
    active = layers * (attention + norms + active_mlp) + ends
    return total, active, total + heads * (padded_vocab - vocab) * h


def plan_of(name: str, nnodes: int, **settings):
    overrides = [f"hf_model={CONFIGS / name}", "bf16=true"] + [f"{k}={v}" for k, v in
                                                                settings.items()]
    return make_plan(apply_hf_model(load_config(None, overrides)), nnodes, 8)


def shard_sum(plan) -> int:
    """Parameters of every distinct shard: each place's per-rank counts times the ranks of its
    stage that hold different shards, times the stages alike."""
    par = plan.cfg.parallel
    tp, ep = par.tensor_model_parallel_size, par.expert_model_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    return sum(n * replication(kind, tp, etp, ep) * len(place.stages)
               for place in plan.places for kind, n in place.params.items())


def test_llama3_8b_counts_and_shards():
    # TP4: vocab 128256 is padded to 128512 (a multiple of 128 x 4)
    plan = plan_of("llama3_8b", 2, tensor_model_parallel_size=4, sequence_parallel="true",
                   pipeline_model_parallel_size=4, seq_length=8192, global_batch_size=16)
    total, active, padded_total = hf_counts("llama3_8b", 128512)
    assert plan.total_params == total == 8_030_261_248  # published: 8.03B
    assert plan.active_params == total
    assert shard_sum(plan) == padded_total
    assert [p.stages for p in plan.places] == [[0], [1, 2], [3]]  # middle stages alike
    assert plan.build_seconds < 30


def test_an_uneven_pipeline_is_planned_per_stage():
    """decoder_first/last_pipeline_num_layers: 5 + 9 + 9 + 9 of Llama-3-8B's 32 layers, the
    same parameters in all, the first stage lighter than the middle ones."""
    plan = plan_of("llama3_8b", 2, tensor_model_parallel_size=4, sequence_parallel="true",
                   pipeline_model_parallel_size=4, seq_length=8192, global_batch_size=16,
                   decoder_first_pipeline_num_layers=5, decoder_last_pipeline_num_layers=9)
    total, _, padded_total = hf_counts("llama3_8b", 128512)
    assert plan.total_params == total and shard_sum(plan) == padded_total
    assert [p.stages for p in plan.places] == [[0], [1, 2], [3]]  # middle stages alike
    assert [p.chunks[0].layers for p in plan.places] == [list(range(5)), list(range(5, 14)),
                                                         list(range(23, 32))]
    first, middle = (next(p for p in plan.places if s in p.stages) for s in (0, 1))
    assert first.dense_params < middle.dense_params


def test_qwen3_30b_a3b_counts_memory_and_shards():
    plan = plan_of("qwen3_30b_a3b", 4, tensor_model_parallel_size=2, sequence_parallel="true",
                   pipeline_model_parallel_size=2, expert_model_parallel_size=8,
                   seq_length=4096, global_batch_size=64)
    total, active, padded_total = hf_counts("qwen3_30b_a3b", 152064)
    assert plan.total_params == total
    assert abs(total / 1e9 - 30.5) < 0.05 and abs(active / 1e9 - 3.3) < 0.06  # published
    assert plan.active_params == active
    assert shard_sum(plan) == padded_total
    # memory of stage 0 from its counts: dense params sharded over DP 8, experts over
    # expert-DP 32 / (2 x 8 x 2) = 1; 2 + 4 + 12 bytes per parameter
    first = next(p for p in plan.places if 0 in p.stages)
    dense, expert = first.dense_params, first.expert_params
    assert first.memory["weights"] == 2 * (dense + expert)
    assert first.memory["grads"] == 4 * (dense + expert)
    assert first.memory["optimizer"] == int(12 * (dense / 8 + expert / 1))
    assert first.in_flight == [2] and 0 < first.memory["activations_full_recompute"] < \
        first.memory["activations"] < 80 * GIB


def write_config(tmp_path, name: str, **settings) -> str:
    path = tmp_path / "run.yaml"
    lines = [f"hf_model: {CONFIGS / name}"] + [f"{k}: {v}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_layout_that_does_not_divide_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, "qwen3_30b_a3b", tensor_model_parallel_size=2,
                          sequence_parallel="true", pipeline_model_parallel_size=2,
                          expert_model_parallel_size=8)
    code = main(["--config", config, "--nnodes", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n  - ") == 1, err
    assert ("world size 24: not divisible by expert_tensor_parallel_size (2) x "
            "expert_model_parallel_size (8) x pipeline_model_parallel_size (2) = 32") in err


def test_cli_prints_the_verdict(tmp_path, capsys):
    config = write_config(tmp_path, "llama3_8b", tensor_model_parallel_size=8,
                          sequence_parallel="true", bf16="true", seq_length=8192)
    code = main(["--config", config, "--nnodes", "1", "--gpu-memory-gb", "16",
                 "--gpu-memory-gb", "80"])
    out = capsys.readouterr().out
    assert code == 0
    assert "parameters: 8.03B total (8,030,261,248)" in out
    # about 8.03B / 8 TP ranks x (2 + 4 + 12) bytes (DP 1: nothing sharded) = 16.8 GiB of
    # weights, grads and optimizer state alone
    assert "verdict: 16 GiB GPUs: does NOT fit; 80 GiB GPUs: fits" in out


def test_help():
    run = subprocess.run([sys.executable, "-c", "import sys; from mswift.cli import main; sys.exit(main())",
                          "plan", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--nproc-per-node" in run.stdout


def test_recompute_setting_of_the_config_decides(tmp_path):
    """The config's recompute setting gives the activations the verdict uses; full recompute
    (uniform, 1 layer) keeps one input per layer (T x h / TP with SP, bf16) plus one layer."""
    layout = dict(tensor_model_parallel_size=2, sequence_parallel="true",
                  pipeline_model_parallel_size=2, expert_model_parallel_size=8,
                  seq_length=4096, global_batch_size=64)
    plain = plan_of("qwen3_30b_a3b", 4, **layout)
    full = plan_of("qwen3_30b_a3b", 4, recompute_granularity="full",
                   recompute_method="uniform", recompute_num_layers=1, **layout)
    selective = plan_of("qwen3_30b_a3b", 4, recompute_granularity="selective",
                        recompute_modules="[moe]", **layout)
    for a, b, c in zip(plain.places, full.places, selective.places):
        mem = a.memory
        assert mem["activations"] == mem["activations_no_recompute"] == \
            b.memory["activations_no_recompute"] == c.memory["activations_no_recompute"]
        assert b.memory["activations"] == mem["activations_full_recompute"]
        assert b.memory["total"] == b.memory["total_full_recompute"] < mem["total"]
        assert mem["activations_full_recompute"] < c.memory["activations"] < mem["activations"]
    first = next(p for p in full.places if 0 in p.stages)
    chunk = first.chunks[0]
    assert chunk.layer_input_bytes == 2 * 4096 * 2048 // 2  # hidden 2048, TP2 + SP
    assert first.memory["activations"] == (2 * len(chunk.layers) * chunk.layer_input_bytes
                                           + max(chunk.layer_bytes))  # 2 in flight, stage 0


def test_grouped_experts_are_planned_as_per_expert_ones():
    """moe_grouped_gemm changes how the experts run, not what they hold or keep for backward:
    the same parameters (experts counted as expert-parallel) and memory, activations included
    (the grouped weights are found under their per-expert names)."""
    layout = dict(tensor_model_parallel_size=2, sequence_parallel="true",
                  expert_model_parallel_size=8, seq_length=4096, global_batch_size=64)
    per_expert = plan_of("qwen3_30b_a3b", 2, **layout)
    grouped = plan_of("qwen3_30b_a3b", 2, moe_grouped_gemm="true", **layout)
    for a, b in zip(per_expert.places, grouped.places, strict=True):
        assert (a.dense_params, a.expert_params, a.memory) == (
            b.dense_params, b.expert_params, b.memory)
