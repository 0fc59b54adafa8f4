"""The weight-map schema: which HF tensors make which megatron-core tensor, and how it is split
over TP.

A family's weight map is a table of :class:`Rule` rows (data, see ``mswift/models/<family>.py``):
a megatron-core name and the HF names it is made of, with ``{layer}`` / ``{expert}``
placeholders, the :class:`Transform` between them and the HF shapes in symbols of
:class:`Dims`. Megatron names are *global*: layer and expert numbers count the whole model, not
one pipeline stage or expert-parallel rank.

A transform works at three levels, so one table serves every path of the bridge:

* ``local``: the tensor-parallel slice of one rank, read straight from the HF tensors (only the
  rows / columns that rank owns are read, from any :class:`TensorReader`: the bridge's
  ``HFCheckpoint`` reads them from safetensors files);
* ``merge`` / ``split``: TP shards <-> the whole megatron tensor;
* ``to_hf``: the whole megatron tensor -> the HF tensors.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Iterator, NamedTuple, Optional, Protocol

from mswift.lazy_import import lazy_module

torch = lazy_module("torch")  # the tables and tiles are read without it (byte copies)


class TensorReader(Protocol):
    """Lazy access to HF tensors (the bridge's ``HFCheckpoint`` is one)."""

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: int = 0
             ) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) ``start:stop`` of a tensor; dim None = all of it."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    # Optional: ``read_rows_into(name, start, out)`` fills ``out`` with rows of ``name``.


@dataclass(frozen=True)
class Dims:
    """The sizes a weight map needs, from the model config (``mswift.models.registry.dims_for``).

    Shape symbols: H hidden, Q heads x head_dim, KV groups x head_dim, D head_dim, F dense MLP
    width, FE expert MLP width (FE2 twice it: fused gate + up), FS shared-expert width,
    V vocabulary, E experts, H2 twice H (the MTP projection's input). Multi-latent attention:
    QL / KVL the q / kv latent widths, KVA the kv down projection (KVL + RoPE dims), QH heads x
    q/k head dim (with RoPE), KVB heads x (q/k dims without RoPE + v dims), VO heads x v dims.
    """

    num_layers: int
    hidden: int
    heads: int
    groups: int  # key/value heads
    head_dim: int
    ffn: int
    vocab: int  # HF vocabulary (rows of embed_tokens / lm_head)
    padded_vocab: int  # megatron rows: vocab padded for TP (zeros past `vocab`)
    tied: bool  # lm_head shares embed_tokens
    experts: int = 0
    moe_ffn: int = 0
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP
    shared_ffn: int = 0
    # multi-latent attention (0: none; q_lora_rank 0 with MLA: q projected directly)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    # multi-token-prediction modules megatron trains (ModelConfig.mtp_num_layers); HF keeps
    # module i as decoder layer ``num_layers + i``
    mtp_layers: int = 0

    def size(self, symbol: str) -> int:
        sizes = {
            "H": self.hidden, "H2": 2 * self.hidden, "Q": self.heads * self.head_dim,
            "KV": self.groups * self.head_dim, "D": self.head_dim, "F": self.ffn,
            "FE": self.moe_ffn, "FE2": 2 * self.moe_ffn, "FS": self.shared_ffn,
            "V": self.vocab, "E": self.experts,
            "QL": self.q_lora_rank, "KVL": self.kv_lora_rank,
            "KVA": self.kv_lora_rank + self.qk_rope_dim,
            "QH": self.heads * (self.qk_nope_dim + self.qk_rope_dim),
            "KVB": self.heads * (self.qk_nope_dim + self.v_head_dim),
            "VO": self.heads * self.v_head_dim,
        }
        return sizes[symbol]

    def conditions(self) -> tuple[str, ...]:
        """The :attr:`Rule.when` values that hold for this model."""
        return ("always", "tied" if self.tied else "untied",
                "q_lora" if self.q_lora_rank else "no_q_lora")

    def is_moe_layer(self, layer: int) -> bool:
        """Layers past ``num_layers`` are the MTP modules' decoder layers, built like the last
        decoder layer (megatron-core's get_gpt_mtp_block_spec)."""
        return bool(self.moe_layers) and self.moe_layers[min(layer, self.num_layers - 1)]

    def with_padded_vocab(self, padded_vocab: int) -> "Dims":
        return replace(self, padded_vocab=padded_vocab)


@dataclass(frozen=True)
class Tile:
    """A rectangle of one HF tensor in a megatron TP shard, for conversions that copy bytes.

    A tensor is seen as a matrix: rows are dim 0, columns are the other dims flattened (a 1-D
    tensor has one column). The tile is rows ``row:row + rows`` and columns ``col:col + cols``
    of HF tensor ``part`` (an index into the rule's HF names; None: zeros, the vocabulary
    padding), at row ``at_row`` of the shard; a shard is its tiles stacked, each as wide as it.
    """

    part: int | None
    row: int
    col: int
    rows: int
    cols: int
    at_row: int


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a tensor seen as a matrix (:class:`Tile`)."""
    rows = shape[0] if shape else 1
    cols = 1
    for size in shape[1:]:
        cols *= size
    return rows, cols


def _stack(pieces: list[tuple[int | None, int, int, int, int]]) -> list[Tile]:
    """Tiles from (part, row, col, rows, cols), stacked in order (empty ones dropped)."""
    tiles, at = [], 0
    for part, row, col, rows, cols in pieces:
        if rows and cols:
            tiles.append(Tile(part, row, col, rows, cols, at))
            at += rows
    return tiles


def _rows(size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    assert size % tp_size == 0, f"{size} rows do not split over {tp_size} ranks"
    part = size // tp_size
    return tp_rank * part, (tp_rank + 1) * part


def _reads_into(src, names: list[str]) -> bool:
    """The reader can put rows straight into a fused tensor (one copy instead of read + cat):
    it has ``read_rows_into`` and the parts share a dtype (else torch.cat would promote)."""
    return hasattr(src, "read_rows_into") and len({src.dtype(n) for n in names}) == 1


class Transform(ABC):
    """HF tensors <-> one megatron tensor; ``tp_dim`` is the dim megatron splits over TP.
    Subclasses give :meth:`local`, :meth:`local_shape` and :meth:`tiles`; the others default
    to a tensor that is not split."""

    tp_dim: Optional[int] = None
    pads = False  # rows past the HF size are padding (which depends on the TP size)
    # :meth:`tiles` describes the slice: conversions copy its bytes. A transpose is no
    # rectangle of bytes: such tensors are made with torch (:meth:`local`, :meth:`to_hf`).
    tiled = True
    name = "transform"

    @abstractmethod
    def local(self, src: TensorReader, names: list[str], tp_rank: int, tp_size: int,
              d: Dims) -> torch.Tensor:
        """This TP rank's slice, reading only its part of the HF tensors ``names``."""

    @abstractmethod
    def local_shape(self, hf_shapes: list[tuple[int, ...]], tp_size: int, d: Dims
                    ) -> tuple[int, ...]:
        """The shape of :meth:`local`'s slice (of :meth:`split` too), from the HF tensors'
        shapes (``Rule.hf_shapes``), without reading anything."""

    @abstractmethod
    def tiles(self, hf_shapes: list[tuple[int, ...]], tp_rank: int, tp_size: int, d: Dims
              ) -> list[Tile]:
        """:meth:`local`'s slice as rectangles of the HF tensors, without torch: the
        conversions that only move bytes copy them (the bridge's ``byte_copy``)."""

    def merge(self, shards: list[torch.Tensor], d: Dims) -> torch.Tensor:
        if self.tp_dim is None:
            return shards[0]
        return torch.cat(shards, dim=self.tp_dim)

    def split(self, full: torch.Tensor, tp_rank: int, tp_size: int, d: Dims) -> torch.Tensor:
        if self.tp_dim is None:
            return full
        return full.chunk(tp_size, dim=self.tp_dim)[tp_rank]

    def to_hf(self, full: torch.Tensor, d: Dims) -> list[torch.Tensor]:
        return [full]

    def __repr__(self):
        return self.name


class Replicated(Transform):
    """Every TP rank holds the whole tensor (norms, router)."""

    name = "replicated"

    def local(self, src, names, tp_rank, tp_size, d):
        return src.read(names[0])

    def local_shape(self, hf_shapes, tp_size, d):
        return tuple(hf_shapes[0])

    def tiles(self, hf_shapes, tp_rank, tp_size, d):
        return _stack([(0, 0, 0, *matrix_shape(hf_shapes[0]))])


class RowParallel(Transform):
    """Split on the input dim (``linear_proj``, ``linear_fc2``): columns of the HF matrix."""

    tp_dim = 1
    name = "row_parallel"

    def local(self, src, names, tp_rank, tp_size, d):
        start, stop = _rows(src.shape(names[0])[1], tp_rank, tp_size)
        return src.read(names[0], 1, start, stop)

    def local_shape(self, hf_shapes, tp_size, d):
        rows, cols = hf_shapes[0]
        return (rows, cols // tp_size)

    def tiles(self, hf_shapes, tp_rank, tp_size, d):
        rows, cols = hf_shapes[0]
        start, stop = _rows(cols, tp_rank, tp_size)
        return _stack([(0, 0, start, rows, stop - start)])


class ColumnParallel(Transform):
    """Split on the output dim (rows of the HF matrix): megatron-core's ColumnParallelLinear
    of one HF tensor (MLA's projections)."""

    tp_dim = 0
    name = "column_parallel"

    def local(self, src, names, tp_rank, tp_size, d):
        start, stop = _rows(src.shape(names[0])[0], tp_rank, tp_size)
        return src.read(names[0], 0, start, stop)

    def local_shape(self, hf_shapes, tp_size, d):
        return (hf_shapes[0][0] // tp_size,) + tuple(hf_shapes[0][1:])

    def tiles(self, hf_shapes, tp_rank, tp_size, d):
        rows, cols = matrix_shape(hf_shapes[0])
        start, stop = _rows(rows, tp_rank, tp_size)
        return _stack([(0, start, 0, stop - start, cols)])


class VocabParallel(Transform):
    """Embedding / output rows, padded with zeros to ``padded_vocab``, split over TP."""

    tp_dim = 0
    pads = True
    name = "vocab_parallel"

    def local(self, src, names, tp_rank, tp_size, d):
        start, stop = _rows(d.padded_vocab, tp_rank, tp_size)
        real = min(stop, d.vocab)  # rows past the vocabulary are padding
        hidden = src.shape(names[0])[1]
        pad = torch.zeros(stop - max(start, real), hidden, dtype=src.dtype(names[0]))
        if real <= start:
            return pad
        rows = src.read(names[0], 0, start, real)
        return torch.cat([rows, pad]) if pad.numel() else rows

    def local_shape(self, hf_shapes, tp_size, d):
        return (d.padded_vocab // tp_size,) + tuple(hf_shapes[0][1:])

    def tiles(self, hf_shapes, tp_rank, tp_size, d):
        start, stop = _rows(d.padded_vocab, tp_rank, tp_size)
        real = max(start, min(stop, d.vocab))  # rows past the vocabulary are padding
        _, cols = matrix_shape(hf_shapes[0])
        return _stack([(0, start, 0, real - start, cols), (None, 0, 0, stop - real, cols)])

    def split(self, full, tp_rank, tp_size, d):
        # `full` may be padded for another TP size: crop to the vocabulary, re-pad.
        rows = full[: d.vocab]
        if d.padded_vocab > d.vocab:
            pad = full.new_zeros((d.padded_vocab - d.vocab,) + tuple(full.shape[1:]))
            rows = torch.cat([rows, pad])
        return rows.chunk(tp_size, dim=0)[tp_rank]

    def to_hf(self, full, d):
        return [full[: d.vocab]]


class FusedQKV(Transform):
    """q, k, v -> ``linear_qkv`` grouped by query group: per group its heads/groups query
    heads, then its key head, then its value head. Weights ``[rows, H]`` and biases ``[rows]``
    alike. TP ranks own whole groups, so a rank's slice is a contiguous run of groups."""

    tp_dim = 0
    name = "fused_qkv"

    def local(self, src, names, tp_rank, tp_size, d):
        g0, g1 = _rows(d.groups, tp_rank, tp_size)
        per_group = d.heads // d.groups * d.head_dim
        if _reads_into(src, names):
            rest = tuple(src.shape(names[0])[1:])
            out = torch.empty((g1 - g0, per_group + 2 * d.head_dim) + rest,
                              dtype=src.dtype(names[0]))  # [groups, q + k + v rows, ...]
            for i, g in enumerate(range(g0, g1)):
                src.read_rows_into(names[0], g * per_group, out[i, :per_group])
                src.read_rows_into(names[1], g * d.head_dim,
                                   out[i, per_group:per_group + d.head_dim])
                src.read_rows_into(names[2], g * d.head_dim, out[i, per_group + d.head_dim:])
            return out.reshape((-1,) + rest)
        q = src.read(names[0], 0, g0 * per_group, g1 * per_group)
        k = src.read(names[1], 0, g0 * d.head_dim, g1 * d.head_dim)
        v = src.read(names[2], 0, g0 * d.head_dim, g1 * d.head_dim)
        return self._interleave(q, k, v, g1 - g0, d)

    def local_shape(self, hf_shapes, tp_size, d):
        rows = sum(shape[0] for shape in hf_shapes)  # (heads + 2 * groups) * head_dim
        return (rows // tp_size,) + tuple(hf_shapes[0][1:])

    def tiles(self, hf_shapes, tp_rank, tp_size, d):
        g0, g1 = _rows(d.groups, tp_rank, tp_size)
        per_group = d.heads // d.groups * d.head_dim
        _, cols = matrix_shape(hf_shapes[0])
        pieces = []
        for g in range(g0, g1):  # per group: its query rows, its key rows, its value rows
            pieces += [(0, g * per_group, 0, per_group, cols),
                       (1, g * d.head_dim, 0, d.head_dim, cols),
                       (2, g * d.head_dim, 0, d.head_dim, cols)]
        return _stack(pieces)

    @staticmethod
    def _interleave(q, k, v, groups, d):
        rest = tuple(q.shape[1:])
        q = q.reshape((groups, -1) + rest)  # [groups, heads/groups * head_dim, ...]
        k = k.reshape((groups, d.head_dim) + rest)
        v = v.reshape((groups, d.head_dim) + rest)
        return torch.cat([q, k, v], dim=1).reshape((-1,) + rest)

    def to_hf(self, full, d):
        rest = tuple(full.shape[1:])
        per_group = d.heads // d.groups * d.head_dim
        grouped = full.reshape((d.groups, per_group + 2 * d.head_dim) + rest)
        q, k, v = grouped.split([per_group, d.head_dim, d.head_dim], dim=1)
        return [t.reshape((-1,) + rest) for t in (q, k, v)]


class FusedGateUp(Transform):
    """gate, up -> ``linear_fc1`` = [gate; up]; each TP rank holds [its gate rows; its up rows]."""

    tp_dim = 0
    name = "fused_gate_up"

    def local(self, src, names, tp_rank, tp_size, d):
        start, stop = _rows(src.shape(names[0])[0], tp_rank, tp_size)
        if _reads_into(src, names):
            rows = stop - start
            out = torch.empty((2 * rows,) + tuple(src.shape(names[0])[1:]),
                              dtype=src.dtype(names[0]))
            src.read_rows_into(names[0], start, out[:rows])
            src.read_rows_into(names[1], start, out[rows:])
            return out
        return torch.cat([src.read(names[0], 0, start, stop), src.read(names[1], 0, start, stop)])

    def local_shape(self, hf_shapes, tp_size, d):
        return (2 * hf_shapes[0][0] // tp_size,) + tuple(hf_shapes[0][1:])

    def tiles(self, hf_shapes, tp_rank, tp_size, d):
        rows, cols = matrix_shape(hf_shapes[0])
        start, stop = _rows(rows, tp_rank, tp_size)
        return _stack([(0, start, 0, stop - start, cols), (1, start, 0, stop - start, cols)])

    def merge(self, shards, d):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

    def split(self, full, tp_rank, tp_size, d):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])

    def to_hf(self, full, d):
        return list(full.chunk(2, dim=0))


class InputMajorGateUp(FusedGateUp):
    """One HF tensor ``[H, 2F]`` (input-major, gate = first F columns, up = the rest; one
    expert of Llama-4's fused ``gate_up_proj``) <-> ``linear_fc1`` ``[gate; up]`` ``[2F, H]``.
    A transpose: no byte copies."""

    name = "input_major_gate_up"
    tiled = False

    def local(self, src, names, tp_rank, tp_size, d):
        width = src.shape(names[0])[1] // 2
        start, stop = _rows(width, tp_rank, tp_size)
        gate = src.read(names[0], 1, start, stop)  # [H, F / tp]
        up = src.read(names[0], 1, width + start, width + stop)
        return torch.cat([gate.t(), up.t()]).contiguous()  # [2F / tp, H]

    def local_shape(self, hf_shapes, tp_size, d):
        hidden, width2 = hf_shapes[0]
        return (width2 // tp_size, hidden)

    def tiles(self, hf_shapes, tp_rank, tp_size, d):
        raise NotImplementedError(f"{self.name}: a transposed tensor is not a byte copy")

    def to_hf(self, full, d):
        return [full.t().contiguous()]  # [gate; up] [2F, H] -> [H, gate | up]


class InputMajorRowParallel(RowParallel):
    """One HF tensor ``[F, H]`` (input-major; one expert of Llama-4's fused ``down_proj``) <->
    ``linear_fc2`` ``[H, F]``, split over TP on F. A transpose: no byte copies."""

    name = "input_major_row_parallel"
    tiled = False

    def local(self, src, names, tp_rank, tp_size, d):
        start, stop = _rows(src.shape(names[0])[0], tp_rank, tp_size)
        return src.read(names[0], 0, start, stop).t().contiguous()  # [H, F / tp]

    def local_shape(self, hf_shapes, tp_size, d):
        width, hidden = hf_shapes[0]
        return (hidden, width // tp_size)

    def tiles(self, hf_shapes, tp_rank, tp_size, d):
        raise NotImplementedError(f"{self.name}: a transposed tensor is not a byte copy")

    def to_hf(self, full, d):
        return [full.t().contiguous()]


_SLICE = re.compile(r"(?P<base>.+)\[(?P<index>\d+)\]")


def stacked_slice(hf_name: str) -> tuple[str, int] | None:
    """``(name, i)`` for an HF name written ``name[i]``: slice ``i`` of dim 0 of the stacked
    tensor ``name`` (Llama-4 keeps all experts of a layer in one tensor; a rule writes
    ``...gate_up_proj[{expert}]``); None for a plain name."""
    match = _SLICE.fullmatch(hf_name)
    return (match["base"], int(match["index"])) if match else None


class SliceReader:
    """A :class:`TensorReader` that also reads ``name[i]`` (:func:`stacked_slice`): it reads
    only that slice of the stacked tensor, then its rows or columns."""

    def __init__(self, src: TensorReader):
        self.src = src

    def read(self, name, dim=None, start=0, stop=0):
        sliced = stacked_slice(name)
        if sliced is None:
            return self.src.read(name, dim, start, stop)
        base, index = sliced
        tensor = self.src.read(base, 0, index, index + 1)[0]
        return tensor if dim is None else tensor.narrow(dim, start, stop - start)

    def shape(self, name):
        sliced = stacked_slice(name)
        return self.src.shape(name) if sliced is None else tuple(self.src.shape(sliced[0])[1:])

    def dtype(self, name):
        sliced = stacked_slice(name)
        return self.src.dtype(name if sliced is None else sliced[0])


REPLICATED = Replicated()
ROW_PARALLEL = RowParallel()
COLUMN_PARALLEL = ColumnParallel()
VOCAB_PARALLEL = VocabParallel()
FUSED_QKV = FusedQKV()
FUSED_GATE_UP = FusedGateUp()
INPUT_MAJOR_GATE_UP = InputMajorGateUp()
INPUT_MAJOR_ROW_PARALLEL = InputMajorRowParallel()

# Weight maps name a layer's norms as megatron-core's local spec does. Its Transformer Engine
# spec fuses them into the next linear layer (TELayerNormColumnParallelLinear), where they are
# parameters of that layer; the local spec saves its norms under those same names (its
# sharded_state_dict_keys_map), so torch_dist checkpoints agree and only live models differ.
TE_FUSED_NORMS = (("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
                  ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."))


# Grouped experts (moe_grouped_gemm: TE's GroupedLinear and mswift's grouped MLP) hold local
# expert i's weight as ``mlp.experts.linear_fc1.weight{i}``, where the per-expert layout
# (SequentialMLP, the weight maps' names) has ``mlp.experts.local_experts.{i}.linear_fc1.weight``.
_GROUPED_EXPERT = re.compile(r"((?:.*\.)?mlp\.experts\.)(linear_fc\d)\.weight(\d+)$")
_PER_EXPERT = re.compile(r"((?:.*\.)?mlp\.experts\.)local_experts\.(\d+)\.(linear_fc\d)\.weight$")


def local_spec_name(name: str) -> str:
    """A layer parameter's name in the local spec with per-expert MLPs
    (``...linear_qkv.layer_norm_weight`` -> ``...input_layernorm.weight``,
    ``...mlp.experts.linear_fc1.weight3`` -> ``...mlp.experts.local_experts.3.linear_fc1.weight``);
    other names unchanged."""
    grouped = _GROUPED_EXPERT.match(name)
    if grouped:
        head, linear, expert = grouped.groups()
        return f"{head}local_experts.{expert}.{linear}.weight"
    for fused, local in TE_FUSED_NORMS:
        head, sep, tail = name.partition("." + fused)
        if sep:
            return f"{head}.{local}{tail}"
    return name


def grouped_experts_name(name: str) -> str:
    """A per-expert weight's name in the grouped experts' layout (the inverse of
    :func:`local_spec_name` for them); other names unchanged."""
    per_expert = _PER_EXPERT.match(name)
    if not per_expert:
        return name
    head, expert, linear = per_expert.groups()
    return f"{head}{linear}.weight{expert}"


@dataclass(frozen=True)
class Rule:
    """One row of a weight map.

    ``mcore`` and ``hf`` may hold ``{layer}`` and ``{expert}``; a rule of the multi-token-
    prediction modules has ``{mtp}`` (the module) in ``mcore`` and ``{layer}`` in ``hf``, which
    is then ``num_layers + mtp`` (HF numbers them after the decoder layers). ``shapes`` gives
    each HF tensor's shape in :class:`Dims` symbols. ``layers`` says which layers have the tensor
    ("all", "dense" or "moe"); ``when`` whether the model has it ("always", or only when the
    embeddings are "tied" / "untied"). ``to_hf=False`` marks a tensor that is read from HF but
    never written back (a tied model's output layer on the last pipeline stage: a copy of the
    embedding), or only with / without a q latent ("q_lora" / "no_q_lora", multi-latent
    attention). ``extra_state``: the megatron module also keeps an ``_extra_state`` entry in
    its state dict (megatron's linear layers do). ``fp32``: megatron keeps the tensor in fp32
    whatever the model's dtype (the router's ``expert_bias``), so checkpoints store it so.
    ``copies``: HF names (``{mtp_layer}``: ``num_layers + mtp``, one per MTP module) of tensors
    the checkpoint stores as copies of this rule's one HF tensor where megatron-core shares
    the tensor (DeepSeek-V3's MTP ``embed_tokens`` / ``shared_head.head``): exports write them
    from it, loads refuse a checkpoint whose copies differ (:meth:`WeightMap.copies`).
    """

    mcore: str
    hf: tuple[str, ...]
    transform: Transform
    shapes: tuple[tuple[str, ...], ...]
    layers: str = "all"
    when: str = "always"
    to_hf: bool = True
    extra_state: bool = False
    fp32: bool = False
    copies: tuple[str, ...] = ()

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.mcore

    @property
    def per_mtp(self) -> bool:
        return "{mtp}" in self.mcore

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.mcore

    def applies_to_layer(self, layer: int, d: Dims) -> bool:
        if self.layers == "all":
            return True
        return d.is_moe_layer(layer) == (self.layers == "moe")

    def hf_shapes(self, d: Dims) -> list[tuple[int, ...]]:
        return [tuple(d.size(s) for s in shape) for shape in self.shapes]


def _pattern(template: str) -> re.Pattern:
    text = re.escape(template)
    text = text.replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    text = text.replace(r"\{mtp\}", r"(?P<mtp>\d+)")
    return re.compile(text + "$")


class HFTensor(NamedTuple):
    """One HF tensor an export writes: its name, shape and the (megatron name, index into the
    rule's HF names) it is made of; ``stacked``: one per expert, in order, each giving one
    slice of dim 0 (Llama-4's fused experts)."""

    name: str
    shape: tuple[int, ...]
    sources: list[tuple[str, int]]
    stacked: bool


class WeightMap:
    """A family's rules for one model: look up megatron names, list every tensor of each side.

    ``hf_prefix`` goes before every HF name: a checkpoint that holds more than the text model
    keeps it under a prefix (Llama-4's multimodal ``language_model.``)."""

    def __init__(self, rules: tuple[Rule, ...], dims: Dims, hf_prefix: str = ""):
        self.dims = dims
        self.rules = tuple(replace(r, hf=tuple(hf_prefix + h for h in r.hf))
                           for r in rules if r.when in dims.conditions())
        self._patterns = [(_pattern(r.mcore), r) for r in self.rules]

    def lookup(self, mcore_name: str) -> tuple[Rule, list[str]]:
        """The rule for a global megatron name and the HF names it reads."""
        for pattern, rule in self._patterns:
            match = pattern.match(mcore_name)
            if match:
                idx = match.groupdict()
                if rule.per_mtp:
                    idx["layer"] = self.dims.num_layers + int(idx["mtp"])
                return rule, [h.format(**idx) for h in rule.hf]
        raise KeyError(f"no weight-map rule for megatron-core tensor {mcore_name!r}")

    def expand(self, rule: Rule) -> Iterator[tuple[str, list[str], dict]]:
        """(megatron name, HF names, indices) of every instance of ``rule`` in the model."""
        d = self.dims
        layers = range(d.num_layers) if rule.per_layer else [None]
        if rule.per_mtp:
            layers = range(d.num_layers, d.num_layers + d.mtp_layers)
        experts = range(d.experts) if rule.per_expert else [None]
        for layer in layers:
            if layer is not None and not rule.applies_to_layer(layer, d):
                continue
            for expert in experts:
                idx = {"layer": layer, "expert": expert}
                if rule.per_mtp:
                    idx["mtp"] = layer - d.num_layers
                yield (rule.mcore.format(**idx), [h.format(**idx) for h in rule.hf], idx)

    def mcore_names(self, to_hf_only: bool = False) -> list[str]:
        """Every global megatron tensor, in model order (embedding, layers, final norm, output)."""
        names = []
        for rule in self.rules:
            if rule.to_hf or not to_hf_only:
                names += [name for name, _, _ in self.expand(rule)]
        return sorted(names, key=_model_order)

    def copies(self, rule: Rule) -> list[str]:
        """The HF names of the copies of ``rule``'s HF tensor (:attr:`Rule.copies`)."""
        d = self.dims
        return [c.format(mtp_layer=d.num_layers + m) for c in rule.copies
                for m in range(d.mtp_layers)]

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor the checkpoint must hold, with its shape."""
        shapes = {}
        for rule in self.rules:
            if not rule.to_hf:
                continue
            shapes.update({c: rule.hf_shapes(self.dims)[0] for c in self.copies(rule)})
            for _, hf_names, _ in self.expand(rule):
                for hf_name, shape in zip(hf_names, rule.hf_shapes(self.dims)):
                    sliced = stacked_slice(hf_name)
                    if sliced is None:
                        shapes[hf_name] = shape
                    else:  # one stacked tensor holds every expert
                        shapes[sliced[0]] = (self.dims.experts,) + shape
        return shapes

    def hf_tensors(self) -> list[HFTensor]:
        """Every HF tensor written back, in the order an export writes them: each megatron
        tensor's HF tensors in model order, a stacked one where its first expert comes."""
        out, stacked = [], {}
        for name in self.mcore_names(to_hf_only=True):
            rule, hf_names = self.lookup(name)
            for part, (hf_name, shape) in enumerate(zip(hf_names, rule.hf_shapes(self.dims))):
                sliced = stacked_slice(hf_name)
                if sliced is None:
                    out.append(HFTensor(hf_name, shape, [(name, part)], False))
                    out += [HFTensor(c, shape, [(name, part)], False) for c in self.copies(rule)]
                    continue
                base, index = sliced
                if base not in stacked:
                    stacked[base] = HFTensor(base, (self.dims.experts,) + shape, [], True)
                    out.append(stacked[base])
                assert index == len(stacked[base].sources), f"{name}: expert out of order"
                stacked[base].sources.append((name, part))
        return out


def _model_order(name: str):
    """Sort key: embedding, then layers in order (rules' order inside a layer), the MTP modules,
    final, output."""
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    mtp = re.match(r"mtp\.layers\.(\d+)\.", name)
    if name.startswith("embedding."):
        return (0, 0, name)
    if match or mtp:
        expert = re.search(r"local_experts\.(\d+)\.", name)
        where = (1, int(match.group(1))) if match else (2, int(mtp.group(1)))
        return (*where, int(expert.group(1)) if expert else -1, name)
    return (3, 0, 0 if "final" in name else 1, name)
