"""MoE top-k routing (CPU: TRITON_INTERPRET=1) against transformers' own routers and between the
Triton kernel and the torch reference.

Token counts (1, 37, 70) are not multiples of the interpreter's 32-token block; expert counts
8, 12 (padded to a 16-wide tile) and 64 (8 groups of 8, DeepSeek-V3's shape scaled down).
"""
import pytest
import torch
from transformers import DeepseekV3Config, Llama4TextConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.llama4.modeling_llama4 import Llama4Router
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from mswift.kernels import topk_routing
from mswift.runtime.device import cuda_available

DEVICE = "cuda" if cuda_available() else "cpu"  # compiled kernels where a GPU is
BACKENDS = ("torch", "triton")
HIDDEN = 16


def _by_expert(weights, indices):
    """Rows sorted by expert id (transformers' DeepSeek router returns top-k unsorted)."""
    order = indices.argsort(dim=1)
    return weights.gather(1, order), indices.gather(1, order)


def _assert_weights(got, want, backend, normalized=False):
    if backend == "torch" and not normalized:  # the same torch ops as transformers
        assert torch.equal(got, want)
    else:  # Triton's exp / division round differently in the last bit; a renormalising sum
        # adds the weights in another order than transformers' (its DeepSeek top-k is unsorted)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _hidden(tokens, seed):
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _deepseek(experts, groups, topk_group, topk, norm=True, scale=2.5, seed=0):
    cfg = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=experts, n_group=groups,
                           topk_group=topk_group, num_experts_per_tok=topk,
                           norm_topk_prob=norm, routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, HIDDEN, generator=gen))
        router.e_score_correction_bias.copy_(torch.randn(experts, generator=gen) * 0.3)
    return router.to(DEVICE), cfg


def _deepseek_route(router, cfg, logits, backend):
    return topk_routing(logits, cfg.num_experts_per_tok, score_function="sigmoid",
                        expert_bias=router.e_score_correction_bias, num_groups=cfg.n_group,
                        group_topk=cfg.topk_group, normalize=cfg.norm_topk_prob,
                        scaling_factor=cfg.routed_scaling_factor, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("experts,groups,topk_group,topk,norm,tokens", [
    (8, 4, 2, 3, True, 37),  # top-k != 2 * topk_group: megatron-core's group score differs
    (64, 8, 4, 8, True, 37),  # DeepSeek-V3's 8 groups / 4 kept / top-8
    (12, 3, 1, 5, False, 1),  # top-k exceeds the 4 experts left: masked experts follow
    (8, 1, 1, 8, True, 37),  # top-k == experts, one group
])
def test_deepseek_v3_router(backend, experts, groups, topk_group, topk, norm, tokens):
    router, cfg = _deepseek(experts, groups, topk_group, topk, norm)
    logits, want_w, want_i = router(_hidden(tokens, 1))
    got_w, got_i = _deepseek_route(router, cfg, logits, backend)
    assert got_w.dtype == torch.float32 and got_i.dtype == torch.int64
    assert got_w.shape == got_i.shape == (tokens, topk)
    got_w, got_i = _by_expert(got_w, got_i)
    want_w, want_i = _by_expert(want_w, want_i)
    assert torch.equal(got_i, want_i)
    _assert_weights(got_w, want_w, backend, normalized=norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [1, 2])
def test_llama4_router(backend, topk):
    cfg = Llama4TextConfig(hidden_size=HIDDEN, num_local_experts=12, num_experts_per_tok=topk,
                           intermediate_size=8)
    router = Llama4Router(cfg)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(2))
    router.to(DEVICE)
    scores, logits = router(_hidden(37, 3))  # scores [tokens, experts]: 0 where not chosen
    got_w, got_i = topk_routing(logits, topk, score_function="sigmoid", backend=backend)
    want_i = torch.topk(logits, topk, dim=1).indices
    assert torch.equal(got_i, want_i)
    _assert_weights(got_w, scores.gather(1, got_i), backend)
    assert torch.count_nonzero(scores) == scores.shape[0] * topk  # the rest are exactly 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm,topk,tokens", [(True, 2, 37), (False, 3, 70), (True, 8, 1)])
def test_qwen3_moe_router(backend, norm, topk, tokens):
    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=8, num_experts_per_tok=topk,
                         moe_intermediate_size=8, norm_topk_prob=norm)
    block = Qwen3MoeSparseMoeBlock(cfg)
    torch.nn.init.normal_(block.gate.weight, generator=torch.Generator().manual_seed(4))
    block.to(DEVICE)
    logits, want_w, want_i = block.gate(_hidden(tokens, 5))
    got_w, got_i = topk_routing(logits, topk, score_function="softmax", normalize=norm,
                                backend=backend)
    if topk == 8:  # every expert: order among (near-)equal probabilities is torch.topk's
        got_w, got_i = _by_expert(got_w, got_i)
        want_w, want_i = _by_expert(want_w, want_i)
    assert torch.equal(got_i, want_i)
    _assert_weights(got_w, want_w, backend)


def _expected_by_rule(key, topk):
    """Top-k by value, ties to the lower index: the documented rule, written as a loop."""
    out = []
    for row in key.tolist():
        ranked = sorted(range(len(row)), key=lambda e: (-row[e], e))
        out.append(ranked[:topk])
    return torch.tensor(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_expert_and_match_transformers_weights(backend):
    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=8, num_experts_per_tok=3,
                         moe_intermediate_size=8, norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(generator=torch.Generator().manual_seed(6))
        block.gate.weight[5] = block.gate.weight[1]  # experts 1 and 5, 2 and 6 always tie
        block.gate.weight[6] = block.gate.weight[2]
    block.to(DEVICE)
    logits, want_w, _ = block.gate(_hidden(37, 7))
    got_w, got_i = topk_routing(logits, 3, normalize=True, backend=backend)
    assert torch.equal(got_i.cpu(), _expected_by_rule(logits.cpu(), 3))
    # whichever tied expert transformers took, it carries the same weight
    _assert_weights(got_w, want_w, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_groups_go_to_the_lower_group(backend):
    router, cfg = _deepseek(8, 4, 1, 2, scale=1.0)
    with torch.no_grad():
        router.weight[4:6] = router.weight[0:2]  # group 2 == group 0, bias included
        router.e_score_correction_bias[4:6] = router.e_score_correction_bias[0:2]
    logits, want_w, _ = router(_hidden(37, 8))
    got_w, got_i = _deepseek_route(router, cfg, logits, backend)
    assert not ((got_i >= 4) & (got_i < 6)).any()  # one group kept: 2 never wins over 0
    assert (got_i < 2).any()
    _assert_weights(got_w.sort(dim=1).values, want_w.sort(dim=1).values, backend, True)


def test_llama4_ranks_logits_where_sigmoid_saturates():
    # sigmoid(20) == sigmoid(30) == 1.0 in fp32: only the logits tell them apart
    logits = torch.tensor([[20.0, 30.0, -1.0], [0.5, 17.0, 40.0]], device=DEVICE)
    for backend in BACKENDS:
        _, indices = topk_routing(logits, 1, score_function="sigmoid", backend=backend)
        assert indices.flatten().tolist() == [1, 2]


ROUTING_CASES = [
    dict(topk=2, score_function="softmax"),
    dict(topk=3, score_function="softmax", normalize=True, scaling_factor=1.5),
    dict(topk=1, score_function="sigmoid"),
    dict(topk=3, score_function="sigmoid", normalize=True),
    dict(topk=4, score_function="sigmoid", bias=True, num_groups=4, group_topk=2,
         normalize=True, scaling_factor=2.5),
    dict(topk=5, score_function="softmax", bias=True, num_groups=3, group_topk=2),
]


def _case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items())


@pytest.mark.parametrize("case", ROUTING_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_values_and_gradients(case, dtype):
    case = dict(case)
    experts = 12
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(70, experts, generator=gen) * 2).to(dtype).to(DEVICE)
    if case.pop("bias", False):
        case["expert_bias"] = (torch.randn(experts, generator=gen) * 0.2).to(DEVICE)
    grad = torch.randn(70, case["topk"], generator=gen).to(DEVICE)
    results = []
    for backend in BACKENDS:
        x = logits.detach().clone().requires_grad_()
        weights, indices = topk_routing(x, backend=backend, **case)
        weights.backward(grad)
        assert x.grad.dtype == dtype
        results.append((weights, indices, x.grad))
    (w_t, i_t, g_t), (w_k, i_k, g_k) = results
    assert torch.equal(i_k, i_t)
    torch.testing.assert_close(w_k, w_t, rtol=1e-6, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(g_k, g_t, **tol)


def test_reference_gradient_is_the_finite_difference():
    logits = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    bias = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))

    def weights(x):  # the choice is piecewise constant: small steps keep it
        return topk_routing(x, 3, score_function="sigmoid", expert_bias=bias, num_groups=4,
                            group_topk=2, normalize=True, scaling_factor=2.5,
                            backend="torch")[0]

    assert torch.autograd.gradcheck(weights, (logits.requires_grad_(),))


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_groups=3, group_topk=1), "num_groups=3 must divide"),
    (dict(num_groups=8, group_topk=1), "at least 2 experts"),
    (dict(num_groups=4), "needs group_topk"),
    (dict(num_groups=4, group_topk=5), "group_topk must be in"),
    (dict(group_topk=2), "needs num_groups > 1"),
    (dict(score_function="relu"), "score_function"),
    (dict(expert_bias=torch.zeros(7)), r"expert_bias must be a \[8\]"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        topk_routing(torch.zeros(4, 8, device=DEVICE), 2, **kwargs)
    with pytest.raises(ValueError, match="topk must be in"):
        topk_routing(torch.zeros(4, 8, device=DEVICE), 9)
