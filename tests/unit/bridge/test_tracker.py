"""The one tracker reader / writer (latest_checkpointed_iteration.txt), as training saves and
loads and the bridge's conversions use it."""
from __future__ import annotations

import os

import pytest

from mswift.bridge.errors import BridgeError
from mswift.bridge.tracker import (
    RELEASE,
    TRACKER,
    TrackerError,
    iteration_dir,
    read_iteration_dir,
    read_tracker,
    write_tracker,
)


def test_written_as_megatron_lm_reads_it_and_replaced_whole(tmp_path):
    write_tracker(tmp_path, 3)
    assert (tmp_path / TRACKER).read_text() == "3\n"  # Megatron-LM: int(f.read().strip())
    (tmp_path / f"{TRACKER}.tmp").write_text("9")  # left by a save that crashed before rename
    write_tracker(tmp_path, 12)
    assert read_tracker(tmp_path) == 12
    assert sorted(os.listdir(tmp_path)) == [TRACKER]  # no temporary file stays behind
    assert iteration_dir(tmp_path, 12) == tmp_path / "iter_0000012"


def test_a_failed_write_keeps_the_old_tracker(tmp_path):
    write_tracker(tmp_path, 4)
    (tmp_path / f"{TRACKER}.tmp").mkdir()  # the temporary file cannot be written
    with pytest.raises(OSError):
        write_tracker(tmp_path, 5)
    assert read_tracker(tmp_path) == 4


def test_read_names_missing_release_and_bad_text(tmp_path):
    assert read_tracker(tmp_path) is None
    (tmp_path / TRACKER).write_text("release\n")
    assert read_tracker(tmp_path) == RELEASE
    (tmp_path / TRACKER).write_text("iter 7\n")
    with pytest.raises(TrackerError, match=rf"{TRACKER}: expected an iteration number or "
                                           r"'release', found 'iter 7'"):
        read_tracker(tmp_path)


def test_iteration_dir_of_the_bridge(tmp_path):
    with pytest.raises(BridgeError, match=f"{TRACKER}: not found"):
        read_iteration_dir(tmp_path)
    write_tracker(tmp_path, 2)
    with pytest.raises(BridgeError, match=r"names iteration 2, but .*iter_0000002 is missing"):
        read_iteration_dir(tmp_path)
    iteration_dir(tmp_path, 2).mkdir()
    assert read_iteration_dir(tmp_path) == (tmp_path / "iter_0000002", 2)
    (tmp_path / TRACKER).write_text("release")
    assert read_iteration_dir(tmp_path) == (tmp_path / "release", 0)
    (tmp_path / TRACKER).write_text("-1")
    with pytest.raises(BridgeError, match="expected an iteration number or 'release'"):
        read_iteration_dir(tmp_path)


def test_training_load_reads_the_same_tracker(tmp_path):
    from mswift.train.checkpoint import CheckpointError, checkpoint_to_load

    ckpt = iteration_dir(tmp_path, 6)
    ckpt.mkdir()
    write_tracker(tmp_path, 6)
    with pytest.raises(CheckpointError, match="names iteration 6, but .* missing or incomplete"):
        checkpoint_to_load(tmp_path)
    (ckpt / "metadata.json").write_text("{}")
    assert checkpoint_to_load(tmp_path) == ckpt
    (tmp_path / TRACKER).write_text("release")  # a Megatron-LM release folder is not loadable
    with pytest.raises(CheckpointError, match="expected an iteration number, found 'release'"):
        checkpoint_to_load(tmp_path)
    (tmp_path / TRACKER).write_text("six")
    with pytest.raises(CheckpointError, match=f"{TRACKER}: expected an iteration number"):
        checkpoint_to_load(tmp_path)
