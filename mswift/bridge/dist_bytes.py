"""megatron-core ``torch_dist`` checkpoints written and read by copying bytes, without torch.

A ``torch_dist`` checkpoint (megatron-core ``dist_checkpointing`` on PyTorch's distributed
checkpoint, DCP) is a folder ``iter_NNNNNNN/`` of

* ``__<rank>_<n>.distcp`` files, each a run of *items*: every stored chunk of a tensor is a
  whole ``torch.save`` archive of that chunk (the tensor, contiguous, alone in its storage),
  every object (a linear layer's ``_extra_state``) a ``torch.save`` of ``[object]``;
* ``.metadata``: ``pickle`` of DCP's ``Metadata``: each key's global shape, dtype and chunks
  (offset and size per dimension) and, per item, the file, offset and length that hold it;
* ``common.pt`` (``torch.save`` of the non-sharded state) and ``metadata.json`` (the backends).

megatron stores the tensors of all layers under one key with the layer (and expert) index as
prepended dimensions (``decoder.layers.self_attention.linear_qkv.weight`` is [layers, rows,
cols]), renames the norms fused into the next linear layer (``input_layernorm`` ->
``self_attention.linear_qkv.layer_norm_weight``; not in multi-latent attention models, whose
local spec keeps ``input_layernorm`` / ``pre_mlp_layernorm``), keeps the router's
``expert_bias`` in fp32 whatever the model's dtype and stores a fused gate/up weight as two
chunks. Every other coordinate is the TP1 parameter's: a tensor saved at TP2 is the same global
tensor in other chunks. :func:`stored_pieces` derives those keys and chunks from the weight map
(the tests check them against megatron-core's own ``sharded_state_dict`` for every family).

:func:`write_torch_dist_copying` writes a checkpoint whose items are copies of rectangles of the
HF files (what :mod:`mswift.bridge.byte_copy` does for the legacy format); every rank lays out
all files the same way (an item's length depends only on its shape and dtype), writes its own
and rank 0 writes ``.metadata``. :func:`stored_tensors` reads ``.metadata`` without torch
(:func:`mswift.bridge.torch_file.unpickle_inert`: nothing of any class runs), and
:class:`DistBytes` reads each item's index the same way and gives the blocks of an HF tensor in
the stored chunks, for a checkpoint saved at any layout (training's own, with or without
optimizer state).
"""
from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from mswift.bridge import dtypes
from mswift.bridge.byte_copy import (
    COPY_THREADS,
    Block,
    HFBytes,
    Matrix,
    OpenFiles,
    copy_fill,
    made_fill,
)
from mswift.bridge.errors import BridgeError
from mswift.bridge.safe_pickle import UnsafeCheckpointError, check_metadata_global
from mswift.bridge.torch_file import (
    DRY_RUN,
    Built,
    Opaque,
    Reduced,
    TensorRecord,
    TorchFileError,
    TorchGlobal,
    load_index,
    pickle_plain,
    run_parallel,
    unpickle_inert,
    write_torch_file,
)
from mswift.bridge.tracker import iteration_dir, read_iteration_dir
from mswift.models.weight_map import TE_FUSED_NORMS, FusedGateUp, WeightMap

METADATA, COMMON, BACKENDS = ".metadata", "common.pt", "metadata.json"
EMBEDDING_KEY = "embedding.word_embeddings.weight"
ITEM_ALIGNMENT = 4096  # items start on a page (their storage record: at its page phase)
_DCP = "torch.distributed.checkpoint.metadata"
# Norms megatron stores under the linear layer they are fused into (TE's LayerNormLinear).
_FUSED_NORMS = {local + part: fused + part for fused, local in TE_FUSED_NORMS
                for part in ("weight", "bias")}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")
_MTP_LAYER = re.compile(r"(mtp\.layers\.\d+\.transformer_layer\.)(.+)$")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def torch_dist_dir(root: str | Path) -> Path:
    """The checkpoint dir of a torch_dist root (tracker) or the dir itself."""
    root = Path(root)
    if (root / BACKENDS).is_file():
        return root
    ckpt, _ = read_iteration_dir(root)
    if not (ckpt / BACKENDS).is_file():
        raise BridgeError(f"{ckpt}: not a torch_dist checkpoint (no {BACKENDS})")
    return ckpt


def is_torch_dist(root: str | Path) -> bool:
    try:
        torch_dist_dir(root)
    except BridgeError:
        return False
    return True


# -- the checkpoint's structure, from the weight map ---------------------------------------------


@dataclass(frozen=True)
class StoredPiece:
    """One stored chunk of a checkpoint tensor and the part of a TP1 model parameter it holds.

    ``offset`` / ``shape``: the chunk in the global tensor ``key`` (with megatron's prepended
    layer / expert axes, of size 1 in ``shape``); ``region``: (start, length) per dim of the
    parameter."""

    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    region: tuple[tuple[int, int], ...]

    @property
    def prepended(self) -> int:
        return len(self.shape) - len(self.region)

    def view_of(self, param):
        """This piece's part of a whole (TP1) parameter (a torch tensor), shaped like the
        stored chunk."""
        for dim, (start, length) in enumerate(self.region):
            param = param.narrow(dim, start, length)
        return param.reshape(self.shape)


def stored_key(name: str, dims) -> tuple[str, tuple[tuple[int, int], ...]]:
    """megatron's checkpoint key of a global parameter name and its prepended axes
    ((index, size) for the layer, then the expert). The layers are stacked along a prepended
    axis only when they are all alike: a model with both dense and MoE layers keeps each
    layer's index in its keys (megatron-core's ``non_homogeneous_layers``)."""
    layer, mtp = _LAYER.match(name), _MTP_LAYER.match(name)
    if mtp is not None:  # an MTP module's decoder layer: its own keys, never stacked
        prefix, rest, axes = mtp.group(1), mtp.group(2), []
    elif layer is None:
        return name, ()
    else:
        index, rest = int(layer.group(1)), layer.group(2)
        stacked = len(set(dims.moe_layers)) <= 1
        prefix, axes = ("decoder.layers.", [(index, dims.num_layers)]) if stacked else \
            (f"decoder.layers.{index}.", [])
    expert = _EXPERT.match(rest)
    if expert is not None:
        axes.append((int(expert.group(1)), dims.experts))
        rest = "mlp.experts.experts." + expert.group(2)
    # megatron-core's MLA layer spec has no sharded_state_dict_keys_map: norms keep their names.
    if not dims.kv_lora_rank:
        rest = _FUSED_NORMS.get(rest, rest)
    return prefix + rest, tuple(axes)


def stored_kind(wmap: WeightMap, name: str, kind: dtypes.Dtype) -> dtypes.Dtype:
    """The dtype a save of a model in ``kind`` stores parameter ``name`` in."""
    rule, _ = wmap.lookup(name)
    return dtypes.BY_NAME["float32"] if rule.fp32 else kind


def param_shape(wmap: WeightMap, name: str) -> tuple[int, ...]:
    """The whole (TP1) parameter's shape."""
    rule, _ = wmap.lookup(name)
    return tuple(rule.transform.local_shape(rule.hf_shapes(wmap.dims), 1, wmap.dims))


def stored_pieces(wmap: WeightMap, name: str) -> list[StoredPiece]:
    """The chunks a TP1 save stores of parameter ``name`` (a fused gate/up weight: its two
    halves, as megatron's ShardedTensorFactory splits it)."""
    rule, _ = wmap.lookup(name)
    shape = param_shape(wmap, name)
    key, axes = stored_key(name, wmap.dims)
    lead = tuple(index for index, _ in axes)
    ones = (1,) * len(axes)
    rows = [(0, shape[0])]
    if isinstance(rule.transform, FusedGateUp):
        half = shape[0] // 2
        rows = [(0, half), (half, half)]
    pieces = []
    for start, length in rows:
        region = ((start, length),) + tuple((0, size) for size in shape[1:])
        pieces.append(StoredPiece(key, lead + (start,) + (0,) * (len(shape) - 1),
                                  ones + (length,) + shape[1:], region))
    return pieces


def global_shape(wmap: WeightMap, name: str) -> tuple[int, ...]:
    _, axes = stored_key(name, wmap.dims)
    return tuple(size for _, size in axes) + param_shape(wmap, name)


def extra_state_keys(wmap: WeightMap) -> list[str]:
    """The ``_extra_state`` objects megatron's linear layers (in the layers and the MTP
    modules) save."""
    keys = []
    for name in wmap.mcore_names(to_hf_only=True):
        rule, _ = wmap.lookup(name)
        if not (rule.extra_state and (_LAYER.match(name) or name.startswith("mtp."))):
            continue
        key, axes = stored_key(name, wmap.dims)
        axes = axes or ((0, 1),)  # megatron's offset and shape of an unsharded object
        where = ".".join(str(i) for i, _ in axes) + "_" + ".".join(str(s) for _, s in axes)
        keys.append(f"{key.rsplit('.', 1)[0]}._extra_state/shard_{where}")
    return keys


# -- writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One item of a .distcp file: a chunk of parameter ``name`` (``piece``) or, when
    ``piece`` is None, the object ``key`` (an ``_extra_state``: None)."""

    key: str
    name: str | None = None
    piece: StoredPiece | None = None


def _items(wmap: WeightMap) -> list[_Item]:
    items = []
    for name in wmap.mcore_names(to_hf_only=True):
        items += [_Item(p.key, name, p) for p in stored_pieces(wmap, name)]
    return items + [_Item(key) for key in extra_state_keys(wmap)]


def _item_object(source: HFBytes, wmap: WeightMap, item: _Item, kind: dtypes.Dtype,
                 opened: OpenFiles):
    """What torch.save wrote for the item (DCP saves each chunk and each object that way): for
    a chunk (rows ``region[0]`` of the TP1 parameter), a record copied from the HF files (cast
    to ``kind`` if need be)."""
    if item.piece is None:
        return [None]
    rule, _ = wmap.lookup(item.name)
    if not rule.transform.tiled:  # a transpose: made with torch
        def make(piece=item.piece, name=item.name):
            return piece.view_of(source.local(name, 0, 1))

        return TensorRecord(item.piece.shape, kind, made_fill([make], kind))
    d = wmap.dims
    tiles = rule.transform.tiles(rule.hf_shapes(d), 0, 1, d)
    start, length = item.piece.region[0]
    blocks = []
    for b in source.blocks(item.name, tiles):
        r0, r1 = max(b.dst_row, start), min(b.dst_row + b.rows, start + length)
        if r0 < r1:
            blocks.append(Block(b.src, b.src_row + r0 - b.dst_row, b.src_col, r0 - start,
                                b.dst_col, r1 - r0, b.width))
    kind = stored_kind(wmap, item.name, kind)
    fill, phase = copy_fill(opened, blocks, param_shape(wmap, item.name),
                            source.kind(item.name), kind)
    return TensorRecord(item.piece.shape, kind, fill, phase or 0)


def _share(lengths: list[int], bins: int) -> list[list[int]]:
    """Item indices per file, the largest first onto the least loaded file."""
    loads, out = [0] * bins, [[] for _ in range(bins)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = loads.index(min(loads))
        loads[target] += lengths[i]
        out[target].append(i)
    return [sorted(files) for files in out]


def write_torch_dist_copying(source: HFBytes, wmap: WeightMap, root: str | Path,
                             iteration: int = 0, rank: int = 0, world: int = 1,
                             threads: int = COPY_THREADS, progress: bool = False,
                             kind: dtypes.Dtype | None = None) -> Path:
    """A model-only torch_dist checkpoint at TP1 (megatron-core reshards it on load) of the
    HF tensors in ``source``, cast to ``kind`` (None: the first tensor's dtype; tensors megatron
    keeps in fp32 in fp32), under ``root/iter_NNNNNNN``. Under several ranks each rank calls this and writes
    its share of the files; the caller waits for all ranks before using the checkpoint.
    Returns the iteration dir."""
    kind = kind or source.kind(wmap.mcore_names(to_hf_only=True)[0])
    ckpt = iteration_dir(root, iteration)
    ckpt.mkdir(parents=True, exist_ok=True)
    items = _items(wmap)
    with OpenFiles() as opened:
        objects = [_item_object(source, wmap, item, kind, opened) for item in items]
        lengths = [write_torch_file("item", obj, fd=DRY_RUN) for obj in objects]
        per_file = _share(lengths, world * threads)
        # File f belongs to rank f // threads (DCP: __<rank>_<file of that rank>.distcp).
        files = [(f // threads, f"__{f // threads}_{f % threads}.distcp", members)
                 for f, members in enumerate(per_file) if members]
        where = {}
        for _, file, members in files:
            offset = 0
            for i in members:
                where[i] = (file, offset, lengths[i])
                offset += lengths[i] + (-lengths[i] % ITEM_ALIGNMENT)
        mine = [(file, members) for owner, file, members in files if owner == rank]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(m) for _, m in mine), desc="writing torch_dist",
                       unit="item")

        def write_file(file: str, members: list[int]) -> None:
            fd = os.open(ckpt / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for i in members:
                    _, offset, length = where[i]
                    wrote = write_torch_file(file, objects[i], fd=fd, base=offset)
                    assert wrote == length, f"{file}: item {items[i].key} took {wrote} " \
                                            f"bytes, laid out as {length}"
                    if bar is not None:
                        bar.update()
            finally:
                os.close(fd)

        run_parallel([lambda f=f, m=m: write_file(f, m) for f, m in mine], threads)
    if bar is not None:
        bar.close()
    if rank == 0:
        _write_metadata(ckpt, wmap, kind, items, where)
        write_torch_file(ckpt / COMMON, {"iteration": iteration, "extra": {}})
        (ckpt / BACKENDS).write_text(json.dumps({
            "sharded_backend": "torch_dist", "sharded_backend_version": 1,
            "common_backend": "torch", "common_backend_version": 1}))
    return ckpt


def _size(values) -> Reduced:
    return Reduced(TorchGlobal("torch", "Size"), (tuple(values),))


def _write_metadata(ckpt: Path, wmap: WeightMap, kind: dtypes.Dtype, items: list[_Item],
                    where: dict[int, tuple[str, int, int]]) -> None:
    """DCP's ``.metadata``, pickled as PyTorch pickles it (dataclasses by their state)."""
    def dcp(name: str) -> TorchGlobal:
        return TorchGlobal(_DCP, name)

    def properties(name: str) -> Built:
        return Built(dcp("TensorProperties"), (
            TorchGlobal("torch", stored_kind(wmap, name, kind).name),
            Reduced(TorchGlobal("torch.serialization", "_get_layout"), ("torch.strided",)),
            False, Reduced(dcp("_MEM_FORMAT_ENCODING"), (0,)), False))

    tensors: dict[str, tuple[tuple[int, ...], list]] = {}
    for item in items:
        if item.piece is not None:
            shape = global_shape(wmap, item.name)
            tensors.setdefault(item.key, (shape, []))[1].append(item.piece)
    state, chunk_index = {}, {}
    for item in items:  # keys in the order of the items (model order, then the objects)
        if item.key in state:
            continue
        if item.piece is None:
            state[item.key] = Built(dcp("BytesStorageMetadata"))
            continue
        shape, pieces = tensors[item.key]
        pieces = sorted(pieces, key=lambda p: p.offset)
        chunk_index.update({(item.key, p.offset): i for i, p in enumerate(pieces)})
        state[item.key] = Built(dcp("TensorStorageMetadata"), {
            "properties": properties(item.name), "size": _size(shape),
            "chunks": [Built(dcp("ChunkStorageMetadata"),
                             {"offsets": _size(p.offset), "sizes": _size(p.shape)})
                       for p in pieces]})
    storage = {}
    for i, item in enumerate(items):
        index = {"fqn": item.key, "index": None}
        if item.piece is not None:
            index = {"fqn": item.key, "offset": _size(item.piece.offset),
                     "index": chunk_index[(item.key, item.piece.offset)]}
        file, offset, length = where[i]
        storage[Built(dcp("MetadataIndex"), index)] = Built(
            TorchGlobal("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            {"relative_path": file, "offset": offset, "length": length})
    metadata = Built(dcp("Metadata"), {
        "state_dict_metadata": state, "planner_data": None, "storage_data": storage,
        "storage_meta": Built(dcp("StorageMeta"), {
            "checkpoint_id": Reduced(TorchGlobal("pathlib", "PosixPath"),
                                     tuple(ckpt.absolute().parts)),
            "save_id": str(uuid.uuid4()), "load_id": None, "modules": []}),
        "version": "1.0.0"})
    (ckpt / METADATA).write_bytes(pickle_plain(metadata))


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a key: its box in the global tensor and where its item is."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: str
    start: int
    length: int
    plain: bool  # stored as is (no DCP transform such as compression)


@dataclass(frozen=True)
class KeyInfo:
    shape: tuple[int, ...]
    kind: dtypes.Dtype | None  # None: a dtype this module does not know
    chunks: tuple[Chunk, ...]


def _state(obj, cls: str):
    if not isinstance(obj, Opaque) or obj.qualname != cls:
        raise ValueError(f"expected a {cls}, found {type(obj).__name__}")
    return obj.state


def _tuple(obj) -> tuple[int, ...]:
    """A pickled torch.Size (or plain tuple / list)."""
    if isinstance(obj, Opaque) and obj.qualname == "Size":
        obj = obj.args[0]
    return tuple(int(v) for v in obj)


def stored_tensors(ckpt: Path) -> dict[str, KeyInfo]:
    """The tensors a torch_dist checkpoint holds, read from ``.metadata`` without torch."""
    path = ckpt / METADATA
    try:
        data = path.read_bytes()
        metadata = _state(unpickle_inert(data, str(path), check_metadata_global), "Metadata")
        places = {}
        for index, info in (metadata.get("storage_data") or {}).items():
            index, info = _state(index, "MetadataIndex"), _state(info, "_StorageInfo")
            offset = index.get("offset")
            plain = not info.get("transform_descriptors")
            if Path(info["relative_path"]).name != info["relative_path"]:  # no ../ tricks
                raise ValueError(f"{index['fqn']}: stored in {info['relative_path']!r}, "
                                 "outside the checkpoint folder")
            places[(index["fqn"], None if offset is None else _tuple(offset))] = (
                str(ckpt / info["relative_path"]), int(info["offset"]), int(info["length"]),
                plain)
        keys = {}
        for key, meta in metadata["state_dict_metadata"].items():
            if not isinstance(meta, Opaque) or meta.qualname != "TensorStorageMetadata":
                continue  # objects (BytesStorageMetadata)
            dtype = meta.state["properties"].state
            dtype = dtype[0] if isinstance(dtype, tuple) else dtype.get("dtype")
            chunks = []
            for chunk in meta.state["chunks"]:
                chunk = _state(chunk, "ChunkStorageMetadata")
                offsets, sizes = _tuple(chunk["offsets"]), _tuple(chunk["sizes"])
                if (key, offsets) not in places:
                    raise ValueError(f"{key}: no storage entry for the chunk at {list(offsets)}")
                chunks.append(Chunk(offsets, sizes, *places[(key, offsets)]))
            kind = dtypes.BY_NAME.get(dtype.name) if isinstance(dtype, TorchGlobal) else None
            keys[key] = KeyInfo(_tuple(meta.state["size"]), kind, tuple(chunks))
        return keys
    except OSError as err:
        raise BridgeError(f"{path}: cannot be read ({err.strerror})") from None
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable metadata gets the same message
        raise BridgeError(f"{path}: cannot be read as a torch_dist checkpoint "
                          f"({type(err).__name__}: {err})") from None


def stored_embedding(root: str | Path) -> tuple[int, dtypes.Dtype]:
    """Rows (the vocabulary as padded when saved) and dtype of the stored embedding."""
    ckpt = torch_dist_dir(root)
    info = stored_tensors(ckpt).get(EMBEDDING_KEY)
    if info is None:
        raise BridgeError(f"{ckpt}: holds no {EMBEDDING_KEY} (not a GPT model checkpoint?)")
    if info.kind is None:
        raise BridgeError(f"{ckpt}: {EMBEDDING_KEY} is stored in a dtype mswift does not know")
    return info.shape[0], info.kind


class DistBytes:
    """Where the bytes of each HF tensor are in a torch_dist checkpoint's chunks (saved at any
    layout), for :func:`mswift.bridge.byte_copy.write_hf_copying`. ``wmap``: the TP1 weight
    map with the vocabulary padded as stored."""

    def __init__(self, root: str | Path, wmap: WeightMap):
        self.ckpt = torch_dist_dir(root)
        self.wmap = wmap
        self.keys = stored_tensors(self.ckpt)
        self._stored: dict[Chunk, object] = {}
        self._tensors = None  # the tensor reader, for tensors made with torch
        self.pieces = {name: stored_pieces(wmap, name)
                       for name in wmap.mcore_names(to_hf_only=True)}
        self._check()

    def _check(self) -> None:
        problems = []
        for name, pieces in self.pieces.items():
            for piece in pieces:
                info = self.keys.get(piece.key)
                if info is None:
                    problems.append(f"{piece.key}: missing (needed for {name})")
                elif len(info.shape) != len(piece.offset) or any(
                        o + s > g for o, s, g in zip(piece.offset, piece.shape, info.shape)):
                    problems.append(f"{piece.key}: stored with shape {list(info.shape)}, which "
                                    f"does not hold {name} at {list(piece.offset)}")
                elif sum(_overlap(c, piece) for c in info.chunks) != math.prod(piece.shape):
                    problems.append(f"{piece.key}: the stored chunks do not cover {name}")
        if problems:
            raise BridgeError(problems, headline=f"{self.ckpt}: checkpoint does not match "
                                                 "its model")

    def kind(self, name: str) -> dtypes.Dtype | None:
        return self.keys[self.pieces[name][0].key].kind

    def full(self, name: str):
        """The whole megatron tensor, read with torch (for a stacked HF tensor, whose experts
        are transposed: no byte copy)."""
        if self._tensors is None:
            from mswift.bridge.torch_dist import TorchDistSource

            self._tensors = TorchDistSource(self)
        return self._tensors.full(name)

    def applies(self, kinds: dict[str, dtypes.Dtype]) -> bool:
        """Every chunk the HF tensors need is stored plainly, contiguous, in the dtype its HF
        tensors are written in or one the copies cast to it (else the tensor path
        converts)."""
        for name, pieces in self.pieces.items():
            kind = self.kind(name)
            _, hf_names = self.wmap.lookup(name)
            if kind is None or not all(dtypes.castable(kind, kinds.get(h, kind))
                                       for h in hf_names):
                return False
            for piece in pieces:
                for chunk in self.keys[piece.key].chunks:
                    if _overlap(chunk, piece) and not self._usable(chunk, kind):
                        return False
        return True

    def _usable(self, chunk: Chunk, kind: dtypes.Dtype) -> bool:
        if not chunk.plain:
            return False
        stored = self._tensor(chunk)
        return (stored.kind == kind and stored.contiguous
                and tuple(stored.shape) == chunk.sizes)

    def _tensor(self, chunk: Chunk):
        if chunk not in self._stored:
            try:
                self._stored[chunk] = load_index(chunk.path, chunk.start, chunk.length)
            except TorchFileError as err:
                raise BridgeError(f"{chunk.path}: the item at byte {chunk.start} is not a "
                                  f"readable tensor ({err})") from None
        return self._stored[chunk]

    def hf_blocks(self, name: str, part: int) -> list[Block]:
        """HF tensor ``part`` of megatron parameter ``name`` as blocks of the stored chunks."""
        rule, _ = self.wmap.lookup(name)
        d = self.wmap.dims
        itemsize = self.kind(name).itemsize
        blocks = []
        for t in rule.transform.tiles(rule.hf_shapes(d), 0, 1, d):
            if t.part != part:
                continue
            for piece in self.pieces[name]:
                for chunk in self.keys[piece.key].chunks:
                    blocks += self._cut(chunk, piece, t, itemsize)
        return blocks

    def _cut(self, chunk: Chunk, piece: StoredPiece, t, itemsize: int) -> list[Block]:
        """The part of tile ``t`` (parameter rows ``at_row:at_row + rows``, all columns) that
        ``chunk`` holds through ``piece``."""
        lead = piece.prepended
        for p in range(lead):  # the chunk must hold this layer / expert
            if not chunk.offsets[p] <= piece.offset[p] < chunk.offsets[p] + chunk.sizes[p]:
                return []
        if len(piece.region) > 2:
            raise BridgeError(f"{piece.key}: {len(piece.region)}-D parameters are not copied")
        # Rows and columns of the parameter, in the piece's and the chunk's coordinates.
        (pr, pn) = piece.region[0]
        (pc, pcn) = piece.region[1] if len(piece.region) > 1 else (0, 1)
        krow, kcol = piece.offset[lead], (piece.offset[lead + 1] if len(piece.region) > 1 else 0)
        crow, crows = chunk.offsets[lead], chunk.sizes[lead]
        ccol, ccols = ((chunk.offsets[lead + 1], chunk.sizes[lead + 1])
                       if len(piece.region) > 1 else (0, 1))
        r0 = max(t.at_row, pr, crow - krow + pr)
        r1 = min(t.at_row + t.rows, pr + pn, crow + crows - krow + pr)
        c0 = max(pc, ccol - kcol + pc)
        c1 = min(pc + pcn, ccol + ccols - kcol + pc)
        if r0 >= r1 or c0 >= c1:
            return []
        layer = 0  # the chunk's flat index of this layer / expert
        for p in range(lead):
            layer = layer * chunk.sizes[p] + piece.offset[p] - chunk.offsets[p]
        stored = self._tensor(chunk)
        row_bytes = ccols * itemsize
        src = Matrix(stored.path, stored.offset + layer * crows * row_bytes, row_bytes)
        return [Block(src, r0 - pr + krow - crow, (c0 - pc + kcol - ccol) * itemsize,
                      t.row + r0 - t.at_row, (t.col + c0) * itemsize, r1 - r0,
                      (c1 - c0) * itemsize)]


def _overlap(chunk: Chunk, piece: StoredPiece) -> int:
    """Elements of ``piece`` that ``chunk`` holds."""
    count = 1
    for o, s, po, ps in zip(chunk.offsets, chunk.sizes, piece.offset, piece.shape):
        count *= max(0, min(o + s, po + ps) - max(o, po))
    return count
