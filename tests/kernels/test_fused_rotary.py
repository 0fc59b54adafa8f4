"""Fused rotary embedding (CPU: TRITON_INTERPRET=1): both backends against transformers'
Llama (rotate-half), Llama-4 (complex, interleaved) and DeepSeek-V3 (YaRN tables, interleaved
pairs de-interleaved, rope on the last channels of an MLA head) code and megatron-core's
``_apply_rotary_pos_emb_bshd`` (partial rotary on the first channels, interleaved, MLA, mscale);
packed samples restart their positions; Triton against the reference, values and gradients.

37 tokens (token blocks of 16), 3 heads, head_dim 24 with rotary_dim 16 or 8 (masked pairs and
pass-through channels).
"""
import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from transformers import DeepseekV3Config, Llama4TextConfig, LlamaConfig
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_dsv3
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.llama4 import modeling_llama4 as hf_llama4

from mswift.kernels import apply_rotary
from mswift.runtime.device import cuda_available

DEVICE = "cuda" if cuda_available() else "cpu"  # compiled kernels where a GPU is
BACKENDS = ("torch", "triton")
EXACT = dict(rtol=1e-5, atol=1e-5)


def _qk(batch, seq, heads, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(2)]  # HF layout


def _ours(t, cos, sin, positions, backend, **kw):
    """HF's [batch, heads, seq, dim] through the kernel's [batch, seq, heads, dim]."""
    out = apply_rotary(t.transpose(1, 2).to(DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                       positions=positions.to(DEVICE), backend=backend, **kw)
    return out.transpose(1, 2).cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_split_equals_llama(backend):
    config = LlamaConfig(hidden_size=72, num_attention_heads=3, head_dim=24)
    q, k = _qk(2, 11, 3, 24)
    positions = torch.stack([torch.arange(11), torch.arange(5, 16)])  # second row offset
    cos, sin = hf_llama.LlamaRotaryEmbedding(config)(q, positions)  # [2, 11, 24]
    want = hf_llama.apply_rotary_pos_emb(q, k, cos, sin)
    table_cos, table_sin = hf_llama.LlamaRotaryEmbedding(config)(q, torch.arange(16)[None])
    for t, w in zip((q, k), want):
        got = _ours(t, table_cos[0, :, :12], table_sin[0, :, :12], positions, backend)
        torch.testing.assert_close(got, w, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_equals_llama4_complex_rope(backend):
    config = Llama4TextConfig(hidden_size=72, num_attention_heads=3, head_dim=24)
    q, k = (t.transpose(1, 2) for t in _qk(1, 13, 3, 24, seed=1))  # Llama-4: [b, s, h, d]
    freqs_cis = hf_llama4.Llama4TextRotaryEmbedding(config)(q, torch.arange(13)[None])
    want = hf_llama4.apply_rotary_emb(q, k, freqs_cis)
    for t, w in zip((q, k), want):
        got = apply_rotary(t.to(DEVICE), freqs_cis[0].real.to(DEVICE),
                           freqs_cis[0].imag.to(DEVICE), positions=torch.arange(13, device=DEVICE),
                           layout="interleaved", backend=backend)
        torch.testing.assert_close(got.cpu(), w, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mla_yarn_rope_equals_deepseek_v3(backend):
    """HF rotates q_rot (the last qk_rope_head_dim channels) with interleaved pairs written
    half-split, using YaRN tables scaled by attention_scaling; the kernel works on whole heads."""
    config = DeepseekV3Config(
        hidden_size=72, num_attention_heads=3, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=2560, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32, beta_slow=1,
            original_max_position_embeddings=64))
    assert config.rope_interleave
    rotary = hf_dsv3.DeepseekV3RotaryEmbedding(config)
    assert rotary.attention_scaling > 1.1  # YaRN's mscale is in the tables
    q, k = _qk(1, 40, 3, 24, seed=2)
    positions = torch.arange(40)[None] * 7  # past original_max_position_embeddings
    cos, sin = rotary(q, positions)
    q_rot, k_rot = hf_dsv3.apply_rotary_pos_emb_interleave(q[..., 16:], k[..., 16:], cos, sin)
    table_cos, table_sin = rotary(q, torch.arange(280)[None])
    for t, rot in zip((q, k), (q_rot, k_rot)):
        got = _ours(t, table_cos[0, :, :4], table_sin[0, :, :4], positions, backend,
                    layout="deinterleaved", rotary_at="last")
        torch.testing.assert_close(got, torch.cat((t[..., :16], rot), dim=-1), **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,interleaved,mla", [
    ("half", False, False), ("interleaved", True, False), ("deinterleaved", False, True)])
def test_partial_rotary_equals_megatron_core(backend, layout, interleaved, mla):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 2, 3, 24, generator=gen)  # megatron's [seq, batch, heads, dim]
    angles = torch.arange(9.0)[:, None] * torch.rand(8, generator=gen)  # [seq, rotary_dim / 2]
    if interleaved:
        freqs = angles.repeat_interleave(2, dim=-1)
    else:
        freqs = torch.cat((angles, angles), dim=-1)
    want = _apply_rotary_pos_emb_bshd(x, freqs[:, None, None, :], rotary_interleaved=interleaved,
                                      multi_latent_attention=mla, mscale=1.3)
    got = apply_rotary(x.to(DEVICE), (angles.cos() * 1.3).to(DEVICE),
                       (angles.sin() * 1.3).to(DEVICE),
                       positions=torch.arange(9, device=DEVICE)[:, None], layout=layout,
                       backend=backend)
    torch.testing.assert_close(got.cpu(), want, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_positions_restart_per_sample(backend):
    config = LlamaConfig(hidden_size=72, num_attention_heads=3, head_dim=24)
    cu_seqlens = torch.tensor([0, 5, 17, 37], dtype=torch.int32)
    q, _ = _qk(1, 37, 3, 24, seed=4)
    cos, sin = hf_llama.LlamaRotaryEmbedding(config)(q, torch.arange(37)[None])
    want = torch.cat([hf_llama.apply_rotary_pos_emb(q[:, :, a:b], q[:, :, a:b], cos[:, :b - a],
                                                    sin[:, :b - a])[0]
                      for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())], dim=2)
    got = apply_rotary(q[0].transpose(0, 1).to(DEVICE), cos[0, :, :12].to(DEVICE),
                       sin[0, :, :12].to(DEVICE), cu_seqlens=cu_seqlens.to(DEVICE),
                       backend=backend)  # [tokens, heads, dim]
    torch.testing.assert_close(got.transpose(0, 1).cpu(), want[0], **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["half", "interleaved", "deinterleaved"])
@pytest.mark.parametrize("rotary_at,rotary_dim", [("first", 16), ("last", 8)])
def test_triton_equals_reference_with_gradients(dtype, layout, rotary_at, rotary_dim):
    gen = torch.Generator().manual_seed(rotary_dim)
    x = torch.randn(37, 3, 24, generator=gen).to(dtype).to(DEVICE)
    grad = torch.randn(37, 3, 24, generator=gen).to(dtype).to(DEVICE)
    angles = torch.rand(50, rotary_dim // 2, generator=gen) * 6
    positions = torch.randint(0, 50, (37,), generator=gen).to(DEVICE)
    results = []
    for backend in BACKENDS:
        xs = x.detach().clone().requires_grad_()
        out = apply_rotary(xs, angles.cos().to(DEVICE), angles.sin().to(DEVICE),
                           positions=positions, layout=layout, rotary_at=rotary_at,
                           backend=backend)
        out.backward(grad)
        results.append((out, xs.grad))
    tol = EXACT if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for got, want in zip(*results):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "exactly one of positions"),
    (dict(positions=torch.arange(4), cu_seqlens=torch.tensor([0, 4])), "exactly one"),
    (dict(positions=torch.arange(5)), r"must broadcast to x's token dims \(4,\)"),
    (dict(positions=torch.arange(4) + 7), r"positions must lie in \[0, 10\)"),
    (dict(positions=torch.arange(4), layout="complex"), "layout must be one of"),
    (dict(positions=torch.arange(4), rotary_at="middle"), "rotary_at must be one of"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_rotary(torch.zeros(4, 2, 8), torch.zeros(10, 3), torch.zeros(10, 3), **kwargs)


def test_rotary_dim_wider_than_the_head_is_refused():
    with pytest.raises(ValueError, match=r"rotary_dim = 10 must be in \[2, head_dim = 8\]"):
        apply_rotary(torch.zeros(4, 2, 8), torch.zeros(10, 5), torch.zeros(10, 5),
                     positions=torch.arange(4))
