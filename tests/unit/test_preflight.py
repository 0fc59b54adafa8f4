"""The up-front checks of a run: files, tokenizer, load, layout; no torch imported for them."""
import json
import subprocess
import sys

from mswift.config import load_config
from mswift.train.preflight import run_problems

EXAMPLE = "examples/tiny_llama_tp2.yaml"


def problems(*overrides, world_size=2):
    return run_problems(load_config(EXAMPLE, list(overrides)), world_size)[1]


def test_the_example_passes_and_each_mistake_is_named(tmp_path):
    assert problems() == []
    (tmp_path / "model").mkdir()
    (tmp_path / "tok").mkdir()
    assert problems(f"hf_model={tmp_path / 'model'}") == [
        f"hf_model={tmp_path / 'model'}: no config.json in this folder (expected a Hugging Face "
        "model folder)"]
    assert problems(f"tokenizer={tmp_path / 'tok'}", "dataset=[examples/data/tiny_corpus.txt]",
                    "mode=sft") == [
        f"tokenizer={tmp_path / 'tok'}: no tokenizer files in this folder (expected one of "
        "tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json); set "
        "tokenizer=FOLDER or tokenizer=byte"]
    assert problems("vocab_size=200") == ["vocab_size=200: tokenizer=byte needs at least 256"]
    assert problems("dataset=[]") == [
        "dataset: expected at least one file or folder to train on (or data_path: indexed "
        "PREFIX.bin/.idx files)"]


def test_load_may_be_missing_only_when_it_is_save(tmp_path):
    run = tmp_path / "run"
    assert problems(f"save={run}", f"load={run}") == []
    assert problems(f"save={run}", f"load={tmp_path / 'other'}") == [
        f"load={tmp_path / 'other'}: not found (expected a checkpoint folder)"]


def test_hf_model_config_fills_the_model_before_the_layout_is_judged(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 6,
        "num_key_value_heads": 3, "vocab_size": 300, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    # the YAML's own model (4 heads, 2 groups) fits TP=2; the HF model's 3 groups do not
    assert problems(f"hf_model={model}", world_size=2) == [
        "tensor_model_parallel_size=2: must divide num_query_groups=3"]


def test_save_hf_with_a_tokenizer_linked_out_of_the_model_is_refused_before_start(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    secret = tmp_path / "secret.txt"
    secret.write_text("{}")
    (model / "tokenizer.json").symlink_to(secret)
    found = problems(f"hf_model={model}", "save_hf=true", "tokenizer=byte")
    assert len(found) == 1 and found[0].startswith(
        f"save_hf=true: {model / 'tokenizer.json'}: a symbolic link to {secret}"), found
    assert problems(f"hf_model={model}", "tokenizer=byte") == []  # no export: nothing copied


def test_the_command_line_checks_without_importing_torch():
    code = ("import sys; import mswift.train.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'megatron', 'transformers', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_triton_settings_without_cuda_or_the_interpreter_are_refused_before_start(monkeypatch):
    """No GPU here: without TRITON_INTERPRET=1 each setting asking for triton is named (they
    would otherwise fail at the first forward, after the ranks started); auto and torch pass."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert problems("attention_backend=triton", "moe_routing_backend=triton",
                    "fused_kernels=triton") == [
        f"{name}=triton: mswift's Triton kernels need a CUDA device, and this machine has none "
        "(on CPU they run only under TRITON_INTERPRET=1, set before the run starts); use "
        f"{name}=auto or torch"
        for name in ("attention_backend", "moe_routing_backend", "fused_kernels")]
    assert problems("attention_backend=torch", "moe_routing_backend=auto",
                    "fused_kernels=torch") == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert problems("moe_routing_backend=triton", "fused_kernels=triton") == []


def test_seq_aux_loss_with_moe_recompute_under_pipelining_is_refused_by_name(tmp_path):
    """The sequence-wise loss's router takes each layer's packed sample bounds at the layer's
    forward; an MoE layer recomputed alone under PP would see a later micro-batch's."""
    from mswift.testing.hf_models import tiny_hf_config

    model = tmp_path / "dsv3"
    tiny_hf_config("deepseek_v3").save_pretrained(model)
    run = [f"hf_model={model}", "pipeline_model_parallel_size=2",
           "moe_router_load_balancing_type=seq_aux_loss", "moe_aux_loss_coeff=1e-4",
           "recompute_granularity=selective"]
    refused = [p for p in problems(*run, "recompute_modules=[core_attn,moe]")
               if "seq_aux_loss" in p]
    assert refused == ["recompute_modules=[..., moe]: not with moe_router_load_balancing_type="
                       "seq_aux_loss and pipeline_model_parallel_size=2 (the recomputed router "
                       "would count another micro-batch's samples); recompute full layers or "
                       "leave moe out"]
    assert not [p for p in problems(*run, "recompute_modules=[core_attn]") if "seq_aux" in p]
    assert not [p for p in problems(*run[:-1], "moe_aux_loss_coeff=0",
                                    "recompute_granularity=selective",
                                    "recompute_modules=[moe]") if "seq_aux" in p]
