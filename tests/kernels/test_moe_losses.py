"""Router load-balancing terms against megatron-core's own functions (values and gradients)."""
import tempfile

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (compute_routing_scores_for_aux_loss,
                                                     get_updated_expert_bias,
                                                     switch_load_balancing_loss_func,
                                                     z_loss_func)

from mswift.kernels import aux_loss_scores, switch_load_balancing_loss, updated_expert_bias, z_loss


def _logits(seed=0, tokens=37, experts=12):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_aux_loss_equals_megatron(score_function):
    topk, coeff = 3, 1e-2
    results = []
    for scores_fn in ("mswift", "megatron"):
        logits = _logits().requires_grad_()
        if scores_fn == "mswift":
            scores, counts = aux_loss_scores(logits, topk, score_function)
            loss = switch_load_balancing_loss(scores, counts, logits.shape[0], topk, coeff)
        else:
            routing_map, scores = compute_routing_scores_for_aux_loss(logits, topk,
                                                                      score_function)
            counts = routing_map.sum(dim=0)
            loss = switch_load_balancing_loss_func(scores, counts, logits.shape[0], topk,
                                                   logits.shape[1], coeff)
        loss.backward()
        results.append((scores, counts, loss, logits.grad))
    (s1, c1, l1, g1), (s2, c2, l2, g2) = results
    assert torch.equal(c1, c2)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-12)


def test_global_counts_enter_like_megatron():
    # counts and token total of a larger (global) batch, scores of the local one
    scores = torch.softmax(_logits(1), dim=-1)
    counts = torch.tensor([9, 0, 4, 7, 3, 3, 1, 8, 2, 5, 6, 12])
    want = switch_load_balancing_loss_func(scores, counts, 100, 2, 12, 0.1)
    torch.testing.assert_close(switch_load_balancing_loss(scores, counts, 100, 2, 0.1), want,
                               rtol=1e-6, atol=0)


def test_z_loss_equals_megatron():
    results = []
    for fn in (z_loss, z_loss_func):
        logits = _logits(2).requires_grad_()
        loss = fn(logits, 1e-3)
        loss.backward()
        results.append((loss, logits.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


@pytest.fixture
def single_rank_parallel_state():
    """megatron-core's bias update all-reduces over its data-parallel group: one gloo rank."""
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel()
            yield
        finally:
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def test_expert_bias_update_equals_megatron(single_rank_parallel_state):
    counts = torch.tensor([5.0, 0.0, 3.0, 3.0, 9.0, 4.0])  # mean 4: expert 5 sits on it
    bias = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05, -0.1])
    want = get_updated_expert_bias(counts.clone(), bias, 1e-3)  # all-reduces in place
    got = updated_expert_bias(counts, bias, 1e-3)
    assert torch.equal(got, want)
    assert got[5] == bias[5]  # at the mean: unchanged
