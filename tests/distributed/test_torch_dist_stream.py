"""Streaming torch_dist conversions against megatron-core's own checkpoints.

* HF -> torch_dist written by the streaming writer (one process, and shared out over 2 ranks)
  holds the same keys, global shapes, dtypes, chunks and bytes as megatron-core's
  ``dist_checkpointing.save`` of a TP1 model loaded from the same HF weights, and megatron-core
  loads it into a TP2 (+EP2 for MoE) model with every parameter equal to loading HF directly.
* The streaming reader reads back every tensor of a checkpoint megatron-core saved at TP2
  (fused gate/up split four ways, vocabulary split over ranks) equal to the HF weights, and
  mcore_to_hf copies the HF tensors out of its chunks bit for bit.
* The keys, chunks and ``_extra_state`` objects mswift derives from the weight map (for the
  byte-copy writer and reader) are those of megatron-core's ``sharded_state_dict`` for every
  family, and for a model with both dense and MoE layers (not stacked).
"""
import pytest
import torch

from mswift.testing import run_ranks
from mswift.testing.hf_models import save_tiny_hf_model

FAMILIES = ["llama", "qwen3_moe"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_hf")
    return {f: save_tiny_hf_model(f, root / f, dtype=torch.bfloat16) for f in FAMILIES}


def _whole_source(hf_dir, root):
    """Every megatron tensor of ``root`` read by the streaming reader, and the HF ones."""
    from mswift.bridge.convert import _whole_model
    from mswift.bridge.dist_bytes import DistBytes, stored_embedding
    from mswift.bridge.hf_io import HFCheckpoint
    from mswift.bridge.layout import HFModel
    from mswift.bridge.model_io import HFSource
    from mswift.bridge.torch_dist import TorchDistSource

    hf = HFModel.open(hf_dir)
    padded, _ = stored_embedding(root)
    wmap = _whole_model(hf, padded).weight_map(padded)
    return TorchDistSource(DistBytes(root, wmap)), HFSource(HFCheckpoint(hf_dir), wmap), wmap


def _megatron_save(hf_dir, out, tp, ep):
    """megatron-core's own save of a model at TP/EP loaded straight from HF."""
    import dataclasses

    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model
    from mswift.bridge.torch_dist import save_torch_dist

    hf = HFModel.open(hf_dir)
    moe = hf.model.num_experts is not None
    layout = Layout(tp=tp, ep=ep if moe else 1, etp=1 if moe else None,
                    sequence_parallel=moe and tp > 1)
    padded = hf.padded_vocab(1)  # the conversion below pads for TP1 as well
    model = dataclasses.replace(hf.model, make_vocab_size_divisible_by=padded // tp)
    hf = dataclasses.replace(hf, model=model)
    chunks = build_chunks(hf.run_config(layout, dtype=torch.bfloat16))
    load_hf_into_model(chunks, hf_dir, hf.weight_map(padded), hf.family.ignored_tensors)
    save_torch_dist(chunks, out)
    return chunks


def _chunks_of(root):
    from torch.distributed.checkpoint import FileSystemReader

    from mswift.bridge.torch_dist import torch_dist_dir

    meta = FileSystemReader(str(torch_dist_dir(root))).read_metadata().state_dict_metadata
    out = {}
    for key, md in meta.items():
        if hasattr(md, "chunks"):
            out[key] = (tuple(md.size), md.properties,
                        sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks))
        else:
            out[key] = "bytes"
    return out


def same_as_megatron(hf_dir, stream_dir, own_dir):
    """Rank 0 of one process: megatron's TP1 save vs the streaming conversion."""
    from mswift.bridge.convert import hf_to_mcore
    from mswift.runtime.cpu_layer import enable_cpu_layer

    enable_cpu_layer()
    hf_to_mcore(hf_dir, stream_dir, "torch_dist", progress=False)
    _megatron_save(hf_dir, own_dir, tp=1, ep=1)
    stream, own = _chunks_of(stream_dir), _chunks_of(own_dir)
    source_s, hf_source, wmap = _whole_source(hf_dir, stream_dir)
    source_o, _, _ = _whole_source(hf_dir, own_dir)
    differ = []
    for name in wmap.mcore_names(to_hf_only=True):
        a, b, ref = source_s.full(name), source_o.full(name), hf_source.local(name, 0, 1)
        if not (a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
                and torch.equal(a, ref.to(a.dtype))):
            differ.append(name)
    return stream, own, differ


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_writer_matches_megatron_save(hf_dirs, tmp_path, family):
    [(stream, own, differ)] = run_ranks(1, same_as_megatron, str(hf_dirs[family]),
                                        str(tmp_path / "stream"), str(tmp_path / "own"),
                                        timeout=300)
    assert stream == own  # keys, global shapes, dtypes, chunk offsets and sizes
    assert differ == []


def convert_shared_then_load(hf_dir, out, tp, ep):
    """2 ranks write one checkpoint; then megatron-core loads it at TP/EP and both models
    (loaded from it, loaded from HF) have equal parameters."""
    import torch.distributed as dist

    from mswift.bridge.convert import hf_to_mcore
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model
    from mswift.bridge.torch_dist import load_torch_dist
    from mswift.runtime.cpu_layer import enable_cpu_layer

    enable_cpu_layer()
    hf_to_mcore(hf_dir, out, "torch_dist", tp=tp, progress=False)
    hf = HFModel.open(hf_dir)
    moe = hf.model.num_experts is not None
    layout = Layout(tp=tp, ep=ep if moe else 1, etp=1 if moe else None,
                    sequence_parallel=moe and tp > 1)
    from_hf = build_chunks(hf.run_config(layout, dtype=torch.bfloat16))
    load_hf_into_model(from_hf, hf_dir, hf.weight_map(hf.padded_vocab(tp)),
                       hf.family.ignored_tensors)
    from_ckpt = build_chunks(hf.run_config(layout, dtype=torch.bfloat16))
    load_torch_dist(from_ckpt, out)
    a, b = from_hf[0].state_dict(), from_ckpt[0].state_dict()
    differ = [k for k, v in a.items()
              if isinstance(v, torch.Tensor) and not torch.equal(v, b[k])]
    files = sorted(p.name for p in (out / "iter_0000000").iterdir()) if dist.get_rank() == 0 \
        else None
    return len(a), differ, files


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_share_the_writing_and_megatron_loads_it_at_tp2(hf_dirs, tmp_path, family):
    from pathlib import Path

    out = Path(tmp_path / "ckpt")
    results = run_ranks(2, convert_shared_then_load, str(hf_dirs[family]), out, 2, 2,
                        timeout=300)
    for count, differ, _ in results:
        assert count > 10 and differ == []
    files = results[0][2]
    written = {r: sum((out / "iter_0000000" / f).stat().st_size for f in files
                      if f.startswith(f"__{r}_") and f.endswith(".distcp")) for r in (0, 1)}
    assert min(written.values()) > 0.3 * sum(written.values())  # both ranks wrote a share


def read_megatron_tp2(hf_dir, out, back):
    """megatron-core saves at TP2 (+EP2): the tensor reader reads every tensor equal to HF;
    mcore_to_hf (both ranks) copies the HF tensors out of the chunks."""
    import torch.distributed as dist

    from mswift.bridge.convert import _hf_dtypes, mcore_to_hf
    from mswift.bridge.dist_bytes import DistBytes
    from mswift.bridge.hf_io import HFCheckpoint
    from mswift.bridge.layout import HFModel
    from mswift.runtime.cpu_layer import enable_cpu_layer

    enable_cpu_layer()
    _megatron_save(hf_dir, out, tp=2, ep=2)
    source, hf_source, wmap = _whole_source(hf_dir, out)
    copies = DistBytes(out, wmap).applies(_hf_dtypes({}, HFModel.open(hf_dir)))
    mcore_to_hf(out, back, hf_dir=hf_dir, progress=False)
    if dist.get_rank() != 0:
        return None
    names = wmap.mcore_names(to_hf_only=True)
    made = [n for n in names if not torch.equal(source.full(n), hf_source.local(n, 0, 1))]
    original, copied = HFCheckpoint(hf_dir), HFCheckpoint(back)
    differ = [n for n in original.names
              if not torch.equal(original.read(n).view(torch.uint8),
                                 copied.read(n).view(torch.uint8))]
    return len(names), made, copies, sorted(copied.names) == sorted(original.names), differ


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_reader_reads_a_tp2_megatron_checkpoint(hf_dirs, tmp_path, family):
    count, made, copies, same_names, differ = run_ranks(
        2, read_megatron_tp2, str(hf_dirs[family]), str(tmp_path / "tp2"),
        str(tmp_path / "back"), timeout=300)[0]
    assert count > 10 and made == []
    assert copies and same_names and differ == []  # byte copies out of TP2 (+EP2) chunks


STRUCTURES = {"llama": {}, "qwen2": {}, "qwen3": {}, "qwen3_moe": {},
              "qwen3_moe_mixed": {"mlp_only_layers": [0]}}


def megatron_and_derived_structure(hf_dir):
    """The checkpoint keys, chunks and objects of megatron-core's sharded_state_dict of the
    whole model (vocabulary padded for TP2) and those mswift derives from the weight map."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from mswift.bridge.convert import _whole_model
    from mswift.bridge.dist_bytes import extra_state_keys, global_shape, stored_pieces
    from mswift.bridge.layout import HFModel, Layout
    from mswift.bridge.torch_dist import meta_chunks, model_pieces
    from mswift.runtime.cpu_layer import enable_cpu_layer

    enable_cpu_layer()
    hf = HFModel.open(hf_dir)
    padded = hf.padded_vocab(2)
    whole = _whole_model(hf, padded)
    wmap = whole.weight_map(padded)
    pieces, flat = model_pieces(meta_chunks(whole.run_config(Layout(), dtype=torch.bfloat16))[0])
    theirs = (pieces, {t.key: tuple(t.global_shape) for t in flat if isinstance(t, ShardedTensor)},
              sorted(o.unique_key for o in flat if isinstance(o, ShardedObject)))
    names = wmap.mcore_names(to_hf_only=True)
    ours = ({name: stored_pieces(wmap, name) for name in names},
            {stored_pieces(wmap, name)[0].key: global_shape(wmap, name) for name in names},
            sorted(extra_state_keys(wmap)))
    return theirs, ours


@pytest.mark.parametrize("case", sorted(STRUCTURES))
def test_structure_from_the_weight_map_is_megatrons(tmp_path, case):
    family = case.removesuffix("_mixed")
    hf_dir = save_tiny_hf_model(family, tmp_path / case, dtype=torch.bfloat16,
                                **STRUCTURES[case])
    [(theirs, ours)] = run_ranks(1, megatron_and_derived_structure, str(hf_dir), timeout=300)
    assert ours[0] == theirs[0]  # per parameter: key, chunk offset and shape, region
    assert ours[1] == theirs[1]  # global shapes
    assert ours[2] == theirs[2]  # _extra_state objects
    assert len(ours[2]) > 0
