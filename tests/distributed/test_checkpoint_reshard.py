"""A torch_dist checkpoint saved by a PP=2 run loads into a TP=2 layout with the same loss."""
import pytest

from mswift.testing import run_ranks
from test_layouts import BASE

NEXT_STEP = 3  # the batch after the 3 trained steps


def train_then_save(save_dir):
    from mswift.config import load_config
    from mswift.train.loop import run_training, setup

    cfg = load_config(None, BASE + ["pipeline_model_parallel_size=2", f"save={save_dir}"])
    state = setup(cfg)
    run_training(cfg, state)  # saves at the end (iteration 3)
    return state.iteration, eval_batch(cfg, state)


def load_then_eval(load_dir, layout):
    from mswift.config import load_config
    from mswift.train.loop import setup

    cfg = load_config(None, BASE + layout + [f"load={load_dir}"])
    state = setup(cfg)  # full resume: weights, optimizer, scheduler, iteration
    return state.iteration, eval_batch(cfg, state)


def eval_batch(cfg, state):
    from megatron.core import parallel_state as ps

    from mswift.data.byte_corpus import ByteCorpus
    from mswift.train.loop import global_batch_size
    from mswift.train.step import eval_step

    corpus = ByteCorpus(cfg.data.dataset, cfg.data.seq_length, seed=cfg.training.seed)
    batches = corpus.micro_batches(NEXT_STEP, global_batch_size(cfg),
                                   cfg.training.micro_batch_size,
                                   ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    return eval_step(state, batches)


@pytest.mark.parametrize("layout", [["tensor_model_parallel_size=2"]], ids=["pp2-to-tp2"])
def test_pp2_checkpoint_loads_at_tp2(tmp_path, layout):
    saved = run_ranks(2, train_then_save, str(tmp_path))
    iteration, want = saved[0]
    assert iteration == 3 and (tmp_path / "iter_0000003" / "metadata.json").is_file()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not list(tmp_path.glob("*.tmp")), "temporary checkpoint left behind"
    loaded = run_ranks(2, load_then_eval, str(tmp_path), layout)
    for got_iteration, got in loaded:
        assert got_iteration == 3
        assert abs(got - want) <= 1e-5 * abs(want), f"loss after reshard {got!r} vs {want!r}"
