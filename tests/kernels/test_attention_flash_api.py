"""``varlen_attention`` called exactly as FlashAttention's ``flash_attn_varlen_func`` is called.

The oracle is a plain softmax attention written here, one sample at a time in float64, with
FlashAttention's documented mask rule (query ``i`` sees keys ``[pos - left, pos + right]``,
``pos = i + len_k - len_q``; causal is a right window of 0; a row with no key gives zero). Under
``TRITON_INTERPRET=1`` (tests/conftest.py) the default backend runs the Triton kernels.
"""
import inspect

import pytest
import torch

from mswift.kernels import varlen_attention, varlen_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# flash_attn/flash_attn_interface.py (flash-attn 2.7), flash_attn_varlen_func: names, defaults
FLASH_ATTN_PARAMETERS = [
    ("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty),
    ("v", inspect.Parameter.empty), ("cu_seqlens_q", inspect.Parameter.empty),
    ("cu_seqlens_k", inspect.Parameter.empty), ("max_seqlen_q", inspect.Parameter.empty),
    ("max_seqlen_k", inspect.Parameter.empty), ("dropout_p", 0.0), ("softmax_scale", None),
    ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
    ("deterministic", False), ("return_attn_probs", False), ("block_table", None),
]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=DEVICE)


def _inputs(lens_q, lens_k, heads=4, kv_heads=2, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads, dim, generator=gen)  # [tokens, heads, dim]
    k = torch.randn(sum(lens_k), kv_heads, dim, generator=gen)
    v = torch.randn(sum(lens_k), kv_heads, dim, generator=gen)
    return tuple(t.to(dtype).to(DEVICE) for t in (q, k, v))


def plain_attention(q, k, v, lens_q, lens_k, scale=None, causal=False, window=(-1, -1)):
    """Softmax attention per sample in float64: out [Tq, H, dv], lse [H, Tq] (-inf: no key)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = window[0], 0 if causal else window[1]
    group = q.shape[1] // k.shape[1]
    outs, lses, q0, k0 = [], [], 0, 0
    for len_q, len_k in zip(lens_q, lens_k):
        qs = q[q0:q0 + len_q].double().transpose(0, 1)  # [H, Lq, d]
        ks = k[k0:k0 + len_k].double().transpose(0, 1).repeat_interleave(group, 0)  # [H, Lk, d]
        vs = v[k0:k0 + len_k].double().transpose(0, 1).repeat_interleave(group, 0)
        pos = torch.arange(len_q)[:, None] + len_k - len_q  # [Lq, 1]
        j = torch.arange(len_k)[None, :]  # [1, Lk]
        visible = torch.ones(len_q, len_k, dtype=torch.bool)
        if right >= 0:
            visible &= j <= pos + right
        if left >= 0:
            visible &= j >= pos - left
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~visible.to(q.device), -torch.inf)
        lse = torch.logsumexp(scores, dim=-1)  # [H, Lq]
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # no key: a zero row
        outs.append((probs @ vs).transpose(0, 1))  # [Lq, H, dv]
        lses.append(lse)
        q0, k0 = q0 + len_q, k0 + len_k
    return torch.cat(outs), torch.cat(lses, dim=1)


def test_signature_is_flash_attn_varlen_func():
    for fn in (varlen_attention, varlen_attention_reference):
        params = list(inspect.signature(fn).parameters.values())
        head = params[:len(FLASH_ATTN_PARAMETERS)]
        assert [(p.name, p.default) for p in head] == FLASH_ATTN_PARAMETERS, fn.__name__
        assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in head), fn.__name__
        extras = params[len(FLASH_ATTN_PARAMETERS):]
        assert extras and all(p.kind == p.KEYWORD_ONLY for p in extras), fn.__name__


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_dropout_zero_positionally_then_causal_is_causal_attention(dtype, atol):
    # the call that once ran with softmax_scale=0.0 (uniform attention) without a word
    lens = [5, 1, 9]
    q, k, v = _inputs(lens, lens, dtype=dtype)
    out = varlen_attention(q, k, v, _cu(lens), _cu(lens), 9, 9, 0.0, causal=True)
    want, _ = plain_attention(q, k, v, lens, lens, causal=True)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=0)
    uniform, _ = plain_attention(q, k, v, lens, lens, scale=0.0, causal=True)
    assert (out.double() - uniform).abs().max() > 0.1


def test_causal_defaults_to_false_with_gradients():
    lens_q, lens_k = [6, 3], [4, 8]
    q, k, v = (t.requires_grad_() for t in _inputs(lens_q, lens_k, dim=8, seed=1))
    out = varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), 6, 8)
    dout = torch.randn_like(out)
    out.backward(dout)
    got_grads = [t.grad for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, _ = plain_attention(q64, k64, v64, lens_q, lens_k)
    want.backward(dout.double())
    torch.testing.assert_close(out.double(), want.detach(), atol=1e-4, rtol=0)
    for got, ref in zip(got_grads, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fn", [varlen_attention, varlen_attention_reference])
def test_every_flash_attn_argument_positionally(fn):
    lens_q, lens_k = [4, 7, 2], [9, 3, 2]  # len_q > len_k leaves queries without keys
    q, k, v = _inputs(lens_q, lens_k, seed=2)
    out, lse, s_dmask = fn(q, k, v, _cu(lens_q), _cu(lens_k), 7, 9, 0.0, 0.3, True, (2, -1),
                           0.0, None, True, True, None)
    want, want_lse = plain_attention(q, k, v, lens_q, lens_k, 0.3, True, (2, -1))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    assert lse.shape == (4, sum(lens_q)) and lse.dtype == torch.float32
    no_key = torch.isinf(want_lse)
    assert no_key.any() and (lse[no_key] == -torch.inf).all()  # flash-attn: +inf there
    torch.testing.assert_close(lse.double()[~no_key], want_lse[~no_key], atol=1e-5, rtol=0)
    # flash-attn returns an empty S_dmask when dropout_p == 0
    assert s_dmask.shape == (0,) and s_dmask.dtype == q.dtype


@pytest.mark.parametrize("window", [[3, 1], torch.tensor([3, 1]), torch.tensor([3, 1],
                                                                                dtype=torch.int32)],
                         ids=["list", "tensor-int64", "tensor-int32"])
def test_window_size_as_list_or_tensor(window):
    lens = [12, 5]
    q, k, v = _inputs(lens, lens, seed=3)
    out = varlen_attention(q, k, v, _cu(lens), _cu(lens), 12, 12, window_size=window)
    want, _ = plain_attention(q, k, v, lens, lens, window=(3, 1))
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=0)


def test_flash_attn_off_values_are_accepted():
    # flash-attn: softcap <= 0 is off; deterministic only picks its backward algorithm
    lens = [6]
    q, k, v = _inputs(lens, lens, seed=4)
    out = varlen_attention_reference(q, k, v, _cu(lens), _cu(lens), 6, 6, 0.0, None, True,
                                     (-1, -1), -1.0, None, True)
    want, _ = plain_attention(q, k, v, lens, lens, causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", [varlen_attention, varlen_attention_reference])
@pytest.mark.parametrize("bad,message", [
    (dict(dropout_p=0.1), "dropout_p"),
    (dict(softcap=30.0), "softcap"),
    (dict(alibi_slopes=torch.ones(4)), "alibi_slopes"),
    (dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), "block_table"),
    (dict(return_attn_probs=True, return_lse=True), "return_attn_probs"),
    (dict(window_size=(1.5, 0)), "window_size"),
    (dict(window_size=torch.tensor([1.0, 0.0])), "window_size"),
    (dict(window_size=torch.tensor([1, 2, 3])), "window_size"),
])
def test_unimplemented_arguments_are_refused_by_name(fn, bad, message):
    q, k, v = _inputs([4], [4])
    with pytest.raises(ValueError, match=message):
        fn(q, k, v, _cu([4]), _cu([4]), 4, 4, **bad)


def test_positional_dropout_is_refused():
    q, k, v = _inputs([4], [4])
    with pytest.raises(ValueError, match="dropout_p"):
        varlen_attention(q, k, v, _cu([4]), _cu([4]), 4, 4, 0.1, None, True)
