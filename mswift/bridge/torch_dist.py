"""Model-only ``torch_dist`` checkpoints, in the layout :mod:`mswift.train.checkpoint` reads.

``ROOT/iter_0000000/`` (megatron-core ``dist_checkpointing``) + ``ROOT/
latest_checkpointed_iteration.txt``; the model is ``GPTModel.sharded_state_dict()`` under
``model`` (``model0``, ``model1``, ... for virtual pipeline chunks), so training starts from it
with ``load=ROOT no_load_optim=true`` at any layout (megatron-core reshards on load).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mswift.bridge.errors import BridgeError
from mswift.bridge.legacy import TRACKER, read_iteration_dir

EMBEDDING_KEY = "embedding.word_embeddings.weight"


def _model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_torch_dist(chunks, root: str | Path, iteration: int = 0) -> Path:
    """Save the chunks' weights (every rank calls this) under ``root``; returns the iter dir."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    ckpt = root / f"iter_{iteration:07d}"
    if not dist.is_initialized() or dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = _model_sharded_state_dict(chunks)
    state.update(iteration=iteration, extra={})
    dist_checkpointing.save(state, str(ckpt))
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        (root / TRACKER).write_text(f"{iteration}\n")
    return ckpt


def torch_dist_dir(root: str | Path) -> Path:
    """The checkpoint dir of a torch_dist root (tracker) or the dir itself."""
    root = Path(root)
    if (root / "metadata.json").is_file():
        return root
    ckpt, _ = read_iteration_dir(root)
    if not (ckpt / "metadata.json").is_file():
        raise BridgeError(f"{ckpt}: not a torch_dist checkpoint (no metadata.json)")
    return ckpt


def is_torch_dist(root: str | Path) -> bool:
    try:
        torch_dist_dir(root)
    except BridgeError:
        return False
    return True


def stored_embedding(root: str | Path) -> tuple[int, torch.dtype]:
    """Rows (the vocabulary as padded when saved) and dtype of the stored embedding."""
    from megatron.core import dist_checkpointing

    ckpt = torch_dist_dir(root)
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    if EMBEDDING_KEY not in meta:
        raise BridgeError(f"{ckpt}: holds no {EMBEDDING_KEY} (not a GPT model checkpoint?)")
    return int(meta[EMBEDDING_KEY].global_shape[0]), meta[EMBEDDING_KEY].dtype


def load_torch_dist(chunks, root: str | Path) -> None:
    """Load the weights of a torch_dist checkpoint into this rank's chunks (any layout)."""
    from megatron.core import dist_checkpointing

    ckpt = torch_dist_dir(root)
    state = _model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(state, str(ckpt))
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        chunk.load_state_dict(loaded[key], strict=True)
