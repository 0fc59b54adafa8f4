"""Hugging Face checkpoint files: lazy safetensors reading and streamed, sharded writing.

:class:`HFCheckpoint` reads only headers when opened; a tensor's bytes are read when asked for,
and only the rows or columns asked for (:class:`mswift.bridge.safetensors_file.SafetensorsFile`,
no memory map), so a rank that owns a tensor-parallel slice never reads the rest.
:class:`HFShardWriter` is given the full list of tensors up front and streams each one to disk
as it is added, into ``model-0000i-of-0000N.safetensors`` shards of bounded size plus
``model.safetensors.index.json``: it never holds more than the tensor being written.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mswift.bridge import dtypes
from mswift.bridge.errors import BridgeError
from mswift.bridge.safetensors_file import (
    SafetensorsFile,
    encode_header,
    tensor_bytes,
)
from mswift.bridge.torch_file import run_parallel
from mswift.bridge.torch_zip import PAGE, best_phase
from mswift.lazy_import import lazy_module
from mswift.models.hf_config import read_hf_config

torch = lazy_module("torch")  # opening and checking a checkpoint does not need it

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files that hold weights; every other top-level file (config, generation config, tokenizer,
# chat template, license, README) is copied through unchanged.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = (INDEX, "pytorch_model.bin.index.json")


def kind_from_name(name: str) -> dtypes.Dtype:
    """``'bfloat16'`` -> its :class:`~mswift.bridge.dtypes.Dtype` (the names config.json and
    our metadata use)."""
    kind = dtypes.BY_NAME.get(str(name))
    if kind is None:
        raise BridgeError(f"dtype {name!r}: not a dtype the bridge reads "
                          f"(known: {', '.join(dtypes.BY_NAME)})")
    return kind


class HFCheckpoint:
    """An HF model directory: its config and lazily-read safetensors tensors."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.config = read_hf_config(self.dir)
        self._meta: dict[str, tuple[tuple[int, ...], dtypes.Dtype]] = {}
        self._handles: dict[str, SafetensorsFile] = {}  # file name -> open file
        self.files = self._weight_files()  # tensor name -> file name
        self._read_headers()

    # -- opening -------------------------------------------------------------------------------

    def _weight_files(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise BridgeError(f"{index}: not a safetensors index ({err!r})") from None
            outside = sorted({repr(f) for f in weight_map.values() if not _inside_folder(f)})
            if outside:
                raise BridgeError([f"{index}: lists the file {f}, outside {self.dir} (expected "
                                   "the name of a file in the model folder)" for f in outside],
                                  headline="refused")
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise BridgeError([f"{self.dir / f}: listed in {INDEX} but not found"
                                   for f in missing])
            return dict(weight_map)
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt"))
            hint = f" (found {', '.join(other)}: only safetensors is read)" if other else ""
            raise BridgeError(f"{self.dir}: no *.safetensors weights{hint}")
        if len(files) > 1 and SINGLE in files:
            files = [SINGLE]
        return {name: f for f in files for name in self._open(f).tensors}

    def _open(self, file: str) -> SafetensorsFile:
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = SafetensorsFile(self.dir / file)
        return handle

    def close(self) -> None:
        """Close the open files (also done when the checkpoint is garbage-collected)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _read_headers(self) -> None:
        problems = []
        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            tensors = self._open(file).tensors
            for name in names:
                if name not in tensors:
                    problems.append(f"{name}: {INDEX} places it in {file}, which does not hold it")
                    continue
                self._meta[name] = (tensors[name].shape, tensors[name].kind)
        if problems:
            raise BridgeError(problems)

    # -- reading -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return dtypes.torch_dtype(self._meta[name][1])

    def kind(self, name: str) -> dtypes.Dtype:
        """:meth:`dtype` without torch."""
        return self._meta[name][1]

    def location(self, name: str) -> tuple[Path, int]:
        """(file, offset of the first byte) of a tensor: where its bytes can be copied from."""
        file = self.files[name]
        return self.dir / file, self._open(file).tensors[name].begin

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0
             ) -> torch.Tensor:
        """Tensor ``name``, or only its rows (``dim=0``) / columns (``dim=1``) ``start:stop``."""
        if name not in self._meta:
            raise BridgeError(f"{name}: not in the checkpoint {self.dir}")
        return self._open(self.files[name]).read(name, dim, start, stop)

    def read_rows_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Rows ``start:start + len(out)`` of ``name`` read straight into ``out``."""
        if name not in self._meta:
            raise BridgeError(f"{name}: not in the checkpoint {self.dir}")
        self._open(self.files[name]).read_rows_into(name, start, out)

    def check_tensors(self, expected: dict[str, tuple[int, ...]], what: str,
                      ignored: tuple[str, ...] = ()) -> None:
        """Every expected tensor present with its shape, nothing else (but the ``ignored``
        regexes: buffers that hold no weights); one error listing every problem."""
        problems = []
        for name, shape in expected.items():
            if name not in self._meta:
                problems.append(f"{name}: missing from {self.dir} (the {what} config needs it)")
            elif self.shape(name) != shape:
                problems.append(
                    f"{name}: shape {list(self.shape(name))} in {self.dir / self.files[name]}, "
                    f"but config.json implies {list(shape)}")
            elif not self.kind(name).floating:
                problems.append(f"{name}: dtype {self.kind(name).name}, expected a float tensor")
        for name in self._meta:
            if name not in expected and not any(re.fullmatch(p, name) for p in ignored):
                problems.append(f"{name}: unexpected tensor in {self.dir / self.files[name]} "
                                f"(not part of a {what} model with this config.json)")
        if problems:
            raise BridgeError(problems,
                              headline=f"{self.dir}: checkpoint does not match its config")

    def model_kind(self) -> dtypes.Dtype:
        """The checkpoint's dtype: config.json's ``dtype`` / ``torch_dtype``, else its tensors'."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if name:
            return kind_from_name(name)
        floats = [kind for _, kind in self._meta.values() if kind.floating]
        return max(set(floats), key=floats.count) if floats else dtypes.BY_NAME["float32"]

    def tensor_records(self) -> list[list]:
        """``[name, dtype, shape]`` of every tensor, for the metadata a conversion carries."""
        return [[name, kind.name, list(shape)] for name, (shape, kind) in self._meta.items()]


def _inside_folder(name) -> bool:
    """Whether an index's file name stays in the model folder (no absolute path, no ``..``)."""
    return (isinstance(name, str) and name != "" and not os.path.isabs(name)
            and ".." not in Path(name).parts and not Path(name).drive)


def _safe_link(link: Path, folder: Path) -> bool:
    """Whether a symbolic link among a model's files points where a model's own files live: into
    its folder, or (the Hugging Face hub cache, ``models--org--name/snapshots/<rev>/file ->
    ../../blobs/<hash>``) into the ``blobs`` folder of the same cached repository."""
    target, folder = link.resolve(), folder.resolve()
    if target.is_relative_to(folder):
        return True
    return folder.parent.name == "snapshots" and target.parent == folder.parent.parent / "blobs"


def aux_files(src: str | Path) -> list[Path]:
    """The top-level non-weight files of ``src`` (config, tokenizer, ...) that are copied along
    with a model. A symbolic link among them is refused unless it points into the model folder
    or, for a Hugging Face hub cache snapshot, into the cached repository's ``blobs``: copying
    another link would put the file it points to (anywhere on this machine) into a checkpoint
    or export that may be shared."""
    files, links = [], []
    for path in sorted(Path(src).iterdir()):
        if path.name in WEIGHT_INDEXES or path.suffix in WEIGHT_SUFFIXES:
            continue
        if path.is_symlink() and not path.is_dir() and not _safe_link(path, Path(src)):
            links.append(f"{path}: a symbolic link to {os.readlink(path)}, outside the model "
                         "folder; the config and tokenizer files copied along with a model must "
                         "be its own files (copy the file itself there, e.g. cp -L)")
        elif path.is_file():
            files.append(path)
    if links:
        raise BridgeError(links, headline="refused")
    return files


def copy_aux_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every top-level non-weight file (config, tokenizer, ...) of ``src`` into ``dst``
    (:func:`aux_files`: links out of the model's own files are refused)."""
    copied = []
    for path in aux_files(src):
        shutil.copy2(path, Path(dst) / path.name)  # a link's content, never the link
        copied.append(path.name)
    return copied


PlanEntry = tuple[str, "torch.dtype | dtypes.Dtype", tuple[int, ...]]  # (HF name, dtype, shape)


def shard_file_name(index: int, total: int) -> str:
    """Shard ``index`` (from 0) of ``total``: ``model-0000{index+1}-of-0000{total}.safetensors``."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_index(directory: str | Path, shards: list[list[PlanEntry]]) -> dict:
    """Write ``model.safetensors.index.json`` for shards from :meth:`HFShardWriter.plan_shards`
    (what :meth:`HFShardWriter.close` does when one writer wrote every shard); returns it."""
    weight_map, total_size = {}, 0
    for i, entries in enumerate(shards):
        for name, dtype, shape in entries:
            weight_map[name] = shard_file_name(i, len(shards))
            total_size += tensor_bytes(dtype, shape)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    tmp = Path(directory) / f"{INDEX}.partial"
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, Path(directory) / INDEX)
    return index


class HFShardWriter:
    """Stream the tensors of a plan, as they are added, into safetensors shards + index.

    ``plan``: ``(name, dtype, shape)`` of every tensor, in the order :meth:`add` will get them.
    It is cut into shards of at most ``max_shard_bytes`` (:meth:`plan_shards`); each shard's
    header is written when its first tensor comes, then each tensor's bytes as it is added, so
    the writer holds nothing but the tensor being written. Shards are written as
    ``<shard name>.partial`` and renamed by :meth:`close`, which fails (and removes them) if a
    tensor of the plan was never added. An :meth:`add` that does not match the plan's next
    tensor (name, dtype or shape) is a bug in the caller and raises ``ValueError``.

    Several processes can write one plan: each builds the same plan, passes ``shards=`` (the
    indices of :meth:`plan_shards` it writes), adds the tensors of those shards only
    (:attr:`names`, in plan order) and closes; once all have closed, one of them calls
    :func:`write_index` with :meth:`plan_shards`. A writer of every shard (``shards=None``)
    writes the index itself in :meth:`close`.
    """

    def __init__(self, directory: str | Path, plan: list[PlanEntry],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, shards=None,
                 copy_threads: int = 1):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shards = self.plan_shards(plan, max_shard_bytes)
        everything = shards is None
        shards = range(len(self.shards)) if everything else sorted(set(shards))
        if not all(0 <= i < len(self.shards) for i in shards):
            raise ValueError(f"shards={list(shards)}: the plan has {len(self.shards)} shards")
        self._write_index = everything
        self._mine = list(shards)
        # (shard, entry) of every tensor this writer writes, in the order add() must get them
        self._queue = [(i, entry) for i in self._mine for entry in self.shards[i]]
        self._next = 0
        self._file = None
        self._fills: list = []  # add_copied's, run when the shard is complete
        self.copy_threads = copy_threads
        self._pool = None  # fills shards, copy_threads at once (each shard by one thread)
        self._pending: list = []  # futures of the shards being filled
        self._file_shard = -1
        self._phases: dict[str, int] = {}

    def want_phases(self, phases: dict[str, int]) -> None:
        """Tensors whose bytes will be copied in from a file, each mapped to the offset in a
        page that its copy's source starts at. Each shard's data is then started (its header
        padded with spaces) where the most of those bytes line up with their source's pages
        (``copy_file_range`` then moves whole pages); by default, on a page."""
        self._phases = dict(phases)

    @staticmethod
    def plan_shards(plan: list[PlanEntry], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
                    ) -> list[list[PlanEntry]]:
        """Cut ``plan`` into consecutive shards of at most ``max_shard_bytes`` each (a larger
        tensor gets a shard of its own); an empty plan gives one empty shard."""
        names = [name for name, _, _ in plan]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"plan names tensors more than once: {twice[:5]}")
        shards: list[list[PlanEntry]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            nbytes = tensor_bytes(dtype, shape)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape)))
            size += nbytes
        return shards

    @property
    def names(self) -> list[str]:
        """The tensors this writer expects, in the order :meth:`add` must get them."""
        return [name for _, (name, _, _) in self._queue]

    def _path(self, shard: int) -> Path:
        return self.dir / f"{shard_file_name(shard, len(self.shards))}.partial"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes, which must be the plan's next tensor (name, dtype, shape)."""
        shard, (want, dtype, shape) = self._expect(name)
        if (name, dtypes.as_kind(tensor.dtype), tuple(tensor.shape)) != (
                want, dtypes.as_kind(dtype), shape):
            raise ValueError(f"{name} {tensor.dtype} {list(tensor.shape)} added where the plan "
                             f"expects {want} {dtype} {list(shape)}")
        self._write(shard, tensor)
        self._advance(shard)

    def add_stacked(self, name: str, slices) -> None:
        """Like :meth:`add` for a tensor given as its slices along dim 0, in order (the
        experts of a stacked tensor): each is written as it comes, so the writer holds one
        slice, never the whole tensor."""
        shard, (want, dtype, shape) = self._expect(name)
        count = 0
        for piece in slices:
            if name != want or count == shape[0] or (
                    dtypes.as_kind(piece.dtype), tuple(piece.shape)) != (
                    dtypes.as_kind(dtype), shape[1:]):
                raise ValueError(f"{name}: slice {count} {piece.dtype} {list(piece.shape)} "
                                 f"added where the plan expects {want}, {shape[0]} slices "
                                 f"{dtype} {list(shape[1:])}")
            self._write(shard, piece)
            count += 1
        if count != shape[0]:
            raise ValueError(f"{name}: {count} slices added, the plan expects {shape[0]}")
        self._advance(shard)

    def _expect(self, name: str):
        """(shard, plan entry) of the tensor the next add must give."""
        if self._next == len(self._queue):
            raise ValueError(f"{name}: added after every tensor of the plan")
        return self._queue[self._next]

    def _write(self, shard: int, tensor: torch.Tensor) -> None:
        if shard != self._file_shard:
            self._start_shard(shard)
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy())

    def _advance(self, shard: int) -> None:
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._end_shard()

    def plan_entries(self) -> list[PlanEntry]:
        """``(name, dtype, shape)`` of the tensors this writer expects, in :meth:`add` order."""
        return [entry for _, entry in self._queue]

    def add_copied(self, name: str, kind: dtypes.Dtype, shape: tuple[int, ...], fill,
                   shared: bool = False) -> None:
        """Like :meth:`add` for a tensor whose bytes ``fill(fd, offset)`` writes into the shard
        itself (``os.copy_file_range`` / ``os.pwrite`` at that offset), without torch. The
        fills of a shard run, in order, when it is complete: with ``copy_threads`` > 1 on a
        thread of their own while the next shards are laid out (``copy_threads`` shards at
        once; :meth:`close` waits for them). ``shared`` fills (those that do most of their
        work outside the file, such as casts) then run ``copy_threads`` at once."""
        shard, (want, dtype, want_shape) = self._expect(name)
        if (name, kind, tuple(shape)) != (want, dtypes.as_kind(dtype), want_shape):
            raise ValueError(f"{name} {kind.name} {list(shape)} added where the plan expects "
                             f"{want} {dtype} {list(want_shape)}")
        if shard != self._file_shard:
            self._start_shard(shard)
        self._file.flush()
        offset = self._file.tell()
        nbytes = tensor_bytes(kind, shape)
        if nbytes:
            self._fills.append((lambda fd=self._file.fileno(): fill(fd, offset), shared))
            self._file.seek(offset + nbytes)
        self._advance(shard)

    def _start_shard(self, shard: int) -> None:
        self._end_shard()
        # Open across add() calls, closed by _end_shard (or _discard on failure).
        self._file = open(self._path(shard), "wb")  # noqa: SIM115
        self._file_shard = shard
        self._file.write(encode_header(self.shards[shard], {"format": "pt"}, align=PAGE,
                                       phase=self._data_phase(self.shards[shard])))

    def _data_phase(self, entries: list[PlanEntry]) -> int:
        """Where in a page to start a shard's data, for :meth:`want_phases`."""
        weight: dict[int, int] = {}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = tensor_bytes(dtype, shape)
            if name in self._phases:
                phase = (self._phases[name] - offset) % PAGE
                weight[phase] = weight.get(phase, 0) + nbytes
            offset += nbytes
        return best_phase(weight, 8)  # safetensors aligns the data to 8 bytes

    def _end_shard(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        fills, self._fills = self._fills, []
        if self.copy_threads > 1 and fills:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.copy_threads)
            self._pending.append(self._pool.submit(_fill_and_close, file, fills,
                                                   self.copy_threads))
        else:
            _fill_and_close(file, fills, self.copy_threads)

    def wait(self) -> None:
        """Wait until every complete shard is filled (by :meth:`add_copied`'s fills); raise
        the first failure. :meth:`close` waits too; a caller whose fills read files it
        closes waits first."""
        pending, self._pending = self._pending, []
        failure = None
        for future in pending:
            try:
                future.result()
            except BaseException as err:  # noqa: BLE001 - raised below, after the others
                failure = failure or err
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if failure is not None:
            raise failure

    def close(self) -> dict | None:
        """Rename the shards to their final names and (writing every shard) write the index,
        returned; ``None`` for a writer of some shards only."""
        if self._next < len(self._queue):
            missing = self.names[self._next:]
            self._discard()
            raise ValueError(f"{len(missing)} tensors of the plan were never added "
                             f"(first: {missing[0]}); nothing written to {self.dir}")
        try:
            for shard in self._mine:
                if not self.shards[shard]:  # an empty plan: a header-only file
                    self._start_shard(shard)
                    self._end_shard()
            self.wait()
        except BaseException:
            self._discard()
            raise
        for shard in self._mine:
            os.replace(self._path(shard), self.dir / shard_file_name(shard, len(self.shards)))
        return write_index(self.dir, self.shards) if self._write_index else None

    def _discard(self) -> None:
        self._fills.clear()
        self._end_shard()
        with contextlib.suppress(Exception):  # the caller is already failing
            self.wait()
        for shard in self._mine:
            self._path(shard).unlink(missing_ok=True)


def _fill_and_close(file, fills: list, threads: int) -> None:
    """Run a shard's fills (``(fill, shared)``): in order, the shared ones ``threads`` at
    once; then close its file."""
    try:
        file.flush()
        for fill, shared in fills:
            if not shared:
                fill()
        run_parallel([fill for fill, shared in fills if shared], threads)
    finally:
        file.close()
