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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are collected everywhere and skip with the reason without CUDA.

    Skipped, not deselected: the summary line counts them, so a CPU run shows what it did not
    check (``python -m pytest tests/gpu -q`` -> "N skipped").
    """
    if _HAS_CUDA:
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                   "run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# In-process tools pick a rendezvous port by writing MASTER_PORT into this process's environment
# (mswift.bridge.layout.ensure_rendezvous_port); every later test's subprocess would inherit it
# and listen on a port that is not free any more (EADDRINUSE). Restored after every test.
_RENDEZVOUS = {name: os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT")}


def pytest_runtest_teardown(item, nextitem):
    for name, value in _RENDEZVOUS.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
