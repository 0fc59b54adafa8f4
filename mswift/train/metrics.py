"""Per-step metrics: a progress line on rank 0 and one JSON object per step in metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from mswift.train.save_dir import METRICS_FILE

# Field names of older metrics.jsonl files -> today's ("tokens" counted the loss tokens).
RENAMED_FIELDS = {"tokens": "loss_tokens"}


def with_current_names(row: dict) -> dict:
    """A metrics row with fields of older files under today's names."""
    for old, new in RENAMED_FIELDS.items():
        if old in row and new not in row:
            row[new] = row.pop(old)
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
    if not m.get("updated", True):
        line += " | skipped (non-finite)"
    if "eval_loss" in m:
        line += f" | eval loss {m['eval_loss']:.4f}"
    return line
