"""Plain torch varlen attention: the semantics the Triton kernels must match.

Each sample of the packed batch is attended on its own with a dense mask. It runs on any
device, is differentiable through ordinary autograd (float64 included, for gradcheck), and is
the CPU path of mswift's core attention.

Mask rules, for query ``i`` and key ``j`` of one sample (both counted from the sample start),
with ``pos = i + len_k - len_q`` (queries aligned to the end of the keys, as FlashAttention
does when ``len_q != len_k``):
- causal:                 ``j <= pos``
- window ``(left, right)``: ``pos - left <= j <= pos + right`` (``-1``: that side unbounded)
- ``chunk_size`` C:        ``j // C == pos // C`` (Llama-4 chunked attention, chunks aligned to
  the sample start; a query with ``pos < 0`` sees no key)
A query that sees no key gets a zero output and a log-sum-exp of ``-inf``.
"""
from __future__ import annotations

import torch

from .validation import AttentionOptions, check_flash_attn_extras, check_varlen_inputs


def sample_attention_mask(
    len_q: int, len_k: int, opts: AttentionOptions, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean ``[len_q, len_k]`` mask, True where query ``i`` may attend key ``j``."""
    pos = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)  # [len_q, 1]
    j = torch.arange(len_k, device=device)[None, :]  # [1, len_k]
    mask = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if opts.window_right >= 0:  # causal is a right window of 0
        mask &= j <= pos + opts.window_right
    if opts.window_left >= 0:
        mask &= j >= pos - opts.window_left
    if opts.chunk_size:
        mask &= (pos >= 0) & (torch.div(j, opts.chunk_size, rounding_mode="floor")
                              == torch.div(pos, opts.chunk_size, rounding_mode="floor"))
    return mask


def _attend_sample(q, k, v, mask, scale):
    """One sample: q [Lq, H, dq], k [Lk, H, dq], v [Lk, H, dv] -> o [Lq, H, dv], lse [H, Lq]."""
    if k.shape[0] == 0:  # no keys: nothing to attend
        heads = q.shape[1]
        return (q.new_zeros(q.shape[0], heads, v.shape[2]),
                q.new_full((heads, q.shape[0]), float("-inf")))
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [H, Lq, Lk]
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()  # [H, Lq, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # masked entries are exactly 0
    denom = weights.sum(dim=-1, keepdim=True)  # [H, Lq, 1]
    seen = denom > 0
    safe_denom = torch.where(seen, denom, torch.ones_like(denom))
    probs = weights / safe_denom
    out = torch.einsum("hqk,khd->qhd", probs, v)  # [Lq, H, dv]
    lse = torch.where(seen, torch.log(safe_denom) + row_max, torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1)


def flash_attn_outputs(q, out, lse, return_attn_probs: bool, return_lse: bool):
    """What ``flash_attn_varlen_func`` returns: ``out``, or ``(out, softmax_lse, S_dmask)``.

    FlashAttention fills ``S_dmask`` only when ``dropout_p > 0``; at ``dropout_p == 0`` (the only
    value mswift takes) it returns an empty ``(0,)`` tensor of q's dtype, and so does mswift.
    """
    if return_attn_probs:
        return out, lse, torch.empty((0,), dtype=q.dtype, device=q.device)
    return (out, lse) if return_lse else out


def varlen_attention_reference(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None,
    *, chunk_size=None, return_lse=False,
):
    """Torch version of :func:`mswift.kernels.varlen_attention` (same arguments but ``backend``,
    same results).

    q ``[total_q, heads, dq]``, k ``[total_k, kv_heads, dq]``, v ``[total_k, kv_heads, dv]``;
    returns ``[total_q, heads, dv]`` in q's dtype, and with ``return_lse`` also the fp32
    (float64 for float64 inputs) log-sum-exp ``[heads, total_q]``. Tokens after
    ``cu_seqlens_q[-1]`` are padding: zero output, ``-inf`` log-sum-exp. ``deterministic`` is
    accepted and has no effect.
    """
    check_flash_attn_extras(dropout_p, softcap, alibi_slopes, block_table, return_attn_probs,
                            return_lse)
    opts = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal, window_size, chunk_size)
    out, lse = _reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, opts, True)
    return flash_attn_outputs(q, out, lse, return_attn_probs, return_lse)


def _reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, opts, return_lse):
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        qb = q[q0:q1].to(compute_dtype)  # [Lq, H, dq]
        kb = k[k0:k1].to(compute_dtype).repeat_interleave(group, dim=1)  # [Lk, H, dq]
        vb = v[k0:k1].to(compute_dtype).repeat_interleave(group, dim=1)  # [Lk, H, dv]
        mask = sample_attention_mask(q1 - q0, k1 - k0, opts, q.device)
        out_b, lse_b = _attend_sample(qb, kb, vb, mask, opts.softmax_scale)
        outs.append(out_b)
        lses.append(lse_b)
    tail = q.shape[0] - starts_q[-1]  # padding tokens after the last sample
    outs.append(q.new_zeros(tail, heads, v.shape[2], dtype=compute_dtype))
    lses.append(torch.full((heads, tail), float("-inf"), dtype=compute_dtype, device=q.device))
    out = torch.cat(outs, dim=0).to(q.dtype)  # [total_q, H, dv]
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=1)  # [H, total_q]
