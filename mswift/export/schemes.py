"""The quantization schemes of ``mswift export --quant``: a registry a quantizer plugs into.

A scheme is a function ``quantize(hf_name, weight, stats, group_size)`` -> a
:class:`~mswift.export.qweight.QuantizedWeight` (integer schemes) or an
:class:`~mswift.export.qweight.Fp8Weight`, called once per quantizable linear weight:
``weight`` fp32 [out, in], ``stats`` that linear's
:class:`~mswift.export.calibration.LinearStats` (None unless the scheme ``needs_stats``: the
calibration pass runs only then), ``group_size`` the ``--group-size`` (the number of input
columns per scale; ``in`` for one scale per output channel). The rest (which tensors are
quantized, the compressed-tensors format and config, the files) is the same for every scheme.

To add one: write the function in its own module and add an entry to ``SCHEMES`` naming it
as ``"module:function"`` (imported when the scheme is used), as GPTQ's; a scheme that changes
more than the quantized weights (AWQ's folded norms) names a ``prepare`` step too.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from mswift.export.qweight import Fp8Weight, QuantizedWeight, fp8_quantize, rtn_quantize

DEFAULT_GROUP_SIZE = 128
FP8_BLOCK = (128, 128)


@dataclass(frozen=True)
class Scheme:
    """``function``: ``"module:function"``, the quantizer; ``preset``: compressed-tensors'
    preset scheme it writes (``W4A16``, ``W8A8``, ``FP8_DYNAMIC``, ``FP8_BLOCK``);
    ``grouped``: ``--group-size`` applies (else one scale per output channel, or FP8 blocks);
    ``prepare``: ``"module:function"`` called as ``prepare(staging, stats, group_size,
    progress)`` before any weight is quantized, to rewrite the 16-bit staging export in
    place (AWQ folds its scales into the norms and linears there); ``stats``: this rank's
    statistics, or an iterable of windows of them (``mswift export`` passes
    :func:`~mswift.export.calibration.stats_windows`); the quantizer then gets none."""

    name: str
    function: str
    preset: str
    needs_stats: bool = False
    grouped: bool = False
    prepare: str | None = None

    def quantize(self, hf_name: str, weight: torch.Tensor, stats, group_size: int
                 ) -> QuantizedWeight | Fp8Weight:
        return _resolve(self.function)(hf_name, weight, stats, group_size)

    def prepare_staging(self, staging, stats, group_size: int, progress: bool) -> None:
        if self.prepare is not None:
            _resolve(self.prepare)(staging, stats, group_size, progress)


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def w4_rtn(hf_name: str, weight: torch.Tensor, stats, group_size: int) -> QuantizedWeight:
    return rtn_quantize(weight, bits=4, group_size=group_size)


def int8_rtn(hf_name: str, weight: torch.Tensor, stats, group_size: int) -> QuantizedWeight:
    return rtn_quantize(weight, bits=8, group_size=weight.shape[1])


def fp8_channel(hf_name: str, weight: torch.Tensor, stats, group_size: int) -> Fp8Weight:
    return fp8_quantize(weight, None)


def fp8_block(hf_name: str, weight: torch.Tensor, stats, group_size: int) -> Fp8Weight:
    return fp8_quantize(weight, FP8_BLOCK)


SCHEMES: dict[str, Scheme] = {
    "w4a16-rtn": Scheme("w4a16-rtn", "mswift.export.schemes:w4_rtn", "W4A16", grouped=True),
    "w4a16-gptq": Scheme("w4a16-gptq", "mswift.export.gptq:quantize", "W4A16",
                         needs_stats=True, grouped=True),
    "w4a16-awq": Scheme("w4a16-awq", "mswift.export.schemes:w4_rtn", "W4A16", needs_stats=True,
                        grouped=True, prepare="mswift.export.awq:prepare_export"),
    "int8": Scheme("int8", "mswift.export.schemes:int8_rtn", "W8A8"),
    "fp8-channel": Scheme("fp8-channel", "mswift.export.schemes:fp8_channel", "FP8_DYNAMIC"),
    "fp8-block": Scheme("fp8-block", "mswift.export.schemes:fp8_block", "FP8_BLOCK"),
}
NAMES = ("none", *SCHEMES)  # "none": the 16-bit HF export


def is_quantizable(hf_name: str, shape: tuple[int, ...]) -> bool:
    """A linear weight llm-compressor quantizes: a 2-D ``*proj.weight`` (attention, MLP and
    expert projections, DeepSeek's ``kv_a_proj_with_mqa``); not embeddings, lm_head, norms,
    MoE routers (``mlp.gate``) or vision towers."""
    return (len(shape) == 2 and hf_name.endswith(("proj.weight", "proj_with_mqa.weight"))
            and not any(part in hf_name for part in ("vision", "visual", "multi_modal")))
