"""The safetensors format, read and written without memory maps.

A file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__":
{...}}``, padded with spaces), then the tensors' bytes; offsets count from the byte after the
header. :class:`SafetensorsFile` parses and checks the header itself and reads a tensor with
``os.preadv`` straight into a new tensor's memory: each byte is copied once from the page cache
and nothing stays mapped, so a reader's memory is what it keeps, not what it has read
(``safe_open`` maps the file, and every page touched counts in the process's RSS until the
handle closes). :func:`encode_header` builds the header a writer puts before the bytes.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple, Self

from mswift.bridge import dtypes
from mswift.bridge.errors import BridgeError
from mswift.lazy_import import lazy_module

torch = lazy_module("torch")  # headers are read without it (see mswift.bridge.dtypes)

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a larger length is a corrupt file
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class TensorInfo(NamedTuple):
    kind: dtypes.Dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the tensor's bytes
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.kind)


def tensor_bytes(dtype, shape) -> int:
    """Bytes of a tensor of ``shape``; ``dtype`` a torch dtype or a ``dtypes.Dtype``."""
    return math.prod(shape) * dtype.itemsize


def encode_header(tensors: list[tuple[str, object, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None, align: int = 8,
                  phase: int = 0) -> bytes:
    """Length + JSON header for ``(name, dtype, shape)`` stored back to back in this order, the
    JSON padded with spaces (the format allows trailing whitespace) so that the data starts at
    ``phase`` + a multiple of ``align`` bytes (8, as safetensors writes it; a page for files
    whose tensors are copied in, with ``phase`` where their sources start in a page, so that
    the pages line up); ``dtype`` a torch dtype or a ``dtypes.Dtype``."""
    if phase % 8 or not 0 <= phase < align:
        raise ValueError(f"data start {phase} bytes into {align}: not a multiple of 8 below it")
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        try:
            kind = dtypes.as_kind(dtype)
        except KeyError:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name") from None
        size = tensor_bytes(kind, shape)
        header[name] = {"dtype": kind.safetensors, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((phase - 8 - len(text)) % align)
    return len(text).to_bytes(8, "little") + text


class SafetensorsFile:
    """One safetensors file, checked when opened, its tensors read on demand with ``preadv``.

    Holds one file descriptor, closed by :meth:`close` (or when garbage-collected). Raises
    :class:`BridgeError` naming the file for anything safetensors would refuse: a file shorter
    than its header, a header that is not a JSON object, an unknown dtype, offsets that do not
    match a shape, overlap, leave gaps, or run past the end of the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise BridgeError(f"{self.path}: cannot open ({err.strerror})") from None
        try:
            self.tensors, self.metadata = self._read_header()
        except BaseException:
            self.close()
            raise

    # -- header --------------------------------------------------------------------------------

    def _corrupt(self, reason: str) -> BridgeError:
        return BridgeError(f"{self.path}: not a readable safetensors file ({reason}); "
                           "truncated or corrupt?")

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._corrupt(f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(self._pread(8, 0), "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise self._corrupt(f"header of {length} bytes, but the file has {size}")
        try:
            header = json.loads(self._pread(length, 8).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._corrupt(f"header is not JSON: {err}") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._corrupt("__metadata__ is not a JSON object")
        start = 8 + length
        tensors = {name: self._tensor_info(name, entry, start) for name, entry in header.items()}
        self._check_layout(tensors, start, size)
        return tensors, metadata

    def _tensor_info(self, name: str, entry, start: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._corrupt(f"{name}: entry is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in dtypes.BY_SAFETENSORS:
            raise self._corrupt(f"{name}: unknown dtype {dtype!r} "
                                f"(known: {', '.join(dtypes.BY_SAFETENSORS)})")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise self._corrupt(f"{name}: shape {shape!r} is not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)):
            raise self._corrupt(f"{name}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        kind = dtypes.BY_SAFETENSORS[dtype]
        need = tensor_bytes(kind, shape)
        if end - begin != need:
            raise self._corrupt(f"{name}: data_offsets {offsets} hold {end - begin} bytes, "
                                f"shape {shape} of {dtype} needs {need}")
        return TensorInfo(kind, tuple(shape), start + begin, start + end)

    def _check_layout(self, tensors: dict[str, TensorInfo], start: int, size: int) -> None:
        # Like safetensors: the tensors tile the data region exactly, in offset order.
        expected = start
        for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
            if info.begin != expected:
                what = "overlaps the tensor before it" if info.begin < expected else (
                    "leaves a gap after the tensor before it")
                raise self._corrupt(f"{name}: data_offsets begin at {info.begin - start}, "
                                    f"{what} (which ends at {expected - start})")
            expected = info.end
        if expected != size:
            what = "the file ends early" if expected > size else "trailing bytes"
            raise self._corrupt(f"tensors need {expected} bytes, the file has {size}: {what}")

    # -- reading -------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0
             ) -> torch.Tensor:
        """Tensor ``name``, or its rows (dim 0) / columns (dim 1) ``start:stop``. Rows read
        only their bytes; columns read each row's span and drop the rest while reading."""
        info = self.tensors[name]
        if dim is None:
            return self._read_rows(info, 0, info.shape[0] if info.shape else 1)
        if dim not in (0, 1) or len(info.shape) <= dim:
            raise ValueError(f"{name}: dim={dim} of shape {list(info.shape)}: only dims 0 and 1 "
                             "are sliced")
        if not 0 <= start <= stop <= info.shape[dim]:
            raise ValueError(f"{name}: slice {start}:{stop} of dim {dim} outside shape "
                             f"{list(info.shape)}")
        if dim == 0:
            return self._read_rows(info, start, stop)
        return self._read_columns(info, start, stop)

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start,) + info.shape[1:] if info.shape else (),
                          dtype=info.dtype)
        row = tensor_bytes(info.kind, info.shape[1:])
        self._preadv([bytes_of(out)], info.begin + start * row)
        return out

    def read_rows_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Rows ``start:start + len(out)`` of ``name`` straight into ``out`` (contiguous, same
        dtype and row shape): fused tensors are assembled without a second copy."""
        info = self.tensors[name]
        if (not out.is_contiguous() or out.dtype != info.dtype or not info.shape
                or tuple(out.shape[1:]) != info.shape[1:]
                or not 0 <= start <= start + out.shape[0] <= info.shape[0]):
            raise ValueError(f"{name}: rows {start}:{start + len(out)} of {list(info.shape)} "
                             f"{info.dtype} do not fit a buffer {list(out.shape)} {out.dtype}")
        row = tensor_bytes(info.kind, info.shape[1:])
        self._preadv([bytes_of(out)], info.begin + start * row)

    def _read_columns(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        rows, cols, rest = info.shape[0], info.shape[1], info.shape[2:]
        out = torch.empty((rows, stop - start) + rest, dtype=info.dtype)
        col = tensor_bytes(info.kind, rest)
        keep, row = (stop - start) * col, cols * col
        if not rows or not keep:
            return out
        # One scattered read of the file range from row 0's first kept byte to the last row's
        # last one: kept spans land in `out`, the columns between them in a reused scratch.
        out_bytes = bytes_of(out)
        gap = memoryview(bytearray(row - keep))
        buffers = []
        for r in range(rows):
            buffers.append(out_bytes[r * keep:(r + 1) * keep])
            if gap.nbytes and r + 1 < rows:
                buffers.append(gap)
        self._preadv(buffers, info.begin + start * col)
        return out

    def _pread(self, size: int, offset: int) -> bytes:
        out = bytearray(size)
        self._preadv([memoryview(out)], offset)
        return bytes(out)

    def _preadv(self, buffers: list[memoryview], offset: int) -> None:
        if not preadv_all(self._fd, buffers, offset):
            raise self._corrupt(f"end of file while reading at byte {offset}")

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def preadv_all(fd: int, buffers: list[memoryview], offset: int) -> bool:
    """Fill ``buffers`` in order from ``fd`` at ``offset`` (no seek, no copy in between),
    resuming partial reads; False if the file ends first."""
    buffers = [b for b in buffers if b.nbytes]
    i = 0
    while i < len(buffers):
        done = os.preadv(fd, buffers[i:i + _IOV_MAX], offset)
        if done == 0:
            return False
        offset += done
        while done and done >= buffers[i].nbytes:
            done -= buffers[i].nbytes
            i += 1
        if done:
            buffers[i] = buffers[i][done:]
    return True


def bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's memory (any dtype, bf16 included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def __getattr__(name: str):
    if name == "DTYPES":  # safetensors dtype name -> torch dtype (imports torch)
        return {d.safetensors: dtypes.torch_dtype(d) for d in dtypes.BY_NAME.values()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
