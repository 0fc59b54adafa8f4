"""Training throughput: packed vs padded sequences, and mswift vs a plain transformers loop.

Same machine, same run, same tiny Llama-style model (from one HF folder) and the same
long-tailed chat dataset. Throughput counts real (non-padding) tokens per second, so padding
shows up as lost speed. Prints the ratios.

    python benchmarks/train_packing.py [--steps 12] [--seq-length 1024] [--hidden 256]

Runs one rank on the CPU here (megatron-core through mswift's CPU layer); on a GPU machine it
uses the GPU. Warm-up steps are excluded from the timing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"


def long_tailed_chat(out: Path, rows: int, seed: int = 0) -> Path:
    """Chat rows whose answer lengths follow a lognormal law (most short, a few long)."""
    words = CORPUS.read_text().split()
    rng = np.random.default_rng(seed)
    with open(out, "w") as f:
        for _ in range(rows):
            n = int(min(600, max(4, rng.lognormal(3.5, 0.9))))
            start = int(rng.integers(0, len(words) - n))
            answer = " ".join(words[start:start + n])
            question = " ".join(words[start + n:start + n + 8])
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return out


def make_model(root: Path, hidden: int) -> Path:
    from mswift.testing.hf_models import save_tiny_hf_model
    from mswift.testing.tokenizers import train_chatml_tokenizer

    model = save_tiny_hf_model("llama", root / "model", vocab_size=512, hidden_size=hidden,
                               intermediate_size=hidden * 3, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
                               max_position_embeddings=4096)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    train_chatml_tokenizer(CORPUS, model, vocab_size=500)
    return model


def mswift_run(model: Path, data: Path, packing: bool, seq_length: int, steps: int,
               rows_per_step: int) -> dict:
    from mswift.config import load_config
    from mswift.train.loop import run_training

    cfg = load_config(None, [f"hf_model={model}", "mode=sft", f"dataset=[{data}]",
                             f"seq_length={seq_length}", f"packing={str(packing).lower()}",
                             "micro_batch_size=1", f"global_batch_size={rows_per_step}",
                             f"train_iters={steps}", "lr=1e-4", "lr_warmup_iters=0",
                             "log_interval=1000", "exit_signal_handler=false"])
    rows = run_training(cfg)[2:]  # skip warm-up
    real = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    return {"real_tokens_per_s": real / sum(r["step_time_s"] for r in rows),
            "padding_efficiency": float(np.mean([r["padding_efficiency"] for r in rows]))}


def transformers_run(model_dir: Path, data: Path, seq_length: int, steps: int,
                     rows_per_step: int) -> dict:
    """The usual HF loop: one sample per row, padded to the longest in the batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    real, seconds = 0, 0.0
    for step in range(steps):
        batch = texts[step * rows_per_step:(step + 1) * rows_per_step]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True,
                  max_length=seq_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        start = time.perf_counter()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= 2:
            seconds += time.perf_counter() - start
            real += int(enc["attention_mask"].sum())
    return {"real_tokens_per_s": real / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rows-per-step", type=int, default=4)
    args = parser.parse_args()
    from mswift.testing import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root, args.hidden)
        data = long_tailed_chat(root / "chat.jsonl", rows=4000)
        common = (model, data)
        packed = run_ranks(1, mswift_run, *common, True, args.seq_length, args.steps,
                           args.rows_per_step, timeout=3600)[0]
        padded = run_ranks(1, mswift_run, *common, False, args.seq_length, args.steps,
                           args.rows_per_step, timeout=3600)[0]
        hf = run_ranks(1, transformers_run, model, data, args.seq_length, args.steps,
                       args.rows_per_step * 4, timeout=3600)[0]
    print(f"{'run':<28}{'real tokens/s':>14}{'padding-free':>14}")
    print(f"{'mswift packed':<28}{packed['real_tokens_per_s']:>14.0f}"
          f"{packed['padding_efficiency']:>14.1%}")
    print(f"{'mswift padded (1/row)':<28}{padded['real_tokens_per_s']:>14.0f}"
          f"{padded['padding_efficiency']:>14.1%}")
    print(f"{'transformers loop (padded)':<28}{hf['real_tokens_per_s']:>14.0f}")
    print(f"packed / padded:             {packed['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x")
    print(f"mswift packed / transformers: {packed['real_tokens_per_s'] / hf['real_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
