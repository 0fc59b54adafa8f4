"""torch.save's file format, written and read one tensor at a time.

A torch.save file is a zip archive (records stored, not compressed) of ``<archive>/data.pkl``,
the pickled object in which each tensor is a ``torch._utils._rebuild_tensor_v2`` call on a
persistent id ``("storage", torch.<Dtype>Storage, key, location, numel)``, and one record
``<archive>/data/<key>`` of raw bytes per storage (torch aligns it to 64 bytes; the writers
here put it on a page, or as far into a page as its copy's source starts; torch.load, also
with ``mmap=True``, reads it anywhere; the zip container: :mod:`mswift.bridge.torch_zip`).
torch.save pickles first and copies each storage after; so do the writers here, but each
tensor's bytes are made only when its record is written:

* :func:`save_streaming` pickles torch objects; a :class:`LazyTensor`'s tensor is made when its
  record is written and dropped after, so at most one of them is in memory;
* :func:`write_torch_file` pickles plain objects without importing torch: each
  :class:`TensorRecord`'s ``fill(fd, offset)`` puts its bytes into the file itself (the byte
  copies of :mod:`mswift.bridge.byte_copy`), and :class:`TorchGlobal` names a torch object
  such as ``torch.bfloat16``.

:func:`load_index` unpickles ``data.pkl`` alone, without importing torch or running any
class's code, and returns the object with each tensor replaced by a :class:`StoredTensor`,
whose ``read()`` copies its bytes from the file straight into a new tensor (no mmap: nothing
stays resident); objects of other classes (numpy RNG state, enums, ...) become inert
:class:`Opaque` records.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import io
import math
import os
import pickle
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mswift.bridge import dtypes
from mswift.bridge.safetensors_file import bytes_of, preadv_all
from mswift.bridge.torch_zip import (
    ALIGNMENT,
    DRY_RUN,
    PAGE,
    TorchZipWriter,
    read_record,
    read_zip_directory,
)
from mswift.lazy_import import lazy_module

torch = lazy_module("torch")  # write_torch_file and load_index do not need it

# dtypes torch.save writes as a typed storage (``torch.BFloat16Storage``, ...) with
# ``_rebuild_tensor_v2``; newer ones (float8, uint16, ...) as ``torch.UntypedStorage`` (numel in
# bytes) with ``_rebuild_tensor_v3``, which also takes the dtype (``dtypes.Dtype.storage``).


class TorchFileError(ValueError):
    """A file torch.load could not read (not a zip, a broken pickle, a missing record)."""

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
        storage = dtypes.of_torch(obj.dtype).storage
        if storage:
            return ("storage", getattr(torch, storage), obj.key, "cpu", obj.numel)
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
        if dtypes.of_torch(storage.dtype).storage:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, args + (storage.dtype,)


def _tensor_fill(storage: _Storage, source: LazyTensor | torch.Tensor, path
                 ) -> Callable[[int, int], None]:
    """Writes one storage's bytes; a LazyTensor's tensor lives only while they are written."""

    def fill(fd: int, offset: int) -> None:
        if isinstance(source, LazyTensor):
            tensor = source.produce()
            if tuple(tensor.shape) != tuple(source.shape) or tensor.dtype != source.dtype:
                raise ValueError(f"{path}: data/{storage.key} was announced as "
                                 f"{list(source.shape)} {source.dtype}, produced "
                                 f"{list(tensor.shape)} {tensor.dtype}")
        else:
            tensor = source.detach()
        tensor = tensor.cpu().contiguous()
        view = bytes_of(tensor) if tensor.numel() else memoryview(b"")
        while view.nbytes:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done

    return fill


def save_streaming(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj, path)``, materializing each :class:`LazyTensor` in ``obj`` only while
    its bytes are written. Tensors are written contiguous, each with only its own bytes, on
    the CPU; ``torch.load`` (also ``weights_only=True`` and ``mmap=True``) reads the file."""
    pickled = io.BytesIO()
    pickler = _StreamingPickler(pickled)
    pickler.dump(obj)
    records = [(s.key, s.numel * s.dtype.itemsize, _tensor_fill(s, source, path), 0)
               for s, source in pickler.records]
    del pickler
    _write_archive(path, pickled.getvalue(), records)


def _write_archive(path: str | os.PathLike, data_pkl: bytes,
                   records: list[tuple[str, int, Callable[[int, int], None], int]],
                   threads: int = 1, fd: int | None = None, base: int = 0) -> int:
    """The records torch.save writes, in its order; each storage record ``(key, nbytes,
    fill, phase)`` starts ``phase`` bytes into a page (of the archive) and is filled by
    ``fill(fd, offset)``, one after the other, or with ``threads`` > 1 all records laid out
    first and then filled by that many threads at once. A failure
    removes the file (a partial file must not pass for a checkpoint). ``fd``/``base``: write
    the archive into that open file at that offset instead (see
    :class:`~mswift.bridge.torch_zip.TorchZipWriter`; ``fd=DRY_RUN`` writes and fills
    nothing). Returns the archive's length in bytes."""
    # No CRC-32s for the storages: torch.load never checks them, and computing them takes
    # longer than writing the bytes (3.4 s of 4.5 s for a 1.2 GB file here). Storages start
    # at their phase in a page (of the archive: callers embedding one put it on a page), so
    # that copies whose source starts at that phase move whole pages (torch itself aligns to
    # 64 bytes, and so does every other record here). No ``.format_version`` record: with
    # one, torch.load(map_location="meta") computes each storage's `_checkpoint_offset` as
    # if the records were laid out by torch's own writer, which these are not; without it,
    # torch reads each offset from the zip directory.
    archive = "archive" if fd is not None else Path(path).stem or "archive"
    dry = fd == DRY_RUN
    with TorchZipWriter(path, archive=archive, fd=fd, base=base) as writer:
        writer.add_bytes("data.pkl", data_pkl)
        writer.add_bytes(".storage_alignment", str(ALIGNMENT).encode())
        writer.add_bytes("byteorder", sys.byteorder.encode())
        if threads > 1:
            fills = [(fill, writer.reserve(f"data/{key}", nbytes, PAGE, phase), nbytes)
                     for key, nbytes, fill, phase in records]
            if not dry:
                run_parallel([lambda f=f, o=o: f(writer.fd, o) for f, o, n in fills if n],
                             threads)
        else:
            for key, nbytes, fill, phase in records:
                offset = writer.reserve(f"data/{key}", nbytes, PAGE, phase)
                if nbytes and not dry:
                    fill(writer.fd, offset)
        writer.add_bytes("version", b"3\n")
        writer.add_bytes(".data/serialization_id", str(secrets.randbits(128)).zfill(40).encode())
    return writer.offset


@dataclass(frozen=True)
class TorchGlobal:
    """A torch object named in a pickle without importing torch: ``TorchGlobal("torch",
    "bfloat16")`` is ``torch.bfloat16`` when torch.load reads the file."""

    module: str
    name: str

    def resolve(self) -> Any:
        """The object itself (imports its module)."""
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args):
        # Only so that pickle takes it as a reduce function; it is never called.
        raise TypeError(f"{self.module}.{self.name} is a stand-in: resolve() it first")


@dataclass(frozen=True, eq=False)
class Built:
    """An object of class ``cls`` pickled as the default reduce does (``cls.__new__(cls)``,
    then ``state`` set on it: its ``__dict__``, or what its ``__setstate__`` takes), for
    classes that live in torch (PyTorch's checkpoint metadata dataclasses)."""

    cls: TorchGlobal
    state: Any = None


@dataclass(frozen=True, eq=False)
class Reduced:
    """``func(*args)`` when unpickled (``torch.Size((2, 3))``, ``pathlib.PosixPath(...)``)."""

    func: TorchGlobal
    args: tuple

    def __reduce__(self):
        return self.func, self.args


@dataclass(frozen=True, eq=False)
class TensorRecord:
    """A tensor for :func:`write_torch_file`: ``fill(fd, offset)`` writes its
    ``prod(shape) * kind.itemsize`` bytes (contiguous, row-major) at ``offset`` of ``fd``, an
    offset ``phase`` bytes into a page of the archive (see :func:`byte_copy.page_phase`)."""

    shape: tuple[int, ...]
    kind: dtypes.Dtype
    fill: Callable[[int, int], None]
    phase: int = 0


class _RecordPickler(pickle._Pickler):
    """Pickles plain objects, :class:`TensorRecord` (as torch.save pickles a contiguous tensor
    that is its whole storage), :class:`TorchGlobal`, :class:`Built` and :class:`Reduced`,
    without torch. The pure-Python pickler, because the C one imports a global's module to
    check it."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.records: list[TensorRecord] = []
        self._globals: dict[tuple[str, str], TorchGlobal] = {}

    def save_torch_global(self, obj: TorchGlobal) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[TorchGlobal] = save_torch_global

    def save_built(self, obj: Built) -> None:
        self.save(obj.cls)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    dispatch[Built] = save_built

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        kind = obj.dtype
        if kind.storage:
            return ("storage", self._global("torch", kind.storage), obj.key, "cpu", obj.numel)
        return ("storage", self._global("torch.storage", "UntypedStorage"), obj.key, "cpu",
                obj.numel * kind.itemsize)

    def reducer_override(self, obj):
        if not isinstance(obj, TensorRecord):
            return NotImplemented
        storage = _Storage(str(len(self.records)), obj.kind, _numel(obj.shape))
        self.records.append(obj)
        shape = tuple(obj.shape)
        args = (storage, 0, shape, contiguous_strides(shape), False, collections.OrderedDict())
        if obj.kind.storage:
            return self._global("torch._utils", "_rebuild_tensor_v2"), args
        return (self._global("torch._utils", "_rebuild_tensor_v3"),
                args + (self._global("torch", obj.kind.name),))

    def _global(self, module: str, name: str) -> TorchGlobal:
        """One object per global, so the pickle names it once (memo) however often used."""
        return self._globals.setdefault((module, name), TorchGlobal(module, name))


def pickle_plain(obj: Any) -> bytes:
    """``pickle.dumps(obj)`` for objects made of :class:`TorchGlobal`, :class:`Built`,
    :class:`Reduced` and plain values (no tensors), without importing torch."""
    pickled = io.BytesIO()
    pickler = _RecordPickler(pickled)
    pickler.dump(obj)
    assert not pickler.records, "pickle_plain takes no tensors (write_torch_file does)"
    return pickled.getvalue()


def run_parallel(tasks: list[Callable[[], None]], threads: int) -> None:
    """Run ``tasks`` on ``threads`` threads; the first exception is raised once all stopped."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()


def write_torch_file(path: str | os.PathLike, obj: Any, threads: int = 1,
                     fd: int | None = None, base: int = 0) -> int:
    """A torch.save file of ``obj`` (dicts, lists, numbers, strings, argparse.Namespace,
    :class:`TorchGlobal`, :class:`TensorRecord`) without importing torch: torch.load reads
    each TensorRecord as a tensor, whose bytes its ``fill`` wrote (``threads`` fills at once:
    each must write only its own record). ``fd``/``base``: see :func:`_write_archive`.
    Returns the file's (archive's) length."""
    pickled = io.BytesIO()
    pickler = _RecordPickler(pickled)
    pickler.dump(obj)
    records = [(str(i), _numel(r.shape) * r.kind.itemsize, r.fill, r.phase)
               for i, r in enumerate(pickler.records)]
    return _write_archive(path, pickled.getvalue(), records, threads, fd, base)


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a torch.save file: ``offset`` is the file offset of its element 0 (the
    storage's record plus the tensor's storage offset), ``stride`` in elements."""

    path: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    kind: dtypes.Dtype

    @property
    def dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.kind)

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.kind.itemsize

    @property
    def contiguous(self) -> bool:
        """Its bytes are one run of the file, row-major."""
        return _is_contiguous(self.shape, self.stride)

    def read(self) -> torch.Tensor:
        """A new contiguous tensor with this tensor's values, read from the file."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        if self.contiguous:
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
    kind: dtypes.Dtype | None  # None: untyped (bytes; the dtype comes with the tensor)
    offset: int
    nbytes: int


@dataclass(frozen=True)
class _StorageKind:
    kind: dtypes.Dtype | None


class Opaque:
    """What :func:`load_index` makes of an object of any other class (a Megatron-LM
    checkpoint's numpy RNG state, enums in its ``args``, optimizer classes): the class's name
    and the arguments and state it was pickled with, inert. Nothing of the class is imported or
    run, so an untrusted file cannot execute code when its index is read."""

    module: ClassVar[str] = ""
    qualname: ClassVar[str] = ""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Opaque({self.module}.{self.qualname})"


def _opaque_class(module: str, name: str) -> type:
    return type(f"Opaque_{name}", (Opaque,), {"module": module, "qualname": name})


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a Megatron checkpoint: dicts, OrderedDicts, argparse.Namespace,
    dtypes (as :class:`TorchGlobal`) and tensors (as :class:`StoredTensor`); an object of any
    other class becomes an inert :class:`Opaque`. ``records``: the zip's record name -> (data
    offset, size)."""

    _CLASSES: ClassVar[dict] = {("collections", "OrderedDict"): collections.OrderedDict,
                                ("argparse", "Namespace"): argparse.Namespace}

    def __init__(self, data: bytes, path: str, records: dict[str, tuple[int, int]],
                 check_global: Callable[[str, str, str], None] | None = None):
        super().__init__(io.BytesIO(data))
        self.path, self.zip_records = path, records
        self.check_global = check_global
        self._records: dict[str, _Record] = {}
        self._opaque: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        if self.check_global is not None:
            self.check_global(self.path, module, name)
        if (module, name) in self._CLASSES:
            return self._CLASSES[(module, name)]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _parameter_data
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageKind(None)
        if module == "torch":
            if name in dtypes.BY_STORAGE:
                return _StorageKind(dtypes.BY_STORAGE[name])
            if name in dtypes.BY_NAME:
                return TorchGlobal("torch", name)
        key = (module, name)
        if key not in self._opaque:
            self._opaque[key] = _opaque_class(module, name)
        return self._opaque[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageKind)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, storage, key, _, numel = pid
        if key not in self._records:
            name = f"data/{key}"
            if name not in self.zip_records:
                raise pickle.UnpicklingError(f"storage record {name} is missing")
            offset, size = self.zip_records[name]
            nbytes = numel * (storage.kind.itemsize if storage.kind is not None else 1)
            if size < nbytes:
                raise pickle.UnpicklingError(f"storage record {name} holds {size} bytes, "
                                             f"expected {nbytes}")
            self._records[key] = _Record(storage.kind, offset, nbytes)
        return self._records[key]

    def _rebuild_tensor(self, record, storage_offset, size, stride, requires_grad,
                        backward_hooks, *rest):
        # v2: (..., metadata=None); v3: (..., dtype, metadata=None) on an untyped storage.
        if not isinstance(record, _Record):
            raise pickle.UnpicklingError("a tensor without a storage record")
        kind = record.kind
        if kind is None:
            dtype = (rest or [None])[0]
            if not isinstance(dtype, TorchGlobal):
                raise pickle.UnpicklingError("an untyped storage's tensor without a dtype")
            kind = dtypes.BY_NAME[dtype.name]
        shape, stride = tuple(size), tuple(stride)
        start = storage_offset * kind.itemsize
        end = start + (_span(shape, stride) * kind.itemsize if _numel(shape) else 0)
        if len(shape) != len(stride) or end > record.nbytes:
            raise pickle.UnpicklingError(f"a tensor {list(shape)} reaches past its storage "
                                         f"({end} > {record.nbytes} bytes)")
        return StoredTensor(self.path, record.offset + start, shape, stride, kind)


def _parameter_data(data, requires_grad, backward_hooks):
    return data


def unpickle_inert(data: bytes, path: str,
                   check_global: Callable[[str, str, str], None] | None = None) -> Any:
    """Unpickle ``data`` (read from ``path``, for messages) as :func:`load_index` does
    ``data.pkl``, for a pickle without tensors (PyTorch's checkpoint ``.metadata``): torch
    dtypes become :class:`TorchGlobal`, objects of other classes inert :class:`Opaque`.
    ``check_global(path, module, name)`` may refuse a name (it raises) before it is used."""
    return _IndexUnpickler(data, path, {}, check_global).load()


def load_index(path: str | os.PathLike, start: int = 0, length: int | None = None) -> Any:
    """The object of a torch.save file with every tensor as a :class:`StoredTensor`; reads
    ``data.pkl`` and the zip directory only. ``start``/``length``: the file's bytes that hold
    the archive (one embedded in a larger file); by default the whole file. Raises
    :class:`TorchFileError` naming the file."""
    path = os.fspath(path)
    try:
        records = read_zip_directory(path, start, length)
        if "byteorder" in records and read_record(path, "byteorder", records) != b"little":
            raise TorchFileError(path, "big-endian torch.save file (not supported)")
        return _IndexUnpickler(read_record(path, "data.pkl", records), path, records).load()
    except TorchFileError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, pickle and record errors alike
        raise TorchFileError(path, f"not a readable torch.save file ({err})") from None

