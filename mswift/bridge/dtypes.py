"""The tensor dtypes the bridge reads and writes, by name, without importing torch.

Checkpoint files name dtypes in their own words: safetensors headers say ``BF16``, config.json
and mswift's metadata say ``bfloat16``, torch.save files name a storage class
(``torch.BFloat16Storage``; dtypes newer than those classes use ``torch.UntypedStorage``). The
conversions that only move bytes (:mod:`mswift.bridge.byte_copy`) work with these names and
never import torch (1.8 s of a 3 s conversion); :func:`torch_dtype` gives the torch dtype where
tensors are made.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dtype:
    name: str  # torch's name, as in config.json: "bfloat16"
    safetensors: str  # "BF16"
    itemsize: int
    floating: bool
    storage: str | None  # torch.save's typed storage class; None: UntypedStorage (+ dtype)


_ALL = (
    Dtype("float64", "F64", 8, True, "DoubleStorage"),
    Dtype("float32", "F32", 4, True, "FloatStorage"),
    Dtype("float16", "F16", 2, True, "HalfStorage"),
    Dtype("bfloat16", "BF16", 2, True, "BFloat16Storage"),
    Dtype("float8_e4m3fn", "F8_E4M3", 1, True, None),
    Dtype("float8_e5m2", "F8_E5M2", 1, True, None),
    Dtype("int64", "I64", 8, False, "LongStorage"),
    Dtype("int32", "I32", 4, False, "IntStorage"),
    Dtype("int16", "I16", 2, False, "ShortStorage"),
    Dtype("int8", "I8", 1, False, "CharStorage"),
    Dtype("uint64", "U64", 8, False, None),
    Dtype("uint32", "U32", 4, False, None),
    Dtype("uint16", "U16", 2, False, None),
    Dtype("uint8", "U8", 1, False, "ByteStorage"),
    Dtype("bool", "BOOL", 1, False, "BoolStorage"),
)
BY_NAME = {d.name: d for d in _ALL}
BY_SAFETENSORS = {d.safetensors: d for d in _ALL}
BY_STORAGE = {d.storage: d for d in _ALL if d.storage}
# Short names the command lines take.
ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def torch_dtype(dtype: Dtype | str):
    """The torch dtype of a :class:`Dtype` or a torch dtype name (imports torch)."""
    import torch

    return getattr(torch, dtype.name if isinstance(dtype, Dtype) else dtype)


def of_torch(dtype) -> Dtype:
    """The :class:`Dtype` of a torch dtype."""
    return BY_NAME[str(dtype).removeprefix("torch.")]


def as_kind(dtype) -> Dtype:
    """A torch dtype or a :class:`Dtype` as the latter (KeyError for one not listed here)."""
    return dtype if isinstance(dtype, Dtype) else of_torch(dtype)


CAST_FLOATS = ("float32", "bfloat16", "float16")  # :mod:`mswift.bridge.dtype_cast` casts these


def castable(src: Dtype, dst: Dtype) -> bool:
    """Whether the byte copies can write ``src`` elements as ``dst`` (the same dtype, or two
    of :data:`CAST_FLOATS`)."""
    return src == dst or (src.name in CAST_FLOATS and dst.name in CAST_FLOATS)
