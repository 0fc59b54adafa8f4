"""Multi-node training on one machine: two torchrun agents ("nodes") x 2 CPU ranks joined by one
c10d rendezvous, and launch/slurm/train.sbatch run end to end.

SLURM cannot run here. The sbatch test puts stand-ins for ``srun`` and ``scontrol`` first on
PATH (tests/e2e/fake_slurm/: srun runs the step's command once per "node" on this machine and
forwards signals to it); everything below them is real: the batch script, node_launch.sh,
torchrun's c10d rendezvous, the training ranks and their checkpoints.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from mswift.testing.ranks import free_port

pytestmark = pytest.mark.slow  # torchrun agents and SLURM-style launches training on 4 ranks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_llama_tp2.yaml"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"
STEP = re.compile(r"^step +(\d+)/(\d+) \| loss (\S+)", re.M)
TIMEOUT_S = 300  # a start takes ~30 s on 2 idle cores; this only bounds a hang


def test_two_torchrun_agents_train_over_one_c10d_rendezvous(tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
           "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "test",
           "launch/pretrain_sft.py", "--config", str(EXAMPLE),  # TP=2 x DP=2 on 4 ranks
           "train_iters=4", "log_interval=1", "save_interval=100", f"save={save}"]
    with Processes(tmp_path) as procs:
        agents = [procs.start(cmd, f"node{i}") for i in range(2)]
        output = procs.run_to_end(agents)

    losses = step_losses(output, total=4)
    assert [s for s, _ in losses] == [1, 2, 3, 4], output[-4000:]
    values = [v for _, v in losses]
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < values[0] - 0.2, f"loss did not fall: {values}"
    assert_complete_checkpoint(save, 4)


def test_sbatch_script_trains_requeues_on_usr1_and_resumes(tmp_path):
    """train.sbatch with 2 fake nodes x 2 ranks: USR1 -> save + exit 0 + requeue; the restart
    resumes from the checkpoint."""
    save = tmp_path / "run"
    slurm_log = tmp_path / "slurm_calls.jsonl"
    port = free_port()
    env = {
        "PATH": f"{fake_slurm_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(slurm_log), "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "localhost,localhost",
        "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_ON_NODE": "2", "NPROC_PER_NODE": "2",
        "RDZV_PORT": str(port), "MSWIFT_SIGNAL_RESEND_S": "5",
    }
    args = ["--config", str(EXAMPLE.relative_to(ROOT)), "log_interval=1",
            "save_interval=1000", f"save={save}"]

    # First start: a long run, preempted by USR1 to the batch shell once it has trained.
    with Processes(tmp_path) as procs:
        job = procs.start(["bash", str(SBATCH), *args, "train_iters=500"], "first", env=env)
        procs.wait_for_output(STEP, "a logged training step")
        job.send_signal(signal.SIGUSR1)
        first = procs.run_to_end([job])
    stopped = re.search(r"stopping after step (\d+): signal received; checkpoint saved", first)
    assert stopped, first[-4000:]
    k = int(stopped.group(1))
    assert_complete_checkpoint(save, k)
    calls = [json.loads(line) for line in slurm_log.read_text().splitlines()]
    assert {"cmd": "scontrol", "argv": ["requeue", "4242"]} in calls
    srun = next(c["argv"] for c in calls if c["cmd"] == "srun")
    for expected in ("--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--nnodes=2",
                     "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_id=4242",
                     f"--rdzv_endpoint=localhost:{port}", "launch/pretrain_sft.py",
                     "examples/tiny_llama_tp2.yaml", "train_iters=500", f"save={save}"):
        assert expected in srun, (expected, srun)
    assert not any(a.startswith("load=") for a in srun), srun

    # The requeued start: same job and arguments (but for a nearer end); resumes from step k.
    slurm_log.write_text("")
    with Processes(tmp_path) as procs:
        job = procs.start(["bash", str(SBATCH), *args, f"train_iters={k + 2}"], "requeued",
                          env={**env, "SLURM_RESTART_COUNT": "1"})
        second = procs.run_to_end([job])
    assert f"resuming from {save} (iteration {k})" in second
    srun = json.loads(slurm_log.read_text().splitlines()[-1])["argv"]
    assert f"load={save}" in srun, srun
    resumed = step_losses(second, total=k + 2)
    assert [s for s, _ in resumed] == [k + 1, k + 2], second[-4000:]
    first_loss = step_losses(first, total=500)[0][1]
    assert all(math.isfinite(v) and v < first_loss for _, v in resumed), (first_loss, resumed)
    assert_complete_checkpoint(save, k + 2)
    assert "requeue" not in slurm_log.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_slurm_scripts_pass_shellcheck():
    scripts = [SBATCH, ROOT / "launch" / "slurm" / "node_launch.sh"]
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ---- helpers -----------------------------------------------------------------------------------

def step_losses(output: str, total: int) -> list[tuple[int, float]]:
    """(step, loss) of each progress line of a run of ``total`` steps."""
    return [(int(s), float(loss)) for s, n, loss in STEP.findall(output) if int(n) == total]


def assert_complete_checkpoint(save: Path, iteration: int) -> None:
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iteration)
    ckpt = save / f"iter_{iteration:07d}"
    assert (ckpt / "metadata.json").is_file() and (ckpt / "common.pt").is_file()
    # Shards from ranks of both "nodes" (ranks 0-1 on one agent, 2-3 on the other).
    writers = {int(m.group(1)) for p in ckpt.glob("__*.distcp")
               if (m := re.match(r"__(\d+)_\d+\.distcp$", p.name))}
    assert writers == {0, 1, 2, 3}, sorted(p.name for p in ckpt.iterdir())
    assert not list(save.glob("*.tmp"))


def fake_slurm_bin(tmp_path: Path) -> Path:
    """A directory with ``srun`` and ``scontrol`` commands that run the stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        shim = bin_dir / name
        script = FAKE_SLURM / f"{name}.py"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
        shim.chmod(0o755)
    return bin_dir


class Processes:
    """Starts commands with their output in files; on exit kills whatever they left running.

    Every process started here, and all its descendants, carry a tag in their environment, so
    the clean-up finds even processes whose parent is gone (torchrun's ranks run in sessions of
    their own) and touches no one else's.
    """

    def __init__(self, tmp_path: Path):
        self.tag = uuid.uuid4().hex
        self.dir = tmp_path
        self.logs: list[Path] = []
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = self.dir / f"{name}.log"
        self.logs.append(log)
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MSWIFT_TEST_TAG": self.tag,
                    **(env or {})}
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)

    def wait(self, procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{proc.args[:4]}... still running after {timeout:.0f} s:\n"
                            + self.output()[-4000:])

    def wait_for_output(self, pattern: re.Pattern, what: str, timeout: float = TIMEOUT_S):
        start = time.monotonic()
        while not pattern.search(self.output()):
            codes = [p.poll() for p in self.procs]
            if time.monotonic() - start > timeout or None not in codes:
                pytest.fail(f"no {what} after {time.monotonic() - start:.0f} s (exit codes "
                            f"{codes}):\n" + self.output()[-4000:])
            time.sleep(0.2)

    def run_to_end(self, procs: list[subprocess.Popen]) -> str:
        """Wait for ``procs``; check that each exited 0 and left nothing running; the output."""
        self.wait(procs)
        output = self.output()
        assert [p.returncode for p in procs] == [0] * len(procs), output[-4000:]
        self.assert_none_left()
        return output

    def assert_none_left(self, grace_s: float = 10.0) -> None:
        """Nothing started here still runs (checked after the commands exited cleanly)."""
        deadline = time.monotonic() + grace_s
        while (left := self._tagged()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, [p.info for p in left]

    def _tagged(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
            try:
                if (proc.pid != os.getpid() and proc.info["status"] != psutil.STATUS_ZOMBIE
                        and proc.environ().get("MSWIFT_TEST_TAG") == self.tag):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self._tagged():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return False
