"""Reading rows from local files, in a fixed order, with the file and line of each row.

- .jsonl files are read line by line here (a line that is not UTF-8 or not JSON is one bad
  row, not a failed file); a row is parsed only when a rank asks for it.
- .json / .parquet / .csv files and folders without such files go through
  `datasets.load_dataset` (memory-mapped Arrow); a row's place is "row N" (csv: "line N").
- A folder is read file by file in sorted path order.

`MixedRows` interleaves several sources, each repeated or thinned by its ratio, drawing the
next source with probability proportional to the rows it has left, so all run out together.
Its position is a handful of integers plus a random generator state (`state_dict`), and a
restored stream re-reads (without parsing) up to the saved position.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from mswift.data.formats import BadRowError

JSONL_SUFFIX = ".jsonl"
DATASETS_SUFFIXES = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class RawRow:
    """A row not parsed yet: `load()` returns the row dict or raises BadRowError."""
    where: str
    payload: Any
    is_json_line: bool = False

    def load(self) -> dict:
        if not self.is_json_line:
            return self.payload
        try:
            text = self.payload.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRowError(self.where, f"line is not UTF-8 ({error.reason} at byte "
                                          f"{error.start})") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise BadRowError(self.where, f"line is not JSON ({error.msg})") from None


def list_data_files(path: str) -> list[Path]:
    """The files a dataset path stands for, in reading order."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"dataset path {path!r} does not exist")
    if root.is_file():
        return [root]
    known = (JSONL_SUFFIX,) + tuple(DATASETS_SUFFIXES)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(known))
    return files or [root]


def _iter_jsonl(path: Path) -> Iterator[RawRow]:
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield RawRow(f"{path}:{line_number}", line, is_json_line=True)


def _load_with_datasets(path: Path):
    import datasets  # deferred: importing datasets costs a second

    builder = DATASETS_SUFFIXES.get(path.suffix)
    if builder is None:  # a folder datasets knows how to read
        loaded = datasets.load_dataset(str(path))
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _iter_with_datasets(path: Path) -> Iterator[RawRow]:
    table = _load_with_datasets(path)
    first_line = 2 if path.suffix == ".csv" else 1  # a csv row N sits on line N+1
    label = "line" if path.suffix == ".csv" else "row"
    for index, row in enumerate(table):
        yield RawRow(f"{path}:{label} {index + first_line}", row)


def iter_file_rows(path: Path) -> Iterator[RawRow]:
    if path.name.endswith(JSONL_SUFFIX):
        return _iter_jsonl(path)
    return _iter_with_datasets(path)


def count_rows(path: Path) -> int:
    if path.name.endswith(JSONL_SUFFIX):
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    return len(_load_with_datasets(path))


class SourceRows:
    """The rows of one dataset path for one epoch, each repeated floor((k+1)r) - floor(kr)
    times for row k, so `ratio` passes are made over the data (0.5 keeps every other row)."""

    def __init__(self, path: str, ratio: float = 1.0):
        self.path = path
        self.ratio = ratio
        self.files = list_data_files(path)
        self.num_rows = sum(count_rows(f) for f in self.files)
        self.num_items = math.floor(self.num_rows * ratio + 1e-9)

    def __iter__(self) -> Iterator[RawRow]:
        row_index = 0
        for file in self.files:
            for row in iter_file_rows(file):
                copies = (math.floor((row_index + 1) * self.ratio + 1e-9)
                          - math.floor(row_index * self.ratio + 1e-9))
                for _ in range(copies):
                    yield row
                row_index += 1


class MixedRows:
    """The rows of several sources for every epoch, interleaved by a seeded draw.

    `next_row()` returns (epoch, position_in_epoch, RawRow) of the current epoch and raises
    StopIteration at its end; `next_epoch()` starts the next one (False after `num_epochs`
    epochs, never when num_epochs is None). The reader never crosses an epoch boundary by
    itself, so a consumer can finish an epoch (drain its buffers) before the next begins.
    """

    def __init__(self, sources: list[SourceRows], seed: int, num_epochs: Optional[int] = None):
        if not sources:
            raise ValueError("data.datasets is empty: name at least one dataset path")
        if sum(s.num_items for s in sources) == 0:
            raise ValueError("the datasets hold no rows: "
                             + ", ".join(f"{s.path} ({s.num_rows} rows)" for s in sources))
        self.sources = sources
        self.seed = seed
        self.num_epochs = num_epochs
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self.taken = [0] * len(self.sources)
        self._rng = np.random.default_rng([self.seed, epoch])
        self._iterators = [iter(source) for source in self.sources]

    def _draw_source(self) -> int:
        left = np.asarray([s.num_items - t for s, t in zip(self.sources, self.taken)],
                          dtype=np.float64)
        if len(left) == 1:
            return 0
        return int(self._rng.choice(len(left), p=left / left.sum()))

    def next_epoch(self) -> bool:
        if self.num_epochs is not None and self.epoch + 1 >= self.num_epochs:
            return False
        self._start_epoch(self.epoch + 1)
        return True

    def next_row(self) -> tuple[int, int, RawRow]:
        if self.position == sum(s.num_items for s in self.sources):
            raise StopIteration
        index = self._draw_source()
        row = next(self._iterators[index])
        self.taken[index] += 1
        self.position += 1
        return self.epoch, self.position - 1, row

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": list(self.taken),
                "rng": self._rng.bit_generator.state,
                "num_items": [s.num_items for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        now = [source.num_items for source in self.sources]
        if state["num_items"] != now:
            raise ValueError(f"the datasets changed since the state was saved: rows per source "
                             f"{state['num_items']} then, {now} now")
        self._start_epoch(state["epoch"])
        self._rng.bit_generator.state = state["rng"]
        for index, taken in enumerate(state["taken"]):
            for _ in range(taken):  # re-read to the saved place; rows are not parsed
                next(self._iterators[index])
        self.taken = list(state["taken"])
        self.position = sum(self.taken)


def open_sources(paths: list[str], ratios: list[float]) -> list[SourceRows]:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ValueError(f"data.datasets: no such file or folder: {', '.join(missing)}")
    return [SourceRows(path, ratio) for path, ratio in zip(paths, ratios)]
