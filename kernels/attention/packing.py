"""Index helpers for packed (THD) batches described by ``cu_seqlens`` offsets."""
from __future__ import annotations

import torch


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """int64 ``[total]`` position of every packed token inside its own sample.

    ``total`` defaults to ``cu_seqlens[-1]``; tokens after it (padding) get positions counted
    from the end of the last sample. Pass ``total`` to avoid a device sync on GPU.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of offsets, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if total is None:
        total = int(cu[-1])
    starts = torch.cat([cu[:-1], cu[-1:]])  # the padding tail counts from the last offset
    lengths = torch.diff(cu, append=cu.new_tensor([total]))  # [num_samples + 1]
    token_start = torch.repeat_interleave(starts, lengths.clamp_min(0), output_size=total)
    return torch.arange(total, device=cu.device) - token_start  # [total]


def split_cu_seqlens_at_chunks(cu_seqlens: torch.Tensor,
                               chunk_size: int) -> tuple[torch.Tensor, int]:
    """Offsets of the same tokens with every sample cut at each multiple of ``chunk_size``.

    Llama-4 chunked attention over ``cu_seqlens`` equals plain (causal or bidirectional)
    attention over the returned offsets when queries and keys are the same tokens, which lets
    attention kernels without a chunk option (Transformer Engine, flash-attn) run it.
    Empty samples disappear. Returns ``(int32 offsets, longest piece)``; reads the offsets
    on the host (one device sync on GPU).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    cu = cu_seqlens.long()
    lengths = torch.diff(cu)  # [num_samples]
    pieces = torch.div(lengths + chunk_size - 1, chunk_size, rounding_mode="floor")
    num_pieces = int(pieces.sum())
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), pieces,
                                     output_size=num_pieces)  # [num_pieces]
    first_piece = torch.cumsum(pieces, 0) - pieces  # [num_samples]
    index_in_sample = torch.arange(num_pieces, device=cu.device) - first_piece[sample]
    starts = cu[sample] + index_in_sample * chunk_size
    offsets = torch.cat([starts, cu[-1:]]).to(torch.int32)
    longest = int(torch.diff(offsets).max()) if num_pieces else 0
    return offsets, longest
