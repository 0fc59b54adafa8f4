"""Padding stays out of the MoE routers' statistics: one training step of a tiny DeepSeek-V3 on a
packed THD row of two samples (13 and 20 tokens) followed by 15 padding tokens gives the same
expert-bias update, load-balancing loss and updated router weights as the same two samples packed
without padding, and both equal a reference computed here from the router logits of the real
tokens only.

The reference: each MoE router's logits captured by a forward pre-hook (router input times its
weight, fp32); DeepSeek-V3's choice as transformers makes it (``hf_choice``) for the bias update
``bias + rate * sign(mean load - load)``; megatron-core's ``aux_loss`` written out for the loss:
sigmoid scores normalised per token, top-k of them counted per expert,
``E / (k T^2) * sum_e (sum_t score[t, e]) * count[e]`` over the T real tokens. The padding (one
repeated token id) sends its 15 tokens to the same experts, so counting it would move the bias
otherwise (asserted).
"""
from pathlib import Path

import pytest
import torch
from test_expert_bias_update import hf_choice

from mswift.testing import run_ranks

ROOT = Path(__file__).resolve().parents[2]
CORPUS = str(ROOT / "examples" / "data" / "tiny_corpus.txt")
RATE = 0.01
COEFF = 0.1
SAMPLES = (13, 20)
PADDING = 15
RUN = ["tokenizer=byte", f"dataset=[{CORPUS}]", f"seq_length={sum(SAMPLES) + PADDING}",
       "micro_batch_size=1", "global_batch_size=1", "train_iters=1", "lr=1e-2",
       "lr_warmup_iters=0", "seed=7", f"moe_router_bias_update_rate={RATE}",
       "moe_router_load_balancing_type=aux_loss", f"moe_aux_loss_coeff={COEFF}"]


def packed_batch(tokens: torch.Tensor, padding: int) -> dict:
    """One packed row of SAMPLES taken from ``tokens``, then ``padding`` pad tokens (id 0), as
    mswift's data pipeline lays it out (the padding is one more cu_seqlens segment)."""
    lengths = list(SAMPLES) + ([padding] if padding else [])
    total = sum(lengths)
    ids = torch.zeros(total, dtype=torch.int64)
    labels = torch.full((total,), -100, dtype=torch.int64)
    positions = torch.cat([torch.arange(n) for n in lengths])
    start = 0
    for n in SAMPLES:
        ids[start:start + n] = tokens[start:start + n]
        labels[start:start + n - 1] = tokens[start + 1:start + n]
        start += n
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    real = torch.arange(total) < sum(SAMPLES)
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None],
            "loss_mask": (labels != -100).float()[None], "attention_mask": real[None],
            "cu_seqlens": cu, "max_seqlen": torch.tensor(max(lengths), dtype=torch.int32)}


def train_step_on(hf_dir: str, tokens: torch.Tensor) -> dict:
    """Rank body: for the padded and the unpadded batch, one step from the HF weights; each
    router's bias before / after, its weight after, its logits and the logged loss."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from mswift.config import load_config
    from mswift.testing.routers import capture_router_logits
    from mswift.train.loop import setup
    from mswift.train.step import train_step

    out = {}
    for name, padding in (("padded", PADDING), ("unpadded", 0)):
        state = setup(load_config(None, [f"hf_model={hf_dir}"] + RUN))
        routers, logits = capture_router_logits(state.model)
        before = {key: router.expert_bias.detach().clone() for key, router in routers.items()}
        clear_aux_losses_tracker()
        train_step(state, [packed_batch(tokens, padding)])
        logged = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
        out[name] = {key: {"before": before[key], "after": router.expert_bias.detach().clone(),
                           "weight": router.weight.detach().clone(), "logits": logits[key],
                           "loss": logged[router.layer_number - 1].item()}
                     for key, router in routers.items()}
    return out


def aux_loss(logits: torch.Tensor, top_k: int) -> float:
    """megatron-core's ``aux_loss`` (divided by its coefficient) of sigmoid router logits."""
    scores = logits.double().sigmoid()
    scores = scores / scores.sum(-1, keepdim=True)
    tokens, experts = scores.shape
    counts = torch.bincount(scores.topk(top_k, dim=-1).indices.reshape(-1), minlength=experts)
    return (experts / (top_k * tokens ** 2) * (scores.sum(0) * counts).sum()).item()


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    from transformers import AutoConfig

    from mswift.testing.hf_models import save_tiny_hf_model

    path = save_tiny_hf_model("deepseek_v3", tmp_path_factory.mktemp("dsv3") / "model",
                              vocab_size=256, num_hidden_layers=2, seed=5)
    tokens = torch.randint(1, 256, (sum(SAMPLES),), generator=torch.Generator().manual_seed(3))
    return run_ranks(1, train_step_on, str(path), tokens, timeout=600)[0], \
        AutoConfig.from_pretrained(str(path))


def test_padding_changes_neither_the_bias_update_nor_the_aux_loss(steps):
    runs, config = steps
    padded, unpadded = runs["padded"], runs["unpadded"]
    assert len(padded) == 1, "expected the MoE layer's router"
    real = sum(SAMPLES)
    padding_would_count = False
    for key, got in padded.items():
        logits = got["logits"]
        assert logits.shape[0] == real + PADDING
        assert torch.allclose(logits[:real], unpadded[key]["logits"], atol=1e-5)

        def updated(rows):
            chosen = hf_choice(rows, got["before"], config.num_experts_per_tok,
                               config.n_group, config.topk_group)
            load = torch.bincount(chosen.reshape(-1), minlength=got["before"].numel()).double()
            return got["before"] + RATE * torch.sign(load.mean() - load).float()

        want = updated(logits[:real])
        assert torch.equal(got["after"], want)
        assert torch.equal(unpadded[key]["after"], want)
        padding_would_count |= not torch.equal(updated(logits), want)
        loss = aux_loss(logits[:real], config.num_experts_per_tok)
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        assert unpadded[key]["loss"] == pytest.approx(loss, rel=1e-5)
        assert abs(aux_loss(logits, config.num_experts_per_tok) - loss) > 1e-3 * loss
        # the step's gradients (LM loss and aux loss) were the same: so are the router weights
        scale = unpadded[key]["weight"].abs().max()
        assert (got["weight"] - unpadded[key]["weight"]).abs().max() <= 1e-5 * scale
    assert padding_would_count, "counting the padding would give the same bias update here"
