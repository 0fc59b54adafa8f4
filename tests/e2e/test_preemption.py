"""Stopping and crashing mid-run, through torchrun on real files.

- SIGTERM to one rank: every rank saves at the next step boundary and exits 0; the restarted
  run continues bit-exactly (losses equal an undisturbed run's).
- kill -9 of a rank in the middle of a save: the restart resumes from the previous complete
  checkpoint and ends with the undisturbed run's losses.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from mswift.testing.ranks import free_port

pytestmark = pytest.mark.slow  # five torchrun trainings

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def command(save: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "launch/pretrain_sft.py",
            "--config", "examples/tiny_llama_tp2.yaml", f"train_iters={STEPS}",
            "log_interval=1", "save_interval=2", f"save={save}", f"load={save}",
            "hidden_size=64", "ffn_hidden_size=128", "seq_length=64", "lr_warmup_iters=2"]


def start(save: Path) -> subprocess.Popen:
    # Output goes to files: a pipe would stay open as long as any process that inherited it
    # (e.g. a checkpoint writer orphaned by the kill) lives. Every process of the run carries
    # a tag in its environment so strays can be found and stopped.
    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSWIFT_TEST_TAG": tag}
    out = open(save.parent / f"{save.name}-{tag}.out", "w+")
    err = open(save.parent / f"{save.name}-{tag}.err", "w+")
    proc = subprocess.Popen(command(save), cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
    proc.tag, proc.logs = tag, (out, err)
    return proc


def finish(proc: subprocess.Popen, timeout=300) -> tuple[int, str, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_tagged(proc.tag)
    texts = []
    for f in proc.logs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return proc.returncode, texts[0], texts[1]


def kill_tagged(tag: str) -> None:
    for p in psutil.process_iter():
        try:
            if p.environ().get("MSWIFT_TEST_TAG") == tag:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "pretrain_sft.py" in " ".join(child.cmdline()) and \
                        child.environ().get("RANK") == str(rank):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not start")


def losses(save: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def wait_for(predicate, timeout=180, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    save = tmp_path_factory.mktemp("undisturbed")
    rc, out, err = finish(start(save))
    assert rc == 0, err[-3000:]
    got = losses(save)
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
    return got


def tracker(save: Path) -> str:
    path = save / "latest_checkpointed_iteration.txt"
    return path.read_text().strip() if path.is_file() else ""


def test_sigterm_saves_and_resumes_exactly(tmp_path, undisturbed):
    proc = start(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3,
             what="3 logged steps")
    seen = len(metrics.read_text().splitlines())
    worker(proc, 1).send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert rc == 0, err[-3000:]
    stopped = int(tracker(tmp_path))
    assert seen <= stopped <= seen + 1, (seen, stopped)  # within one step of the signal
    assert f"stopping after step {stopped}: signal received" in out
    assert (tmp_path / f"iter_{stopped:07d}" / "metadata.json").is_file()

    rc, out, err = finish(start(tmp_path))
    assert rc == 0, err[-3000:]
    assert losses(tmp_path) == undisturbed


def test_kill9_mid_save_resumes_from_last_complete_checkpoint(tmp_path, undisturbed):
    proc = start(tmp_path)
    wait_for(lambda: (tmp_path / "iter_0000004.tmp").exists(), what="the step-4 save")
    worker(proc, 1).kill()
    rc, _, _ = finish(proc)
    assert rc != 0
    assert tracker(tmp_path) == "2", "the kill should land before the step-4 save completed"
    assert not (tmp_path / "iter_0000004").exists()

    rc, out, err = finish(start(tmp_path))
    assert rc == 0, err[-3000:]
    assert losses(tmp_path) == undisturbed
    assert not list(tmp_path.glob("*.tmp"))
