"""Row formats, input files of every kind, bad rows, and PipelineOptions validation."""
import json

import pandas as pd
import pytest

from mswift.data import (
    BadRowError,
    Conversation,
    DataPipeline,
    PipelineOptions,
    PlainText,
)
from mswift.data import row_to_example
from mswift.data.sources import SourceRows

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_formats_are_detected_and_normalized():
    sharegpt = {"conversations": [{"from": "system", "value": "Be kind."},
                                  {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello"}]}
    alpaca = {"instruction": "Translate", "input": "chat", "output": "cat"}
    assert row_to_example({"messages": CHAT}, "auto", "text", "f:1") == Conversation(CHAT)
    assert row_to_example(sharegpt, "auto", "text", "f:2") == Conversation(
        [{"role": "system", "content": "Be kind."}] + CHAT)
    assert row_to_example(alpaca, "auto", "text", "f:3") == Conversation(
        [{"role": "user", "content": "Translate\n\nchat"},
         {"role": "assistant", "content": "cat"}])
    assert row_to_example({"body": "a document"}, "auto", "body", "f:4") == PlainText("a document")
    with pytest.raises(BadRowError, match="f:5: missing field 'text'"):
        row_to_example({"messages": CHAT}, "text", "text", "f:5")


BAD_ROWS = [
    (b'{"messages": [{"role": "user", "content": "Hi"}]}', "last message is a user turn"),
    (b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}',
     "role 'bot'"),
    (b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}',
     "empty assistant turn"),
    (b'{"conversations": [{"from": "human"}]}', "needs 'from' and 'value'"),
    (b'{"prompt": "no known keys"}', "no known format"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8"),
    (b'{"messages": [', "not JSON"),
]


def write_mixed_file(path):
    good = json.dumps({"messages": CHAT}).encode()
    lines = [good]
    for raw, _ in BAD_ROWS:
        lines += [raw, good]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("index", range(len(BAD_ROWS)))
def test_bad_row_stops_with_file_and_line(tmp_path, real_tokenizer, index):
    raw, reason = BAD_ROWS[index]
    good = json.dumps({"messages": CHAT}).encode()
    path = tmp_path / "rows.jsonl"
    path.write_bytes(good + b"\n\n" + raw + b"\n")  # the blank line 2 is not a row
    pipeline = DataPipeline(PipelineOptions(datasets=[str(path)], num_epochs=1, shuffle_buffer=0),
                            real_tokenizer("qwen2_5"))
    with pytest.raises(ValueError, match=rf"rows.jsonl:3: .*{reason}"):
        list(pipeline)


def test_bad_rows_are_skipped_and_counted(tmp_path, real_tokenizer):
    path = write_mixed_file(tmp_path / "rows.jsonl")
    pipeline = DataPipeline(PipelineOptions(datasets=[path], num_epochs=1, on_bad_row="skip"),
                            real_tokenizer("qwen2_5"))
    batches = list(pipeline)
    assert pipeline.stats["bad_rows_skipped"] == len(BAD_ROWS)
    assert pipeline.stats["samples"] == len(BAD_ROWS) + 1
    assert sum(int(b["cu_seqlens"].numel()) - 2 for b in batches) == len(BAD_ROWS) + 1


def test_only_bad_rows_is_an_error(tmp_path, real_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(raw + b"\n" for raw, _ in BAD_ROWS))
    pipeline = DataPipeline(PipelineOptions(datasets=[str(path)], on_bad_row="skip"),
                            real_tokenizer("qwen2_5"))
    with pytest.raises(ValueError, match="no usable samples"):
        next(pipeline)


def test_json_parquet_csv_and_folders_are_read_in_order(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "1.json").write_text(json.dumps(rows[:2]))
    pd.DataFrame(rows[2:3]).to_parquet(folder / "2.parquet")
    pd.DataFrame(rows[3:]).to_csv(folder / "3.csv", index=False)
    items = list(SourceRows(str(folder)))
    assert [row.load()["output"] for row in items] == ["a0", "a1", "a2", "a3"]
    assert items[1].where.endswith("1.json:row 2")
    assert items[3].where.endswith("3.csv:line 2")
    assert SourceRows(str(folder)).num_rows == 4


def test_config_errors_name_field_and_choices():
    with pytest.raises(ValueError) as error:
        PipelineOptions(datasets=["a"], loss_on="user", overlong="wrap",
                        dataset_ratios=[1.0, 2.0], max_length=1)
    message = str(error.value)
    assert "data.loss_on='user': expected one of assistant, last_assistant, all" in message
    assert "data.overlong='wrap': expected one of truncate, drop" in message
    assert "data.dataset_ratios has 2 values for 1 datasets" in message
    assert "data.max_length=1" in message
