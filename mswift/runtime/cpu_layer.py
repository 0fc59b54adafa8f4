"""Run megatron-core for real on a machine without CUDA (gloo backend, CPU tensors).

megatron-core assumes CUDA throughout. This module is the one place in mswift that knows the
workarounds; :func:`enable_cpu_layer` switches them on, and only where CUDA is absent. What it
covers (each found by running megatron-core 0.16.1 on CPU, see DESIGN.md):

* ``torch.cuda`` calls: current device, set_device, RNG state get/set/seed, streams, events,
  synchronize, memory statistics -> CPU equivalents or no-ops. The "CUDA" RNG state that
  megatron's RNG tracker forks for tensor-parallel dropout is the CPU generator's state.
* literal ``device='cuda'`` / ``.cuda()`` / ``.to('cuda')`` / ``pin_memory``
  -> a :class:`torch.overrides.TorchFunctionMode` that maps every CUDA device to the CPU.
* ``param.type()`` compared with ``'torch.cuda.FloatTensor'`` strings in the optimizers ->
  the mode answers with the CUDA type name.
* MoE: ``te_general_gemm`` is undefined without Transformer Engine; the all-to-all dispatcher
  needs Python split sizes for gloo; gloo's all-gather/reduce-scatter need equal-sized pieces
  (the dispatcher gathers uneven token counts over TP when TP > 1).

The patches are applied once per process and are not undone: a process either has CUDA or
runs megatron-core on the CPU for its whole life.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_LOCK = threading.Lock()
_ENABLED = False
_MODE: "CudaToCpuMode | None" = None


def cpu_layer_needed() -> bool:
    """True where megatron-core cannot use CUDA, so the CPU layer must be on."""
    return not torch.cuda.is_available()


def cpu_layer_enabled() -> bool:
    return _ENABLED


def enable_cpu_layer() -> bool:
    """Switch the CPU layer on if CUDA is absent. Idempotent; returns whether it is on."""
    global _ENABLED, _MODE
    if not cpu_layer_needed():
        return False
    with _LOCK:
        if _ENABLED:
            return True
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_megatron_moe()
        _patch_megatron_collectives()
        _MODE = CudaToCpuMode()
        _MODE.__enter__()  # stays on the mode stack for the life of the process
        _ENABLED = True
    return True


# --------------------------------------------------------------------------------------------
# Device mapping for tensor operations
# --------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _to_cpu_device(device):
    """Map a CUDA device spec (``'cuda'``, ``'cuda:1'``, ``torch.device('cuda')``, an int) to CPU."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # a bare int names a CUDA device in torch
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _is_device_like(x) -> bool:
    return isinstance(x, (str, torch.device)) or (isinstance(x, int) and not isinstance(x, bool))


class CudaToCpuMode(TorchFunctionMode):
    """Runs every tensor operation that names a CUDA device on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.to and len(args) > 1 and _is_device_like(args[1]):
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs CUDA
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# torch.cuda functions
# --------------------------------------------------------------------------------------------


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    """Stands in for ``torch.cuda.Event``; elapsed time is not measured on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_NULL_STREAM = _NullStream()


def _cpu_rng_state(device=None):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, device=None, graph_safe=False):
    torch.set_rng_state(state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # A device object, not an index: megatron passes it as `device=` (also in backward passes,
    # where the device-mapping mode is not on the stack), and a bare int would mean CUDA.
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.device_count = lambda: 1  # one "device" per rank: the CPU
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NULL_STREAM
    cuda.default_stream = lambda device=None: _NULL_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.random.get_rng_state = _cpu_rng_state
    cuda.random.set_rng_state = _set_cpu_rng_state
    # megatron seeds "the CUDA generator" per rank role (data / tensor / expert parallel);
    # on the CPU that generator is the CPU one.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it after seeding the CPU
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.memory_stats = lambda device=None: {}
    # Argument parsing rejects the stand-in stream before any mode could intercept the call.
    torch.Tensor.record_stream = lambda self, stream: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# megatron-core
# --------------------------------------------------------------------------------------------


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = _set_cpu_rng_state


def _patch_megatron_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        # The router's gating linear tests `te_general_gemm is not None`, a name that only
        # exists when Transformer Engine imported.
        moe_utils.te_general_gemm = None

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # gloo's all_to_all_single needs split sizes as Python/numpy values, but the original
        # only converts tensors that live on CUDA.
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=False)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _uneven_all_gather(output_list, tensor, group=None, async_op=False):
    """``dist.all_gather`` for pieces of different first-dimension sizes (gloo needs equal)."""
    sizes = [t.shape[0] for t in output_list]
    if len(set(sizes)) == 1 and tensor.shape[0] == sizes[0]:
        return _ORIG_ALL_GATHER(output_list, tensor, group=group, async_op=async_op)
    longest = max(sizes)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    _ORIG_ALL_GATHER(pieces, padded.contiguous(), group=group)
    for out, piece, size in zip(output_list, pieces, sizes):
        out.copy_(piece[:size])
    return None


def _uneven_reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """``dist.reduce_scatter`` from a list of pieces, possibly uneven (gloo has no such op)."""
    sizes = [t.shape[0] for t in input_list]
    longest = max(sizes)
    stacked = input_list[0].new_zeros((len(sizes), longest) + tuple(input_list[0].shape[1:]))
    for i, piece in enumerate(input_list):
        stacked[i, : piece.shape[0]] = piece
    dist.all_reduce(stacked, op=op, group=group)
    rank = dist.get_rank(group=group)
    output.copy_(stacked[rank, : sizes[rank]])
    return None


_ORIG_ALL_GATHER = dist.all_gather


def _patch_megatron_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_scatter = mappings._reduce_scatter_along_first_dim

    @functools.wraps(original_gather)
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        out = input_.new_empty((sum(output_split_sizes),) + tuple(input_.shape[1:]))
        pieces = list(torch.split(out, output_split_sizes, dim=0))
        _uneven_all_gather(pieces, input_.contiguous(), group=group)
        return out

    @functools.wraps(original_scatter)
    def reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        if input_split_sizes is None or group is None or group.size() == 1:
            return original_scatter(input_, group, input_split_sizes, use_global_buffer)
        rank = dist.get_rank(group=group)
        out = input_.new_empty((input_split_sizes[rank],) + tuple(input_.shape[1:]))
        pieces = list(torch.split(input_.contiguous(), input_split_sizes, dim=0))
        _uneven_reduce_scatter(out, pieces, group=group)
        return out

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim
