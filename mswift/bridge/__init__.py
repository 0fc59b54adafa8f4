"""HF <-> megatron-core weights: lazy safetensors I/O, weight-map rules, sharded load/save,
conversion tools and the logit check (``mswift verify``).

Entry points: :func:`mswift.bridge.model_io.load_hf_into_model` and
:func:`~mswift.bridge.model_io.save_model_to_hf` (a sharded model <-> an HF directory),
:mod:`mswift.bridge.convert` (the checkpoint tools), :mod:`mswift.bridge.verify`.
Submodules are imported on use: the offline tools never load megatron-core.
"""
from mswift.bridge.errors import BridgeError

__all__ = ["BridgeError"]
