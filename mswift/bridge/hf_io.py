"""Hugging Face checkpoint files: lazy safetensors reading and sharded writing.

:class:`HFCheckpoint` reads only headers when opened; a tensor's bytes are read when asked for,
and only the rows or columns asked for (``safe_open(...).get_slice``), so a rank that owns a
tensor-parallel slice never reads the rest. :class:`HFShardWriter` streams tensors into
``model-0000i-of-0000N.safetensors`` shards of bounded size plus ``model.safetensors.index.json``,
holding at most one shard in memory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mswift.bridge.errors import BridgeError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files that hold weights; every other top-level file (config, generation config, tokenizer,
# chat template, license, README) is copied through unchanged.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = (INDEX, "pytorch_model.bin.index.json")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in DTYPES.values()}


def dtype_from_name(name: str) -> torch.dtype:
    """``'bfloat16'`` -> ``torch.bfloat16`` (the names config.json and our metadata use)."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise BridgeError(f"dtype {name!r}: not a torch dtype")
    return dtype


def read_hf_config(directory: str | Path) -> dict:
    """config.json of an HF model directory, with a clear error if it is missing or broken."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BridgeError(f"{directory}: not a directory (expected an HF model directory with "
                          "config.json and *.safetensors)")
    path = directory / "config.json"
    if not path.is_file():
        raise BridgeError(f"{path}: not found (expected an HF model directory with config.json "
                          "and *.safetensors)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BridgeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise BridgeError(f"{path}: expected a JSON object at the top level")
    return config


class HFCheckpoint:
    """An HF model directory: its config and lazily-read safetensors tensors."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.config = read_hf_config(self.dir)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._handles: dict[str, object] = {}  # file name -> open safe_open handle
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
        return {name: f for f in files for name in self._open(f).keys()}

    def _open(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            path = self.dir / file
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise BridgeError(f"{path}: not a readable safetensors file ({err}); "
                                  "truncated or corrupt?") from None
            self._handles[file] = handle
        return handle

    def _read_headers(self) -> None:
        problems = []
        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            handle = self._open(file)
            present = set(handle.keys())
            for name in names:
                if name not in present:
                    problems.append(f"{name}: {INDEX} places it in {file}, which does not hold it")
                    continue
                sl = handle.get_slice(name)
                self._meta[name] = (tuple(sl.get_shape()), DTYPES.get(sl.get_dtype()))
        if problems:
            raise BridgeError(problems)

    # -- reading -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0
             ) -> torch.Tensor:
        if name not in self._meta:
            raise BridgeError(f"{name}: not in the checkpoint {self.dir}")
        sl = self._open(self.files[name]).get_slice(name)
        if dim is None:
            return sl[:]
        if dim == 0:
            return sl[start:stop]
        if dim == 1:
            return sl[:, start:stop]
        raise ValueError(f"dim={dim}: only 0 and 1 are sliced")

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
            elif not self.dtype(name) or not self.dtype(name).is_floating_point:
                problems.append(f"{name}: dtype {self.dtype(name)}, expected a float tensor")
        for name in self._meta:
            if name not in expected and not any(re.fullmatch(p, name) for p in ignored):
                problems.append(f"{name}: unexpected tensor in {self.dir / self.files[name]} "
                                f"(not part of a {what} model with this config.json)")
        if problems:
            raise BridgeError(problems,
                              headline=f"{self.dir}: checkpoint does not match its config")

    def torch_dtype(self) -> torch.dtype:
        """The checkpoint's dtype: config.json's ``dtype`` / ``torch_dtype``, else its tensors'."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if name:
            return dtype_from_name(name)
        floats = [dtype for _, dtype in self._meta.values() if dtype and dtype.is_floating_point]
        return max(set(floats), key=floats.count) if floats else torch.float32

    def tensor_records(self) -> list[list]:
        """``[name, dtype, shape]`` of every tensor, for the metadata a conversion carries."""
        return [[name, DTYPE_NAMES[dtype], list(shape)] for name, (shape, dtype) in
                self._meta.items()]


def copy_aux_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every top-level non-weight file (config, tokenizer, ...) of ``src`` into ``dst``."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if not path.is_file() or path.name in WEIGHT_INDEXES or path.suffix in WEIGHT_SUFFIXES:
            continue
        shutil.copy2(path, Path(dst) / path.name)
        copied.append(path.name)
    return copied


class HFShardWriter:
    """Write tensors in the order given into shards of at most ``max_shard_bytes`` each."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != size:
            tensor = tensor.clone()  # a view: save its own bytes, not its base's
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.dir / f"shard-{len(self._shards) + 1:05d}.partial"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> dict:
        """Write the last shard, give the shards their final names, write the index."""
        if self._buffer or not self._shards:
            self._flush()
        total = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.partial", self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return index
