"""Aux-loss-free balancing: after one training step of a tiny DeepSeek-V3 at EP2, every MoE
layer's ``expert_bias`` (HF ``e_score_correction_bias``) is the bias before the step plus
``rate * sign(mean load - load of the expert)``, the load of an expert being the tokens routed
to it over the whole step: every micro-batch of both data-parallel ranks (megatron-core 0.16.1's
``finalize_model_grads`` sums the routers' counts over TPxCPxDP before
``get_updated_expert_bias``).

The reference is computed here from each router's logits (captured by a forward pre-hook as the
router input times its weight, in fp32) with DeepSeek-V3's choice written out in plain torch as
transformers computes it: sigmoid scores plus the bias, groups scored by their top-2 biased
scores, the best ``topk_group`` groups kept (others' scores set to 0), top-k of those. The data
is plain pretraining text (byte tokens, 32-token rows, no padding), so every routed token is a
token of the step.
"""
from pathlib import Path

import pytest
import torch

from mswift.testing import run_ranks

ROOT = Path(__file__).resolve().parents[2]
CORPUS = str(ROOT / "examples" / "data" / "tiny_corpus.txt")
RATE = 0.01
# Global batch 8 = 2 per micro-batch x 2 data-parallel ranks x 2 micro-batches.
RUN = ["tokenizer=byte", f"dataset=[{CORPUS}]", "seq_length=32", "micro_batch_size=2",
       "global_batch_size=8", "train_iters=1", "lr=1e-3", "lr_warmup_iters=0", "seed=7",
       "expert_model_parallel_size=2", f"moe_router_bias_update_rate={RATE}"]


def train_one_step(hf_dir: str) -> dict:
    """Rank body: one training step; each MoE router's bias before and after, and the logits
    of every token it routed during the step (the pre-hook runs before the optimizer moves
    the router weight)."""
    from mswift.config import load_config
    from mswift.train.loop import run_training, setup

    cfg = load_config(None, [f"hf_model={hf_dir}"] + RUN)
    state = setup(cfg)
    routers = {name: module for ddp in state.model for name, module in ddp.module.named_modules()
               if getattr(module, "expert_bias", None) is not None}
    logits = {name: [] for name in routers}

    def capture(name):
        def hook(module, args):
            if module.training and torch.is_grad_enabled():  # training forwards only
                hidden = args[0].detach().float()
                logits[name].append((hidden.reshape(-1, hidden.shape[-1])
                                     @ module.weight.detach().float().t()))
        return hook

    for name, router in routers.items():
        router.register_forward_pre_hook(capture(name))
    before = {name: router.expert_bias.detach().clone() for name, router in routers.items()}
    run_training(cfg, state)
    return {name: {"before": before[name], "after": router.expert_bias.detach().clone(),
                   "logits": torch.cat(logits[name])} for name, router in routers.items()}


def hf_choice(logits: torch.Tensor, bias: torch.Tensor, top_k: int, groups: int,
              topk_group: int) -> torch.Tensor:
    """[tokens, top_k] expert indices as transformers' DeepseekV3MoE chooses them."""
    scores = logits.sigmoid() + bias
    tokens, experts = scores.shape
    group_scores = scores.view(tokens, groups, experts // groups).topk(2, dim=-1).values.sum(-1)
    best_groups = group_scores.topk(topk_group, dim=-1).indices
    keep = torch.zeros(tokens, groups, dtype=torch.bool)
    keep[torch.arange(tokens)[:, None], best_groups] = True
    keep = keep[:, :, None].expand(tokens, groups, experts // groups).reshape(tokens, experts)
    return scores.masked_fill(~keep, 0.0).topk(top_k, dim=-1).indices


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    from mswift.testing.hf_models import save_tiny_hf_model

    # Layer 0 dense, layers 1-2 MoE (8 experts, 4 groups, top-3 of the best 2 groups). A bias
    # of the debug model's random size keeps the choice dependent on it.
    path = save_tiny_hf_model("deepseek_v3", tmp_path_factory.mktemp("dsv3") / "model",
                              vocab_size=256, num_hidden_layers=3, seed=3)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    return run_ranks(2, train_one_step, str(path), timeout=600), config


def test_expert_bias_moves_by_the_sign_of_the_global_load(step):
    ranks, config = step
    assert len(ranks[0]) == 2, "expected the two MoE layers' routers"
    local_differs = False  # would one rank's own counts have moved some bias otherwise?
    for name in ranks[0]:
        bias = ranks[0][name]["before"]
        counts = []
        for rank in ranks:
            assert torch.equal(rank[name]["before"], bias)
            chosen = hf_choice(rank[name]["logits"], bias, config.num_experts_per_tok,
                               config.n_group, config.topk_group)
            counts.append(torch.bincount(chosen.reshape(-1), minlength=bias.numel()).double())
        # 2 ranks x 2 micro-batches x 2 rows x 32 tokens, each routed to top-k experts
        assert sum(c.sum() for c in counts) == 2 * 2 * 2 * 32 * config.num_experts_per_tok
        load = sum(counts)
        want = bias + RATE * torch.sign(load.mean() - load).float()
        for rank in ranks:
            assert torch.equal(rank[name]["after"], want), (name, load, rank[name]["after"], want)
        assert (want != bias).sum() >= bias.numel() - 1, "the loads should differ"
        local_differs |= any(not torch.equal(bias + RATE * torch.sign(c.mean() - c).float(),
                                             want) for c in counts)
    assert local_differs, "the data does not show that the counts are summed over the ranks"
