"""Every attention backend trains the tokenized data: megatron-core's own (``local``) on padded
rows, mswift's varlen attention on padded rows and on packed ones, all with the same losses;
``local`` with packed rows is refused before anything starts."""
import json
from pathlib import Path

import pytest

from mswift.testing import run_ranks

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_corpus.txt"
# Four samples a step: one packed row of 256 tokens, or four padded rows of 256.
MODEL = ["num_layers=2", "hidden_size=64", "ffn_hidden_size=128", "num_attention_heads=4",
         "num_query_groups=2", "vocab_size=384", "max_position_embeddings=256",
         "seq_length=256", "lr=2e-3", "lr_warmup_iters=0", "seed=5", "shuffle_buffer=0",
         "packing_window=4", "mode=pt", "train_iters=3"]
PACKED = ["packing=true", "micro_batch_size=1", "global_batch_size=1"]
UNPACKED = ["packing=false", "micro_batch_size=4", "global_batch_size=4"]
CHARS = [30, 110, 55, 160, 20, 90, 140, 45]  # rows of different lengths: padding is real


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from mswift.testing.tokenizers import corpus_lines, train_chatml_tokenizer

    root = tmp_path_factory.mktemp("data")
    train_chatml_tokenizer(CORPUS, root / "tokenizer")
    text = " ".join(corpus_lines(CORPUS))
    with open(root / "text.jsonl", "w") as f:
        start = 0
        for n in CHARS:
            f.write(json.dumps({"text": text[start:start + n]}) + "\n")
            start += n
    return root


def train_each(runs):
    from mswift.config import load_config
    from mswift.train.loop import run_training

    return [[(r["loss"], r["loss_tokens"], r["padding_efficiency"])
             for r in run_training(load_config(None, MODEL + overrides))] for overrides in runs]


def test_local_backend_trains_unpacked_like_varlen(files):
    data = [f"tokenizer={files / 'tokenizer'}", f"dataset=[{files / 'text.jsonl'}]"]
    local, torch_padded, torch_packed = run_ranks(1, train_each, [
        data + UNPACKED + ["attention_backend=local"],
        data + UNPACKED + ["attention_backend=torch"],
        data + PACKED + ["attention_backend=torch"],
    ])[0]
    assert len(local) == 3
    # The same samples each step (same loss tokens), padded rows really padded.
    assert [r[1] for r in local] == [r[1] for r in torch_packed] == [r[1] for r in torch_padded]
    assert max(r[2] for r in local) < 0.5 and min(r[2] for r in torch_packed) > 0.6
    for (a, _, _), (b, _, _), (c, _, _) in zip(local, torch_padded, torch_packed):
        assert a == pytest.approx(c, rel=1e-5) and b == pytest.approx(c, rel=1e-5)
    assert local[-1][0] < local[0][0]


def test_local_backend_with_packing_is_refused(files, tmp_path):
    from mswift.config import ConfigError, load_config
    from mswift.train.loop import setup

    cfg = load_config(None, MODEL + PACKED + [
        "attention_backend=local", f"tokenizer={files / 'tokenizer'}",
        f"dataset=[{files / 'text.jsonl'}]", f"save={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"attention_backend=local with packing=true.*"
                                          r"attention_backend=auto, torch or triton.*"
                                          r"packing=false"):
        setup(cfg)
    assert not (tmp_path / "run").exists()
