"""Triton varlen attention (CPU: TRITON_INTERPRET=1) against the torch reference.

The interpreter runs one program at a time, so the grid below is a covering set, not a
cartesian product: every sample length class (1, 2, block-1, block, block+1, random up to 300,
zero), 1-8 samples, heads/kv-heads 4/4, 8/2, 8/1, head dims 64, 128, 192/128 (and 256), causal
on and off, chunks and windows on and off each appear in at least one case. Tile sizes under
the interpreter are 64 (query tiles of the forward and dQ kernels, key tiles of dK/dV) and 32
(the other side), so 31-33 and 63-65 sit on block edges of every kernel.
"""
import random

import pytest
import torch

from mswift.kernels import varlen_attention, varlen_attention_reference
from mswift.kernels.attention.triton_common import (INTERPRETER_BLOCKS, BlockSizes,
                                                    override_block_sizes)

# on a GPU the same tests run the compiled kernels (tests/conftest.py sets the interpreter only
# where CUDA is absent)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BIG, SMALL = INTERPRETER_BLOCKS.fwd_m, INTERPRETER_BLOCKS.fwd_n
assert {BIG, SMALL} == {INTERPRETER_BLOCKS.dkdv_n, INTERPRETER_BLOCKS.dkdv_m}


def _random_lengths(seed, count, high=300):
    rng = random.Random(seed)
    return [rng.randint(1, high) for _ in range(count)]


def _cu(lengths):
    offsets = [0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()
    return torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


def _run(fn, q, k, v, lens_q, lens_k, dout, max_seqlen=None, **options):
    """Forward + backward; returns out, lse, dq, dk, dv."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    max_q = max_seqlen or max(lens_q, default=0)
    max_k = max_seqlen or max(lens_k, default=0)
    out, lse = fn(q, k, v, _cu(lens_q), _cu(lens_k), max_q, max_k, return_lse=True, **options)
    out.backward(dout)
    return out, lse, q.grad, k.grad, v.grad


def _inputs(lens_q, lens_k, heads, kv_heads, dim_qk, dim_v, dtype=torch.float32, seed=0, pad=0):
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q) + pad, sum(lens_k)
    q = torch.randn(total_q, heads, dim_qk, generator=gen).to(dtype)  # [tokens, heads, dim]
    k = torch.randn(total_k, kv_heads, dim_qk, generator=gen).to(dtype)
    v = torch.randn(total_k, kv_heads, dim_v, generator=gen).to(dtype)
    dout = torch.randn(total_q, heads, dim_v, generator=gen).to(dtype)
    return tuple(t.to(DEVICE) for t in (q, k, v, dout))


def _assert_matches(got, want, atol):
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        if name == "lse":  # queries that see no key: -inf in both
            assert torch.equal(torch.isinf(g), torch.isinf(w)), "lse -inf pattern differs"
            g, w = g[torch.isfinite(w)], w[torch.isfinite(w)]
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=0,
                                   msg=lambda m: f"{name}: {m}")


def _compare(lens_q, lens_k, heads, kv_heads, dim_qk, dim_v, dtype=torch.float32, atol=1e-4,
             pad=0, max_seqlen=None, **options):
    q, k, v, dout = _inputs(lens_q, lens_k, heads, kv_heads, dim_qk, dim_v, dtype, pad=pad)
    got = _run(varlen_attention, q, k, v, lens_q, lens_k, dout, max_seqlen, backend="triton",
               **options)
    if dtype != torch.float32:  # the reference of low-precision inputs is fp32 math on them
        q, k, v, dout = (t.float() for t in (q, k, v, dout))
    want = _run(varlen_attention_reference, q, k, v, lens_q, lens_k, dout, **options)
    _assert_matches(got, want, atol)
    return got


GRID = [
    # id, lens, heads, kv_heads, dim_qk, dim_v, options
    ("one-token", [1], 4, 4, 64, 64, dict(causal=True)),
    ("tiny-mixed-noncausal", [2, 1, BIG - 1], 8, 2, 64, 64, dict(causal=False)),
    ("block-edges-mqa", [BIG, BIG + 1, 0, SMALL - 1], 8, 1, 128, 128, dict(causal=True)),
    ("eight-samples-mla", [SMALL + 1, SMALL, 2, 1, 0, BIG, BIG + 1, BIG - 1], 4, 4, 192, 128,
     dict(causal=True)),
    ("random-chunk", _random_lengths(1, 3), 8, 2, 128, 128, dict(causal=True, chunk_size=48)),
    ("random-window-noncausal", _random_lengths(2, 2) + [250], 4, 4, 64, 64,
     dict(causal=False, window_size=(37, 11))),
    ("mla-window-noncausal", [BIG - 1, 150], 4, 4, 192, 128,
     dict(causal=False, window_size=(30, 70))),
    ("mqa-chunk-is-block-noncausal", _random_lengths(5, 4, 200), 8, 1, 64, 64,
     dict(causal=False, chunk_size=BIG)),
    ("causal-left-window", [3 * BIG + 5, 9], 8, 2, 128, 128,
     dict(causal=True, window_size=(50, -1))),
    ("window-and-chunk-mla", [100, BIG + 1], 8, 1, 192, 128,
     dict(causal=True, window_size=(50, -1), chunk_size=SMALL)),
    ("chunk-noncausal", [BIG + 1, 0, 130], 4, 4, 128, 128, dict(causal=False, chunk_size=40)),
    ("right-window-only", [90, 7], 4, 4, 64, 64, dict(causal=False, window_size=(-1, 5))),
    ("head-dim-256", [40, 70], 4, 4, 256, 256, dict(causal=True, softmax_scale=0.05)),
    ("random-300-gqa", _random_lengths(3, 2, 300) + [300], 8, 2, 64, 64, dict(causal=True)),
    ("eight-random-short", _random_lengths(4, 8, 80), 8, 2, 64, 64,
     dict(causal=False, window_size=(20, 20))),
]


@pytest.mark.parametrize("lens,heads,kv_heads,dim_qk,dim_v,options",
                         [case[1:] for case in GRID], ids=[case[0] for case in GRID])
def test_matches_reference_fp32(lens, heads, kv_heads, dim_qk, dim_v, options):
    _compare(lens, lens, heads, kv_heads, dim_qk, dim_v, **options)


@pytest.mark.parametrize("causal,options", [
    (True, {}), (False, dict(window_size=(6, 3))), (True, dict(chunk_size=16)),
], ids=["causal", "window", "chunk"])
def test_different_query_and_key_lengths(causal, options):
    # queries align to the end of the keys; len_q > len_k leaves queries that see nothing
    _compare([10, 70, 3, 0], [50, 40, 0, 5], 4, 2, 64, 64, causal=causal, **options)


def test_zero_length_samples_padding_tail_and_generous_max_seqlen():
    lens = [0, 33, 0, 0, 5, 0]
    got = _compare(lens, lens, 4, 2, 64, 64, pad=3, max_seqlen=200, causal=True)
    out, lse, dq = got[0], got[1], got[2]
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))  # padding rows stay zero
    assert torch.isinf(lse[:, -3:]).all() and torch.equal(dq[-3:], torch.zeros_like(dq[-3:]))


def test_only_empty_samples():
    q, k, v, dout = _inputs([0, 0], [0, 0], 4, 4, 64, 64)
    out, lse, dq, dk, dv = _run(varlen_attention, q, k, v, [0, 0], [0, 0], dout, backend="triton")
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0) and dq.shape == q.shape


def test_fp16_close_to_fp32_math():
    _compare([BIG + 1, 20], [BIG + 1, 20], 8, 2, 192, 128, dtype=torch.float16, atol=1e-2,
             causal=True, chunk_size=32)


def test_bf16_close_to_fp32_math():
    # the interpreter computes bf16 arithmetic wrongly; there the kernels upcast after loads
    _compare([BIG + 1, 20], [BIG + 1, 20], 4, 4, 64, 64, dtype=torch.bfloat16, atol=4e-2,
             causal=True)


def test_square_tiles_and_strided_inputs():
    """Equal query/key tiles, and q/k/v as strided views into one fused projection."""
    lens = [SMALL + 1, 17]
    gen = torch.Generator().manual_seed(5)
    fused = torch.randn(sum(lens), 4 + 2 + 2, 64, generator=gen).to(DEVICE)  # [tokens, heads, dim]
    q, k, v = fused[:, :4], fused[:, 4:6], fused[:, 6:]  # q, k, v heads of a fused projection
    dout = torch.randn(sum(lens), 4, 64, generator=gen).to(DEVICE)
    with override_block_sizes(BlockSizes(32, 32, 32, 32, 32, 32)):
        got = _run(varlen_attention, q, k, v, lens, lens, dout, backend="triton", causal=True)
    want = _run(varlen_attention_reference, q, k, v, lens, lens, dout, causal=True)
    _assert_matches(got, want, 1e-4)


def test_auto_backend_uses_triton_under_interpreter():
    q, k, v, _ = _inputs([5], [5], 4, 4, 64, 64)
    q.requires_grad_()
    out = varlen_attention(q, k, v, _cu([5]), _cu([5]), 5, 5, causal=True)
    assert "VarlenAttentionFunction" in type(out.grad_fn).__name__
    out = varlen_attention(q, k, v, _cu([5]), _cu([5]), 5, 5, causal=True, backend="torch")
    assert "VarlenAttentionFunction" not in type(out.grad_fn).__name__
