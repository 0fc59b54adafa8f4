"""DeepSeek-V3's complementary sequence-wise balance loss (``moe_router_load_balancing_type=
seq_aux_loss``) over each packed sample, at TP1 and at TP2+SP, equals the paper's formula
computed here per sample from the router logits of the real tokens: for a sample of T tokens,
``sum_i f_i P_i`` with ``f_i = E / (k T) * (tokens whose top-k normalised sigmoid scores hold
i)`` and ``P_i`` the mean normalised score of expert i, averaged over the samples.

The batch is test_moe_padding's packed row (samples of 13 and 20 tokens, then 15 padding
tokens); at TP2+SP each rank routes 24 of its 48 tokens, so the second sample spans both ranks.
Each rank's logged loss is its tokens' share: their sum is the loss; the router weight's
gradient equals TP1's. megatron-core 0.16.1's own seq_aux_loss takes the packed row as one
sequence, which gives another number (asserted).
"""
import pytest
import torch
from test_moe_padding import PADDING, RUN, SAMPLES, packed_batch

from mswift.testing import run_ranks

COEFF = 0.1
LAYOUTS = {"tp1": [], "tp2-sp": ["tensor_model_parallel_size=2", "sequence_parallel=true"]}
SEQ_AUX = ["moe_router_load_balancing_type=seq_aux_loss", f"moe_aux_loss_coeff={COEFF}",
           "global_batch_size=2"]  # (tp1 on two ranks is DP2)


def logged_losses(hf_dir: str, tokens: torch.Tensor) -> dict:
    """Rank body: per layout, each router's logits of this rank's tokens, its logged
    sequence-wise loss (divided by the coefficient) and its weight's reduced gradient after one
    step on the padded row."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from mswift.config import load_config
    from mswift.testing.routers import capture_router_logits
    from mswift.train.loop import setup
    from mswift.train.step import train_step

    out = {}
    for name, layout in LAYOUTS.items():
        state = setup(load_config(None, [f"hf_model={hf_dir}"] + RUN + SEQ_AUX + layout))
        routers, logits = capture_router_logits(state.model)
        clear_aux_losses_tracker()
        train_step(state, [packed_batch(tokens, PADDING)])
        logged = get_moe_layer_wise_logging_tracker()["seq_load_balancing_loss"]["values"]
        out[name] = {key: {"logits": logits[key], "grad": router.weight.main_grad.clone(),
                           "loss": logged[router.layer_number - 1].item()}
                     for key, router in routers.items()}
    return out


def sequence_wise_loss(logits: torch.Tensor, bounds: list[int], top_k: int) -> float:
    """The DeepSeek-V3 paper's sequence-wise balance loss (no coefficient), averaged over the
    sequences ``logits[bounds[j]:bounds[j + 1]]``."""
    losses = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores = logits[start:end].double().sigmoid()
        scores = scores / scores.sum(-1, keepdim=True)
        tokens, experts = scores.shape
        chosen = torch.bincount(scores.topk(top_k, dim=-1).indices.reshape(-1),
                                minlength=experts)
        share = experts / (top_k * tokens) * chosen
        losses.append((share * scores.mean(0)).sum().item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import AutoConfig

    from mswift.testing.hf_models import save_tiny_hf_model

    path = save_tiny_hf_model("deepseek_v3", tmp_path_factory.mktemp("dsv3") / "model",
                              vocab_size=256, num_hidden_layers=2, seed=5)
    tokens = torch.randint(1, 256, (sum(SAMPLES),), generator=torch.Generator().manual_seed(3))
    return run_ranks(2, logged_losses, str(path), tokens, timeout=600), \
        AutoConfig.from_pretrained(str(path))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sequence_wise_loss_is_the_papers_per_packed_sample(runs, layout):
    ranks, config = runs
    top_k = config.num_experts_per_tok
    bounds = [0, SAMPLES[0], sum(SAMPLES)]
    for key in ranks[0][layout]:
        if layout == "tp1":  # DP2: both ranks ran the whole row
            logits, got = ranks[0][layout][key]["logits"], ranks[0][layout][key]["loss"]
        else:  # each rank its half of the row's tokens, in rank order
            logits = torch.cat([rank[layout][key]["logits"] for rank in ranks])
            got = sum(rank[layout][key]["loss"] for rank in ranks)
            reference = ranks[0]["tp1"][key]["logits"]
            assert torch.allclose(logits, reference, atol=1e-5)
        assert logits.shape[0] == sum(SAMPLES) + PADDING
        want = sequence_wise_loss(logits, bounds, top_k)
        assert got == pytest.approx(want, rel=1e-5)
        whole_row = sequence_wise_loss(logits, [0, sum(SAMPLES)], top_k)
        assert abs(whole_row - want) > 1e-3 * want


def test_the_router_gradient_at_tp2_sp_is_tp1s(runs):
    """The loss's gradient (with the LM loss's) on the router weight: each rank's share is
    scaled by the micro-batch's real tokens, not its own (megatron-core's convention, which
    halves this gradient at TP2)."""
    ranks, _ = runs
    for key, tp1 in ranks[0]["tp1"].items():
        for rank in ranks:
            got = rank["tp2-sp"][key]["grad"]
            assert (got - tp1["grad"]).abs().max() <= 1e-5 * tp1["grad"].abs().max()
