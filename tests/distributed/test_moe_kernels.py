"""mswift's Triton kernels wired into megatron-core's layers (``moe_routing_backend=triton``,
``fused_kernels=triton``; Triton's interpreter on CPU, fp32).

* A tiny Qwen3-MoE and a tiny Llama-4 train on packed SFT batches at EP2 with the kernels on
  and give the losses of the same run with them off (megatron-core's permutation, SwiGLU and
  cross-entropy, mswift's norm on torch) within 1e-5 relative, step by step. Llama-4 scales the
  expert *input* by its top-1 router weight, so the unweighted unpermute is exercised too.
  With the kernels on, the router is mswift's ``HFTopKRouter`` on the Triton routing kernel
  (Qwen3-MoE: softmax, top-2, ``norm_topk_prob``; Llama-4: top-1 sigmoid); off, it is
  megatron-core's ``TopKRouter``, so the losses also compare the two routers.
* The Qwen3-MoE does the same with the all-gather dispatcher at EP2, where each rank permutes
  only its own experts' choices of every gathered token (``permute(..., unrouted=True)``).
* The Qwen3-MoE with the kernels on gives transformers' logits (fp32, 1e-4) at TP1.

Each run checks that the kernel modules are really in place (a swap that silently fell back
would pass the loss comparison trivially). Vocabulary 300, padded to 384: the fused
cross-entropy must keep the padded ids out of the softmax on its own terms.
"""
from pathlib import Path

import pytest
import torch

from mswift.testing import run_ranks

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"
INTERPRET = {"TRITON_INTERPRET": "1"}
KERNELS_ON = ["moe_routing_backend=triton", "fused_kernels=triton"]
KERNELS_OFF = ["moe_routing_backend=torch", "fused_kernels=torch"]
TRAIN = ["mode=sft", "seq_length=64", "micro_batch_size=1", "global_batch_size=2",
         "train_iters=3", "lr=1e-3", "min_lr=1e-4", "lr_warmup_iters=0", "seed=1",
         "log_interval=3", "expert_model_parallel_size=2"]
REL_TOL = 1e-5
SHAPE = dict(vocab_size=300, num_hidden_layers=2, hidden_size=48, head_dim=16,
             num_attention_heads=3, num_key_value_heads=1)
MODELS = {
    "qwen3_moe": dict(SHAPE, router_aux_loss_coef=0.0, moe_intermediate_size=40),
    # every layer MoE (top-1, weight on the input) and a NoPE layer with temperature tuning
    "llama4": dict(SHAPE, interleave_moe_layer_step=1, no_rope_layer_interval=2,
                   intermediate_size=40, intermediate_size_mlp=56),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mswift.testing.tokenizers import save_tiny_chat_model, write_chat_jsonl

    root = tmp_path_factory.mktemp("moe_kernels")
    models = {name: str(save_tiny_chat_model(name, root / name, CORPUS, tokenizer_vocab=276,
                                             **over))
              for name, over in MODELS.items()}
    return models, str(write_chat_jsonl(CORPUS, root / "chat.jsonl"))


def kernel_modules_report(chunks) -> dict:
    """Which of mswift's kernel modules the built model holds."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mswift.models.kernel_modules import KernelLossGPTModel, SwiGLU
    from mswift.models.moe_dispatch import (
        KernelAllGatherTokenDispatcher,
        KernelAlltoAllTokenDispatcher,
    )
    from mswift.models.norm import Norm
    from mswift.models.router import HFTopKRouter

    modules = [m for chunk in chunks for m in chunk.modules()]
    mlps = [m for m in modules if isinstance(m, MLP)]
    moes = [m for m in modules if isinstance(m, MoELayer)]
    norms = [m for m in modules if isinstance(m, Norm)]
    return {
        "loss": all(isinstance(c, KernelLossGPTModel) for c in chunks),
        "swiglu": bool(mlps) and all(isinstance(m.activation_func, SwiGLU) for m in mlps),
        "dispatch": bool(moes) and all(isinstance(m.token_dispatcher, (
            KernelAlltoAllTokenDispatcher, KernelAllGatherTokenDispatcher)) for m in moes),
        "norm": bool(norms) and all(n.backend == "triton" for n in norms),
        "router": bool(moes) and all(isinstance(m.router, HFTopKRouter)
                                     and m.router.backend == "triton" for m in moes),
    }


def train_on_and_off(hf_dir: str, data: str, dispatcher: str = "alltoall") -> dict:
    """Rank body: the same training run with the kernels off, then on."""
    from mswift.config import load_config
    from mswift.train.loop import run_training, setup

    out = {}
    for name, switches in (("off", KERNELS_OFF), ("on", KERNELS_ON)):
        cfg = load_config(None, [f"hf_model={hf_dir}", f"dataset=[{data}]",
                                 f"moe_token_dispatcher_type={dispatcher}"] + TRAIN + switches)
        state = setup(cfg)
        report = kernel_modules_report([ddp.module for ddp in state.model])
        out[name] = {"losses": [row["loss"] for row in run_training(cfg, state)],
                     "modules": report}
    return out


@pytest.mark.parametrize("family, dispatcher", [(family, "alltoall") for family in MODELS]
                         + [("qwen3_moe", "allgather")])
def test_ep2_training_with_kernels_gives_the_same_losses(data, family, dispatcher):
    models, chat = data
    for rank, result in enumerate(run_ranks(2, train_on_and_off, models[family], chat,
                                            dispatcher, env=INTERPRET, timeout=600)):
        assert result["on"]["modules"] == dict.fromkeys(result["on"]["modules"], True), result
        assert not any(result["off"]["modules"].values()), result["off"]["modules"]
        off, on = result["off"]["losses"], result["on"]["losses"]
        assert len(off) == len(on) == 3 and off[-1] < off[0], (off, on)
        for step, (got, want) in enumerate(zip(on, off), start=1):
            assert abs(got - want) <= REL_TOL * abs(want), f"rank {rank} step {step}: {got} vs {want}"


def logits_with_kernels(hf_dir: str, tokens: torch.Tensor):
    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model

    hf = HFModel.open(hf_dir, moe_routing_backend="triton", fused_kernels="triton")
    layout = Layout()
    chunks = build_chunks(hf.run_config(layout, seq_length=tokens.shape[1]))
    load_hf_into_model(chunks, hf.hf_dir, hf.weight_map(hf.padded_vocab(layout.tp)))
    return megatron_logits(chunks, tokens, hf.model.vocab_size), kernel_modules_report(chunks)


def test_qwen3_moe_logits_with_kernels_are_transformers(data):
    from mswift.testing.hf_models import hf_logits

    hf_dir = data[0]["qwen3_moe"]
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    (got, report), = run_ranks(1, logits_with_kernels, hf_dir, tokens, env=INTERPRET,
                               timeout=600)
    assert all(report.values()), report
    want = hf_logits(hf_dir, tokens)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
