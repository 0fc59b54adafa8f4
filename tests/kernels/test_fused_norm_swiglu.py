"""Fused RMSNorm and SwiGLU (CPU: TRITON_INTERPRET=1): the Triton kernels against the torch
reference, values and gradients, and the reference against transformers' ``LlamaRMSNorm`` /
``Llama4TextL2Norm`` and megatron-core's SwiGLU and its hand-written backward.

Hidden sizes are not powers of two (40, 300) and the leading shapes are 3-D, so row blocks end
part-way and column tiles are masked.
"""
import pytest
import torch
from megatron.core.fusions.fused_bias_swiglu import swiglu as mcore_swiglu
from megatron.core.fusions.fused_bias_swiglu import swiglu_back as mcore_swiglu_back
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm

from mswift.kernels import rms_norm, swiglu
from mswift.runtime.device import cuda_available

DEVICE = "cuda" if cuda_available() else "cpu"  # compiled kernels where a GPU is
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _check_against_reference(got, reference_run, inputs, dtype):
    """fp16 kernels accumulate in fp32, so their fp16 results are compared with the reference
    run in fp32 (torch's own fp16 weight gradient rounds every product)."""
    want = reference_run(*[t.float() if t is not None else None for t in inputs])
    for g, w in zip(got, want):
        assert g.dtype == (dtype if w.dtype == torch.float32 else w.dtype)
        torch.testing.assert_close(g.float(), w, **(TOL[torch.float32] if dtype == torch.float32
                                                     else dict(rtol=4e-3, atol=4e-3)))


def _eager(fn):
    """megatron-core wraps its fusions in torch.compile; the plain function is the reference."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def _run(fn, *inputs, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return [out] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [40, 300])
@pytest.mark.parametrize("weighted,zero_centered", [(True, False), (True, True), (False, False)])
def test_rms_norm_triton_equals_reference(dtype, hidden, weighted, zero_centered):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(3, 7, hidden, generator=gen) * 3).to(dtype).to(DEVICE)
    w = (torch.randn(hidden, generator=gen) * 0.5 + 1).to(dtype).to(DEVICE) if weighted else None
    grad = torch.randn(3, 7, hidden, generator=gen).to(dtype).to(DEVICE)
    def run(backend):
        return lambda x, w, grad: _run(lambda x, w: rms_norm(
            x, w, 1e-5, zero_centered_gamma=zero_centered, backend=backend), x, w, grad=grad)

    _check_against_reference(run("triton")(x, w, grad), run("torch"), (x, w, grad), dtype)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_rms_norm_reference_equals_transformers(x_dtype):
    gen = torch.Generator().manual_seed(0)
    hf = LlamaRMSNorm(300, eps=1e-6)  # fp32 weight: fp16 input gives an fp32 output, as in HF
    with torch.no_grad():
        hf.weight.copy_(torch.randn(300, generator=gen))
    x = torch.randn(2, 5, 300, generator=gen).to(x_dtype)
    grad = torch.randn(2, 5, 300, generator=gen)
    x_hf = x.clone().requires_grad_()
    out_hf = hf(x_hf)
    out_hf.backward(grad)
    want = [out_hf, x_hf.grad, hf.weight.grad]
    for backend in ("torch", "triton"):
        got = _run(lambda x, w: rms_norm(x, w, 1e-6, backend=backend), x, hf.weight, grad=grad)
        assert got[0].dtype == want[0].dtype == torch.float32
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[x_dtype])
    l2 = Llama4TextL2Norm(eps=1e-6)
    torch.testing.assert_close(rms_norm(x, None, 1e-6, backend="torch"), l2(x), rtol=0, atol=0)


def test_rms_norm_weight_gradient_is_the_local_partial_sum():
    """Sequence parallel: each rank's weight gradient covers its own tokens; their sum (what
    megatron-core's all-reduce of ``sequence_parallel`` parameters computes) is the full one."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(37, 40, generator=gen).to(DEVICE)
    w = torch.randn(40, generator=gen).to(DEVICE)
    grad = torch.randn(37, 40, generator=gen).to(DEVICE)
    full = _run(lambda x, w: rms_norm(x, w, 1e-5, backend="triton"), x, w, grad=grad)[2]
    parts = [_run(lambda x, w: rms_norm(x, w, 1e-5, backend="triton"), x[s], w, grad=grad[s])[2]
             for s in (slice(0, 20), slice(20, 37))]
    assert not torch.allclose(parts[0], full, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 2 * 300), (9, 2 * 40)])
def test_swiglu_triton_equals_reference(dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=gen) * 2).to(dtype).to(DEVICE)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).to(dtype).to(DEVICE)
    def run(backend):
        return lambda x, grad: _run(lambda x: swiglu(x, backend=backend), x, grad=grad)

    _check_against_reference(run("triton")(x, grad), run("torch"), (x, grad), dtype)


def test_swiglu_equals_megatron_core():
    """Gate first, up second, as megatron-core chunks linear_fc1's output."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 2 * 40, generator=gen)
    grad = torch.randn(4, 3, 40, generator=gen)
    want = _run(_eager(mcore_swiglu), x, grad=grad)
    torch.testing.assert_close(want[1], _eager(mcore_swiglu_back)(grad, x), rtol=1e-6, atol=1e-6)
    for backend in ("torch", "triton"):
        for got, w in zip(_run(lambda x: swiglu(x, backend=backend), x, grad=grad), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda x: rms_norm(x, torch.ones(5), 1e-5), r"weight must be a \[4\] tensor"),
    (lambda x: rms_norm(x, None, -1.0), "eps must be a float >= 0"),
    (lambda x: rms_norm(x.long(), None, 1e-5), "must be fp16, bf16, fp32 or float64"),
    (lambda x: swiglu(x[..., :3]), "last dim must be even"),
    (lambda x: rms_norm(x, None, 1e-5, backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(2, 4))
