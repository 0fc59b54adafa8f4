"""Transformer Engine's layer spec against the local spec and transformers (needs a GPU with TE).

A tiny HF Llama (3 query heads per KV group, vocabulary 250 padded to 256) and Qwen3-MoE are
loaded through the bridge into megatron-core models built with ``transformer_impl=
transformer_engine`` and ``=local``, on ``cuda:0``, and their logits compared with transformers'
(fp32, CPU) on a packed batch of two samples (THD, ``cu_seqlens``) -- each sample's logits
against transformers run on that sample alone.

Tolerances:
- fp32 (TE's GEMMs and fused layernorm-linear with mswift's ``torch`` attention): max abs diff
  <= 1e-4, the project's fp32 bar. ``NVIDIA_TF32_OVERRIDE=0`` keeps cuBLAS from TF32 GEMMs, so
  a larger error is a real difference, not TF32 rounding.
- bf16 with TE's fused attention (``attention_backend=te``, 16-bit only): the TE model's error
  against fp32 transformers may be at most twice the local spec's own bf16 error plus 1e-2
  (both bf16, same weights): TE is as accurate as plain bf16 math, whatever the shapes.

It also checks that a torch_dist checkpoint's keys are the same in both specs (dense and MoE
layers), which is what lets one spec load the other's checkpoints.
"""
import pytest
import torch

from mswift.runtime import device
from mswift.testing.hf_models import hf_logits, save_tiny_hf_model
from mswift.testing.ranks import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not device.transformer_engine_importable(),
    reason="Transformer Engine is not installed (transformer_engine.pytorch does not import)")]

LENGTHS = (24, 40)  # two samples packed into one THD row
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}
# llama4: its chunked attention / temperature tuning on TE layers keep mswift's attention
FAMILIES = ("llama", "qwen3_moe", "llama4")


def _packed_tokens(vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab, (sum(LENGTHS),), generator=gen)


def megatron_packed_logits(hf_dir: str, impl: str, backend: str, dtype) -> dict:
    """Logits of each packed sample ``[len, vocab]`` (fp32, CPU) and the checkpoint keys."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.packed_seq_params import PackedSeqParams

    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model

    hf = HFModel.open(hf_dir)
    cfg = hf.run_config(Layout(), dtype=dtype, seq_length=sum(LENGTHS))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, transformer_impl=impl, attention_backend=backend))
    (chunk,) = build_chunks(cfg)
    load_hf_into_model([chunk], hf.hf_dir, hf.weight_map(hf.padded_vocab(1)))
    chunk = chunk.cuda().eval()
    device = torch.device("cuda", 0)
    tokens = _packed_tokens(hf.model.vocab_size).to(device).unsqueeze(0)  # [1, tokens]
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).to(device).unsqueeze(0)
    cu = torch.tensor([0, LENGTHS[0], sum(LENGTHS)], dtype=torch.int32, device=device)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS))
    with torch.no_grad():
        logits = chunk(tokens, positions, None, packed_seq_params=packed)
    logits = logits[0, :, :hf.model.vocab_size].float().cpu()  # [tokens, vocab]
    keys = {k for k, v in chunk.sharded_state_dict().items() if isinstance(v, ShardedTensor)}
    return {"logits": list(torch.split(logits, LENGTHS)), "keys": keys}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_spec")
    out = {}
    for family in FAMILIES:
        path = save_tiny_hf_model(family, root / family)
        tokens = _packed_tokens(_vocab(path))
        samples = torch.split(tokens, LENGTHS)
        out[family] = (str(path), [hf_logits(path, s.unsqueeze(0))[0] for s in samples])
    return out


def _vocab(path) -> int:
    import json

    return json.loads((path / "config.json").read_text())["vocab_size"]


def _run(hf_dir, impl, backend, dtype=None):
    return run_ranks(1, megatron_packed_logits, hf_dir, impl, backend, dtype, env=NO_TF32,
                     timeout=300)[0]


def _max_error(got, want) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


@pytest.mark.parametrize("family", FAMILIES)
def test_te_spec_fp32_matches_transformers_and_local_spec(models, family):
    hf_dir, reference = models[family]
    te = _run(hf_dir, "transformer_engine", "torch")
    local = _run(hf_dir, "local", "torch")
    assert _max_error(te["logits"], reference) <= 1e-4
    assert _max_error(local["logits"], reference) <= 1e-4
    # torch_dist keys agree: a checkpoint of one spec loads in the other
    assert te["keys"] == local["keys"]


def test_te_fused_attention_bf16_is_as_accurate_as_local_bf16(models):
    hf_dir, reference = models["llama"]
    te = _run(hf_dir, "transformer_engine", "te", torch.bfloat16)
    local = _run(hf_dir, "local", "torch", torch.bfloat16)
    local_error = _max_error(local["logits"], reference)
    assert _max_error(te["logits"], reference) <= 2 * local_error + 1e-2
