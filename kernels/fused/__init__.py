"""Fused layer ops (RMSNorm, rotary embedding, SwiGLU, vocab-parallel cross-entropy): Triton
kernels and their torch reference."""
from .interface import (RMSNormFunction, RotaryFunction, SwiGLUFunction,
                        VocabParallelCrossEntropyFunction, apply_rotary, rms_norm, swiglu,
                        vocab_parallel_cross_entropy)
from .reference import (cross_entropy_reference, rms_norm_reference, rotary_reference,
                        swiglu_reference)

__all__ = [
    "RMSNormFunction",
    "RotaryFunction",
    "SwiGLUFunction",
    "VocabParallelCrossEntropyFunction",
    "apply_rotary",
    "cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "rotary_reference",
    "swiglu",
    "swiglu_reference",
    "vocab_parallel_cross_entropy",
]
