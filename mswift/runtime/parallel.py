"""Start the process groups for a checked parallel layout (checks: :mod:`.layout_checks`)."""
from __future__ import annotations

import datetime

import torch.distributed as dist

from mswift.config.schema import MswiftConfig
from mswift.runtime.cpu_layer import enable_cpu_layer
from mswift.runtime.device import distributed_backend, set_local_device
from mswift.runtime.launch_env import LaunchEnv, detect_launch_env
from mswift.runtime.layout_checks import (  # noqa: F401 - re-exported
    batch_problems,
    check_layout,
    data_parallel_size,
    layout_problems,
    model_fit_problems,
)
from mswift.runtime.mcore_fixes import apply_mcore_fixes


def init_distributed(cfg: MswiftConfig, timeout_minutes: int = 30) -> LaunchEnv:
    """Start torch.distributed from the launcher's environment and megatron-core's groups.

    The layout is checked first, so a mistake fails before any process group or model exists.
    ``nccl`` on GPUs, this rank on ``cuda:LOCAL_RANK``; ``gloo`` plus the CPU layer where CUDA
    is absent (:mod:`mswift.runtime.device` decides).
    """
    env = detect_launch_env()
    check_layout(cfg, env.world_size)
    backend = distributed_backend()
    set_local_device(env.local_rank)
    if backend == "gloo":
        enable_cpu_layer()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    initialize_parallel_state(cfg, timeout_minutes)
    apply_mcore_fixes()
    return env


def initialize_parallel_state(cfg: MswiftConfig, timeout_minutes: int = 30,
                              gloo_groups: bool = True) -> None:
    """megatron-core's process groups for ``cfg``'s layout (torch.distributed started first);
    ``gloo_groups=False``: none of its side gloo groups (a fake process group has no gloo)."""
    from megatron.core import parallel_state

    par = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=gloo_groups,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
