"""Where this process's tensors live: the one module that asks ``torch.cuda``.

With CUDA, each rank uses ``cuda:LOCAL_RANK`` (NCCL); without it, the CPU (gloo, with
:mod:`mswift.runtime.cpu_layer`). Every other module asks these functions, so the decision is made
once and can be tested with CUDA or Transformer Engine availability faked. A tensor that takes
part in a collective is created on :func:`local_device` (NCCL accepts only CUDA tensors).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

# Dense (no sparsity) bf16 tensor-core peak of one device, FLOP/s, from NVIDIA's data sheets;
# matched in order against the device name (so "H100 PCIe" before "H100").
BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989.4e12),  # SXM5 (the name reads e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.4e12),
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),  # SXM4 and PCIe alike
    ("A800", 312e12),
    ("B200", 2.25e15),
)


def cuda_available() -> bool:
    """True when this process can use a CUDA device."""
    return torch.cuda.is_available()


@functools.cache
def transformer_engine_importable() -> bool:
    """True when ``transformer_engine.pytorch`` imports (a CUDA build of it is installed)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a CPU-only or broken TE install raises all kinds of errors on import
        return False
    return True


def transformer_engine_available() -> bool:
    """Transformer Engine can run here: it imports and a CUDA device exists."""
    return cuda_available() and transformer_engine_importable()


def device_count() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if cuda_available() else 0


def distributed_backend() -> str:
    """The torch.distributed backend: ``nccl`` with CUDA, else ``gloo`` (with the CPU layer)."""
    return "nccl" if cuda_available() else "gloo"


def device_for_local_rank(local_rank: int) -> torch.device:
    """The device of the process that is ``local_rank`` on its node: ``cuda:local_rank`` (modulo
    the visible devices, so a launcher that shows each rank one GPU gets ``cuda:0``), else CPU."""
    if not cuda_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % device_count())


def set_local_device(local_rank: int) -> torch.device:
    """Make :func:`device_for_local_rank` this process's current device (before NCCL starts and
    before any model is built: megatron-core allocates on ``torch.cuda.current_device()``)."""
    device = device_for_local_rank(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device

# Memory (HBM) bandwidth of one device, bytes/s, from NVIDIA's data sheets; matched in order
# against the device name like BF16_PEAK_FLOPS. Benchmarks of memory-bound kernels compare with it.
HBM_BYTES_PER_S = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H200 NVL", 4.8e12),
    ("H100", 3.35e12),  # SXM5
    ("H800", 3.35e12),
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("A100", 2.0e12),  # 80 GB SXM4
    ("B200", 8.0e12),
)


def hbm_bytes_per_s(name: str | None = None) -> float | None:
    """Memory bandwidth of the device called ``name`` (default: this one), from
    :data:`HBM_BYTES_PER_S`; None for a CPU or a device not in the table."""
    name = device_name() if name is None else name
    if name == "cpu":
        return None
    for key, rate in HBM_BYTES_PER_S:
        if key.lower() in name.lower():
            return rate
    return None


def local_device() -> torch.device:
    """This process's device: the current CUDA device (set by :func:`set_local_device` when the
    process groups start), else CPU."""
    if not cuda_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def collective_device() -> torch.device:
    """Where tensors handed to the default process group's collectives live: the CPU under a
    gloo group (also the bridge's plain group on a GPU machine, which starts no NCCL), else
    :func:`local_device`."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "gloo":
        return torch.device("cpu")
    return local_device()


def device_name() -> str:
    """What the device is called (``NVIDIA H100 80GB HBM3``), or ``cpu``."""
    if not cuda_available():
        return "cpu"
    return torch.cuda.get_device_name(local_device())


def bf16_peak_flops(name: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the device called ``name`` (default: this one), from
    :data:`BF16_PEAK_FLOPS`; None for a CPU or a device not in the table (no MFU then)."""
    name = device_name() if name is None else name
    if name == "cpu":
        return None
    for key, flops in BF16_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def synchronize() -> None:
    """Wait for this device's queued work (so a wall-clock time covers it); no-op on CPU."""
    if cuda_available():
        torch.cuda.synchronize(local_device())


def reset_peak_memory() -> None:
    """Start a new peak for :func:`peak_memory_bytes`; no-op on CPU."""
    if cuda_available():
        torch.cuda.reset_peak_memory_stats(local_device())


def peak_memory_bytes() -> int | None:
    """The most memory tensors held on this device since the last :func:`reset_peak_memory`
    (``torch.cuda.max_memory_allocated``; the caching allocator reserves more), or None on CPU."""
    if not cuda_available():
        return None
    return torch.cuda.max_memory_allocated(local_device())


def device_rng_state() -> torch.Tensor | None:
    """The default CUDA generator's state of this device (for checkpoints), or None on CPU."""
    return torch.cuda.get_rng_state(local_device()) if cuda_available() else None


def set_device_rng_state(state: torch.Tensor | None) -> None:
    """Restore :func:`device_rng_state`'s result; nothing to do without CUDA or a saved state."""
    if state is not None and cuda_available():
        torch.cuda.set_rng_state(state, local_device())


def nccl_version() -> str | None:
    """The NCCL version torch was built with and loads (``2.27.7``), or None: no CUDA build of
    torch, or no NCCL in it (NCCL is what multi-GPU training communicates through)."""
    if not torch.distributed.is_nccl_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):  # a CPU build of torch has no NCCL library to ask
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
