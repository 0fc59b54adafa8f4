"""Environment switches read by the kernels, and the backend choice they drive (kept free of a
triton import, so that importing a kernel family never pins the interpreter setting)."""
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor, backend: str) -> bool:
    """Whether a kernel call on ``t`` runs the Triton kernels (True) or the torch reference.

    ``"auto"`` picks Triton where it can run (CUDA tensors, or the interpreter) and the input is
    not float64 (the kernels compute in fp32); ``"triton"`` insists and says why it cannot.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    runnable = t.is_cuda or interpreter_enabled()
    if backend == "torch":
        return False
    if backend == "triton":
        if not runnable:
            raise ValueError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 "
                             "(set before triton is imported)")
        if t.dtype == torch.float64:
            raise ValueError("the Triton backend takes fp16, bf16 or fp32 inputs, not float64")
        return True
    return runnable and t.dtype != torch.float64
