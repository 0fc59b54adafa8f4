"""Held-out perplexity of quantized exports, split at the prefix every row shares, and their
KL divergence from the 16-bit model, all in transformers.

    python benchmarks/export_ppl_split.py --hf runs/smollm2/hf \\
        --dataset runs/smollm2/chat_eval.jsonl --samples 64 \\
        runs/smollm2/w4a16-rtn runs/smollm2/w4a16-gptq runs/smollm2/w4a16-awq

Rows are encoded as ``mswift export`` encodes its evaluation rows (the checkpoint's tokenizer
and chat template). A chat template that adds a default system prompt puts the same tokens at
the start of every row; ``mswift export``'s report counts them in its perplexity, where they
can outweigh the conversations (SmolLM2: 24 of ~65 tokens a row). Printed per model: the
perplexity over every next-token target (the report's), over the targets inside the shared
prefix and over those after it, and the mean per-token ``KL(16-bit || export)`` over every
target.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def shared_prefix(rows: list[torch.Tensor]) -> int:
    """Number of leading tokens all ``rows`` ([1, n] each) have in common."""
    n = min(r.shape[1] for r in rows)
    for i in range(n):
        if len({int(r[0, i]) for r in rows}) > 1:
            return i
    return n


@torch.no_grad()
def log_probs(folder: Path, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return [torch.log_softmax(model(r).logits[0, :-1].double(), -1) for r in rows]


def scores(lps, reference, rows, prefix: int) -> dict[str, float]:
    nll = [-lp.gather(1, r[0, 1:, None])[:, 0] for lp, r in zip(lps, rows)]
    every = torch.cat(nll)
    cut = max(prefix, 1) - 1  # nll[i] scores token i + 1: the first target after the prefix
    after = torch.cat([n[cut:] for n in nll])
    inside = torch.cat([n[:cut] for n in nll])
    kl = sum((ref.exp() * (ref - lp)).sum().item() for ref, lp in zip(reference, lps))
    return {"ppl": math.exp(every.mean().item()), "ppl_after_prefix": math.exp(after.mean().item()),
            "ppl_prefix": math.exp(inside.mean().item()) if inside.numel() else float("nan"),
            "kl": kl / every.numel()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", type=Path, required=True, help="the 16-bit HF model")
    p.add_argument("--dataset", type=Path, required=True, help="held-out rows")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("exports", type=Path, nargs="+", help="quantized export folders")
    args = p.parse_args(argv)
    from mswift.export.calibration import calibration_samples

    rows = calibration_samples(args.dataset, args.hf, args.samples, args.seq_len,
                               what="--dataset")
    prefix = shared_prefix(rows)
    targets = sum(r.shape[1] - 1 for r in rows)
    print(f"{len(rows)} rows, {targets} targets, shared prefix {prefix} tokens "
          f"({len(rows) * max(prefix - 1, 0)} of the targets lie inside it)")
    reference = log_probs(args.hf, rows)
    print("| model | ppl (every target) | ppl inside the shared prefix | ppl after it "
          "| KL to 16-bit |")
    print("|---|---|---|---|---|")
    for folder in [args.hf, *args.exports]:
        lps = reference if folder == args.hf else log_probs(folder, rows)
        s = scores(lps, reference, rows, prefix)
        name = "16-bit" if folder == args.hf else folder.name
        print(f"| {name} | {s['ppl']:.2f} | {s['ppl_prefix']:.1f} | {s['ppl_after_prefix']:.2f} "
              f"| {s['kl']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
