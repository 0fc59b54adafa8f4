"""Training ``load=`` of a checkpoint from elsewhere runs no code: a ``.metadata`` or
``common.pt`` that would call ``os.system`` is refused with the file named."""
import os
import pickle
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from mswift.testing import RankFailure, run_ranks
from test_layouts import BASE

STEPS = BASE + ["num_layers=2", "global_batch_size=2", "save_interval=1"]


class RunsCommand:
    """Unpickling this runs ``command`` through os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def train(overrides):
    from mswift.config import load_config
    from mswift.train.loop import run_training

    return [row["step"] for row in run_training(load_config(None, STEPS + overrides))]


def test_a_poisoned_checkpoint_is_refused_and_runs_nothing(tmp_path):
    save = tmp_path / "run"
    assert run_ranks(1, train, [f"save={save}", "train_iters=1"])[0] == [1]
    ckpt = save / "iter_0000001"
    marker = tmp_path / "ran"
    real = tmp_path / "real"
    shutil.copytree(ckpt, real)

    metadata = FileSystemReader(str(ckpt)).read_metadata()
    metadata.planner_data = {"x": RunsCommand(f"touch {marker}")}
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(RankFailure, match=rf"{ckpt / '.metadata'}: names posix\.system"):
        run_ranks(1, train, [f"load={save}", "train_iters=2"])
    assert not marker.exists()

    shutil.copy(real / ".metadata", ckpt / ".metadata")
    common = torch.load(real / "common.pt", weights_only=True)
    common["extra"] = {"x": RunsCommand(f"touch {marker}")}
    torch.save(common, ckpt / "common.pt")
    with pytest.raises(RankFailure, match=rf"{ckpt / 'common.pt'}: refused"):
        run_ranks(1, train, [f"load={save}", "train_iters=2"])
    assert not marker.exists()  # (real checkpoints load: test_resume.py, same code)
