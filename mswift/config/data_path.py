"""Megatron-LM's ``data_path`` and ``split`` settings, parsed with Megatron-LM's meanings.

Pure text handling (no torch, no megatron-core), so the config can check them when it is built.
"""
from __future__ import annotations

import re
from typing import Optional


def data_path_items(items: list[str]) -> list[str]:
    """The setting as a flat list: one string ``"0.7 a 0.3 b"`` (the command-line form
    Megatron-LM users write) is split on whitespace, as ``--data-path 0.7 a 0.3 b`` would be."""
    return [word for item in items for word in str(item).split()]


def _as_weight(word: str) -> Optional[float]:
    try:
        return float(word)
    except ValueError:
        return None


def parse_data_path(items: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """``(prefixes, weights)``: ``[a]`` -> ``([a], None)``; ``[0.7, a, 0.3, b]`` -> weights;
    ``[a, b]`` -> ``([a, b], None)`` (weights inferred from the files' sizes, as in Megatron-LM).

    ValueError names what does not parse: a list that mixes numbers and prefixes in the weight
    places, a negative weight, or weights that sum to zero.
    """
    words = data_path_items(items)
    if not words:
        raise ValueError("data_path: expected a PREFIX of PREFIX.bin/PREFIX.idx, or "
                         "[weight, PREFIX, weight, PREFIX, ...]")
    if len(words) % 2 == 1:
        numbers = [w for w in words if _as_weight(w) is not None]
        if numbers and len(words) > 1:
            raise ValueError(f"data_path={words}: {len(words)} items with weights among them; "
                             "expected pairs: weight, PREFIX, weight, PREFIX, ...")
        return words, None
    weights = [_as_weight(w) for w in words[0::2]]
    prefixes = words[1::2]
    if all(w is None for w in weights):
        if any(_as_weight(w) is not None for w in prefixes):
            raise ValueError(f"data_path={words}: weights must come before each PREFIX: "
                             "weight, PREFIX, weight, PREFIX, ...")
        return words, None  # prefixes only
    bad = [words[2 * i] for i, w in enumerate(weights) if w is None]
    if bad:
        raise ValueError(f"data_path: {', '.join(map(repr, bad))} in a weight place is not a "
                         "number; expected weight, PREFIX, weight, PREFIX, ...")
    numeric_prefixes = [p for p in prefixes if _as_weight(p) is not None]
    if numeric_prefixes:
        raise ValueError(f"data_path: {', '.join(map(repr, numeric_prefixes))} in a PREFIX "
                         "place is a number; expected weight, PREFIX, weight, PREFIX, ...")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data_path: weights {weights}: expected numbers >= 0 with a positive "
                         "sum")
    return prefixes, weights


def parse_split(text: str) -> list[float]:
    """``"969,30,1"`` -> normalized train/valid/test fractions (Megatron-LM: missing parts are
    0, ``/`` also separates). ValueError when it does not parse."""
    parts = [p.strip() for p in re.split(r"[,/]", str(text))]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"split={text!r}: expected up to three numbers >= 0 with a positive "
                         "sum, train,valid,test (e.g. 969,30,1)")
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


def indexed_data_problems(cfg) -> list[str]:
    """Everything about ``data_path`` that can be wrong before anything starts (plain file and
    config logic, no torch): missing PREFIX.bin / PREFIX.idx, mode, tokenizer, an empty valid
    split to evaluate. ``cfg`` is an MswiftConfig whose data section has parsed."""
    import os

    d, problems = cfg.data, []
    if not d.data_path:
        return []
    prefixes, _ = parse_data_path(d.data_path)
    for prefix in prefixes:
        missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            problems.append(f"data_path: {' and '.join(missing)} not found (expected the "
                            "PREFIX that mswift preprocess --output-prefix wrote)")
    if cfg.training.mode != "pt":
        problems.append(f"data_path with mode={cfg.training.mode}: indexed files are "
                        "pre-training data; use mode=pt (or dataset=... for sft)")
    if (d.tokenizer or cfg.model.hf_model or "byte") == "byte":
        problems.append("data_path: needs the Hugging Face tokenizer the files were written "
                        "with (tokenizer=DIR, or hf_model)")
    if cfg.training.eval_interval and parse_split(d.split)[1] == 0:
        problems.append(f"eval_interval={cfg.training.eval_interval} with split={d.split!r}: "
                        "the valid part is empty; give it a weight (e.g. 969,30,1)")
    return problems
