"""The training loop: config -> process groups -> model + optimizer -> steps -> checkpoints."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from mswift.bridge.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from mswift.config.schema import ConfigError, MswiftConfig
from mswift.models.registry import apply_hf_model
from mswift.runtime import init_distributed
from mswift.runtime.device import local_device, reset_peak_memory, synchronize
from mswift.train.builder import TrainState, build_training
from mswift.train.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from mswift.train.control import StopControl
from mswift.train.data import TrainData, batch_stats
from mswift.train.indexed_data import IndexedTrainData
from mswift.train.metrics import DeviceThroughput, MetricsLog
from mswift.train.preflight import check_config
from mswift.train.phases import folder_size, human_bytes, phase
from mswift.train.save_dir import SaveLedger, check_save_dir, continues_save_dir
from mswift.train.step import eval_step, train_step


class TrainingStopped(RuntimeError):
    """The run stopped on a problem in the numbers (non-finite loss or gradients)."""


def global_batch_size(cfg: MswiftConfig) -> int:
    dp = parallel_state.get_data_parallel_world_size()
    return cfg.training.global_batch_size or cfg.training.micro_batch_size * dp


def seed_everything(seed: int) -> None:
    """Same seed on every rank; megatron-core derives the per-rank TP/EP streams from it."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def setup(cfg: MswiftConfig) -> TrainState:
    """Process groups, seeds, model, optimizer, then weights: the checkpoint in ``load`` if
    there is one, else ``hf_model``'s weights, else a random start. ``state.cfg`` is ``cfg``
    with the model section filled from ``hf_model``'s config.json. A ``save`` folder that
    holds another run's files is refused first (SaveDirError), on every rank."""
    check_save_dir(cfg)
    cfg = apply_hf_model(cfg)
    check_config(cfg)  # the command line ran these before start; API callers meet them here
    with phase("starting the process groups", "process groups started"):
        init_distributed(cfg)
    seed_everything(cfg.training.seed)
    with phase("building the model and optimizer", "built the model and optimizer"):
        state = build_training(cfg)
    load = cfg.checkpoint.load
    if load and checkpoint_exists(load):
        with phase(f"loading the checkpoint in {load}", "loaded the checkpoint"):
            state.extra = load_checkpoint(state, load,
                                          load_optim=not cfg.checkpoint.no_load_optim,
                                          load_rng=not cfg.checkpoint.no_load_rng)
        return state
    if load and dist.get_rank() == 0:
        print(f"load={load}: no checkpoint there yet; starting from "
              f"{'hf_model' if cfg.model.hf_model else 'scratch'}", flush=True)
    if cfg.model.hf_model:
        with phase(f"loading the HF weights of {cfg.model.hf_model}", "loaded the HF weights"):
            load_hf_checkpoint([ddp.module for ddp in state.model], cfg)
    return state


def run_training(cfg: MswiftConfig, state: TrainState | None = None) -> list[dict]:
    """Train until ``train_iters`` (or a stop condition); returns this run's step metrics."""
    state = state or setup(cfg)
    cfg = state.cfg
    ledger = (SaveLedger.open(cfg.checkpoint.save, continues_save_dir(cfg))
              if cfg.checkpoint.save else None)
    with phase("preparing the data", "data ready"):
        data, evaluator = _prepare_data(cfg, state)
    control = StopControl(cfg.training)
    throughput = DeviceThroughput(cfg)
    metrics = MetricsLog(cfg.checkpoint.save, state.iteration, cfg.training.train_iters,
                         cfg.training.log_interval)
    history, skipped_in_a_row = [], 0
    try:
        if evaluator is not None and state.iteration == 0:  # the baseline later evals fall from
            metrics.log({"step": 0, "eval_loss": evaluator.loss(state)})
        while state.iteration < cfg.training.train_iters:
            row = _one_step(cfg, state, data, throughput)
            skipped_in_a_row = 0 if row["updated"] else skipped_in_a_row + 1
            if evaluator is not None and state.iteration % cfg.training.eval_interval == 0:
                row["eval_loss"] = evaluator.loss(state)
            metrics.log(row)
            history.append(row)
            _check_nonfinite(cfg, row, skipped_in_a_row)
            reason = control.reason_to_stop(state.iteration)
            if _due(cfg, state.iteration) or reason:
                _save(cfg, state, data, ledger)
            if reason:
                if dist.get_rank() == 0:
                    print(f"stopping after step {state.iteration}: {reason}; checkpoint saved",
                          flush=True)
                return history
        if cfg.checkpoint.save and not _due(cfg, state.iteration) and history:
            _save(cfg, state, data, ledger)
        if cfg.checkpoint.save and cfg.checkpoint.save_hf:
            out = Path(cfg.checkpoint.save) / "hf"
            with phase(f"exporting the model as HF safetensors to {out}",
                       "exported the HF model") as info:
                save_hf_checkpoint([ddp.module for ddp in state.model], cfg, out)
                info.result = f"{human_bytes(folder_size(out))} in {out}"
        return history
    finally:
        control.close()
        metrics.close()


def _prepare_data(cfg: MswiftConfig, state: TrainState):
    """The training data, positioned where ``state`` resumes, and the evaluator (or None)."""
    data = IndexedTrainData(cfg) if cfg.data.data_path else TrainData(cfg, cfg.data.dataset)
    _restore_data(data, getattr(state, "extra", {}))
    evaluator = None
    if cfg.training.eval_interval and (cfg.data.eval_dataset or cfg.data.data_path):
        evaluator = Evaluator(cfg, data)
    return data, evaluator


def _one_step(cfg: MswiftConfig, state: TrainState, data: TrainData,
              throughput: DeviceThroughput) -> dict:
    reset_peak_memory()
    start = time.perf_counter()
    batches = data.next_step(state.iteration)
    stats = batch_stats(batches).to(local_device())
    dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    out = train_step(state, batches)
    synchronize()  # the step's queued device work belongs to its time
    seconds = time.perf_counter() - start
    return {
        "step": state.iteration,
        "loss": out["loss"],
        "lr": out["lr"],
        "grad_norm": out["grad_norm"],
        "loss_tokens": int(stats[0]),
        "tokens_per_s": stats[1].item() / seconds,
        "step_time_s": seconds,
        "padding_efficiency": (stats[1] / stats[2]).item(),
        "updated": out["updated"],
        **({"mtp_loss": out["mtp_loss"]} if "mtp_loss" in out else {}),
        **throughput.fields(stats[2].item(), seconds),
    }


def _check_nonfinite(cfg: MswiftConfig, row: dict, skipped_in_a_row: int) -> None:
    if row["updated"]:
        return
    t = cfg.training
    if t.nonfinite_policy == "stop" or skipped_in_a_row > t.max_skipped_steps:
        why = ("nonfinite_policy=stop" if t.nonfinite_policy == "stop"
               else f"more than max_skipped_steps={t.max_skipped_steps} in a row")
        raise TrainingStopped(
            f"step {row['step']}: loss {row['loss']} or gradients not finite; no parameter was "
            f"changed; stopping ({why})")


def _due(cfg: MswiftConfig, iteration: int) -> bool:
    ckpt = cfg.checkpoint
    return bool(ckpt.save and ckpt.save_interval and iteration % ckpt.save_interval == 0)


def _save(cfg: MswiftConfig, state: TrainState, data: TrainData, ledger: SaveLedger) -> None:
    if not cfg.checkpoint.save:
        return
    extra = {"data_states": _gather_data_states(data)}
    with phase(f"saving the checkpoint of step {state.iteration} under {cfg.checkpoint.save}",
               "saved the checkpoint") as info:
        final = save_checkpoint(state, cfg.checkpoint.save, extra=extra,
                                keep_last=cfg.checkpoint.save_total_limit,
                                ledger=ledger)
        info.result = f"{human_bytes(folder_size(final))} in {final}"


def _gather_data_states(data: TrainData) -> list | None:
    """Every data-parallel rank's pipeline position (rank 0 writes the common state)."""
    state = data.state_dict()
    if state is None:
        return None
    group = parallel_state.get_data_parallel_group()
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, state, group=group)
    return states


def _restore_data(data: TrainData, extra: dict) -> None:
    states = (extra or {}).get("data_states")
    if states is None:
        return
    if getattr(data, "position_is_global", False):  # consumed samples: any data-parallel size
        data.load_state_dict(states[0])
        return
    if len(states) != data.dp_size:
        raise ConfigError([f"load: the checkpoint's data position was saved by {len(states)} "
                           f"data-parallel ranks; this run has {data.dp_size}. Keep the "
                           "data-parallel size to resume the data stream exactly"])
    data.load_state_dict(states[data.dp_rank])


class Evaluator:
    """The loss of the first ``eval_iters`` global batches of ``eval_dataset``, or of
    data_path's valid split (a fixed set, so evaluations compare)."""

    def __init__(self, cfg: MswiftConfig, train_data=None):
        if isinstance(train_data, IndexedTrainData):
            self.steps = train_data.eval_steps()
            return
        data = TrainData(cfg, cfg.data.eval_dataset, stream_seed_offset=1)
        self.steps = [data.next_step(i) for i in range(cfg.training.eval_iters)]

    def loss(self, state: TrainState) -> float:
        losses = [eval_step(state, batches) for batches in self.steps]
        return sum(losses) / len(losses) if losses else math.nan
