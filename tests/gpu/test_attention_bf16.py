"""Triton varlen attention compiled on the GPU, in bf16, against the torch reference.

The CPU suite (tests/kernels, ``TRITON_INTERPRET=1``) checks the kernels' logic; only a GPU
runs the compiled code with bf16 tensor-core arithmetic, the real block sizes and concurrent
programs (races). Packed batches of mixed lengths around the GPU tile sizes (64 / 128), 12
query heads on 4 KV heads (3 per group), head dims 64 and 128, causal; forward and backward.

Tolerance (bf16): the kernel's error against fp32 math on the same bf16 inputs may be at most
twice the error of the torch reference itself run in bf16, plus 1e-3 -- FlashAttention's own
test criterion: a kernel is as accurate as plain bf16 attention, whatever the shapes. The
log-sum-exp is fp32 in both and must agree within 1e-2.
"""
import pytest
import torch

from mswift.kernels import varlen_attention, varlen_attention_reference

pytestmark = pytest.mark.gpu

HEADS, KV_HEADS = 12, 4
LENGTHS = [1, 63, 64, 65, 127, 128, 129, 300, 1000, 2047]


def _forward_backward(fn, q, k, v, dout, cu, longest, **options):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, cu, cu, longest, longest, causal=True, return_lse=True, **options)
    out.backward(dout)
    return {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}, lse


@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_matches_reference_forward_and_backward(head_dim):
    device = torch.device("cuda", 0)
    gen = torch.Generator(device=device).manual_seed(head_dim)
    total = sum(LENGTHS)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(torch.bfloat16)

    q, k, v = randn(total, HEADS, head_dim), randn(total, KV_HEADS, head_dim), \
        randn(total, KV_HEADS, head_dim)
    dout = randn(total, HEADS, head_dim)
    offsets = torch.tensor([0] + LENGTHS, device=device).cumsum(0).to(torch.int32)
    longest = max(LENGTHS)

    got, got_lse = _forward_backward(varlen_attention, q, k, v, dout, offsets, longest,
                                     backend="triton")
    exact, exact_lse = _forward_backward(varlen_attention_reference,
                                         *(t.float() for t in (q, k, v, dout)), offsets, longest)
    plain, _ = _forward_backward(varlen_attention_reference, q, k, v, dout, offsets, longest)
    for name in ("out", "dq", "dk", "dv"):
        assert got[name].dtype == torch.bfloat16, name
        assert torch.isfinite(got[name]).all(), f"{name} has non-finite values"
        err = (got[name].float() - exact[name]).abs().max().item()
        plain_err = (plain[name].float() - exact[name]).abs().max().item()
        assert err <= 2 * plain_err + 1e-3, (
            f"hd{head_dim} {name}: max error {err:.4g} against fp32 math; the torch reference "
            f"in bf16 has {plain_err:.4g}")
    torch.testing.assert_close(got_lse.float(), exact_lse.float(), atol=1e-2, rtol=0)
