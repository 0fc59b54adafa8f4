"""When to stop: signals (SLURM preemption), exit_interval and a wall-clock limit.

A signal only sets a flag; at the next step boundary every rank learns whether any rank was
signalled (one all-reduce), so all ranks save the same step and exit together.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from mswift.config.schema import TrainingConfig
from mswift.runtime.device import local_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopControl:
    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        self.start = time.monotonic()
        self.signalled: int | None = None
        self._previous = {}
        if cfg.exit_signal_handler:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signum

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def reason_to_stop(self, iteration: int) -> str | None:
        """Why the run should save and exit after ``iteration`` steps (same on every rank)."""
        local = torch.zeros(2, device=local_device())
        if self.signalled is not None:
            local[0] = 1
        limit = self.cfg.exit_duration_in_mins
        if limit is not None and time.monotonic() - self.start > 60 * limit:
            local[1] = 1
        if dist.is_initialized():
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        if local[0]:
            return "signal received"
        if local[1]:
            return f"exit_duration_in_mins={limit} reached"
        interval = self.cfg.exit_interval
        if interval and iteration % interval == 0:
            return f"exit_interval={interval} reached"
        return None
