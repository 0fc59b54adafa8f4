"""Per-step metrics: a progress line on rank 0 and one JSON object per step in metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from mswift.config.schema import MswiftConfig
from mswift.models.flops import train_flops_per_token
from mswift.models.registry import padded_vocab_for
from mswift.runtime.device import bf16_peak_flops, local_device, peak_memory_bytes
from mswift.train.save_dir import METRICS_FILE

# Field names of older metrics.jsonl files -> today's ("tokens" counted the loss tokens).
RENAMED_FIELDS = {"tokens": "loss_tokens"}


def with_current_names(row: dict) -> dict:
    """A metrics row with fields of older files under today's names."""
    for old, new in RENAMED_FIELDS.items():
        if old in row and new not in row:
            row[new] = row.pop(old)
    return row


class DeviceThroughput:
    """What a step got out of the devices: ``tflops_per_gpu`` (model FLOPs of
    :mod:`mswift.models.flops`), ``mfu`` (its share of the device's peak; only where the peak is
    known: ``peak_tflops`` or a GPU in the table) and ``mem_peak_gib`` (the most memory tensors
    held on one GPU during the step, the largest over the ranks; only with CUDA). Every rank
    calls :meth:`fields` (the memory peak is reduced over them)."""

    def __init__(self, cfg: MswiftConfig):
        padded = padded_vocab_for(cfg.model, cfg.parallel.tensor_model_parallel_size)
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_length, padded)
        peak = cfg.training.peak_tflops
        self.peak_flops = peak * 1e12 if peak is not None else bf16_peak_flops()
        self.devices = dist.get_world_size()

    def fields(self, token_slots: float, seconds: float) -> dict:
        """The fields of a step that fed ``token_slots`` positions (padding included, as
        Megatron-LM counts them) to the model, over every rank, in ``seconds``."""
        flops = self.flops_per_token * token_slots / seconds / self.devices
        row = {"tflops_per_gpu": flops / 1e12}
        if self.peak_flops is not None:
            row["mfu"] = flops / self.peak_flops
        peak_bytes = peak_memory_bytes()
        if peak_bytes is not None:  # the same on every rank: CUDA or not
            most = torch.tensor([peak_bytes], dtype=torch.float64, device=local_device())
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            row["mem_peak_gib"] = most.item() / 2**30
        return row


class MetricsLog:
    """Rank 0 writes ``SAVE/metrics.jsonl``; rows past the resumed step are dropped first."""

    def __init__(self, save_dir: str | None, resumed_step: int, total_steps: int,
                 log_interval: int):
        self.total, self.interval = total_steps, log_interval
        self.path = None
        self.tensorboard = None
        if dist.get_rank() != 0 or save_dir is None:
            return
        self.path = Path(save_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, resumed_step)
        self.tensorboard = _tensorboard(Path(save_dir) / "tensorboard")

    def log(self, row: dict) -> None:
        if dist.get_rank() != 0:
            return
        if row["step"] % self.interval == 0 or row["step"] == self.total or "eval_loss" in row:
            print(progress_line(row, self.total), flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep every row of steps <= ``step``: a resumed run logs the later steps again.

    Rows of later steps go, and so does a last line cut short by a crash (no newline, not
    JSON), which the next row would otherwise be glued to; any other line is kept as it is.
    """
    if not path.is_file():
        return
    text = path.read_text(errors="surrogateescape")  # other bytes are kept as they are
    lines = text.splitlines()
    unfinished = bool(text) and not text.endswith("\n")
    if unfinished and _row(lines[-1]) is None:
        lines.pop()
    kept = [line for line in lines if not _after(line, step)]
    if len(kept) == len(lines) and not unfinished:
        return  # unchanged: the file is left alone
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), errors="surrogateescape")
    tmp.replace(path)


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _after(line: str, step: int) -> bool:
    row = _row(line)
    return row is not None and isinstance(row.get("step"), int) and row["step"] > step


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(log_dir))


def progress_line(m: dict, total: int) -> str:
    if "loss" not in m:
        return f"step {m['step']:>5}/{total} | eval loss {m['eval_loss']:.4f}"
    line = (f"step {m['step']:>5}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | "
            f"grad norm {m['grad_norm']:.3f} | tokens/s {m['tokens_per_s']:.0f} | "
            f"s/step {m['step_time_s']:.2f} | padding-free {m['padding_efficiency']:.1%}")
    if "mtp_loss" in m:
        line += " | mtp loss " + "/".join(f"{x:.4f}" for x in m["mtp_loss"])
    line += f" | TFLOP/s/GPU {m['tflops_per_gpu']:.3g}" if "tflops_per_gpu" in m else ""
    line += f" | MFU {m['mfu']:.1%}" if "mfu" in m else ""
    line += f" | mem {m['mem_peak_gib']:.1f} GiB" if "mem_peak_gib" in m else ""
    if not m.get("updated", True):
        line += " | skipped (non-finite)"
    if "eval_loss" in m:
        line += f" | eval loss {m['eval_loss']:.4f}"
    return line
