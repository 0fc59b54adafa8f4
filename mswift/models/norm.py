"""RMSNorm / LayerNorm for megatron-core's local layer spec that also works with sequence parallel.

megatron-core's torch wrappers (``WrappedTorchNorm``) refuse ``sequence_parallel``. Under
sequence parallelism each tensor-parallel rank normalises a different slice of the sequence, so
the norm weights see different tokens on each rank and their gradients must be summed over the
TP group: megatron-core's ``finalize_model_grads`` does that for every parameter marked
``sequence_parallel = True``, which this module does.

RMSNorm runs :func:`mswift.kernels.rms_norm` (``backend``: its Triton kernel or its torch
reference, chosen by the ``fused_kernels`` setting through the spec); LayerNorm is torch's.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from mswift.kernels import rms_norm


class Norm(torch.nn.Module):
    """``config.normalization`` ("RMSNorm" or "LayerNorm") over the last dimension."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,  # accepted for spec compatibility; no fused kernel
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
        backend: str = "torch",
    ):
        super().__init__()
        kind = normalization or config.normalization
        if kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization={kind!r}: expected RMSNorm or LayerNorm")
        self.kind = kind
        self.eps = eps
        self.backend = backend
        self.zero_centered_gamma = zero_centered_gamma or config.layernorm_zero_centered_gamma
        init = 0.0 if self.zero_centered_gamma else 1.0
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), init, dtype=dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
            if kind == "LayerNorm" else None
        )
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "LayerNorm":
            weight = self.weight + 1 if self.zero_centered_gamma else self.weight
            return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, self.bias, self.eps)
        # Statistics in fp32 like the HF reference implementations, then cast back.
        return rms_norm(x, self.weight, self.eps, zero_centered_gamma=self.zero_centered_gamma,
                        backend=self.backend)


class WeightlessRMSNorm(torch.nn.Module):
    """RMS normalisation without a weight: Llama-4's qk norm (HF ``Llama4TextL2Norm``), which
    scales each q / k head to unit root-mean-square in fp32. It has no parameters, so nothing
    about it depends on tensor or sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6,
                 backend: str = "torch"):
        super().__init__()
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, None, self.eps, backend=self.backend)
