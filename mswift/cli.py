"""The ``mswift`` command: one sub-command per tool, each implemented in its own module.

Sub-commands are listed here as ``name -> (module, function, summary)`` and imported only
when called, so ``mswift --help`` stays fast and a missing optional dependency of one tool
does not break the others. Each function takes the remaining argv list and returns an exit code.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("mswift.train.cli", "main", "pre-train or fine-tune (same as launch/pretrain_sft.py)"),
    "preprocess": ("mswift.data.preprocess", "main",
                   "tokenize text into megatron-core's indexed .bin/.idx pre-training format"),
    "plot": ("mswift.train.plot", "main", "draw a run's loss / lr / throughput curves to a PNG"),
    "env": ("mswift.train.env_check", "main", "print versions, devices and the CPU-layer state"),
    "convert": ("mswift.bridge.cli", "convert_main",
                "convert checkpoints: hf-to-mcore, mcore-to-hf, reshard (legacy layouts)"),
    "verify": ("mswift.bridge.verify", "main",
               "compare megatron-core logits with transformers' for an HF model / checkpoint"),
    "export": ("mswift.export.cli", "main",
               "export a checkpoint to HF, 16-bit or quantized (INT4 / INT8 / FP8)"),
    "plan": ("mswift.train.plan", "main",
             "parameters and memory per GPU of a training layout, built on the meta device"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: mswift <command> [args ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "Run 'mswift <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from mswift import __version__

        print(f"mswift {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mswift: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)
