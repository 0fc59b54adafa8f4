"""From the command line: `mswift preprocess` two text files -> torchrun (2 data-parallel ranks)
trains 20 steps on their 50/50 blend (data_path) -> the loss falls; a run resumed from the step-10
checkpoint repeats the uninterrupted run's losses bit for bit."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mswift.testing.ranks import free_port
from mswift.testing.tokenizers import train_chatml_tokenizer, write_document_halves

pytestmark = pytest.mark.slow  # preprocess, torchrun training and resume

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"
EXAMPLE = ROOT / "examples" / "tiny_indexed_blend.yaml"


def run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def preprocess_halves(folder: Path, tokenizer: Path) -> list[Path]:
    prefixes = []
    for rows in write_document_halves(CORPUS, folder):
        prefix = folder / "data" / f"{rows.stem}_text_document"
        done = run([sys.executable, "-m", "mswift", "preprocess", "--input", str(rows),
                    "--tokenizer", str(tokenizer), "--output-prefix", str(prefix),
                    "--append-eod"], timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        prefixes.append(prefix)
    return prefixes


def train(tokenizer, prefixes, save, *extra):
    a, b = prefixes
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "launch/pretrain_sft.py",
                "--config", str(EXAMPLE), f"tokenizer={tokenizer}",
                f"data_path=0.5 {a} 0.5 {b}", f"save={save}", *extra])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]  # training steps (not a step-0 evaluation)


def test_preprocess_blend_train_and_resume_exactly(tmp_path):
    tokenizer = train_chatml_tokenizer(CORPUS, tmp_path / "tokenizer")
    prefixes = preprocess_halves(tmp_path, tokenizer)
    straight = train(tokenizer, prefixes, tmp_path / "straight")
    losses = [row["loss"] for row in straight]
    assert [row["step"] for row in straight] == list(range(1, 21))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, f"loss did not fall: {losses}"
    assert "eval_loss" in straight[9] and "eval_loss" in straight[19]
    # the index caches went next to the data (megatron-core's default)
    assert list((tmp_path / "data" / "a_text_document" / "cache").rglob("*.npy"))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "iter_0000010", resumed / "iter_0000010")
    (resumed / "latest_checkpointed_iteration.txt").write_text("10\n")
    rows = train(tokenizer, prefixes, resumed, f"load={resumed}")
    second = [row for row in rows if row["step"] > 10]
    assert [row["step"] for row in second] == list(range(11, 21))
    for got, want in zip(second, straight[10:]):
        assert (got["loss"], got.get("eval_loss")) == (want["loss"], want.get("eval_loss")), \
            f"step {got['step']}: resumed {got} vs uninterrupted {want}"
