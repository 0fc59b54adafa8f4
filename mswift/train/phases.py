"""One line when a slow phase of a run starts and one when it ends, on rank 0 only.

Loading weights, building the model, saving a checkpoint and exporting can each take from
seconds to minutes; a user should never wonder whether the job hangs. The end line says how
long the phase took and, for files, how much was written where.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path


def is_rank0() -> bool:
    """Rank 0 of the job: torch.distributed's rank once it is started, else the launcher's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    from mswift.runtime.launch_env import launcher_rank

    return launcher_rank() == 0


def say(line: str) -> None:
    if is_rank0():
        print(line, flush=True)


class Phase:
    """What the ``with`` body may add to the end line (``phase.result = "2.2 GB in PATH"``)."""

    def __init__(self):
        self.result = ""


@contextmanager
def phase(what: str, done: str | None = None):
    """``with phase("building the model"):`` prints ``building the model ...`` and then
    ``built ... in 3.2 s`` (``done``, default ``WHAT: done``) with ``phase.result`` appended."""
    say(f"{what} ...")
    start, info = time.perf_counter(), Phase()
    yield info
    seconds = time.perf_counter() - start
    tail = f" ({info.result})" if info.result else ""
    say(f"{done or what + ': done'} in {seconds:.1f} s{tail}")


def folder_size(path: str | Path) -> int:
    """Bytes of every file under ``path`` (what this node can see of it)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
