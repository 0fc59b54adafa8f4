"""mswift's grouped expert GEMM (mswift.models.grouped_experts.grouped_matmul) against one
plain matmul per expert, values and gradients.

Both of its paths run here: torch 2.13's ``torch._grouped_mm`` also runs on the CPU in fp32
(what the GPU path calls, in bf16 there, with the same offsets and transposed weights), and
the per-expert loop the CPU takes. Uneven row counts, an expert without rows, and an
expert-sized batch of one row each.
"""
import pytest
import torch

from mswift.models.grouped_experts import grouped_matmul, grouped_mm_usable


def per_expert(x, weight, rows):
    out, start = [], 0
    for e, n in enumerate(rows):
        out.append(torch.nn.functional.linear(x[start:start + n], weight[e]))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("rows", [[5, 0, 9, 2], [1, 1, 1, 1], [0, 0, 16, 0]])
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_grouped_matmul_is_one_matmul_per_expert(rows, grouped_mm):
    gen = torch.Generator().manual_seed(sum(rows))
    x = torch.randn(sum(rows), 24, generator=gen, requires_grad=True)
    weight = torch.randn(len(rows), 40, 24, generator=gen, requires_grad=True)
    grad = torch.randn(sum(rows), 40, generator=gen)
    got = grouped_matmul(x, weight, rows, use_grouped_mm=grouped_mm)
    got_x, got_w = torch.autograd.grad(got, (x, weight), grad)
    want = per_expert(x, weight, rows)
    want_x, want_w = torch.autograd.grad(want, (x, weight), grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)


def test_grouped_mm_only_for_cuda_bf16_with_aligned_rows():
    x, weight = torch.zeros(4, 24, dtype=torch.bfloat16), torch.zeros(40, 24,
                                                                       dtype=torch.bfloat16)
    assert not grouped_mm_usable(x, weight)  # CPU tensors: the loop
    assert not grouped_mm_usable(x.float(), weight.float())
