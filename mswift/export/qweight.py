"""One quantized weight, the grid every mswift quantizer writes to.

The grid is compressed-tensors' (what llm-compressor writes and vLLM / transformers load):
symmetric integers in ``[-2**(bits-1), 2**(bits-1) - 1]``, one scale per output row and group
of ``group_size`` input columns, ``scale = max|w| / ((qmax - qmin) / 2)`` (so 4 bits divide by
7.5, not 7), a zero scale replaced by the scale dtype's eps, and ``w ~ q * scale``. Scales are
rounded to the dtype they are stored in *before* the integers are computed, so dequantizing
the stored tensors gives exactly what the quantizer meant.

RTN, GPTQ and AWQ differ only in which integers they pick; they all return a
``QuantizedWeight`` on this grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """``q`` [out, in] integers (int8 storage), ``scale`` [out, groups] in the storage dtype.

    ``group_size`` is the number of input columns per scale; it equals ``in`` for one scale
    per output row (channel-wise). ``g_idx`` [in] maps each input column to its group when
    the columns were quantized out of order (GPTQ act-order); ``None`` means column ``j``
    belongs to group ``j // group_size``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def column_groups(self) -> torch.Tensor:
        """[in] group index of each input column."""
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(self.q.shape[1], device=self.q.device) // self.group_size


def int_range(bits: int) -> tuple[int, int]:
    """The symmetric signed grid of ``bits`` bits: (qmin, qmax)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_group_size(name: str, in_features: int, group_size: int) -> None:
    """Refuse a group size that does not divide a layer's input features, naming the layer."""
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"{name}: group size {group_size} does not divide its {in_features} input features; "
            "pick a group size that divides every quantized layer's input features "
            "(or -1 for one scale per output channel)")


def symmetric_scale(absmax: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scale for groups whose largest magnitude is ``absmax``, rounded to ``scale_dtype``.

    Returned in fp32 holding values exactly representable in ``scale_dtype``.
    """
    qmin, qmax = int_range(bits)
    scale = (absmax.float() / ((qmax - qmin) / 2)).to(scale_dtype)
    eps = torch.finfo(scale_dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale).float()


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w / scale`` to the nearest integer of the grid (ties to even), as int8."""
    qmin, qmax = int_range(bits)
    return torch.clamp(torch.round(w.float() / scale), qmin, qmax).to(torch.int8)


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int,
                 scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Round-to-nearest: each group's scale from its own max |w|. ``weight`` [out, in]."""
    out_features, in_features = weight.shape
    assert in_features % group_size == 0, (in_features, group_size)
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scale = symmetric_scale(groups.abs().amax(dim=-1), bits, scale_dtype)  # [out, groups]
    q = quantize_to_grid(groups, scale.unsqueeze(-1), bits).reshape(out_features, in_features)
    return QuantizedWeight(q=q, scale=scale.to(scale_dtype), bits=bits, group_size=group_size)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] weights the quantized tensors stand for: ``q * scale`` in fp32, then ``dtype``."""
    per_column_scale = qw.scale.float()[:, qw.column_groups()]  # [out, in]
    return (qw.q.float() * per_column_scale).to(dtype)
