"""Process start, parallel layout and the CPU layer for megatron-core.

The names below are imported on first use (PEP 562): ``mswift.runtime.layout_checks`` and
``launch_env`` import neither torch nor megatron-core, and importing them (which runs this
file) must not pull those in.
"""
import importlib

_EXPORTS = {
    "LaunchEnv": "launch_env",
    "detect_launch_env": "launch_env",
    "check_layout": "layout_checks",
    "data_parallel_size": "layout_checks",
    "layout_problems": "layout_checks",
    "cpu_layer_enabled": "cpu_layer",
    "cpu_layer_needed": "cpu_layer",
    "enable_cpu_layer": "cpu_layer",
    "destroy_distributed": "parallel",
    "init_distributed": "parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
