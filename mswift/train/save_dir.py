"""What a run may write and delete in its ``save`` folder; no run's data is lost to another.

- A folder that holds a run's checkpoints or ``metrics.jsonl`` is written to only by a run that
  continues it: ``load`` = ``save`` (with the optimizer state, or with no checkpoint there yet).
  Any other run is refused (:func:`save_dir_problems`, one of the checks before start, and
  :func:`check_save_dir` in ``setup``) before a process group, a model or a file exists; every
  rank reads the folder itself, so under torchrun they all stop together. Plain file logic:
  importing this module imports neither torch nor megatron-core.
- ``SAVE/mswift_checkpoints.json`` (the ledger) lists the iterations that run (and the runs
  that resumed it) saved there. An iteration is entered before its ``iter_N.tmp`` is made, so a
  crashed save's temporary folder is known too. ``save_total_limit`` deletes only ledger
  checkpoints, never the one the tracker names nor the newest complete one; a checkpoint the
  ledger does not list (copied in, or saved by an older mswift) is never deleted or written over.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mswift.bridge.tracker import (
    ITER_PREFIX,
    TRACKER,
    TrackerError,
    iteration_dir,
    read_tracker,
)

LEDGER = "mswift_checkpoints.json"
METRICS_FILE = "metrics.jsonl"  # one JSON object per step (mswift.train.metrics)


class SaveDirError(ValueError):
    """``save`` would write over, or delete, what another run left there."""


def temp_dir(root: str | Path, iteration: int) -> Path:
    """Where a save of ``iteration`` is written before it is renamed to its ``iter_N`` name."""
    return Path(root) / f"{ITER_PREFIX}{iteration:07d}.tmp"


def _iteration_of(path: Path) -> int | None:
    """N of ``iter_N`` or ``iter_N.tmp``; None for any other name."""
    name = path.name.removeprefix(ITER_PREFIX).removesuffix(".tmp")
    return int(name) if path.name.startswith(ITER_PREFIX) and name.isdigit() else None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(iteration, dir) of every complete checkpoint under ``root``, oldest first."""
    found = []
    for path in root.glob(f"{ITER_PREFIX}*"):
        if not path.name.endswith(".tmp") and (path / "metadata.json").is_file():
            iteration = _iteration_of(path)
            if iteration is not None:
                found.append((iteration, path))
    return sorted(found)


def same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def run_files(save: Path, save_hf: bool = False) -> list[str]:
    """Names in ``save`` that a run wrote and a new run there would write over: the tracker,
    ``iter_*`` (complete or not), ``metrics.jsonl``, a checkpoint's ``metadata.json``, and
    ``hf/`` where ``save_hf`` would replace it."""
    if not save.is_dir():
        return []
    names = [TRACKER, METRICS_FILE, "metadata.json"] + (["hf"] if save_hf else [])
    found = [name for name in names if (save / name).exists()]
    found += sorted(p.name for p in save.glob(f"{ITER_PREFIX}*"))
    return found


def _tracker_iteration(save: Path) -> int | None:
    try:
        named = read_tracker(save)
    except (OSError, TrackerError):
        return None
    return named if isinstance(named, int) else None


def read_ledger(save: Path) -> set[int]:
    """The iterations the ledger lists; none where there is no ledger."""
    path = save / LEDGER
    if not path.is_file():
        return set()
    try:
        written = json.loads(path.read_text())["written"]
        return {int(i) for i in written}
    except (ValueError, KeyError, TypeError) as err:
        raise SaveDirError(f"{path}: not a list of written iterations ({err}); remove it (then "
                           "save_total_limit deletes only checkpoints saved from now on)") from None


def continues_save_dir(cfg) -> bool:
    """Whether this run continues the run in ``save`` (loads its newest checkpoint there)."""
    ckpt = cfg.checkpoint
    return ckpt.load is not None and same_dir(ckpt.load, ckpt.save)


def save_dir_problems(cfg) -> list[str]:
    """Why this run may not write into its ``save`` folder: it holds another run's files (or,
    resuming, a checkpoint it did not save lies where the run will save). Reads files only."""
    ckpt = cfg.checkpoint
    if not ckpt.save:
        return []
    save = Path(ckpt.save)
    if save.exists() and not save.is_dir():
        return [f"save={save}: exists and is not a directory"]
    found = run_files(save, ckpt.save_hf)
    if not found:
        return []  # new, empty or unrelated files only: a fresh start
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    has_checkpoint = (save / TRACKER).exists() or bool(complete_checkpoints(save))
    if continues_save_dir(cfg) and ckpt.no_load_optim and has_checkpoint:
        return [f"save={save}: holds a run's {shown}; load={ckpt.load} with no_load_optim=true "
                "starts again at step 0 and would write over them. To resume that run, leave "
                "no_load_optim unset (load=the same folder); to start a new run from its "
                "weights, pass save=<a new or empty folder>"]
    if continues_save_dir(cfg):
        try:
            return _foreign_ahead(save)
        except SaveDirError as err:
            return [str(err)]
    load = "load is not set" if ckpt.load is None else f"load={ckpt.load}"
    return [f"save={save}: already holds a run's {shown}, and {load}: a new run would write over "
            f"them, so nothing was started. To resume that run, pass load={save}; to start a "
            "new run, pass save=<a new or empty folder>"]


def check_save_dir(cfg) -> None:
    """SaveDirError for :func:`save_dir_problems`; every rank, before any process group."""
    problems = save_dir_problems(cfg)
    if problems:
        raise SaveDirError("\n".join(problems))


def _foreign_ahead(save: Path) -> list[str]:
    """A resumed run saves iterations after its checkpoint's: none of those may be taken by a
    checkpoint (or temporary folder) that the ledger does not list."""
    written = read_ledger(save)
    start = _tracker_iteration(save)
    if start is None:
        return []  # nothing to resume from here (or a broken tracker, which the load names)
    ahead = sorted(p.name for p in save.glob(f"{ITER_PREFIX}*")
                   if (_iteration_of(p) or 0) > start and _iteration_of(p) not in written)
    if not ahead:
        return []
    return [f"save={save}: {', '.join(ahead)} lies after the checkpoint this run resumes from "
            f"(iteration {start}) and was not saved by it (not in {LEDGER}): the run could "
            "write over it. Move it out of the folder, or start a new run in a new folder"]


class SaveLedger:
    """The iterations this run (and the runs it resumed) saved under ``root``: every rank holds
    it (each checks its saves against it); rank 0 writes it to ``root/mswift_checkpoints.json``
    and tidies the folder with it."""

    def __init__(self, root: str | Path, written: set[int] | None = None):
        self.root = Path(root)
        self.written = set(written or ())

    @classmethod
    def open(cls, root: str | Path, continues: bool) -> SaveLedger:
        """The folder's ledger when this run continues the folder's run, else an empty one."""
        return cls(root, read_ledger(Path(root)) if continues else set())

    def claim(self, iteration: int) -> None:
        """Every rank, before saving ``iteration``: refuse to write over what is not ours."""
        paths = (iteration_dir(self.root, iteration), temp_dir(self.root, iteration))
        taken = [p.name for p in paths if os.path.lexists(p)]
        if taken and iteration not in self.written:
            raise SaveDirError(f"save={self.root}: {', '.join(taken)} was not saved by this run; "
                               "it is not written over. Move it out of the folder")
        self.written.add(iteration)

    def write(self) -> None:
        """Rank 0: replace the ledger file atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"note": "iterations saved here by this run and the runs that resumed it; "
                        "save_total_limit deletes only these",
                "written": sorted(self.written)}
        tmp = self.root / (LEDGER + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.root / LEDGER)

    def tidy(self, keep_last: int | None, current: Path) -> None:
        """Rank 0, after a save: remove this run's crashed saves' temporary folders and, with
        ``keep_last``, its complete checkpoints but the newest ``keep_last``; never ``current``
        (the tracker's) nor the newest complete one in the folder. The ledger then forgets
        what is gone."""
        for iteration in self.written:
            if temp_dir(self.root, iteration).is_dir():
                shutil.rmtree(temp_dir(self.root, iteration), ignore_errors=True)
        if keep_last is not None:
            everything = complete_checkpoints(self.root)
            keep = {current} | ({everything[-1][1]} if everything else set())
            own = [path for i, path in everything if i in self.written]
            for path in own[:-keep_last]:
                if path not in keep:
                    shutil.rmtree(path, ignore_errors=True)
        gone = {i for i in self.written if not os.path.lexists(iteration_dir(self.root, i))
                and not os.path.lexists(temp_dir(self.root, i))}
        if gone:
            self.written -= gone
            self.write()
