"""Megatron-LM's checkpoint root: ``ROOT/iter_NNNNNNN/`` folders and the tracker,
``ROOT/latest_checkpointed_iteration.txt``, which names the newest complete one.

The one reader and writer of the tracker, for every checkpoint mswift writes or reads: training
saves (:mod:`mswift.train.checkpoint`), conversions to the legacy and torch_dist formats, and
the reading of either. It lives in the bridge so that training (which imports the bridge) and
the bridge share it. The tracker is replaced atomically and synced, so a crash leaves the old
tracker or the new one, never a partial one, and a load never finds a name half-written.
"""
from __future__ import annotations

import os
from pathlib import Path

from mswift.bridge.errors import BridgeError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"  # Megatron-LM's name for a converted checkpoint's folder
ITER_PREFIX = "iter_"


class TrackerError(ValueError):
    """A tracker whose text is neither an iteration number nor ``release``."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``ROOT/iter_NNNNNNN``: the folder of the checkpoint of ``iteration``."""
    return Path(root) / f"{ITER_PREFIX}{iteration:07d}"


def read_tracker(root: str | Path) -> int | str | None:
    """What the tracker of ``root`` names: an iteration number, :data:`RELEASE`, or None where
    there is no tracker. TrackerError (naming the file) for any other text."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if text == RELEASE:
        return RELEASE
    if not text.isdigit():
        raise TrackerError(f"{path}: expected an iteration number or '{RELEASE}', found "
                           f"{text[:40]!r}")
    return int(text)


def read_iteration_dir(root: str | Path) -> tuple[Path, int]:
    """The checkpoint folder the tracker names (``iter_NNNNNNN``, or ``release`` as iteration
    0) and its iteration; BridgeError when there is none."""
    root = Path(root)
    tracker = root / TRACKER
    try:
        named = read_tracker(root)
    except TrackerError as err:
        raise BridgeError(str(err)) from None
    if named is None:
        raise BridgeError(f"{tracker}: not found (expected a Megatron checkpoint directory)")
    if named == RELEASE:
        return root / RELEASE, 0
    iter_dir = iteration_dir(root, named)
    if not iter_dir.is_dir():
        raise BridgeError(f"{tracker}: names iteration {named}, but {iter_dir} is missing")
    return iter_dir, named


def write_tracker(root: str | Path, iteration: int) -> None:
    """Name ``iteration`` as the newest complete checkpoint of ``root``: written to a temporary
    file, synced, renamed over the tracker, and the folder synced (the rename survives a crash
    of the machine, not only of the process)."""
    root = Path(root)
    tmp = root / f"{TRACKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(f"{iteration}\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, root / TRACKER)
    folder = os.open(root, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
