"""Core attention for megatron-core's layer spec over mswift's varlen attention.

:class:`VarlenCoreAttention` takes the place of megatron-core's ``DotProductAttention`` (same
constructor and forward arguments). It runs ``mswift.kernels.varlen_attention``: the Triton
kernels on GPUs (or under the Triton interpreter) or the torch reference, so packed sequences
(``PackedSeqParams`` with ``qkv_format='thd'``) train without Transformer Engine and no token
attends across a sample boundary. Separate q/k and v head dims (MLA) are supported, and so are
Llama-4's chunked attention (``chunk_size``: chunks aligned to each sample's start) and query
temperature tuning (``temperature``: by the token's position inside its sample), which a
family's per-layer spec switches on (:func:`mswift.models.llama4.layer_spec`).

Backends (the ``attention_backend`` setting; :mod:`mswift.models.spec` puts the module in):
  ``local``  megatron-core's DotProductAttention (no packed sequences),
  ``torch``  this module on the torch reference (CPU or GPU),
  ``triton`` this module on the Triton kernels (GPU, or CPU with TRITON_INTERPRET=1),
  ``te``     Transformer Engine's fused attention (``TEDotProductAttention``) on TE's layer
             spec: packed THD batches, bf16 / fp16 only (fp32 is refused by name),
  ``auto``   ``te`` with TE layers in bf16 / fp16, else ``triton`` with CUDA, else ``torch``
             (:func:`mswift.models.impl.resolve_attention_backend`).
"""
from __future__ import annotations

import math

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mswift.kernels import (
    llama4_attn_temperature_scale,
    positions_from_cu_seqlens,
    varlen_attention,
)
from mswift.runtime import device

KERNEL_BACKENDS = ("auto", "torch", "triton")


def kernel_backend(name: str) -> str:
    """The ``varlen_attention`` backend this module runs for ``name`` (``auto``: the Triton
    kernels with CUDA, else the torch reference)."""
    if name == "auto":
        return "triton" if device.cuda_available() else "torch"
    if name in KERNEL_BACKENDS:
        return name
    raise ValueError(f"attention_backend={name!r}: mswift's varlen attention runs one of "
                     f"{', '.join(KERNEL_BACKENDS)}")


class VarlenCoreAttention(MegatronModule):
    """Drop-in for ``DotProductAttention`` with packed-sequence support."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        backend: str = "torch",
        chunk_size: int | None = None,
        temperature: tuple[float, float] | None = None,
    ):
        # k_channels / v_channels: MLA's q/k and v head dims, which megatron-core passes for
        # DotProductAttention's sake; here the dims come with the tensors.
        super().__init__(config=config)
        self.backend = kernel_backend(backend)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: the varlen attention backends do not "
                             "implement attention dropout; use 0 or attention_backend=local")
        if config.context_parallel_size > 1:
            raise ValueError("context_parallel_size > 1: not supported by the varlen attention "
                             "backends yet")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        window = getattr(config, "window_size", None)
        self.window_size = tuple(window) if window is not None else (-1, -1)
        # Llama-4 (set per layer by the family's layer spec): chunked attention inside each
        # sample, and the (floor_scale, attn_scale) of query temperature tuning.
        self.chunk_size = chunk_size
        self.temperature = temperature

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_bias is not None:
            raise ValueError("attention_bias: not supported by the varlen attention backends")
        causal = mask_type == AttnMaskType.causal
        if not causal and mask_type != AttnMaskType.no_mask and attention_mask is not None:
            raise ValueError(f"attention mask type {mask_type.name} with an explicit mask: use "
                             "packed sequences (cu_seqlens) or attention_backend=local")
        scale = self.softmax_scale or 1.0 / math.sqrt(query.shape[-1])
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, causal, scale)
        return self._batched(query, key, value, causal, scale)

    def _tuned(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q scaled by the temperature of each token's position in its sample (as HF's
        Llama4TextAttention does in fp32, then back to q's dtype); q unchanged when off.
        ``positions`` index q's first dim."""
        if self.temperature is None:
            return q
        scale = llama4_attn_temperature_scale(positions, *self.temperature)  # [tokens]
        return (q * scale.view(-1, *([1] * (q.dim() - 1)))).to(q.dtype)

    def _packed(self, q, k, v, params: PackedSeqParams, causal: bool, scale: float):
        # q: [tokens, heads, dq]; k: [tokens, groups, dq]; v: [tokens, groups, dv]
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None \
            else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None \
            else params.cu_seqlens_kv
        if self.temperature is not None:
            q = self._tuned(q, positions_from_cu_seqlens(cu_q, total=q.shape[0]))
        out = varlen_attention(
            q, k, v, cu_q.int(), cu_k.int(), params.max_seqlen_q, params.max_seqlen_kv,
            softmax_scale=scale, causal=causal, window_size=self.window_size,
            chunk_size=self.chunk_size, backend=self.backend,
        )
        return out.reshape(out.shape[0], -1)  # [tokens, heads * dv]

    def _batched(self, q, k, v, causal: bool, scale: float):
        # q: [seq, batch, heads, dq] -> one packed sample per batch row
        sq, b = q.shape[0], q.shape[1]
        sk = k.shape[0]
        q = self._tuned(q, torch.arange(sq, device=q.device))

        def to_thd(t):
            return t.transpose(0, 1).reshape(b * t.shape[0], t.shape[2], t.shape[3])

        cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=q.device)
        out = varlen_attention(
            to_thd(q), to_thd(k), to_thd(v), cu_q, cu_k, sq, sk,
            softmax_scale=scale, causal=causal, window_size=self.window_size,
            chunk_size=self.chunk_size, backend=self.backend,
        )
        # [batch * seq, heads, dv] -> [seq, batch, heads * dv]
        return out.reshape(b, sq, -1).transpose(0, 1).contiguous()
