"""The README's main job from the command line: torchrun + launch/pretrain_sft.py on real files."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mswift.testing.files import snapshot
from mswift.testing.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_llama_tp2.yaml"


def run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a torchrun training
def test_tiny_llama_tp2_trains_and_checkpoints(tiny_tp2_torchrun):
    # conftest.py's run (also test_mpi's reference): train_iters=6 log_interval=1
    # save_interval=3 peak_tflops=0.001
    proc, save, _ = tiny_tp2_torchrun
    assert proc.returncode == 0, proc.stderr[-3000:]
    # nothing but torchrun's own banner on stderr: no warnings that do not apply on a CPU
    assert "Warning" not in proc.stderr, proc.stderr
    # slow phases are announced, once (rank 0), the save with its size and path
    assert proc.stdout.count("building the model and optimizer ...") == 1
    assert re.search(r"saved the checkpoint in [0-9.]+ s \([0-9.]+ [KM]B in .*iter_0000006\)",
                     proc.stdout), proc.stdout
    losses = [float(x) for x in re.findall(r"^step +\d+/6 \| loss ([0-9.]+)", proc.stdout, re.M)]
    assert len(losses) == 6, proc.stdout
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses}"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (save / "iter_0000003" / "metadata.json").is_file()
    assert (save / "iter_0000006" / "metadata.json").is_file()
    assert not list(save.glob("*.tmp"))
    # Model FLOPs of the example by hand (per token, multiply-adds of one forward pass):
    # attention q 128, k/v 64 each, out 128 (x hidden 128) + QK^T and PV over 128/2 positions;
    # SwiGLU 3 x 128 x 352; output layer 128 x 256. Training: 6 FLOPs per multiply-add.
    per_token = 6 * (2 * (128 * (128 + 64 + 64 + 128) + 128 * 128 + 3 * 128 * 352) + 128 * 256)
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # 8 rows x 128 positions per step, over 2 ranks
        achieved = per_token * 8 * 128 / row["step_time_s"] / 2
        assert row["tflops_per_gpu"] == pytest.approx(achieved / 1e12, rel=1e-9), row
        assert row["mfu"] == pytest.approx(row["tflops_per_gpu"] / 0.001, rel=1e-9), row
        assert "mem_peak_gib" not in row  # no device memory to report on a CPU
    assert re.search(r"\| TFLOP/s/GPU [0-9.e-]+ \| MFU [0-9.]+%$", proc.stdout, re.M), proc.stdout


def test_bad_layout_fails_fast_with_the_setting_named(tmp_path):
    save = tmp_path / "run"
    proc = run([sys.executable, "-m", "mswift", "train", "--config", str(EXAMPLE),
                "tensor_model_parallel_size=3", "sequence_parallel=false", f"save={save}"],
               timeout=120)
    assert proc.returncode == 2
    assert "tensor_model_parallel_size=3: must divide num_attention_heads=4" in proc.stderr
    assert "world size 1: not divisible by tensor_model_parallel_size (3)" in proc.stderr
    assert not save.exists()


def test_a_new_run_into_a_used_save_folder_is_refused_with_nothing_changed(tmp_path):
    """Under torchrun every rank stops before a process group exists, exit code 2 alone."""
    save = tmp_path / "run"
    (save / "iter_0000003").mkdir(parents=True)
    (save / "iter_0000003" / "metadata.json").write_text("{}")
    (save / "latest_checkpointed_iteration.txt").write_text("3\n")
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n')
    before = snapshot(tmp_path)
    args = ["--config", str(EXAMPLE), "train_iters=2", f"save={save}"]
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_port", str(free_port()), "launch/pretrain_sft.py", *args],
                [sys.executable, "-m", "mswift", "train", *args]):
        proc = run(cmd, timeout=120)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert f"save={save}: already holds a run's latest_checkpointed_iteration.txt, " \
               f"metrics.jsonl, iter_0000003" in proc.stderr, proc.stderr[-3000:]
        assert f"pass load={save}" in proc.stderr and "new or empty folder" in proc.stderr
        assert snapshot(tmp_path) == before
    assert proc.returncode == 2


def test_cli_help_lists_commands():
    proc = run([sys.executable, "-m", "mswift", "--help"], timeout=60)
    assert proc.returncode == 0 and "train" in proc.stdout
    proc = run([sys.executable, "-m", "mswift", "nonsense"], timeout=60)
    assert proc.returncode == 2 and "unknown command 'nonsense'" in proc.stderr
