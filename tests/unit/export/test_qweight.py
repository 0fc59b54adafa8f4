"""The shared quantization grid against compressed-tensors' own rule, written out independently."""
from __future__ import annotations

import pytest
import torch

from mswift.export.qweight import QuantizedWeight, check_group_size, dequantize, rtn_quantize


def _reference_rtn(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group by group with Python loops: scale = max|w| / ((2**bits - 1) / 2) in bf16."""
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    out, inp = w.shape
    q = torch.empty(out, inp)
    scales = torch.empty(out, inp // group)
    for r in range(out):
        for g in range(inp // group):
            seg = w[r, g * group:(g + 1) * group].float()
            s = float(torch.tensor(seg.abs().max().item() / ((qmax - qmin) / 2)).bfloat16())
            if s == 0:
                s = float(torch.finfo(torch.bfloat16).eps)
            scales[r, g] = s
            q[r, g * group:(g + 1) * group] = (seg / s).round().clamp(qmin, qmax)
    return q, scales


@pytest.mark.parametrize("bits,group", [(4, 8), (4, 24), (8, 24)])
def test_rtn_matches_the_grid_written_out(bits, group):
    torch.manual_seed(0)
    w = torch.randn(5, 48) * 0.05
    w[1, :group] = 0.0  # an all-zero group: eps scale, zero integers
    qw = rtn_quantize(w, bits=bits, group_size=group)
    q_ref, s_ref = _reference_rtn(w, bits, group)
    assert torch.equal(qw.q.float(), q_ref)
    assert torch.equal(qw.scale.float(), s_ref)
    assert qw.scale.dtype == torch.bfloat16 and qw.q.dtype == torch.int8
    # Within half a step, except where the largest positive value is clipped to qmax: the grid
    # spans -qmin steps down but only qmax up, and the bf16 scale may be one rounding smaller.
    step = s_ref.repeat_interleave(group, dim=1)
    bound = step * (0.5 + (2 ** bits) * 2 ** -9) + 1e-7
    assert ((dequantize(qw) - w).abs() <= bound).all()


def test_act_order_groups_follow_g_idx():
    q = torch.tensor([[1, -2, 3, 4]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 2.0]])
    qw = QuantizedWeight(q=q, scale=scale, bits=4, group_size=2, g_idx=torch.tensor([1, 0, 0, 1]))
    assert torch.equal(dequantize(qw), torch.tensor([[2.0, -1.0, 1.5, 8.0]]))


def test_group_size_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.weight: group size 128 "
                                         "does not divide its 1600"):
        check_group_size("model.layers.0.mlp.down_proj.weight", 1536 + 64, 128)
