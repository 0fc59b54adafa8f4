"""What a run may write and delete in its save folder (mswift/train/save_dir.py), on folders
laid out by hand: refusals change nothing, save_total_limit deletes only this run's
checkpoints, a resumed run keeps its metrics rows up to the resumed step."""
import json
import os

import pytest

from mswift.config import load_config
from mswift.testing.files import snapshot
from mswift.train.metrics import _truncate_after
from mswift.train.save_dir import (
    LEDGER,
    SaveDirError,
    SaveLedger,
    check_save_dir,
    complete_checkpoints,
)


def cfg(*overrides):
    return load_config(None, list(overrides))


def checkpoint(root, iteration, complete=True):
    path = root / (f"iter_{iteration:07d}" + ("" if complete else ".tmp"))
    path.mkdir(parents=True)
    (path / ("metadata.json" if complete else "__0_0.distcp")).write_text("{}")
    return path


def used_folder(root, ledger=(2, 4)):
    """What a run that saved at steps 2 and 4 leaves behind."""
    for iteration in (2, 4):
        checkpoint(root, iteration)
    (root / "latest_checkpointed_iteration.txt").write_text("4\n")
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n"
                                                for s in range(1, 5)))
    if ledger is not None:
        (root / LEDGER).write_text(json.dumps({"written": list(ledger)}))
    return root


@pytest.mark.parametrize("contents", ["missing", "empty", "unrelated"])
def test_a_new_empty_or_unrelated_folder_starts_fresh(tmp_path, contents):
    save = tmp_path / "run"
    if contents != "missing":
        save.mkdir()
    if contents == "unrelated":
        (save / "notes.txt").write_text("mine")
        (save / LEDGER).write_text('{"written": [2]}')  # a ledger alone holds no run's data
    check_save_dir(cfg(f"save={save}"))
    check_save_dir(cfg(f"save={save}", f"load={save}"))  # the usual resume pattern
    check_save_dir(cfg(f"save={save}", f"load={save}", "no_load_optim=true"))


@pytest.mark.parametrize("case", ["no_load", "load_other", "load_one_iter_dir", "metrics_only",
                                  "crashed_save_only", "no_load_optim", "save_hf"])
def test_a_new_run_into_a_used_folder_is_refused_with_nothing_changed(tmp_path, case):
    save = tmp_path / "run"
    overrides = [f"save={save}"]
    if case == "metrics_only":
        save.mkdir()
        (save / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    elif case == "crashed_save_only":
        checkpoint(save, 2, complete=False)
    elif case == "save_hf":
        (save / "hf").mkdir(parents=True)
        (save / "hf" / "config.json").write_text("{}")
        overrides += ["save_hf=true"]
    else:
        used_folder(save)
    overrides += {"load_other": [f"load={tmp_path / 'other'}"],
                  "load_one_iter_dir": [f"load={save / 'iter_0000002'}"],
                  "no_load_optim": [f"load={save}", "no_load_optim=true"]}.get(case, [])
    before = snapshot(tmp_path)
    with pytest.raises(SaveDirError) as err:
        check_save_dir(cfg(*overrides))
    assert snapshot(tmp_path) == before
    message = str(err.value)
    assert f"save={save}" in message and "new or empty folder" in message
    if case == "no_load_optim":
        assert "no_load_optim=true starts again at step 0" in message
    else:
        assert f"pass load={save}" in message


def test_a_file_as_save_is_refused(tmp_path):
    (tmp_path / "run").write_text("mine")
    with pytest.raises(SaveDirError, match="exists and is not a directory"):
        check_save_dir(cfg(f"save={tmp_path / 'run'}"))


def test_resuming_the_folder_is_allowed_however_it_is_spelled(tmp_path):
    save = used_folder(tmp_path / "run")
    (tmp_path / "link").symlink_to(save)
    for load in (save, f"{save}/", tmp_path / "link", save / ".." / "run"):
        check_save_dir(cfg(f"save={save}", f"load={load}"))
    os.chdir(tmp_path)
    check_save_dir(cfg("save=run", f"load={save}"))
    # A run that crashed before its first checkpoint, restarted the same way.
    (save / "metrics.jsonl").rename(tmp_path / "metrics.jsonl")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (tmp_path / "metrics.jsonl").rename(fresh / "metrics.jsonl")
    check_save_dir(cfg(f"save={fresh}", f"load={fresh}"))


def test_a_foreign_checkpoint_after_the_resumed_one_is_refused(tmp_path):
    save = used_folder(tmp_path / "run")
    checkpoint(save, 3)  # before the resumed step: never touched, no problem
    checkpoint(save, 6)
    checkpoint(save, 8, complete=False)
    before = snapshot(tmp_path)
    with pytest.raises(SaveDirError) as err:
        check_save_dir(cfg(f"save={save}", f"load={save}"))
    assert snapshot(tmp_path) == before
    assert "iter_0000006, iter_0000008.tmp lies after the checkpoint this run resumes from " \
           "(iteration 4)" in str(err.value)
    assert "iter_0000003" not in str(err.value)
    (save / LEDGER).write_text(json.dumps({"written": [2, 4, 6, 8]}))  # this run's: fine
    check_save_dir(cfg(f"save={save}", f"load={save}"))
    (save / LEDGER).write_text("{not json")
    with pytest.raises(SaveDirError, match=f"{LEDGER}: not a list of written iterations"):
        check_save_dir(cfg(f"save={save}", f"load={save}"))


def test_a_save_never_writes_over_what_this_run_did_not_write(tmp_path):
    checkpoint(tmp_path, 5)
    checkpoint(tmp_path, 6, complete=False)
    ledger = SaveLedger(tmp_path)
    for iteration, name in ((5, "iter_0000005"), (6, "iter_0000006.tmp")):
        with pytest.raises(SaveDirError, match=f"{name} was not saved by this run"):
            ledger.claim(iteration)
    ledger.claim(7)
    assert SaveLedger(tmp_path, {5}).claim(5) is None  # its own: may be written again


def test_save_total_limit_deletes_only_this_runs_older_checkpoints(tmp_path):
    for iteration in (2, 4, 5, 6, 8):
        checkpoint(tmp_path, iteration)
    foreign_tmp = checkpoint(tmp_path, 3, complete=False)
    own_tmp = checkpoint(tmp_path, 7, complete=False)  # a crashed save of this run
    SaveLedger(tmp_path, {2, 4, 6, 7, 8}).tidy(1, tmp_path / "iter_0000008")
    assert [i for i, _ in complete_checkpoints(tmp_path)] == [5, 8]
    assert foreign_tmp.is_dir() and not own_tmp.exists()
    assert json.loads((tmp_path / LEDGER).read_text())["written"] == [8]


def test_save_total_limit_keeps_the_trackers_and_the_newest(tmp_path):
    for iteration in (2, 4, 6):
        checkpoint(tmp_path, iteration)
    SaveLedger(tmp_path, {2, 4, 6}).tidy(1, tmp_path / "iter_0000002")
    assert [i for i, _ in complete_checkpoints(tmp_path)] == [2, 6]
    SaveLedger(tmp_path, {2, 6}).tidy(None, tmp_path / "iter_0000006")  # no limit: all kept
    assert [i for i, _ in complete_checkpoints(tmp_path)] == [2, 6]


def rows(*steps):
    return [json.dumps({"step": s, "loss": 1.0 / s}) for s in steps]


def test_resumed_metrics_keep_every_row_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    kept = rows(1, 2) + ["not json, kept as it is", '{"note": "no step"}'] + rows(3, 4)
    path.write_text("\n".join(kept + rows(5, 6)) + '\n{"step": 7, "lo')  # torn by a crash
    _truncate_after(path, 4)
    assert path.read_text() == "\n".join(kept) + "\n"
    path.write_text("\n".join(rows(1, 2, 3)))  # the last row complete, its newline lost
    _truncate_after(path, 4)
    assert path.read_text() == "\n".join(rows(1, 2, 3)) + "\n"
    before = snapshot(tmp_path)
    _truncate_after(path, 4)  # nothing to drop: the file is not rewritten
    assert snapshot(tmp_path) == before


def test_the_command_line_reports_it_before_start(tmp_path):
    """mswift train / launch/pretrain_sft.py: one of the checks before torch is imported."""
    from mswift.config import ConfigError
    from mswift.train.preflight import check_before_start

    save = used_folder(tmp_path / "run")
    with pytest.raises(ConfigError, match=f"save={save}: already holds a run's"):
        check_before_start(cfg(f"save={save}"), world_size=1)
