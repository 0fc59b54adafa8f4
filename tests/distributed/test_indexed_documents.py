"""data_path: megatron-core GPTDataset samples with reset_attention_mask keep attention inside
each document: the per-token losses of a packed micro-batch equal those of every document piece
run alone through the same model (1e-5), and each piece is a stretch of one preprocessed
document."""
from pathlib import Path

import pytest

from mswift.testing import run_ranks

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_corpus.txt"
MODEL = ["num_layers=2", "hidden_size=64", "ffn_hidden_size=128", "num_attention_heads=4",
         "num_query_groups=2", "vocab_size=384", "max_position_embeddings=128",
         "seq_length=96", "micro_batch_size=2", "train_iters=2", "seed=5", "split=90,10,0",
         "reset_position_ids=true", "reset_attention_mask=true"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two preprocessed halves of the bundled text (a document = three lines) and a BPE
    tokenizer trained on it."""
    from mswift.data.preprocess import main as preprocess
    from mswift.testing.tokenizers import train_chatml_tokenizer, write_document_halves

    out = tmp_path_factory.mktemp("indexed")
    tokenizer = train_chatml_tokenizer(CORPUS, out / "tokenizer")
    prefixes = []
    for rows in write_document_halves(CORPUS, out):
        prefix = out / f"{rows.stem}_text_document"
        assert preprocess(["--input", str(rows), "--tokenizer", str(tokenizer),
                           "--output-prefix", str(prefix), "--append-eod"]) == 0
        prefixes.append(str(prefix))
    return str(tokenizer), prefixes


def documents_body(overrides):
    import torch

    from mswift.config import load_config
    from mswift.train.indexed_data import IndexedTrainData
    from mswift.train.loop import setup
    from mswift.train.step import model_inputs

    cfg = load_config(None, MODEL + overrides)
    state = setup(cfg)
    model = state.model[0].module
    model.eval()
    batch = IndexedTrainData(cfg).next_step(0)[0]
    with torch.no_grad():
        packed = model(**model_inputs(batch)).reshape(-1)
        crossing = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
        causal_rows = model(**model_inputs(crossing)).reshape(-1)
        tokens, labels = batch["tokens"].reshape(-1), batch["labels"].reshape(-1)
        cu = batch["cu_seqlens"].tolist()
        alone, pieces = [], []
        for start, end in zip(cu[:-1], cu[1:]):  # one piece per call: [1, length], causal
            piece = tokens[start:end][None]
            out = model(input_ids=piece, position_ids=torch.arange(end - start)[None],
                        attention_mask=None, labels=labels[start:end][None])
            alone.append(out.reshape(-1))
            pieces.append(piece.reshape(-1).tolist())
    return packed, torch.cat(alone), causal_rows, pieces, batch["position_ids"], cu


def test_packed_documents_equal_each_document_alone(corpora):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer, (a, b) = corpora
    ((packed, alone, causal_rows, pieces, positions, cu),) = run_ranks(
        1, documents_body, [f"tokenizer={tokenizer}", f"data_path=[0.5, {a}, 0.5, {b}]"])
    assert len(pieces) >= 4, "expected several documents in two rows of 96 tokens"
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    # the same rows without the boundaries (one causal sequence each) give other losses
    assert (packed - causal_rows).abs().max() > 1e-3
    # every piece is a contiguous stretch of one document, ended by its EOD unless the row is
    documents = [" ".join(map(str, d.tolist())) for p in (a, b) for d in IndexedDataset(p)]
    eod = 2  # <|im_end|> in the test tokenizer
    for piece, end in zip(pieces, cu[1:]):
        assert piece[-1] == eod or end % 96 == 0
        assert any(" ".join(map(str, piece)) in doc for doc in documents), piece
    # positions restart at every document (reset_position_ids)
    flat = positions.reshape(-1)
    for start, end in zip(cu[:-1], cu[1:]):
        assert flat[start:end].tolist() == list(range(end - start))
