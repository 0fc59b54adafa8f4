"""Streaming pipeline: sharding across data-parallel ranks, dataset mixing ratios, and exact
resume from state_dict() (through torch.save) across an epoch boundary."""
import io
import json

import pytest
import torch

from mswift.data import DataPipeline, PipelineOptions

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()


def write_chat_rows(path, count, tag):
    """Rows whose user turn names the row ("<tag> row <i>") so batches can be traced back."""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + (i * 7) % 23))
            row = {"messages": [{"role": "user", "content": f"{tag} row {i}"},
                                {"role": "assistant", "content": answer}]}
            handle.write(json.dumps(row) + "\n")
    return str(path)


def row_names(tokenizer, batch):
    """The '<tag> row <i>' of every sample in a batch (found in the decoded tokens)."""
    text = tokenizer.decode(batch["input_ids"].reshape(-1).tolist())
    names = []
    for part in text.split("<|im_start|>user\n")[1:]:
        names.append(part.split("<|im_end|>")[0])
    return names


def config(paths, **overrides):
    values = dict(datasets=paths, max_length=160, packing_window=6, shuffle_buffer=8,
                  micro_batch_size=2, seed=7)
    values.update(overrides)
    return PipelineOptions(**values)


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer):
    return real_tokenizer("qwen2_5")


def test_each_row_once_per_epoch_on_exactly_one_rank(tmp_path, tokenizer):
    paths = [write_chat_rows(tmp_path / "a.jsonl", 23, "a"),
             write_chat_rows(tmp_path / "b.jsonl", 14, "b")]
    seen = []
    for rank in range(2):
        pipeline = DataPipeline(config(paths, num_epochs=1), tokenizer, dp_rank=rank, dp_size=2)
        names = [name for batch in pipeline for name in row_names(tokenizer, batch)]
        assert len(names) == len(set(names))
        seen.append(set(names))
    assert not seen[0] & seen[1]
    expected = {f"a row {i}" for i in range(23)} | {f"b row {i}" for i in range(14)}
    assert seen[0] | seen[1] == expected
    assert abs(len(seen[0]) - len(seen[1])) <= 1


@pytest.mark.parametrize("packing", [True, False])
def test_epochs_do_not_mix_with_the_default_buffers(tmp_path, tokenizer, packing):
    """50 rows, 4 epochs, 2 ranks, the default shuffle_buffer (10000) and packing_window
    (1000), both far larger than the data: each rank's stream is its 25 rows once per epoch,
    epoch after epoch, and no packed sequence holds one row twice."""
    paths = [write_chat_rows(tmp_path / "a.jsonl", 50, "a")]
    defaults = PipelineOptions()
    settings = PipelineOptions(datasets=paths, max_length=512, micro_batch_size=2, seed=7,
                               num_epochs=4, packing=packing)
    assert (settings.shuffle_buffer, settings.packing_window) == (
        defaults.shuffle_buffer, defaults.packing_window) == (10000, 1000)
    epochs = []
    for rank in range(2):
        streams, most = [], 0
        for batch in DataPipeline(settings, tokenizer, dp_rank=rank, dp_size=2):
            for row in batch["input_ids"]:
                names = row_names(tokenizer, {"input_ids": row})
                assert len(names) == len(set(names)), f"rank {rank}: a row twice in {names}"
                streams += names
                most = max(most, len(names))
        assert most > 2 if packing else most == 1
        assert len(streams) == 4 * 25
        epochs.append([streams[start:start + 25] for start in range(0, 100, 25)])
    for rank, own in enumerate(epochs):
        expected = {f"a row {i}" for i in range(rank, 50, 2)}
        for number, epoch in enumerate(own):
            assert sorted(epoch) == sorted(expected), f"rank {rank} epoch {number}"
        assert own[0] != own[1]  # reshuffled every epoch
    assert sorted(epochs[0][0] + epochs[1][0]) == sorted(f"a row {i}" for i in range(50))


def test_dataset_ratios_repeat_and_thin(tmp_path, tokenizer):
    paths = [write_chat_rows(tmp_path / "a.jsonl", 6, "a"),
             write_chat_rows(tmp_path / "b.jsonl", 10, "b")]
    pipeline = DataPipeline(config(paths, num_epochs=1, dataset_ratios=[2.0, 0.5]), tokenizer)
    names = [name for batch in pipeline for name in row_names(tokenizer, batch)]
    assert sorted(names) == sorted([f"a row {i}" for i in range(6)] * 2
                                   + [f"b row {i}" for i in (1, 3, 5, 7, 9)])


def batches_equal(left, right):
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_repeats_the_uninterrupted_batches(tmp_path, tokenizer, packing):
    paths = [write_chat_rows(tmp_path / "a.jsonl", 19, "a"),
             write_chat_rows(tmp_path / "b.jsonl", 9, "b")]
    per_rank_epoch = 14  # 28 rows over 2 ranks
    settings = config(paths, packing=packing, num_epochs=3)
    skip, check = (1, 5) if packing else (3, 10)
    for rank in range(2):
        reference = DataPipeline(settings, tokenizer, dp_rank=rank, dp_size=2)
        expected = [next(reference) for _ in range(skip + check)]
        before = sum(len(row_names(tokenizer, b)) for b in expected[:skip])
        total = sum(len(row_names(tokenizer, b)) for b in expected)
        # the state is saved inside epoch 0 and the checked batches run into epoch 1
        assert before < per_rank_epoch < total - 2

        first = DataPipeline(settings, tokenizer, dp_rank=rank, dp_size=2)
        for _ in range(skip):
            next(first)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        next(first)  # the saved state must not move with the pipeline
        buffer.seek(0)

        resumed = DataPipeline(settings, tokenizer, dp_rank=rank, dp_size=2)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        for number, batch in enumerate(expected[skip:]):
            assert batches_equal(next(resumed), batch), f"rank {rank} batch {skip + number}"


def test_resume_after_the_reader_crossed_into_the_next_epoch(tmp_path, tokenizer):
    paths = [write_chat_rows(tmp_path / "a.jsonl", 11, "a")]
    settings = config(paths, num_epochs=8, shuffle_buffer=4, packing_window=3)
    reference = DataPipeline(settings, tokenizer)
    expected = [next(reference) for _ in range(9)]
    first = DataPipeline(settings, tokenizer)
    for _ in range(4):
        next(first)
    assert first.rows.epoch >= 1
    resumed = DataPipeline(settings, tokenizer)
    resumed.load_state_dict(first.state_dict())
    assert all(batches_equal(next(resumed), batch) for batch in expected[4:])


def test_state_of_another_rank_is_refused(tmp_path, tokenizer):
    paths = [write_chat_rows(tmp_path / "a.jsonl", 5, "a")]
    state = DataPipeline(config(paths), tokenizer, dp_rank=0, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="keep the data-parallel size"):
        DataPipeline(config(paths), tokenizer, dp_rank=0, dp_size=4).load_state_dict(state)


def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    paths = [write_chat_rows(tmp_path / "a.jsonl", 12, "a")]
    lengths = []
    for overlong in ("truncate", "drop"):
        pipeline = DataPipeline(config(paths, max_length=40, overlong=overlong, num_epochs=1,
                                       shuffle_buffer=0), tokenizer)
        batches = list(pipeline)
        lengths.append(sum(int(b["attention_mask"].sum()) for b in batches))
        assert all(b["input_ids"].shape[1] == 40 for b in batches)
        counter = "overlong_truncated" if overlong == "truncate" else "overlong_dropped"
        assert pipeline.stats[counter] > 0
        assert pipeline.stats["samples"] + pipeline.stats.get("overlong_dropped", 0) == 12
    assert lengths[1] < lengths[0]
