"""The byte copies' float casts (``mswift.bridge.dtype_cast``, numpy) against torch's
``Tensor.to``: bit for bit between float32, bfloat16 and float16, on random values of every
scale and on the edge cases (zeros, infinities, subnormals, the largest finite values,
rounding ties, overflow); NaN stays NaN."""
import itertools

import pytest
import torch

from mswift.bridge import dtypes
from mswift.bridge.dtype_cast import cast

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def values(dtype: torch.dtype) -> torch.Tensor:
    """Values of ``dtype``: random at many scales, and every edge case of each format."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-45, 38, 200, dtype=torch.float64)
    random = (torch.randn(200, 50, generator=g, dtype=torch.float64) * scales[:, None]).flatten()
    edges = []
    for f in FLOATS:
        info = torch.finfo(f)
        edges += [0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.smallest_normal,
                  info.tiny / 2, info.tiny / 4, info.eps, 1 + info.eps, 1 + info.eps / 2,
                  1 + info.eps * 1.5, float("inf"), float("-inf"), 65504.0, 65520.0, 65519.0]
    edge = torch.tensor(edges, dtype=torch.float64)
    x = torch.cat([random, edge]).to(torch.float32)
    bits = x.view(torch.int32)
    # Every tie and near-tie of float32 -> bfloat16 rounding: low halves 0x7FFF, 0x8000, 0x8001.
    ties = torch.cat([(bits & ~0xFFFF) | low for low in (0x7FFF, 0x8000, 0x8001)])
    x = torch.cat([x, ties.view(torch.float32)])
    x = x[~torch.isnan(x)]  # the ties of inf's bit pattern are NaNs: checked apart
    return x.to(dtype)


@pytest.mark.parametrize("src,dst", list(itertools.permutations(FLOATS, 2)))
def test_cast_is_torchs(src, dst):
    x = values(src)
    want = x.to(dst)
    raw = x.contiguous().view(torch.uint8).numpy().tobytes()
    got = cast(raw, dtypes.of_torch(src), dtypes.of_torch(dst))
    got = torch.frombuffer(bytearray(got), dtype=dst)
    assert got.shape == want.shape
    same = got.view(torch.uint8).reshape(-1, want.element_size()) == \
        want.view(torch.uint8).reshape(-1, want.element_size())
    bad = ~same.all(dim=1)
    assert not bad.any(), (x[bad][:5], got[bad][:5], want[bad][:5])


@pytest.mark.parametrize("src,dst", list(itertools.permutations(FLOATS, 2)))
def test_nan_stays_nan(src, dst):
    nans = torch.tensor([float("nan"), -float("nan")], dtype=src)
    raw = nans.view(torch.uint8).numpy().tobytes()
    got = torch.frombuffer(bytearray(cast(raw, dtypes.of_torch(src), dtypes.of_torch(dst))),
                           dtype=dst)
    assert torch.isnan(got).all()


def test_same_dtype_and_refused_casts():
    raw = bytes(range(8))
    f32, i32 = dtypes.BY_NAME["float32"], dtypes.BY_NAME["int32"]
    assert bytes(cast(raw, f32, f32)) == raw
    assert not dtypes.castable(f32, i32) and dtypes.castable(i32, i32)
    with pytest.raises(ValueError, match="no cast from float32 to int32"):
        cast(raw, f32, i32)
