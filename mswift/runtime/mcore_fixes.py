"""Fixes for megatron-core paths that break without apex / Transformer Engine (GPU or CPU).

Without either package megatron-core falls back to ``torch.optim.Adam``, which keeps a
per-parameter ``step`` tensor that the fused optimizers do not. Found with megatron-core 0.16.1:

* loading a ``fully_reshardable`` distributed-optimizer checkpoint copies every state entry of
  a parameter from the loaded tensors, ``step`` included, but the loaded tensors leave ``step``
  out (it is restored from the param groups) -> ``KeyError: 'step'``.
* a torch Adam that has not stepped has no state, and the distributed optimizer's
  ``state_dict()`` (called while building the state dict to load into) asserts on its ``step``.
* ``load_state_dict`` gives every parameter the *same* ``step`` tensor; torch Adam increments
  each parameter's step in place, so after a resume the shared counter advanced once per
  parameter per step and the bias correction (hence every update) differed from an
  uninterrupted run.

And without a working Transformer Engine, ``multi_latent_attention`` imports placeholder
(non-class) TE names yet keeps ``HAVE_TE = True``, so building any MLA layer fails in
``isinstance(self.linear_proj, TELinear)``: TE is marked absent there when ``TELinear`` is not a
class (a real TE install keeps its classes and is left alone).

``TopKRouter._apply_expert_bias`` masks the padding out of its token counts with
``routing_map & ~padding_mask``, a ``[tokens, experts]`` map and a ``[tokens]`` mask, which
broadcast along the experts: a RuntimeError whenever a padding mask reaches a router with an
expert bias (or a wrong count if tokens == experts). The mask is given its expert dimension.

Without Transformer Engine, selective recompute of ``layernorm`` fails at its first forward:
``CheckpointWithoutOutput(fp8=False)`` (every caller's default) sets ``self.fp8 = fp8 is not
None``, i.e. True, and its forward then asks TE's ``FP8GlobalStateManager`` (never imported:
``NameError``). Without TE there is no FP8, so the flag is cleared.
"""
from __future__ import annotations

import functools

import torch

_APPLIED = False


def apply_mcore_fixes() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe.router import TopKRouter

    if not distrib_optimizer.HAVE_APEX_OR_TE:
        _skip_step_when_setting_param_state(distrib_optimizer.DistributedOptimizer)
        _unshare_step_after_load(distrib_optimizer.DistributedOptimizer)
    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.HAVE_TE = False
    if not mrandom.HAVE_TE:
        _no_fp8_without_te(mrandom.CheckpointWithoutOutput)
    _padding_mask_per_token(TopKRouter)
    _APPLIED = True


def _padding_mask_per_token(cls) -> None:
    original = cls._apply_expert_bias

    @functools.wraps(original)
    def apply_expert_bias(self, routing_map, padding_mask=None):
        if padding_mask is not None and padding_mask.dim() == 1:
            padding_mask = padding_mask.unsqueeze(-1)  # [tokens, 1] against [tokens, experts]
        return original(self, routing_map, padding_mask=padding_mask)

    cls._apply_expert_bias = apply_expert_bias


def _no_fp8_without_te(cls) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.fp8 = False

    cls.__init__ = init


def _unshare_step_after_load(cls) -> None:
    original = cls.load_state_dict

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for param_state in self.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        return result

    cls.load_state_dict = load_state_dict


def _skip_step_when_setting_param_state(cls) -> None:
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    cls._set_main_param_and_optimizer_states = set_states


def init_empty_optimizer_state(optimizer) -> None:
    """Give an optimizer that has not stepped the state entries a checkpoint load overwrites."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if opt.init_state_fn is not None:
            opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for param in group["params"]:
                if isinstance(inner, torch.optim.Adam):
                    inner.state[param].setdefault("step", torch.tensor(0.0))
