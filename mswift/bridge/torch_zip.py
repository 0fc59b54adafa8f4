"""The zip container of torch.save's format, written and read without importing torch.

A torch.save file is a zip archive whose records are all STORED (not compressed), named
``<archive>/<record>`` under one top-level folder (torch uses the file's stem; torch.load takes
any single folder), in the order ``data.pkl``, ``.format_version``, ``.storage_alignment``,
``byteorder``, ``data/0``, ``data/1``, ..., ``version``, ``.data/serialization_id`` (mswift's
writers leave ``.format_version`` out: see :func:`mswift.bridge.torch_file._write_archive`). Each
record's bytes start at a file offset that is a multiple of :data:`ALIGNMENT`, or wherever
:meth:`TorchZipWriter.reserve` is asked to put them: like torch (miniz), the local header ends
with an extra field of id ``b"FB"`` whose payload is that many ``b"Z"`` bytes of padding.

:class:`TorchZipWriter` writes such a file record by record with ``os.pwrite`` on a raw fd.
:meth:`TorchZipWriter.reserve` writes a record's local header only and returns the offset at
which the caller puts its bytes itself (``os.pwrite``, ``os.copy_file_range``), so multi-GB
tensors never pass through Python. Unlike torch, no data descriptors follow the records: sizes
are in the local headers.

CRC-32: records given as bytes get their ``zlib.crc32``; reserved records, whose bytes the
writer never sees, get CRC 0. torch.load does not check CRCs, nor does :func:`read_record`;
Python's ``zipfile`` lists such records but raises "Bad CRC-32" on reading one.

Zip64: a record whose size or local-header offset is ``>= zip64_threshold`` (default
0xFFFFFFFF, the largest a 32-bit field holds) gets zip64 extra fields (local: both sizes;
central: those fields that do not fit) and 0xFFFFFFFF in the 32-bit field. The zip64
end-of-central-directory record and locator are always written, as torch does.
``zip64_threshold=0`` forces zip64 everywhere, which is how the tests cover it without 4 GiB.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from typing import Self

ALIGNMENT = 64
ZIP64_LIMIT = 0xFFFF_FFFF
DRY_RUN = -2  # TorchZipWriter(fd=DRY_RUN): lay the archive out, write nothing
PAGE = 4096  # copy_file_range moves whole pages when source and destination offsets agree

_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # PK\3\4 ... name length, extra length
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_END = struct.Struct("<4sHHHHIIH")
_VERSION_ZIP64, _VERSION_PLAIN = 45, 20  # "version needed to extract": 4.5 has zip64
_FLAG_UTF8 = 0x0800  # names are UTF-8, as torch marks them
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, time 0: output does not depend on the clock
_ZIP64_EXTRA_ID, _PADDING_EXTRA_ID = 0x0001, 0x4246  # 0x4246 is b"FB" little-endian


class TorchZipWriter:
    """Writes a torch.save zip archive record by record; a with-statement or close()/abort().

    ``self.fd`` is the raw fd (opened with O_CREAT|O_TRUNC). Every write is an ``os.pwrite`` at
    an offset tracked here, so the fd's position does not matter. Before each record and at
    close the writer checks the caller wrote nothing past a reserved range; a range left
    unwritten is a hole that reads as zeros (close sets the file's length).
    """

    def __init__(self, path: str | os.PathLike, archive: str = "archive", *,
                 zip64_threshold: int = ZIP64_LIMIT, fd: int | None = None, base: int = 0):
        if not archive or "/" in archive:
            raise ValueError(f"archive folder name must be one non-empty path part: {archive!r}")
        self.path = os.fspath(path)
        self.archive = archive
        self.zip64_threshold = zip64_threshold
        # Embedded (``fd`` given): the archive is written into that open file at byte ``base``
        # (its offsets count from there), the file is neither truncated nor closed, and other
        # writers may fill other ranges of it. ``fd=-2``: nothing is written at all (a dry run
        # that only lays the archive out: ``self.offset`` after close() is its length).
        self._owned = fd is None
        self.base = 0 if self._owned else base
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) \
            if fd is None else fd
        self.offset = 0  # where the next local header (or the central directory) goes
        self._records: list[tuple[bytes, int, int, int]] = []  # name, header offset, size, crc
        self._names: set[bytes] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise

    def add_bytes(self, name: str, data: bytes) -> None:
        """Writes record ``<archive>/<name>`` holding ``data`` (with its CRC-32)."""
        data_offset = self._start_record(name, len(data), zlib.crc32(data))
        self._pwrite(data, data_offset)

    def reserve(self, name: str, nbytes: int, alignment: int = ALIGNMENT, phase: int = 0) -> int:
        """Writes record ``<archive>/<name>``'s header (CRC 0) and returns the file offset
        where the caller must put exactly ``nbytes`` bytes on ``self.fd``: ``base`` + a
        multiple of ``alignment`` (itself a multiple of ALIGNMENT) + ``phase``. For bytes
        copied from file to file: ``alignment`` PAGE and ``phase`` the source's offset in its
        page, so that source and destination pages line up (torch.load reads a record at any
        offset)."""
        if nbytes < 0:
            raise ValueError(f"{self.path}: negative size {nbytes} for record {name!r}")
        if alignment % ALIGNMENT:
            raise ValueError(f"alignment {alignment}: not a multiple of {ALIGNMENT}")
        if not 0 <= phase < alignment:
            raise ValueError(f"phase {phase}: not in [0, {alignment})")
        return self.base + self._start_record(name, nbytes, 0, alignment, phase)

    def close(self) -> None:
        """Writes the central directory and end records, sets the file's length, closes."""
        self._check_open()
        cd_offset = self.offset
        self._check_caller_writes()
        central = b"".join(self._central_entry(*record) for record in self._records)
        cd_size, count = len(central), len(self._records)
        zip64_end_offset = cd_offset + cd_size
        end = (_ZIP64_END.pack(b"PK\x06\x06", _ZIP64_END.size - 12, _VERSION_ZIP64,
                               _VERSION_ZIP64, 0, 0, count, count, cd_size, cd_offset)
               + _ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, zip64_end_offset, 1)
               + _END.pack(b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                           self._fit32(cd_size), self._fit32(cd_offset), 0))
        self._pwrite(central + end, cd_offset)
        self.offset = cd_offset + len(central) + len(end)  # the archive's length
        if self._owned:
            os.ftruncate(self.fd, self.offset)
            os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        """Closes the fd (if open) and removes the file (embedded: only stops; the caller
        owns the file)."""
        if not self._owned:
            self.fd = -1
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _start_record(self, name: str, size: int, crc: int, alignment: int = ALIGNMENT,
                      phase: int = 0) -> int:
        self._check_open()
        self._check_caller_writes()
        full_name = f"{self.archive}/{name}".encode()
        if not name or name.startswith("/") or full_name in self._names:
            raise ValueError(f"{self.path}: bad or repeated record name {name!r}")
        header_offset = self.offset
        zip64 = size >= self.zip64_threshold or header_offset >= self.zip64_threshold
        extra = _extra(_ZIP64_EXTRA_ID, struct.pack("<QQ", size, size)) if zip64 else b""
        unpadded = header_offset + _LOCAL.size + len(full_name) + len(extra) + 4
        extra += _extra(_PADDING_EXTRA_ID, b"Z" * ((phase - unpadded) % alignment))
        size32 = ZIP64_LIMIT if zip64 else size
        header = _LOCAL.pack(b"PK\x03\x04", _VERSION_ZIP64 if zip64 else _VERSION_PLAIN,
                             _FLAG_UTF8, zipfile.ZIP_STORED, 0, _DOS_DATE, crc, size32, size32,
                             len(full_name), len(extra))
        self._pwrite(header + full_name + extra, header_offset)
        data_offset = header_offset + len(header) + len(full_name) + len(extra)
        assert data_offset % alignment == phase
        self._names.add(full_name)
        self._records.append((full_name, header_offset, size, crc))
        self.offset = data_offset + size
        return data_offset

    def _central_entry(self, full_name: bytes, header_offset: int, size: int, crc: int) -> bytes:
        # zip64 extra: only the fields whose 32-bit slot holds 0xFFFFFFFF, in this order.
        size32, offset32 = self._fit32(size), self._fit32(header_offset)
        wide = [value for value, slot in ((size, size32), (size, size32),
                                          (header_offset, offset32)) if slot == ZIP64_LIMIT]
        extra = _extra(_ZIP64_EXTRA_ID, struct.pack(f"<{len(wide)}Q", *wide)) if wide else b""
        version = _VERSION_ZIP64 if wide else _VERSION_PLAIN
        return _CENTRAL.pack(b"PK\x01\x02", _VERSION_ZIP64, version, _FLAG_UTF8,
                             zipfile.ZIP_STORED, 0, _DOS_DATE, crc, size32, size32,
                             len(full_name), len(extra), 0, 0, 0, 0, offset32) + full_name + extra

    def _fit32(self, value: int) -> int:
        return ZIP64_LIMIT if value >= min(self.zip64_threshold, ZIP64_LIMIT) else value

    def _check_open(self) -> None:
        if self.fd == -1:
            raise ValueError(f"{self.path}: writer is closed")

    def _check_caller_writes(self) -> None:
        if not self._owned:  # other writers fill the rest of the file
            return
        length = os.fstat(self.fd).st_size
        if length > self.offset:
            raise ValueError(f"{self.path}: file is {length} bytes, past the end of the last "
                             f"record ({self.offset}): bytes written outside a reserved range")

    def _pwrite(self, data: bytes, offset: int) -> None:
        if self.fd == DRY_RUN:
            return
        view, offset = memoryview(data), offset + self.base
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written


def _extra(field_id: int, payload: bytes) -> bytes:
    return struct.pack("<HH", field_id, len(payload)) + payload


class _FileRange(io.RawIOBase):
    """Bytes ``start:start + length`` of an open file, as a seekable file of their own (for
    ``zipfile``, to read an archive embedded in a larger file)."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        want = max(0, min(len(buffer), self.length - self.pos))
        data = os.pread(self.fd, want, self.start + self.pos)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def read_zip_directory(path: str | os.PathLike, start: int = 0, length: int | None = None
                       ) -> dict[str, tuple[int, int]]:
    """Record name without its archive folder -> (absolute offset of its bytes, size).

    ``start``/``length``: the archive is those bytes of the file (an archive embedded in a
    larger file, as PyTorch's distributed checkpoint stores each tensor); by default the
    whole file. Reads the central directory (zip64 aware, with ``zipfile``) and each record's
    local header, whose extra field may differ in length from the central one. Raises
    ValueError naming the file for a file that is not a zip, is truncated, holds compressed
    records or records outside one top-level folder.
    """
    path = os.fspath(path)
    where = path if start == 0 and length is None else f"{path} (bytes {start}+{length})"
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        if length is None:
            length = file_size - start
        if start + length > file_size:
            raise ValueError(f"{where}: truncated: the file is {file_size} bytes")
        view = _FileRange(file.fileno(), start, length)
        try:
            with zipfile.ZipFile(view) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, EOFError, struct.error) as exc:
            what = ("truncated or corrupt zip archive"
                    if os.pread(file.fileno(), 4, start) == b"PK\x03\x04"
                    else "not a zip archive")
            raise ValueError(f"{where}: {what} ({exc})") from exc
        records: dict[str, tuple[int, int]] = {}
        folders = set()
        for info in infos:
            folder, slash, name = info.filename.partition("/")
            if not slash:
                raise ValueError(f"{where}: record {info.filename!r} is not in a folder")
            folders.add(folder)
            if not name or name.endswith("/"):  # a directory entry
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{where}: record {info.filename!r} is compressed "
                                 f"(method {info.compress_type}); torch.save stores records")
            header = os.pread(file.fileno(), _LOCAL.size, start + info.header_offset)
            if len(header) < _LOCAL.size or header[:4] != b"PK\x03\x04":
                raise ValueError(f"{where}: no local header for {info.filename!r} at "
                                 f"offset {info.header_offset} (truncated or corrupt)")
            name_length, extra_length = _LOCAL.unpack(header)[-2:]
            data_offset = info.header_offset + _LOCAL.size + name_length + extra_length
            if data_offset + info.file_size > length:
                raise ValueError(f"{where}: truncated: record {info.filename!r} ends at "
                                 f"{data_offset + info.file_size}, the archive is {length} "
                                 "bytes")
            records[name] = (start + data_offset, info.file_size)
        if len(folders) > 1:
            raise ValueError(f"{where}: records in several top-level folders {sorted(folders)}")
        return records


def read_record(path: str | os.PathLike, name: str,
                records: dict[str, tuple[int, int]] | None = None) -> bytes:
    """The bytes of one (small) record, by its name without the archive folder; CRC unchecked.
    ``records``: the archive's directory, if already read (:func:`read_zip_directory`)."""
    if records is None:
        records = read_zip_directory(path)
    if name not in records:
        raise ValueError(f"{os.fspath(path)}: no record {name!r}")
    offset, size = records[name]
    with open(path, "rb") as file:
        data = os.pread(file.fileno(), size, offset)
    if len(data) != size:
        raise ValueError(f"{os.fspath(path)}: truncated record {name!r}")
    return data


def best_phase(weights: dict[int, int], multiple: int) -> int:
    """The offset in a page (key of ``weights``) with the most bytes (value), the first one
    on a tie; 0 when there is none, or when it is not a multiple of ``multiple``."""
    best = max(weights, key=weights.__getitem__, default=0)
    return best if best % multiple == 0 else 0
