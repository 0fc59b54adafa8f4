"""Helpers for mswift's own tests (and users' tests of their layouts): multi-rank CPU runs."""
from mswift.testing.ranks import RankFailure, run_ranks

__all__ = ["RankFailure", "run_ranks"]
