"""Vocab-parallel cross-entropy (CPU: TRITON_INTERPRET=1): both backends against torch's
cross_entropy on the real vocabulary columns and, at TP2 over gloo, against megatron-core's
``vocab_parallel_cross_entropy`` (padded rows set to -inf for it, as mswift's vocabulary mask
does) and torch on the gathered logits; loss and logits' gradient.

The real vocabulary (281) is not a multiple of 128 x TP: Megatron pads it to 512, so rank 1
holds 25 real and 231 padded columns, and the padded columns hold garbage (nan, inf, 1e4).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mswift.kernels import vocab_parallel_cross_entropy
from mswift.runtime.device import cuda_available
from mswift.testing import run_ranks

DEVICE = "cuda" if cuda_available() else "cpu"  # compiled kernels where a GPU is
VOCAB, PADDED, TOKENS = 281, 512, 13
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _logits(dtype, seed=0):
    """``[TOKENS, PADDED]`` logits with garbage in the padded columns, targets, loss grad."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(TOKENS, PADDED, generator=gen) * 4
    logits[:, VOCAB::3] = float("nan")
    logits[:, VOCAB + 1::3] = float("inf")
    logits[:, VOCAB + 2::3] = 1e4
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    targets[0], targets[1] = 0, VOCAB - 1  # the first and the last real id
    return logits.to(dtype), targets, torch.rand(TOKENS, generator=gen)


def _torch_loss_and_grad(logits, targets, grad_loss):
    """torch's cross_entropy on the real columns; padded columns get zero gradient."""
    real = logits[:, :VOCAB].float().requires_grad_()
    loss = F.cross_entropy(real, targets, reduction="none")
    loss.backward(grad_loss)
    return loss.detach(), F.pad(real.grad, (0, logits.shape[1] - VOCAB))


def _ours(logits, targets, grad_loss, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(leaf, targets, **kwargs)
    loss.backward(grad_loss)
    return loss, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_rank_equals_torch_on_the_real_vocabulary(dtype, backend):
    logits, targets, grad_loss = _logits(dtype)
    want_loss, want_grad = _torch_loss_and_grad(logits, targets, grad_loss)
    loss, grad = _ours(logits.to(DEVICE), targets.to(DEVICE), grad_loss.to(DEVICE),
                       vocab_size=VOCAB, backend=backend)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.cpu(), want_loss, **TOL[dtype])
    torch.testing.assert_close(grad.cpu().float(), want_grad, **TOL[dtype])


def test_inplace_backward_writes_the_gradient_over_the_logits():
    logits, targets, grad_loss = _logits(torch.float16, seed=1)
    _, want_grad = _torch_loss_and_grad(logits, targets, grad_loss)
    leaf = logits.to(DEVICE).requires_grad_()
    shard = leaf * 1  # the output layer's logits: an intermediate, not a leaf
    loss = vocab_parallel_cross_entropy(shard, targets.to(DEVICE), vocab_size=VOCAB,
                                        inplace_backward=True, backend="triton")
    loss.backward(grad_loss.to(DEVICE))
    torch.testing.assert_close(shard.detach().cpu().float(), want_grad, **TOL[torch.float16])
    torch.testing.assert_close(leaf.grad.cpu().float(), want_grad, **TOL[torch.float16])


def test_leading_dims_and_bad_arguments():
    logits, targets, _ = _logits(torch.float32)
    loss = vocab_parallel_cross_entropy(logits.view(1, TOKENS, PADDED), targets.view(1, TOKENS),
                                        vocab_size=VOCAB, backend="triton")
    assert loss.shape == (1, TOKENS)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 281\)"):
        vocab_parallel_cross_entropy(logits, targets + 100, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"targets must be \(13,\)"):
        vocab_parallel_cross_entropy(logits, targets[:3], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1"):
        vocab_parallel_cross_entropy(logits, targets, vocab_size=0)


def _tp2_rank():
    """Rank body: this rank's shard through megatron-core and both backends."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as mcore_ce

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()
    rank, width = dist.get_rank(), PADDED // 2
    results = {}
    for dtype in (torch.float32, torch.float16):
        logits, targets, grad_loss = _logits(dtype, seed=2)
        shard = logits[:, rank * width:(rank + 1) * width]
        masked = shard.float().masked_fill(  # megatron-core needs the padded ids at -inf
            torch.arange(rank * width, (rank + 1) * width) >= VOCAB, float("-inf"))
        leaf = masked.requires_grad_()
        loss = mcore_ce(leaf.clone(), targets)  # it works in place on an fp32 input
        loss.backward(grad_loss)
        results[dtype, "megatron"] = loss.detach(), leaf.grad
        for backend in ("torch", "triton"):
            results[dtype, backend] = _ours(shard, targets, grad_loss, vocab_size=VOCAB,
                                            group=group, backend=backend)
    return results


def test_tp2_equals_megatron_core_and_torch_on_gathered_logits():
    ranks = run_ranks(2, _tp2_rank, timeout=120)
    width = PADDED // 2
    for dtype in (torch.float32, torch.float16):
        logits, targets, grad_loss = _logits(dtype, seed=2)
        want_loss, want_grad = _torch_loss_and_grad(logits, targets, grad_loss)
        for rank, results in enumerate(ranks):
            shard_grad = want_grad[:, rank * width:(rank + 1) * width]
            for source in ("megatron", "torch", "triton"):
                loss, grad = results[dtype, source]
                tol = TOL[torch.float32] if source == "megatron" else TOL[dtype]
                torch.testing.assert_close(loss, want_loss, **tol, msg=f"{source} rank {rank}")
                assert source == "megatron" or grad.dtype == dtype
                torch.testing.assert_close(grad.float(), shard_grad, **tol,
                                           msg=f"{source} rank {rank}")
