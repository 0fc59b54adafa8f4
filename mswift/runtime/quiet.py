"""Warnings from megatron-core and torch that say nothing to an mswift user, silenced by name.

:func:`quiet_known_warnings` runs at process start (``mswift train``, ``launch/pretrain_sft.py``)
before megatron-core is imported. Each filter matches one message from one place and says why
it does not apply; every other warning still shows. Importing this module imports nothing heavy.
"""
from __future__ import annotations

import os
import warnings

# (message regex, module regex, category, why it does not apply to an mswift run)
_KNOWN = (
    (r"Transformer Engine and Apex are not installed", r"megatron\.core\.", UserWarning,
     "TE and apex are optional GPU extras; without them mswift chooses megatron-core's local "
     "spec and torch optimizers on purpose (`mswift env` says which are installed)"),
    (r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\.", UserWarning,
     "the same fallback, for the norm layers; mswift builds its own norm (mswift.models.norm)"),
    (r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config",
     UserWarning,
     "megatron-core 0.16's own default cuda_graph_scope='full' triggers it; mswift captures no "
     "CUDA graphs"),
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     r"torch\.distributed\.", FutureWarning,
     "megatron-core 0.16 calls these torch 2.13 names; nothing for a user to change"),
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     r"(megatron\.core\.optimizer\.optimizer|mswift\.runtime\.cpu_layer)", UserWarning,
     "the distributed optimizer's zero_grad reads .grad of its fp32 shard views (megatron-core "
     "marks it 'throws grad-access warning'); through the CPU layer the read passes the "
     "TorchFunctionMode's frame, so Python names cpu_layer.py as the source"),
)

# Asks for CUDA_DEVICE_MAX_CONNECTIONS=1 with sequence parallelism: a CUDA-stream setting that
# has no meaning where CUDA is absent (it still shows on GPUs, where it matters).
_CPU_ONLY = (
    (r"When using sequence parallelism it is recommended to set the environment variable "
     r"CUDA_DEVICE_MAX_CONNECTIONS", r"megatron\.core\.tensor_parallel\.layers", UserWarning),
)


def quiet_known_warnings(cuda: bool | None = None) -> None:
    """Install the filters above; ``cuda`` (default: whether torch sees a GPU) adds the
    CPU-only ones when false. Safe to call more than once."""
    for message, module, category, _why in _KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if cuda is None:
        cuda = _cuda_visible()
    if not cuda:
        for message, module, category in _CPU_ONLY:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _cuda_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    # called after the up-front checks, when torch is about to be imported anyway
    from mswift.runtime.device import cuda_available

    return cuda_available()
