"""``mswift env``: what this machine gives mswift (versions, devices, optional packages).

Versions come from the installed distributions' metadata and are compared with the tested set
(:mod:`mswift.runtime.versions`); every package outside it is named.
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mswift env",
        description="Print the versions of mswift's dependencies, name every installed package "
                    "outside the tested set (constraints.txt), and show the devices seen.")
    parser.add_argument("--constraints", default=None,
                        help="the tested set to compare with (default: mswift's constraints.txt)")
    return parser


def _device_rows() -> list[tuple[str, str]]:
    import torch

    from mswift.runtime.cpu_layer import cpu_layer_needed

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo + mswift CPU layer" if cpu_layer_needed() else "gloo"
    return [("cuda devices", str(torch.cuda.device_count()) if cuda else "none"),
            ("backend", backend)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
