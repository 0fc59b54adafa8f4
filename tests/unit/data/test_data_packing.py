"""Packing: properties of first-fit-decreasing and of packed batches, and packed == padded
per-token losses on a tiny Llama (no attention or loss across sample boundaries)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mswift.data import (
    IGNORE_INDEX,
    EncodedSample,
    WindowPacker,
    block_causal_mask,
    collate_rows,
    first_fit_decreasing,
)


def make_sample(sample_id: int, length: int, rng: np.random.Generator) -> EncodedSample:
    """A sample whose first token is its id (ids are >= 1000, other tokens < 1000)."""
    ids = rng.integers(1, 1000, size=length)
    ids[0] = 1000 + sample_id
    mask = rng.random(length) < 0.6
    return EncodedSample(ids.astype(np.int64), mask)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=0, max_size=80),
       capacity=st.integers(64, 200))
def test_first_fit_decreasing_places_every_item_once_within_capacity(lengths, capacity):
    bins = first_fit_decreasing(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # first-fit never leaves two bins that could have been one
    fills = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(fills) < 2 or fills[0] + fills[1] > capacity


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(lengths=st.lists(st.integers(2, 48), min_size=1, max_size=60),
       window=st.integers(1, 20), micro_batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_packed_batches_keep_every_sample_once_and_are_consistent(lengths, window,
                                                                  micro_batch, seed):
    max_length = 48
    rng = np.random.default_rng(seed)
    samples = [make_sample(i, n, rng) for i, n in enumerate(lengths)]
    packer = WindowPacker(max_length, window)
    groups = []
    for sample in samples:
        packer.add(sample)
        while (group := packer.pop_ready()) is not None:
            groups.append(group)
    packer.flush()
    while (group := packer.pop_ready()) is not None:
        groups.append(group)
    seen = []
    for start in range(0, len(groups), micro_batch):
        rows = groups[start:start + micro_batch]
        batch = collate_rows(rows, max_length, pad_id=0)
        seen += check_batch(batch, rows, max_length)
    assert sorted(seen) == list(range(len(samples)))


def check_batch(batch, rows, max_length):
    """Checks a packed batch against its samples; returns the sample ids it holds."""
    flat = {k: batch[k].reshape(-1) for k in ("input_ids", "labels", "loss_mask", "position_ids")}
    cu = batch["cu_seqlens"].tolist()
    assert batch["cu_seqlens"].dtype == torch.int32
    assert cu[0] == 0 and cu[-1] == len(rows) * max_length
    assert all(b > a for a, b in zip(cu, cu[1:]))
    assert int(batch["max_seqlen"]) == max(b - a for a, b in zip(cu, cu[1:]))
    segments = iter(zip(cu, cu[1:]))
    ids = []
    for row_number, samples in enumerate(rows):
        row_start = row_number * max_length
        assert sum(len(s) for s in samples) <= max_length
        for sample in samples:
            begin, end = next(segments)
            assert begin >= row_start and end - begin == len(sample)
            assert flat["input_ids"][begin:end].tolist() == sample.input_ids.tolist()
            assert flat["position_ids"][begin:end].tolist() == list(range(len(sample)))
            for t in range(len(sample)):
                target = t + 1 < len(sample) and sample.target_mask[t + 1]
                expected = sample.input_ids[t + 1] if target else IGNORE_INDEX
                assert flat["labels"][begin + t] == expected
                assert flat["loss_mask"][begin + t] == float(target)
            ids.append(int(sample.input_ids[0]) - 1000)
        used = sum(len(s) for s in samples)
        if used < max_length:  # the padding is one segment of its own, with no loss
            begin, end = next(segments)
            assert (begin, end) == (row_start + used, row_start + max_length)
            assert flat["loss_mask"][begin:end].sum() == 0
    assert next(segments, None) is None
    return ids


def test_packing_beats_padding_on_long_tailed_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(60), 0.8, size=600).astype(int), 2, 512)
    samples = [make_sample(i, int(n), rng) for i, n in enumerate(lengths)]
    packer = WindowPacker(512, 200)
    for sample in samples:
        packer.add(sample)
    packer.flush()
    groups = list(iter(packer.pop_ready, None))
    real = sum(len(s) for s in samples)
    assert real / (len(groups) * 512) > 0.97
    assert real / (len(samples) * 512) < 0.25  # what padding each sample would give


def block_additive_mask(batch) -> torch.Tensor:
    """[batch, 1, L, L] additive float mask: each row's segments attend only within themselves."""
    rows, length = batch["input_ids"].shape
    full = block_causal_mask(batch["cu_seqlens"], rows * length)
    blocks = torch.stack([full[r * length:(r + 1) * length, r * length:(r + 1) * length]
                          for r in range(rows)])
    additive = torch.zeros(blocks.shape, dtype=torch.float32)
    additive[~blocks] = torch.finfo(torch.float32).min
    return additive[:, None]


def per_token_losses(model, batch, attention_mask):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=attention_mask).logits
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none")
    return losses.reshape(batch["labels"].shape)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1200, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def test_packed_losses_equal_one_by_one_losses(tiny_llama):
    rng = np.random.default_rng(1)
    samples = [make_sample(i, n, rng) for i, n in enumerate([17, 5, 30, 9, 22, 12, 40])]
    max_length = 64
    groups = first_fit_decreasing([len(s) for s in samples], max_length)
    packed = collate_rows([[samples[i] for i in g] for g in groups], max_length, pad_id=0)
    with torch.no_grad():
        packed_losses = per_token_losses(tiny_llama, packed, block_additive_mask(packed))
        leaky_losses = per_token_losses(tiny_llama, packed, None)  # plain causal attention
    offsets = {}
    for row, group in enumerate(groups):
        start = 0
        for i in group:
            offsets[i] = (row, start)
            start += len(samples[i])
    differs_without_blocks = False
    for i, sample in enumerate(samples):
        alone = collate_rows([[sample]], len(sample), pad_id=0)
        with torch.no_grad():
            reference = per_token_losses(tiny_llama, alone, None)[0]
        row, start = offsets[i]
        mask = alone["loss_mask"][0].bool()
        got = packed_losses[row, start:start + len(sample)]
        torch.testing.assert_close(got[mask], reference[mask], rtol=1e-5, atol=1e-5)
        packed_mask = packed["loss_mask"][row, start:start + len(sample)]
        assert torch.equal(packed_mask, alone["loss_mask"][0])
        leaky = leaky_losses[row, start:start + len(sample)]
        differs_without_blocks |= not torch.allclose(leaky[mask], reference[mask], atol=1e-4)
    # The check is sensitive: without the block mask, later samples see earlier ones.
    assert differs_without_blocks


def test_padded_path_gives_one_sample_per_row(tiny_llama):
    rng = np.random.default_rng(2)
    samples = [make_sample(i, n, rng) for i, n in enumerate([6, 11, 3])]
    padded = collate_rows([[s] for s in samples], 16, pad_id=0)
    assert padded["attention_mask"].sum(1).tolist() == [6, 11, 3]
    assert padded["cu_seqlens"].tolist() == [0, 6, 16, 27, 32, 35, 48]
    with torch.no_grad():
        losses = per_token_losses(tiny_llama, padded, block_additive_mask(padded))
    for row, sample in enumerate(samples):
        alone = collate_rows([[sample]], len(sample), pad_id=0)
        with torch.no_grad():
            reference = per_token_losses(tiny_llama, alone, None)[0]
        mask = alone["loss_mask"][0].bool()
        torch.testing.assert_close(losses[row, :len(sample)][mask], reference[mask],
                                   rtol=1e-5, atol=1e-5)
