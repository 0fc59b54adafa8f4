"""Float casts on raw bytes, without torch: what ``Tensor.to`` gives between float32, bfloat16
and float16, bit for bit (round to nearest even; inf, subnormals and overflow as torch has
them), except that a NaN's payload may differ (it stays a NaN; torch's own scalar and vector
code give NaNs different payloads).

The byte-copy conversions (:mod:`mswift.bridge.byte_copy`, :mod:`mswift.bridge.dist_bytes`)
cast with these when ``--dtype`` (or the HF dtypes on the way back) differ from the stored
dtype, a band of rows at a time, so that a conversion that changes the dtype needs neither
torch nor megatron-core either. bfloat16 is the upper half of a float32: widening shifts it
up; narrowing adds the round-to-nearest-even bias and keeps the upper half.
"""
from __future__ import annotations

import numpy as np

from mswift.bridge.dtypes import Dtype, castable

_NUMPY = {"float32": np.float32, "float16": np.float16}


def cast(raw, src: Dtype, dst: Dtype) -> memoryview:
    """The bytes of ``raw`` (a buffer of ``src`` elements) as ``dst`` elements
    (:func:`~mswift.bridge.dtypes.castable` says which)."""
    if src == dst:
        return memoryview(raw)
    if not castable(src, dst):
        raise ValueError(f"no cast from {src.name} to {dst.name}")
    data = np.frombuffer(raw, dtype=np.uint8)
    if src.name == "bfloat16":
        wide = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        wide = data.view(_NUMPY[src.name]).astype(np.float32)
    if dst.name == "float32":
        out = wide
    elif dst.name == "float16":
        with np.errstate(over="ignore"):  # beyond float16's range: inf, as torch gives
            out = wide.astype(np.float16)
    else:
        bits = wide.view(np.uint32)
        rounded = bits >> 16  # bits + 0x7FFF + (the lowest kept bit), shifted down: in place
        rounded &= 1
        rounded += 0x7FFF
        rounded += bits
        rounded >>= 16
        out = rounded.astype(np.uint16)
        out[np.isnan(wide)] = 0x7FC0  # what torch's scalar cast gives every NaN
    return memoryview(out.view(np.uint8))
