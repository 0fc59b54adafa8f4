"""The CPU layer: CUDA-isms in megatron-core run on the CPU (checked in spawned ranks, since
the layer stays on for the life of a process)."""
import pytest

from mswift.testing import run_ranks


def device_mapping_checks():
    import numpy as np
    import torch

    from mswift.runtime import cpu_layer_enabled, enable_cpu_layer

    assert enable_cpu_layer() and cpu_layer_enabled()
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.arange(4.0)
    assert x.cuda() is x and x.to("cuda").device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor" and x.half().type() == "torch.cuda.HalfTensor"
    x.record_stream(torch.cuda.current_stream())  # a no-op, not an error
    with torch.cuda.stream(torch.cuda.Stream()):
        event = torch.cuda.Event()
        event.record()
    torch.cuda.synchronize()

    from megatron.core.transformer.moe import moe_utils

    splits = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [3, 1]
    assert moe_utils.te_general_gemm is None
    return True


def rng_tracker_checks():
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from mswift.runtime import enable_cpu_layer

    enable_cpu_layer()
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(0)
    tracker.add("model-parallel-rng", 123)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default stream"
    with tracker.fork("model-parallel-rng"):
        b = torch.rand(4)  # continues the forked stream
    torch.manual_seed(123)
    expected = torch.rand(8)
    assert torch.equal(torch.cat([a, b]), expected)
    return True


def uneven_gather_checks():
    import torch
    import torch.distributed as dist

    from mswift.runtime import enable_cpu_layer

    enable_cpu_layer()
    dist.init_process_group("gloo")
    from megatron.core.tensor_parallel import mappings

    rank = dist.get_rank()
    sizes = [3, 1]  # uneven token counts per rank, as the MoE dispatcher gathers with TP > 1
    local = torch.full((sizes[rank], 2), float(rank + 1), requires_grad=True)
    group = dist.group.WORLD
    gathered = mappings.gather_from_sequence_parallel_region(
        local, group=group, output_split_sizes=sizes)
    assert gathered.tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]]
    # Backward is a reduce-scatter of the same uneven pieces: each rank's gradient is the sum
    # over ranks of its piece of the upstream gradient.
    (gathered * torch.arange(8.0).reshape(4, 2)).sum().backward()
    want = torch.arange(8.0).reshape(4, 2) * 2  # both ranks send the same upstream gradient
    assert torch.equal(local.grad, want[:3] if rank == 0 else want[3:])
    return True


@pytest.mark.parametrize("body", [device_mapping_checks, rng_tracker_checks])
def test_single_rank_checks(body):
    assert run_ranks(1, body) == [True]


def test_uneven_all_gather_and_reduce_scatter():
    assert run_ranks(2, uneven_gather_checks) == [True, True]
