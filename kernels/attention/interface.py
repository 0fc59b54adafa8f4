"""Public varlen attention: FlashAttention's varlen API over mswift's Triton kernels.

``varlen_attention`` picks a backend: the Triton kernels when q is on a GPU or Triton's CPU
interpreter is on (``TRITON_INTERPRET=1``), else the torch reference. Triton is imported
only when its backend is used, so importing this module never pins the interpreter setting.
"""
from __future__ import annotations

import torch

from .env import interpreter_enabled
from .reference import _reference_forward
from .validation import AttentionOptions, check_varlen_inputs

BACKENDS = ("auto", "triton", "torch")


class VarlenAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; inputs and output are packed THD tensors.

    ``apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts)`` returns
    ``(out [total_q, heads, dv], lse [heads, total_q] fp32)``; ``opts`` comes from
    :func:`~mswift.kernels.attention.validation.check_varlen_inputs`. The log-sum-exp is not
    differentiable (as in FlashAttention).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                opts: AttentionOptions):
        from .triton_forward import attention_forward

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), opts)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlens = (int(max_seqlen_q), int(max_seqlen_k))
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from .triton_backward import attention_backward

        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                        *ctx.max_seqlens, ctx.opts)
        return dq, dk, dv, None, None, None, None, None


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    runnable = q.is_cuda or interpreter_enabled()
    if backend == "torch":
        return False
    if backend == "triton":
        if not runnable:
            raise ValueError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 "
                             "(set before triton is imported)")
        if q.dtype == torch.float64:
            raise ValueError("the Triton backend takes fp16, bf16 or fp32 inputs, not float64")
        return True
    return runnable and q.dtype != torch.float64


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    softmax_scale=None, causal=True, window_size=(-1, -1), chunk_size=None, return_lse=False,
    *, backend: str = "auto",
):
    """Attention over a packed batch: each token attends only within its own sample.

    Args:
        q: ``[total_q, heads, dq]``; k: ``[total_k, kv_heads, dq]``; v: ``[total_k, kv_heads, dv]``
            with ``heads`` a multiple of ``kv_heads`` (GQA/MQA; query head ``h`` reads kv head
            ``h // (heads // kv_heads)``). fp16/bf16/fp32 (float64 only on the torch backend).
        cu_seqlens_q, cu_seqlens_k: int32 ``[num_samples + 1]`` sample offsets, starting at 0.
            Tokens after the last offset are padding (zero output and gradients).
        max_seqlen_q, max_seqlen_k: the longest sample (sizes the kernel grid; must not be
            smaller than the real maximum).
        softmax_scale: defaults to ``1 / sqrt(dq)``.
        causal: causal mask; when ``len_q != len_k`` queries align to the end of the keys.
        window_size: ``(left, right)`` sliding window as in FlashAttention; -1 = unbounded.
        chunk_size: Llama-4 chunked attention: a token only sees keys of its own
            ``chunk_size``-aligned chunk of its sample.
        return_lse: also return the fp32 log-sum-exp ``[heads, total_q]`` (not differentiable
            on the Triton backend; ``-inf`` for queries that see no key).
        backend: ``"auto"`` (Triton on CUDA or under the interpreter, else torch),
            ``"triton"`` or ``"torch"``.
    Returns:
        ``[total_q, heads, dv]`` in q's dtype, or ``(out, lse)`` with ``return_lse``.
    """
    opts = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal, window_size, chunk_size)
    if not _use_triton(q, backend):
        return _reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, opts, return_lse)
    out, lse = VarlenAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, opts)
    return (out, lse) if return_lse else out
