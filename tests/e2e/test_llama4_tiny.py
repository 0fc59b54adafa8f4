"""examples/llama4_tiny.yaml on the command line: from scratch on bytes as the README shows it,
and convert -> SFT -> export of a tiny Scout-like Llama4ForCausalLM folder (built here with
transformers): converted with ``mswift convert``, fine-tuned on packed chat rows with the same
layout (EP=2 on two ranks, torchrun) and exported with ``save_hf``, which transformers loads and
``mswift verify`` finds equal to the trained checkpoint."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mswift.testing.ranks import free_port

pytestmark = pytest.mark.slow  # torchrun trainings of the tiny Llama-4 at EP2

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"
LOSS = re.compile(r"^step +\d+/\d+ \| loss ([0-9.naif]+)", re.M)


def run(cmd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train(save: Path, *overrides) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "launch/pretrain_sft.py",
                "--config", "examples/llama4_tiny.yaml", f"save={save}", *overrides])


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


def test_example_converts_fine_tunes_and_exports_a_llama4_hf_folder_packed(hf_dir, tmp_path):
    model, chat, ckpt, save = hf_dir / "model", hf_dir / "chat.jsonl", tmp_path / "ckpt", \
        tmp_path / "run"
    proc = run([sys.executable, "-m", "mswift", "convert", "hf-to-mcore", "--hf-dir", str(model),
                "--out", str(ckpt)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # hf_model gives the model settings, the tokenizer and the export's config files; the
    # weights come from the converted checkpoint (weights only: no_load_optim).
    proc = train(save, f"hf_model={model}", f"load={ckpt}", "no_load_optim=true", "save_hf=true",
                 "mode=sft", f"dataset=[{chat}]", "train_iters=6", "save_interval=6",
                 "log_interval=1", "lr_warmup_iters=0", "lr=1e-3", f"eval_dataset=[{chat}]",
                 "eval_interval=6", "eval_iters=2")
    assert_trained(proc, save, 6)
    log = proc.stdout + proc.stderr
    assert f"loading the checkpoint in {ckpt}" in log and "loading the HF weights" not in log
    # Steps 0 and 6 on the same held-out batches (the training batches' losses are noisy).
    evals = [float(x) for x in re.findall(r"eval loss ([0-9.]+)", proc.stdout)]
    assert len(evals) == 2 and evals[1] < evals[0], proc.stdout
    # The model is the HF folder's (its config.json replaces the YAML's model section): its
    # vocabulary of 384 (the tokenizer's 360 + 24) by width 96, not the YAML's 256 by 128.
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(save / "iter_0000006")).read_metadata().state_dict_metadata
    assert tuple(stored["embedding.word_embeddings.weight"].size) == (384, 96)

    # The export: the input's tensors (names, shapes, dtypes; the stacked experts included),
    # changed by training, and a folder transformers loads as the same class.
    import torch
    from transformers import AutoModelForCausalLM

    from mswift.testing.hf_models import read_safetensors_dir

    export = save / "hf"
    before, after = read_safetensors_dir(model), read_safetensors_dir(export)
    assert {n: (t.shape, t.dtype) for n, t in after.items()} \
        == {n: (t.shape, t.dtype) for n, t in before.items()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for part in ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj",
                 "self_attn.q_proj", "self_attn.o_proj"):
        names = [n for n in before if part in n]
        assert names and set(names) <= changed, (part, sorted(changed))
    loaded = AutoModelForCausalLM.from_pretrained(str(export), device_map="cpu")
    assert type(loaded).__name__ == "Llama4ForCausalLM"
    # transformers' logits of the export are megatron-core's of the trained checkpoint.
    proc = run([sys.executable, "-m", "mswift", "verify", "--hf-dir", str(export),
                "--mcore-dir", str(save), "--seq-len", "40"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout, proc.stdout
