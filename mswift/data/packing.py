"""Packing encoded samples into fixed-length sequences, and the padded alternative.

A packed row holds whole samples back to back, then padding up to max_length. Within each
sample, position ids restart at 0 and labels are the next token of the same sample; the last
token of a sample predicts nothing, so no loss crosses a boundary. `cu_seqlens` gives the
boundaries over the flattened micro-batch [micro_batch * max_length]: the samples of each row,
then the row's padding as one more segment, so the segments tile the whole batch (the THD
layout varlen attention reads). Attention must stay within a segment; `block_causal_mask`
builds that mask for attention code that takes a dense one.

Placement is first-fit-decreasing over a window of samples: the window is sorted longest
first, each sample goes into the first open sequence with room, and every sequence but the
least filled is emitted; the least filled one's samples wait for the next window.
"""
from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import numpy as np
import torch

from mswift.data.encode import EncodedSample

IGNORE_INDEX = -100


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity (each length must
    be <= capacity). Bins are returned in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"sample of {size} tokens does not fit max_length={capacity}")
        for number, space in enumerate(room):
            if size <= space:
                bins[number].append(index)
                room[number] -= size
                break
        else:
            bins.append([index])
            room.append(capacity - size)
    return bins


class WindowPacker:
    """Streaming first-fit-decreasing: `add` samples, `pop_ready` packed groups of samples."""

    def __init__(self, max_length: int, window: int):
        self.max_length = max_length
        self.window = window
        self.pending: list[EncodedSample] = []
        self.ready: deque[list[EncodedSample]] = deque()

    def add(self, sample: EncodedSample) -> None:
        assert len(sample) <= self.max_length, "overlong samples are cut or dropped before"
        self.pending.append(sample)
        if len(self.pending) >= self.window:
            self._pack(keep_least_filled=True)

    def flush(self) -> None:
        """Pack everything left (end of data)."""
        if self.pending:
            self._pack(keep_least_filled=False)

    def pop_ready(self) -> Optional[list[EncodedSample]]:
        return self.ready.popleft() if self.ready else None

    def _pack(self, keep_least_filled: bool) -> None:
        bins = first_fit_decreasing([len(s) for s in self.pending], self.max_length)
        kept: list[int] = []
        if keep_least_filled and len(bins) > 1:
            fills = [sum(len(self.pending[i]) for i in b) for b in bins]
            kept = bins.pop(int(np.argmin(fills)))
        for group in bins:
            self.ready.append([self.pending[i] for i in group])
        self.pending = [self.pending[i] for i in kept]

    def state_dict(self) -> dict:
        return {"pending": [s.to_state() for s in self.pending],
                "ready": [[s.to_state() for s in group] for group in self.ready]}

    def load_state_dict(self, state: dict) -> None:
        self.pending = [EncodedSample.from_state(s) for s in state["pending"]]
        self.ready = deque([EncodedSample.from_state(s) for s in group]
                           for group in state["ready"])


def sample_labels(sample: EncodedSample) -> np.ndarray:
    """labels[t] = input_ids[t + 1] where that token is a target, else IGNORE_INDEX."""
    labels = np.full(len(sample), IGNORE_INDEX, dtype=np.int64)
    targets = sample.target_mask[1:]
    labels[:-1][targets] = sample.input_ids[1:][targets]
    return labels


def _fill_row(samples: list[EncodedSample], max_length: int, pad_id: int):
    """One row of the batch: ids, labels, positions and segment lengths (padding last)."""
    input_ids = np.full(max_length, pad_id, dtype=np.int64)
    labels = np.full(max_length, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(max_length, dtype=np.int64)
    segments, cursor = [], 0
    for sample in samples:
        end = cursor + len(sample)
        input_ids[cursor:end] = sample.input_ids
        labels[cursor:end] = sample_labels(sample)
        position_ids[cursor:end] = np.arange(len(sample))
        segments.append(len(sample))
        cursor = end
    if cursor < max_length:
        position_ids[cursor:] = np.arange(max_length - cursor)
        segments.append(max_length - cursor)
    return input_ids, labels, position_ids, segments


def collate_rows(rows: list[list[EncodedSample]], max_length: int, pad_id: int,
                 packed: bool = True) -> dict:
    """A micro-batch from rows of samples (a packed group, or one sample per row).

    Returns input_ids / labels / position_ids [rows, max_length] int64, loss_mask
    [rows, max_length] float32, attention_mask [rows, max_length] bool (False on padding, which
    is always at the end of a row). With ``packed`` also cu_seqlens [segments + 1] int32 over the
    flattened batch and max_seqlen (0-d int32); without it the batch is plain padded rows for a
    causal mask (every attention backend, megatron-core's own included).
    """
    columns = [_fill_row(samples, max_length, pad_id) for samples in rows]
    input_ids = torch.from_numpy(np.stack([c[0] for c in columns]))
    labels = torch.from_numpy(np.stack([c[1] for c in columns]))
    position_ids = torch.from_numpy(np.stack([c[2] for c in columns]))
    segment_lengths = [length for c in columns for length in c[3]]
    cu_seqlens = torch.zeros(len(segment_lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(segment_lengths, dtype=torch.int32), 0)
    real_tokens = [sum(len(s) for s in samples) for samples in rows]
    attention_mask = torch.arange(max_length)[None, :] < torch.tensor(real_tokens)[:, None]
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).to(torch.float32),
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }
    if packed:
        batch["cu_seqlens"] = cu_seqlens
        batch["max_seqlen"] = torch.tensor(max(segment_lengths), dtype=torch.int32)
    return batch


def block_causal_mask(cu_seqlens: torch.Tensor, total_length: int) -> torch.Tensor:
    """[total_length, total_length] bool: query i may attend key j iff both lie in the same
    segment of cu_seqlens and j <= i."""
    positions = torch.arange(total_length)
    segment = torch.bucketize(positions, cu_seqlens[1:].to(torch.int64), right=True)
    same_segment = segment[:, None] == segment[None, :]
    return same_segment & (positions[None, :] <= positions[:, None])


def packing_efficiency(batch: dict) -> float:
    """Share of the batch's token slots that hold sample tokens (not padding)."""
    return float(batch["attention_mask"].float().mean())
