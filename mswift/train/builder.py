"""Everything a training run holds: model chunks (DDP-wrapped), optimizer, LR schedule.

megatron-core does the work: ``DistributedDataParallel`` reduces gradients over data-parallel
ranks, ``get_megatron_optimizer`` builds the (distributed) Adam optimizer with fp32 main params
and gradient clipping, ``OptimizerParamScheduler`` the warmup + decay schedule.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from mswift.config.schema import ConfigError, MswiftConfig
from mswift.models.build import build_model, params_dtype, transformer_config
from mswift.runtime.device import local_device


@dataclass
class TrainState:
    cfg: MswiftConfig
    config: TransformerConfig
    model: list  # DDP-wrapped GPTModel chunks, one per virtual pipeline stage
    optimizer: object
    scheduler: OptimizerParamScheduler
    iteration: int = 0  # steps taken (a step skipped for non-finite numbers counts)
    extra: dict = field(default_factory=dict)  # loaded with the checkpoint (data position)


def build_training(cfg: MswiftConfig) -> TrainState:
    config = transformer_config(cfg)
    chunks = build_model(cfg, config)
    freeze_parameters(chunks, cfg.training.freeze_parameters)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    model = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Gradient buckets of the second and later chunks are not overlapped (no VPP overlap).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(optimizer_config(cfg), model)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return TrainState(cfg, config, model, optimizer, lr_scheduler(cfg, optimizer))


def freeze_parameters(chunks: list, patterns: list[str]) -> None:
    """Stop training every parameter whose name matches one of the regular expressions."""
    if not patterns:
        return
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ConfigError([f"freeze_parameters: {pattern!r} is not a regular expression "
                               f"({err})"]) from None
    trainable = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if any(p.search(name) for p in compiled):
                param.requires_grad_(False)
            trainable += param.requires_grad
    total = torch.tensor([trainable], device=local_device())
    torch.distributed.all_reduce(total)
    if total.item() == 0:
        raise ConfigError([f"freeze_parameters={patterns}: every parameter is frozen"])


def optimizer_config(cfg: MswiftConfig) -> OptimizerConfig:
    t = cfg.training
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        fp16=t.fp16,
        params_dtype=params_dtype(cfg),
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )


class WarmupFromFirstStep(OptimizerParamScheduler):
    """megatron-core's schedule, with a warmup whose first update is not at ``init_lr``.

    megatron-core's warmup gives ``init_lr + (lr - init_lr) * num_steps / warmup`` and
    ``num_steps`` counts the updates already made, so the first update of a warmup from 0 runs
    at lr 0 and changes nothing (Megatron-LM logs the rate after its scheduler step, ``k /
    warmup * lr`` at iteration k, not the rate the update used). Here update k of the warmup
    (k = 1 .. ``lr_warmup_iters``) runs at ``init_lr + (lr - init_lr) * k / warmup`` -- the rate
    Megatron-LM logs for it -- reaching ``lr`` on the last warmup step; from then on the rates
    are megatron-core's (the first decay step also at ``lr``). ``num_steps`` and the
    checkpointed state keep megatron-core's meaning (updates made).
    """

    def get_lr(self, param_group: dict) -> float:
        if 0 < self.lr_warmup_steps and self.num_steps < self.lr_warmup_steps:
            max_lr = param_group.get("max_lr", self.max_lr)
            fraction = (self.num_steps + 1) / self.lr_warmup_steps
            return self.init_lr + (max_lr - self.init_lr) * fraction
        return super().get_lr(param_group)


def lr_scheduler(cfg: MswiftConfig, optimizer) -> OptimizerParamScheduler:
    """Warmup to ``lr`` over ``lr_warmup_iters`` (step k at ``lr * k / lr_warmup_iters``), then
    megatron-core's decay to ``min_lr`` over ``lr_decay_iters`` (default ``train_iters``)."""
    t = cfg.training
    decay_iters = t.lr_decay_iters or t.train_iters
    return WarmupFromFirstStep(
        optimizer,
        init_lr=0.0 if t.lr_warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
