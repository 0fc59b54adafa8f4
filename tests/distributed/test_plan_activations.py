"""``mswift plan``'s activation estimate of one layer against what autograd really saves.

One rank builds tiny layers in bf16 (Llama, Qwen3-MoE, and DeepSeek-V3's multi-latent
attention with q LoRA in a dense and in an MoE layer) and runs each forward under
``saved_tensors_hooks``; the bytes of every distinct saved tensor (weights excluded) must be
within 10% of :func:`layer_activation_bytes`. Inside core attention the CPU's torch reference
keeps the ``s x s`` probabilities, the GPU's flash-style kernel (which the estimate assumes)
only q, k, v and its output: so what is saved inside core attention is left out and the q, k
and v it is called with are counted instead. With selective recompute (``layernorm`` with
``mlp`` or ``moe``) what megatron-core's checkpoints keep is measured the same way against the
estimate for those modules. All cases run in one spawned rank, one after the other.
"""
import json

import pytest

from mswift.testing import run_ranks

CASES = {  # id -> (family, layer measured, selective recompute modules)
    "llama": ("llama", 0, []),
    "qwen3_moe": ("qwen3_moe", 0, []),
    "llama-recompute": ("llama", 0, ["layernorm", "mlp"]),
    "qwen3_moe-recompute": ("qwen3_moe", 0, ["layernorm", "moe"]),
    "deepseek_v3-dense": ("deepseek_v3", 0, []),  # first_k_dense_replace=1: layer 0 dense
    "deepseek_v3-moe": ("deepseek_v3", 1, []),
}


def measure_layer(folder: str, layer_number: int, modules: list[str]) -> tuple[int, int]:
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
    layer = chunk.decoder.layers[layer_number]
    tokens, hidden = 64, cfg.model.hidden_size
    x = torch.randn(tokens, 1, hidden, dtype=torch.bfloat16, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    inside, saved, attention_inputs = [False], {}, {}

    def key(t):
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)

    def enter(_, args, kwargs):
        inside[0] = True
        for t in [*args, *kwargs.values()][:3]:  # query, key, value
            attention_inputs[key(t)] = t

    core = layer.self_attention.core_attention
    core.register_forward_pre_hook(enter, with_kwargs=True)
    core.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(t):
        if (t.is_floating_point() and t.numel() > 1 and not inside[0]
                and t.untyped_storage().data_ptr() not in weights):
            saved[key(t)] = t
        return t

    # multi-latent attention makes its own (YaRN) rotary embedding inside the layer
    rotary = chunk.rotary_pos_emb(tokens) if hasattr(chunk, "rotary_pos_emb") else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, rotary_pos_emb=rotary)
    # Counted after the forward: a recomputed norm's output is saved by the next linear layer,
    # then its storage is freed (resized to 0) until backward recomputes it.
    kept = sum(t.numel() * t.element_size() for t in {**saved, **attention_inputs}.values()
               if t.untyped_storage().nbytes() > 0)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    predicted, _ = layer_activation_bytes(shapes, tokens, hidden, 1, False, 1,
                                          cfg.model.moe_router_topk, frozenset(modules))
    return kept, predicted


def measure_all(cases: dict) -> dict:
    return {cid: measure_layer(*case) for cid, case in cases.items()}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from mswift.testing.hf_models import tiny_hf_config

    cases = {}
    for cid, (family, layer, modules) in CASES.items():
        folder = tmp_path_factory.mktemp(cid)
        (folder / "config.json").write_text(json.dumps(tiny_hf_config(family).to_dict()))
        cases[cid] = (str(folder), layer, modules)
    return run_ranks(1, measure_all, cases)[0]


@pytest.mark.parametrize("cid", list(CASES))
def test_layer_activation_estimate_matches_saved_tensors(measured, cid):
    kept, predicted = measured[cid]
    assert abs(kept - predicted) <= 0.10 * kept, (kept, predicted)
