"""Tiny HF models of every family, loaded into megatron-core at every parallel layout, give
transformers' logits (fp32, max abs diff <= 1e-4, loss diff <= 1e-5).

One spawn of 4 gloo ranks runs every case in turn (megatron-core's groups are rebuilt per
layout); the references are computed here with transformers. Per case the model is loaded
twice: straight from the HF safetensors, and from a legacy (Megatron-LM per-rank) checkpoint
written beforehand by ``hf_to_mcore --format legacy``, read with a plain strict
``load_state_dict`` of the rank's own file. Some cases also write the sharded model straight
back to HF, and each family is converted to torch_dist at one layout (under the 4 ranks) and
loaded by the training code at another.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mswift.testing import run_ranks
from mswift.testing.hf_models import hf_logits, save_tiny_hf_model

pytestmark = pytest.mark.slow  # 4 ranks through every family's layouts

TOL = 1e-4
LOSS_TOL = 1e-5
TP2, PP2 = {"tp": 2}, {"pp": 2}
MOE_SP = {"sequence_parallel": True}
LAYOUTS = {
    "tp1": {}, "tp2": TP2, "pp2": PP2, "tp2pp2": {**TP2, **PP2},
    "pp2vpp2": {**PP2, "vpp": 2},
    "tp2sp": {**TP2, **MOE_SP}, "tp2pp2sp": {**TP2, **PP2, **MOE_SP}, "ep2": {"ep": 2},
    "tp2ep2sp": {**TP2, "ep": 2, **MOE_SP}, "tp2ep2etp1sp": {**TP2, "ep": 2, "etp": 1, **MOE_SP},
}
MODELS = {  # model -> (family, HF config overrides)
    "llama": ("llama", {}),  # 4 layers, llama3 rope scaling with non-default factors
    "qwen2": ("qwen2", {}),  # qkv bias, tied embeddings
    "qwen3": ("qwen3", {}),  # qk norm, head_dim != hidden / heads
    "qwen3_moe": ("qwen3_moe", {}),  # norm_topk_prob=True
    "qwen3_moe_unnormed": ("qwen3_moe", {"norm_topk_prob": False}),
    "qwen3_moe_dense1": ("qwen3_moe", {"mlp_only_layers": [1]}),
    "qwen2_bf16": ("qwen2", {"dtype": torch.bfloat16}),
}
CASES = [
    *[("llama", lay) for lay in ("tp1", "tp2", "pp2", "tp2pp2", "pp2vpp2")],
    *[(m, lay) for m in ("qwen2", "qwen3") for lay in ("tp1", "tp2", "pp2", "tp2pp2")],
    *[("qwen3_moe", lay) for lay in ("tp1", "tp2sp", "pp2", "tp2pp2sp", "ep2", "tp2ep2sp",
                                     "tp2ep2etp1sp")],
    ("qwen3_moe_unnormed", "tp1"), ("qwen3_moe_unnormed", "tp2ep2sp"),
    ("qwen3_moe_dense1", "ep2"),
]
SAVE_HF = {("llama", "pp2vpp2"), ("qwen2", "tp2pp2"), ("qwen3", "tp2pp2"),
           ("qwen3_moe", "tp2ep2sp"), ("qwen3_moe", "tp2ep2etp1sp")}
TORCH_DIST = {  # model -> (layout converted at, layout training loads it at)
    "llama": ("tp2pp2", "pp2vpp2"), "qwen2": ("tp2", "pp2"), "qwen3": ("pp2", "tp2"),
    "qwen3_moe": ("tp2ep2sp", "ep2"),
}


TRAINING = {  # model -> run settings with hf_model=... (bf16 parameters for the bf16 model)
    "qwen2": ["tensor_model_parallel_size=2", "pipeline_model_parallel_size=2"],
    "qwen2_bf16": ["tensor_model_parallel_size=2", "bf16=true"],
}


def case_id(model, layout):
    return f"{model}-{layout}"


# -- rank bodies ----------------------------------------------------------------------------


def _load_legacy_rank_file(chunks, root, layout):
    """What Megatron-LM does with --ckpt-format torch: its own rank's file, strict load."""
    from megatron.core import parallel_state as ps

    tp, pp, ep = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                  ps.get_expert_model_parallel_rank())
    name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if layout.get("pp", 1) > 1 else "")
    name += f"_{ep:03d}" if layout.get("ep", 1) > 1 else ""
    state = torch.load(Path(root) / "iter_0000000" / name / "model_optim_rng.pt",
                       weights_only=False)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        for param in chunk.parameters():
            param.data.zero_()  # whatever the HF load left must be overwritten
        chunk.load_state_dict(state[key], strict=True)


def run_case(case, tokens):
    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model, save_model_to_hf

    hf = HFModel.open(case["hf_dir"])
    layout = Layout(**case["layout"])
    chunks = build_chunks(hf.run_config(layout, seq_length=tokens.shape[1]))
    wmap = hf.weight_map(hf.padded_vocab(layout.tp))
    load_hf_into_model(chunks, hf.hf_dir, wmap)
    result = {"hf": megatron_logits(chunks, tokens, hf.model.vocab_size)}
    if case.get("save_hf"):
        save_model_to_hf(chunks, wmap, case["save_hf"])
    if case.get("legacy"):
        _load_legacy_rank_file(chunks, case["legacy"], case["layout"])
        result["legacy"] = megatron_logits(chunks, tokens, hf.model.vocab_size)
    return result


def run_torch_dist_case(case, tokens):
    """Convert with hf_to_mcore under these ranks, then start training from it elsewhere."""
    from mswift.bridge.convert import hf_to_mcore
    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.layout import HFModel, Layout
    from mswift.runtime import init_distributed
    from mswift.train.builder import build_training
    from mswift.train.checkpoint import load_checkpoint

    convert = dict(case["convert"])
    convert.pop("sequence_parallel", None)  # the tool switches it on for MoE with TP
    hf_to_mcore(case["hf_dir"], case["out"], "torch_dist", progress=False, **convert)
    hf = HFModel.open(case["hf_dir"])
    cfg = hf.run_config(Layout(**case["train"]), seq_length=tokens.shape[1])
    init_distributed(cfg)
    state = build_training(cfg)
    load_checkpoint(state, case["out"], load_optim=False)
    return megatron_logits(state.model, tokens, hf.model.vocab_size)


def run_hf_training_case(case, tokens):
    """What the training driver does with hf_model=...: load, then save back to HF."""
    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
    from mswift.config import load_config
    from mswift.models.build import build_model
    from mswift.models.registry import apply_hf_model
    from mswift.runtime import init_distributed

    cfg = apply_hf_model(load_config(None, [f"hf_model={case['hf_dir']}", *case["settings"]]))
    init_distributed(cfg)
    chunks = build_model(cfg)
    load_hf_checkpoint(chunks, cfg)
    save_hf_checkpoint(chunks, cfg, case["out"])
    return megatron_logits(chunks, tokens, cfg.model.vocab_size)


def _groups_key(case):
    lay = case["layout"]  # cases at one layout share megatron-core's process groups
    return tuple(lay.get(k) or 0 for k in ("tp", "pp", "vpp", "ep", "etp"))


def all_cases(cases, torch_dist_cases, training_cases, tokens):
    out = {case["id"]: run_case(case, tokens) for case in sorted(cases, key=_groups_key)}
    for case in torch_dist_cases:
        out[case["id"]] = {"torch_dist": run_torch_dist_case(case, tokens)}
    for case in training_cases:
        out[case["id"]] = {"training": run_hf_training_case(case, tokens)}
    return out


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {m: save_tiny_hf_model(fam, root / m, seed=i, **over)
            for i, (m, (fam, over)) in enumerate(MODELS.items())}


def saved_tensors(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in set(index["weight_map"].values()):
        tensors.update(load_file(path / name))
    assert set(index["weight_map"]) == set(tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == nbytes
    return tensors


def assert_same_tensors(saved, original_dir):
    original = load_file(original_dir / "model.safetensors")
    assert set(saved) == set(original)
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name


@pytest.fixture(scope="module")
def references(hf_dirs, tokens):
    return {m: hf_logits(path, tokens) for m, path in hf_dirs.items()}


@pytest.fixture(scope="module")
def results(hf_dirs, tokens, tmp_path_factory):
    from mswift.bridge.convert import hf_to_mcore

    work = tmp_path_factory.mktemp("bridge")
    cases = []
    for model, lay in CASES:
        layout = LAYOUTS[lay]
        case = {"id": case_id(model, lay), "hf_dir": str(hf_dirs[model]), "layout": layout}
        if layout.get("etp") in (None, layout.get("tp", 1)):  # legacy: expert TP = TP
            legacy = work / f"legacy-{case['id']}"
            hf_to_mcore(hf_dirs[model], legacy, "legacy", tp=layout.get("tp", 1),
                        pp=layout.get("pp", 1), ep=layout.get("ep", 1), vpp=layout.get("vpp"),
                        progress=False)
            case["legacy"] = str(legacy)
        if (model, lay) in SAVE_HF:
            case["save_hf"] = str(work / f"saved-{case['id']}")
        cases.append(case)
    torch_dist = [{"id": f"{m}-torch_dist", "hf_dir": str(hf_dirs[m]), "out": str(work / m),
                   "convert": LAYOUTS[a], "train": LAYOUTS[b]}
                  for m, (a, b) in TORCH_DIST.items()]
    training = [{"id": f"{m}-training", "hf_dir": str(hf_dirs[m]), "out": str(work / f"{m}-out"),
                 "settings": settings} for m, settings in TRAINING.items()]
    per_rank = run_ranks(4, all_cases, cases, torch_dist, training, tokens, timeout=600)
    return per_rank, {c["id"]: c for c in cases + training}


# -- checks ---------------------------------------------------------------------------------


def next_token_loss(logits, tokens):
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    return torch.nn.functional.cross_entropy(flat, tokens[:, 1:].reshape(-1)).item()


def assert_matches(per_rank, key, reference, tokens):
    got = [r[key] for r in per_rank if r[key] is not None]
    assert got, "no rank returned logits"  # last pipeline stage ranks do
    for logits in got:
        assert logits.shape == reference.shape
        diff = (logits - reference).abs().max().item()
        assert diff <= TOL, f"{key}: max abs logit diff {diff:.3e}"
        loss_diff = abs(next_token_loss(logits, tokens) - next_token_loss(reference, tokens))
        assert loss_diff <= LOSS_TOL, f"{key}: loss diff {loss_diff:.3e}"


@pytest.mark.parametrize("model,layout", CASES, ids=[case_id(*c) for c in CASES])
def test_logits_match_transformers(results, references, tokens, model, layout):
    per_rank, cases = results
    cid = case_id(model, layout)
    assert_matches([r[cid] for r in per_rank], "hf", references[model], tokens)
    if "legacy" in cases[cid]:
        assert_matches([r[cid] for r in per_rank], "legacy", references[model], tokens)


@pytest.mark.parametrize("model,layout", sorted(SAVE_HF),
                         ids=[case_id(*c) for c in sorted(SAVE_HF)])
def test_sharded_model_saves_the_same_hf_tensors(results, hf_dirs, model, layout):
    _, cases = results
    saved = Path(cases[case_id(model, layout)]["save_hf"])
    assert_same_tensors(saved_tensors(saved), hf_dirs[model])


@pytest.mark.parametrize("model", sorted(TRAINING))
def test_training_loads_and_saves_hf_directly(results, hf_dirs, references, tokens, model):
    per_rank, cases = results
    out = Path(cases[f"{model}-training"]["out"])
    assert_same_tensors(saved_tensors(out), hf_dirs[model])
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (hf_dirs[model] / name).read_bytes()
    if model == "qwen2":  # fp32 run: the logits too
        assert_matches([r[f"{model}-training"] for r in per_rank], "training",
                       references[model], tokens)


@pytest.mark.parametrize("model", sorted(TORCH_DIST))
def test_training_starts_from_converted_torch_dist(results, references, tokens, model):
    per_rank, _ = results
    assert_matches([r[f"{model}-torch_dist"] for r in per_rank], "torch_dist",
                   references[model], tokens)
