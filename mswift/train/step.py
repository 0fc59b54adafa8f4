"""One optimizer step through megatron-core's pipeline schedules.

The loss is a per-token mean over every loss token of the global batch (all micro-batches, all
data-parallel ranks): each micro-batch returns its loss *sum* and token count, and
megatron-core divides the gradients by the global count (``calculate_per_token_loss``).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from mswift.runtime.device import local_device
from mswift.train.builder import TrainState


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    # output_tensor: per-token cross entropy [batch, seq]
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output_tensor.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def model_inputs(batch: dict, device: torch.device | None = None) -> dict:
    """GPTModel keyword arguments for a micro-batch, on ``device`` (default: this rank's).

    A micro-batch has ``tokens`` (or ``input_ids``), ``labels``, ``loss_mask`` and
    ``position_ids``, all ``[rows, seq]``. A packed one also has ``cu_seqlens`` (int32 sample
    boundaries over the flattened rows) and ``max_seqlen``: it is then passed to megatron-core
    as one THD sequence ``[1, rows * seq]`` with ``PackedSeqParams``, so attention stays
    inside each sample (a varlen attention backend only). An unpacked one is fed as it is,
    ``[rows, seq]`` with a causal mask on every backend: its padding is at the end of each row
    (``attention_mask`` False there), so no real token sees a padded one, and padded positions
    have no loss. Labels of tokens without loss (-100 in the data pipeline) become 0:
    the loss mask removes them, and the vocab-parallel cross entropy needs valid ids. The loss
    mask goes in too: megatron-core's multi-token prediction shifts it with the labels (it
    would take every token, prompts and padding included, without it).
    ``padding_mask`` (True on padding: ``attention_mask`` False; shaped as the tokens fed, None
    without an ``attention_mask``) keeps the padding out of MoE routers' statistics -- token
    counts per expert, hence the expert-bias update, the auxiliary and z losses; prompt tokens
    without loss are real tokens and count.
    Lengths are read while the batch is still on the host, so moving it costs no device sync.
    """
    device = local_device() if device is None else device
    tokens = batch["tokens"] if "tokens" in batch else batch["input_ids"]
    labels = batch["labels"].clamp(min=0)
    position_ids = batch["position_ids"]
    loss_mask = batch["loss_mask"].float()
    packed = None
    padding = ~batch["attention_mask"] if "attention_mask" in batch else None
    if padding is not None and "cu_seqlens" not in batch:
        assert not (padding[:, :-1] & ~padding[:, 1:]).any(), "padding must end each row"
    if "cu_seqlens" in batch:
        tokens, labels, position_ids, loss_mask = (
            t.reshape(1, -1) for t in (tokens, labels, position_ids, loss_mask))
        padding = padding.reshape(1, -1) if padding is not None else None
        cu = batch["cu_seqlens"].to(torch.int32)
        longest = int(batch["max_seqlen"]) if "max_seqlen" in batch else int((cu[1:] - cu[:-1]).max())
        cu = _to(cu, device)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
    return dict(input_ids=_to(tokens, device), position_ids=_to(position_ids, device),
                attention_mask=None, labels=_to(labels, device), packed_seq_params=packed,
                padding_mask=_to(padding, device) if padding is not None else None,
                loss_mask=_to(loss_mask, device))


def stage_padding_mask(model, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``padding_mask`` ``[b, s]`` as ``model``'s MoE layers take it: megatron-core 0.16.1's
    GPTModel scatters it over the sequence for sequence parallelism on the first pipeline stage
    only, while later stages' hidden states are scattered too; there this rank's slice."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model, get_model_config

    if padding_mask is None or get_attr_wrapped_model(model, "pre_process"):
        return padding_mask
    if not get_model_config(model).sequence_parallel:
        return padding_mask
    size = parallel_state.get_tensor_model_parallel_world_size()
    return padding_mask.chunk(size, dim=1)[parallel_state.get_tensor_model_parallel_rank()]


def _fed_shape(batch: dict) -> tuple[int, int]:
    """[micro batch, seq] of the tokens :func:`model_inputs` feeds (a packed batch is one row)."""
    tokens = batch["tokens"] if "tokens" in batch else batch["input_ids"]
    return (1, tokens.numel()) if "cu_seqlens" in batch else tuple(tokens.shape)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Queued without waiting: the forward pass that reads it runs on the same stream.
    return tensor.to(device, non_blocking=True)


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = local_device()
    inputs = model_inputs(batch, device)
    inputs["padding_mask"] = stage_padding_mask(model, inputs["padding_mask"])
    output = model(**inputs)
    return output, partial(_loss_func, _to(batch["loss_mask"], device))


def train_step(state: TrainState, micro_batches: list[dict]) -> dict:
    """Forward/backward over ``micro_batches`` (this rank's share of the step), then update."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    outputs = _run_schedule(state, micro_batches, forward_only=False)
    loss = global_mean_loss(outputs)
    finite = all_ranks_finite(state, loss)
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    updated, grad_norm = False, math.nan
    if finite:  # otherwise no rank touches its parameters or optimizer state
        updated, norm, _ = state.optimizer.step()
        grad_norm = float(norm) if norm is not None else math.nan
    if updated:
        state.scheduler.step(increment=1)
    state.iteration += 1  # a skipped step still consumes its batch
    out = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "updated": bool(updated),
        "finite": finite,
    }
    if state.cfg.model.mtp_num_layers:
        out["mtp_loss"] = mtp_step_losses(state.cfg.model.mtp_num_layers, len(micro_batches))
    return out


def mtp_step_losses(depths: int, micro_batches: int) -> list[float]:
    """Each multi-token-prediction depth's loss of this step, as Megatron-LM logs it: the mean
    over micro-batches and data-parallel ranks of each micro-batch's per-token MTP loss
    (megatron-core adds them up in its tracker during the training forward passes, on the last
    pipeline stage). Every rank calls this; the tracker is emptied for the next step."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    total = torch.zeros(depths + 1, dtype=torch.float64, device=local_device())
    if "values" in tracker:  # [depths] sums of per-micro-batch means
        total[:depths] = tracker["values"].double() / micro_batches
        total[depths] = 1  # one more rank that holds them
        tracker["values"].zero_()
    if dist.is_initialized():
        dist.all_reduce(total)
    if total[depths] == 0:
        return [math.nan] * depths
    return (total[:depths] / total[depths]).tolist()


def all_ranks_finite(state: TrainState, loss: float) -> bool:
    """Whether the loss and every rank's reduced gradients are finite (agreed by all ranks)."""
    bad = torch.zeros(1, device=local_device())
    if not math.isfinite(loss):
        bad += 1
    for chunk in state.model:
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            bad += ~torch.isfinite(buffer.grad_data).all()  # no host sync per buffer
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def global_mean_loss(outputs: list[dict]) -> float:
    """Mean loss per token over the global batch, the same number on every rank.

    Only the last pipeline stage has losses; its tensor/context-parallel ranks hold copies, and
    every data-parallel replica is duplicated alike, so summing (loss, count) over all ranks and
    dividing gives the global per-token mean.
    """
    total = torch.zeros(2, dtype=torch.float64, device=local_device())
    for out in outputs or []:
        total += out["lm loss"].double()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else math.nan


def eval_step(state: TrainState, micro_batches: list[dict]) -> float:
    """Forward only: the global per-token mean loss of ``micro_batches`` (no update)."""
    for chunk in state.model:
        chunk.eval()
    try:
        with torch.no_grad():
            outputs = _run_schedule(state, micro_batches, forward_only=True)
    finally:
        for chunk in state.model:
            chunk.train()
    return global_mean_loss(outputs)


def _run_schedule(state: TrainState, micro_batches: list[dict], forward_only: bool) -> list:
    """megatron-core's schedule for the layout (no pipelining, 1F1B or interleaved)."""
    shape = _fed_shape(micro_batches[0])
    iterators = [iter(micro_batches) for _ in state.model]
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=state.model,
        num_microbatches=len(micro_batches),
        seq_length=shape[1],
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )
