"""Activation recompute changes what is kept for backward, never the numbers: two packed SFT
steps with full recompute (uniform, one layer per checkpoint) and with selective recompute give
the losses and the step-1 gradients of the run without recompute (fp32), at TP1, TP2 with
sequence parallelism, and PP2. Full and MoE-layer recompute came out bit for bit equal when
this was written; recomputing the norms (``layernorm``: megatron-core differentiates the norm
in an autograd call of its own) moves gradients by rounding, a few parts in 1e7.

The model is a tiny Llama-4 from its HF config (dense layers 0 and 2, MoE layers 1 and 3 with a
shared expert, a NoPE layer with query temperature tuning, chunked attention of 8 on the RoPE
layers: mswift's VarlenCoreAttention and Norm inside every recomputed part) with a vocabulary of
300. Forward hooks count how often each recomputable module runs, so a recompute setting that
never reached megatron-core (everything run once) fails the test instead of passing it.
"""
from collections import Counter
from pathlib import Path

import pytest

from mswift.testing import run_ranks
from test_layouts import CORPUS, SFT, VOCAB, write_short_chats

pytestmark = pytest.mark.slow  # recompute settings trained at three layouts

STEPS = ["train_iters=2", "global_batch_size=2", "seq_length=64", "log_interval=2"]
FULL = ["recompute_granularity=full", "recompute_method=uniform", "recompute_num_layers=1"]
SELECTIVE = ["recompute_granularity=selective",
             "recompute_modules=[core_attn,mlp,shared_experts,layernorm]"]
MOE = ["recompute_granularity=selective", "recompute_modules=[moe]"]
RUNS = {"none": [], "full": FULL, "selective": SELECTIVE, "moe": MOE}
# name: (world size, layout overrides, runs besides "none"): full recompute's groups of layers
# per pipeline stage at PP2; the selective parts on sequence-parallel shards and MoE's dispatch
# over TP ranks at TP2.
LAYOUTS = {"tp1": (1, [], ["full", "selective", "moe"]),
           "tp2-sp": (2, ["tensor_model_parallel_size=2", "sequence_parallel=true"],
                      ["selective", "moe"]),
           "pp2": (2, ["pipeline_model_parallel_size=2"], ["full"])}
CASES = [(layout, run) for layout, (_, _, runs) in LAYOUTS.items() for run in runs]
# Which module runs twice per micro-batch under each setting (the rest run once).
RECOMPUTED = {"none": set(), "full": {"layer", "core_attn", "layernorm", "mlp", "moe",
                                     "shared_experts"},
              "selective": {"core_attn", "layernorm", "mlp", "shared_experts"},
              "moe": {"moe", "shared_experts"}}


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory):
    from mswift.testing.hf_models import save_tiny_hf_model
    from mswift.testing.tokenizers import train_chatml_tokenizer

    root = tmp_path_factory.mktemp("recompute")
    model = save_tiny_hf_model("llama4", root / "llama4", vocab_size=VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    train_chatml_tokenizer(Path(CORPUS), model, vocab_size=VOCAB)
    return str(model), str(write_short_chats(root / "chat.jsonl"))


def module_kind(name: str, module) -> str | None:
    """The recomputable part a module of a GPTModel chunk is, by megatron-core's names. MoE
    recompute checkpoints inside MoELayer's forward, so its routed experts are what runs twice;
    an MoE layer's ``.mlp`` is no dense MLP."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if isinstance(module, TransformerLayer):
        return "layer"
    if isinstance(module, MoELayer):
        return None
    for suffix, kind in ((".self_attention.core_attention", "core_attn"),
                         (".input_layernorm", "layernorm"), (".pre_mlp_layernorm", "layernorm"),
                         (".mlp.experts", "moe"), (".mlp.shared_experts", "shared_experts"),
                         (".mlp", "mlp")):
        if name.endswith(suffix):
            return kind
    return None


def train_with_recompute(model: str, data: str, layout: list[str], runs: list[str]) -> dict:
    """Rank body: without recompute, then each of ``runs`` in turn; its losses, this rank's gradients of step 1 (reduced,
    as the optimizer gets them) by parameter name, and how often each kind of module ran."""
    from mswift.config import load_config
    from mswift.train.loop import run_training, setup

    results = {}
    for run in ["none"] + runs:
        cfg = load_config(None, [f"hf_model={model}", f"dataset=[{data}]"] + SFT + STEPS
                          + layout + RUNS[run])
        state = setup(cfg)
        calls = Counter()
        for ddp in state.model:
            for name, module in ddp.module.named_modules():
                kind = module_kind(name, module)
                if kind is not None:
                    module.register_forward_hook(
                        lambda *_, key=(kind, name): calls.update([key]))
        grads = {}
        optimizer_step = state.optimizer.step

        def step_keeping_first_grads():
            if not grads:  # step 1: before the update changes what later steps see
                grads.update({name: p.main_grad.detach().clone() for ddp in state.model
                              for name, p in ddp.module.named_parameters()})
            return optimizer_step()

        state.optimizer.step = step_keeping_first_grads
        losses = [row["loss"] for row in run_training(cfg, state)]
        results[run] = {"losses": losses, "grads": grads, "calls": calls}
    return results


def train_layouts(model: str, data: str, layouts: list[tuple[list[str], list[str]]]) -> list:
    """Rank body: :func:`train_with_recompute` for each (layout, runs) in turn."""
    return [train_with_recompute(model, data, layout, runs) for layout, runs in layouts]


@pytest.fixture(scope="module")
def runs(llama4_dir):
    """Per layout, every rank's results; the layouts of one world size share one spawn."""
    out = {}
    for world in sorted({world for world, _, _ in LAYOUTS.values()}):
        names = [name for name, (w, _, _) in LAYOUTS.items() if w == world]
        per_rank = run_ranks(world, train_layouts, *llama4_dir,
                             [LAYOUTS[name][1:] for name in names], timeout=900)
        out.update({name: [rank[i] for rank in per_rank] for i, name in enumerate(names)})
    return out


@pytest.mark.parametrize("layout,run", CASES)
def test_recompute_gives_the_same_losses_and_gradients(runs, layout, run):
    for rank, result in enumerate(runs[layout]):
        want, got = result["none"], result[run]
        assert len(got["losses"]) == 2
        for step, (g, w) in enumerate(zip(got["losses"], want["losses"]), start=1):
            assert abs(g - w) <= 1e-6 * abs(w), f"{layout} rank {rank} step {step}: {g} vs {w}"
        assert got["grads"].keys() == want["grads"].keys()
        assert any(grad.abs().max() > 0 for grad in want["grads"].values())
        for name, grad in want["grads"].items():
            diff = (got["grads"][name] - grad).abs().max().item()
            assert diff <= 2e-6 * grad.abs().max().item(), \
                f"{layout} rank {rank} {run}: {name} off by {diff}"
        # Every module ran once per micro-batch without recompute; the recomputed ones twice.
        for key, n in got["calls"].items():
            once = want["calls"][key]
            assert once > 0 and n == (2 * once if key[0] in RECOMPUTED[run] else once), \
                f"{layout} rank {rank} {run}: {key} ran {n} times, {once} without recompute"
