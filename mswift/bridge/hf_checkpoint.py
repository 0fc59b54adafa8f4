"""Start training from an HF checkpoint and end with one, with no separate conversion step.

The training driver's two calls, for a run whose ``model.hf_model`` names an HF directory
(``mswift.models.registry.apply_hf_model`` fills the model section from its config.json):

    chunks = build_model(cfg)
    load_hf_checkpoint(chunks, cfg)            # each rank reads only its slices
    ...
    save_hf_checkpoint(chunks, cfg, "out/hf")  # gathered to rank 0, streamed to disk

The saved directory has the original's config, generation config and tokenizer files, and each
tensor in the original's dtype (an FP8 original's weights as FP8, each block re-quantized with
its original scale where that is exact, else with a fresh one; an AWQ original's in bfloat16:
:mod:`mswift.bridge.quantized`), with the original's tensors that megatron does not hold (a
vision tower) copied as they are; attention padded for tensor parallelism
(:mod:`mswift.bridge.head_padding`) is given back with its original head counts.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from mswift.bridge.errors import BridgeError
from mswift.bridge.head_padding import unpad_hf_dir_on_rank0
from mswift.bridge.dtypes import torch_dtype
from mswift.bridge.hf_io import copy_aux_files, kind_from_name
from mswift.bridge.layout import carried_tensors
from mswift.bridge.model_io import load_hf_into_model, save_model_to_hf
from mswift.bridge.quantized import export_plan, open_checkpoint, plain_config
from mswift.config.schema import MswiftConfig
from mswift.models.hf_config import read_hf_config
from mswift.models.registry import dims_for, family_for, padded_vocab_for
from mswift.models.weight_map import WeightMap


def _hf_dir(cfg: MswiftConfig) -> Path:
    if cfg.model.hf_model is None:
        raise BridgeError("hf_model is not set: name the HF model directory to load or to take "
                          "config and tokenizer files from")
    return Path(cfg.model.hf_model)


def weight_map_for(cfg: MswiftConfig) -> tuple[WeightMap, tuple[str, ...]]:
    """The weight map of ``cfg``'s model at its TP size, and the HF tensors it does not read
    (the family's ignored ones, and those carried through untouched)."""
    hf_dir = _hf_dir(cfg)
    config = read_hf_config(hf_dir)
    family = family_for(config, where=str(hf_dir / "config.json"))
    padded = padded_vocab_for(cfg.model, cfg.parallel.tensor_model_parallel_size)
    return (family.weight_map(config, dims_for(cfg.model, padded)),
            family.ignored_tensors
            + family.hf_layout(config, cfg.model.mtp_num_layers or 0).all_carried)


def load_hf_checkpoint(chunks, cfg: MswiftConfig) -> int:
    """Load ``cfg.model.hf_model``'s weights into this rank's model chunks."""
    wmap, ignored = weight_map_for(cfg)
    return load_hf_into_model(chunks, _hf_dir(cfg), wmap, ignored)


def save_hf_checkpoint(chunks, cfg: MswiftConfig, out_dir: str | Path,
                       max_shard_bytes: int | None = None) -> Path:
    """Write the model as an HF directory (every rank calls this). Written to ``OUT.tmp`` and
    renamed when complete; an existing ``out_dir`` is replaced."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    wmap, _ = weight_map_for(cfg)
    source = open_checkpoint(_hf_dir(cfg))
    stored = {name: kind_from_name(kind) for name, kind, _ in source.tensor_records()}
    kinds, encoder, plain = export_plan(source.dir, wmap.hf_shapes(), stored, None)
    dtypes = {name: torch_dtype(kind) for name, kind in kinds.items()}
    config = read_hf_config(source.dir)
    # hf_model's tensors that megatron does not hold (a vision tower): copied as they are.
    carried = carried_tensors(source.dir, config, family_for(config),
                              cfg.model.mtp_num_layers or 0)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    save_model_to_hf(chunks, wmap, tmp, dtypes, max_shard_bytes, encoder=encoder,
                     carried=carried)
    if rank == 0:
        copy_aux_files(source.dir, tmp)
        if plain:
            plain_config(tmp, plain)
    unpad_hf_dir_on_rank0(tmp)  # hf_model's attention padded for TP: back to its head counts
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    if dist.is_initialized():
        dist.barrier()
    return out
