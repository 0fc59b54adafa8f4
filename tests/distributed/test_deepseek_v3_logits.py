"""Tiny DeepSeek-V3 models loaded into megatron-core give transformers' ``DeepseekV3ForCausalLM``
logits (fp32, max abs diff <= 1e-4) at TP1, TP2+SP, PP2, EP2, an uneven PP2 (5 layers: 2 on
the first stage, 3 on the last), expert-TP 1 under TP2+SP (the experts whole on each TP rank),
and on 4 ranks TP2xEP2+SP with expert-TP 2 and 1; and packed (each sample of a THD batch equals
transformers on that sample alone). Layouts of one world size share one group of ranks.

Two models from the family's debug config: with a q latent (``q_lora_rank`` 48) and without
(``q_proj``). Both have YaRN (factor 4 over 16 original positions: 40-token sequences run past
it), a dense first layer then MoE layers of 8 experts in 4 groups, top-3 of the best 2 groups
(megatron-core's own router scores a group by its top 3 / 2 = 1 expert, not the top 2: the test
shows it gives other logits), a random ``e_score_correction_bias``, a shared expert, 6 heads and
a vocabulary of 250 (padded to 256).
"""
import pytest
import torch
from test_llama4_logits import packed_logits

from mswift.testing import run_ranks
from mswift.testing.hf_models import hf_logits, hf_reference_logits, save_tiny_hf_model

TOL = 1e-4
SEQ = 40
MODELS = {"q_lora": {}, "no_q_lora": {"q_lora_rank": None},
          "five_layers": {"num_hidden_layers": 5}}
TP2 = {"tp": 2, "sequence_parallel": True}  # megatron-core: MoE with TP needs SP
# name: (world size, layout)
LAYOUTS = {"tp1": (2, {}), "tp2": (2, TP2), "pp2": (2, {"pp": 2}), "ep2": (2, {"ep": 2}),
           "pp2_uneven": (2, {"pp": 2, "first": 2, "last": 3}),
           "tp2-etp1": (2, {**TP2, "etp": 1}), "tp2-ep2": (4, {**TP2, "ep": 2}),
           "tp2-ep2-etp1": (4, {**TP2, "ep": 2, "etp": 1})}
# (model, layout) pairs run: both 4-layer models at every even layout, the 5-layer one uneven
CASES = [(m, lay) for lay in LAYOUTS if lay != "pp2_uneven" for m in ("q_lora", "no_q_lora")]
CASES.append(("five_layers", "pp2_uneven"))
PACKED = {"q_lora": "tp1", "no_q_lora": "tp2"}  # model -> layout of its packed case
SAMPLES = [13, SEQ, 27]  # packed sample lengths (a multiple of TP in all)


def run_cases(cases, tokens, samples):
    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model

    out = {}
    for case in cases:
        hf = HFModel.open(case["hf_dir"], **case.get("overrides", {}))
        layout = Layout(**case["layout"])
        chunks = build_chunks(hf.run_config(layout, seq_length=SEQ))
        load_hf_into_model(chunks, hf.hf_dir, hf.weight_map(hf.padded_vocab(layout.tp)))
        result = {"logits": megatron_logits(chunks, tokens, hf.model.vocab_size),
                  "layers": sum(len(chunk.decoder.layers) for chunk in chunks)}
        if case["packed"]:
            result["packed"] = packed_logits(chunks, samples, hf.model.vocab_size)
        out[case["id"]] = result
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_v3")
    return {name: save_tiny_hf_model("deepseek_v3", root / name, seed=i + 1, **over)
            for i, (name, over) in enumerate(MODELS.items())}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def samples():
    generator = torch.Generator().manual_seed(6)
    return [torch.randint(0, 250, (n,), generator=generator) for n in SAMPLES]


@pytest.fixture(scope="module")
def references(hf_dirs, tokens, samples):
    return {name: hf_reference_logits(path, tokens, samples) for name, path in hf_dirs.items()}


@pytest.fixture(scope="module")
def results(hf_dirs, tokens, samples):
    """Every case's results by id: a list with one entry per rank of its world size."""
    groups = {}  # world size -> cases
    for m, lay in CASES:
        world, layout = LAYOUTS[lay]
        groups.setdefault(world, []).append(
            {"id": f"{m}-{lay}", "hf_dir": str(hf_dirs[m]), "layout": layout,
             "packed": PACKED.get(m) == lay})
    # megatron-core's own router (no family spec): its group rule, everything else the same
    groups[2].append({"id": "mcore-router", "hf_dir": str(hf_dirs["q_lora"]), "layout": {},
                      "packed": False, "overrides": {"family": None}})
    out = {}
    for world, cases in sorted(groups.items()):
        per_rank = run_ranks(world, run_cases, cases, tokens, samples, timeout=600)
        out.update({case["id"]: [ranks[case["id"]] for ranks in per_rank] for case in cases})
    return out


def test_transformers_logits_depend_on_yarn_and_the_expert_bias(hf_dirs, tokens, references):
    """Sequences run past YaRN's original 16 positions and the loaded bias changes the choice:
    transformers' logits change without either."""
    path = hf_dirs["q_lora"]
    plain_rope = save_tiny_hf_model("deepseek_v3", path.parent / "plain", seed=1,
                                    rope_parameters={"rope_type": "default",
                                                     "rope_theta": 10000.0})
    assert (hf_logits(plain_rope, tokens) - references["q_lora"]["logits"]).abs().max() > 100 * TOL
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        unbiased = model(tokens).logits
    assert (unbiased - references["q_lora"]["logits"]).abs().max() > 100 * TOL


@pytest.mark.parametrize("model,layout", CASES)
def test_logits_equal_transformers(results, references, model, layout):
    case = f"{model}-{layout}"
    got = [r["logits"] for r in results[case] if r["logits"] is not None]
    assert got, "no rank returned logits"
    want = references[model]["logits"]
    for logits in got:  # every last-stage rank
        assert logits.shape == want.shape
        assert (logits - want).abs().max().item() <= TOL


@pytest.mark.parametrize("model", list(PACKED))
def test_packed_samples_equal_transformers_per_sample(results, references, model):
    case = f"{model}-{PACKED[model]}"
    want = references[model]["packed"]
    for rank_result in results[case]:
        got = rank_result["packed"]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL


def test_megatron_core_router_differs_from_transformers(results, references):
    """megatron-core's TopKRouter (group score = sum of the top topk/topk_group = 1) gives other
    logits than transformers here, which mswift's router matches (the tests above)."""
    got = results["mcore-router"][0]["logits"]
    assert (got - references["q_lora"]["logits"]).abs().max().item() > 100 * TOL


def test_the_uneven_split_puts_two_layers_first_and_three_last(results):
    assert [r["layers"] for r in results["five_layers-pp2_uneven"]] == [2, 3]
