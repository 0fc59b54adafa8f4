"""Logits and loss of a sharded megatron-core model for a batch of tokens, through megatron-core's
own pipeline schedules (no pipelining, 1F1B or interleaved), as training runs it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from mswift.runtime.device import local_device


def _forward_only(chunks, micro_batches: list, seq: int, call) -> list | None:
    """``call(model, micro_batch)`` on every micro-batch through megatron-core's forward-only
    schedule; its outputs on last-stage ranks, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def keep_output(output, non_loss_data=False):
        return output

    def forward_step(data_iterator, model):
        return call(model, next(data_iterator)), keep_output

    iterators = [iter(micro_batches) for _ in chunks]
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    return outputs if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def megatron_logits(chunks, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """fp32 logits ``[batch, seq, vocab_size]`` (padding rows cut) on last-stage ranks, else None.

    Each sequence is one micro-batch; logits are gathered over tensor parallelism.
    """
    batch, seq = tokens.shape
    tokens = tokens.to(local_device())
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0)
    outputs = _forward_only(chunks, [tokens[i: i + 1] for i in range(batch)], seq,
                            lambda model, t: model(t, positions, None, runtime_gather_output=True))
    if outputs is None:
        return None
    return torch.cat(outputs)[..., :vocab_size].float()  # [batch, seq, vocab]


def megatron_loss(chunks, tokens: torch.Tensor) -> float | None:
    """The model's own next-token loss of ``tokens`` (megatron-core's vocab-parallel cross
    entropy, as training computes it), mean per token, on last-stage ranks, else None."""
    batch, seq = tokens.shape
    tokens = tokens.to(local_device())
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0)
    labels = torch.roll(tokens, -1, dims=1)  # the last position's label is not counted
    micro_batches = [(tokens[i: i + 1], labels[i: i + 1]) for i in range(batch)]
    outputs = _forward_only(chunks, micro_batches, seq,
                            lambda model, b: model(b[0], positions, None, labels=b[1]))
    if outputs is None:
        return None
    return torch.cat(outputs)[:, :-1].double().mean().item()  # [batch, seq] per-token losses


def gather_to_rank0(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The first rank's non-None ``tensor``, delivered to rank 0 (None on other ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, None if tensor is None else tuple(tensor.shape))
    src = next(i for i, s in enumerate(shapes) if s is not None)
    rank = dist.get_rank()
    if src == 0:
        return tensor if rank == 0 else None
    if rank == src:
        dist.send(tensor.contiguous(), dst=0)
        return None
    if rank == 0:
        out = torch.empty(shapes[src], dtype=torch.float32, device=local_device())
        dist.recv(out, src=src)
        return out
    return None
