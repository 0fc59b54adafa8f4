"""Public varlen attention: a drop-in for FlashAttention-2's ``flash_attn_varlen_func`` (same
parameters, order and defaults) over mswift's Triton kernels.

``varlen_attention`` picks a backend: the Triton kernels when q is on a GPU or Triton's CPU
interpreter is on (``TRITON_INTERPRET=1``), else the torch reference. Triton is imported
only when its backend is used, so importing this module never pins the interpreter setting.
"""
from __future__ import annotations

import torch

from .env import BACKENDS, use_triton
from .reference import _reference_forward, flash_attn_outputs
from .validation import AttentionOptions, check_flash_attn_extras, check_varlen_inputs

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


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None,
    *, chunk_size=None, return_lse=False, backend: str = "auto",
):
    """Attention over a packed batch: each token attends only within its own sample.

    A drop-in for FlashAttention-2's ``flash_attn_varlen_func``: the same parameters in the same
    order with the same defaults (``causal=False``), positional calls included. What mswift does
    not implement is refused by name (``dropout_p > 0``, ``softcap > 0``, ``alibi_slopes``,
    ``block_table``). mswift's own options are keyword-only, after FlashAttention's.

    Args:
        q: ``[total_q, heads, dq]``; k: ``[total_k, kv_heads, dq]``; v: ``[total_k, kv_heads, dv]``
            with ``heads`` a multiple of ``kv_heads`` (GQA/MQA; query head ``h`` reads kv head
            ``h // (heads // kv_heads)``). fp16/bf16/fp32 (float64 only on the torch backend).
        cu_seqlens_q, cu_seqlens_k: int32 ``[num_samples + 1]`` sample offsets, starting at 0.
            Tokens after the last offset are padding (zero output and gradients).
        max_seqlen_q, max_seqlen_k: the longest sample (sizes the kernel grid; must not be
            smaller than the real maximum).
        dropout_p: must be 0.0 (no attention dropout).
        softmax_scale: defaults to ``1 / sqrt(dq)``.
        causal: causal mask; when ``len_q != len_k`` queries align to the end of the keys
            (FlashAttention's bottom-right alignment).
        window_size: ``(left, right)`` sliding window as in FlashAttention (tuple, list or
            2-element tensor): query ``i`` sees keys ``[pos - left, pos + right]`` with
            ``pos = i + len_k - len_q``; -1 = unbounded; causal sets ``right`` to 0.
        softcap: must be <= 0 (off, as in FlashAttention).
        alibi_slopes, block_table: must be None.
        deterministic: accepted; the backward pass is always deterministic (no atomics).
        return_attn_probs: return ``(out, softmax_lse, S_dmask)`` as FlashAttention does at
            ``dropout_p == 0``: ``S_dmask`` is an empty ``(0,)`` tensor.
        chunk_size: (mswift) Llama-4 chunked attention: a token only sees keys of its own
            ``chunk_size``-aligned chunk of its sample.
        return_lse: (mswift) return ``(out, lse)``.
        backend: (mswift) ``"auto"`` (Triton on CUDA or under the interpreter, else torch),
            ``"triton"`` or ``"torch"``.
    Returns:
        ``[total_q, heads, dv]`` in q's dtype; with ``return_lse`` also the fp32 log-sum-exp
        ``[heads, total_q]`` (not differentiable on the Triton backend).

    Two differences from FlashAttention remain:
    - A query that sees no key (causal with ``len_q > len_k``, windows, padding) gets a zero
      output in both, but a log-sum-exp of ``-inf`` here and ``+inf`` in FlashAttention.
    - FlashAttention's CUDA front end rewrites windows before its kernel runs: a side
      ``>= max_seqlen_k`` becomes -1, and a one-sided window's other side becomes
      ``max_seqlen_k``. mswift applies the rule above as written. The two can differ only for
      a query more than ``max_seqlen_k`` positions before its sample's last query, so only
      where a sample has more than ``max_seqlen_k + 1`` queries.
    """
    check_flash_attn_extras(dropout_p, softcap, alibi_slopes, block_table, return_attn_probs,
                            return_lse)
    opts = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal, window_size, chunk_size)
    if not use_triton(q, backend):
        out, lse = _reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, opts, True)
    else:
        out, lse = VarlenAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, opts)
    return flash_attn_outputs(q, out, lse, return_attn_probs, return_lse)
