"""``mswift env``: what this machine gives mswift (versions, devices, optional packages)."""
from __future__ import annotations

import importlib
import platform


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - report any import failure as absent
        return f"not available ({type(err).__name__})"
    return getattr(mod, "__version__", "installed")


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: mswift env\n\nPrint versions of mswift's dependencies and the devices seen.")
        return 0
    import torch

    import mswift
    from mswift.runtime.cpu_layer import cpu_layer_needed

    rows = [
        ("mswift", mswift.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("megatron-core", _version("megatron.core")),
        ("transformers", _version("transformers")),
        ("triton", _version("triton")),
        ("transformer-engine", _version("transformer_engine")),
        ("apex", _version("apex")),
        ("cuda devices", str(torch.cuda.device_count()) if torch.cuda.is_available() else "none"),
        ("backend", "nccl" if torch.cuda.is_available() else "gloo + mswift CPU layer"
         if cpu_layer_needed() else "gloo"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
