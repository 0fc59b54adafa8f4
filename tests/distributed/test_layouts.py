"""The same tiny GPT trained at every parallel layout gives the TP=1 run's losses (fp32, 1e-5).

Each layout loads the reference run's initial weights from a torch_dist checkpoint (megatron-core
reshards them), then trains 5 steps with megatron-core's DistributedOptimizer on the bundled text.
"""
from pathlib import Path

import pytest

from mswift.testing import run_ranks

CORPUS = str(Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_corpus.txt")
BASE = [
    "num_layers=4", "hidden_size=64", "ffn_hidden_size=128", "num_attention_heads=4",
    "num_query_groups=2", "vocab_size=256", "max_position_embeddings=64", "normalization=RMSNorm",
    "swiglu=true", "position_embedding_type=rope", f"dataset=[{CORPUS}]", "seq_length=32",
    "micro_batch_size=2", "global_batch_size=8", "train_iters=3", "lr=1e-3", "min_lr=1e-4",
    "lr_warmup_iters=1", "seed=7",
]
MOE = ["num_experts=4", "moe_router_topk=2", "moe_ffn_hidden_size=64",
       "moe_token_dispatcher_type=alltoall"]
REL_TOL = 1e-5


def train_layout(overrides, load=None, save_init=None):
    """Rank body: build the layout, optionally load weights / save them, train; return losses."""
    from mswift.config import load_config
    from mswift.train.checkpoint import load_checkpoint, save_checkpoint
    from mswift.train.loop import run_training, setup

    cfg = load_config(None, BASE + ["train_iters=5"] + overrides)
    state = setup(cfg)
    if load is not None:
        load_checkpoint(state, load, load_optim=False)
    if save_init is not None:
        save_checkpoint(state, save_init, weights_only=True)
    return [step["loss"] for step in run_training(cfg, state)]


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory):
    init = tmp_path_factory.mktemp("dense_init")
    (losses,) = run_ranks(1, train_layout, [], save_init=str(init))
    return init, losses


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    init = tmp_path_factory.mktemp("moe_init")
    (losses,) = run_ranks(1, train_layout, MOE, save_init=str(init))
    return init, losses


def assert_same_losses(got, want):
    assert len(got) == len(want) == 5
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= REL_TOL * abs(w), f"step {step}: loss {g!r} vs TP=1 {w!r}"


def test_reference_trains(dense_reference):
    _, losses = dense_reference
    assert losses[0] > losses[-1], f"loss did not fall: {losses}"


@pytest.mark.parametrize(
    "world,layout",
    [
        (2, ["tensor_model_parallel_size=2"]),
        (2, ["tensor_model_parallel_size=2", "sequence_parallel=true"]),
        (2, ["pipeline_model_parallel_size=2"]),  # 1F1B, 4 micro-batches
        (4, ["tensor_model_parallel_size=2", "pipeline_model_parallel_size=2"]),
    ],
    ids=["tp2", "tp2-sp", "pp2-1f1b", "tp2-pp2"],
)
def test_dense_layout_matches_tp1(dense_reference, world, layout):
    init, want = dense_reference
    results = run_ranks(world, train_layout, layout, load=str(init))
    for losses in results:  # every rank reports the same global loss
        assert_same_losses(losses, want)


@pytest.mark.parametrize(
    "world,layout",
    [
        (2, ["expert_model_parallel_size=2"]),
        (4, ["expert_model_parallel_size=2", "tensor_model_parallel_size=2",
             "sequence_parallel=true"]),
        (4, ["tensor_model_parallel_size=2", "sequence_parallel=true",
             "pipeline_model_parallel_size=2"]),
    ],
    ids=["ep2", "tp2-ep2-sp", "tp2-sp-pp2"],
)
def test_moe_layout_matches_tp1(moe_reference, world, layout):
    init, want = moe_reference
    results = run_ranks(world, train_layout, MOE + layout, load=str(init))
    for losses in results:
        assert_same_losses(losses, want)
