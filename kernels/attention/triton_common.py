"""Pieces shared by the forward and backward Triton attention kernels.

Coordinates: ``i`` indexes queries and ``j`` keys, both counted from their sample's start; a
query's position in key coordinates is ``pos = i + len_k - len_q``. Masks follow
``reference.sample_attention_mask``; causal is passed as a right window of 0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .env import interpreter_enabled

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E); host-side value
# kernels may only read globals that are constexpr (the interpreter does not enforce it)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (queries x keys) and their launch settings."""

    fwd_m: int
    fwd_n: int
    dkdv_m: int  # queries per step of the dK/dV kernel
    dkdv_n: int  # keys owned by one dK/dV program
    dq_m: int
    dq_n: int
    num_warps: int = 4  # forward
    num_stages: int = 2
    bwd_num_warps: int = 4  # dK/dV and dQ
    bwd_num_stages: int = 2


# Under the interpreter programs run one after another in Python: fewer, larger tiles are
# faster. Query and key tiles differ on purpose so that tests catch mixed-up block sizes.
INTERPRETER_BLOCKS = BlockSizes(fwd_m=64, fwd_n=32, dkdv_m=32, dkdv_n=64, dq_m=64, dq_n=32)

_override: list[BlockSizes] = []


@contextlib.contextmanager
def override_block_sizes(blocks: BlockSizes):
    """Force the tile sizes of every launch inside the ``with`` block (tests, tuning)."""
    _override.append(blocks)
    try:
        yield
    finally:
        _override.pop()


def choose_block_sizes(head_dim_qk: int, head_dim_v: int) -> BlockSizes:
    """Tile sizes for a launch; a starting point for GPUs, not yet tuned on one."""
    if _override:
        return _override[-1]
    if interpreter_enabled():
        return INTERPRETER_BLOCKS
    # Chosen so that ptxas (sm_90a) reports no register spills for bf16 (see compile_check.py);
    # not yet timed on a GPU. The backward keeps fp32 dK and dV tiles of [dkdv_n, head_dim] in
    # registers, so wide heads get fewer keys per program.
    widest = max(head_dim_qk, head_dim_v)
    if widest <= 64:
        return BlockSizes(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=3,
                          bwd_num_warps=8, bwd_num_stages=3)
    if widest <= 128:
        return BlockSizes(128, 64, 32, 64, 64, 32, num_warps=8, num_stages=3,
                          bwd_num_warps=8, bwd_num_stages=3)
    if widest <= 192:
        return BlockSizes(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=2,
                          bwd_num_warps=8, bwd_num_stages=2)
    return BlockSizes(32, 64, 32, 32, 32, 32, num_warps=8, num_stages=2,
                      bwd_num_warps=8, bwd_num_stages=2)


def padded_dim(dim: int) -> int:
    """Head dims live in power-of-two tiles (tl.arange needs it); 192 runs in a 256 tile."""
    return max(16, triton.next_power_of_2(dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots (tf32 would miss the 1e-4 fp32 tolerance)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def needs_upcast(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16 arithmetic and bf16 dots wrongly: upcast after loads."""
    return dtype == torch.bfloat16 and interpreter_enabled()


@triton.jit
def sample_bounds(cu_seqlens_q, cu_seqlens_k, b):
    """Start and length of sample ``b`` in the packed query and key tensors."""
    q_start = tl.load(cu_seqlens_q + b)
    len_q = tl.load(cu_seqlens_q + b + 1) - q_start
    k_start = tl.load(cu_seqlens_k + b)
    len_k = tl.load(cu_seqlens_k + b + 1) - k_start
    return q_start, len_q, k_start, len_k


@triton.jit
def visible_mask(i, j, len_q, len_k, left, right, chunk,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """True where query ``i`` may attend key ``j``; ``i`` and ``j`` broadcast to a 2-D tile."""
    pos = i + (len_k - len_q)
    mask = (i < len_q) & (j < len_k)
    if HAS_RIGHT:
        mask = mask & (j <= pos + right)
    if HAS_LEFT:
        mask = mask & (j >= pos - left)
    if HAS_CHUNK:
        # integer division of negatives differs between compiled Triton and the interpreter:
        # only non-negative values are divided.
        pos_chunk = tl.where(pos >= 0, tl.maximum(pos, 0) // chunk, -1)
        mask = mask & (pos_chunk == j // chunk)
    return mask


@triton.jit
def key_range(i_first, i_last, len_q, len_k, left, right, chunk,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Keys [lo, hi) that queries i_first..i_last may see (a superset; the mask is exact)."""
    pos_first = i_first + (len_k - len_q)
    pos_last = i_last + (len_k - len_q)
    lo = len_k * 0
    hi = len_k
    if HAS_RIGHT:
        hi = tl.minimum(hi, pos_last + right + 1)
    if HAS_LEFT:
        lo = tl.maximum(lo, pos_first - left)
    if HAS_CHUNK:
        lo = tl.maximum(lo, (tl.maximum(pos_first, 0) // chunk) * chunk)
        hi = tl.minimum(hi, (tl.maximum(pos_last, 0) // chunk + 1) * chunk)
    return lo, hi


@triton.jit
def query_range(j_first, j_last, len_q, len_k, left, right, chunk,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Queries [lo, hi) that may see any of keys j_first..j_last (a superset)."""
    shift = len_k - len_q  # i = pos - shift
    lo = len_q * 0
    hi = len_q
    if HAS_RIGHT:
        lo = tl.maximum(lo, j_first - right - shift)
    if HAS_LEFT:
        hi = tl.minimum(hi, j_last + left - shift + 1)
    if HAS_CHUNK:
        lo = tl.maximum(lo, (j_first // chunk) * chunk - shift)
        hi = tl.minimum(hi, (j_last // chunk + 1) * chunk - shift)
    return lo, hi
