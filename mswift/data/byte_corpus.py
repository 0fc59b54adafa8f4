"""The simplest real data source: text files read as UTF-8 bytes, one token per byte (vocab 256).

It needs no tokenizer, so the bundled example and the layout tests train on real text without
any download. Samples are consecutive windows of ``seq_length + 1`` bytes; each epoch visits them
in a seeded random order. Batches are a pure function of the step number, so a resumed run sees
exactly the samples the uninterrupted run would have seen.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB_SIZE = 256


class ByteCorpus:
    def __init__(self, paths: list[str], seq_length: int, seed: int = 1234):
        if not paths:
            raise ValueError("dataset: expected at least one text file")
        chunks = []
        for path in paths:
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"dataset file {path}: not found")
            chunks.append(p.read_bytes())
        self.data = np.frombuffer(b"\n".join(chunks), dtype=np.uint8)
        self.seq_length = seq_length
        self.seed = seed
        self.num_samples = (len(self.data) - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(
                f"dataset {', '.join(paths)}: {len(self.data)} bytes is shorter than one sample "
                f"of seq_length + 1 = {seq_length + 1} bytes"
            )
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders = {epoch: rng.permutation(self.num_samples)}
        return self._orders[epoch]

    def sample(self, global_index: int) -> torch.Tensor:
        """The ``global_index``-th sample of the run (epochs follow each other): [seq_length+1]."""
        epoch, pos = divmod(global_index, self.num_samples)
        start = int(self._order(epoch)[pos]) * self.seq_length
        return torch.from_numpy(self.data[start:start + self.seq_length + 1].astype(np.int64))

    def micro_batches(
        self, step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[dict]:
        """This data-parallel rank's micro-batches of step ``step`` (Megatron-LM's order)."""
        per_micro = micro_batch_size * dp_size
        num_micro = global_batch_size // per_micro
        batches = []
        for j in range(num_micro):
            first = step * global_batch_size + j * per_micro + dp_rank * micro_batch_size
            seqs = torch.stack([self.sample(first + i) for i in range(micro_batch_size)])
            tokens = seqs[:, :-1].contiguous()  # [batch, seq]
            batches.append({
                "tokens": tokens,
                "labels": seqs[:, 1:].contiguous(),
                "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
                "position_ids": torch.arange(self.seq_length).expand_as(tokens).contiguous(),
            })
        return batches
