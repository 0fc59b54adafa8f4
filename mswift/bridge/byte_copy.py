"""Conversions that only move bytes: HF safetensors <-> Megatron-LM legacy rank files, and
legacy rank files at one layout -> another (reshard).

Each megatron tensor is a rearrangement of HF tensors' rows and columns (fused QKV by query
group, gate/up, TP slices, vocabulary padding), which the weight map's
:meth:`~mswift.models.weight_map.Transform.tiles` describe. These conversions copy those
rectangles file to file: whole-row runs with ``os.copy_file_range`` (the kernel copies, nothing
passes through this process: what ``cp`` does), column slices (row-parallel weights at TP > 1)
through a bounded buffer, and every band through a buffer and a cast
(:mod:`mswift.bridge.dtype_cast`) when the dtype changes between float32, bfloat16 and
float16. No tensor is built and torch is not imported
(its import alone takes longer than such a conversion of a few GB); everything else (the checks,
the metadata, the files' formats) is what the tensor path does. The exception: a tensor that is
no rectangle of its source's bytes (Llama-4's input-major experts, a transpose:
``Transform.tiled`` is False) is made with torch, one tensor (one expert) at a time, and written
where the copies go (:func:`made_fill`). Tensors that megatron does not hold (a vision tower)
are copied whole, file to file (:class:`CarriedTensors`). :mod:`mswift.bridge.convert`
takes this path when it applies (:func:`hf_copy_applies`, :func:`legacy_to_hf_applies`,
:func:`reshard_applies`).
"""
from __future__ import annotations

import errno
import functools
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mswift.bridge import dtypes
from mswift.bridge.hf_io import HFCheckpoint, HFShardWriter
from mswift.bridge.layout import Layout
from mswift.bridge.legacy import FILE, LegacySource, chunk_entries
from mswift.bridge.safetensors_file import preadv_all
from mswift.bridge.torch_file import TensorRecord, run_parallel, write_torch_file
from mswift.bridge.torch_zip import PAGE, best_phase
from mswift.bridge.tracker import iteration_dir
from mswift.models.weight_map import Tile, WeightMap, matrix_shape, stacked_slice

BUFFER_BYTES = 32 * 2**20  # column slices are gathered this many bytes at a time
# Bands that are cast: smaller, for numpy's temporaries (0.25-32 MB made no clear difference
# in time here; memory grows with it).
CAST_BUFFER_BYTES = 4 * 2**20
# Files written at once, each by one thread. The kernel's copy runs on the calling thread (one
# copy keeps one core busy), and copies into one file take turns on its lock: here a second
# thread in one file doubled the kernel time and gained no wall time.
COPY_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class Matrix:
    """A row-major matrix of bytes in a file: row ``r`` starts at ``offset + r * row_bytes``."""

    path: str
    offset: int
    row_bytes: int


@dataclass(frozen=True)
class Block:
    """``rows`` rows of ``width`` bytes copied from ``src`` (None: zeros) at (row, byte column)
    (``src_row``, ``src_col``) to the destination matrix at (``dst_row``, ``dst_col``)."""

    src: Matrix | None
    src_row: int
    src_col: int
    dst_row: int
    dst_col: int
    rows: int
    width: int


class OpenFiles:
    """Read-only descriptors of the source files, opened once each (by any thread)."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- copying --------------------------------------------------------------------------------------


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """``nbytes`` from ``src_fd`` to ``dst_fd`` at those offsets: in the kernel where the file
    systems allow (``copy_file_range``), else through a buffer."""
    while nbytes:
        try:
            done = os.copy_file_range(src_fd, dst_fd, nbytes, src_offset, dst_offset)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = _copy_through_buffer(src_fd, src_offset, dst_fd, dst_offset, nbytes)
        if done == 0:
            raise EOFError(f"source ends {nbytes} bytes short")
        src_offset, dst_offset, nbytes = src_offset + done, dst_offset + done, nbytes - done


def _copy_through_buffer(src_fd, src_offset, dst_fd, dst_offset, nbytes) -> int:
    data = os.pread(src_fd, min(nbytes, BUFFER_BYTES), src_offset)
    if data:
        os.pwrite(dst_fd, data, dst_offset)
    return len(data)


def _write_zeros(dst_fd: int, offset: int, nbytes: int) -> None:
    zeros = bytes(min(nbytes, BUFFER_BYTES))
    while nbytes:
        n = min(nbytes, len(zeros))
        os.pwrite(dst_fd, zeros[:n], offset)
        offset, nbytes = offset + n, nbytes - n


def copy_blocks(files: OpenFiles, dst_fd: int, dst_offset: int, dst_row_bytes: int,
                blocks: list[Block], cast: tuple[dtypes.Dtype, dtypes.Dtype] | None = None
                ) -> None:
    """Fill a destination matrix (in ``dst_fd`` at ``dst_offset``) from ``blocks``. A block of
    whole rows on both sides is one contiguous range (copied in the kernel); the others are
    gathered row band by row band in a buffer and written with one ``pwrite`` per band.
    ``cast``: (source dtype, destination dtype) when they differ; then the blocks' columns
    count source bytes, ``dst_row_bytes`` destination bytes, and every band is gathered and
    cast (:mod:`mswift.bridge.dtype_cast`) before it is written."""
    if cast is not None and cast[0] != cast[1]:
        from mswift.bridge import dtype_cast  # numpy: imported only by conversions that cast

        src, dst = cast
        _write_bands(files, dst_fd, dst_offset, dst_row_bytes // dst.itemsize * src.itemsize,
                     blocks, dst_row_bytes, lambda band: dtype_cast.cast(band, src, dst),
                     CAST_BUFFER_BYTES)
        return
    gathered = []
    for b in blocks:
        if not _whole_rows(b, dst_row_bytes):
            gathered.append(b)
        elif b.src is None:
            _write_zeros(dst_fd, dst_offset + b.dst_row * dst_row_bytes, b.rows * b.width)
        else:
            copy_range(files.fd(b.src.path), b.src.offset + b.src_row * b.width, dst_fd,
                       dst_offset + b.dst_row * dst_row_bytes, b.rows * b.width)
    _write_bands(files, dst_fd, dst_offset, dst_row_bytes, gathered, dst_row_bytes)


def _write_bands(files: OpenFiles, dst_fd: int, dst_offset: int, row_bytes: int,
                 blocks: list[Block], out_row_bytes: int, convert=None,
                 band_bytes: int = BUFFER_BYTES) -> None:
    """Gather ``blocks`` (rows of ``row_bytes``) band by band (of about ``band_bytes``),
    ``convert`` each band (rows of ``out_row_bytes`` after), write it."""
    for first, last in _bands(blocks):
        step = max(1, band_bytes // row_bytes)
        for r0 in range(first, last, step):
            r1 = min(last, r0 + step)
            band = memoryview(bytearray((r1 - r0) * row_bytes))
            covered = sum(_gather(files, b, band, r0, r1, row_bytes) for b in blocks)
            # Only rows the gathered blocks cover wholly are written (no row is half-written).
            assert covered == band.nbytes, f"blocks cover {covered} of {band.nbytes} bytes"
            os.pwrite(dst_fd, band if convert is None else convert(band),
                      dst_offset + r0 * out_row_bytes)


def _whole_rows(b: Block, dst_row_bytes: int) -> bool:
    """Whether ``b`` is whole rows on both sides (one contiguous range each)."""
    return b.width == dst_row_bytes and (b.src is None or b.width == b.src.row_bytes)


def page_phase(blocks: list[Block], dst_row_bytes: int, itemsize: int) -> int:
    """Where in a page to start the destination matrix of ``blocks``: the phase at which the
    most bytes copied in the kernel start as far into a page on both sides, so that
    ``copy_file_range`` moves whole pages (here a copy at unequal phases took 55% more kernel
    time: 1 GB in 0.35 s against 0.23 s). 0 when nothing is copied in the kernel, or when the
    phase would leave the tensor unaligned to its element size."""
    weight: dict[int, int] = {}
    for b in blocks:
        if b.src is not None and _whole_rows(b, dst_row_bytes):
            phase = (b.src.offset + b.src_row * b.width - b.dst_row * dst_row_bytes) % PAGE
            weight[phase] = weight.get(phase, 0) + b.rows * b.width
    return best_phase(weight, itemsize)


def _bands(blocks: list[Block]) -> list[tuple[int, int]]:
    """The destination row ranges the blocks cover, merged."""
    spans = sorted((b.dst_row, b.dst_row + b.rows) for b in blocks)
    merged: list[list[int]] = []
    for start, stop in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def _gather(files: OpenFiles, b: Block, band: memoryview, r0: int, r1: int,
            dst_row_bytes: int) -> int:
    """Read the rows of block ``b`` that fall in destination rows ``r0:r1`` into ``band``
    (one scattered read); returns the bytes placed."""
    first, last = max(r0, b.dst_row), min(r1, b.dst_row + b.rows)
    if first >= last:
        return 0
    targets = [band[(r - r0) * dst_row_bytes + b.dst_col:][:b.width] for r in range(first, last)]
    if b.src is None:
        for target in targets:
            target[:] = bytes(b.width)
        return len(targets) * b.width
    gap = b.src.row_bytes - b.width
    skip = memoryview(bytearray(gap)) if gap else None
    buffers = []
    for target in targets:
        buffers.append(target)
        if skip is not None:
            buffers.append(skip)
    if skip is not None:
        buffers.pop()  # nothing to skip after the last row
    start = b.src.offset + (b.src_row + first - b.dst_row) * b.src.row_bytes + b.src_col
    if not preadv_all(files.fd(b.src.path), buffers, start):
        raise EOFError(f"{b.src.path}: ends before byte {start} + {len(targets)} rows")
    return len(targets) * b.width


# -- HF -> legacy, legacy -> legacy ---------------------------------------------------------------


def hf_copy_applies(ckpt: HFCheckpoint, wmap: WeightMap, kind: dtypes.Dtype) -> bool:
    """Every HF tensor the weight map reads has the checkpoint's dtype ``kind``, or one the
    copies cast to it (:func:`~mswift.bridge.dtypes.castable`), and none is stored quantized
    (those are dequantized by the tensor path)."""
    from mswift.bridge.quantized import DequantizedCheckpoint

    return not isinstance(ckpt, DequantizedCheckpoint) and all(dtypes.castable(ckpt.kind(name), kind) for name in wmap.hf_shapes())


class HFBytes:
    """Where the bytes of a megatron TP slice are in an HF checkpoint (for
    :func:`write_legacy_copying`)."""

    def __init__(self, ckpt: HFCheckpoint, wmap: WeightMap):
        self.ckpt, self.wmap = ckpt, wmap

    def kind(self, name: str) -> dtypes.Dtype:
        hf_name = self.wmap.lookup(name)[1][0]
        sliced = stacked_slice(hf_name)  # one expert of a stacked tensor: that tensor's
        return self.ckpt.kind(hf_name if sliced is None else sliced[0])

    def local(self, name: str, tp_rank: int, tp_size: int):
        """The TP slice made with torch (a tensor that is not :attr:`~mswift.models.weight_map.
        Transform.tiled`)."""
        from mswift.bridge.model_io import HFSource

        return HFSource(self.ckpt, self.wmap).local(name, tp_rank, tp_size)

    def blocks(self, name: str, tiles: list[Tile]) -> list[Block]:
        _, hf_names = self.wmap.lookup(name)
        itemsize = self.kind(name).itemsize
        blocks = []
        for t in tiles:
            if t.part is None:
                blocks.append(Block(None, 0, 0, t.at_row, 0, t.rows, t.cols * itemsize))
                continue
            path, offset = self.ckpt.location(hf_names[t.part])
            _, cols = matrix_shape(self.ckpt.shape(hf_names[t.part]))
            src = Matrix(str(path), offset, cols * itemsize)
            blocks.append(Block(src, t.row, t.col * itemsize, t.at_row, 0, t.rows,
                                t.cols * itemsize))
        return blocks


def reshard_applies(source: LegacySource) -> bool:
    """Every stored piece is contiguous (a reshard keeps the dtypes)."""
    return all(piece.contiguous for piece in source.pieces.values())


class LegacyBytes:
    """Where the bytes of a megatron TP slice (at any TP size) are in a legacy checkpoint's
    pieces: each tile of the HF tensors cut from the pieces that hold it (for a reshard)."""

    def __init__(self, source: LegacySource):
        self.source = source
        self.wmap = source.wmap

    def kind(self, name: str) -> dtypes.Dtype:
        return self.source.kind(name)

    def local(self, name: str, tp_rank: int, tp_size: int):
        """The TP slice made with torch (a tensor that is not tiled)."""
        return self.source.local(name, tp_rank, tp_size)

    def full(self, name: str):
        """The whole megatron tensor, made with torch (for a stacked HF tensor)."""
        return self.source.full(name)

    def hf_blocks(self, name: str, part: int) -> list[Block]:
        """HF tensor ``part`` of megatron tensor ``name`` as blocks of the stored pieces."""
        return _legacy_blocks(self.source, name, part)

    def blocks(self, name: str, tiles: list[Tile]) -> list[Block]:
        itemsize = self.kind(name).itemsize
        blocks, parts = [], {}
        for t in tiles:
            if t.part is None:
                blocks.append(Block(None, 0, 0, t.at_row, 0, t.rows, t.cols * itemsize))
                continue
            if t.part not in parts:
                parts[t.part] = _legacy_blocks(self.source, name, t.part)
            rows, cols = (t.row, t.row + t.rows), (t.col * itemsize, (t.col + t.cols) * itemsize)
            for b in parts[t.part]:  # b places piece bytes in HF coordinates: cut to the tile
                r0, r1 = max(rows[0], b.dst_row), min(rows[1], b.dst_row + b.rows)
                c0, c1 = max(cols[0], b.dst_col), min(cols[1], b.dst_col + b.width)
                if r0 < r1 and c0 < c1:
                    blocks.append(Block(b.src, b.src_row + r0 - b.dst_row,
                                        b.src_col + c0 - b.dst_col, t.at_row + r0 - rows[0],
                                        c0 - cols[0], r1 - r0, c1 - c0))
        return blocks


def write_legacy_copying(source, wmap: WeightMap, layout: Layout, root: str | Path,
                         args, iteration: int = 0,
                         ranks: list[tuple[int, int, int]] | None = None,
                         progress: bool = False, kind: dtypes.Dtype | None = None) -> None:
    """:func:`mswift.bridge.legacy.write_legacy` by copying bytes from ``source``
    (:class:`HFBytes` or :class:`LegacyBytes`), each tensor cast to ``kind`` (None: in its
    source's dtype). Rank files are written COPY_THREADS at once, each by one thread (copies
    into one file take turns on its lock: a second thread there only doubled the kernel
    time), or, when casting, with COPY_THREADS tensors at once in each."""
    d = wmap.dims
    iter_dir = iteration_dir(root, iteration)
    todo = layout.ranks() if ranks is None else ranks
    with OpenFiles() as files:
        jobs = []
        for tp_rank, pp_rank, ep_rank in todo:
            state = {"checkpoint_version": 3.0, "iteration": iteration, "args": args}
            for vp_stage in range(layout.chunks):
                sd = {}
                for local, name in chunk_entries(wmap, layout, pp_rank, vp_stage, ep_rank):
                    if name is None:
                        sd[local] = None
                        continue
                    rule, _ = wmap.lookup(name)
                    shapes = rule.hf_shapes(d)
                    shape = rule.transform.local_shape(shapes, layout.tp, d)
                    if not rule.transform.tiled:
                        make = (lambda n=name, r=tp_rank: source.local(n, r, layout.tp))
                        sd[local] = TensorRecord(tuple(shape), kind or source.kind(name),
                                                 made_fill([make], kind or source.kind(name)))
                        continue
                    tiles = rule.transform.tiles(shapes, tp_rank, layout.tp, d)
                    sd[local] = _record(files, shape, kind or source.kind(name),
                                        source.blocks(name, tiles), source.kind(name))
                state["model" if layout.vpp is None else f"model{vp_stage}"] = sd
            path = iter_dir / layout.rank_dir(tp_rank, pp_rank, ep_rank) / FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((path, state))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="writing rank files", unit="file")

        casts = kind is not None and any(source.kind(name) != kind
                                         for name in wmap.mcore_names(to_hf_only=True))

        def write(path: Path, state: dict) -> None:
            # Casts do most of their work outside the file: several at once in one file.
            write_torch_file(path, state, threads=COPY_THREADS if casts else 1)
            if bar is not None:
                bar.update()

        try:
            run_parallel([lambda p=p, s=s: write(p, s) for p, s in jobs], COPY_THREADS)
        finally:
            if bar is not None:
                bar.close()


def _record(files: OpenFiles, shape: tuple[int, ...], kind: dtypes.Dtype,
            blocks: list[Block], src: dtypes.Dtype) -> TensorRecord:
    fill, phase = copy_fill(files, blocks, shape, src, kind)
    return TensorRecord(tuple(shape), kind, fill, phase or 0)


def copy_fill(files: OpenFiles, blocks: list[Block], shape: tuple[int, ...], src: dtypes.Dtype,
              dst: dtypes.Dtype):
    """``(fill, phase)`` for a destination tensor of ``shape`` in ``dst`` made of ``blocks``
    (whose columns count ``src`` bytes): ``fill(fd, offset)`` copies them, cast when the
    dtypes differ, and ``phase`` is where in a page to put the tensor (:func:`page_phase`;
    None when casting, which copies nothing in the kernel: anywhere)."""
    row_bytes = matrix_shape(shape)[1] * dst.itemsize
    cast = None if src == dst else (src, dst)

    def fill(fd: int, offset: int) -> None:
        copy_blocks(files, fd, offset, row_bytes, blocks, cast)

    return fill, None if cast else page_phase(blocks, row_bytes, dst.itemsize)


# -- legacy -> HF ---------------------------------------------------------------------------------


def legacy_to_hf_applies(source: LegacySource, kinds: dict[str, dtypes.Dtype]) -> bool:
    """Every stored piece is contiguous, in the dtype its HF tensors are written in or one
    the copies cast to it."""
    wmap = source.wmap
    for (name, _), piece in source.pieces.items():
        if not piece.contiguous:
            return False
        _, hf_names = wmap.lookup(name)
        if not all(dtypes.castable(piece.kind, kinds.get(h, piece.kind)) for h in hf_names):
            return False
    return True


def _legacy_blocks(source: LegacySource, name: str, part: int) -> list[Block]:
    """HF tensor ``part`` of megatron tensor ``name`` as blocks of the stored TP pieces (a
    tensor every TP rank holds whole is taken from rank 0's piece only)."""
    rule, _ = source.wmap.lookup(name)
    tp = source.layout.tp
    d = source.wmap.dims
    if rule.transform.pads:  # the rows stored, padded for the checkpoint's TP size
        d = d.with_padded_vocab(source.pieces[(name, 0)].shape[0] * tp)
    blocks, placed = [], set()
    for r in range(tp):
        piece = source.pieces[(name, r)]
        itemsize = piece.kind.itemsize
        src = Matrix(piece.path, piece.offset, matrix_shape(piece.shape)[1] * itemsize)
        for t in rule.transform.tiles(rule.hf_shapes(d), r, tp, d):
            if t.part == part and (t.row, t.col, t.rows, t.cols) not in placed:
                placed.add((t.row, t.col, t.rows, t.cols))
                blocks.append(Block(src, t.at_row, 0, t.row, t.col * itemsize, t.rows,
                                    t.cols * itemsize))
    return blocks


def write_hf_copying(source, writer: HFShardWriter, progress: bool = False,
                     carried: CarriedTensors | None = None) -> None:
    """The HF tensors ``writer`` expects, copied from the checkpoint's stored pieces (cast
    where the writer's dtype differs): ``source`` gives each HF tensor's blocks
    (``hf_blocks(name, part)``: :class:`LegacyBytes`, or
    :class:`~mswift.bridge.dist_bytes.DistBytes` for torch_dist) and stored dtype
    (``kind(name)``); a stacked HF tensor (Llama-4's transposed experts) is made from
    ``source.full(name)`` with torch, one expert at a time; ``carried``: the tensors megatron
    does not hold, copied whole from their HF file. The caller closes the writer."""
    wmap = source.wmap
    tensors = {t.name: t for t in wmap.hf_tensors()}
    with OpenFiles() as files:
        entries = []
        for hf_name, kind, shape in writer.plan_entries():
            kind = dtypes.as_kind(kind)
            if carried is not None and hf_name in carried.names:
                fill, phase = copy_fill(files, carried.blocks(hf_name), shape, kind, kind)
            elif tensors[hf_name].stacked:
                fill, phase = made_fill([functools.partial(hf_part, source, name, part)
                                         for name, part in tensors[hf_name].sources], kind), None
            else:
                name, part = tensors[hf_name].sources[0]
                fill, phase = copy_fill(files, source.hf_blocks(name, part), shape,
                                        source.kind(name), kind)
            entries.append((hf_name, kind, shape, fill, phase))
        writer.want_phases({hf_name: phase for hf_name, _, _, _, phase in entries
                            if phase is not None})
        if progress:
            from tqdm import tqdm

            entries = tqdm(entries, desc="writing HF tensors", unit="tensor")
        try:
            for hf_name, kind, shape, fill, phase in entries:
                writer.add_copied(hf_name, kind, shape, fill, shared=phase is None)
        finally:
            writer.wait()  # the fills read ``files``: done before they are closed


# -- tensors made with torch where the others are copied ------------------------------------------

_MAKING = threading.Lock()  # fills run on threads; the sources read one tensor at a time


def hf_part(source, name: str, part: int):
    """HF tensor ``part`` of megatron tensor ``name`` (for a stacked tensor: one expert's
    slice), made with torch from ``source.full(name)``."""
    rule, _ = source.wmap.lookup(name)
    return rule.transform.to_hf(source.full(name), source.wmap.dims)[part]


def made_fill(makers: list[Callable], kind: dtypes.Dtype):
    """``fill(fd, offset)`` writing the tensors the ``makers`` return (torch), one after the
    other, each cast to ``kind``: for a tensor that is no rectangle of its source's bytes (a
    transpose), or a stacked HF tensor made expert by expert, among copied ones."""
    def fill(fd: int, offset: int) -> None:
        import torch

        for make in makers:
            with _MAKING:
                tensor = make().to(dtypes.torch_dtype(kind)).contiguous()
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            while data:
                done = os.pwrite(fd, data, offset)
                data, offset = data[done:], offset + done

    return fill


class CarriedTensors:
    """The tensors of an HF checkpoint that megatron holds no part of (``HFLayout.carried``:
    Llama-4's vision tower and projector), copied whole, byte for byte, into other shards:
    same names, dtypes and shapes."""

    def __init__(self, ckpt: HFCheckpoint, patterns: tuple[str, ...]):
        self.ckpt = ckpt
        self.names = [n for n in ckpt.names if any(re.fullmatch(p, n) for p in patterns)]

    def plan(self) -> list:
        """Plan entries (:class:`~mswift.bridge.hf_io.HFShardWriter`), in the checkpoint's
        order."""
        return [(n, self.ckpt.kind(n), self.ckpt.shape(n)) for n in self.names]

    def blocks(self, name: str) -> list[Block]:
        path, offset = self.ckpt.location(name)
        rows, cols = matrix_shape(self.ckpt.shape(name))
        width = cols * self.ckpt.kind(name).itemsize
        return [Block(Matrix(str(path), offset, width), 0, 0, 0, 0, rows, width)]

    def add_to(self, writer: HFShardWriter, files: OpenFiles) -> None:
        """Copy the carried tensors ``writer`` expects (its plan's last); its fills read
        ``files``: close them after the writer."""
        for name, kind, shape in writer.plan_entries():
            if name in self.names:
                kind = dtypes.as_kind(kind)
                fill, _ = copy_fill(files, self.blocks(name), shape, kind, kind)
                writer.add_copied(name, kind, shape, fill)

    def write(self, directory: Path) -> None:
        """The carried tensors as a safetensors checkpoint of their own in ``directory``."""
        writer = HFShardWriter(directory, self.plan())
        with OpenFiles() as files:
            self.add_to(writer, files)
            writer.close()
