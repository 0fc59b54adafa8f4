"""mswift's Triton kernels inside megatron-core's model: which module each setting swaps, where.

``fused_kernels`` (resolved by :func:`mswift.models.impl.resolve_kernel_backend`):

* RMSNorm: mswift's :class:`~mswift.models.norm.Norm` (and Llama-4's weightless qk norm) call
  :func:`mswift.kernels.rms_norm` with the backend given in the spec (LayerNorm stays torch);
* SwiGLU: megatron-core's MLP (dense, experts, shared expert) applies a module from its spec to
  ``linear_fc1``'s whole ``[gate | up]`` output when ``config.use_te_activation_func`` is set
  (despite the name, any module: megatron-core's local spec gives none, its TE spec TE's op);
  :class:`SwiGLU` is that module, set in every ``MLPSubmodules`` of the spec;
* cross-entropy: :class:`KernelLossGPTModel` is megatron-core's ``GPTModel`` with
  ``compute_language_model_loss`` on :func:`mswift.kernels.vocab_parallel_cross_entropy`, which
  keeps Megatron's padded vocabulary ids out of the softmax by itself (the -inf mask of
  :mod:`mswift.models.vocab_padding` stays, for evaluation and sampling logits).

Rotary embedding stays megatron-core's: its rope sits inside the attention modules (local and
TE alike, MLA's too) with no module slot in the spec, so swapping it would mean replacing
the attention classes.

``moe_routing_backend``: ``triton`` gives each built ``MoELayer`` a dispatcher whose token
permutation runs on mswift's kernels (:func:`mswift.models.moe_dispatch.use_kernel_dispatchers`)
and, in a family's model, :class:`mswift.models.router.HFTopKRouter` on mswift's routing kernel
(:meth:`mswift.models.family.ModelFamily.block_spec`); ``torch`` keeps megatron-core's
dispatcher and router, except where megatron-core's router is not the family's
(DeepSeek-V3: HFTopKRouter on the kernel's torch reference).
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from mswift.kernels import swiglu, vocab_parallel_cross_entropy
from mswift.models.norm import Norm, WeightlessRMSNorm
from mswift.models.spec import replace_modules


class SwiGLU(torch.nn.Module):
    """``silu(gate) * up`` of ``[..., gate | up]`` on :func:`mswift.kernels.swiglu`: the
    activation module megatron-core's MLP applies under ``use_te_activation_func``."""

    def __init__(self, config=None, backend: str = "triton"):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, backend=self.backend)


class KernelLossGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` whose language-model loss is mswift's vocab-parallel
    cross-entropy (the logits are read in their dtype, no fp32 copy). Set ``real_vocab_size``
    (the tokenizer's) and ``loss_backend`` after building."""

    real_vocab_size: int | None = None
    loss_backend: str = "triton"

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        """``labels [batch, seq]``, ``logits [seq, batch, vocab / tp]`` -> fp32 loss
        ``[batch, seq]``, as megatron-core's."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        loss = vocab_parallel_cross_entropy(
            logits, labels.transpose(0, 1), vocab_size=self.real_vocab_size, group=group,
            backend=self.loss_backend)  # [seq, batch]
        return loss.transpose(0, 1).contiguous()


def uses_fused_swiglu(swiglu_mlp: bool, fused_backend: str) -> bool:
    """Whether the MLPs take :class:`SwiGLU`: SwiGLU MLPs (mswift's ``swiglu`` setting: gated,
    silu) with ``fused_kernels`` resolved to ``triton``."""
    return swiglu_mlp and fused_backend == "triton"


def with_kernels(spec, config, fused_backend: str):
    """``spec`` (a block spec) with mswift's fused-op modules for ``fused_backend`` (``torch``
    or ``triton``); see the module doc."""
    mapping = {Norm: ModuleSpec(module=Norm, params={"backend": fused_backend}),
               WeightlessRMSNorm: ModuleSpec(module=WeightlessRMSNorm,
                                             params={"backend": fused_backend})}
    spec = replace_modules(spec, mapping)
    if config.use_te_activation_func:
        spec = _with_activation(spec, ModuleSpec(module=SwiGLU,
                                                 params={"backend": fused_backend}))
    return spec


def _with_activation(spec, activation: ModuleSpec):
    """Copy of a spec tree with ``activation_func`` set in every ``MLPSubmodules``."""
    if isinstance(spec, MLPSubmodules):
        return dataclasses.replace(spec, activation_func=activation)
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_with_activation(spec.submodules, activation))
    if isinstance(spec, list):
        return [_with_activation(item, activation) for item in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{
            f.name: _with_activation(getattr(spec, f.name), activation)
            for f in dataclasses.fields(spec) if f.init})
    return spec


def check_activations(model: torch.nn.Module) -> None:
    """With ``use_te_activation_func`` every megatron-core MLP must hold a module activation:
    one built outside the spec would apply plain silu to ``[gate | up]`` (a wrong model, no
    error)."""
    from megatron.core.transformer.mlp import MLP

    for name, module in model.named_modules():
        if isinstance(module, MLP) and not isinstance(module.activation_func, torch.nn.Module):
            raise AssertionError(f"{name}: MLP without the fused SwiGLU module "
                                 "(use_te_activation_func is set)")
