"""Options of the data pipeline: where rows come from, how they become tokens, how they are packed.

A plain keyword-only dataclass that validates itself when built; every problem found is
reported in one ValueError so a user can fix them all at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

ROW_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "text")
TEMPLATES = ("auto", "tokenizer", "llama3", "llama4", "deepseek_v3", "qwen2_5", "qwen3")
LOSS_ON = ("assistant", "last_assistant", "all")
OVERLONG = ("truncate", "drop")
ON_BAD_ROW = ("error", "skip")


@dataclass(kw_only=True)
class PipelineOptions:
    # Local dataset paths: .jsonl / .json / .parquet / .csv files, folders of them, or any
    # folder `datasets.load_dataset` reads. Several paths are mixed (see dataset_ratios).
    datasets: list[str] = field(default_factory=list)
    # How many passes over each dataset one epoch makes (0.5 = every other row, 2 = each row
    # twice); one value per entry of `datasets`, default 1.0 each. Rows of all datasets are
    # interleaved in proportion to what is left of each, so they run out together.
    dataset_ratios: Optional[list[float]] = None
    # Row format: "messages" (OpenAI chat), "sharegpt" (conversations with from/value),
    # "alpaca" (instruction/input/output), "text" (pre-training), or "auto" to detect per row.
    row_format: str = "auto"
    # Field holding the document of a "text" row.
    text_key: str = "text"
    # Chat template: "auto" uses the tokenizer's own chat_template when it has one, else the
    # mswift template matching its special tokens; "tokenizer" insists on the tokenizer's; or
    # one of mswift's own: llama3 (3.1/3.3 format), llama4, deepseek_v3, qwen2_5, qwen3.
    template: str = "auto"
    # Which tokens carry loss: every assistant turn ("assistant"), only the last assistant
    # turn ("last_assistant"), or every token of the conversation ("all").
    loss_on: str = "assistant"
    # Append the end-of-sequence token to every "text" row.
    append_eos: bool = True
    # Tokens per packed sequence (packing) or per padded row (no packing).
    max_length: int = 4096
    # Pack several samples into one max_length sequence (cu_seqlens marks the samples).
    packing: bool = True
    # Samples gathered before first-fit-decreasing places them into sequences; larger
    # windows pack tighter and hold more memory.
    packing_window: int = 1000
    # What to do with a sample longer than max_length: cut it ("truncate") or skip it ("drop").
    overlong: str = "truncate"
    # What to do with a row that cannot be used: stop with its file and line ("error") or
    # skip it and count it ("skip").
    on_bad_row: str = "error"
    # Samples held by the shuffle buffer (0 keeps the file order).
    shuffle_buffer: int = 10000
    # Seed of the dataset mixing and the shuffle buffer.
    seed: int = 42
    # Packed (or padded) sequences per micro-batch.
    micro_batch_size: int = 1
    # Passes over the data; None streams forever (training stops by step count).
    num_epochs: Optional[int] = None

    def __post_init__(self) -> None:
        problems = []
        for name, allowed in (("row_format", ROW_FORMATS), ("template", TEMPLATES),
                              ("loss_on", LOSS_ON), ("overlong", OVERLONG),
                              ("on_bad_row", ON_BAD_ROW)):
            value = getattr(self, name)
            if value not in allowed:
                problems.append(f"data.{name}={value!r}: expected one of {', '.join(allowed)}")
        for name in ("packing_window", "micro_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"data.{name}={getattr(self, name)}: expected an integer >= 1")
        if self.max_length < 2:
            problems.append(f"data.max_length={self.max_length}: expected at least 2 tokens")
        if self.shuffle_buffer < 0:
            problems.append(f"data.shuffle_buffer={self.shuffle_buffer}: expected >= 0")
        if self.num_epochs is not None and self.num_epochs < 1:
            problems.append(f"data.num_epochs={self.num_epochs}: expected None or >= 1")
        if not self.text_key:
            problems.append("data.text_key is empty: expected a field name such as 'text'")
        problems += self._ratio_problems()
        if problems:
            raise ValueError("invalid data config:\n  " + "\n  ".join(problems))

    def _ratio_problems(self) -> list[str]:
        if self.dataset_ratios is None:
            return []
        problems = []
        if len(self.dataset_ratios) != len(self.datasets):
            problems.append(
                f"data.dataset_ratios has {len(self.dataset_ratios)} values for "
                f"{len(self.datasets)} datasets: expected one ratio per dataset")
        for ratio in self.dataset_ratios:
            if not ratio > 0:
                problems.append(f"data.dataset_ratios value {ratio}: expected a number > 0")
        return problems

    def ratios(self) -> list[float]:
        """The ratio of each dataset, 1.0 where none was given."""
        return list(self.dataset_ratios) if self.dataset_ratios else [1.0] * len(self.datasets)
