"""Where this process sits in the job: rank, world size, local rank and the rendezvous address.

Read from the launcher's environment, in this order: torchrun (``RANK``/``WORLD_SIZE``/...),
SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_JOB_NODELIST``), MPI
(Open MPI's ``OMPI_COMM_WORLD_*``, MPICH / Intel MPI's ``PMI_*``), else a single process.
torchrun comes first because an sbatch script usually runs torchrun, which sets its own.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``'gpu[003-005,9],cpu1'`` -> ``'gpu003'``."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match or not match.group(1):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read a host name from it")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _port(env: Mapping[str, str], job_id: str | None = None) -> int:
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    if job_id and job_id.isdigit():  # different jobs sharing a first node get different ports
        return DEFAULT_PORT + int(job_id) % 10000
    return DEFAULT_PORT


def detect_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port(env),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(
            env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        )
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=_port(env, env.get("SLURM_JOB_ID")),
            launcher="slurm",
        )
    for rank_key, size_key, local_keys in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
        ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
    ):
        if rank_key in env and size_key in env:
            local = next((_int(env, k) for k in local_keys if k in env), 0)
            return LaunchEnv(
                rank=_int(env, rank_key),
                world_size=_int(env, size_key),
                local_rank=local,
                master_addr=env.get("MASTER_ADDR") or _mpi_master_addr(),
                master_port=_port(env),
                launcher="mpi",
            )
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _port(env), "single")


def _mpi_master_addr() -> str:
    """Rank 0's host name, shared through MPI when mpi4py is installed (the ``mpi`` extra)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return "127.0.0.1"  # single node; multi-node MPI jobs set MASTER_ADDR or install mpi4py
    import socket

    return MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)
