"""torch.save's file format, written and read one tensor at a time.

A torch.save file is a zip archive (records stored, not compressed) of ``<archive>/data.pkl``,
the pickled object in which each tensor is a ``torch._utils._rebuild_tensor_v2`` call on a
persistent id ``("storage", torch.<Dtype>Storage, key, location, numel)``, and one record
``<archive>/data/<key>`` of raw bytes per storage, aligned to 64 bytes so that
``torch.load(mmap=True)`` can map it. torch.save pickles first and copies each storage after;
:func:`save_streaming` does the same, but a :class:`LazyTensor`'s bytes are made only when its
record is written and dropped after, so at most one of them is in memory.

:func:`load_index` unpickles ``data.pkl`` alone (only the classes a Megatron checkpoint holds)
and returns the object with each tensor replaced by a :class:`StoredTensor`, whose ``read()``
copies its bytes from the file straight into a new tensor (no mmap: nothing stays resident).
"""
from __future__ import annotations

import argparse
import collections
import io
import math
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.serialization import _get_storage_alignment

from mswift.bridge.safetensors_file import bytes_of, preadv_all

# dtypes torch.save writes as a typed storage (``torch.BFloat16Storage``, ...) with
# ``_rebuild_tensor_v2``; newer ones (float8, uint16, ...) as ``torch.UntypedStorage`` (numel in
# bytes) with ``_rebuild_tensor_v3``, which also takes the dtype.
_STORAGE_NAMES: dict[torch.dtype, str] = torch.storage._dtype_to_storage_type_map()
_STORAGE_DTYPES = {name: dtype for dtype, name in _STORAGE_NAMES.items()}


class TorchFileError(ValueError):
    """A file torch.load could not read, or that holds more than tensors, dicts and Namespaces."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# -- writing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LazyTensor:
    """A tensor made only when its bytes are written: ``produce()`` is called once and must
    return a tensor of this shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


@dataclass(frozen=True, eq=False)
class _Storage:
    """One ``data/<key>`` record as pickled: ``numel`` elements of ``dtype``."""

    key: str
    dtype: torch.dtype
    numel: int


class _StreamingPickler(pickle.Pickler):
    """torch's pickling of tensors, with each tensor's own bytes as its storage (a view does
    not drag its whole base along); a contiguous tensor that is its whole storage shares that
    record with every other such tensor, as torch.save does. ``records``: (storage, what to
    write there) in file order."""

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.records: list[tuple[_Storage, LazyTensor | torch.Tensor]] = []
        self._whole: dict[tuple[int, torch.dtype], _Storage] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        if obj.dtype in _STORAGE_NAMES:
            return ("storage", getattr(torch, _STORAGE_NAMES[obj.dtype]), obj.key, "cpu",
                    obj.numel)
        return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.numel * obj.dtype.itemsize)

    def reducer_override(self, obj):
        if isinstance(obj, LazyTensor):
            return self._rebuild(self._new_storage(obj.dtype, _numel(obj.shape), obj),
                                 tuple(obj.shape), False)
        if isinstance(obj, torch.nn.Parameter):
            return torch._utils._rebuild_parameter, (obj.detach(), obj.requires_grad,
                                                     collections.OrderedDict())
        if isinstance(obj, torch.Tensor):
            return self._reduce_tensor(obj)
        return NotImplemented

    def _new_storage(self, dtype, numel, source) -> _Storage:
        storage = _Storage(str(len(self.records)), dtype, numel)
        self.records.append((storage, source))
        return storage

    def _reduce_tensor(self, t: torch.Tensor):
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise TypeError(f"save_streaming: cannot write a {t.layout} {t.device.type} tensor "
                            f"of dtype {t.dtype} (only dense tensors)")
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.untyped_storage().nbytes() == t.nbytes)
        if whole:
            key = (t.untyped_storage()._cdata, t.dtype)
            if key not in self._whole:
                self._whole[key] = self._new_storage(t.dtype, t.numel(), t)
            storage = self._whole[key]
        else:
            storage = self._new_storage(t.dtype, t.numel(), t)
        return self._rebuild(storage, tuple(t.shape), t.requires_grad)

    @staticmethod
    def _rebuild(storage: _Storage, shape, requires_grad):
        args = (storage, 0, shape, contiguous_strides(shape), requires_grad,
                collections.OrderedDict())
        if storage.dtype in _STORAGE_NAMES:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, args + (storage.dtype,)


def _write_record(writer, storage: _Storage, source: LazyTensor | torch.Tensor, path) -> None:
    """Write one storage's bytes; a LazyTensor's tensor lives only for this call."""
    if isinstance(source, LazyTensor):
        tensor = source.produce()
        if tuple(tensor.shape) != tuple(source.shape) or tensor.dtype != source.dtype:
            raise ValueError(f"{path}: data/{storage.key} was announced as "
                             f"{list(source.shape)} {source.dtype}, produced "
                             f"{list(tensor.shape)} {tensor.dtype}")
    else:
        tensor = source.detach()
    tensor = tensor.cpu().contiguous()
    name = f"data/{storage.key}"
    if tensor.nbytes == 0:
        writer.write_record(name, b"", 0)
        return
    # A contiguous view's own bytes: a slice of an untyped storage shares its memory.
    start = tensor.storage_offset() * tensor.element_size()
    writer.write_record(name, tensor.untyped_storage()[start:start + tensor.nbytes],
                        tensor.nbytes)


def save_streaming(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj, path)``, materializing each :class:`LazyTensor` in ``obj`` only while
    its bytes are written. Tensors are written contiguous, each with only its own bytes, on
    the CPU; ``torch.load`` (also ``weights_only=True`` and ``mmap=True``) reads the file."""
    path = os.fspath(path)
    pickled = io.BytesIO()
    pickler = _StreamingPickler(pickled)
    pickler.dump(obj)
    records, data = pickler.records, pickled.getvalue()
    del pickler, pickled
    stream = None
    try:
        path.encode("ascii")
        target = path
    except UnicodeEncodeError:  # PyTorchFileWriter opens ASCII paths only
        target = stream = open(path, "wb")  # noqa: SIM115 - closed below
    writer = None
    try:
        # No CRC-32s: torch.load never checks them, and computing them takes longer than
        # writing the bytes (3.4 s of 4.5 s for a 1.2 GB file here).
        writer = torch._C.PyTorchFileWriter(target, False, _get_storage_alignment())
        # The records torch.save writes, in its order; write_end_of_file adds ``version``
        # and ``.data/serialization_id``.
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        alignment = str(_get_storage_alignment())
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for storage, source in records:
            _write_record(writer, storage, source, path)
        writer.write_end_of_file()
    except BaseException:
        del writer  # closes the file
        if stream is not None:
            stream.close()
        if os.path.exists(path):
            os.unlink(path)  # a partial file must not pass for a checkpoint
        raise
    if stream is not None:
        stream.close()


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a torch.save file: ``offset`` is the file offset of its element 0 (the
    storage's record plus the tensor's storage offset), ``stride`` in elements."""

    path: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        """A new contiguous tensor with this tensor's values, read from the file."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        if _is_contiguous(self.shape, self.stride):
            out = torch.empty(self.shape, dtype=self.dtype)
            _read_into(self.path, out, self.offset)
            return out
        # A strided view: read the span of storage it covers, then gather its elements.
        span = torch.empty(_span(self.shape, self.stride), dtype=self.dtype)
        _read_into(self.path, span, self.offset)
        return span.as_strided(self.shape, self.stride).contiguous()


def _is_contiguous(shape, stride) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _span(shape, stride) -> int:
    """Elements from a view's first to its last element (the view is not empty)."""
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride))


def _read_into(path: str, tensor: torch.Tensor, offset: int) -> None:
    """Fill a contiguous tensor from the file's bytes at ``offset``, with no copy in between."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if not preadv_all(fd, [bytes_of(tensor)], offset):
            raise TorchFileError(path, f"truncated: the file ends before the {tensor.nbytes} "
                                       f"bytes at offset {offset}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Record:
    dtype: torch.dtype | None  # None: untyped (bytes; the dtype comes with the tensor)
    offset: int
    nbytes: int


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a Megatron checkpoint: dicts, OrderedDicts, argparse.Namespace,
    dtypes and tensors (as :class:`StoredTensor`); any other class is refused."""

    _CLASSES: ClassVar[dict] = {("collections", "OrderedDict"): collections.OrderedDict,
                                ("argparse", "Namespace"): argparse.Namespace}

    def __init__(self, data: bytes, path: str, reader):
        super().__init__(io.BytesIO(data))
        self.path, self.reader = path, reader
        self._records: dict[str, _Record] = {}

    def find_class(self, module, name):
        if (module, name) in self._CLASSES:
            return self._CLASSES[(module, name)]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _parameter_data
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageKind(None)
        if module == "torch":
            if name in _STORAGE_DTYPES:
                return _StorageKind(_STORAGE_DTYPES[name])
            if isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not read (a Megatron checkpoint holds only tensors, dicts, "
            "argparse.Namespace and dtypes)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageKind)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, kind, key, _, numel = pid
        if key not in self._records:
            name = f"data/{key}"
            if not self.reader.has_record(name):
                raise pickle.UnpicklingError(f"storage record {name} is missing")
            nbytes = numel * (kind.dtype.itemsize if kind.dtype is not None else 1)
            if self.reader.get_record_size(name) < nbytes:
                raise pickle.UnpicklingError(f"storage record {name} holds "
                                             f"{self.reader.get_record_size(name)} bytes, "
                                             f"expected {nbytes}")
            self._records[key] = _Record(kind.dtype, self.reader.get_record_offset(name), nbytes)
        return self._records[key]

    def _rebuild_tensor(self, record, storage_offset, size, stride, requires_grad,
                        backward_hooks, *rest):
        # v2: (..., metadata=None); v3: (..., dtype, metadata=None) on an untyped storage.
        if not isinstance(record, _Record):
            raise pickle.UnpicklingError("a tensor without a storage record")
        dtype = record.dtype if record.dtype is not None else (rest or [None])[0]
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("an untyped storage's tensor without a dtype")
        shape, stride = tuple(size), tuple(stride)
        start = storage_offset * dtype.itemsize
        end = start + (_span(shape, stride) * dtype.itemsize if _numel(shape) else 0)
        if len(shape) != len(stride) or end > record.nbytes:
            raise pickle.UnpicklingError(f"a tensor {list(shape)} reaches past its storage "
                                         f"({end} > {record.nbytes} bytes)")
        return StoredTensor(self.path, record.offset + start, shape, stride, dtype)


@dataclass(frozen=True)
class _StorageKind:
    dtype: torch.dtype | None


def _parameter_data(data, requires_grad, backward_hooks):
    return data


def load_index(path: str | os.PathLike) -> Any:
    """The object of a torch.save file with every tensor as a :class:`StoredTensor`; reads
    ``data.pkl`` and the zip directory only. Raises :class:`TorchFileError` naming the file."""
    path = os.fspath(path)
    try:
        reader = torch._C.PyTorchFileReader(path)
        if reader.has_record("byteorder") and reader.get_record("byteorder") != b"little":
            raise TorchFileError(path, "big-endian torch.save file (not supported)")
        return _IndexUnpickler(reader.get_record("data.pkl"), path, reader).load()
    except TorchFileError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, pickle and record errors alike
        raise TorchFileError(path, f"not a readable torch.save file ({err})") from None
