"""The training loop: config -> process groups -> model + optimizer -> steps -> checkpoints."""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from mswift.config.schema import ConfigError, MswiftConfig
from mswift.data.byte_corpus import BYTE_VOCAB_SIZE, ByteCorpus
from mswift.runtime import init_distributed
from mswift.train.builder import TrainState, build_training
from mswift.train.checkpoint import load_checkpoint, save_checkpoint
from mswift.train.step import train_step

log = logging.getLogger("mswift.train")


def global_batch_size(cfg: MswiftConfig) -> int:
    dp = parallel_state.get_data_parallel_world_size()
    return cfg.training.global_batch_size or cfg.training.micro_batch_size * dp


def seed_everything(seed: int) -> None:
    """Same seed on every rank; megatron-core derives the per-rank TP/EP streams from it."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def setup(cfg: MswiftConfig) -> TrainState:
    """Process groups, seeds, model, optimizer and (if ``load`` is set) the checkpoint."""
    if cfg.data.tokenizer == "byte" and cfg.model.vocab_size < BYTE_VOCAB_SIZE:
        raise ConfigError([f"vocab_size={cfg.model.vocab_size}: tokenizer=byte needs at least "
                           f"{BYTE_VOCAB_SIZE}"])
    init_distributed(cfg)
    seed_everything(cfg.training.seed)
    state = build_training(cfg)
    if cfg.checkpoint.load:
        load_checkpoint(state, cfg.checkpoint.load, load_optim=not cfg.checkpoint.no_load_optim,
                        load_rng=not cfg.checkpoint.no_load_rng)
    return state


def run_training(cfg: MswiftConfig, state: TrainState | None = None) -> list[dict]:
    """Train until ``train_iters``; returns the metrics of each step (the same on every rank)."""
    state = state or setup(cfg)
    corpus = ByteCorpus(cfg.data.dataset, cfg.data.seq_length, seed=cfg.training.seed)
    gbs = global_batch_size(cfg)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    ckpt = cfg.checkpoint
    history = []
    while state.iteration < cfg.training.train_iters:
        step = state.iteration
        start = time.perf_counter()
        batches = corpus.micro_batches(step, gbs, cfg.training.micro_batch_size, dp_rank, dp_size)
        metrics = train_step(state, batches)
        metrics.update(step=step + 1, seconds=time.perf_counter() - start)
        metrics["tokens_per_s"] = gbs * cfg.data.seq_length / metrics["seconds"]
        history.append(metrics)
        if dist.get_rank() == 0 and (step + 1) % cfg.training.log_interval == 0:
            print(progress_line(metrics, cfg.training.train_iters), flush=True)
        if not metrics["updated"]:
            state.iteration += 1  # a skipped update still consumes its batch
        if ckpt.save and ckpt.save_interval and state.iteration % ckpt.save_interval == 0:
            save_checkpoint(state, ckpt.save)
    if ckpt.save and not (ckpt.save_interval and state.iteration % ckpt.save_interval == 0):
        save_checkpoint(state, ckpt.save)
    return history


def progress_line(m: dict, total: int) -> str:
    return (f"step {m['step']:>5}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | "
            f"grad norm {m['grad_norm']:.3f} | tokens/s {m['tokens_per_s']:.0f} | "
            f"s/step {m['seconds']:.2f}")
