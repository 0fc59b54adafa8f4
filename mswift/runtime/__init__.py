"""Process start, parallel layout and the CPU layer for megatron-core."""
from mswift.runtime.cpu_layer import cpu_layer_enabled, cpu_layer_needed, enable_cpu_layer
from mswift.runtime.launch_env import LaunchEnv, detect_launch_env
from mswift.runtime.parallel import (
    check_layout,
    data_parallel_size,
    destroy_distributed,
    init_distributed,
    layout_problems,
)

__all__ = [
    "LaunchEnv",
    "check_layout",
    "cpu_layer_enabled",
    "cpu_layer_needed",
    "data_parallel_size",
    "destroy_distributed",
    "detect_launch_env",
    "enable_cpu_layer",
    "init_distributed",
    "layout_problems",
]
