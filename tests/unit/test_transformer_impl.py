"""Which layers and which core attention a run builds (mswift.models.impl), and the settings
that need Transformer Engine refused by name.

The decisions are tested with CUDA / Transformer Engine availability faked (there is no GPU
here); the refusals on this machine are real (TE is not installed here).
"""
import dataclasses

import pytest

from mswift.config import load_config
from mswift.config.schema import ConfigError
from mswift.models.impl import (
    resolve_attention_backend,
    resolve_transformer_impl,
    te_machine_problems,
    te_setting_problems,
    triton_machine_problems,
)
from mswift.runtime import device


def fake_machine(monkeypatch, cuda: bool, te: bool):
    monkeypatch.setattr(device, "cuda_available", lambda: cuda)
    monkeypatch.setattr(device, "transformer_engine_importable", lambda: te)


@pytest.mark.parametrize("cuda, te, want", [
    (True, True, "transformer_engine"), (True, False, "local"),
    (False, True, "local"),  # TE imports but has no GPU to run on
    (False, False, "local"),
])
def test_auto_transformer_impl(monkeypatch, cuda, te, want):
    fake_machine(monkeypatch, cuda, te)
    assert resolve_transformer_impl("auto") == want
    assert resolve_transformer_impl("local") == "local"
    assert resolve_transformer_impl("transformer_engine") == "transformer_engine"


@pytest.mark.parametrize("cuda, te, impl, half, want", [
    (True, True, "auto", True, "te"),
    (True, True, "transformer_engine", True, "te"),
    (True, True, "local", True, "triton"),  # TE present, local layers asked for
    (True, True, "auto", False, "triton"),  # fp32: TE's fused attention is 16-bit only
    (True, False, "auto", True, "triton"),
    (False, True, "auto", True, "torch"),
    (False, False, "auto", False, "torch"),
])
def test_auto_attention_backend(monkeypatch, cuda, te, impl, half, want):
    fake_machine(monkeypatch, cuda, te)
    assert resolve_attention_backend("auto", impl, half) == want


@pytest.mark.parametrize("setting", ["local", "torch", "triton", "te"])
def test_explicit_attention_backend_is_kept(monkeypatch, setting):
    fake_machine(monkeypatch, False, False)
    assert resolve_attention_backend(setting, "auto", True) == setting


def test_settings_that_contradict_each_other():
    assert te_setting_problems("auto", "auto", None, False) == []
    assert te_setting_problems("transformer_engine", "te", "hybrid", True) == []
    problems = te_setting_problems("local", "te", "e4m3", False)
    assert len(problems) == 3
    assert problems[0].startswith("attention_backend=te: needs transformer_impl=transformer_engine")
    assert problems[1].startswith("attention_backend=te: needs bf16=true or fp16=true")
    assert problems[2].startswith("fp8=e4m3: needs transformer_impl=transformer_engine")


def test_machine_without_te_is_named(monkeypatch):
    fake_machine(monkeypatch, True, False)
    problems = te_machine_problems("transformer_engine", "te", "hybrid")
    assert [p.split(":")[0] for p in problems] == [
        "transformer_impl=transformer_engine", "attention_backend=te", "fp8=hybrid"]
    assert all("Transformer Engine is not installed" in p for p in problems)
    fake_machine(monkeypatch, False, True)
    assert "no CUDA device" in te_machine_problems("transformer_engine", "auto", None)[0]
    fake_machine(monkeypatch, True, True)
    assert te_machine_problems("transformer_engine", "te", "hybrid") == []


def test_auto_settings_ask_nothing_of_the_machine(monkeypatch):
    def never():
        raise AssertionError("auto settings must not need Transformer Engine")

    monkeypatch.setattr(device, "cuda_available", never)
    monkeypatch.setattr(device, "transformer_engine_importable", never)
    assert te_machine_problems("auto", "auto", None) == []
    assert te_machine_problems("local", "triton", None) == []


def test_triton_settings_need_cuda_or_the_interpreter(monkeypatch):
    settings = {"attention_backend": "triton", "moe_routing_backend": "auto",
                "fused_kernels": "triton"}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fake_machine(monkeypatch, True, False)
    assert triton_machine_problems(settings) == []
    fake_machine(monkeypatch, False, False)
    assert [p.split(":")[0] for p in triton_machine_problems(settings)] == [
        "attention_backend=triton", "fused_kernels=triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_machine_problems(settings) == []


# -- real refusals on this machine (no Transformer Engine, no GPU) ----------------------------


def test_preflight_refuses_te_settings_here(tmp_path):
    from mswift.train.preflight import check_config

    data = tmp_path / "corpus.txt"
    data.write_text("hello world\n")
    cfg = load_config(None, [f"dataset=[{data}]", "tokenizer=byte", "bf16=true",
                             "transformer_impl=transformer_engine", "fp8=hybrid"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == ["transformer_impl=transformer_engine",
                                                    "fp8=hybrid"]
    assert all("needs Transformer Engine, but " in p for p in problems)


def test_fp8_needs_16_bit_training():
    with pytest.raises(ConfigError, match=r"fp8=e4m3: needs bf16=true or fp16=true"):
        load_config(None, ["fp8=e4m3"])
    cfg = load_config(None, ["fp8=hybrid", "fp8_recipe=blockwise", "bf16=true"])
    assert (cfg.training.fp8, cfg.training.fp8_recipe) == ("hybrid", "blockwise")
    assert load_config(None, []).training.fp8 is None


def test_block_spec_refuses_transformer_engine_here():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mswift.models.spec import gpt_block_spec

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               use_cpu_initialization=True)
    with pytest.raises(ConfigError, match=r"transformer_impl=transformer_engine: needs "
                                          r"Transformer Engine, but "):
        gpt_block_spec(config, transformer_impl="transformer_engine")


def test_llama4_features_keep_mswift_attention(monkeypatch):
    from types import SimpleNamespace

    from mswift.models.impl import varlen_only_feature

    fake_machine(monkeypatch, True, True)
    chunked = SimpleNamespace(attention_chunk_size=8, attn_temperature_floor_scale=None)
    feature = varlen_only_feature(chunked)
    assert feature == "attention_chunk_size=8"
    assert resolve_attention_backend("auto", "auto", True, feature) == "triton"
    assert te_setting_problems("auto", "te", None, True, feature) == [
        "attention_backend=te: attention_chunk_size=8 needs mswift's varlen attention "
        "(attention_backend=auto, torch or triton)"]


def test_mla_models_stay_on_the_local_spec(monkeypatch):
    """DeepSeek-V3 (MLA): megatron-core's TE MLA spec stores other torch_dist keys than the
    local spec mswift's bridge writes, so auto never picks TE for it, even where TE runs, and
    asking for TE explicitly is refused by name."""
    from mswift.models.impl import layer_choice, local_only_feature
    from mswift.models.registry import model_config_from_hf
    from mswift.testing.hf_models import tiny_hf_config

    fake_machine(monkeypatch, True, True)
    mla = model_config_from_hf(tiny_hf_config("deepseek_v3").to_dict())[1]
    assert local_only_feature(mla) == "multi_latent_attention=true"
    training = load_config(None, ["bf16=true"]).training
    assert layer_choice(mla, training) == ("local", "triton")
    dense = load_config(None, ["bf16=true"]).model
    assert local_only_feature(dense) is None
    assert layer_choice(dense, training) == ("transformer_engine", "te")
    asked = load_config(None, ["bf16=true", "transformer_impl=transformer_engine", "fp8=hybrid"])
    with pytest.raises(ConfigError) as err:
        layer_choice(dataclasses.replace(mla, transformer_impl="transformer_engine"),
                     asked.training)
    assert err.value.problems == [
        f"{name}: multi_latent_attention=true is built on megatron-core's local spec only (its "
        "Transformer Engine spec stores other checkpoint keys); use transformer_impl=local or auto"
        for name in ("transformer_impl=transformer_engine", "fp8=hybrid")]


@pytest.mark.parametrize("cuda, te, want", [
    (True, True, "te"), (True, False, "mswift"),
    (False, True, "mswift"),  # TE imports but has no GPU to run on
    (False, False, "mswift"),
])
def test_grouped_experts_are_te_where_it_runs(monkeypatch, cuda, te, want):
    from mswift.models.impl import resolve_grouped_experts

    fake_machine(monkeypatch, cuda, te)
    assert resolve_grouped_experts(True) == want
    assert resolve_grouped_experts(False) is None


def test_grouped_experts_replace_megatron_cores_legacy_grouped_mlp():
    """Here (no TE) moe_grouped_gemm gives mswift's grouped MLP in place of megatron-core's
    legacy GroupedMLP, which its local spec picks (it needs the grouped_gemm package and stores
    other keys); dense layers and per-expert SequentialMLPs stay."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from mswift.models.grouped_experts import (
        ColumnGroupedLinear,
        RowGroupedLinear,
        grouped_experts_spec,
        with_grouped_experts,
    )

    layers = [get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=True),
              get_gpt_layer_local_spec(),
              get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)]
    assert layers[0].submodules.mlp.submodules.experts.module is GroupedMLP
    block = TransformerBlockSubmodules(layer_specs=layers)
    got = with_grouped_experts(block, grouped_experts_spec()).layer_specs
    experts = got[0].submodules.mlp.submodules.experts
    assert experts.module is TEGroupedMLP
    assert (experts.submodules.linear_fc1, experts.submodules.linear_fc2) == (
        ColumnGroupedLinear, RowGroupedLinear)
    assert got[1] == layers[1]
    assert got[2].submodules.mlp.submodules.experts.module is SequentialMLP
