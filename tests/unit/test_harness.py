"""The multi-rank harness itself: results by rank, a failing rank's traceback, hangs caught."""
import os
import time

import pytest

from mswift.testing import RankFailure, run_ranks


def report_env():
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["MASTER_PORT"]


def fail_on_rank_one():
    if os.environ["RANK"] == "1":
        raise ValueError("rank one is unhappy")
    return "ok"


def hang_on_rank_zero():
    if os.environ["RANK"] == "0":
        time.sleep(600)
    return "ok"


def test_results_come_back_by_rank():
    results = run_ranks(3, report_env)
    assert [r[:2] for r in results] == [(0, 3), (1, 3), (2, 3)]
    assert len({r[2] for r in results}) == 1  # one rendezvous port for all ranks


def test_failing_rank_traceback_is_shown():
    with pytest.raises(RankFailure, match=r"rank 1 of 2 failed(.|\n)*ValueError: rank one"):
        run_ranks(2, fail_on_rank_one)


def test_hang_is_reported_with_the_missing_rank():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"ranks \[0\] of 2 did not finish in 5 s"):
        run_ranks(2, hang_on_rank_zero, timeout=5)
    assert time.monotonic() - start < 60
