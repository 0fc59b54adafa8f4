"""Checks of a parallel layout against the model and world size, before any process exists.

:func:`layout_problems` runs before any process group or model exists, so a bad layout fails
in a second with one message per mistake instead of hanging or crashing inside megatron-core.
Plain config logic: importing this module imports neither torch nor megatron-core (the
conversion tools check layouts with it without paying for those imports).
"""
from __future__ import annotations

from mswift.config.schema import ConfigError, MswiftConfig


def layout_problems(cfg: MswiftConfig, world_size: int) -> list[str]:
    """Every way the parallel layout in ``cfg`` does not fit ``world_size`` ranks and the model."""
    par = cfg.parallel
    tp, pp, cp, ep = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                      par.context_parallel_size, par.expert_model_parallel_size)
    etp = par.expert_tensor_parallel_size or tp
    problems = []
    if world_size % (tp * pp * cp):
        problems.append(
            f"world size {world_size}: not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}) = {tp * pp * cp}"
        )
    if world_size % (etp * ep * pp):
        problems.append(
            f"world size {world_size}: not divisible by expert_tensor_parallel_size ({etp}) x "
            f"expert_model_parallel_size ({ep}) x pipeline_model_parallel_size ({pp}) = "
            f"{etp * ep * pp}"
        )
    # With hf_model, the model section must already be filled from its config.json
    # (mswift.models.registry.apply_hf_model), as the training driver does first.
    problems += model_fit_problems(cfg)
    if not problems:
        problems += batch_problems(cfg, world_size)
    return problems


def batch_problems(cfg: MswiftConfig, world_size: int) -> list[str]:
    mbs, gbs = cfg.training.micro_batch_size, cfg.training.global_batch_size
    dp = data_parallel_size(cfg, world_size)
    if gbs is not None and gbs % (mbs * dp):
        return [f"global_batch_size={gbs}: must be a multiple of micro_batch_size ({mbs}) x "
                f"data-parallel size ({dp}) = {mbs * dp}"]
    return []


def model_fit_problems(cfg: MswiftConfig) -> list[str]:
    """Problems between the layout and the model's shape (heads, groups, experts, layers)."""
    par, model = cfg.parallel, cfg.model
    tp, pp, ep = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.expert_model_parallel_size)
    vpp = par.virtual_pipeline_model_parallel_size or 1
    problems = []
    if model.num_attention_heads % tp:
        problems.append(
            f"tensor_model_parallel_size={tp}: must divide num_attention_heads="
            f"{model.num_attention_heads}"
        )
    groups = model.num_query_groups or model.num_attention_heads
    if groups % tp:
        problems.append(f"tensor_model_parallel_size={tp}: must divide num_query_groups={groups}")
    problems += pipeline_split_problems(model.num_layers, pp, vpp,
                                        par.decoder_first_pipeline_num_layers,
                                        par.decoder_last_pipeline_num_layers)
    if model.num_experts is None:
        if ep > 1:
            problems.append(f"expert_model_parallel_size={ep}: needs an MoE model (num_experts)")
    else:
        if model.num_experts % ep:
            problems.append(
                f"expert_model_parallel_size={ep}: must divide num_experts={model.num_experts}"
            )
        if tp > 1 and not par.sequence_parallel:
            problems.append(
                f"sequence_parallel=false: MoE with tensor_model_parallel_size={tp} needs "
                "sequence_parallel=true (megatron-core refuses to train it otherwise)"
            )
    if par.sequence_parallel and cfg.data.seq_length % tp:
        problems.append(
            f"seq_length={cfg.data.seq_length}: must be divisible by "
            f"tensor_model_parallel_size={tp} with sequence_parallel"
        )
    if not model.num_layers % (pp * vpp):
        problems += recompute_fit_problems(cfg, model.num_layers // (pp * vpp))
    return problems


def recompute_fit_problems(cfg: MswiftConfig, stage_layers: int) -> list[str]:
    """Recompute settings against the model and its ``stage_layers`` layers per (virtual)
    pipeline stage: megatron-core would fail inside the first forward (uniform groups that do
    not divide a stage) or silently recompute nothing (a module the model lacks)."""
    tr, model = cfg.training, cfg.model
    n = tr.recompute_num_layers
    problems = []
    if tr.recompute_granularity == "full" and n is not None and n > 0:
        if tr.recompute_method == "uniform" and stage_layers % n:
            problems.append(f"recompute_num_layers={n}: recompute_method=uniform needs it to "
                            f"divide the {stage_layers} layers of each pipeline stage")
        if tr.recompute_method == "block" and n > stage_layers:
            problems.append(f"recompute_num_layers={n}: recompute_method=block recomputes at "
                            f"most the {stage_layers} layers of each pipeline stage")
    if tr.recompute_granularity == "selective":
        modules = tr.recompute_modules or []
        moe = model.moe_layer_freq or ([1] * model.num_layers if model.num_experts else [])
        lacking = {"moe": (model.num_experts is None, "MoE layers"),
                   "shared_experts": (model.moe_shared_expert_intermediate_size is None,
                                      "shared experts"),
                   "mlp": (len(moe) == model.num_layers and all(moe), "dense MLP layers"),
                   "mla_up_proj": (not model.multi_latent_attention,
                                   "multi-latent attention")}
        for module in modules:
            absent, what = lacking.get(module, (False, ""))
            if absent:
                problems.append(f"recompute_modules: {module}: the model has no {what} to "
                                "recompute")
    return problems


def pipeline_split_problems(num_layers: int, pp: int, vpp: int, first: int | None,
                            last: int | None) -> list[str]:
    """How ``num_layers`` layers do not split over ``pp`` stages of ``vpp`` virtual stages,
    the first / last stage holding ``first`` / ``last`` layers when set (megatron-core's
    uneven split: the rest evenly over the stages between, each stage's layers evenly over
    its virtual stages)."""
    vp = " x virtual_pipeline_model_parallel_size" if vpp > 1 else ""
    if first is None and last is None:
        if num_layers % (pp * vpp):
            return [f"pipeline_model_parallel_size{vp}={pp * vpp}: must divide "
                    f"num_layers={num_layers}"]
        return []
    problems = []
    given = {"decoder_first_pipeline_num_layers": first, "decoder_last_pipeline_num_layers": last}
    for name, value in given.items():
        if value is not None and vpp > 1 and value % vpp:
            problems.append(f"{name}={value}: must be divisible by "
                            f"virtual_pipeline_model_parallel_size={vpp}")
    middle = pp - sum(value is not None for value in given.values())
    rest = num_layers - (first or 0) - (last or 0)
    split = ", ".join(f"{name}={value}" for name, value in given.items() if value is not None)
    if middle == 0 and rest:
        problems.append(f"{split}: must add up to num_layers={num_layers} (no pipeline stage "
                        "lies between the first and the last)")
    elif middle and (rest < 0 or rest % (middle * vpp)):
        problems.append(f"{split}: the other {rest} of num_layers={num_layers} layers must "
                        f"split evenly over the {middle} other pipeline stage(s)"
                        + (f" x {vpp} virtual stages" if vpp > 1 else ""))
    return problems


def data_parallel_size(cfg: MswiftConfig, world_size: int) -> int:
    par = cfg.parallel
    return world_size // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
                          * par.context_parallel_size)


def check_layout(cfg: MswiftConfig, world_size: int) -> None:
    problems = layout_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
