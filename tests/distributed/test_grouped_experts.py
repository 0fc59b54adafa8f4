"""``moe_grouped_gemm: true`` without Transformer Engine: mswift's grouped expert MLP
(:mod:`mswift.models.grouped_experts`) on a tiny Qwen3-MoE (4 experts, top-2, fp32).

* Logits equal transformers' (1e-4) at EP1 and EP2 with the grouped experts in place (EP1 also
  for a tiny Llama-4 and DeepSeek-V3).
* Checkpoints interchange with the per-expert layout (SequentialMLP): a torch_dist checkpoint
  saved with grouped GEMMs loads with them off and vice versa (same logits, bit for bit); HF
  converted to torch_dist and to legacy rank files with either layout's names loads into the
  grouped model (same logits), the grouped legacy file holding exactly its state-dict names;
  an HF checkpoint exported from the grouped model is the source bit for bit.
* Training packed at EP2 gives the same losses with grouped GEMMs on and off (1e-5).
"""
from pathlib import Path

import pytest
import torch

from mswift.testing import run_ranks

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"
TRAIN = ["mode=sft", "seq_length=64", "micro_batch_size=1", "global_batch_size=2",
         "train_iters=3", "lr=1e-3", "min_lr=1e-4", "lr_warmup_iters=0", "seed=1",
         "log_interval=3", "expert_model_parallel_size=2"]
# HF -> megatron conversions at EP2 the grouped model loads: name -> hf_to_mcore arguments
CONVERTED = {"torch_dist": dict(fmt="torch_dist"),
             "legacy_grouped": dict(fmt="legacy", grouped_experts=True),
             "legacy_per_expert": dict(fmt="legacy")}
MODEL = dict(vocab_size=300, num_hidden_layers=2, hidden_size=48, head_dim=16,
             num_attention_heads=3, num_key_value_heads=1, router_aux_loss_coef=0.0,
             moe_intermediate_size=40)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mswift.testing.tokenizers import save_tiny_chat_model, write_chat_jsonl

    root = tmp_path_factory.mktemp("grouped_experts")
    hf_dir = save_tiny_chat_model("qwen3_moe", root / "hf", CORPUS, tokenizer_vocab=276, **MODEL)
    return str(hf_dir), str(write_chat_jsonl(CORPUS, root / "chat.jsonl")), root


def grouped_report(chunks) -> list[str]:
    """The class names of every MoE layer's experts and their fc1 / fc2."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return sorted({f"{type(m.experts).__name__}:"
                   f"{type(getattr(m.experts, 'linear_fc1', m.experts)).__name__}"
                   for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer)})


def grouped_logits(hf_dirs: list[str], tokens: torch.Tensor) -> list:
    """Rank body (EP1): each model with grouped experts, loaded from HF: (experts, logits)."""
    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model

    out = []
    for hf_dir in hf_dirs:
        hf = HFModel.open(hf_dir, moe_grouped_gemm=True)
        chunks = build_chunks(hf.run_config(Layout(), seq_length=tokens.shape[1]))
        load_hf_into_model(chunks, hf_dir, hf.weight_map(hf.padded_vocab(1)))
        out.append((grouped_report(chunks), megatron_logits(chunks, tokens, hf.model.vocab_size)))
    return out


def test_grouped_experts_logits_at_ep1(data, tmp_path):
    """Qwen3-MoE, Llama-4 (top-1, the router weight on the expert input, a shared expert) and
    DeepSeek-V3 (a dense first layer, shared expert, group-limited routing) with grouped
    experts give transformers' logits."""
    from mswift.testing.hf_models import hf_logits, save_tiny_hf_model

    hf_dirs = [data[0]] + [str(save_tiny_hf_model(family, tmp_path / family))
                           for family in ("llama4", "deepseek_v3")]
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(5))
    (results,) = run_ranks(1, grouped_logits, hf_dirs, tokens, timeout=600)
    for hf_dir, (modules, got) in zip(hf_dirs, results):
        assert modules == ["TEGroupedMLP:ColumnGroupedLinear"], (hf_dir, modules)
        want = hf_logits(hf_dir, tokens)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4, hf_dir


def logits_and_checkpoints(hf_dir: str, tokens: torch.Tensor, out: str):
    """Rank body (EP2): the grouped model loaded from HF (logits, HF export, torch_dist save),
    the per-expert model loaded from that save (logits) and saved, the grouped model reloaded
    from the per-expert save (logits), then from HF's conversions (logits)."""
    import dataclasses

    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.hf_checkpoint import save_hf_checkpoint
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.legacy import LegacySource
    from mswift.bridge.model_io import load_hf_into_model, load_into_model, model_tensors
    from mswift.bridge.torch_dist import load_torch_dist, save_torch_dist

    layout = Layout(ep=2)
    models = {g: HFModel.open(hf_dir, moe_grouped_gemm=g) for g in (True, False)}
    cfgs = {g: hf.run_config(layout, seq_length=tokens.shape[1]) for g, hf in models.items()}
    cfgs = {g: dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_model=hf_dir))
            for g, cfg in cfgs.items()}
    vocab = models[True].model.vocab_size
    result = {}
    grouped = build_chunks(cfgs[True])
    result["grouped_modules"] = grouped_report(grouped)
    load_hf_into_model(grouped, hf_dir, models[True].weight_map(models[True].padded_vocab(1)))
    result["grouped"] = megatron_logits(grouped, tokens, vocab)
    save_hf_checkpoint(grouped, cfgs[True], f"{out}/hf_back")
    save_torch_dist(grouped, f"{out}/dist_grouped")
    names = {}
    for name, tensor in model_tensors(grouped):
        names[name] = tensor.detach().clone()
    per_expert = build_chunks(cfgs[False])
    result["per_expert_modules"] = grouped_report(per_expert)
    load_torch_dist(per_expert, f"{out}/dist_grouped")
    result["per_expert"] = megatron_logits(per_expert, tokens, vocab)
    # the same global names hold the same weights in both layouts
    result["same_weights"] = all(torch.equal(names[n], t) for n, t in model_tensors(per_expert))
    result["names"] = sorted(names) == sorted(n for n, _ in model_tensors(per_expert))
    save_torch_dist(per_expert, f"{out}/dist_per_expert")
    with torch.no_grad():
        for param in grouped[0].parameters():
            param.zero_()
    load_torch_dist(grouped, f"{out}/dist_per_expert")
    result["grouped_again"] = megatron_logits(grouped, tokens, vocab)
    # checkpoints converted from HF: torch_dist, and legacy with both layouts' names
    wmap = models[True].weight_map(models[True].padded_vocab(1))
    for name in CONVERTED:
        with torch.no_grad():
            for param in grouped[0].parameters():
                param.zero_()
        if name == "torch_dist":
            load_torch_dist(grouped, f"{out}/{name}")
        else:
            load_into_model(grouped, LegacySource(f"{out}/{name}", wmap))
        result[name] = megatron_logits(grouped, tokens, vocab)
    result["state_dict"] = sorted(grouped[0].state_dict())
    return result


def test_grouped_experts_at_ep2_logits_and_checkpoint_interchange(data, tmp_path):
    """2 of the 4 experts on each rank."""
    from mswift.bridge.legacy import FILE
    from mswift.testing.hf_models import hf_logits, read_safetensors_dir

    from mswift.bridge.convert import hf_to_mcore, mcore_to_hf, reshard

    hf_dir, _, _ = data
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    for name, how in CONVERTED.items():
        hf_to_mcore(hf_dir, tmp_path / name, ep=2, progress=False, **how)
    results = run_ranks(2, logits_and_checkpoints, hf_dir, tokens, str(tmp_path), timeout=600)
    want = hf_logits(hf_dir, tokens)
    got = results[0]
    assert got["grouped_modules"] == ["TEGroupedMLP:ColumnGroupedLinear"], got
    assert got["grouped"].shape == want.shape
    assert (got["grouped"] - want).abs().max().item() <= 1e-4
    assert got["per_expert_modules"] == ["SequentialMLP:SequentialMLP"], got
    for result in results:
        assert result["names"] and result["same_weights"]
    assert torch.equal(got["per_expert"], got["grouped"])
    assert torch.equal(got["grouped_again"], got["grouped"])
    for name in CONVERTED:
        assert torch.equal(got[name], got["grouped"]), name
    # the grouped legacy rank file holds exactly the grouped model's state-dict names
    rank_file = tmp_path / "legacy_grouped" / "iter_0000000" / "mp_rank_00_000" / FILE
    assert sorted(torch.load(rank_file, weights_only=False)["model"]) == got["state_dict"]
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight1" in got["state_dict"]
    # resharded to EP1, the grouped legacy checkpoint keeps its names and exports to HF
    reshard(tmp_path / "legacy_grouped", tmp_path / "ep1", tp=1, pp=1, ep=1, progress=False)
    ep1 = torch.load(tmp_path / "ep1" / "iter_0000000" / "mp_rank_00" / FILE, weights_only=False)
    assert ep1["args"].moe_grouped_gemm
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight3" in ep1["model"]
    mcore_to_hf(tmp_path / "ep1", tmp_path / "ep1_hf", progress=False)
    source = read_safetensors_dir(hf_dir)
    for exported in ("hf_back", "ep1_hf"):
        back = read_safetensors_dir(tmp_path / exported)
        assert sorted(back) == sorted(source), exported
        for name, tensor in source.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def train_grouped_on_and_off(hf_dir: str, data: str) -> dict:
    from mswift.config import load_config
    from mswift.train.loop import run_training, setup

    out = {}
    for grouped in (False, True):
        cfg = load_config(None, [f"hf_model={hf_dir}", f"dataset=[{data}]",
                                 f"moe_grouped_gemm={str(grouped).lower()}"] + TRAIN)
        state = setup(cfg)
        out[grouped] = {"modules": grouped_report([ddp.module for ddp in state.model]),
                        "losses": [row["loss"] for row in run_training(cfg, state)]}
    return out


def test_ep2_training_with_grouped_experts_gives_the_same_losses(data):
    hf_dir, chat, _ = data
    for rank, result in enumerate(run_ranks(2, train_grouped_on_and_off, hf_dir, chat,
                                            timeout=600)):
        assert result[True]["modules"] == ["TEGroupedMLP:ColumnGroupedLinear"]
        assert result[False]["modules"] == ["SequentialMLP:SequentialMLP"]
        off, on = result[False]["losses"], result[True]["losses"]
        assert len(off) == len(on) == 3 and off[-1] < off[0], (off, on)
        for step, (got, want) in enumerate(zip(on, off), start=1):
            assert abs(got - want) <= 1e-5 * abs(want), f"rank {rank} step {step}: {got} vs {want}"
