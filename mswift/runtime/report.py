"""``mswift env``: what this machine gives mswift (versions, devices, optional packages).

Versions come from the installed distributions' metadata and are compared with the tested set
(:mod:`mswift.runtime.versions`); every package outside it is named.

``mswift env --check`` is the GPU image's health check: it exits 1 naming each part of the GPU
stack that is missing or broken (megatron-core, Triton, a CUDA device, NCCL, Transformer
Engine, a forward pass of a tiny megatron-core GPT model built as training builds it, on the
device). On a machine without a GPU it fails too, naming CUDA, NCCL and Transformer Engine: a
health check that passes where training cannot use a GPU would hide a broken container.
``--cpu-ok`` accepts their absence (a CPU node or the CPU image) and still runs the forward
pass, on the CPU layer.
"""
from __future__ import annotations

import argparse
import os
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


def _import_version(module: str) -> tuple[bool, str]:
    try:
        imported = __import__(module, fromlist=["__version__"])
    except Exception as err:  # noqa: BLE001 - a broken install raises anything on import
        return False, f"does not import: {type(err).__name__}: {err}"
    return True, str(getattr(imported, "__version__", "imported"))


def _tiny_forward() -> tuple[bool, str]:
    """Build a 2-layer GPT model the way training does (spec, attention backend and device
    chosen by mswift) and run one forward pass; the logits must be finite."""
    import torch

    from mswift.config import load_config
    from mswift.models.build import build_model
    from mswift.runtime import destroy_distributed, init_distributed
    from mswift.runtime.device import cuda_available
    from mswift.runtime.launch_env import _free_port

    # one process of its own, whatever job this shell is part of, on a port nobody uses
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    settings = ["num_layers=2", "hidden_size=128", "num_attention_heads=6",
                "num_query_groups=2", "kv_channels=32", "vocab_size=300",
                f"bf16={str(cuda_available()).lower()}"]
    cfg = load_config(None, settings)
    try:
        init_distributed(cfg)
        model = build_model(cfg)[0]
        device = next(model.parameters()).device
        expected = "cuda" if cuda_available() else "cpu"
        where = {str(p.device) for p in model.parameters()}
        if len(where) > 1 or device.type != expected:
            return False, f"parameters on {', '.join(sorted(where))}, expected the {expected} " \
                          "device training uses"
        tokens = torch.randint(0, 300, (2, 64), device=device)
        positions = torch.arange(64, device=device).expand(2, -1)
        with torch.no_grad():
            logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
        # padded vocabulary rows (300 -> 384) are -inf by design: only the real ones count
        if not torch.isfinite(logits[..., :300]).all():
            return False, "the logits are not finite"
        return True, f"logits {tuple(logits.shape)} {str(logits.dtype).split('.')[-1]} on {device}"
    except Exception as err:  # noqa: BLE001 - the check reports any failure by name
        return False, f"{type(err).__name__}: {err}"
    finally:
        destroy_distributed()


def check(cpu_ok: bool) -> int:
    """Print one line per part of the GPU stack; 1 if any failed (named on the last line)."""
    from mswift.runtime.quiet import quiet_known_warnings

    quiet_known_warnings()  # megatron-core's import-time notes on absent apex / TE
    from mswift.runtime.device import (cuda_available, nccl_version,
                                       transformer_engine_importable)

    cuda = cuda_available()
    results = [("megatron-core", *_import_version("megatron.core")),
               ("Triton", *_import_version("triton")),
               ("CUDA", cuda, "a CUDA device is visible" if cuda else "no CUDA device visible")]
    nccl = nccl_version()
    results.append(("NCCL", nccl is not None, nccl or "not available in this torch build"))
    te = transformer_engine_importable()
    results.append(("Transformer Engine", te,
                    _import_version("transformer_engine")[1] if te else
                    "transformer_engine.pytorch does not import"))
    optional = {"CUDA", "NCCL", "Transformer Engine"} if cpu_ok else set()
    failed = []
    for name, ok, detail in results:
        if not ok and name not in optional:
            failed.append(name)
        print(f"{'ok' if ok else 'absent' if name in optional else 'FAIL':<6} {name}: {detail}")
    if "megatron-core" in failed:
        print(f"{'FAIL':<6} GPT forward: not run (megatron-core does not import)")
        failed.append("GPT forward")
    else:
        ok, detail = _tiny_forward()
        print(f"{'ok' if ok else 'FAIL':<6} GPT forward: {detail}")
        if not ok:
            failed.append("GPT forward")
    if failed:
        hint = "" if cpu_ok or cuda else " (on a machine without a GPU: --cpu-ok)"
        print(f"\nmswift env --check: FAILED: {', '.join(failed)}{hint}")
        return 1
    print("\nmswift env --check: all checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cpu_ok and not args.check:
        _parser().error("--cpu-ok goes with --check")
    if args.check:
        return check(args.cpu_ok)
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
