"""Routed experts stored stacked (Llama-4: ``feed_forward.experts.gate_up_proj`` [E, H, 2I] and
``experts.down_proj`` [E, I, H], input-major) are quantized per expert.

compressed-tensors quantizes Linear modules, and transformers, given a quantization config,
builds a Llama-4's routed experts as one Linear per expert (``experts.{e}.gate_proj``,
``up_proj``, ``down_proj``, weights [out, in]); llm-compressor writes them so. The export
splits each stacked tensor into those per-expert weights (``gate_up_proj[e]``'s first I
columns are the gate's, transposed) and writes them compressed in its place.
"""
from __future__ import annotations

import re

import torch

_STACKED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)$")
_INDEXED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)\[(\d+)\]$")


def is_stacked(name: str, shape) -> bool:
    return len(shape) == 3 and _STACKED.match(name) is not None


def _parts(prefix: str, kind: str, expert: int) -> list[str]:
    projections = ("gate", "up") if kind == "gate_up_proj" else ("down",)
    return [f"{prefix}.{expert}.{p}_proj.weight" for p in projections]


def expert_names(name: str, shape) -> list[str]:
    """The per-expert weight names of the stacked tensor ``name`` of ``shape``."""
    prefix, kind = _STACKED.match(name).groups()
    return [n for e in range(shape[0]) for n in _parts(prefix, kind, e)]


def indexed_names(hf_name: str) -> list[str] | None:
    """The per-expert weight names of one expert's slice ``...experts.gate_up_proj[e]`` (a
    weight map's name for megatron's expert ``e``), else None."""
    match = _INDEXED.match(hf_name)
    return None if match is None else _parts(match[1], match[2], int(match[3]))


def source(name: str) -> tuple[str, int, str]:
    """(stacked tensor name, expert, ``gate`` / ``up`` / ``down``) of a per-expert name."""
    match = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
    kind = "down_proj" if match[3] == "down" else "gate_up_proj"
    return f"{match[1]}.{kind}", int(match[2]), match[3]


def expert_weight(stacked: torch.Tensor, part: str) -> torch.Tensor:
    """One expert's [out, in] weight from its slice ``stacked`` ([H, 2I] or [I, H])."""
    if part == "down":
        return stacked.t()
    half = stacked.shape[1] // 2
    return (stacked[:, :half] if part == "gate" else stacked[:, half:]).t()


def restack(pieces: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    """The stacked tensor ``name`` of ``shape`` from its per-expert weights ``pieces``."""
    prefix, kind = _STACKED.match(name).groups()
    experts = []
    for e in range(shape[0]):
        weights = [pieces[n] for n in _parts(prefix, kind, e)]
        experts.append(torch.cat([w.t() for w in weights], dim=1))
    return torch.stack(experts)
