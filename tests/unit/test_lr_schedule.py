"""The rate each update uses: a warmup that starts above 0, then megatron-core's decay.

The expected rates are written out here from the definitions -- update k of the warmup at
``lr * k / lr_warmup_iters``; after it, Megatron-LM's decay of the updates made so far, ``n``:
cosine ``min_lr + (lr - min_lr) * (1 + cos(pi * (n - W) / (D - W))) / 2`` -- independently of
megatron-core's scheduler that mswift subclasses.
"""
import math

import pytest
import torch

from mswift.config import load_config
from mswift.train.builder import lr_scheduler

LR, MIN_LR = 1e-3, 1e-4


def scheduler_for(overrides):
    cfg = load_config(None, [f"lr={LR}", f"min_lr={MIN_LR}", *overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    return lr_scheduler(cfg, optimizer), optimizer


def rates_used(overrides, steps):
    """The rate of each of ``steps`` updates, stepping the scheduler as train_step does."""
    scheduler, optimizer = scheduler_for(overrides)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return rates, scheduler


def cosine(made, warmup, decay):
    ratio = (made - warmup) / (decay - warmup)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


@pytest.mark.parametrize("warmup", [1, 2, 4])
def test_warmup_starts_above_zero_then_cosine_decay(warmup):
    rates, _ = rates_used(["train_iters=10", f"lr_warmup_iters={warmup}",
                           "lr_decay_style=cosine"], 12)
    want = [LR * k / warmup for k in range(1, warmup + 1)]
    want += [cosine(made, warmup, 10) for made in range(warmup, 11)]
    want += [MIN_LR] * (12 - len(want))  # past lr_decay_iters (= train_iters)
    assert rates == pytest.approx(want, rel=1e-12, abs=0.0)
    assert rates[0] == LR / warmup > 0.0 and rates[warmup - 1] == pytest.approx(LR)


def test_no_warmup_starts_at_lr_with_linear_decay():
    rates, _ = rates_used(["train_iters=4", "lr_warmup_iters=0", "lr_decay_style=linear"], 5)
    want = [MIN_LR + (LR - MIN_LR) * (1 - made / 4) for made in range(5)]
    assert rates == pytest.approx(want, rel=1e-12, abs=0.0) and rates[0] == LR


def test_checkpointed_state_counts_updates_and_resumes_at_the_next_rate():
    overrides = ["train_iters=10", "lr_warmup_iters=4", "lr_decay_style=cosine"]
    rates, scheduler = rates_used(overrides, 3)
    assert rates == pytest.approx([LR / 4, LR / 2, LR * 3 / 4], rel=1e-12)
    state = scheduler.state_dict()
    assert state["num_steps"] == 3  # megatron-core's meaning: updates made
    resumed, optimizer = scheduler_for(overrides)
    resumed.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR)  # step 4's rate
