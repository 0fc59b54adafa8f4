"""GPTQ against the paper's column-by-column algorithm written out here (explicit inverse
Hessian, updated after every column; no Cholesky, no lazy blocks), and against RTN on the
layer-output objective."""
from __future__ import annotations

import pytest
import torch

from mswift.export.gptq import gptq_quantize
from mswift.export.qweight import dequantize, quantize_to_grid, rtn_quantize, symmetric_scale


def _naive_gptq(w, h, *, bits, group, act_order, damp):
    """Frantar et al. eq. (2)-(3) in fp64: quantize column p, spread its error over the rest
    by the inverse Hessian's column p, then remove p from the inverse Hessian (OBS downdate).
    A group's scale comes from its current weights when its first column comes up."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = (torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order
             else list(range(n)))
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype))
    q = torch.zeros(w.shape, dtype=torch.int8)
    scales = {}
    for p in order:
        g = p // group
        if g not in scales:
            scales[g] = symmetric_scale(w[:, g * group:(g + 1) * group].abs().amax(1), bits,
                                        torch.bfloat16)
        q[:, p] = quantize_to_grid(w[:, p], scales[g], bits)
        err = (w[:, p] - q[:, p].double() * scales[g]) / hinv[p, p]
        w -= torch.outer(err, hinv[p])
        hinv -= torch.outer(hinv[:, p], hinv[p]) / hinv[p, p]
    return q, torch.stack([scales[g] for g in range(n // group)], dim=1)


def _correlated_inputs(tokens, features, seed, dead=()):
    """[tokens, features] activations with correlated channels of very different sizes."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features ** 0.5
    channel = torch.rand(features, generator=gen) * 3 + 0.1
    x = (torch.randn(tokens, features, generator=gen) @ mix + 0.3 * torch.randn(
        tokens, features, generator=gen)) * channel
    x[:, list(dead)] = 0
    return x


@pytest.mark.parametrize("group,act_order,block", [
    (32, False, 40),   # groups start mid-block and run past it (lazy updates pending)
    (32, True, 40),
    (96, False, 16),   # one group = all input features
    (96, True, 128),
    (24, True, 16),
])
def test_gptq_equals_the_naive_column_by_column_algorithm(group, act_order, block):
    torch.manual_seed(0)
    x = _correlated_inputs(300, 96, seed=1, dead=(5, 70))
    w = torch.randn(20, 96)
    h = (x.T @ x).double()
    qw = gptq_quantize(w, h, bits=4, group_size=group, act_order=act_order, damp=0.01,
                       block_size=block)
    q_ref, scale_ref = _naive_gptq(w, h, bits=4, group=group, act_order=act_order, damp=0.01)
    assert qw.g_idx is None and qw.scale.dtype == torch.bfloat16
    assert torch.equal(qw.scale.float(), scale_ref.float())
    assert torch.equal(qw.q, q_ref)
    assert (qw.q[:, [5, 70]] == 0).all()


def test_gptq_in_fp32_agrees_with_the_fp64_reference():
    x = _correlated_inputs(300, 96, seed=2, dead=(11,))
    w = torch.randn(20, 96, generator=torch.Generator().manual_seed(3))
    h = x.T @ x
    qw = gptq_quantize(w, h, bits=4, group_size=32, act_order=True, block_size=32)
    q_ref, _ = _naive_gptq(w, h, bits=4, group=32, act_order=True, damp=0.01)
    assert (qw.q != q_ref).float().mean() < 0.01  # only near-ties may round the other way


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output_objective(act_order):
    x = _correlated_inputs(1024, 128, seed=4)
    calib, held_out = x[:512], x[512:]  # judged on tokens calibration did not see
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))

    def output_error(qw):
        return ((held_out @ w.T - held_out @ dequantize(qw).T) ** 2).sum().item()

    gptq = output_error(gptq_quantize(w, calib.T @ calib, group_size=32, act_order=act_order))
    rtn = output_error(rtn_quantize(w, bits=4, group_size=32))
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_an_expert_with_fewer_tokens_than_inputs_falls_back_to_rtn():
    from mswift.export.calibration import LinearStats
    from mswift.export.gptq import quantize

    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(4))

    def stats(tokens):
        x = _correlated_inputs(tokens, 48, seed=tokens)
        return LinearStats(x.t() @ x, tokens, x.abs().mean(0), x)

    rtn = dequantize(rtn_quantize(w, bits=4, group_size=16))
    expert = "model.layers.0.mlp.experts.3.down_proj.weight"
    # 40 tokens for 48 input features: rank-deficient, RTN; a dense linear still gets GPTQ
    assert torch.equal(dequantize(quantize(expert, w, stats(40), 16)), rtn)
    assert not torch.equal(dequantize(quantize("model.layers.0.mlp.down_proj.weight", w,
                                               stats(40), 16)), rtn)
    assert not torch.equal(dequantize(quantize(expert, w, stats(200), 16)), rtn)
