"""Megatron-LM's legacy per-rank checkpoint layout (``--ckpt-format torch``), written and read
without building a model, so one process can write or read any TP/PP/EP layout.

``ROOT/latest_checkpointed_iteration.txt`` (:mod:`mswift.bridge.tracker`) names the iteration;
``ROOT/iter_0000000/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` (folders named by
:meth:`mswift.bridge.layout.Layout.rank_dir`) holds one rank's ``{"model": state_dict,
"checkpoint_version": 3.0, "iteration": N, "args": Namespace}`` (``model0``, ``model1``, ...
with virtual pipeline stages). ``_PPP`` appears when PP > 1, ``_EEE`` when EP > 1. The state
dict is that of megatron-core's GPTModel with the *local* layer spec (Megatron-LM's
``--transformer-impl local``): stage-local layer numbers, EP-rank-local expert numbers, and an
``_extra_state`` (None) entry per linear layer. Expert tensor parallelism equals TP here.

Rank files are written and read one tensor at a time (:mod:`mswift.bridge.torch_file`): a
conversion holds about one tensor in memory, however large a rank file is.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from mswift.bridge import dtypes
from mswift.bridge.errors import BridgeError
from mswift.bridge.layout import Layout
from mswift.bridge.torch_file import (
    LazyTensor,
    StoredTensor,
    TorchGlobal,
    load_index,
    save_streaming,
)
from mswift.bridge.tracker import iteration_dir, read_iteration_dir
from mswift.lazy_import import lazy_module
from mswift.models.weight_map import WeightMap, grouped_experts_name

torch = lazy_module("torch")  # layouts, indexes and byte copies do without it

FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def chunk_sizes(layout: Layout, num_layers: int) -> list[int]:
    """Layers of each pipeline rank's virtual stage, as megatron-core splits them
    (``get_num_layers_to_build``): the first / last stage's given counts, the other layers
    evenly over the other stages, each stage's evenly over its virtual stages."""
    fixed = {0: layout.first, layout.pp - 1: layout.last} if layout.pp > 1 else {}
    fixed = {rank: n for rank, n in fixed.items() if n is not None}
    others = layout.pp - len(fixed)
    each = (num_layers - sum(fixed.values())) // (others * layout.chunks) if others else 0
    return [fixed[rank] // layout.chunks if rank in fixed else each
            for rank in range(layout.pp)]


def chunk_layers(layout: Layout, pp_rank: int, vp_stage: int, num_layers: int) -> range:
    """Global layers of one (virtual) pipeline stage (megatron-core's
    ``get_transformer_layer_offset``): virtual stage v of every rank comes after all ranks'
    virtual stage v - 1, ranks in order."""
    sizes = chunk_sizes(layout, num_layers)
    start = vp_stage * sum(sizes) + sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def chunk_entries(wmap: WeightMap, layout: Layout, pp_rank: int, vp_stage: int,
                  ep_rank: int) -> list[tuple[str, str | None]]:
    """(local name, global name) of every state-dict entry of one model chunk of one rank;
    the global name is None for ``_extra_state`` entries. Expert weights under the grouped
    experts' names when ``layout.grouped_experts`` (one ``_extra_state`` per grouped linear
    layer, as TE's ``GroupedLinear`` keeps)."""
    d = wmap.dims
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == layout.pp - 1 and vp_stage == layout.chunks - 1
    layers = chunk_layers(layout, pp_rank, vp_stage, d.num_layers)
    per_rank = d.experts // layout.ep if d.experts else 0
    experts = list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))
    entries: dict[str, str | None] = {}
    for rule in wmap.rules:
        if rule.per_mtp:  # the multi-token-prediction modules: all on the last stage
            if not last:
                continue
            pairs = list(enumerate(experts)) if rule.per_expert else [(None, None)]
            for mtp in range(d.mtp_layers):
                if not rule.applies_to_layer(d.num_layers + mtp, d):
                    continue
                for local_expert, expert in pairs:
                    local = rule.mcore.format(mtp=mtp, expert=local_expert)
                    if layout.grouped_experts:
                        local = grouped_experts_name(local)
                    entries[local] = rule.mcore.format(mtp=mtp, expert=expert)
                    if rule.extra_state:
                        entries[_module(local) + "._extra_state"] = None
        elif rule.per_layer:
            for local_layer, layer in enumerate(layers):
                if not rule.applies_to_layer(layer, d):
                    continue
                pairs = list(enumerate(experts)) if rule.per_expert else [(None, None)]
                for local_expert, expert in pairs:
                    local = rule.mcore.format(layer=local_layer, expert=local_expert)
                    if layout.grouped_experts:
                        local = grouped_experts_name(local)
                    entries[local] = rule.mcore.format(layer=layer, expert=expert)
                    if rule.extra_state:
                        entries[_module(local) + "._extra_state"] = None
        # The last stage keeps a copy of the embedding for multi-token prediction.
        elif (first or last and d.mtp_layers) if rule.mcore.startswith("embedding.") else last:
            # A tied model on a single stage has no output weight: it uses the embedding.
            if not (rule.mcore == "output_layer.weight" and d.tied and first):
                entries[rule.mcore] = rule.mcore
            if rule.extra_state:
                entries[_module(rule.mcore) + "._extra_state"] = None
    return list(entries.items())


def _owned(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The tensor in ``dtype``, contiguous (save_streaming writes only a view's own bytes)."""
    return (tensor if dtype is None else tensor.to(dtype)).contiguous()


def _lazy_local(source, wmap: WeightMap, name: str, tp_rank: int, tp_size: int,
                dtype: torch.dtype | None) -> LazyTensor:
    """``source.local(name, tp_rank, tp_size)`` in ``dtype``, read when it is written."""
    rule, _ = wmap.lookup(name)
    shape = rule.transform.local_shape(rule.hf_shapes(wmap.dims), tp_size, wmap.dims)
    return LazyTensor(shape, dtype or source.dtype(name),
                      lambda: _owned(source.local(name, tp_rank, tp_size), dtype))


def megatron_args(model, layout: Layout, padded_vocab: int, dtype,
                  iteration: int) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores and checks on load (model shape and layout); ``dtype`` a
    torch dtype or (for :func:`~mswift.bridge.torch_file.write_torch_file`, without torch) a
    ``dtypes.Dtype``, stored as ``params_dtype``."""
    name = dtype.name if isinstance(dtype, dtypes.Dtype) else dtypes.of_torch(dtype).name
    params_dtype = TorchGlobal("torch", name) if isinstance(dtype, dtypes.Dtype) else dtype
    return argparse.Namespace(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
        group_query_attention=model.num_query_groups is not None,
        num_query_groups=model.num_query_groups, kv_channels=model.kv_channels,
        max_position_embeddings=model.max_position_embeddings, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        normalization=model.normalization, norm_epsilon=model.norm_epsilon, swiglu=model.swiglu,
        position_embedding_type=model.position_embedding_type, rotary_base=model.rotary_base,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        add_bias_linear=model.add_bias_linear, add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm, num_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk, moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp, expert_model_parallel_size=layout.ep,
        decoder_first_pipeline_num_layers=layout.first,
        decoder_last_pipeline_num_layers=layout.last,
        expert_tensor_parallel_size=layout.tp, moe_grouped_gemm=layout.grouped_experts,
        transformer_impl="local", ckpt_format="torch",
        bf16=name == "bfloat16", fp16=name == "float16", params_dtype=params_dtype,
        iteration=iteration,
    )


def write_legacy(source, wmap: WeightMap, layout: Layout, root: str | Path,
                 dtype: torch.dtype | None, args: argparse.Namespace, iteration: int = 0,
                 ranks: list[tuple[int, int, int]] | None = None, progress: bool = False) -> None:
    """Write the rank files ``ranks`` (default: all) of ``layout`` under ``root`` from
    ``source`` (anything with ``local(name, tp_rank, tp_size)`` and ``dtype(name)``), one
    tensor in memory at a time, in
    ``dtype`` (None: as the source has them).
    The tracker is written by :func:`write_tracker` once every rank's files are complete."""
    iter_dir = iteration_dir(root, iteration)
    todo = layout.ranks() if ranks is None else ranks
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="writing rank files", unit="file")
    for tp_rank, pp_rank, ep_rank in todo:
        state = {"checkpoint_version": 3.0, "iteration": iteration, "args": args}
        for vp_stage in range(layout.chunks):
            sd = {}
            for local, name in chunk_entries(wmap, layout, pp_rank, vp_stage, ep_rank):
                sd[local] = None if name is None else _lazy_local(
                    source, wmap, name, tp_rank, layout.tp, dtype)
            state["model" if layout.vpp is None else f"model{vp_stage}"] = sd
        path = iter_dir / layout.rank_dir(tp_rank, pp_rank, ep_rank) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_streaming(path, state)


def is_legacy(root: str | Path) -> bool:
    try:
        iter_dir, _ = read_iteration_dir(root)
    except BridgeError:
        return False
    return any(_RANK_DIR.match(p.name) for p in iter_dir.iterdir())


def _load(path: Path) -> dict:
    """A rank file's object with its tensors as :class:`StoredTensor` handles (not read yet)."""
    try:
        state = load_index(path)
    except ValueError as err:
        reason = getattr(err, "reason", err)
        raise BridgeError(f"{path}: cannot be read as a Megatron checkpoint file ({reason})"
                          ) from None
    if not isinstance(state, dict):
        raise BridgeError(f"{path}: cannot be read as a Megatron checkpoint file (holds a "
                          f"{type(state).__name__}, expected a dict)")
    return state


def read_layout(root: str | Path) -> tuple[Layout, int]:
    """The layout of a legacy checkpoint, from Megatron-LM's ``args`` in its first rank file."""
    iter_dir, iteration = read_iteration_dir(root)
    dirs = sorted(p for p in iter_dir.iterdir() if _RANK_DIR.match(p.name))
    if not dirs:
        raise BridgeError(f"{iter_dir}: no mp_rank_* directories")
    first = _load(dirs[0] / FILE)
    args = first.get("args")
    if args is None:
        raise BridgeError(f"{dirs[0] / FILE}: no 'args' (Megatron-LM stores the layout there)")
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    layout = Layout(tp=args.tensor_model_parallel_size,
                    pp=args.pipeline_model_parallel_size,
                    ep=getattr(args, "expert_model_parallel_size", 1) or 1,
                    vpp=vpp if vpp and vpp > 1 else None,
                    first=getattr(args, "decoder_first_pipeline_num_layers", None),
                    last=getattr(args, "decoder_last_pipeline_num_layers", None),
                    grouped_experts=bool(getattr(args, "moe_grouped_gemm", False)))
    etp = getattr(args, "expert_tensor_parallel_size", None)
    if etp not in (None, layout.tp):
        raise BridgeError(f"{dirs[0] / FILE}: expert_tensor_parallel_size={etp} differs from "
                          f"tensor_model_parallel_size={layout.tp}; not supported in the legacy "
                          "format")
    return layout, iteration


class LegacySource:
    """Megatron tensors of a legacy checkpoint, merged over its TP ranks and re-split for the
    layout asked for. Opening reads each rank file's index (``pieces``: (name, TP rank) ->
    :class:`StoredTensor`); a tensor's bytes are read when it is asked for."""

    def __init__(self, root: str | Path, wmap: WeightMap):
        self.wmap = wmap
        self.layout, self.iteration = read_layout(root)
        self.iter_dir, _ = read_iteration_dir(root)
        self.pieces: dict[tuple[str, int], StoredTensor] = {}
        problems = []
        for tp_rank, pp_rank, ep_rank in self.layout.ranks():
            problems += self._read_rank(tp_rank, pp_rank, ep_rank)
        if problems:
            raise BridgeError(problems, headline=f"{root}: checkpoint does not match its model")
        self._alias_copies()

    def _alias_copies(self) -> None:
        """A tensor only read from HF (a tied model's output layer, which a checkpoint without
        a separate last stage does not store) is the stored tensor made of the same HF names."""
        by_hf = {}
        for name in self.wmap.mcore_names(to_hf_only=True):
            by_hf[tuple(self.wmap.lookup(name)[1])] = name
        for name in self.wmap.mcore_names():
            twin = by_hf.get(tuple(self.wmap.lookup(name)[1]))
            for r in range(self.layout.tp):
                if (name, r) not in self.pieces and twin and (twin, r) in self.pieces:
                    self.pieces[(name, r)] = self.pieces[(twin, r)]

    def _read_rank(self, tp_rank: int, pp_rank: int, ep_rank: int) -> list[str]:
        path = self.iter_dir / self.layout.rank_dir(tp_rank, pp_rank, ep_rank) / FILE
        if not path.is_file():
            return [f"{path}: missing"]
        state = _load(path)
        problems = []
        for vp_stage in range(self.layout.chunks):
            key = "model" if self.layout.vpp is None else f"model{vp_stage}"
            sd = state.get(key)
            if not isinstance(sd, dict):
                problems.append(f"{path}: no {key!r} state dict")
                continue
            entries = dict(chunk_entries(self.wmap, self.layout, pp_rank, vp_stage, ep_rank))
            for local, name in entries.items():
                if name is None:
                    continue
                if local not in sd:
                    problems.append(f"{path}: {key}[{local!r}] missing")
                elif not isinstance(sd[local], StoredTensor):
                    problems.append(f"{path}: {key}[{local!r}] is a {type(sd[local]).__name__}, "
                                    "expected a tensor")
                else:
                    problems += self._check_shape(path, key, local, name, sd[local])
                    self.pieces.setdefault((name, tp_rank), sd[local])
            unexpected = [k for k in sd if k not in entries]
            problems += [f"{path}: {key}[{k!r}] unexpected (a Transformer Engine layer name? "
                         "only the local layer spec is read)" for k in unexpected]
        return problems

    def _check_shape(self, path: Path, key: str, local: str, name: str,
                     piece: StoredTensor) -> list[str]:
        d = self.wmap.dims
        rule, _ = self.wmap.lookup(name)
        expected = rule.transform.local_shape(rule.hf_shapes(d), self.layout.tp, d)
        if rule.transform.pads:  # padded for the checkpoint's TP size: enough rows will do
            ok = piece.shape[1:] == expected[1:] and piece.shape[0] * self.layout.tp >= d.vocab
        else:
            ok = piece.shape == expected
        if ok:
            return []
        return [(f"{path}: {key}[{local!r}] has shape {list(piece.shape)}, the model config "
                 f"implies {list(expected)} at TP {self.layout.tp}")]

    def dtype(self, name: str) -> torch.dtype:
        return self.pieces[(name, 0)].dtype

    def kind(self, name: str) -> dtypes.Dtype:
        """:meth:`dtype` without torch."""
        return self.pieces[(name, 0)].kind

    def full(self, name: str) -> torch.Tensor:
        rule, _ = self.wmap.lookup(name)
        if self.layout.tp == 1:
            return self.pieces[(name, 0)].read()  # the one shard is the tensor (no cat copy)
        shards = [self.pieces[(name, r)].read() for r in range(self.layout.tp)]
        return rule.transform.merge(shards, self.wmap.dims)

    def local(self, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        rule, _ = self.wmap.lookup(name)
        if tp_size == self.layout.tp and not rule.transform.pads:
            return self.pieces[(name, tp_rank)].read()  # same split: the rank's own piece
        return rule.transform.split(self.full(name), tp_rank, tp_size, self.wmap.dims)
