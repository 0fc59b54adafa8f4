"""Reply to one question with a model exported by mswift (or any HF chat model folder).

    python examples/smollm2/chat.py runs/smollm2/sft/hf "Hello, how are you?"

Greedy decoding with the tokenizer's own chat template; prints the reply only.
"""
import argparse
import sys
from pathlib import Path


def load_chat_model(hf_dir: Path):
    """(tokenizer, model) of an HF folder, fp32, for :func:`reply_with`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return tokenizer, model


def reply_with(loaded, question: str, max_new_tokens: int = 64) -> str:
    """Greedy reply of ``loaded`` (from :func:`load_chat_model`) to one user message."""
    import torch

    tokenizer, model = loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    # [1, prompt + new] -> the new tokens only
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def generate_reply(hf_dir: Path, question: str, max_new_tokens: int = 64) -> str:
    return reply_with(load_chat_model(hf_dir), question, max_new_tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="HF model folder (config.json, safetensors, "
                        "tokenizer)")
    parser.add_argument("question")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if not (args.hf_dir / "config.json").is_file():
        print(f"chat.py: {args.hf_dir}: no config.json (expected an HF model folder, e.g. "
              "SAVE/hf written by save_hf=true)", file=sys.stderr)
        return 1
    print(generate_reply(args.hf_dir, args.question, args.max_new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
