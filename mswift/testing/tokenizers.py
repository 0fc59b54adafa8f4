"""A real byte-level BPE tokenizer trained on a text file, with a ChatML chat template, and
chat / text jsonl rows made from the same text: training data for tests without downloads."""
from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_chatml_tokenizer(corpus: Path, out_dir: Path, vocab_size: int = 360) -> Path:
    """Train a byte-level BPE on ``corpus`` and save it as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out_dir)
    return out_dir


def corpus_lines(corpus: Path, min_chars: int = 20) -> list[str]:
    return [line.strip() for line in corpus.read_text().splitlines()
            if len(line.strip()) > min_chars]


def write_chat_jsonl(corpus: Path, out: Path) -> Path:
    """One user/assistant exchange per row: consecutive lines of ``corpus``."""
    lines = corpus_lines(corpus)
    with open(out, "w") as f:
        for question, answer in zip(lines[0::2], lines[1::2]):
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return out


def write_text_jsonl(corpus: Path, out: Path) -> Path:
    """One document of three lines of ``corpus`` per row."""
    lines = corpus_lines(corpus)
    with open(out, "w") as f:
        for i in range(0, len(lines), 3):
            f.write(json.dumps({"text": " ".join(lines[i:i + 3])}) + "\n")
    return out


def write_document_halves(corpus: Path, out_dir: Path) -> list[Path]:
    """Two ``{"text": ...}`` JSONL files, ``a.jsonl`` and ``b.jsonl``, from the first and second
    half of ``corpus``'s lines, three lines to a document (row): inputs for two preprocessed
    files of a ``data_path`` blend."""
    lines = corpus_lines(corpus)
    files = []
    for name, part in (("a", lines[:len(lines) // 2]), ("b", lines[len(lines) // 2:])):
        rows = Path(out_dir) / f"{name}.jsonl"
        rows.write_text("".join(json.dumps({"text": " ".join(part[i:i + 3])}) + "\n"
                                for i in range(0, len(part), 3)))
        files.append(rows)
    return files


def save_tiny_chat_model(family: str, out_dir: Path, corpus: Path, tokenizer_vocab: int = 360,
                         **overrides) -> Path:
    """A tiny random HF ``family`` model whose own tokenizer is a BPE trained on ``corpus``
    with the ChatML template (SFT data then tokenizes to real ids, not ``<unk>``).
    ``overrides``: HF config values; the model's vocabulary must hold the tokenizer's."""
    from mswift.testing.hf_models import save_tiny_hf_model

    overrides.setdefault("vocab_size", tokenizer_vocab + 24)
    model = save_tiny_hf_model(family, out_dir, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    return train_chatml_tokenizer(corpus, model, vocab_size=tokenizer_vocab)
