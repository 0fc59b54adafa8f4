"""What a user sees when a run is set up wrong: one report, before torch, megatron-core or any
process group, as ``mswift train`` (exit 2, no traceback) and under torchrun with 2 ranks
(the report once; the only traceback is torchrun's own failure summary)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mswift.testing.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "examples/tiny_llama_tp2.yaml"
# Lines that only come once the up-front checks passed: torch/megatron-core being imported,
# process groups being started (mswift's phase line, gloo's or torch.distributed's own).
STARTED = re.compile(r"importing torch|process group|gloo|megatron", re.I)

CASES = {
    "bad setting": (["lr=abc"], "lr='abc' (command line): expected a number"),
    "missing dataset": (["dataset=[data/no_such_file.jsonl]"],
                        "dataset: data/no_such_file.jsonl not found"),
}


def run(cmd, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_reported_once_before_start(out: str, message: str) -> None:
    assert out.count(message) == 1, out
    assert not STARTED.search(out), out
    # no frame of mswift's own code (or the launch script) in any traceback
    assert not re.search(r'File ".*(mswift|launch)/', out), out


@pytest.mark.parametrize("case", sorted(CASES))
def test_mswift_train_reports_once_without_traceback(case, tmp_path):
    overrides, message = CASES[case]
    proc = run([sys.executable, "-m", "mswift", "train", "--config", EXAMPLE,
                f"save={tmp_path / 'run'}", *overrides])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert_reported_once_before_start(out, message)
    assert "Traceback" not in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_torchrun_two_ranks_report_once_before_any_process_group(case, tmp_path):
    overrides, message = CASES[case]
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "launch/pretrain_sft.py",
                "--config", EXAMPLE, f"save={tmp_path / 'run'}", *overrides])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert_reported_once_before_start(out, message)
    # the report comes before torchrun's failure summary, which is the only traceback
    assert out.count("Traceback") <= 1, out
    assert out.index(message) < out.index("launch/pretrain_sft.py FAILED"), out
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 2", out), out


def test_every_problem_of_the_run_in_one_report(tmp_path):
    proc = run([sys.executable, "-m", "mswift", "train", "--config", EXAMPLE,
                f"dataset=[{tmp_path / 'a.jsonl'}]", f"hf_model={tmp_path / 'no_model'}",
                f"load={tmp_path / 'no_ckpt'}", "tensor_model_parallel_size=3",
                "sequence_parallel=false"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for expected in (f"dataset: {tmp_path / 'a.jsonl'} not found",
                     f"hf_model={tmp_path / 'no_model'}: not found",
                     f"load={tmp_path / 'no_ckpt'}: not found"):
        assert expected in proc.stderr
    # without the model's real shape (hf_model) the layout is not judged; with it, it is
    proc = run([sys.executable, "-m", "mswift", "train", "--config", EXAMPLE,
                "tensor_model_parallel_size=3", "sequence_parallel=false", "tokenizer=byte",
                f"eval_dataset=[{tmp_path / 'b.jsonl'}]"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tensor_model_parallel_size=3: must divide num_attention_heads=4" in proc.stderr
    assert f"eval_dataset: {tmp_path / 'b.jsonl'} not found" in proc.stderr


def test_list_settings_shows_section_default_and_description():
    proc = run([sys.executable, "-m", "mswift", "train", "--list-settings"])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^training:$", proc.stdout, re.M)
    assert re.search(r"^  lr +0\.0003 +peak learning rate", proc.stdout, re.M)
    assert re.search(r"^  tensor_model_parallel_size +1 +TP: ", proc.stdout, re.M)
