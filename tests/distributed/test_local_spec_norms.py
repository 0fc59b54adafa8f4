"""The local spec's norms are mswift's whether or not apex is installed.

megatron-core's local spec takes its norm class from a module attribute, ``LNImpl``: apex's
``FusedLayerNorm`` when apex imports (the NGC image), else ``WrappedTorchNorm``. FusedLayerNorm
refuses RMSNorm (and needs apex's CUDA kernels), so megatron-core's own choice cannot build any
supported family there. Here apex is simulated the way megatron-core would see it -- ``LNImpl``
set to FusedLayerNorm in both modules that read it -- and a real model is built on the CPU: its
spec holds no FusedLayerNorm and its logits are transformers' (fp32, 1e-4) and bit-identical to
the build without apex.
"""
from mswift.testing import run_ranks
from mswift.testing.hf_models import hf_logits, save_tiny_hf_model


def _classes(spec) -> set:
    """Every class named anywhere in a spec tree."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, type):
        return {spec}
    if isinstance(spec, ModuleSpec):
        return _classes(spec.module) | _classes(spec.submodules)
    if isinstance(spec, (list, tuple)):
        return set().union(*map(_classes, spec)) if spec else set()
    if dataclasses.is_dataclass(spec):
        return set().union(set(), *(_classes(getattr(spec, f.name))
                                    for f in dataclasses.fields(spec)))
    return set()


def build_with_and_without_apex(hf_dir, tokens):
    import megatron.core.models.backends as backends
    import megatron.core.models.gpt.gpt_layer_specs as gpt_layer_specs
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    from mswift.bridge.forward import megatron_logits
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model
    from mswift.models.build import build_model, transformer_config
    from mswift.models.norm import Norm
    from mswift.models.spec import gpt_block_spec

    hf = HFModel.open(hf_dir)
    cfg = hf.run_config(Layout(), seq_length=tokens.shape[1])
    wmap = hf.weight_map(hf.padded_vocab(1))
    chunks = build_chunks(cfg)
    load_hf_into_model(chunks, hf.hf_dir, wmap)
    without = megatron_logits(chunks, tokens, hf.model.vocab_size)

    gpt_layer_specs.LNImpl = backends.LNImpl = FusedLayerNorm  # what `import apex` gives
    config = transformer_config(cfg)
    raw = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                     normalization=config.normalization)
    ours = gpt_block_spec(config, transformer_impl="local")
    apex_chunks = build_model(cfg)
    load_hf_into_model(apex_chunks, hf.hf_dir, wmap)
    with_apex = megatron_logits(apex_chunks, tokens, hf.model.vocab_size)
    return {"raw_has_apex": FusedLayerNorm in _classes(raw),
            "ours_has_apex": FusedLayerNorm in _classes(ours),
            "final_norm": ours.layer_norm is Norm,
            "without": without, "with_apex": with_apex}


def test_apex_never_builds_the_norms(tmp_path):
    import torch

    hf_dir = save_tiny_hf_model("llama", tmp_path / "llama")
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))
    out = run_ranks(1, build_with_and_without_apex, str(hf_dir), tokens)[0]
    assert out["raw_has_apex"], "the simulation must make megatron-core pick apex's norm"
    assert not out["ours_has_apex"] and out["final_norm"]
    assert torch.equal(out["with_apex"], out["without"])
    assert float((out["with_apex"] - hf_logits(hf_dir, tokens)).abs().max()) <= 1e-4
