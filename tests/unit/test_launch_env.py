import os
import sys

import pytest

from mswift.runtime.launch_env import (
    DEFAULT_PORT,
    LaunchEnv,
    LaunchEnvError,
    detect_launch_env,
    first_slurm_host,
)


def test_torchrun_env():
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                             "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank) == (3, 8, 1)
    assert (env.master_addr, env.master_port, env.launcher) == ("node7", 1234, "torchrun")


def test_torchrun_wins_over_slurm():
    env = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0",
                             "SLURM_NTASKS": "1"})
    assert env.launcher == "torchrun" and env.rank == 1


def test_slurm_env():
    env = detect_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                             "SLURM_JOB_NODELIST": "gpu-a[012-015,020],gpu-b3",
                             "SLURM_JOB_ID": "424242"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "slurm")
    assert env.master_addr == "gpu-a012"
    assert env.master_port == DEFAULT_PORT + 424242 % 10000


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("node[1-4]", "node1"), ("n[007,009]", "n007"),
    ("a-b[10-11],c1", "a-b10"), ("host1,host2", "host1"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_open_mpi_and_mpich_env():
    env = detect_launch_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "0", "MASTER_ADDR": "head"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (2, 4, 0, "head")
    env = detect_launch_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1",
                             "MASTER_ADDR": "head"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 1, "mpi")


def test_single_process_and_bad_values():
    env = detect_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    with pytest.raises(ValueError, match="RANK='x'"):
        detect_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


# ---- MPI: the environment as mpirun / mpiexec set it, in this process ----------------------------

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def mpi_env(monkeypatch):
    """Set variables as an MPI launcher would; mpi4py not importable, as if not installed."""
    from mswift.runtime import launch_env

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    launch_env._rank0_host_and_port.cache_clear()  # the answer is kept per process
    yield lambda **values: [monkeypatch.setenv(k, str(v)) for k, v in values.items()]
    launch_env._rank0_host_and_port.cache_clear()


def test_open_mpi_on_several_hosts_without_mpi4py_or_master_addr_is_refused(mpi_env):
    mpi_env(OMPI_COMM_WORLD_RANK=9, OMPI_COMM_WORLD_SIZE=16, OMPI_COMM_WORLD_LOCAL_RANK=1,
            OMPI_COMM_WORLD_LOCAL_SIZE=8)
    with pytest.raises(LaunchEnvError) as err:
        detect_launch_env()
    message = str(err.value)
    assert message.startswith("MPI job without MASTER_ADDR (OMPI_COMM_WORLD_LOCAL_SIZE=8 of "
                              "OMPI_COMM_WORLD_SIZE=16 ranks on this host)"), message
    assert "mpi4py cannot tell it (ModuleNotFoundError" in message
    assert "pip install 'mswift[mpi]'" in message and "mpirun -x MASTER_ADDR=HOST" in message


def test_mpich_on_several_hosts_or_unknown_hosts_is_refused(mpi_env):
    mpi_env(PMI_RANK=0, PMI_SIZE=4, MPI_LOCALRANKID=0, MPI_LOCALNRANKS=2)
    with pytest.raises(LaunchEnvError, match=r"MPI_LOCALNRANKS=2 of PMI_SIZE=4 ranks"):
        detect_launch_env()
    os.environ.pop("MPI_LOCALNRANKS")  # a PMI that does not say how many ranks share a host
    with pytest.raises(LaunchEnvError, match="MPI_LOCALNRANKS / PMI_LOCAL_SIZE unset, so the "
                                             "ranks may be on several hosts"):
        detect_launch_env()


def test_mpi_on_several_hosts_with_master_addr_needs_no_mpi4py(mpi_env):
    mpi_env(OMPI_COMM_WORLD_RANK=9, OMPI_COMM_WORLD_SIZE=16, OMPI_COMM_WORLD_LOCAL_RANK=1,
            OMPI_COMM_WORLD_LOCAL_SIZE=8, MASTER_ADDR="head-node")
    assert detect_launch_env() == LaunchEnv(9, 16, 1, "head-node", DEFAULT_PORT, "mpi")


def test_mpi_on_one_host_without_mpi4py_meets_on_localhost(mpi_env):
    mpi_env(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_LOCAL_RANK=1,
            OMPI_COMM_WORLD_LOCAL_SIZE=2, MASTER_PORT=31000)
    assert detect_launch_env() == LaunchEnv(1, 2, 1, "127.0.0.1", 31000, "mpi")
    mpi_env(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=1, OMPI_COMM_WORLD_LOCAL_RANK=0,
            OMPI_COMM_WORLD_LOCAL_SIZE=1)
    os.environ.pop("MASTER_PORT")
    assert detect_launch_env() == LaunchEnv(0, 1, 0, "127.0.0.1", DEFAULT_PORT, "mpi")


def test_mapping_of_another_process_is_only_read():
    """A mapping passed in is not this process's job: mpi4py is not asked, MPI not started."""
    with pytest.raises(LaunchEnvError, match=r"mpi4py cannot tell it \(not asked"):
        detect_launch_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
                           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


def test_launcher_rank_reads_each_launcher_without_a_process_group():
    from mswift.runtime.launch_env import launcher_rank

    assert launcher_rank({}) == 0
    assert launcher_rank({"RANK": "3", "SLURM_PROCID": "1"}) == 3  # torchrun inside srun
    assert launcher_rank({"SLURM_PROCID": "5"}) == 5
    assert launcher_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1
    assert launcher_rank({"PMI_RANK": "2"}) == 2
    assert launcher_rank({"RANK": "", "PMI_RANK": "4"}) == 4  # an empty variable is no rank
