"""Where this process sits in the job: rank, world size, local rank and the rendezvous address.

Read from the launcher's environment, in this order: torchrun (``RANK``/``WORLD_SIZE``/...),
SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_JOB_NODELIST``), MPI
(Open MPI's ``OMPI_COMM_WORLD_*``, MPICH / Intel MPI's ``PMI_*``), else a single process.
torchrun comes first because an sbatch script usually runs torchrun, which sets its own.

MPI launchers name no rendezvous address. A job on one host meets on 127.0.0.1; a job on several
hosts needs rank 0's host name, which mpi4py (the ``mpi`` extra) shares, or ``MASTER_ADDR``.
Without ``MASTER_PORT``, rank 0 picks a free port and mpi4py shares it too (else 29500).
"""
from __future__ import annotations

import functools
import os
import re
import socket
import sys
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


class LaunchEnvError(ValueError):
    """The launcher's environment cannot start the job (a bad value, no way to find rank 0)."""


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={raw!r}: expected an integer") from None


# Where each launcher puts the global rank, in detect_launch_env's order.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launcher_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank as its launcher set it (torchrun, SLURM, MPI), else 0.

    Reads the environment only (no MPI collective, unlike :func:`detect_launch_env` under MPI),
    so it works before any process group exists and when the environment itself is wrong.
    """
    env = os.environ if env is None else env
    for name in RANK_VARIABLES:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


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
    """This process's place in the job, from ``env`` (default: its own environment).

    Under MPI, mpi4py is asked for rank 0's host and port only when ``env`` is this process's
    own environment: a mapping passed in describes some other process and is only read.
    """
    ask_mpi = env is None or env is os.environ
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
    mpi = _mpi_launch_env(env, ask_mpi=ask_mpi)
    if mpi is not None:
        return mpi
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _port(env), "single")


# (rank, world size, local rank names, local size names) of each MPI family's launcher.
_MPI_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
     ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
     ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")),
)


def _mpi_launch_env(env: Mapping[str, str], ask_mpi: bool) -> LaunchEnv | None:
    """The MPI launcher's view, or None when no MPI launcher started this process."""
    for rank_key, size_key, local_rank_keys, local_size_keys in _MPI_VARIABLES:
        if rank_key in env and size_key in env:
            break
    else:
        return None
    world_size = _int(env, size_key)
    local_rank = next((_int(env, k) for k in local_rank_keys if k in env), 0)
    local_size_key = next((k for k in local_size_keys if k in env), None)
    one_host = world_size == 1 or (
        local_size_key is not None and _int(env, local_size_key) == world_size)
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_host else None)
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    shared: tuple[str, int] | str = "not asked: the environment given is not this process's"
    if ask_mpi and world_size > 1 and (addr is None or port is None):
        shared = _rank0_host_and_port()
        if isinstance(shared, tuple):
            addr = addr or shared[0]
            port = port or shared[1]
    if addr is None:
        where = (f"{local_size_key}={env[local_size_key]} of {size_key}={world_size} ranks on "
                 "this host" if local_size_key else
                 f"{' / '.join(local_size_keys)} unset, so the ranks may be on several hosts")
        raise LaunchEnvError(
            f"MPI job without MASTER_ADDR ({where}): rank 0's host is unknown because mpi4py "
            f"cannot tell it ({shared}). Install mpi4py (pip install 'mswift[mpi]') or pass "
            "rank 0's host name, e.g. mpirun -x MASTER_ADDR=HOST ...")
    return LaunchEnv(rank=_int(env, rank_key), world_size=world_size, local_rank=local_rank,
                     master_addr=addr, master_port=port or DEFAULT_PORT, launcher="mpi")


@functools.cache
def _rank0_host_and_port() -> tuple[str, int] | str:
    """Rank 0's host name and a free port on it, through MPI; else why mpi4py cannot tell.

    Collective: every rank calls it once (then the answer is cached). MPI is started for this
    one broadcast and finalized again, unless someone else had started it.
    """
    try:
        import mpi4py

        if "mpi4py.MPI" not in sys.modules:
            mpi4py.rc.initialize = mpi4py.rc.finalize = False  # we start and stop MPI below
        from mpi4py import MPI
    except (ImportError, RuntimeError) as err:  # not installed, or no MPI library found
        return f"{type(err).__name__}: {err}"
    if MPI.Is_finalized():
        return "MPI was already finalized in this process"
    started_here = not MPI.Is_initialized()
    if started_here:
        MPI.Init()
    try:
        comm = MPI.COMM_WORLD
        mine = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
        host, port = comm.bcast(mine, root=0)
    finally:
        if started_here:
            MPI.Finalize()
    return host, port


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
