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


FP8_MAX = 448.0  # largest float8_e4m3fn


@dataclass(frozen=True)
class Fp8Weight:
    """``q`` [out, in] float8_e4m3fn, ``scale`` fp32 holding values of the storage dtype:
    [out, 1] per output channel, or [ceil(out/br), ceil(in/bc)] per ``block`` (ragged last
    blocks cropped); ``w ~ q * scale``."""

    q: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None = None

    def expanded_scale(self) -> torch.Tensor:
        """[out, in] scale of each weight."""
        if self.block is None:
            return self.scale.float().expand(self.q.shape)
        rows, cols = self.q.shape
        br, bc = self.block
        scale = self.scale.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)
        return scale[:rows, :cols]


def fp8_quantize(weight: torch.Tensor, block: tuple[int, int] | None,
                 scale_dtype: torch.dtype = torch.bfloat16) -> Fp8Weight:
    """FP8 (e4m3) round to nearest, compressed-tensors' rule: ``scale = max|w| / 448`` per
    output channel (``block`` None) or per block, rounded to ``scale_dtype`` before the
    weights are divided by it (a zero scale replaced by the dtype's eps)."""
    w = weight.float()
    rows, cols = w.shape
    if block is None:
        absmax = w.abs().amax(dim=1, keepdim=True)
    else:
        br, bc = block
        pr, pc = -(-rows // br) * br, -(-cols // bc) * bc
        padded = w.new_zeros(pr, pc)
        padded[:rows, :cols] = w.abs()
        absmax = padded.reshape(pr // br, br, pc // bc, bc).amax(dim=(1, 3))
    scale = (absmax / FP8_MAX).to(scale_dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale_dtype).eps),
                        scale).float()
    fp8 = Fp8Weight(q=w, scale=scale, block=block)  # only to expand the scale
    q = (w / fp8.expanded_scale()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(q=q, scale=scale.to(scale_dtype), block=block)


def dequantize_fp8(fw: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] weights an FP8 weight stands for: ``q * scale`` in fp32, then ``dtype``."""
    return (fw.q.float() * fw.expanded_scale()).to(dtype)
