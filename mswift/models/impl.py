"""Which layer implementation and which core attention a run builds.

Megatron-LM's ``transformer_impl``: ``transformer_engine`` builds megatron-core's Transformer
Engine layer spec (layernorm fused into the next linear layer, TE's GEMMs, FP8), ``local``
megatron-core's own modules (with mswift's norm and varlen attention); ``auto`` is
``transformer_engine`` where TE can run (it imports and a CUDA device exists), else ``local``.

``attention_backend=auto`` is ``te`` (TE's fused attention) when TE can run, the layers are TE's
and the run trains in bf16 / fp16; else ``triton`` with CUDA; else ``torch``. TE's fused and
flash kernels take only 16-bit inputs, and its unfused fallback refuses packed (THD) batches,
so an fp32 run never gets ``te`` from ``auto`` and is refused it by name.

What the machine has comes from :mod:`mswift.runtime.device` (the one module that asks CUDA;
tests fake it), imported only when a decision needs it: the preflight checks import this module
before torch is.
"""
from __future__ import annotations


def _device():
    from mswift.runtime import device  # imports torch

    return device


def resolve_transformer_impl(setting: str, local_only: str | None = None) -> str:
    """``local`` or ``transformer_engine`` for the ``transformer_impl`` setting; ``local_only``:
    a model feature mswift builds on the local spec only (:func:`local_only_feature`)."""
    if setting == "auto":
        te = local_only is None and _device().transformer_engine_available()
        return "transformer_engine" if te else "local"
    return setting


def local_only_feature(model) -> str | None:
    """The setting of ``model`` (a ModelConfig) that mswift supports on the local spec only, or
    None. Multi-latent attention: megatron-core's TE MLA spec fuses the q/kv latent norms into
    the up projections and replicates the down projections, so its torch_dist keys differ from
    the local spec's, which are the ones mswift's bridge writes (checked on megatron-core
    0.16.1; not yet mapped)."""
    if getattr(model, "multi_latent_attention", False):
        return "multi_latent_attention=true"
    return None


def varlen_only_feature(model) -> str | None:
    """The setting of ``model`` (a ModelConfig) that only mswift's varlen attention implements
    (Llama-4's chunked attention and temperature tuning), or None."""
    for name in ("attention_chunk_size", "attn_temperature_floor_scale"):
        value = getattr(model, name, None)
        if value is not None:
            return f"{name}={value}"
    return None


def resolve_attention_backend(setting: str, transformer_impl: str, half_precision: bool,
                              varlen_only: str | None = None,
                              local_only: str | None = None) -> str:
    """``local``, ``torch``, ``triton`` or ``te`` for the ``attention_backend`` setting, on the
    layers ``transformer_impl`` (a setting) builds; ``half_precision``: bf16 or fp16 training;
    ``varlen_only``: a model feature TE's attention lacks (:func:`varlen_only_feature`)."""
    if setting != "auto":
        return setting
    device = _device()
    if (half_precision and varlen_only is None and device.transformer_engine_available()
            and resolve_transformer_impl(transformer_impl, local_only) == "transformer_engine"):
        return "te"
    return "triton" if device.cuda_available() else "torch"


def resolve_kernel_backend(setting: str) -> str:
    """``torch`` or ``triton`` for ``moe_routing_backend`` / ``fused_kernels``: ``auto`` is
    ``triton`` with CUDA (mswift's kernels), else ``torch``."""
    if setting == "auto":
        return "triton" if _device().cuda_available() else "torch"
    return setting


def resolve_grouped_experts(grouped_gemm: bool) -> str | None:
    """Whose grouped expert MLP ``moe_grouped_gemm`` builds: ``te`` (Transformer Engine's
    ``TEGroupedMLP``) where TE can run, else ``mswift`` (:mod:`mswift.models.grouped_experts`);
    None when the setting is off (megatron-core's per-expert ``SequentialMLP``). Both store the
    per-expert layout's torch_dist keys, so the choice never changes what a checkpoint holds."""
    if not grouped_gemm:
        return None
    return "te" if _device().transformer_engine_available() else "mswift"


def te_setting_problems(transformer_impl: str, attention_backend: str, fp8: str | None,
                        half_precision: bool, varlen_only: str | None = None,
                        local_only: str | None = None) -> list[str]:
    """What the settings ask of Transformer Engine that they cannot have, whatever the machine:
    one message per setting, naming it and what it needs."""
    problems = []
    if local_only is not None:
        for name, wants in ((f"transformer_impl={transformer_impl}",
                             transformer_impl == "transformer_engine"),
                            (f"attention_backend={attention_backend}", attention_backend == "te"),
                            (f"fp8={fp8}", fp8 is not None)):
            if wants:
                problems.append(f"{name}: {local_only} is built on megatron-core's local spec "
                                "only (its Transformer Engine spec stores other checkpoint keys); "
                                "use transformer_impl=local or auto")
        return problems
    if attention_backend == "te" and varlen_only is not None:
        problems.append(f"attention_backend=te: {varlen_only} needs mswift's varlen attention "
                        "(attention_backend=auto, torch or triton)")
    if attention_backend == "te" and transformer_impl == "local":
        problems.append("attention_backend=te: needs transformer_impl=transformer_engine (or "
                        "auto); TE's fused attention runs on TE's layer spec")
    if attention_backend == "te" and not half_precision:
        problems.append("attention_backend=te: needs bf16=true or fp16=true (TE's fused "
                        "attention kernels take 16-bit inputs only, and its fp32 fallback "
                        "cannot keep packed samples apart); use attention_backend=auto, triton "
                        "or torch for fp32")
    if fp8 is not None and transformer_impl == "local":
        problems.append(f"fp8={fp8}: needs transformer_impl=transformer_engine (or auto); "
                        "FP8 GEMMs are Transformer Engine's")
    return problems


def te_machine_problems(transformer_impl: str, attention_backend: str,
                        fp8: str | None) -> list[str]:
    """The settings that need Transformer Engine on a machine where it cannot run, each named
    with what is missing (TE not importable, or no CUDA device). Settings that do not ask for
    TE explicitly (``auto``) never need it, so they ask nothing of the machine."""
    asking = [name for name, wants in (
        (f"transformer_impl={transformer_impl}", transformer_impl == "transformer_engine"),
        (f"attention_backend={attention_backend}", attention_backend == "te"),
        (f"fp8={fp8}", fp8 is not None),
    ) if wants]
    if not asking:
        return []
    device = _device()
    if device.transformer_engine_available():
        return []
    missing = ("Transformer Engine is not installed (transformer_engine.pytorch does not "
               "import)" if not device.transformer_engine_importable()
               else "no CUDA device (Transformer Engine runs on NVIDIA GPUs only)")
    return [f"{name}: needs Transformer Engine, but {missing}; use transformer_impl=local / "
            "attention_backend=auto / fp8=null, or install transformer-engine[pytorch] on a "
            "GPU machine" for name in asking]


def triton_machine_problems(settings: dict[str, str]) -> list[str]:
    """The ``name -> value`` settings that ask for ``triton`` (``attention_backend``,
    ``moe_routing_backend``, ``fused_kernels``) on a machine where mswift's Triton kernels
    cannot run: no CUDA device and no Triton interpreter (``TRITON_INTERPRET=1``). The kernels
    would refuse only at the first forward, after the ranks started. ``auto`` asks nothing."""
    asking = [name for name, value in settings.items() if value == "triton"]
    if not asking or _device().cuda_available():
        return []
    from mswift.kernels.attention.env import interpreter_enabled  # imports triton

    if interpreter_enabled():
        return []
    return [f"{name}=triton: mswift's Triton kernels need a CUDA device, and this machine has "
            "none (on CPU they run only under TRITON_INTERPRET=1, set before the run starts); "
            f"use {name}=auto or torch" for name in asking]


def layer_choice(model, training) -> tuple[str, str]:
    """``(transformer_impl, attention_backend)`` of a run (ModelConfig, TrainingConfig), both
    resolved; a ConfigError naming each setting that needs what it cannot have here."""
    from mswift.config.schema import ConfigError

    half, varlen_only = training.bf16 or training.fp16, varlen_only_feature(model)
    local_only = local_only_feature(model)
    problems = te_setting_problems(model.transformer_impl, model.attention_backend,
                                   training.fp8, half, varlen_only, local_only)
    problems += te_machine_problems(model.transformer_impl, model.attention_backend,
                                    training.fp8)
    if problems:
        raise ConfigError(problems)
    return (resolve_transformer_impl(model.transformer_impl, local_only),
            resolve_attention_backend(model.attention_backend, model.transformer_impl, half,
                                      varlen_only, local_only))
