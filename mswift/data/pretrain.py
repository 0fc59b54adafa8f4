"""Pre-training data over megatron-core: GPTDataset on indexed .bin/.idx files (written by
`mswift preprocess`), blended across several files with weights by BlendedDataset.

megatron-core shuffles, splits into train/valid/test, cuts documents into sequences of
`seq_length + 1` tokens and caches its indices (in `cache_dir`, or next to the data); every
rank that calls `build_pretrain_datasets` gets the same datasets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class _TokenizerFacts:
    """The few tokenizer facts megatron-core's GPT datasets read."""
    vocab_size: int
    eod: int
    pad: int
    name: str = ""

    @property
    def special_tokens_dict(self) -> dict:
        return {"eos_token": self.eod, "pad_token": self.pad}

    @property
    def unique_identifiers(self) -> dict:
        # megatron-core hashes the dataset config, this included, to name its index caches
        return {"class": "HuggingFaceTokenizer", "name": self.name,
                "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


def tokenizer_facts(tokenizer) -> _TokenizerFacts:
    """vocab size, end-of-document and pad ids of a Hugging Face tokenizer."""
    eod = tokenizer.eos_token_id
    if eod is None:
        raise ValueError("the tokenizer has no eos token: megatron-core needs an "
                         "end-of-document id")
    pad = tokenizer.pad_token_id
    if pad is None or pad == eod:
        # megatron-core masks the loss of labels equal to pad and maps pad tokens to id 0: an
        # id that never occurs (-1, megatron-core's own fallback) keeps EOD tokens intact
        pad = -1
    return _TokenizerFacts(vocab_size=len(tokenizer), eod=eod, pad=pad,
                           name=str(getattr(tokenizer, "name_or_path", "")))


def ensure_dataset_helpers() -> None:
    """Make megatron-core's C++ index builder (``megatron.core.datasets.helpers_cpp``) importable.

    Wheels ship it compiled; a source checkout of megatron-core builds it with its Makefile
    (g++ and pybind11), as Megatron-LM does: global rank 0 compiles, the others wait for it.
    """
    import torch.distributed as dist

    def importable() -> bool:
        try:
            import megatron.core.datasets.helpers_cpp  # noqa: F401
        except ImportError:
            return False
        return True

    if importable():
        return
    multi = dist.is_available() and dist.is_initialized()
    if not multi or dist.get_rank() == 0:
        import importlib.util
        import os
        import subprocess

        folder = os.path.dirname(importlib.util.find_spec("megatron.core.datasets").origin)
        done = None
        if os.path.isfile(os.path.join(folder, "Makefile")):
            done = subprocess.run(["make", "-C", folder], capture_output=True, text=True)
        if done is None or done.returncode != 0:
            why = "no Makefile there" if done is None else done.stderr.strip()[-500:]
            raise RuntimeError(f"megatron.core.datasets.helpers_cpp: not importable and not "
                               f"compiled in {folder} ({why}); install a megatron-core wheel "
                               "or g++ and pybind11")
    if multi:
        dist.barrier()
    if not importable():
        raise RuntimeError("megatron.core.datasets.helpers_cpp: still not importable after "
                           "compiling it on rank 0 (is the package folder shared by all nodes?)")


def build_pretrain_datasets(
    *,
    prefixes: list[str],
    tokenizer,
    seq_length: int,
    num_samples: tuple[int, int, int],
    weights: Optional[list[float]] = None,
    split: str = "99,1,0",
    seed: int = 1234,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    cache_dir: Optional[str] = None,
):
    """[train, valid, test] datasets (None where a split is empty) over the indexed files
    `prefixes`, mixed by `weights` (None: by each file's number of tokens). `num_samples` is the number of sequences
    each split must yield; megatron-core repeats epochs to reach it. Each item is a dict of
    tokens / labels / loss_mask / position_ids tensors of `seq_length`. Call it on every rank
    (megatron-core builds the index caches on rank 0 and shares them through `cache_dir`)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not prefixes:
        raise ValueError("prefixes is empty: name at least one PREFIX of PREFIX.bin/PREFIX.idx")
    if weights is not None and len(weights) != len(prefixes):
        raise ValueError(f"{len(weights)} weights for {len(prefixes)} prefixes: give one each")
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise ValueError(f"{prefix}.bin / {prefix}.idx not found: run mswift preprocess")
    if weights is None and len(prefixes) > 1:
        # Megatron-LM's meaning of prefixes without weights: each weighted by its size (tokens);
        # given as weights, so megatron-core repeats epochs to reach num_samples
        weights = [float(IndexedDataset(prefix).sequence_lengths.sum()) for prefix in prefixes]
    ensure_dataset_helpers()
    import torch.distributed

    if len(prefixes) > 1 and not torch.distributed.is_initialized():
        # megatron-core's BlendedDataset asks torch.distributed for the rank before writing its
        # cache; a single process without a process group builds its indices in memory (the
        # GPTDatasets then cache next to the data).
        cache_dir = None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prefixes), None if weights is None else list(weights)),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer_facts(tokenizer),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    return builder.build()
