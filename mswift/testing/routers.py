"""Capturing MoE router logits in a training run (the input of the tests' own router math)."""
from __future__ import annotations

import torch


def capture_router_logits(model_chunks) -> tuple[dict, dict[str, torch.Tensor]]:
    """Hook every router (a module with an ``expert_bias``) of ``model_chunks``.

    Returns ``(routers, logits)``: routers by module name, and a dict that each forward fills
    with that router's fp32 logits [tokens, experts], computed from its input and weight.
    """
    routers = {n: m for ddp in model_chunks for n, m in ddp.module.named_modules()
               if getattr(m, "expert_bias", None) is not None}
    logits: dict[str, torch.Tensor] = {}

    def capture(key):
        def hook(module, args):
            hidden = args[0].detach().float()
            weight = module.weight.detach().float()
            logits[key] = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
        return hook

    for key, router in routers.items():
        router.register_forward_pre_hook(capture(key))
    return routers, logits
