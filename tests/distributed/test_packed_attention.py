"""Packed sequences through megatron-core with mswift's varlen core attention.

- No leakage: per-token losses of a packed micro-batch equal those of each sample run alone.
- The Triton backend (interpreter on CPU) trains to the same losses as the torch reference.

Both checks of both backends run in one spawned rank, one after the other.
"""
from pathlib import Path

import numpy as np
import pytest

from mswift.testing import run_ranks

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_corpus.txt"
MODEL = ["num_layers=2", "hidden_size=64", "ffn_hidden_size=128", "num_attention_heads=4",
         "num_query_groups=2", "vocab_size=256", "max_position_embeddings=128",
         f"dataset=[{CORPUS}]", "seq_length=48", "micro_batch_size=2", "train_iters=3",
         "lr=1e-3", "seed=11"]
LENGTHS = [[20, 13, 9], [31, 17], [5, 40], [48], [7, 7, 7, 7], [25, 22]]  # samples per row


def packed_micro_batches(max_length=48, rows_per_batch=2):
    """Rows of real text samples (variable length) packed with the data pipeline's collate."""
    from mswift.data.encode import EncodedSample
    from mswift.data.packing import collate_rows

    data = np.frombuffer(CORPUS.read_bytes(), dtype=np.uint8).astype(np.int64)
    rows, cursor = [], 0
    for lengths in LENGTHS:
        row = []
        for n in lengths:
            ids = data[cursor:cursor + n]
            cursor += n
            row.append(EncodedSample(ids, np.ones(n, dtype=bool)))
        rows.append(row)
    return [collate_rows(rows[i:i + rows_per_batch], max_length, pad_id=0)
            for i in range(0, len(rows), rows_per_batch)], rows


def per_token_losses(model, batch):
    import torch

    from mswift.train.step import model_inputs

    with torch.no_grad():
        return model(**model_inputs(batch)).reshape(-1)


def no_leak_body(backend):
    import torch

    from mswift.config import load_config
    from mswift.data.packing import collate_rows
    from mswift.train.loop import setup

    state = setup(load_config(None, MODEL + [f"attention_backend={backend}"]))
    model = state.model[0].module
    model.eval()
    batches, rows = packed_micro_batches()
    packed = per_token_losses(model, batches[0])  # rows 0 and 1, flattened
    mask = batches[0]["loss_mask"].reshape(-1).bool()
    alone = []
    for row in rows[:2]:
        for sample in row:  # one sample per call, unpacked: [1, len]
            single = collate_rows([[sample]], len(sample), pad_id=0)
            del single["cu_seqlens"]
            losses = per_token_losses(model, single)
            alone.append(losses[single["loss_mask"].reshape(-1).bool()])
    return packed[mask], torch.cat(alone)


def train_packed_body(backend):
    from mswift.config import load_config
    from mswift.train.loop import setup
    from mswift.train.step import train_step

    state = setup(load_config(None, MODEL + [f"attention_backend={backend}"]))
    batches, _ = packed_micro_batches(rows_per_batch=1)
    losses = []
    for step in range(3):  # 2 packed micro-batches (one row each) per step
        losses.append(train_step(state, batches[2 * step:2 * step + 2])["loss"])
    return losses


BACKENDS = ("torch", "triton")


def every_case():
    return {backend: (no_leak_body(backend), train_packed_body(backend)) for backend in BACKENDS}


@pytest.fixture(scope="module")
def results():
    return run_ranks(1, every_case)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_one_by_one(results, backend):
    import torch

    packed, alone = results[backend][0]
    assert packed.shape == alone.shape and packed.numel() == 20 + 13 + 9 + 31 + 17 - 5
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_triton_backend_trains_like_torch_reference(results):
    want, got = results["torch"][1], results["triton"][1]
    assert want[0] > want[-1], want
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= 1e-5 * abs(w), f"step {step}: triton {g!r} vs torch {w!r}"
