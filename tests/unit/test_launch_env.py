import pytest

from mswift.runtime.launch_env import DEFAULT_PORT, detect_launch_env, first_slurm_host


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
