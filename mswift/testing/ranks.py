"""Run a function on N ranks: spawned processes joined by torch.distributed over localhost.

``run_ranks(4, body, arg)`` starts 4 processes with torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port),
calls ``body(arg)`` in each and returns the list of their return values, by rank. ``body``
must be importable (a module-level function). If a rank raises, the others are stopped and
:class:`RankFailure` carries that rank's traceback; past ``timeout`` seconds every rank is
stopped and the error names the ranks that had not finished (a hang, not a slow test).

Ranks are forked from a multiprocessing *forkserver* that has imported torch, megatron-core and
transformers once (:data:`PRELOAD`): a spawned rank paid those imports again, ~5 s of CPU per
rank per call. Each rank is still a new process with nothing initialised (the server only
imports), and it runs with the caller's environment and output of the moment, as a spawned one
would. With CUDA present the ranks are spawned as before.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
import warnings
from typing import Any, Callable


# Imported once by the forkserver the ranks are forked from (an import that fails is skipped).
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
           "megatron.core.optimizer", "megatron.core.dist_checkpointing", "transformers"]


class RankFailure(AssertionError):
    """A rank raised or the ranks did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _context():
    """The forkserver with :data:`PRELOAD` (set before the server starts, at the first call);
    spawn where CUDA is present, as a fork after an import that touched CUDA is unsafe."""
    from mswift.runtime.device import cuda_available

    if cuda_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _use_callers_output(caller: int) -> None:
    """Write to the caller's stdout / stderr of the moment, as a spawned rank would, not to
    the forkserver's (the caller's when the server started: under pytest, the captured
    output of whichever test started it)."""
    for fd in (1, 2):
        try:
            target = os.open(f"/proc/{caller}/fd/{fd}", os.O_WRONLY | os.O_APPEND)
        except OSError:  # not Linux, or not a file that can be opened again (a socket)
            continue
        os.dup2(target, fd)
        os.close(target)


def _rank_main(rank, world_size, port, env, caller, body, args, kwargs, results):
    _use_callers_output(caller)
    # megatron-core warns at import that optional GPU packages are absent: expected here.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
    # The forkserver's environment is the caller's when the server started: use the caller's
    # of this call instead. OpenMP read OMP_NUM_THREADS when the server imported torch.
    os.environ.clear()
    os.environ.update(env)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        # Plain pickle bytes: a tensor sent through the queue as-is travels as a shared-memory
        # handle that dies with this process, possibly before the parent reads it.
        results.put((rank, True, pickle.dumps(body(*args, **kwargs))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from mswift.runtime import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def run_ranks(
    world_size: int,
    body: Callable[..., Any],
    *args,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    **kwargs,
) -> list[Any]:
    """Call ``body(*args, **kwargs)`` on ``world_size`` ranks; return their results by rank."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, child_env, os.getpid(), body, args, kwargs,
                  results),
            daemon=False,  # the torch_dist checkpoint writer starts processes of its own
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        values = _collect(procs, results, world_size, timeout)
        for proc in procs:  # let ranks finish their exit (process groups, writer processes)
            proc.join(timeout=60)
        return values
    finally:
        for proc in procs:
            _kill_tree(proc)


def _kill_tree(proc) -> None:
    """Stop a rank and anything it started (e.g. the checkpoint writer's manager process)."""
    import psutil

    if proc.pid is None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.is_alive():
        proc.kill()
    proc.join(timeout=10)


def _collect(procs, results, world_size, timeout) -> list[Any]:
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(values))
            raise RankFailure(f"ranks {missing} of {world_size} did not finish in {timeout:.0f} s")
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None) and r not in values]
            if dead:
                raise RankFailure(
                    f"rank {dead[0]} of {world_size} died with exit code {procs[dead[0]].exitcode} "
                    "before reporting (killed by a signal or out of memory?)"
                ) from None
            continue
        if not ok:
            raise RankFailure(f"rank {rank} of {world_size} failed:\n{value}")
        values[rank] = pickle.loads(value)
    return [values[r] for r in range(world_size)]
