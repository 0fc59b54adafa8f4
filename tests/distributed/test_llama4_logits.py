"""Tiny Llama-4 models loaded into megatron-core give transformers' ``Llama4ForCausalLM`` logits
(fp32, max abs diff <= 1e-4) at TP1, TP2, PP2, EP2 and TP2xEP2, packed (each sample of a THD
batch equals transformers on that sample alone), and on the Triton backend (interpreter).

Two models from the family's debug config: Scout-like (every layer MoE) and Maverick-like
(every second layer MoE). Both have chunked attention (chunks of 8) on RoPE layers and
temperature tuning (floor_scale 4) on the NoPE layer, 3 query heads per KV group and a
vocabulary of 250 (padded to 256): 40-token sequences cross several chunks and floor_scale, and
the test first checks that transformers' logits really depend on both.
"""
import pytest
import torch

from mswift.testing import run_ranks
from mswift.testing.hf_models import hf_logits, hf_reference_logits, save_tiny_hf_model

pytestmark = pytest.mark.slow  # 4 ranks through every Llama-4 layout

TOL = 1e-4
SEQ = 40
MODELS = {"scout": {"interleave_moe_layer_step": 1}, "maverick": {}}
SP = {"sequence_parallel": True}  # megatron-core needs it for MoE with TP
LAYOUTS = {"tp1": {}, "tp2": {"tp": 2, **SP}, "pp2": {"pp": 2}, "ep2": {"ep": 2},
           "tp2ep2": {"tp": 2, "ep": 2, **SP}}
PACKED = {"maverick": "tp1", "scout": "tp2ep2"}  # model -> layout of its packed case
SAMPLES = [13, SEQ, 27]  # packed sample lengths (a multiple of TP in all)


def packed_logits(chunks, samples: list[torch.Tensor], vocab: int) -> torch.Tensor | None:
    """Logits ``[tokens, vocab]`` of one THD batch of ``samples`` (one pipeline stage only)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [len(s) for s in samples]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    (model,) = chunks
    model.eval()
    with torch.no_grad():
        out = model(torch.cat(samples).unsqueeze(0), positions, None,
                    packed_seq_params=params, runtime_gather_output=True)
    return out[0, :, :vocab].float()  # [1, tokens, padded vocab] -> [tokens, vocab]


def run_cases(cases, tokens, samples, backend="auto"):
    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model

    out = {}
    for case in cases:
        hf = HFModel.open(case["hf_dir"], attention_backend=backend)
        layout = Layout(**case["layout"])
        chunks = build_chunks(hf.run_config(layout, seq_length=SEQ))
        load_hf_into_model(chunks, hf.hf_dir, hf.weight_map(hf.padded_vocab(layout.tp)))
        result = {"logits": megatron_logits(chunks, tokens, hf.model.vocab_size)}
        if case["packed"]:
            result["packed"] = packed_logits(chunks, samples, hf.model.vocab_size)
        out[case["id"]] = result
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama4")
    return {name: save_tiny_hf_model("llama4", root / name, seed=i, **over)
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
    cases = [{"id": f"{m}-{lay}", "hf_dir": str(hf_dirs[m]), "layout": LAYOUTS[lay],
              "packed": PACKED[m] == lay} for lay in LAYOUTS for m in MODELS]
    per_rank = run_ranks(4, run_cases, cases, tokens, samples, timeout=600)
    return per_rank


def test_transformers_logits_depend_on_chunks_and_temperature(hf_dirs, tokens, references):
    """Without chunking, or without temperature tuning, transformers gives other logits: the
    40-token sequences exercise both."""
    path = hf_dirs["maverick"]
    for change in ({"attention_chunk_size": None}, {"attn_temperature_tuning": False}):
        other = save_tiny_hf_model("llama4", path.parent / "changed", seed=1, **change)
        diff = (hf_logits(other, tokens) - references["maverick"]["logits"]).abs().max()
        assert diff > 100 * TOL, (change, diff)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_equal_transformers(results, references, model, layout):
    case = f"{model}-{layout}"
    got = [r[case]["logits"] for r in results if r[case]["logits"] is not None]
    assert got, "no rank returned logits"
    want = references[model]["logits"]
    for logits in got:  # every last-stage rank
        assert logits.shape == want.shape
        assert (logits - want).abs().max().item() <= TOL


@pytest.mark.parametrize("model", list(PACKED))
def test_packed_samples_equal_transformers_per_sample(results, references, model):
    case = f"{model}-{PACKED[model]}"
    want = references[model]["packed"]
    for rank_results in results:
        got = rank_results[case]["packed"]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL


def test_triton_backend_under_the_interpreter(hf_dirs, tokens, samples, references):
    case = {"id": "maverick", "hf_dir": str(hf_dirs["maverick"]), "layout": {}, "packed": True}
    (out,) = run_ranks(1, run_cases, [case], tokens, samples, backend="triton",
                       env={"TRITON_INTERPRET": "1"}, timeout=600)
    got = out["maverick"]
    assert (got["logits"] - references["maverick"]["logits"]).abs().max().item() <= TOL
    assert (got["packed"] - references["maverick"]["packed"]).abs().max().item() <= TOL
