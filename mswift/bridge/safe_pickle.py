"""What a torch_dist checkpoint's ``.metadata`` pickle may name, and an unpickler that holds it
to that: a checkpoint from elsewhere runs no code when it is read.

PyTorch's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain ``pickle.load``,
so a crafted file can call anything (``os.system``) while a checkpoint is only being opened.
Every reader of ``.metadata`` in mswift (conversions, ``verify --mcore-dir``, training ``load``)
goes through :func:`check_metadata_global` instead. The allowed names are those that PyTorch's
DCP writer and megatron-core's ``dist_checkpointing`` (and mswift's own byte writer) put there:
the dataclasses and enums of ``torch.distributed.checkpoint``, ``torch.Size``, torch dtypes,
``torch.serialization._get_layout``, ``pathlib`` paths (``checkpoint_id``) and plain
containers. None of them does more than build a value when called. Importing this module does
not import torch.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable

from mswift.bridge.errors import BridgeError

_DCP = "torch.distributed.checkpoint"
# torch dtypes as pickled (by their canonical names); a dtype is a value, never called.
TORCH_DTYPES = frozenset(
    "bool uint8 uint16 uint32 uint64 int8 int16 int32 int64 float16 bfloat16 float32 float64 "
    "complex32 complex64 complex128 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz "
    "float8_e8m0fnu float4_e2m1fn_x2 qint8 quint8 qint32 quint4x2 quint2x4".split())
METADATA_GLOBALS = frozenset({
    (f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    (f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
        "LoadItemType")
} | {
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
})


class UnsafeCheckpointError(BridgeError):
    """A checkpoint file names a class or function its format never holds (refused unread)."""

    def __init__(self, path: str | Path, module: str, name: str):
        self.path, self.global_name = str(path), f"{module}.{name}"
        super().__init__(
            f"{path}: names {module}.{name}, which a torch_dist .metadata never holds; it is "
            "not unpickled, as a pickle can run code through such a name (only PyTorch's "
            "checkpoint metadata classes, torch.Size, dtypes and plain containers are read)",
            headline="refused")


def metadata_global_allowed(module: str, name: str) -> bool:
    """Whether a ``.metadata`` pickle may name ``module.name``."""
    if module == "torch" and name in TORCH_DTYPES:
        return True
    return (module, name) in METADATA_GLOBALS


def check_metadata_global(path: str | Path, module: str, name: str) -> None:
    """Raise :class:`UnsafeCheckpointError` unless ``module.name`` may be in ``.metadata``."""
    if not metadata_global_allowed(module, name):
        raise UnsafeCheckpointError(path, module, name)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file into PyTorch's own classes, refusing every other name
    before it is imported (nothing outside :data:`METADATA_GLOBALS` is ever looked up)."""

    def __init__(self, file, path: str | Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        check_metadata_global(self.path, module, name)
        return super().find_class(module, name)


def load_metadata_pickle(path: str | Path, opener: Callable | None = None) -> Any:
    """The object in the ``.metadata`` file at ``path`` (PyTorch's ``Metadata``), read with
    :class:`MetadataUnpickler`. ``opener(path)``: a binary stream (default: ``open``)."""
    stream = opener(path) if opener is not None else open(path, "rb")
    with stream as f:
        data = f.read()
    return MetadataUnpickler(io.BytesIO(data), path).load()
