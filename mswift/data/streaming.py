"""The streaming data pipeline: rows -> this rank's samples -> shuffle buffer -> packing ->
micro-batches, resumable at the exact next sample.

Sharding: the i-th row of an epoch's mixed stream belongs to data-parallel rank i % dp_size,
so every row is used once per epoch, by exactly one rank. Every rank reads the stream but
parses and tokenizes only its own rows.

Resuming: `state_dict()` holds the stream position (epoch, rows taken per source, the mixing
generator), the shuffle buffer's generator and contents, the packer's waiting samples and the
counters; a new pipeline given it with `load_state_dict()` yields exactly the batches the
saved one would have yielded next.

Epochs do not mix (as with Megatron-LM's per-epoch shuffle): at the end of an epoch's rows the
shuffle buffer is drained and the packing window flushed before the next epoch is read, so
neither ever holds two copies of one row, however small the dataset is next to
shuffle_buffer and packing_window. A micro-batch may still hold the last sequences of one
epoch and the first of the next.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterator, Optional

import numpy as np

from mswift.data.encode import EncodedSample, SampleEncoder
from mswift.data.formats import BadRowError, row_to_example
from mswift.data.options import PipelineOptions
from mswift.data.packing import WindowPacker, collate_rows
from mswift.data.sources import MixedRows, open_sources

STATE_VERSION = 2  # 1: epochs ran into each other (a different stream)


class ShuffleBuffer:
    """Holds up to `capacity` samples and hands out a random one (seeded); capacity 0 keeps
    the input order."""

    def __init__(self, capacity: int, seed: list[int]):
        self.capacity = capacity
        self.items: list[EncodedSample] = []
        self._rng = np.random.default_rng(seed)

    def full(self) -> bool:
        return len(self.items) >= max(self.capacity, 1)

    def push(self, sample: EncodedSample) -> None:
        self.items.append(sample)

    def pop(self) -> Optional[EncodedSample]:
        if not self.items:
            return None
        if self.capacity == 0:
            return self.items.pop(0)
        index = int(self._rng.integers(len(self.items)))
        self.items[index], self.items[-1] = self.items[-1], self.items[index]
        return self.items.pop()

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state, "items": [s.to_state() for s in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.items = [EncodedSample.from_state(s) for s in state["items"]]


class DataPipeline:
    """Iterable of micro-batches (see packing.collate_rows) for one data-parallel rank."""

    def __init__(self, config: PipelineOptions, tokenizer, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside 0..{dp_size - 1} (dp_size={dp_size})")
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rows = MixedRows(open_sources(config.datasets, config.ratios()), config.seed,
                              config.num_epochs)
        self.encoder = SampleEncoder(tokenizer, config.template, config.loss_on,
                                     config.append_eos)
        self.shuffle = ShuffleBuffer(config.shuffle_buffer, [config.seed, dp_rank, 1])
        self.packer = WindowPacker(config.max_length, config.packing_window)
        pad_id = tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)
        self.stats: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self.config.micro_batch_size:
            group = self._next_group()
            if group is None:
                break
            rows.append(group)
        if not rows:
            raise StopIteration
        self.stats["batches"] += 1
        self.stats["sequences"] += len(rows)
        return collate_rows(rows, self.config.max_length, self.pad_id,
                            packed=self.config.packing)

    # -- stages, last to first ------------------------------------------------------------

    def _next_group(self) -> Optional[list[EncodedSample]]:
        while True:
            group = self._next_group_of_epoch()
            if group is not None:
                return group
            self._check_not_empty()
            if not self.rows.next_epoch():
                return None

    def _next_group_of_epoch(self) -> Optional[list[EncodedSample]]:
        """The next sequence of the current epoch; None once its rows, the shuffle buffer and
        the packer are all used up."""
        if not self.config.packing:
            sample = self._next_shuffled()
            return None if sample is None else [sample]
        while True:
            group = self.packer.pop_ready()
            if group is not None:
                return group
            sample = self._next_shuffled()
            if sample is None:
                self.packer.flush()
                return self.packer.pop_ready()
            self.packer.add(sample)

    def _next_shuffled(self) -> Optional[EncodedSample]:
        while not self.shuffle.full():
            sample = self._next_own_sample()
            if sample is None:  # the epoch's rows are read: drain the buffer
                break
            self.shuffle.push(sample)
        return self.shuffle.pop()

    def _next_own_sample(self) -> Optional[EncodedSample]:
        while True:
            try:
                _, position, raw = self.rows.next_row()
            except StopIteration:
                return None
            if position % self.dp_size != self.dp_rank:
                continue
            self.stats["rows"] += 1
            sample = self._encode(raw)
            if sample is not None:
                return sample

    def _encode(self, raw) -> Optional[EncodedSample]:
        try:
            example = row_to_example(raw.load(), self.config.row_format, self.config.text_key,
                                     raw.where)
            try:
                sample = self.encoder.encode(example)
            except BadRowError:
                raise
            except ValueError as error:  # a row the template cannot render
                raise BadRowError(raw.where, str(error)) from None
        except BadRowError:
            if self.config.on_bad_row == "error":
                raise
            self.stats["bad_rows_skipped"] += 1
            return None
        return self._fit_length(sample)

    def _fit_length(self, sample: EncodedSample) -> Optional[EncodedSample]:
        limit = self.config.max_length
        if len(sample) > limit:
            if self.config.overlong == "drop":
                self.stats["overlong_dropped"] += 1
                return None
            self.stats["overlong_truncated"] += 1
            sample = EncodedSample(sample.input_ids[:limit], sample.target_mask[:limit])
        if not sample.target_mask[1:].any():
            self.stats["no_loss_tokens_dropped"] += 1
            return None
        self.stats["samples"] += 1
        self.stats["tokens"] += len(sample)
        return sample

    def _check_not_empty(self) -> None:
        if self.stats["samples"] == 0:
            raise ValueError(
                f"no usable samples in {', '.join(self.config.datasets)} for data-parallel rank "
                f"{self.dp_rank} of {self.dp_size} after a full pass: "
                f"{dict(self.stats) or 'no rows'}")

    # -- resuming -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "rows": self.rows.state_dict(),
                "shuffle": self.shuffle.state_dict(), "packer": self.packer.state_dict(),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data pipeline state version {state.get('version')!r}: expected "
                             f"{STATE_VERSION}")
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.dp_size):
            raise ValueError(
                f"data state saved by rank {state['dp_rank']} of {state['dp_size']} cannot "
                f"resume rank {self.dp_rank} of {self.dp_size}: keep the data-parallel size")
        self.rows.load_state_dict(state["rows"])
        self.shuffle.load_state_dict(state["shuffle"])
        self.packer.load_state_dict(state["packer"])
        self.stats = Counter(state["stats"])
