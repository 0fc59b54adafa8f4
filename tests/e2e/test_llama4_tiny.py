"""examples/llama4_tiny.yaml on the command line: from scratch on bytes as the README shows it,
and fine-tuning a tiny Scout-like Llama4ForCausalLM folder (built here with transformers) on
packed chat rows with the same layout (EP=2 on two ranks, torchrun)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mswift.testing.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"
LOSS = re.compile(r"^step +\d+/\d+ \| loss ([0-9.naif]+)", re.M)


def train(save: Path, *overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "launch/pretrain_sft.py",
           "--config", "examples/llama4_tiny.yaml", f"save={save}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_trained(proc, save: Path, steps: int) -> list[float]:
    """The run's logged losses (one per step, all finite), after checking that the checkpoint
    of its last step is complete."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in LOSS.findall(proc.stdout)]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(steps)
    assert (save / f"iter_{steps:07d}" / ".metadata").is_file()
    return losses


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Scout-like HF folder: every layer MoE, chunks of 8 on the RoPE layers and temperature
    tuning from floor_scale 4 on the NoPE layer (every chat row is longer than both), its own BPE
    tokenizer with the ChatML template, and chat rows."""
    from mswift.testing.tokenizers import save_tiny_chat_model, write_chat_jsonl

    root = tmp_path_factory.mktemp("llama4")
    save_tiny_chat_model("llama4", root / "model", CORPUS, interleave_moe_layer_step=1,
                         attention_chunk_size=8, floor_scale=4)
    write_chat_jsonl(CORPUS, root / "chat.jsonl")
    return root


def test_example_trains_from_scratch(tmp_path):
    losses = assert_trained(train(tmp_path, "train_iters=6", "save_interval=6",
                                  "log_interval=1", "lr_warmup_iters=0"), tmp_path, 6)
    assert losses[-1] < losses[0], losses


def test_example_fine_tunes_a_llama4_hf_folder_packed(hf_dir, tmp_path):
    chat = hf_dir / "chat.jsonl"
    proc = train(tmp_path, f"hf_model={hf_dir / 'model'}", "mode=sft", f"dataset=[{chat}]",
                 "train_iters=6", "save_interval=6", "log_interval=1", "lr_warmup_iters=0",
                 "lr=1e-3", f"eval_dataset=[{chat}]", "eval_interval=6", "eval_iters=2")
    assert_trained(proc, tmp_path, 6)
    # Steps 0 and 6 on the same held-out batches (the training batches' losses are noisy).
    evals = [float(x) for x in re.findall(r"eval loss ([0-9.]+)", proc.stdout)]
    assert len(evals) == 2 and evals[1] < evals[0], proc.stdout
    # The model is the HF folder's (its config.json replaces the YAML's model section): its
    # vocabulary of 384 (the tokenizer's 360 + 24) by width 96, not the YAML's 256 by 128.
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(tmp_path / "iter_0000006")).read_metadata().state_dict_metadata
    assert tuple(stored["embedding.word_embeddings.weight"].size) == (384, 96)
