"""Attention padded with all-zero KV groups so that tensor parallelism divides it, and undone.

A model whose KV groups the tensor-parallel size does not divide (SmolLM2-135M: 9 query heads in
3 KV groups, at TP=2) can still be trained: :func:`pad_heads` appends whole groups of all-zero
heads (zero q/k/v rows, zero o_proj columns), 3 + 1 = 4 groups of 3 heads there, head_dim kept.
The padded model computes exactly the same function (a zero v gives a zero attention output,
and the zero o_proj columns drop it) and trains exactly like the original: every gradient into
a padded head passes through its zero v or its zero o_proj columns, so it is zero, Adam's update
of a zero gradient is zero and weight decay keeps a zero weight zero.

The padding is recorded in ``mswift_head_padding.json`` beside the padded model's config.json;
the record travels with the config (a converted checkpoint's ``hf/``, a run's ``hf_model``)
and every HF export (``save_hf``, ``mcore_to_hf``) ends with :func:`unpad_hf_dir`: the padded
rows/columns are dropped, config.json gets the original head counts back, and the real heads'
weights are kept bit for bit. Padding that is not all zeros any more is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mswift.bridge.errors import BridgeError

PADDING_FILE = "mswift_head_padding.json"
UNPAD_HEADLINE = (f"cannot drop the attention padding ({PADDING_FILE}): the padded heads "
                  "are not all zero any more")
HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads")

# HF tensor name suffix -> (axis holding the heads, which count it is laid out by)
HEAD_AXES = {
    "self_attn.q_proj.weight": (0, "num_attention_heads"),  # [heads * head_dim, hidden]
    "self_attn.q_proj.bias": (0, "num_attention_heads"),    # [heads * head_dim]
    "self_attn.k_proj.weight": (0, "num_key_value_heads"),  # [groups * head_dim, hidden]
    "self_attn.k_proj.bias": (0, "num_key_value_heads"),
    "self_attn.v_proj.weight": (0, "num_key_value_heads"),
    "self_attn.v_proj.bias": (0, "num_key_value_heads"),
    "self_attn.o_proj.weight": (1, "num_attention_heads"),  # [hidden, heads * head_dim]
}


def _head_rule(name: str):
    for suffix, rule in HEAD_AXES.items():
        if name.endswith(suffix):
            return rule
    return None


def pad_heads(state: dict, config, tp: int) -> dict | None:
    """Pad ``state`` (HF name -> tensor) and ``config`` (an HF config object) in place to a
    number of KV groups divisible by ``tp``; returns the record to save with
    :func:`write_padding_record`, or None when nothing needed padding."""
    import torch

    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    extra = -groups % tp
    if extra == 0:
        return None
    added = {"num_attention_heads": extra * (heads // groups), "num_key_value_heads": extra}
    for name, tensor in state.items():
        rule = _head_rule(name)
        if rule is None:
            continue
        axis, count = rule
        shape = list(tensor.shape)
        shape[axis] = added[count] * head_dim
        state[name] = torch.cat([tensor, tensor.new_zeros(shape)], dim=axis).contiguous()
    config.num_attention_heads = heads + added["num_attention_heads"]
    config.num_key_value_heads = groups + extra
    config.head_dim = head_dim
    return {"original": {"num_attention_heads": heads, "num_key_value_heads": groups},
            "padded": {"num_attention_heads": config.num_attention_heads,
                       "num_key_value_heads": config.num_key_value_heads},
            "head_dim": head_dim}


def write_padding_record(hf_dir: str | Path, record: dict) -> None:
    _write_json(Path(hf_dir) / PADDING_FILE, record)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_padding_record(hf_dir: str | Path) -> dict | None:
    """The record in ``hf_dir``, checked against its config.json; None if there is none."""
    path = Path(hf_dir) / PADDING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        original, padded, head_dim = record["original"], record["padded"], record["head_dim"]
        counts = {(original[k], padded[k]) for k in HEAD_COUNTS}
    except (ValueError, KeyError, TypeError) as err:
        raise BridgeError(f"{path}: not a head-padding record ({err}); expected 'original' and "
                          f"'padded' with {', '.join(HEAD_COUNTS)}, and 'head_dim'")
    config = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    have = {k: config.get(k) for k in HEAD_COUNTS}
    if have != {k: padded[k] for k in HEAD_COUNTS} or any(o > p for o, p in counts):
        raise BridgeError(f"{path}: records padded heads {padded}, but config.json has {have}")
    return {"original": original, "padded": padded, "head_dim": int(head_dim)}


def unpad_hf_dir(hf_dir: str | Path) -> dict | None:
    """Drop the padded heads of the HF model in ``hf_dir`` if it carries a padding record:
    every shard and config.json are rewritten (each under a temporary name, then renamed) and
    the record is removed. Returns the record, or None when there was nothing to undo."""
    hf_dir = Path(hf_dir)
    record = read_padding_record(hf_dir)
    if record is None:
        return None
    # torch only now: conversions of unpadded models copy bytes and never import it.
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(hf_dir.glob("*.safetensors"))
    problems = []  # every shard is checked before any is rewritten
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                _split_padding(name, f.get_tensor(name), record, shard, problems)
    if problems:
        raise BridgeError(problems, headline=UNPAD_HEADLINE)
    total_size = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
            tensors = {name: _split_padding(name, f.get_tensor(name), record, shard, problems)
                       for name in f.keys()}
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = shard.with_name(shard.name + ".partial")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, shard)
    _rewrite_config_and_index(hf_dir, record, total_size)
    (hf_dir / PADDING_FILE).unlink()
    return record


def unpad_hf_dir_on_rank0(hf_dir: str | Path) -> dict | None:
    """:func:`unpad_hf_dir` by rank 0 for all ranks (every rank calls it): a refusal is
    raised on every rank, so none waits at a later barrier for the one that stopped."""
    import sys

    dist = sys.modules.get("torch.distributed")  # never imported by byte copies: no group
    group = dist is not None and dist.is_initialized()
    rank = dist.get_rank() if group else 0
    outcome = [None, None]  # (record, problems)
    if rank == 0:
        try:
            outcome[0] = unpad_hf_dir(hf_dir)
        except BridgeError as err:
            outcome[1] = (err.problems, err.headline)
    if group:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1]:
        raise BridgeError(*outcome[1])
    return outcome[0]


def _split_padding(name: str, tensor, record: dict, shard: Path, problems: list):
    """``tensor`` without its padded heads (as it is if it has none); what is wrong with the
    padding is added to ``problems``."""
    rule = _head_rule(name)
    if rule is None:
        return tensor
    axis, count = rule
    original, padded = record["original"][count], record["padded"][count]
    keep, want = original * record["head_dim"], padded * record["head_dim"]
    if tensor.shape[axis] != want:
        problems.append(f"{shard.name}: {name} has {tensor.shape[axis]} rows/columns on axis "
                        f"{axis}, expected {want} ({padded} heads of {record['head_dim']})")
        return tensor
    real, padding = tensor.split([keep, want - keep], dim=axis)
    if padding.any():
        problems.append(f"{shard.name}: {name}: {int((padding != 0).sum())} non-zero values in "
                        f"the padded heads {original}..{padded - 1} ({count})")
    return real.contiguous()


def _rewrite_config_and_index(hf_dir: Path, record: dict, total_size: int) -> None:
    config_path = hf_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(record["original"])
    config["head_dim"] = record["head_dim"]
    _write_json(config_path, config)
    index_path = hf_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index.setdefault("metadata", {})["total_size"] = total_size
        _write_json(index_path, index)
