"""From an HF checkpoint to an HF checkpoint through training, on the command line:
HF dir (tiny Llama + a real BPE tokenizer) -> torchrun TP=2 packed SFT -> SAVE/hf."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mswift.testing.hf_models import read_safetensors_dir
from mswift.testing.ranks import free_port

pytestmark = pytest.mark.slow  # torchrun trainings from HF weights

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from mswift.testing.hf_models import save_tiny_hf_model
    from mswift.testing.tokenizers import train_chatml_tokenizer, write_chat_jsonl

    root = tmp_path_factory.mktemp("hf")
    model = save_tiny_hf_model("llama", root / "model", vocab_size=384)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    train_chatml_tokenizer(CORPUS, model)  # the model's own tokenizer: a real BPE + ChatML
    write_chat_jsonl(CORPUS, root / "chat.jsonl")
    return root


def sft(hf_dir: Path, save: Path, *overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "launch/pretrain_sft.py",
           f"hf_model={hf_dir / 'model'}", "mode=sft", f"dataset=[{hf_dir / 'chat.jsonl'}]",
           "tensor_model_parallel_size=2", "sequence_parallel=true", "seq_length=256",
           "micro_batch_size=1", "global_batch_size=2", "lr_warmup_iters=0", "log_interval=1",
           f"save={save}", "save_hf=true", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_zero_lr_round_trip_is_bit_exact(hf_dir, tmp_path):
    proc = sft(hf_dir, tmp_path, "train_iters=1", "lr=0", "min_lr=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = read_safetensors_dir(hf_dir / "model"), read_safetensors_dir(tmp_path / "hf")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert not (tmp_path / "hf.tmp").exists()


def test_sft_trains_and_exports_a_model_transformers_generates_with(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = sft(hf_dir, tmp_path, "train_iters=10", "lr=2e-3", "global_batch_size=4",
               f"eval_dataset=[{hf_dir / 'chat.jsonl'}]", "eval_interval=5", "eval_iters=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = re.findall(r"^step +\d+/10 \| loss ([0-9.]+)", proc.stdout, re.M)
    evals = [float(x) for x in re.findall(r"eval loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 10 and len(evals) == 3, proc.stdout  # steps 0 (before training), 5, 10
    assert max(evals[1:]) < evals[0], proc.stdout  # the same held-out batches each time
    before, after = read_safetensors_dir(hf_dir / "model"), read_safetensors_dir(tmp_path / "hf")
    assert any(not torch.equal(before[n], after[n]) for n in before)  # it did train
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is better?"}],
                                           add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(ids, min_new_tokens=4, max_new_tokens=8, do_sample=False)
    assert ids.shape[1] + 4 <= out.shape[1] <= ids.shape[1] + 8
    assert isinstance(tokenizer.decode(out[0, ids.shape[1]:]), str)
    # The run's last torch_dist checkpoint (model, optimizer, TP2), converted on the command
    # line with the starting model's config and tokenizer, is the model the run exported.
    proc = subprocess.run([sys.executable, "checkpoint_convert/mcore_to_hf.py", "--mcore-dir",
                           str(tmp_path), "--hf-dir", str(hf_dir / "model"), "--out",
                           str(tmp_path / "converted")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = read_safetensors_dir(tmp_path / "converted")
    assert converted.keys() == after.keys()
    for name, t in after.items():
        assert converted[name].dtype == t.dtype and torch.equal(converted[name], t), name


def test_training_from_a_converted_torch_dist_checkpoint_starts_where_hf_does(hf_dir, tmp_path):
    """Other weights (seed 1) -> torch_dist on the command line (bytes copied, no torch);
    training at TP2 from the first model's dir with ``load=CKPT no_load_optim=true`` gives, step
    for step, the losses of training that reads the other weights from HF (so the checkpoint,
    not the HF weights, was loaded)."""
    import shutil

    from mswift.testing.hf_models import save_tiny_hf_model

    other = tmp_path / "other"  # hf_dir with the weights of another seed
    shutil.copytree(hf_dir, other)
    save_tiny_hf_model("llama", tmp_path / "seed1", seed=1, vocab_size=384)
    shutil.copy(tmp_path / "seed1" / "model.safetensors", other / "model" / "model.safetensors")
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "checkpoint_convert/hf_to_mcore.py", "--hf-dir",
                           str(other / "model"), "--out", str(ckpt), "--tp", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for name, root, extra in (("hf", other, []),
                              ("ckpt", hf_dir, [f"load={ckpt}", "no_load_optim=true"])):
        proc = sft(root, tmp_path / f"{name}_run", "train_iters=3", "lr=1e-3", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = re.findall(r"^step +\d+/3 \| loss ([0-9.]+)", proc.stdout, re.M)
    assert len(runs["hf"]) == 3 and runs["ckpt"] == runs["hf"], runs
