"""NCCL collectives as training starts them: ``init_distributed`` on a GPU machine picks NCCL
and the rank's device, and an all-reduce of a tensor on that device sums over the ranks."""
import pytest
import torch

from mswift.testing.ranks import run_ranks

pytestmark = pytest.mark.gpu


def _all_reduce_on_local_device(world_size: int) -> dict:
    import torch.distributed as dist

    from mswift.config import load_config
    from mswift.runtime import init_distributed
    from mswift.runtime.device import local_device

    init_distributed(load_config(None, []))
    rank = dist.get_rank()
    value = torch.full((1000,), float(rank + 1), device=local_device())
    dist.all_reduce(value)
    return {"backend": dist.get_backend(), "device": str(value.device),
            "sum": value.unique().tolist(), "expected": world_size * (world_size + 1) / 2}


def _check(results: list[dict]) -> None:
    for rank, got in enumerate(results):
        assert got["backend"] == "nccl", got
        assert got["device"] == f"cuda:{rank}", got
        assert got["sum"] == [got["expected"]], got


def test_one_rank_all_reduce_under_nccl():
    _check(run_ranks(1, _all_reduce_on_local_device, 1, timeout=180))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one visible)")
def test_two_ranks_all_reduce_under_nccl():
    _check(run_ranks(2, _all_reduce_on_local_device, 2, timeout=180))
