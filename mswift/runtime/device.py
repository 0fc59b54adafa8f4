"""Where this process's tensors live: the one module that asks ``torch.cuda``.

With CUDA, each rank uses ``cuda:LOCAL_RANK`` (NCCL); without it, the CPU (gloo, with
:mod:`mswift.runtime.cpu_layer`). Every other module asks these functions, so the decision is made
once and can be tested with CUDA or Transformer Engine availability faked.
"""
from __future__ import annotations

import functools
import importlib.util

import torch


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
