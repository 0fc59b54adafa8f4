"""Model-only ``torch_dist`` checkpoints, in the layout :mod:`mswift.train.checkpoint` reads.

``ROOT/iter_0000000/`` (megatron-core ``dist_checkpointing``) + ``ROOT/
latest_checkpointed_iteration.txt``; the model is ``GPTModel.sharded_state_dict()`` under
``model`` (``model0``, ``model1``, ... for virtual pipeline chunks), so training starts from it
with ``load=ROOT no_load_optim=true`` at any layout (megatron-core reshards on load).

Conversions copy bytes without torch (:mod:`mswift.bridge.dist_bytes`), casting float
dtypes on the way. The others (a dtype no cast covers, a chunk not stored plainly) stream:
:func:`save_torch_dist_streaming` takes the checkpoint's structure from a model built on the
``meta`` device (shapes, no memory) at TP1, :class:`TorchDistSource` from the weight map
(:func:`~mswift.bridge.dist_bytes.stored_pieces`), and they move one tensor at a time
between the checkpoint files and the other format, so a conversion holds about one tensor in
memory, whatever the model size. The files are megatron-core's own: its
``dist_checkpointing.save`` writes them, with the tensors' bytes produced on demand while
PyTorch's distributed-checkpoint writer streams them out; reading goes through the same
PyTorch reader, one stored chunk at a time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from mswift.bridge.dist_bytes import StoredPiece, torch_dist_dir
from mswift.bridge.errors import BridgeError
from mswift.bridge.tracker import iteration_dir, write_tracker

WRITER_THREADS = 2


def _model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_torch_dist(chunks, root: str | Path, iteration: int = 0) -> Path:
    """Save the chunks' weights (every rank calls this) under ``root``; returns the iter dir."""
    from megatron.core import dist_checkpointing

    ckpt = _iter_dir(root, iteration)
    state = _model_sharded_state_dict(chunks)
    state.update(iteration=iteration, extra={})
    dist_checkpointing.save(state, str(ckpt))
    _finish(root, iteration)
    return ckpt


def _iter_dir(root: str | Path, iteration: int) -> Path:
    ckpt = iteration_dir(root, iteration)
    if _rank_world()[0] == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    _barrier()
    return ckpt


def _finish(root: str | Path, iteration: int) -> None:
    """The tracker, once every rank has saved; no rank returns before it is written."""
    _barrier()
    if _rank_world()[0] == 0:
        write_tracker(root, iteration)
    _barrier()


def _read_dcp_metadata(ckpt: Path):
    from mswift.bridge.safe_load import read_dcp_metadata

    try:
        return read_dcp_metadata(ckpt)  # no pickle.load of an untrusted file
    except BridgeError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable metadata gets the same message
        raise BridgeError(f"{ckpt}/.metadata: cannot be read as a torch_dist checkpoint "
                          f"({type(err).__name__}: {err})") from None


def load_torch_dist(chunks, root: str | Path) -> None:
    """Load the weights of a torch_dist checkpoint into this rank's chunks (any layout)."""
    from mswift.bridge.safe_load import load_sharded

    ckpt = torch_dist_dir(root)
    state = _model_sharded_state_dict(chunks)
    loaded = load_sharded(state, ckpt)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        chunk.load_state_dict(loaded[key], strict=True)


# -- the checkpoint's structure, from a model on the meta device ---------------------------------


class _ToMeta(TorchFunctionMode):
    """Every tensor a model build creates lives on ``meta``: shapes only, no memory."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = torch.device("meta")
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            args = (args[0], torch.device("meta")) + tuple(args[2:])
        return func(*args, **kwargs)


def meta_chunks(cfg):
    """The model chunks of ``cfg``'s layout (process groups started here) on the meta device."""
    from mswift.bridge.layout import start_groups
    from mswift.models.build import build_model, transformer_config

    start_groups(cfg)
    config = dataclasses.replace(transformer_config(cfg), perform_initialization=False)
    with torch.device("meta"), _ToMeta():
        return build_model(cfg, config)


def _flat_sharded(state: dict):
    """(state-dict key, ShardedTensor | ShardedObject) of a sharded state dict, factories
    applied (a fused gate/up weight becomes its two halves)."""
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    for name, value in state.items():
        if isinstance(value, dict):
            yield from ((f"{name}.{k}", v) for k, v in _flat_sharded(value))
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            for item in built if isinstance(built, list) else [built]:
                assert isinstance(item, ShardedTensor), f"{name}: factory built {type(item)}"
                yield name, item
        elif isinstance(value, (ShardedTensor, ShardedObject)):
            yield name, value


def model_pieces(chunk) -> tuple[dict[str, list[StoredPiece]], list]:
    """Stored pieces of every parameter of one whole-model (TP1, PP1, EP1) chunk, by name, and
    the flat list of megatron ShardedTensors / ShardedObjects the chunk saves."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    pieces: dict[str, list[StoredPiece]] = {}
    flat = []
    for name, item in _flat_sharded(chunk.sharded_state_dict()):
        flat.append(item)
        if not isinstance(item, ShardedTensor):
            continue
        assert item.flattened_range is None, f"{item.key}: flattened tensors are not model weights"
        prepend = item.prepend_axis_num
        local = tuple(item.local_shape)
        region = tuple(zip(item.global_offset[prepend:], local))
        pieces.setdefault(name, []).append(StoredPiece(
            item.key, tuple(item.global_offset), (1,) * prepend + local, region))
    return pieces, flat


# -- writing ---------------------------------------------------------------------------------------


def _lazy_strategy(lookup: dict, produce: Callable[[str], torch.Tensor]):
    """megatron-core's torch_dist save strategy, with each tensor's bytes made on demand."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        recent = threading.local()  # each writer thread's last tensor

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            name, piece = lookup[(write_item.index.fqn, tuple(write_item.index.offset))]
            last = getattr(self.recent, "value", (None, None))
            if last[0] != name:  # the halves of a fused weight come one after the other
                self.recent.value = None
                last = self.recent.value = (name, produce(name))
            # In the stored dtype: megatron keeps some tensors in fp32 in any model (expert_bias).
            data = piece.view_of(last[1]).to(write_item.tensor_data.properties.dtype)
            assert tuple(data.shape) == tuple(write_item.tensor_data.chunk.sizes), (
                f"{name}: made {tuple(data.shape)}, the checkpoint stores "
                f"{tuple(write_item.tensor_data.chunk.sizes)}")
            return data

    class LazySave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt_state = mcore_to_pyt_state_dict(state, False)
            # WRITER_THREADS threads, each making and writing the tensors of its own file
            # (reads, copies and writes let the GIL go). On the 2-core VM two threads measured
            # within noise of one (7.8 vs 8.6 s at 1.2 GB); nodes with more cores can gain.
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                      sync_files=False, thread_count=WRITER_THREADS)
            with _no_crc32():
                dcp_save(pyt_state, storage_writer=writer, planner=LazyPlanner(
                    dedup_replicated_tensors=False, flatten_state_dict=False))

    return LazySave("torch_dist", 1)


@contextlib.contextmanager
def _no_crc32():
    """torch.save without zip CRC-32s (torch.load never checks them; they cost ~2x the time)."""
    from torch.utils.serialization import config

    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = old


def _share_out(flat: list) -> None:
    """Give each rank (data-parallel replicas of the one TP1 model) about the same bytes to
    write: the main replica of each tensor is on one rank, round-robin by size."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rank, world = _rank_world()
    if world == 1:
        return
    tensors = [t for t in flat if isinstance(t, ShardedTensor)]
    loads = [0] * world
    for item in sorted(tensors, key=lambda t: -t.data.numel()):
        owner = loads.index(min(loads))
        loads[owner] += item.data.numel()
        item.replica_id = 0 if owner == rank else 1


def save_torch_dist_streaming(chunks, root: str | Path, produce: Callable[[str], torch.Tensor],
                              iteration: int = 0) -> Path:
    """Write a torch_dist checkpoint of the meta-device, whole-model ``chunks`` (see
    :func:`meta_chunks`), getting each parameter from ``produce(name)`` (the whole TP1 tensor,
    in the model's dtype) when its bytes are written. Every rank calls this; under several
    ranks each writes a share."""
    from megatron.core import dist_checkpointing

    assert len(chunks) == 1, "stream conversions build the whole model as one chunk"
    pieces, flat = model_pieces(chunks[0])
    _share_out(flat)
    lookup = {(p.key, p.offset): (name, p) for name, ps in pieces.items() for p in ps}
    # The items under any names: the files hold their keys, not the state-dict names.
    state = {"model": {f"item{i}": item for i, item in enumerate(flat)},
             "iteration": iteration, "extra": {}}
    ckpt = _iter_dir(root, iteration)
    dist_checkpointing.save(state, str(ckpt), sharded_strategy=_lazy_strategy(lookup, produce))
    _finish(root, iteration)
    return ckpt


# -- reading ---------------------------------------------------------------------------------------


class TorchDistSource:
    """Whole megatron tensors read from a torch_dist checkpoint one at a time with PyTorch's
    reader, by the names of a TP1 model; only the chunks of the tensor asked for are read (a
    checkpoint saved at any layout, with or without optimizer state). ``checked``: the same
    checkpoint as :class:`~mswift.bridge.dist_bytes.DistBytes`, which checked that its chunks
    hold every tensor (for conversions that change dtypes, where bytes cannot be copied)."""

    def __init__(self, checked):
        from mswift.bridge.safe_load import SafeFileSystemReader

        self.wmap = checked.wmap
        self.ckpt = checked.ckpt
        self.pieces = checked.pieces
        self.metadata = _read_dcp_metadata(self.ckpt)
        self.reader = SafeFileSystemReader(self.ckpt)
        self.reader.set_up_storage_reader(self.metadata, True)

    def dtype(self, name: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[self.pieces[name][0].key].properties.dtype

    def full(self, name: str) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import (
            create_read_items_for_chunk_list,
        )

        pieces = self.pieces[name]
        shape = [0] * len(pieces[0].region)
        for piece in pieces:
            for dim, (start, length) in enumerate(piece.region):
                shape[dim] = max(shape[dim], start + length)
        out = torch.empty(shape, dtype=self.dtype(name))
        items, targets = [], {}
        for piece in pieces:
            chunk = ChunkStorageMetadata(offsets=torch.Size(piece.offset),
                                         sizes=torch.Size(piece.shape))
            stored = self.metadata.state_dict_metadata[piece.key]
            for item in create_read_items_for_chunk_list(piece.key, stored, [chunk]):
                target = piece.view_of(out)
                for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
                    target = target.narrow(dim, start, length)
                targets[id(item)] = target
                items.append(item)
        self.reader.read_data(LoadPlan(items), _IntoViews(targets)).wait()
        return out


class _IntoViews:
    """A load planner for one read: each read item lands in its view of the output."""

    def __init__(self, targets: dict):
        self.targets = targets

    def resolve_tensor(self, read_item):
        return self.targets[id(read_item)]

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("model weights are tensors")
