"""Training data for the loop: this data-parallel rank's micro-batches of each step.

Two sources: the byte corpus (plain text files as UTF-8 bytes; batches are a function of the
step number) and mswift's data pipeline (chat / text rows -> template + loss mask -> packing
-> micro-batches; it is streamed, so its position is saved in checkpoints per data-parallel
rank and restored on resume).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from mswift.config.schema import ConfigError, MswiftConfig
from mswift.data.byte_corpus import BYTE_VOCAB_SIZE, ByteCorpus
from mswift.train.preflight import tokenizer_path


def num_micro_batches(cfg: MswiftConfig) -> int:
    dp = parallel_state.get_data_parallel_world_size()
    mbs = cfg.training.micro_batch_size
    gbs = cfg.training.global_batch_size or mbs * dp
    return gbs // (mbs * dp)


class TrainData:
    """``next_step(step)`` -> the micro-batches this rank feeds to one optimizer step."""

    def __init__(self, cfg: MswiftConfig, paths: list[str], stream_seed_offset: int = 0):
        self.cfg = cfg
        self.num_micro = num_micro_batches(cfg)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        tok = tokenizer_path(cfg)
        if tok == "byte":
            if cfg.model.vocab_size < BYTE_VOCAB_SIZE:
                raise ConfigError([f"vocab_size={cfg.model.vocab_size}: tokenizer=byte needs at "
                                   f"least {BYTE_VOCAB_SIZE}"])
            self.corpus = ByteCorpus(paths, cfg.data.seq_length, seed=cfg.training.seed)
            self.pipeline = None
        else:
            self.corpus = None
            self.pipeline = _pipeline(cfg, tok, paths, self.dp_rank, self.dp_size,
                                      stream_seed_offset)

    def next_step(self, step: int) -> list[dict]:
        mbs = self.cfg.training.micro_batch_size
        if self.corpus is not None:
            gbs = self.num_micro * mbs * self.dp_size
            return self.corpus.micro_batches(step, gbs, mbs, self.dp_rank, self.dp_size)
        return [next(self.pipeline) for _ in range(self.num_micro)]

    def state_dict(self) -> dict | None:
        return None if self.pipeline is None else self.pipeline.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.pipeline is not None and state is not None:
            self.pipeline.load_state_dict(state)


def load_tokenizer(cfg: MswiftConfig, folder: str):
    """The Hugging Face tokenizer in ``folder``; ConfigError when it does not load or has more
    tokens than the model's ``vocab_size``."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError([f"tokenizer={folder}: cannot load a tokenizer there ({err})"])
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError([f"vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's "
                           f"{len(tokenizer)} tokens ({folder})"])
    return tokenizer


def _pipeline(cfg: MswiftConfig, tokenizer_dir: str, paths: list[str], dp_rank: int,
              dp_size: int, seed_offset: int):
    from mswift.data.options import PipelineOptions
    from mswift.data.streaming import DataPipeline

    d = cfg.data
    tokenizer = load_tokenizer(cfg, tokenizer_dir)
    pretrain = cfg.training.mode == "pt"
    options = PipelineOptions(
        datasets=list(paths),
        dataset_ratios=d.dataset_ratios if paths == d.dataset else None,
        row_format="text" if pretrain and d.row_format == "auto" else d.row_format,
        text_key=d.text_key,
        template=d.template,
        loss_on="all" if pretrain else d.loss_on,
        append_eos=d.append_eod,
        max_length=d.seq_length,
        packing=d.packing,
        packing_window=d.packing_window,
        overlong=d.overlong,
        on_bad_row=d.on_bad_row,
        shuffle_buffer=d.shuffle_buffer,
        seed=cfg.training.seed + seed_offset,
        micro_batch_size=cfg.training.micro_batch_size,
        num_epochs=None,
    )
    return DataPipeline(options, tokenizer, dp_rank=dp_rank, dp_size=dp_size)


def batch_stats(batches: list[dict]) -> torch.Tensor:
    """[loss tokens, real tokens, token slots] of this rank's micro-batches (float64)."""
    stats = torch.zeros(3, dtype=torch.float64)
    for b in batches:
        stats[0] += b["loss_mask"].sum().item()
        slots = b["loss_mask"].numel()
        stats[1] += b["attention_mask"].sum().item() if "attention_mask" in b else slots
        stats[2] += slots
    return stats
