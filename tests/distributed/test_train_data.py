"""Training on the data pipeline: a real (trained-here) BPE tokenizer with a ChatML template,
jsonl chat rows (sft, packed) and text rows (pt), resumed exactly mid-stream on 2 DP ranks."""
from pathlib import Path

import pytest

from mswift.testing import run_ranks

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_corpus.txt"
MODEL = ["num_layers=2", "hidden_size=64", "ffn_hidden_size=128", "num_attention_heads=4",
         "num_query_groups=2", "vocab_size=384", "max_position_embeddings=256",
         "seq_length=256", "micro_batch_size=1", "global_batch_size=4", "lr=2e-3",
         "lr_warmup_iters=0", "seed=5", "shuffle_buffer=64", "packing_window=32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from mswift.testing.tokenizers import (train_chatml_tokenizer, write_chat_jsonl,
                                           write_text_jsonl)

    root = tmp_path_factory.mktemp("data")
    train_chatml_tokenizer(CORPUS, root / "tokenizer")
    write_chat_jsonl(CORPUS, root / "chat.jsonl")
    write_text_jsonl(CORPUS, root / "text.jsonl")
    return root


def train(overrides):
    from mswift.config import load_config
    from mswift.train.loop import run_training

    history = run_training(load_config(None, MODEL + overrides))
    return [(r["step"], r["loss"], r["grad_norm"], r["loss_tokens"], r["padding_efficiency"])
            for r in history]


def test_sft_packed_trains_on_assistant_tokens(files):
    common = ["mode=sft", f"tokenizer={files / 'tokenizer'}", f"dataset=[{files / 'chat.jsonl'}]",
              "train_iters=6"]
    packed = run_ranks(2, train, common)[0]
    padded = run_ranks(2, train, common + ["packing=false"])[0]
    assert all(loss == loss and loss > 0 for _, loss, _, _, _ in packed)
    assert packed[-1][1] < packed[0][1], packed
    # Packing fills the sequences; one sample per row leaves most of each row empty.
    assert min(r[4] for r in packed) > 0.8 and max(r[4] for r in padded) < 0.6
    assert sum(r[3] for r in packed) > 2 * sum(r[3] for r in padded)  # more loss tokens/step


def test_pt_resumes_the_data_stream_exactly(files, tmp_path):
    common = ["mode=pt", f"tokenizer={files / 'tokenizer'}", f"dataset=[{files / 'text.jsonl'}]",
              "train_iters=6"]
    straight = run_ranks(2, train, common)[0]
    first = run_ranks(2, train, common + [f"save={tmp_path}", "exit_interval=3"])[0]
    second = run_ranks(2, train, common + [f"load={tmp_path}"])[0]
    assert [r[0] for r in first + second] == [1, 2, 3, 4, 5, 6]
    assert first + second == straight


def test_changing_data_parallel_size_is_refused(files, tmp_path):
    from mswift.testing import RankFailure

    common = ["mode=pt", f"tokenizer={files / 'tokenizer'}", f"dataset=[{files / 'text.jsonl'}]",
              "train_iters=2", f"save={tmp_path}"]
    run_ranks(2, train, common)
    with pytest.raises(RankFailure, match="saved by 2 data-parallel ranks; this run has 1"):
        run_ranks(2, train, common + ["train_iters=3", f"load={tmp_path}",
                                      "tensor_model_parallel_size=2"])
