"""megatron-core's torch_dist loading with nothing in the checkpoint able to run code.

megatron-core 0.16.1 loads a torch_dist checkpoint through PyTorch's ``FileSystemReader``, whose
``read_metadata`` unpickles ``.metadata`` with plain ``pickle.load``, and through
``DefaultLoadPlanner.load_bytes``, which unpickles each saved object with
``torch.load(weights_only=False)``. :func:`load_sharded` is ``dist_checkpointing.load`` with
load strategies that read ``.metadata`` with :class:`~mswift.bridge.safe_pickle.MetadataUnpickler`
and every object and ``common.pt`` with ``torch.load(weights_only=True)``; everything else
(planning, resharding, reading the chunks) is megatron-core's and PyTorch's own. The load
strategy's body follows ``TorchDistLoadShardedStrategy.load`` of megatron-core 0.16.1 (the
version pinned in constraints.txt) with the reader and planner swapped.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.common import (
    COMMON_STATE_FNAME,
    TorchCommonLoadStrategy,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from mswift.bridge.errors import BridgeError
from mswift.bridge.safe_pickle import load_metadata_pickle


class SafeFileSystemReader(dcp.FileSystemReader):
    """PyTorch's DCP reader with ``.metadata`` read by the restricted unpickler (once; the
    load asks for it twice)."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            metadata = load_metadata_pickle(path, opener=lambda p: self.fs.create_stream(p, "rb"))
            if not isinstance(metadata, Metadata):
                raise BridgeError(f"{path}: holds a {type(metadata).__name__}, not PyTorch's "
                                  "checkpoint Metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


def read_dcp_metadata(ckpt: str | Path) -> Metadata:
    """PyTorch's ``Metadata`` of the torch_dist checkpoint folder ``ckpt``, read safely."""
    return SafeFileSystemReader(ckpt).read_metadata()


class _WeightsOnlyLoadPlanner(mcore_torch.MCoreLoadPlanner):
    """megatron-core's load planner; saved objects are unpickled with ``weights_only=True``
    (tensors, numbers, strings and plain containers only)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise BridgeError(f"saved object {fqn}: refused, it holds more than tensors and "
                              f"plain values ({str(err).splitlines()[0]})",
                              headline="refused") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """``TorchDistLoadShardedStrategy`` reading through :class:`SafeFileSystemReader` and
    :class:`_WeightsOnlyLoadPlanner`."""

    def load(self, sharded_state_dict, checkpoint_dir: Path):
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        flexible = [t for t in tensors if not t.allow_shape_mismatch]
        mismatch_ok = {t.key: t for t in tensors if t.allow_shape_mismatch}
        original = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = (
            mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict))
        pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, True)
        reader = SafeFileSystemReader(checkpoint_dir)
        dcp.load_state_dict(pyt_state_dict, reader, planner=_WeightsOnlyLoadPlanner(
            shapes_validation_sharded_tensors=flexible,
            allow_shape_mismatch_sharded_tensors=mismatch_ok))
        self.cached_global_metadata = reader.read_metadata()
        loaded = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        loaded = mcore_torch._replace_sharded_keys_with_state_dict_keys(
            loaded, flat_mapping, rename_mapping)
        mcore_torch._restore_dict_types(loaded, original)
        return loaded

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Metadata | None = None):
        if metadata is None:
            metadata = read_dcp_metadata(checkpoint_dir)
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir: Path):
        metadata = read_dcp_metadata(checkpoint_dir)
        objects = {}
        for key, stored in metadata.state_dict_metadata.items():
            if isinstance(stored, BytesStorageMetadata):
                obj = ShardedObject.empty_from_unique_key(key)
                objects[obj.unique_key] = obj
        objects.update(self.load_tensors_metadata(checkpoint_dir, metadata))
        return objects


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` read with ``torch.load(weights_only=True)`` (megatron-core leaves it to
    torch's default, which an environment variable can turn off)."""

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointingException(f"Common file {path} does not exist") from None
        except pickle.UnpicklingError as err:
            raise BridgeError(f"{path}: refused, it holds more than tensors and plain values "
                              f"({str(err).splitlines()[0]})", headline="refused") from None


def load_sharded(sharded_state_dict, checkpoint_dir: str | Path, **kwargs):
    """``dist_checkpointing.load`` through the safe strategies above."""
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir),
                                   sharded_strategy=SafeTorchDistLoadStrategy(),
                                   common_strategy=SafeCommonLoadStrategy(), **kwargs)


def load_common(checkpoint_dir: str | Path):
    """``dist_checkpointing.load_common_state_dict`` with ``weights_only=True``."""
    from megatron.core.dist_checkpointing.validation import verify_checkpoint_and_load_strategy

    _, common = verify_checkpoint_and_load_strategy(str(checkpoint_dir),
                                                    common_strategy=SafeCommonLoadStrategy())
    return common.load_common(str(checkpoint_dir))
