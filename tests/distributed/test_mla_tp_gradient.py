"""Multi-latent attention's gradients at TP2 (with and without sequence parallelism) equal TP1's.

megatron-core 0.16.1's local MLA spec loses the other TP ranks' shares of the gradient of k's
RoPE part (shared by all heads; see :mod:`mswift.models.mla`); mswift's ``MLAttention`` sums
them. Tiny DeepSeek-V3 models from the family's debug config (2 layers: dense, MoE), with a q
latent and without (``q_proj``), loaded from the same HF weights at TP1 and TP2: one forward /
backward of the next-token loss of the same 40 tokens (past YaRN's 16 original positions) on
both ranks, in eval mode (nothing here depends on it, but megatron-core runs MoE at TP > 1
without SP only there: in training it refuses, for speed). Every attention weight's and the
embedding's gradient, gathered over TP, equals TP1's (fp32, 1e-5 of its largest entry);
megatron-core's own ``MLASelfAttention`` gives another gradient at TP2.
"""
import pytest
import torch

from mswift.testing import run_ranks
from mswift.testing.hf_models import save_tiny_hf_model

SEQ = 40
MODELS = {"q_lora": {"num_hidden_layers": 2}, "no_q_lora": {"q_lora_rank": None,
                                                          "num_hidden_layers": 2}}
# name: (layout, megatron-core's MLASelfAttention instead of mswift's). "tp2" (no SP) comes
# after a TP2 run: mswift's layout check refuses MoE at TP > 1 without SP when it starts the
# groups, and the ranks keep the groups of the same sizes.
RUNS = {"tp1": ({}, False), "tp2-sp": ({"tp": 2, "sequence_parallel": True}, False),
        "tp2-sp-mcore": ({"tp": 2, "sequence_parallel": True}, True),
        "tp2": ({"tp": 2}, False)}
# (model, run): no_q_lora at TP1 and TP2+SP only
CASES = [("q_lora", run) for run in RUNS] + [("no_q_lora", "tp1"), ("no_q_lora", "tp2-sp")]
CHECKED = ("self_attention.", "embedding.", "input_layernorm.")
REL_TOL = 1e-5


def whole_gradient(param) -> torch.Tensor:
    """``param``'s gradient as TP1 holds it: TP shards gathered along their partition
    dimension, the sequence-parallel partial gradients of replicated weights summed."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    grad = param.grad.detach().clone()
    group, size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    if size == 1:
        return grad
    if getattr(param, "tensor_model_parallel", False):
        parts = [torch.empty_like(grad) for _ in range(size)]
        dist.all_gather(parts, grad, group=group)
        return torch.cat(parts, dim=param.partition_dim)
    if getattr(param, "sequence_parallel", False):
        dist.all_reduce(grad, group=group)
    return grad


def attention_gradients(hf_dirs: dict, tokens: torch.Tensor, runs: list) -> dict:
    """Rank body: {(model, run name): {parameter name: whole gradient}} of the checked
    weights."""
    import mswift.models.spec as spec
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model

    out = {}
    ours = spec.MLAttention
    for model, run, layout, mcore in runs:
        spec.MLAttention = MLASelfAttention if mcore else ours
        try:
            hf = HFModel.open(hf_dirs[model])
            layout = Layout(**layout)
            chunks = build_chunks(hf.run_config(layout, seq_length=SEQ))
        finally:
            spec.MLAttention = ours
        load_hf_into_model(chunks, hf.hf_dir, hf.weight_map(hf.padded_vocab(layout.tp)))
        (chunk,) = chunks
        chunk.eval()
        positions = torch.arange(SEQ).unsqueeze(0)
        losses = chunk(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:])
        losses.float().mean().backward()
        out[(model, run)] = {
            name: whole_gradient(param) for name, param in chunk.named_parameters()
            if param.grad is not None and any(part in name for part in CHECKED)}
    return out


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla_tp")
    hf_dirs = {name: str(save_tiny_hf_model("deepseek_v3", root / name, seed=i + 3, **over))
               for i, (name, over) in enumerate(MODELS.items())}
    tokens = torch.randint(0, 250, (1, SEQ + 1), generator=torch.Generator().manual_seed(4))
    runs = [(model, run, *RUNS[run]) for model, run in CASES]
    return run_ranks(2, attention_gradients, hf_dirs, tokens, runs, timeout=600)[0]


@pytest.mark.parametrize("model,run", [("q_lora", "tp2-sp"), ("q_lora", "tp2"),
                                       ("no_q_lora", "tp2-sp")])
def test_tp2_gradients_equal_tp1(gradients, model, run):
    want, got = gradients[(model, "tp1")], gradients[(model, run)]
    assert set(got) == set(want)
    assert any("linear_kv_down_proj" in name for name in want)
    for name, grad in want.items():
        assert got[name].shape == grad.shape, name
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (got[name] - grad).abs().max().item() <= REL_TOL * scale, name


def test_megatron_core_mla_loses_part_of_the_kv_down_projection_gradient(gradients):
    want, got = gradients[("q_lora", "tp1")], gradients[("q_lora", "tp2-sp-mcore")]
    name = next(n for n in want if "linear_kv_down_proj" in n)
    assert (got[name] - want[name]).abs().max().item() > 100 * REL_TOL * want[name].abs().max()
