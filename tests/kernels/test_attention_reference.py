"""The torch reference of varlen attention, checked against oracles that do not share its code.

Oracles: a per-query loop that applies FlashAttention's documented window rule and Llama-4's
chunk rule directly, torch's own scaled_dot_product_attention, and Hugging Face's mask
functions and Llama-4 attention module.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mswift.kernels import (llama4_attn_temperature_scale, positions_from_cu_seqlens,
                            split_cu_seqlens_at_chunks, varlen_attention,
                            varlen_attention_reference)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _visible(i, j, len_q, len_k, causal, window, chunk):
    """FlashAttention's rule: query i sees keys [i + shift - left, i + shift + right],
    shift = len_k - len_q; Llama-4's rule: only keys of the query's own chunk."""
    shift = len_k - len_q
    if causal and j > i + shift:
        return False
    if window[0] >= 0 and j < i + shift - window[0]:
        return False
    if window[1] >= 0 and j > i + shift + window[1]:
        return False
    if chunk is not None:  # Llama-4: same aligned chunk of the sample
        if i + shift < 0 or math.floor(j / chunk) != math.floor((i + shift) / chunk):
            return False
    return True


def naive_varlen_attention(q, k, v, lens_q, lens_k, scale, causal, window, chunk):
    """One query at a time, float64; returns out [Tq, H, dv] and lse [H, Tq]."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    q0 = k0 = 0
    for len_q, len_k in zip(lens_q, lens_k):
        for h in range(q.shape[1]):
            for i in range(len_q):
                keys = [j for j in range(len_k)
                        if _visible(i, j, len_q, len_k, causal, window, chunk)]
                if not keys:
                    continue
                rows = torch.tensor(keys) + k0
                scores = (k[rows, h // group].double() @ q[q0 + i, h].double()) * scale
                out[q0 + i, h] = torch.softmax(scores, 0) @ v[rows, h // group].double()
                lse[h, q0 + i] = torch.logsumexp(scores, 0)
        q0, k0 = q0 + len_q, k0 + len_k
    return out, lse


CASES = [
    # lens_q, lens_k, heads, kv_heads, causal, window, chunk
    ([5, 0, 9], [5, 0, 9], 4, 4, True, (-1, -1), None),
    ([7, 12], [7, 12], 4, 2, False, (-1, -1), None),
    ([11, 3], [11, 3], 4, 1, True, (3, -1), None),
    ([13], [13], 2, 2, False, (2, 4), None),
    ([17, 6], [17, 6], 4, 2, True, (-1, -1), 4),
    ([10], [10], 2, 1, False, (-1, -1), 3),
    ([9, 4], [9, 4], 2, 2, True, (5, -1), 4),
    ([4, 6, 3], [9, 2, 0], 4, 2, True, (-1, -1), None),  # len_q != len_k, empty rows
    ([4, 6], [9, 2], 2, 2, False, (1, 2), 3),
]


@pytest.mark.parametrize("lens_q,lens_k,heads,kv_heads,causal,window,chunk", CASES)
def test_reference_matches_naive_loop(lens_q, lens_k, heads, kv_heads, causal, window, chunk):
    torch.manual_seed(0)
    q = torch.randn(sum(lens_q), heads, 8)
    k = torch.randn(sum(lens_k), kv_heads, 8)
    v = torch.randn(sum(lens_k), kv_heads, 6)
    out, lse = varlen_attention_reference(
        q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), softmax_scale=0.3,
        causal=causal, window_size=window, chunk_size=chunk, return_lse=True)
    want_out, want_lse = naive_varlen_attention(q, k, v, lens_q, lens_k, 0.3, causal, window, chunk)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], atol=1e-5, rtol=0)


def test_reference_matches_sdpa_per_sample():
    torch.manual_seed(1)
    lens = [7, 1, 20]
    q, k, v = torch.randn(28, 4, 16), torch.randn(28, 2, 16), torch.randn(28, 2, 16)
    out = varlen_attention_reference(q, k, v, _cu(lens), _cu(lens), 20, 20, causal=True)
    start = 0
    for n in lens:
        qs = q[start:start + n].transpose(0, 1)  # [heads, n, dim]
        ks = k[start:start + n].transpose(0, 1).repeat_interleave(2, dim=0)
        vs = v[start:start + n].transpose(0, 1).repeat_interleave(2, dim=0)
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[start:start + n], want, atol=1e-5, rtol=0)
        start += n


def _hf_mask(mask_fn, length):
    idx = torch.arange(length)
    return mask_fn(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])


def test_chunk_and_window_masks_match_hugging_face():
    from transformers import masking_utils as masking
    from mswift.kernels.attention import check_varlen_inputs, sample_attention_mask

    x = torch.zeros(1, 1, 8)
    cu = _cu([1])
    for chunk in (1, 3, 8):
        opts = check_varlen_inputs(x, x, x, cu, cu, 1, 1, None, True, (-1, -1), chunk)
        no_padding = torch.zeros(1, dtype=torch.long)
        hf = _hf_mask(masking.chunked_causal_mask_function(chunk, no_padding), 19)
        assert torch.equal(sample_attention_mask(19, 19, opts), hf)
    for window in (1, 4):  # HF's sliding_window w keeps the last w keys: left = w - 1
        opts = check_varlen_inputs(x, x, x, cu, cu, 1, 1, None, True, (window - 1, -1), None)
        hf = _hf_mask(masking.sliding_window_causal_mask_function(window), 19)
        assert torch.equal(sample_attention_mask(19, 19, opts), hf)


def test_reference_gradcheck_float64():
    torch.manual_seed(2)
    lens = [3, 0, 4]
    q = torch.randn(7, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, 1, 3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        return varlen_attention_reference(q, k, v, _cu(lens), _cu(lens), 4, 4, causal=True,
                                          window_size=(2, -1), chunk_size=3)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_rows_without_keys_give_zero_output_and_finite_grads():
    q = torch.randn(6, 2, 4, requires_grad=True)
    k = torch.randn(2, 2, 4, requires_grad=True)
    v = torch.randn(2, 2, 4, requires_grad=True)
    cu_q, cu_k = _cu([0, 5, 1]), _cu([0, 2, 0])
    out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, 5, 2, causal=True, return_lse=True)
    assert torch.equal(out[:3], torch.zeros(3, 2, 4))  # positions -3..-1 see no key
    assert torch.isinf(lse[:, :3]).all() and torch.isinf(lse[:, 5]).all()
    assert torch.isfinite(lse[:, 3:5]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("bad,message", [
    (dict(cu_seqlens_q=torch.tensor([0, 4]), cu_seqlens_k=torch.tensor([0, 4])), "int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 4], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 1, 2, 4], dtype=torch.int32)), "non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([1, 4], dtype=torch.int32)), "start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32)), "ends at 5"),
    (dict(max_seqlen_q=2), "max_seqlen"),
    (dict(k=torch.randn(4, 3, 8), v=torch.randn(4, 3, 8)), "multiple"),
    (dict(k=torch.randn(4, 2, 6)), "head dims"),
    (dict(v=torch.randn(3, 2, 8)), "same tokens"),
    (dict(window_size=(-2, 0)), "window_size"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(q=torch.randn(4, 32)), "total_tokens"),
])
def test_bad_input_raises_value_error(bad, message):
    args = dict(q=torch.randn(4, 4, 8), k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8),
                cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 4], dtype=torch.int32),
                max_seqlen_q=4, max_seqlen_k=4)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        varlen_attention_reference(**args)
    with pytest.raises(ValueError, match=message):
        varlen_attention(**args)


def test_unknown_backend_raises():
    x, cu = torch.randn(2, 1, 8), torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(x, x, x, cu, cu, 2, 2, backend="cuda")


def test_positions_from_cu_seqlens():
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu).tolist() == [0, 1, 2, 0, 1]
    assert positions_from_cu_seqlens(cu, total=7).tolist() == [0, 1, 2, 0, 1, 0, 1]


def test_split_cu_seqlens_at_chunks():
    cu = torch.tensor([0, 5, 5, 13, 14], dtype=torch.int32)
    offsets, longest = split_cu_seqlens_at_chunks(cu, 4)
    assert offsets.dtype == torch.int32 and longest == 4
    assert offsets.tolist() == [0, 4, 5, 9, 13, 14]


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_attention_equals_attention_over_split_samples(causal):
    torch.manual_seed(3)
    lens = [11, 0, 8, 3]
    q, k, v = torch.randn(22, 4, 8), torch.randn(22, 2, 8), torch.randn(22, 2, 8)
    chunked = varlen_attention_reference(q, k, v, _cu(lens), _cu(lens), 11, 11, causal=causal,
                                         chunk_size=4)
    offsets, longest = split_cu_seqlens_at_chunks(_cu(lens), 4)
    split = varlen_attention_reference(q, k, v, offsets, offsets, longest, longest, causal=causal)
    torch.testing.assert_close(chunked, split, atol=1e-6, rtol=0)


def test_temperature_scale_matches_hugging_face_llama4(monkeypatch):
    from transformers import Llama4TextConfig
    from transformers.models.llama4 import modeling_llama4 as llama4

    config = Llama4TextConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=1, vocab_size=64,
        no_rope_layers=[0], attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5)
    config._attn_implementation = "eager"
    attention = llama4.Llama4TextAttention(config, layer_idx=0)  # a no-RoPE layer
    captured = {}
    original = llama4.eager_attention_forward

    def capture(module, query, key, value, mask, **kwargs):
        captured["query"] = query  # [batch, heads, seq, dim]
        return original(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(llama4, "eager_attention_forward", capture)
    hidden = torch.randn(1, 21, 32)
    with torch.no_grad():
        attention(hidden, None, None)
        raw = attention.q_proj(hidden).view(1, 21, 4, 8)  # [batch, seq, heads, dim]
    scale = llama4_attn_temperature_scale(torch.arange(21), floor_scale=4, attn_scale=0.5)
    assert scale[2] == 1.0 and scale[3] > 1.0  # floor((pos + 1) / 4) steps at pos 3
    torch.testing.assert_close(raw * scale[None, :, None, None], captured["query"].transpose(1, 2),
                               atol=1e-6, rtol=0)
