"""Load weights straight into a sharded megatron-core model, and save one straight to HF.

Both work on the chunks :func:`mswift.models.build.build_model` returns for this rank, at any
TP / PP (+ virtual PP) / EP / expert-TP layout. A chunk's state dict uses local names (layer
numbers of its pipeline stage, expert numbers of its EP rank); :func:`global_name` turns them
into the model-wide names the weight map uses, from megatron-core's own numbering
(``TransformerLayer.layer_number``, ``MoELayer.local_expert_indices``).

Loading: every rank reads only its slice, from a source (:class:`HFSource`, or a legacy
checkpoint's :class:`mswift.bridge.legacy.LegacySource`). Saving: rank 0 writes the HF shards;
for each tensor, in model order, the ranks that own its TP pieces (the lowest rank holding each
piece) send them to rank 0, which merges them, turns them into HF tensors and streams them to
disk (:func:`hf_plan` lists them up front for the writer), so rank 0 holds one tensor at a time.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

from mswift.bridge.hf_io import HFCheckpoint, HFShardWriter, PlanEntry
from mswift.lazy_import import lazy_module
from mswift.models.weight_map import SliceReader, WeightMap, local_spec_name

torch = lazy_module("torch")  # hf_plan is used by the byte copies, which do without it
dist = lazy_module("torch.distributed")

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)$")
_MTP_LAYER = re.compile(r"mtp\.layers\.(\d+)\.transformer_layer\.(.*)$")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.*)$")


class HFSource:
    """Megatron tensors (TP slices) read lazily from an HF checkpoint through a weight map."""

    def __init__(self, ckpt: HFCheckpoint, wmap: WeightMap):
        self.ckpt = SliceReader(ckpt)  # also reads one expert of a stacked tensor
        self.wmap = wmap

    def local(self, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        rule, hf_names = self.wmap.lookup(name)
        return rule.transform.local(self.ckpt, hf_names, tp_rank, tp_size, self.wmap.dims)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype :meth:`local` returns: its HF tensors', promoted as ``torch.cat`` does."""
        _, hf_names = self.wmap.lookup(name)
        return functools.reduce(torch.promote_types, [self.ckpt.dtype(h) for h in hf_names])


def global_name(chunk, local: str) -> str:
    """``decoder.layers.0.mlp.experts.local_experts.1.x`` on a later stage / EP rank ->
    the same tensor's model-wide name (e.g. layer 4, expert 3), as the weight map names it
    (a Transformer Engine layer's fused norm by its local-spec name)."""
    local = local_spec_name(local)
    match = _LAYER.match(local)
    mtp = _MTP_LAYER.match(local)
    if not (match or mtp):
        return local
    # a multi-token-prediction module's number is already model-wide (all on one stage)
    layer = (chunk.decoder.layers[int(match.group(1))] if match
             else chunk.mtp.layers[int(mtp.group(1))].transformer_layer)
    rest = (match or mtp).group(2)
    expert = _EXPERT.match(rest)
    if expert:
        index = layer.mlp.local_expert_indices[int(expert.group(1))]
        rest = f"mlp.experts.local_experts.{index}.{expert.group(2)}"
    if mtp:
        return f"mtp.layers.{mtp.group(1)}.transformer_layer.{rest}"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def tp_coords(name: str) -> tuple[int, int]:
    """(rank, size) of the tensor-parallel group that splits this tensor (expert-TP for experts)."""
    from megatron.core import parallel_state as ps

    if ".mlp.experts." in name:
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def model_tensors(chunks) -> list[tuple[str, torch.Tensor]]:
    """(global name, parameter) of every tensor in this rank's chunks (no ``_extra_state``)."""
    out = []
    for chunk in chunks:
        for local, tensor in chunk.state_dict(keep_vars=True).items():
            # Transformer Engine keeps its FP8 metadata as an ``_extra_state`` tensor
            if isinstance(tensor, torch.Tensor) and not local.endswith("._extra_state"):
                out.append((global_name(chunk, local), tensor))
    return out


def _check_split(name: str, tensor: torch.Tensor, transform) -> None:
    # The table's TP split must be megatron's; a mismatch is a bug in a weight map.
    split = getattr(tensor, "partition_dim", None) if getattr(
        tensor, "tensor_model_parallel", False) else None
    assert split == transform.tp_dim, (
        f"{name}: weight map splits dim {transform.tp_dim}, megatron-core splits {split}")


def load_into_model(chunks, source) -> int:
    """Copy each tensor of this rank's chunks from ``source``; returns how many were loaded."""
    count = 0
    with torch.no_grad():
        for name, tensor in model_tensors(chunks):
            rule, _ = source.wmap.lookup(name)
            _check_split(name, tensor, rule.transform)
            value = source.local(name, *tp_coords(name))
            assert value.shape == tensor.shape, (
                f"{name}: source slice {tuple(value.shape)}, model {tuple(tensor.shape)}")
            tensor.data.copy_(value)
            count += 1
    return count


def load_hf_into_model(chunks, hf_dir: str | Path, wmap: WeightMap,
                       ignored: tuple[str, ...] = ()) -> int:
    """Load an HF checkpoint into this rank's chunks (each rank reads only its slices, FP8 /
    AWQ weights dequantized as read); ``ignored``: regexes of HF tensors that are not weights
    (the family's ``ignored_tensors``)."""
    from mswift.bridge.quantized import open_checkpoint

    ckpt = open_checkpoint(hf_dir)
    ckpt.check_tensors(wmap.hf_shapes(), "this", ignored)
    check_copies(ckpt, wmap)
    return load_into_model(chunks, HFSource(ckpt, wmap))


COPY_ROWS = 4096  # rows compared at a time: a 671B embedding is never read whole twice


def check_copies(ckpt, wmap: WeightMap) -> None:
    """Refuse a checkpoint whose stored copies of a tensor (``Rule.copies``: DeepSeek-V3's MTP
    ``embed_tokens`` / ``shared_head.head``) differ from it: megatron-core holds one tensor, so
    loading would silently drop one of them."""
    from mswift.bridge.errors import BridgeError

    for rule in wmap.rules:
        for copy in wmap.copies(rule):
            main = rule.hf[0]
            rows = ckpt.shape(main)[0]
            for start in range(0, rows, COPY_ROWS):
                stop = min(rows, start + COPY_ROWS)
                same = torch.equal(ckpt.read(main, 0, start, stop),
                                   ckpt.read(copy, 0, start, stop))
                if not same:
                    raise BridgeError(
                        f"{copy}: differs from {main} (rows {start}..{stop - 1}); megatron-core's "
                        "multi-token prediction shares the main model's tensor, so mswift loads "
                        "a checkpoint whose copy equals it (set mtp_num_layers to None to carry "
                        "the MTP layers through untouched)")


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _piece_owners(pieces: dict, wmap: WeightMap) -> tuple[dict, dict]:
    """Every rank's pieces -> owner rank of each (name, tp rank) and each name's TP size,
    shape and dtype (the same answer on every rank)."""
    mine = [(name, r, size, tuple(t.shape), t.dtype) for (name, r), (t, size) in pieces.items()]
    _, world = _rank_and_world()
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    owners, info = {}, {}
    for src, items in enumerate(everyone):
        for name, r, size, shape, dtype in items:
            owners.setdefault((name, r), src)
            info[name] = (size, shape, dtype)
    missing = [(n, r) for n in wmap.mcore_names(to_hf_only=True)
               for r in range(info.get(n, (1,))[0]) if (n, r) not in owners]
    assert not missing, f"no rank holds {missing[:5]}"
    return owners, info


def hf_plan(wmap: WeightMap, dtypes: dict[str, torch.dtype],
            model_dtype: Callable[[str], torch.dtype]) -> list[PlanEntry]:
    """``(HF name, dtype, shape)`` of every HF tensor, in the order a save writes them
    (:meth:`~mswift.models.weight_map.WeightMap.hf_tensors`), for :class:`HFShardWriter`.
    ``dtypes``: HF name -> dtype to write; the others keep their megatron tensor's,
    ``model_dtype(megatron name)``."""
    return [(t.name, dtypes.get(t.name) or model_dtype(t.sources[0][0]), t.shape)
            for t in wmap.hf_tensors()]


def save_model_to_hf(chunks, wmap: WeightMap, out_dir: str | Path,
                     dtypes: dict[str, torch.dtype] | None = None,
                     max_shard_bytes: int | None = None, progress: bool = False,
                     encoder=None, carried=None) -> dict | None:
    """Write this model's weights as HF safetensors shards + index into ``out_dir`` (rank 0).

    ``dtypes`` gives the dtype of each HF tensor (e.g. the original checkpoint's); others keep
    the model's; ``encoder`` writes FP8 weights (:class:`mswift.bridge.quantized.Fp8Encoder`).
    ``carried``: tensors megatron does not hold (:class:`~mswift.bridge.byte_copy.
    CarriedTensors`, a vision tower), copied after the model's. Every rank must call this;
    returns the index on rank 0, None elsewhere.
    """
    from mswift.bridge.byte_copy import OpenFiles

    rank, _ = _rank_and_world()
    pieces = {}
    for name, tensor in model_tensors(chunks):
        rule, _ = wmap.lookup(name)
        if rule.to_hf:
            r, size = tp_coords(name)
            pieces[(name, r)] = (tensor.detach(), size)
    owners, info = _piece_owners(pieces, wmap)
    dtypes = dtypes or {}
    writer = None
    if rank == 0:
        kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
        plan = hf_plan(wmap, dtypes, lambda name: info[name][2])
        stored = plan if encoder is None else encoder.plan(plan)
        shards = HFShardWriter(out_dir, stored + (carried.plan() if carried else []), **kwargs)
        writer = shards if encoder is None else encoder.wrap(shards, plan)
    gathered = _Gathered(wmap, pieces, owners, info, rank)
    for t in _progress(wmap.hf_tensors(), progress and rank == 0):
        parts = (gathered.hf_part(name, part) for name, part in t.sources)
        if writer is None:  # the other ranks send their pieces
            for _ in parts:
                pass
            continue
        parts = (p.to(dtypes.get(t.name, p.dtype)) for p in parts)
        if t.stacked:  # one expert at a time
            writer.add_stacked(t.name, parts)
        else:
            writer.add(t.name, next(parts))
    if writer is None:
        return None
    with OpenFiles() as files:
        if carried is not None:
            carried.add_to(shards, files)
        return writer.close()


class _Gathered:
    """Whole megatron tensors on rank 0, each gathered from the ranks that own its TP pieces
    (every rank calls :meth:`hf_part` in the same order); the last one is kept for the next
    HF tensors made of it (q, k, v of one ``linear_qkv``)."""

    def __init__(self, wmap: WeightMap, pieces: dict, owners: dict, info: dict, rank: int):
        self.wmap, self.pieces, self.owners, self.info, self.rank = (
            wmap, pieces, owners, info, rank)
        self.last: tuple[str, list | None] = ("", None)

    def hf_part(self, name: str, part: int) -> torch.Tensor | None:
        """HF tensor ``part`` of megatron tensor ``name`` on rank 0 (None elsewhere)."""
        if self.last[0] != name:
            self.last = (name, self._gather(name))
        return None if self.last[1] is None else self.last[1][part]

    def _gather(self, name: str) -> list | None:
        from mswift.runtime.device import local_device  # the byte-level tools never import torch

        size, shape, dtype = self.info[name]
        shards = []
        for r in range(size):
            src = self.owners[(name, r)]
            if src == self.rank == 0:
                shards.append(self.pieces[(name, r)][0].cpu())
            elif src == self.rank:
                dist.send(self.pieces[(name, r)][0].contiguous(), dst=0)
            elif self.rank == 0:
                buf = torch.empty(shape, dtype=dtype, device=local_device())
                dist.recv(buf, src=src)
                shards.append(buf.cpu())
        if self.rank != 0:
            return None
        rule, _ = self.wmap.lookup(name)
        full = rule.transform.merge(shards, self.wmap.dims)
        return rule.transform.to_hf(full, self.wmap.dims)


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="writing HF tensors", unit="tensor")
