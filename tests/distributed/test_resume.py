"""Exact resume: 8 steps straight == 4 steps + stop + resume 4 (bit for bit, same layout);
resuming at another layout continues within 1e-5. Non-finite steps change no parameter. A
resumed run keeps its metrics rows and what it did not write; a new run into a used save
folder is refused on every rank."""
import json
import shutil

import pytest

from mswift.testing import run_ranks
from mswift.testing.files import snapshot
from test_layouts import BASE

pytestmark = pytest.mark.slow  # eight spawns of 2 training ranks

STEPS = BASE + ["train_iters=8", "lr_warmup_iters=2", "lr_decay_style=cosine"]


def train(overrides):
    from mswift.config import load_config
    from mswift.train.loop import run_training

    history = run_training(load_config(None, STEPS + overrides))
    return [(row["step"], row["loss"], row["grad_norm"]) for row in history]


def train_each(runs):
    return [train(overrides) for overrides in runs]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The runs that start from nothing, in one spawn of 2 ranks (each sets itself up from
    scratch), by name: rank 0's rows and the save folder; a resumed run gets fresh processes,
    so that nothing but the checkpoint carries state into it."""
    tp2 = ["tensor_model_parallel_size=2"]
    saves = {"stop4": tmp_path_factory.mktemp("stop4"),
             "stop6": tmp_path_factory.mktemp("stop6") / "run"}
    runs = {"straight": tp2,
            "stop4": tp2 + [f"save={saves['stop4']}", "exit_interval=4"],
            "stop6": tp2 + [f"save={saves['stop6']}", "save_interval=2", "save_total_limit=2",
                            "exit_interval=6"]}
    rows = run_ranks(2, train_each, list(runs.values()))[0]
    return {name: (r, saves.get(name)) for name, r in zip(runs, rows)}


@pytest.fixture(scope="module")
def straight(fresh):
    return fresh["straight"][0]


def test_resume_is_bit_exact_and_reshards(fresh, straight):
    tp2 = ["tensor_model_parallel_size=2"]
    first, save = fresh["stop4"]
    assert [s for s, _, _ in first] == [1, 2, 3, 4]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    second = run_ranks(2, train, tp2 + [f"load={save}"])[0]
    assert [s for s, _, _ in second] == [5, 6, 7, 8]
    assert first + second == straight  # losses and grad norms identical, not just close

    other = run_ranks(2, train, ["pipeline_model_parallel_size=2", f"load={save}"])[0]
    assert [s for s, _, _ in other] == [5, 6, 7, 8]
    for (_, got, got_norm), (_, want, want_norm) in zip(other, straight[4:]):
        assert abs(got - want) <= 1e-5 * want and abs(got_norm - want_norm) <= 1e-4 * want_norm


def refused(overrides):
    """Rank body: the SaveDirError this rank raised (each rank must stop by itself)."""
    from mswift.train.save_dir import SaveDirError

    try:
        train(overrides)
    except SaveDirError as err:
        return str(err)
    return None


def test_resume_keeps_metrics_rows_and_checkpoints_it_did_not_write(fresh, straight):
    first, save = fresh["stop6"]
    root = save.parent
    every2 = ["tensor_model_parallel_size=2", f"save={save}", "save_interval=2"]
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    metrics = save / "metrics.jsonl"
    logged = metrics.read_text()
    assert [json.loads(line)["step"] for line in logged.splitlines()] == [1, 2, 3, 4, 5, 6]

    # Not this run's: a checkpoint copied in, a temporary folder of another writer.
    shutil.copytree(save / "iter_0000004", save / "iter_0000005")
    (save / "iter_0000003.tmp").mkdir()
    (save / "iter_0000003.tmp" / "keep.txt").write_text("mine")
    foreign = snapshot(save / "iter_0000005"), snapshot(save / "iter_0000003.tmp")
    # Rows logged after the step-6 checkpoint, the last one cut short by a crash.
    metrics.write_text(logged + '{"step": 7, "loss": 9.9}\n{"step": 8, "lo')

    before = snapshot(root)
    for message in run_ranks(2, refused, every2):  # a new run into the used folder
        assert f"pass load={save}" in message and "new or empty folder" in message
    assert snapshot(root) == before

    second = run_ranks(2, train, every2 + [f"load={save}", "save_total_limit=1"])[0]
    assert first + second == straight  # resumed at step 6, bit for bit
    assert sorted(p.name for p in save.glob("iter_*")) == [
        "iter_0000003.tmp", "iter_0000005", "iter_0000008"]
    assert (snapshot(save / "iter_0000005"), snapshot(save / "iter_0000003.tmp")) == foreign
    text = metrics.read_text()
    assert text.startswith(logged)  # rows 1-6 kept as they were
    assert [json.loads(line)["step"] for line in text.splitlines()] == list(range(1, 9))


def nan_on_rank_one(policy):
    import torch
    import torch.distributed as dist

    from mswift.config import load_config
    from mswift.train.loop import TrainingStopped, run_training, setup

    cfg = load_config(None, STEPS + ["train_iters=3", "lr_warmup_iters=0",
                                     f"nonfinite_policy={policy}"])
    state = setup(cfg)  # DP=2: each rank reads different samples
    model = state.model[0].module
    def poison(module, inputs, output):  # step 2's forward on rank 1 only
        if dist.get_rank() == 1 and state.iteration == 1:
            return output * float("nan")
        return output

    model.embedding.register_forward_hook(poison)
    snapshots = []

    def snapshot():
        params = [p.detach().clone() for p in model.parameters()]
        opt = [v.clone() for s in state.optimizer.optimizer.state.values()
               for v in s.values() if torch.is_tensor(v)]
        return params, opt

    from mswift.train import loop

    original = loop.train_step

    def recording_step(st, batches):
        before = snapshot()
        out = original(st, batches)
        snapshots.append((before, snapshot(), out["updated"]))
        return out

    loop.train_step = recording_step
    try:
        history = run_training(cfg, state)
        stopped = None
    except TrainingStopped as err:
        history, stopped = None, str(err)
    finally:
        loop.train_step = original  # the next policy's run records its own steps
    unchanged = []
    for (p0, o0), (p1, o1), updated in snapshots:
        same = all(torch.equal(a, b) for a, b in zip(p0, p1)) and \
            all(torch.equal(a, b) for a, b in zip(o0, o1))
        unchanged.append(same)
    return [row["updated"] for row in history] if history else None, unchanged, stopped


def nan_on_rank_one_each_policy(policies):
    return {policy: nan_on_rank_one(policy) for policy in policies}


@pytest.fixture(scope="module")
def nonfinite():
    """Per rank, per nonfinite_policy: both policies' runs in one spawn of 2 ranks."""
    return run_ranks(2, nan_on_rank_one_each_policy, ["skip", "stop"])


def test_nonfinite_step_is_skipped_on_every_rank(nonfinite):
    for updated, unchanged, stopped in [rank["skip"] for rank in nonfinite]:
        assert stopped is None
        assert updated == [True, False, True]
        assert unchanged == [False, True, False]  # step 2 changed nothing, on both ranks


def test_nonfinite_step_stops_when_asked(nonfinite):
    for updated, unchanged, stopped in [rank["stop"] for rank in nonfinite]:
        assert updated is None and "step 2" in stopped and "no parameter was changed" in stopped
        assert unchanged == [False, True]
