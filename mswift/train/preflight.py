"""Every check of a training run that needs no process group, run before one exists.

``mswift train`` and ``launch/pretrain_sft.py`` call :func:`check_before_start` right after
reading the settings, so a wrong path, tokenizer or layout is reported in a second, once, instead
of after the ranks have imported megatron-core and started their process groups. Plain config
and file logic: importing this module imports neither torch nor megatron-core.

To add a check, write ``def my_problems(cfg: MswiftConfig) -> list[str]`` (``cfg`` has its model
section filled from ``hf_model``; one message per mistake, naming the setting and what was
expected) and append it to :data:`CHECKS`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mswift.config.schema import ConfigError, MswiftConfig
from mswift.models.errors import ModelError
from mswift.runtime.layout_checks import layout_problems
from mswift.train.save_dir import save_dir_problems

BYTE_VOCAB_SIZE = 256  # mswift.data.byte_corpus's vocabulary (a byte is a token)
# Files one of which a Hugging Face tokenizer folder has (AutoTokenizer reads them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_path(cfg: MswiftConfig) -> str:
    """The tokenizer setting resolved: a folder, or "byte"."""
    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    return cfg.model.hf_model or "byte"


def dataset_problems(cfg: MswiftConfig) -> list[str]:
    problems = []
    if not cfg.data.dataset and not cfg.data.data_path:  # data_path: indexed_data_problems
        problems.append("dataset: expected at least one file or folder to train on (or "
                        "data_path: indexed PREFIX.bin/.idx files)")
    for name in ("dataset", "eval_dataset"):
        for path in getattr(cfg.data, name):
            if not Path(path).exists():
                problems.append(f"{name}: {path} not found")
    return problems


def tokenizer_problems(cfg: MswiftConfig) -> list[str]:
    tok = tokenizer_path(cfg)
    if tok == "byte":
        if cfg.model.vocab_size < BYTE_VOCAB_SIZE:
            return [f"vocab_size={cfg.model.vocab_size}: tokenizer=byte needs at least "
                    f"{BYTE_VOCAB_SIZE}"]
        return []
    where = "tokenizer" if cfg.data.tokenizer is not None else "tokenizer (from hf_model)"
    folder = Path(tok)
    if not folder.is_dir():
        return [f"{where}={tok}: not found (expected a Hugging Face tokenizer folder or 'byte')"]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return [f"{where}={tok}: no tokenizer files in this folder (expected one of "
                f"{', '.join(TOKENIZER_FILES)}); set tokenizer=FOLDER or tokenizer=byte"]
    return []


def attention_backend_problems(cfg: MswiftConfig) -> list[str]:
    """Packed batches (the tokenized data pipeline with ``packing=true``) carry ``cu_seqlens``
    and need a varlen backend; megatron-core's DotProductAttention (``local``) takes only padded
    rows with a causal mask. The byte corpus has no samples to pack."""
    if cfg.model.attention_backend != "local":
        return []
    if cfg.data.data_path:  # documents packed into rows: cu_seqlens only with reset_attention_mask
        return (["attention_backend=local with reset_attention_mask=true: megatron-core's "
                 "DotProductAttention cannot keep attention inside each document (cu_seqlens); "
                 "use attention_backend=auto, torch, triton or te, or reset_attention_mask=false"]
                if cfg.data.reset_attention_mask else [])
    if not cfg.data.packing or tokenizer_path(cfg) == "byte":
        return []
    return ["attention_backend=local with packing=true: megatron-core's DotProductAttention "
            "cannot keep attention inside packed samples (cu_seqlens); use attention_backend="
            "auto, torch or triton (mswift's varlen attention), or packing=false (one padded "
            "sample per row)"]


def transformer_engine_problems(cfg: MswiftConfig) -> list[str]:
    """Settings that need Transformer Engine: refused when they contradict each other, or when
    TE cannot run on this machine (torch is imported only for a setting that asks for TE)."""
    from mswift.models.impl import (  # no torch
        local_only_feature,
        te_machine_problems,
        te_setting_problems,
        varlen_only_feature,
    )

    m, t = cfg.model, cfg.training
    problems = te_setting_problems(m.transformer_impl, m.attention_backend, t.fp8,
                                   t.bf16 or t.fp16, varlen_only_feature(m),
                                   local_only_feature(m))
    return problems + te_machine_problems(m.transformer_impl, m.attention_backend, t.fp8)


def triton_problems(cfg: MswiftConfig) -> list[str]:
    """Settings that ask for mswift's Triton kernels where they cannot run (torch and triton
    are imported only for such a setting)."""
    from mswift.models.impl import triton_machine_problems  # no torch

    m = cfg.model
    return triton_machine_problems({"attention_backend": m.attention_backend,
                                    "moe_routing_backend": m.moe_routing_backend,
                                    "fused_kernels": m.fused_kernels})


def seq_aux_loss_problems(cfg: MswiftConfig) -> list[str]:
    """The sequence-wise loss's router learns the packed samples' bounds at each layer's
    forward; a recomputed MoE layer alone (selective ``moe``) under pipelining would run a
    micro-batch's backward with a later micro-batch's bounds."""
    m, tr = cfg.model, cfg.training
    pp = cfg.parallel.pipeline_model_parallel_size
    if (m.moe_router_load_balancing_type == "seq_aux_loss" and m.moe_aux_loss_coeff > 0
            and pp > 1 and tr.recompute_granularity == "selective"
            and "moe" in (tr.recompute_modules or [])):
        return [f"recompute_modules=[..., moe]: not with moe_router_load_balancing_type="
                f"seq_aux_loss and pipeline_model_parallel_size={pp} (the recomputed router "
                "would count another micro-batch's samples); recompute full layers or leave "
                "moe out"]
    return []


def indexed_data_problems(cfg: MswiftConfig) -> list[str]:
    """data_path's files, mode, tokenizer and split (mswift.train.indexed_data's check)."""
    from mswift.config.data_path import indexed_data_problems as problems  # no torch

    return problems(cfg)


def checkpoint_problems(cfg: MswiftConfig) -> list[str]:
    ckpt, problems = cfg.checkpoint, []
    if ckpt.save_hf and cfg.model.hf_model is None:
        problems.append("save_hf=true: needs hf_model (its config and tokenizer files)")
    elif ckpt.save_hf and Path(cfg.model.hf_model).is_dir():
        from mswift.bridge.hf_io import aux_files  # no torch

        try:  # the files the export copies: found wrong now, not after training
            aux_files(cfg.model.hf_model)
        except ModelError as err:
            problems += [f"save_hf=true: {problem}" for problem in err.problems]
    # load = save is the resume-if-there-is-one pattern (a first run finds nothing there yet);
    # any other missing load folder is a typo that would silently start from scratch.
    if ckpt.load and ckpt.load != ckpt.save and not Path(ckpt.load).exists():
        problems.append(f"load={ckpt.load}: not found (expected a checkpoint folder)")
    return problems


# Checks of a config whose model section is filled from hf_model; add yours here.
CHECKS: list[Callable[[MswiftConfig], list[str]]] = [
    dataset_problems,
    tokenizer_problems,
    attention_backend_problems,
    transformer_engine_problems,
    triton_problems,
    seq_aux_loss_problems,
    indexed_data_problems,
    checkpoint_problems,
    save_dir_problems,
]


def check_config(cfg: MswiftConfig) -> None:
    """ConfigError listing what :data:`CHECKS` find in ``cfg`` (its model section filled)."""
    problems = [problem for check in CHECKS for problem in check(cfg)]
    if problems:
        raise ConfigError(problems)


def filled_from_hf_model(cfg: MswiftConfig) -> tuple[MswiftConfig | None, list[str]]:
    """``cfg`` with the model section read from ``hf_model``'s config.json, or the problems."""
    from mswift.models.registry import apply_hf_model  # reads JSON only; no torch

    hf_model = cfg.model.hf_model
    if hf_model is not None and not (Path(hf_model) / "config.json").is_file():
        what = "not found" if not Path(hf_model).exists() else "no config.json in this folder"
        return None, [f"hf_model={hf_model}: {what} (expected a Hugging Face model folder)"]
    try:
        return apply_hf_model(cfg), []
    except ModelError as err:
        return None, [f"hf_model={hf_model}: {problem}" for problem in err.problems]
    except ConfigError as err:
        return None, err.problems


def run_problems(cfg: MswiftConfig, world_size: int) -> tuple[MswiftConfig, list[str]]:
    """Every problem of the run: settings x files x layout; ``cfg`` filled from hf_model."""
    filled, problems = filled_from_hf_model(cfg)
    checked = filled or cfg
    for check in CHECKS:
        problems += check(checked)
    if filled is not None:  # the layout needs the model's real shape
        problems += layout_problems(filled, world_size)
    return checked, problems


def check_before_start(cfg: MswiftConfig, world_size: int) -> MswiftConfig:
    """``cfg`` filled from hf_model; ConfigError listing every problem of the run."""
    checked, problems = run_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return checked
