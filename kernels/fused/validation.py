"""Argument checks shared by the Triton and torch paths of the fused ops.

Shapes, dtypes and options are always checked; index values (positions, targets) only on the
CPU, where reading them costs no device sync.
"""
from __future__ import annotations

import torch

ROTARY_LAYOUTS = ("half", "interleaved", "deinterleaved")
ROTARY_AT = ("first", "last")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int32, torch.int64)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else repr(t)


def _check_float(name: str, t, min_dim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() < min_dim:
        raise ValueError(f"{name} must be a tensor with at least {min_dim} dims, got {_shape(t)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp16, bf16, fp32 or float64, got {t.dtype}")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_index_values(name: str, t: torch.Tensor, high: int, what: str) -> None:
    if t.device.type == "cpu" and t.numel():
        low, top = int(t.min()), int(t.max())
        if low < 0 or top >= high:
            raise ValueError(f"{name} must lie in [0, {high}) ({what}), got values from {low} "
                             f"to {top}")


def check_rms_norm_inputs(x, weight, eps) -> None:
    _check_float("x", x, 1)
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(f"weight must be a [{x.shape[-1]}] tensor (x's last dim) or None, "
                             f"got {_shape(weight)}")
        if not weight.is_floating_point() or weight.device != x.device:
            raise ValueError(f"weight must be a floating point tensor on {x.device}, got "
                             f"{weight.dtype} on {weight.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


def check_rotary_inputs(x, cos, sin, positions, cu_seqlens, layout, rotary_at) -> None:
    """Raise ValueError on bad ``apply_rotary`` arguments."""
    _check_float("x", x, 3)
    for name, table in (("cos", cos), ("sin", sin)):
        _check_float(name, table, 2)
        if table.dim() != 2 or table.device != x.device:
            raise ValueError(f"{name} must be a [positions, rotary_dim / 2] table on {x.device}, "
                             f"got {_shape(table)} on {table.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {_shape(cos)} and {_shape(sin)}")
    if not 1 <= 2 * cos.shape[1] <= x.shape[-1]:
        raise ValueError(f"cos/sin hold {cos.shape[1]} angles per position: rotary_dim = "
                         f"{2 * cos.shape[1]} must be in [2, head_dim = {x.shape[-1]}]")
    if layout not in ROTARY_LAYOUTS:
        raise ValueError(f"layout must be one of {ROTARY_LAYOUTS}, got {layout!r}")
    if rotary_at not in ROTARY_AT:
        raise ValueError(f"rotary_at must be one of {ROTARY_AT}, got {rotary_at!r}")
    if (positions is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of positions (table row of every token) and "
                         "cu_seqlens (packed samples, positions restart at each offset)")
    if cu_seqlens is not None:
        if x.dim() != 3:
            raise ValueError(f"cu_seqlens needs x as [tokens, heads, head_dim], got "
                             f"{_shape(x)}")
        return
    if not isinstance(positions, torch.Tensor) or positions.dtype not in _INT_DTYPES:
        raise ValueError(f"positions must be an int32/int64 tensor, got {_shape(positions)}")
    try:
        fits = torch.broadcast_shapes(positions.shape, x.shape[:-2]) == x.shape[:-2]
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"positions {_shape(positions)} must broadcast to x's token dims "
                         f"{tuple(x.shape[:-2])}")
    _check_index_values("positions", positions, cos.shape[0], "rows of the cos/sin tables")


def check_swiglu_inputs(x) -> None:
    _check_float("x", x, 1)
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even ([..., gate | up]), got {x.shape[-1]}")


def check_cross_entropy_inputs(logits, targets, vocab_size, vocab_start) -> None:
    """Raise ValueError on bad ``vocab_parallel_cross_entropy`` arguments."""
    _check_float("logits", logits, 1)
    if logits.shape[-1] < 1:
        raise ValueError("logits must have at least one vocabulary column")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in _INT_DTYPES:
        raise ValueError(f"targets must be an int32/int64 tensor, got {_shape(targets)}")
    if targets.shape != logits.shape[:-1] or targets.device != logits.device:
        raise ValueError(f"targets must be {tuple(logits.shape[:-1])} (logits without the vocab "
                         f"dim) on {logits.device}, got {_shape(targets)} on {targets.device}")
    _check_int("vocab_size", vocab_size, 1)
    _check_int("vocab_start", vocab_start, 0)
    _check_index_values("targets", targets, vocab_size, "token ids of the real vocabulary")
