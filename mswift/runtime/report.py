"""``mswift env``: what this machine gives mswift (versions, devices, optional packages).

Versions come from the installed distributions' metadata and are compared with the tested set
(:mod:`mswift.runtime.versions`); every package outside it is named.

``mswift env --check`` is the GPU image's health check: it exits 1 naming each part of the GPU
stack that is missing or broken (megatron-core, Triton, a CUDA device, NCCL, Transformer
Engine, a forward pass of a tiny megatron-core GPT model built as training builds it, on the
device). On a machine without a GPU it fails too, naming CUDA, NCCL and Transformer Engine: a
health check that passes where training cannot use a GPU would hide a broken container.
``--cpu-ok`` accepts their absence (a CPU node or the CPU image) and still runs the forward
pass, on the CPU layer. The check builds a model as training does, so it lives a layer above
models, in :mod:`mswift.train.env_check`, which runs this module's report otherwise.
"""
from __future__ import annotations

import argparse
import platform

from mswift.runtime.versions import (installed_version, outside_tested_set, read_constraints,
                                     tested_constraints_path)

# The packages whose versions decide whether mswift works: it writes torch.save / DCP formats,
# uses megatron-core internals, transformers' model classes and Triton's language.
KEY_PACKAGES = ("torch", "megatron-core", "transformers", "triton", "safetensors", "tokenizers",
                "huggingface-hub", "kernels", "datasets", "numpy", "transformer-engine", "apex",
                "mpi4py")


def env_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mswift env",
        description="Print the versions of mswift's dependencies, name every installed package "
                    "outside the tested set (constraints.txt), and show the devices seen.")
    parser.add_argument("--constraints", default=None,
                        help="the tested set to compare with (default: mswift's constraints.txt)")
    parser.add_argument("--check", action="store_true",
                        help="check the GPU stack (megatron-core, Triton, CUDA, NCCL, Transformer "
                             "Engine, a tiny GPT forward on the device); exit 1 naming what "
                             "failed")
    parser.add_argument("--cpu-ok", action="store_true",
                        help="with --check: no CUDA, NCCL or Transformer Engine is not a failure "
                             "(the forward pass then runs on the CPU)")
    return parser


def _device_rows() -> list[tuple[str, str]]:
    from mswift.runtime.cpu_layer import cpu_layer_needed
    from mswift.runtime.device import cuda_available, device_count, distributed_backend

    backend = distributed_backend()
    if backend == "gloo" and cpu_layer_needed():
        backend += " + mswift CPU layer"
    return [("cuda devices", str(device_count()) if cuda_available() else "none"),
            ("backend", backend)]


def import_version(module: str) -> tuple[bool, str]:
    try:
        imported = __import__(module, fromlist=["__version__"])
    except Exception as err:  # noqa: BLE001 - a broken install raises anything on import
        return False, f"does not import: {type(err).__name__}: {err}"
    return True, str(getattr(imported, "__version__", "imported"))


def main(argv: list[str] | None = None) -> int:
    args = env_parser().parse_args(argv)
    if args.check:
        env_parser().error("--check is run by `mswift env --check` (mswift.train.env_check)")
    import mswift

    path = args.constraints or tested_constraints_path()
    pins = read_constraints(path) if path else {}
    rows = [("mswift", mswift.__version__), ("python", platform.python_version())]
    for name in KEY_PACKAGES:
        have = installed_version(name)
        tested = pins.get(name)
        differs = tested is not None and have is not None and \
            have.split("+")[0] != tested.split("+")[0]
        note = f"   <- outside the tested set ({tested})" if differs else ""
        rows.append((name, (have or "not installed") + note))
    rows += _device_rows()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if not path:
        print("\nno constraints.txt found: cannot compare with the tested set")
        return 0
    outside = outside_tested_set(pins)
    if outside:
        print(f"\noutside the tested set ({path}):")
        for name, have, tested in outside:
            print(f"  {name} {have} (tested: {tested})")
        print("install the tested set with: pip install -c constraints.txt -e .")
    else:
        print(f"\nevery installed package of the tested set matches {path}")
    return 0
