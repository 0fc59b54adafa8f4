"""GPTQ (Frantar et al., 2022): quantize a linear's columns one by one, each time moving the
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer-output objective ``||W X - Q X||^2`` (``H = sum over tokens of x x^T``).

Written from the paper's formulas: the rows of the Cholesky factor of the damped inverse
Hessian give, for each column in turn, the inverse Hessian of the columns still left (so no
inverse is updated in the loop), and updates to columns outside the current block are applied
once per block ("lazy batch" updates). The result sits on the shared grid of
:mod:`mswift.export.qweight`, so packing and dequantizing are the same as for RTN.
"""
from __future__ import annotations

import torch

from mswift.export.qweight import QuantizedWeight, quantize_to_grid, rtn_quantize, symmetric_scale


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4,
                  group_size: int = 128, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128,
                  scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [out, in] given ``hessian`` [in, in] (sum of x x^T, fp32).

    - Each group's scale is taken from its weights *as error-updated so far* when the group's
      first column is reached (as AutoGPTQ and the paper do), so earlier columns' errors are
      covered by the group's range.
    - Dead columns (zero Hessian diagonal: inputs that were always zero) get weight 0 and a
      unit diagonal; damping adds ``damp`` times the mean diagonal to the diagonal.
    - ``act_order`` processes columns by descending ``diag(H)`` (the inputs with the most
      energy first, while there are the most columns left to absorb their error) but keeps
      groups as contiguous runs of ``group_size`` *original* columns, so ``g_idx`` stays
      ``None``. This is compressed-tensors' ``actorder: "weight"`` (alias ``"static"``), the
      only activation ordering compressed-tensors 0.20 accepts (``"group"``, which writes a
      ``weight_g_idx`` permutation, was removed), so the checkpoint is an ordinary grouped
      ``pack-quantized`` one that transformers and vLLM load with their fast kernels.

    Arithmetic runs in fp32, or in fp64 when ``hessian`` is fp64 (tests compare against a
    reference written in fp64). ``block_size`` changes speed, never the result.
    """
    out_features, in_features = weight.shape
    assert hessian.shape == (in_features, in_features), (weight.shape, hessian.shape)
    assert group_size > 0 and in_features % group_size == 0, (in_features, group_size)
    dtype = torch.promote_types(hessian.dtype, torch.float32)
    w = weight.to(dtype).clone()
    h = hessian.to(dtype).clone()

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    else:
        order = torch.arange(in_features, device=w.device)
    w, h = w[:, order], h[order][:, order]
    u = _inverse_hessian_factor(h, damp)

    group_of = (order // group_size).tolist()  # group of each column, in processing order
    positions = [[] for _ in range(in_features // group_size)]  # group -> its positions
    for p, g in enumerate(group_of):
        positions[g].append(p)
    scale = torch.empty(out_features, in_features // group_size, dtype=dtype,
                        device=w.device)
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=w.device)
    started = [False] * len(positions)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        block = w[:, i1:i2].clone()  # [out, cols in block], updated eagerly
        err = torch.zeros_like(block)  # scaled errors of this block's columns
        for i in range(i2 - i1):
            p = i1 + i
            g = group_of[p]
            if not started[g]:
                started[g] = True
                current = _current_columns(w, block, err[:, :i], u, i1, i2,
                                           torch.tensor(positions[g], device=w.device))
                scale[:, g] = symmetric_scale(current.abs().amax(dim=1), bits, scale_dtype)
            col_scale = scale[:, g]
            q[:, p] = quantize_to_grid(block[:, i], col_scale, bits)
            err[:, i] = (block[:, i] - q[:, p].to(dtype) * col_scale) / u[p, p]
            block[:, i + 1:] -= err[:, i:i + 1] * u[p, p + 1:i2]
        w[:, i2:] -= err @ u[i1:i2, i2:]

    q_original = torch.empty_like(q)
    q_original[:, order] = q
    return QuantizedWeight(q=q_original, scale=scale.to(scale_dtype), bits=bits,
                           group_size=group_size)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of the damped ``H^-1`` (``H^-1 = U^T U``).

    Row ``p`` of ``U`` divided by ``U[p, p]`` is row ``p`` of the inverse Hessian of the
    columns ``p..`` once columns ``..p-1`` are fixed, which is what each GPTQ step needs.
    """
    h = h.clone()
    diag = torch.diagonal(h)
    diag += damp * diag.mean()
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"GPTQ: the Hessian is not positive definite even with damping {damp} of its mean "
            "diagonal; raise the damping or use more calibration tokens") from e
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _current_columns(w: torch.Tensor, block: torch.Tensor, pending: torch.Tensor,
                     u: torch.Tensor, i1: int, i2: int, cols: torch.Tensor) -> torch.Tensor:
    """The error-updated weights [out, len(cols)] of positions ``cols`` (none quantized yet).

    Columns inside the current block are up to date in ``block``; later columns still lack
    this block's ``pending`` errors (lazy updates), which are applied here for them alone.
    """
    inside = cols < i2
    current = torch.empty(w.shape[0], cols.numel(), dtype=w.dtype, device=w.device)
    current[:, inside] = block[:, cols[inside] - i1]
    later = cols[~inside]
    current[:, ~inside] = w[:, later] - pending @ u[i1:i1 + pending.shape[1], later]
    return current


def quantize(hf_name: str, weight: torch.Tensor, stats, group_size: int) -> QuantizedWeight:
    """``mswift export --quant w4a16-gptq``: 4 bits, act-order, the Hessian of the linear's
    calibration inputs; RTN for a linear no calibration token reached, and for an MoE expert
    that saw fewer tokens than it has input features (its Hessian is rank-deficient: GPTQ
    would fit those few rows and move the weight freely in the directions they miss)."""
    if stats.tokens == 0 or (".experts." in hf_name and stats.tokens < weight.shape[1]):
        return rtn_quantize(weight, bits=4, group_size=group_size)
    return gptq_quantize(weight, stats.hessian, bits=4, group_size=group_size, act_order=True)
