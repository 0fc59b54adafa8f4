"""MoE token permutation (CPU: TRITON_INTERPRET=1): permute -> per-expert work -> unpermute
against a plain torch computation without any permutation, values and gradients, and the row
layout against a loop-built one.

Sizes sit off the block edges: 37 or 70 tokens (token blocks of 32, choice blocks of 64, so the
counting sort spans 2-4 blocks), hidden 20 (one 32-wide column tile, partly masked) or 300
(two 256-wide tiles), experts that get no token, one token, and pad_to 8.
"""
import pytest
import torch

from mswift.kernels import permute, unpermute
from mswift.runtime.device import cuda_available

DEVICE = "cuda" if cuda_available() else "cpu"  # compiled kernels where a GPU is
BACKENDS = ("torch", "triton")


def _loop_layout(indices, num_experts, pad_to):
    """Row of each choice (-1 for expert -1) and each expert's padded row count, by walking
    experts then tokens."""
    tokens, topk = indices.shape
    ids = indices.tolist()
    row_map = [[-1] * topk for _ in range(tokens)]
    counts, row = [], 0
    for e in range(num_experts):
        start = row
        for t in range(tokens):
            for k in range(topk):
                if ids[t][k] == e:
                    row_map[t][k] = row
                    row += 1
        if pad_to:
            row = start + -(-(row - start) // pad_to) * pad_to
        counts.append(row - start)
    return torch.tensor(row_map), torch.tensor(counts)


def _routing(tokens, topk, num_experts, unused=(), seed=0):
    """Distinct random experts per token, never choosing the ``unused`` ones."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused])
    picks = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:topk]]
                         for _ in range(tokens)])
    weights = torch.rand(tokens, topk, generator=gen)
    return picks.to(DEVICE), weights.to(DEVICE)


CASES = [  # tokens, hidden, experts, topk, unused experts, pad_to
    (37, 20, 6, 3, (3,), None),
    (70, 20, 8, 2, (0, 7), 8),
    (1, 300, 5, 2, (), 8),
    (37, 300, 4, 4, (), None),  # top-k == experts
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,hidden,experts,topk,unused,pad_to", CASES)
def test_row_layout_is_expert_major_and_stable(backend, tokens, hidden, experts, topk, unused,
                                               pad_to):
    indices, _ = _routing(tokens, topk, experts, unused)
    x = torch.randn(tokens, hidden, device=DEVICE)
    permuted, row_map, counts = permute(x, indices, experts, pad_to=pad_to, backend=backend)
    want_rows, want_counts = _loop_layout(indices.cpu(), experts, pad_to)
    assert row_map.dtype == counts.dtype == torch.int64
    assert torch.equal(row_map.cpu(), want_rows)
    assert torch.equal(counts.cpu(), want_counts)
    assert permuted.shape == (int(want_counts.sum()), hidden)
    filled = torch.zeros(permuted.shape[0], dtype=torch.bool)
    filled[want_rows.flatten()] = True
    assert torch.equal(permuted[want_rows.flatten().to(DEVICE)], x.repeat_interleave(topk, 0))
    assert not permuted[~filled.to(DEVICE)].any()  # padding rows are zero


def test_duplicate_choices_keep_k_order():
    indices = torch.tensor([[1, 1], [0, 1]], device=DEVICE)
    x = torch.tensor([[1.0], [2.0]], device=DEVICE)
    for backend in BACKENDS:
        permuted, row_map, counts = permute(x, indices, 2, backend=backend)
        assert row_map.tolist() == [[1, 2], [0, 3]]
        assert permuted.flatten().tolist() == [2.0, 1.0, 1.0, 2.0]
        assert counts.tolist() == [1, 3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,hidden,experts,topk,unused,pad_to", CASES)
@pytest.mark.parametrize("weighted", [True, False])
def test_moe_pipeline_equals_plain_torch(backend, tokens, hidden, experts, topk, unused, pad_to,
                                         weighted):
    gen = torch.Generator().manual_seed(1)
    indices, weights = _routing(tokens, topk, experts, unused, seed=2)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE)
    expert_w = torch.randn(experts, hidden, 8, generator=gen).to(DEVICE) / hidden ** 0.5
    grad = torch.randn(tokens, 8, generator=gen).to(DEVICE)

    def run(pipeline):
        leaves = [t.detach().clone().requires_grad_() for t in (x, expert_w, weights)]
        out = pipeline(*leaves)
        out.backward(grad)
        return [out] + [t.grad for t in leaves[:2 if not weighted else 3]]

    def plain(x, w_e, w):  # every choice computed in token order, no permutation
        per_choice = torch.einsum("th,tkhd->tkd", x, w_e[indices])
        return (per_choice * (w.unsqueeze(-1) if weighted else 1)).sum(dim=1)

    def kernels(x, w_e, w):
        permuted, row_map, counts = permute(x, indices, experts, pad_to=pad_to, backend=backend)
        segments = permuted.split(counts.tolist())
        expert_out = torch.cat([seg @ w_e[e] for e, seg in enumerate(segments)])
        return unpermute(expert_out, row_map, w if weighted else None, backend=backend)

    for got, want in zip(run(kernels), run(plain)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_matches_reference_gradients(dtype):
    gen = torch.Generator().manual_seed(3)
    indices, weights = _routing(70, 3, 6, (2,), seed=4)
    x = torch.randn(70, 40, generator=gen).to(dtype).to(DEVICE)
    grad_rows = None
    results = []
    for backend in BACKENDS:
        xs = x.detach().clone().requires_grad_()
        ws = weights.detach().clone().requires_grad_()
        permuted, row_map, _ = permute(xs, indices, 6, pad_to=4, backend=backend)
        if grad_rows is None:
            grad_rows = torch.randn(permuted.shape, generator=gen).to(dtype).to(DEVICE)
        expert_out = permuted * 3 + 1  # padding rows become 1: unpermute must never read them
        out = unpermute(expert_out, row_map, ws, backend=backend)
        (out.float().square().sum() + (permuted * grad_rows).float().sum()).backward()
        assert out.dtype == dtype and ws.grad.dtype == torch.float32
        results.append((permuted, out, xs.grad, ws.grad))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)


def _this_ranks_share(indices, first, count):
    """Expert ids as one expert-parallel rank sees them (its experts ``first..first+count-1``
    as 0..count-1, the others -1), with token 0 routed to none of them."""
    local = indices - first
    local[(local < 0) | (local >= count)] = -1
    local[0] = -1
    return local


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [True, False])
def test_unrouted_choices_get_no_row(backend, weighted):
    """The all-gather dispatcher at EP > 1: each rank permutes only its experts' choices
    (-1 elsewhere) and unpermute gives zeros where none of a token's choices is here; layout,
    values and gradients against the loop layout and plain torch."""
    gen = torch.Generator().manual_seed(6)
    indices, weights = _routing(45, 3, 8, seed=7)
    local = _this_ranks_share(indices, 2, 3)
    x = torch.randn(45, 20, generator=gen).to(DEVICE)
    expert_w = torch.randn(3, 20, 8, generator=gen).to(DEVICE) / 20 ** 0.5
    grad = torch.randn(45, 8, generator=gen).to(DEVICE)
    permuted, row_map, counts = permute(x, local, 3, unrouted=True, backend=backend)
    want_rows, want_counts = _loop_layout(local.cpu(), 3, None)
    assert torch.equal(row_map.cpu(), want_rows) and torch.equal(counts.cpu(), want_counts)
    assert permuted.shape == (int((local >= 0).sum()), 20) == (int(want_counts.sum()), 20)

    def run(pipeline):
        leaves = [t.detach().clone().requires_grad_() for t in (x, expert_w, weights)]
        out = pipeline(*leaves)
        out.backward(grad)
        return [out] + [t.grad for t in leaves[:2 if not weighted else 3]]

    def plain(x, w_e, w):  # every local choice in token order, the others nothing
        here = (local >= 0).unsqueeze(-1)
        per_choice = torch.einsum("th,tkhd->tkd", x, w_e[local.clamp(min=0)]) * here
        return (per_choice * (w.unsqueeze(-1) if weighted else 1)).sum(dim=1)

    def kernels(x, w_e, w):
        permuted, row_map, counts = permute(x, local, 3, unrouted=True, backend=backend)
        segments = permuted.split(counts.tolist())
        expert_out = torch.cat([seg @ w_e[e] for e, seg in enumerate(segments)])
        return unpermute(expert_out, row_map, w if weighted else None, backend=backend)

    got, want = run(kernels), run(plain)
    assert not got[0][0].any()  # token 0 has no choice here
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_no_tokens():
    indices = torch.zeros(0, 2, dtype=torch.int64, device=DEVICE)
    for backend in BACKENDS:
        permuted, row_map, counts = permute(torch.zeros(0, 4, device=DEVICE), indices, 3,
                                            pad_to=8, backend=backend)
        assert permuted.shape == (0, 4) and row_map.shape == (0, 2)
        assert counts.tolist() == [0, 0, 0]
        assert unpermute(permuted, row_map, backend=backend).shape == (0, 4)


@pytest.mark.parametrize("call,message", [
    (lambda x, i: permute(x, i, 3), r"expert ids in \[0, 3\)"),
    (lambda x, i: permute(x, i.float(), 4), "int32 or int64"),
    (lambda x, i: permute(x[:3], i, 4), "indices has 5 rows but tokens has 3"),
    (lambda x, i: permute(x, i, 4, pad_to=0), "pad_to must be >= 1"),
    (lambda x, i: permute(x, -i, 4), r"expert ids in \[0, 4\), got values from -3"),
    (lambda x, i: permute(x, i - 2, 4, unrouted=True),
     r"expert ids in \[0, 4\) or -1 \(unrouted\), got values from -2"),
    (lambda x, i: permute(x, i, 4, pad_to=8, unrouted=True), "pad_to and unrouted=True"),
    (lambda x, i: unpermute(x[:2], i), "row_map points at rows 0..3 but expert_out has 2"),
    (lambda x, i: unpermute(x, i, torch.ones(5, 1)), r"weights must be a \(5, 2\) tensor"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    x = torch.zeros(5, 4)
    indices = torch.tensor([[0, 3]] * 5)
    with pytest.raises(ValueError, match=message):
        call(x, indices)
