"""Training data from megatron-core indexed files (``data_path``), the Megatron-LM way.

megatron-core's BlendedMegatronDatasetBuilder builds GPTDatasets (documents packed end to end
into sequences of ``seq_length`` tokens, shuffled, split train/valid/test by ``split``) and
blends several files by weight. Samples are read in Megatron-LM's order: global sample
``consumed + m * micro * dp + dp_rank * micro + i`` is row ``i`` of micro-batch ``m`` on
data-parallel rank ``dp_rank`` (MegatronPretrainingSampler's layout). The number of consumed
samples is the data position saved in checkpoints, so a resumed run reads what the
uninterrupted run would have read.

With ``reset_attention_mask`` a micro-batch carries ``cu_seqlens`` with a boundary after every
end-of-document token, so attention stays inside each document (THD packed batch, as the data
pipeline's packed batches); without it the rows are plain causal sequences, as in Megatron-LM.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core import parallel_state

from mswift.config.data_path import parse_data_path
from mswift.config.schema import ConfigError, MswiftConfig
from mswift.train.data import load_tokenizer, num_micro_batches
from mswift.train.preflight import tokenizer_path

# megatron-core's own cache folder when path_to_cache is None (gpt_dataset.py)
DEFAULT_CACHE = ("cache", "GPTDataset_indices")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def resolve_cache_dir(cfg: MswiftConfig, prefixes: list[str]) -> str | None:
    """``data_cache_path``; else None (megatron-core's default, PREFIX/cache/ next to the data)
    where that is writable; else SAVE/data_cache."""
    if cfg.data.data_cache_path:
        return cfg.data.data_cache_path
    writable = all(os.access(_nearest_existing(Path(p, *DEFAULT_CACHE)), os.W_OK)
                   for p in prefixes)
    if writable:
        return None
    if cfg.checkpoint.save:
        return str(Path(cfg.checkpoint.save) / "data_cache")
    raise ConfigError([f"data_path: the data folders ({', '.join(sorted({str(Path(p).parent) for p in prefixes}))}) "
                       "are not writable for megatron-core's index caches; set data_cache_path "
                       "(or save)"])


def collate_documents(items: list[dict], eod: int, keep_documents_apart: bool) -> dict:
    """A micro-batch from GPTDataset items (each ``[seq]`` tensors): ``[rows, seq]`` tokens /
    labels / loss_mask / position_ids; with ``keep_documents_apart`` also cu_seqlens (int32,
    over the flattened rows: a boundary after every EOD token and at every row end) and
    max_seqlen."""
    batch = {key: torch.stack([item[key] for item in items])
             for key in ("tokens", "labels", "loss_mask", "position_ids")}
    if keep_documents_apart:
        rows, seq = batch["tokens"].shape
        ends = []
        for row in range(rows):
            cuts = (batch["tokens"][row] == eod).nonzero().flatten() + 1
            cuts = torch.unique(torch.cat([cuts, torch.tensor([seq])]))  # sorted, no repeat
            ends.append(cuts + row * seq)
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64)] + ends).to(torch.int32)
        batch["cu_seqlens"] = cu_seqlens
        batch["max_seqlen"] = (cu_seqlens[1:] - cu_seqlens[:-1]).max()
    return batch


class IndexedTrainData:
    """``next_step(step)`` -> this rank's micro-batches of the train split (TrainData's
    interface); ``eval_steps()`` -> the first ``eval_iters`` global batches of the valid split."""

    position_is_global = True  # the saved position (consumed samples) fits any data-parallel size

    def __init__(self, cfg: MswiftConfig):
        from mswift.data.pretrain import build_pretrain_datasets

        d, t = cfg.data, cfg.training
        self.cfg = cfg
        self.num_micro = num_micro_batches(cfg)
        self.micro = t.micro_batch_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.global_batch = self.num_micro * self.micro * self.dp_size
        prefixes, weights = parse_data_path(d.data_path)
        tokenizer = load_tokenizer(cfg, tokenizer_path(cfg))
        self.eod = tokenizer.eos_token_id
        evaluated = t.eval_iters * self.global_batch if t.eval_interval else 0
        self.train, self.valid, _ = build_pretrain_datasets(
            prefixes=prefixes, weights=weights, tokenizer=tokenizer, seq_length=d.seq_length,
            num_samples=(t.train_iters * self.global_batch, evaluated, evaluated),
            split=d.split, seed=t.seed, eod_mask_loss=d.eod_mask_loss,
            reset_position_ids=d.reset_position_ids,
            reset_attention_mask=d.reset_attention_mask,
            cache_dir=resolve_cache_dir(cfg, prefixes))
        self.consumed: int | None = None

    def _micro_batches(self, dataset, start: int) -> list[dict]:
        batches = []
        for m in range(self.num_micro):
            first = start + m * self.micro * self.dp_size + self.dp_rank * self.micro
            if first + self.micro > len(dataset):
                raise RuntimeError(f"data_path: sample {first + self.micro - 1} asked of a "
                                   f"split of {len(dataset)} samples")
            items = [dataset[i] for i in range(first, first + self.micro)]
            batches.append(collate_documents(items, self.eod, self.cfg.data.reset_attention_mask))
        return batches

    def next_step(self, step: int) -> list[dict]:
        if self.consumed is None:  # no position restored: the step says where we are
            self.consumed = step * self.global_batch
        batches = self._micro_batches(self.train, self.consumed)
        self.consumed += self.global_batch
        return batches

    def eval_steps(self) -> list[list[dict]]:
        return [self._micro_batches(self.valid, i * self.global_batch)
                for i in range(self.cfg.training.eval_iters)]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed}

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None and state.get("consumed_samples") is not None:
            self.consumed = int(state["consumed_samples"])
