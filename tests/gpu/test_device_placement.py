"""Training on a GPU end to end: the command line trains a tiny HF Llama on ``cuda:0`` in bf16
on packed SFT batches, and parameters, gradient buffers and every batch tensor the model sees
live on that device."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mswift.testing.ranks import run_ranks

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from mswift.testing.tokenizers import save_tiny_chat_model, write_chat_jsonl

    root = tmp_path_factory.mktemp("hf")
    # 3 query heads per KV group; vocabulary 384 (padded to 512 by the builder)
    save_tiny_chat_model("llama", root / "model", CORPUS, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=32, hidden_size=192,
                         max_position_embeddings=1024)
    write_chat_jsonl(CORPUS, root / "chat.jsonl")
    return root


def _settings(hf_dir: Path, save: Path) -> list[str]:
    return [f"hf_model={hf_dir / 'model'}", "mode=sft", f"dataset=[{hf_dir / 'chat.jsonl'}]",
            "seq_length=512", "packing=true", "bf16=true", "micro_batch_size=2",
            "global_batch_size=4", "train_iters=4", "lr=1e-4", "lr_warmup_iters=0",
            "log_interval=1", f"save={save}"]


def test_command_line_trains_on_the_gpu(hf_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mswift", "train", *_settings(hf_dir, tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for row in steps:
        assert math.isfinite(row["loss"]) and row["updated"], row
        assert 0 < row["mfu"] < 1, row
        assert row["tflops_per_gpu"] > 0, row
        assert row["mem_peak_gib"] > 0, row


def _train_and_watch_devices(settings: list[str]) -> dict:
    """Train in this rank, recording the device of every tensor the model is called with."""
    from mswift.config import load_config
    from mswift.train.loop import run_training, setup

    state = setup(load_config(None, settings))
    seen = set()

    def record(_module, args, kwargs):
        packed = kwargs.get("packed_seq_params")
        tensors = [*args, *kwargs.values()]
        if packed is not None:
            tensors += [packed.cu_seqlens_q, packed.cu_seqlens_kv]
        seen.update(str(t.device) for t in tensors if isinstance(t, torch.Tensor))

    for chunk in state.model:
        chunk.register_forward_pre_hook(record, with_kwargs=True)
    rows = run_training(state.cfg, state)
    params = {str(p.device) for chunk in state.model for p in chunk.parameters()}
    grads = {str(p.main_grad.device) for chunk in state.model for p in chunk.parameters()
             if p.requires_grad}
    return {"inputs": seen, "params": params, "main_grads": grads,
            "losses": [r["loss"] for r in rows]}


def test_parameters_gradients_and_batches_live_on_cuda_0(hf_dir, tmp_path):
    got = run_ranks(1, _train_and_watch_devices, _settings(hf_dir, tmp_path), timeout=600)[0]
    assert got["inputs"] == {"cuda:0"}, got
    assert got["params"] == {"cuda:0"}, got
    assert got["main_grads"] == {"cuda:0"}, got
    assert len(got["losses"]) == 4 and all(math.isfinite(x) for x in got["losses"]), got
