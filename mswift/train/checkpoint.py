"""Save and load training state in megatron-core's reshardable ``torch_dist`` format.

Layout (Megatron-LM's): ``SAVE/iter_0000010/`` holds one checkpoint, ``SAVE/
latest_checkpointed_iteration.txt`` names the newest complete one. A checkpoint is written to
``iter_XXXXXXX.tmp`` and renamed when every rank has finished, then the tracker is replaced
atomically, so a crash mid-save never leaves a half-written checkpoint where a load looks.
What a save may write over or delete in ``SAVE`` is decided by :mod:`mswift.train.save_dir`.
Model weights, optimizer state and the LR schedule are sharded tensors/objects that
megatron-core reshards on load, so a run saved at one TP/PP/EP layout loads at another.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from mswift.bridge.safe_load import load_common, load_sharded
from mswift.bridge.tracker import (
    TRACKER,
    TrackerError,
    iteration_dir,
    read_tracker,
    write_tracker,
)
from mswift.runtime.device import device_rng_state, set_device_rng_state
from mswift.runtime.mcore_fixes import init_empty_optimizer_state
from mswift.train.builder import TrainState
from mswift.train.save_dir import SaveLedger, complete_checkpoints, temp_dir

# The distributed optimizer's state is saved in a canonical per-parameter form (gathered over
# data-parallel ranks), so it can be loaded at another TP/PP/EP/DP layout.
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says which file and why."""


def _model_sharded_state_dict(state: TrainState) -> dict:
    chunks = [ddp.module for ddp in state.model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _rng_sharded_object() -> ShardedObject:
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = {"cpu": torch.get_rng_state()}
    cuda_rng = device_rng_state()
    if cuda_rng is not None:
        rng["cuda"] = cuda_rng
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    rng["tracker"] = get_cuda_rng_tracker().get_states()
    return ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)


def _full_sharded_state_dict(state: TrainState, is_loading: bool, with_optim: bool) -> dict:
    sd = _model_sharded_state_dict(state)
    if with_optim:
        merged = {}
        for value in sd.values():
            merged.update(value)
        sd["optimizer"] = state.optimizer.sharded_state_dict(
            merged, is_loading=is_loading, metadata=OPTIM_METADATA
        )
        sd["opt_param_scheduler"] = state.scheduler.state_dict()
        sd["rng_state"] = _rng_sharded_object()
    sd["iteration"] = state.iteration
    return sd


def save_checkpoint(state: TrainState, root: str | Path, extra: dict | None = None,
                    weights_only: bool = False, keep_last: int | None = None,
                    ledger: SaveLedger | None = None) -> Path:
    """Write the training state for ``state.iteration`` under ``root``; returns its dir.

    ``weights_only`` writes the model alone (e.g. initial weights, before the optimizer has
    any state), loadable with ``load_optim=False``. ``ledger``: the checkpoints this run saved
    in ``root`` (default: none yet); an ``iter_N`` or ``iter_N.tmp`` it does not list is not
    written over (SaveDirError on every rank). ``keep_last`` then deletes the ledger's older
    checkpoints; this run's crashed saves' temporary folders are removed after each save.
    """
    root = Path(root)
    ledger = ledger if ledger is not None else SaveLedger(root)
    ledger.claim(state.iteration)
    final, tmp = iteration_dir(root, state.iteration), temp_dir(root, state.iteration)
    dist.barrier()  # every rank has checked the folder before rank 0 changes it
    if dist.get_rank() == 0:
        ledger.write()  # listed before its temporary folder exists
        shutil.rmtree(tmp, ignore_errors=True)  # this run's own save that crashed
        tmp.mkdir()
    dist.barrier()
    sd = _full_sharded_state_dict(state, is_loading=False, with_optim=not weights_only)
    sd["extra"] = {**(extra or {}), "world_size": dist.get_world_size()}
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # this run's own (claimed above)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_tracker(root, state.iteration)
        ledger.tidy(keep_last, final)
    dist.barrier()
    return final


def checkpoint_exists(root: str | Path) -> bool:
    """Whether ``root`` holds anything to load: a tracker, checkpoint dirs, or is one.

    A missing or empty directory holds nothing (a first run with ``load`` = ``save``); a
    directory with checkpoints but a missing tracker is an error for :func:`checkpoint_to_load`.
    """
    root = Path(root)
    if not root.is_dir():
        return False
    return ((root / TRACKER).exists() or (root / "metadata.json").is_file()
            or any(p.is_dir() and not p.name.endswith(".tmp") for p in root.glob("iter_*")))


def checkpoint_to_load(root: str | Path) -> Path:
    """The checkpoint dir the tracker names (or ``root`` itself, a checkpoint dir given
    directly); CheckpointError for any inconsistency."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"load={root}: directory not found")
    tracker = root / TRACKER
    try:
        named = read_tracker(root)
    except TrackerError as err:
        raise CheckpointError(str(err)) from None
    if named is None:
        if (root / "metadata.json").is_file():  # a checkpoint dir given directly
            return root
        found = ", ".join(p.name for _, p in complete_checkpoints(root)) or "none complete"
        raise CheckpointError(f"load={root}: no {TRACKER} and not a torch_dist checkpoint "
                              f"(checkpoints there: {found}); pass one iter_* dir as load")
    if not isinstance(named, int):
        raise CheckpointError(f"{tracker}: expected an iteration number, found {named!r}")
    ckpt = iteration_dir(root, named)
    if not (ckpt / "metadata.json").is_file():
        raise CheckpointError(f"{tracker}: names iteration {named}, but {ckpt} is missing "
                              "or incomplete")
    return ckpt


def load_checkpoint(state: TrainState, root: str | Path, load_optim: bool = True,
                    load_rng: bool = True) -> dict:
    """Load ``root`` (a save dir with a tracker, or one checkpoint dir) into ``state``.

    With ``load_optim=False`` only the weights are read (fine-tuning from a checkpoint); the
    iteration then stays 0. Returns the ``extra`` dict saved with it (e.g. data position).
    RNG states are per rank: they are restored only when the world size is the one saved.
    """
    ckpt = checkpoint_to_load(root)
    common = load_common(ckpt)  # torch.load(weights_only=True)
    extra = common.get("extra", {}) if isinstance(common, dict) else {}
    has_optim = isinstance(common, dict) and "opt_param_scheduler" in common
    if load_optim and not has_optim:
        raise CheckpointError(f"{ckpt}: holds weights only (no optimizer state); load it with "
                              "no_load_optim=true")
    if load_optim:
        init_empty_optimizer_state(state.optimizer)
    sd = _full_sharded_state_dict(state, is_loading=True, with_optim=load_optim)
    same_world = extra.get("world_size") == dist.get_world_size()
    if not (load_optim and load_rng and same_world):
        sd.pop("rng_state", None)
    loaded = load_sharded(sd, ckpt, strict=StrictHandling.RAISE_UNEXPECTED)
    chunks = [ddp.module for ddp in state.model]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        chunk.load_state_dict(loaded[key], strict=True)
    if not load_optim:
        return {}
    state.optimizer.load_state_dict(loaded["optimizer"])
    state.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    state.iteration = int(loaded["iteration"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return extra


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    set_device_rng_state(rng.get("cuda"))
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(rng["tracker"])
