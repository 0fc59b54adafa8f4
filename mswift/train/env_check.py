"""``mswift env --check``: the GPU image's health check (see :mod:`mswift.runtime.report`).

One line per part of the GPU stack (megatron-core, Triton, a CUDA device, NCCL, Transformer
Engine) and one forward pass of a tiny megatron-core GPT model built the way training builds it,
on the device training uses; exit 1 naming each failure. It builds a model, so it sits above
``models`` in the layers, and ``mswift env`` comes here to run either the check or the report.
"""
from __future__ import annotations

import os

from mswift.runtime.report import env_parser, import_version
from mswift.runtime.report import main as report_main


def main(argv: list[str] | None = None) -> int:
    args = env_parser().parse_args(argv)
    if args.cpu_ok and not args.check:
        env_parser().error("--cpu-ok goes with --check")
    if not args.check:
        return report_main(argv)
    return check(args.cpu_ok)


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
    results = [("megatron-core", *import_version("megatron.core")),
               ("Triton", *import_version("triton")),
               ("CUDA", cuda, "a CUDA device is visible" if cuda else "no CUDA device visible")]
    nccl = nccl_version()
    results.append(("NCCL", nccl is not None, nccl or "not available in this torch build"))
    te = transformer_engine_importable()
    results.append(("Transformer Engine", te,
                    import_version("transformer_engine")[1] if te else
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
