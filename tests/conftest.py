"""Suite-wide test settings.

The Triton interpreter must be switched on before triton is first imported anywhere in the
process, so it is set here, at the root of the suite, when no GPU is present.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
