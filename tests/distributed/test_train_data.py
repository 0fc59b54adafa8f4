"""Training on the data pipeline: a real (trained-here) BPE tokenizer with a ChatML template,
jsonl chat rows (sft, packed) and text rows (pt), resumed exactly mid-stream on 2 DP ranks.

The runs that start from nothing share one spawn of 2 ranks, one after the other (each sets
itself up from scratch); a run that loads a checkpoint gets fresh processes, so that nothing
but the checkpoint carries state into it."""
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


def train_each(runs):
    return [train(overrides) for overrides in runs]


def sft(files):
    return ["mode=sft", f"tokenizer={files / 'tokenizer'}", f"dataset=[{files / 'chat.jsonl'}]",
            "train_iters=6"]


def pt(files):
    return ["mode=pt", f"tokenizer={files / 'tokenizer'}", f"dataset=[{files / 'text.jsonl'}]"]


@pytest.fixture(scope="module")
def fresh(files, tmp_path_factory):
    """The runs that load nothing, by name (rank 0's rows), and their save folders."""
    saves = {name: tmp_path_factory.mktemp(name) for name in ("stopped", "dp2")}
    runs = {"packed": sft(files), "padded": sft(files) + ["packing=false"],
            "straight": pt(files) + ["train_iters=6"],
            "stopped": pt(files) + ["train_iters=6", f"save={saves['stopped']}",
                                    "exit_interval=3"],
            "dp2": pt(files) + ["train_iters=2", f"save={saves['dp2']}"]}
    rows = run_ranks(2, train_each, list(runs.values()))[0]
    return dict(zip(runs, rows)), saves


def test_sft_packed_trains_on_assistant_tokens(fresh):
    packed, padded = fresh[0]["packed"], fresh[0]["padded"]
    assert all(loss == loss and loss > 0 for _, loss, _, _, _ in packed)
    assert packed[-1][1] < packed[0][1], packed
    # Packing fills the sequences; one sample per row leaves most of each row empty.
    assert min(r[4] for r in packed) > 0.8 and max(r[4] for r in padded) < 0.6
    assert sum(r[3] for r in packed) > 2 * sum(r[3] for r in padded)  # more loss tokens/step


def test_pt_resumes_the_data_stream_exactly(files, fresh):
    runs, saves = fresh
    straight, first = runs["straight"], runs["stopped"]
    second = run_ranks(2, train, pt(files) + ["train_iters=6", f"load={saves['stopped']}"])[0]
    assert [r[0] for r in first + second] == [1, 2, 3, 4, 5, 6]
    assert first + second == straight


def test_changing_data_parallel_size_is_refused(files, fresh):
    from mswift.testing import RankFailure

    save = fresh[1]["dp2"]
    with pytest.raises(RankFailure, match="saved by 2 data-parallel ranks; this run has 1"):
        run_ranks(2, train, pt(files) + [f"save={save}", "train_iters=3", f"load={save}",
                                         "tensor_model_parallel_size=2"])
