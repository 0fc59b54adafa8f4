"""One torchrun training of examples/tiny_llama_tp2.yaml shared by the end-to-end tests that
need it: test_train_cli checks its output, checkpoints and FLOPs; test_mpi trains the same job
under mpirun and compares the losses with it. Run once per session, not once per test."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mswift.testing.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_llama_tp2.yaml"
# launch/pretrain_sft.py's arguments (without save=) of the shared run
TINY_TP2 = ["--config", str(EXAMPLE), "train_iters=6", "log_interval=1", "save_interval=3",
            "peak_tflops=0.001"]


@pytest.fixture(scope="session")
def tiny_tp2_torchrun(tmp_path_factory):
    """(the finished torchrun process, its save folder, launch/pretrain_sft.py's arguments but
    save=); the tests check the return code."""
    save = tmp_path_factory.mktemp("tiny_tp2") / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), "launch/pretrain_sft.py",
                           *TINY_TP2, f"save={save}"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    return proc, save, TINY_TP2
