"""``mswift plan``'s activation estimate of one layer against what autograd really saves.

One rank builds a tiny Llama and a tiny Qwen3-MoE layer in bf16 and runs it forward under
``saved_tensors_hooks``; the bytes of every distinct saved tensor (weights excluded) must be
within 10% of :func:`layer_activation_bytes`. Tensors saved inside core attention are left out
of both: on the CPU the torch reference keeps the ``s x s`` probabilities, the GPU's
flash-style kernel (which the estimate assumes) keeps only q, k, v and its output. With
selective recompute (``layernorm`` with ``mlp`` or ``moe``) what megatron-core's checkpoints keep
is measured the same way against the estimate for those modules.
"""
import json

import pytest

from mswift.testing import run_ranks


def measure_layer(family: str, folder: str, modules: list[str]):
    import torch

    from mswift.config.loader import load_config
    from mswift.models.build import build_model
    from mswift.models.registry import apply_hf_model
    from mswift.runtime import init_distributed
    from mswift.train.plan import layer_activation_bytes

    recompute = (["recompute_granularity=selective",
                  f"recompute_modules=[{','.join(modules)}]"] if modules else [])
    cfg = apply_hf_model(load_config(None, [f"hf_model={folder}", "seq_length=64",
                                            "bf16=true"] + recompute))
    init_distributed(cfg)
    chunk = build_model(cfg)[0]
    layer = chunk.decoder.layers[0]
    tokens, hidden = 64, cfg.model.hidden_size
    x = torch.randn(tokens, 1, hidden, dtype=torch.bfloat16, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    inside, saved = [False], {}
    core = layer.self_attention.core_attention
    core.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    core.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.is_floating_point() and t.numel() > 1 and not inside[0] and ptr not in weights:
            saved[(ptr, t.storage_offset(), tuple(t.shape), t.dtype)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, rotary_pos_emb=chunk.rotary_pos_emb(tokens))
    # Counted after the forward: a recomputed norm's output is saved by the next linear layer,
    # then its storage is freed (resized to 0) until backward recomputes it.
    kept = sum(t.numel() * t.element_size() for t in saved.values()
               if t.untyped_storage().nbytes() > 0)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    predicted, _ = layer_activation_bytes(shapes, tokens, hidden, 1, False, 1,
                                          cfg.model.moe_router_topk, frozenset(modules))
    q_k_v = 2 * tokens * shapes["self_attention.linear_qkv.weight"][0]  # core attention's
    return kept, predicted - q_k_v


@pytest.mark.parametrize("family,modules", [
    ("llama", []), ("qwen3_moe", []), ("llama", ["layernorm", "mlp"]),
    ("qwen3_moe", ["layernorm", "moe"])])
def test_layer_activation_estimate_matches_saved_tensors(family, modules, tmp_path):
    from mswift.testing.hf_models import tiny_hf_config

    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(family).to_dict()))
    measured, predicted = run_ranks(1, measure_layer, family, str(tmp_path), modules)[0]
    assert abs(measured - predicted) <= 0.10 * measured, (measured, predicted)
