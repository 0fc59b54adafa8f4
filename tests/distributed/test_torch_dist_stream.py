"""Streaming torch_dist conversions against megatron-core's own checkpoints.

* HF -> torch_dist written by the streaming writer (one process, and shared out over 2 ranks)
  holds the same keys, global shapes, dtypes, chunks and bytes as megatron-core's
  ``dist_checkpointing.save`` of a TP1 model loaded from the same HF weights, and megatron-core
  loads it into a TP2 (+EP2 for MoE) model with every parameter equal to loading HF directly.
* The streaming reader reads back every tensor of a checkpoint megatron-core saved at TP2
  (fused gate/up split four ways, vocabulary split over ranks) equal to the HF weights, and
  mcore_to_hf copies the HF tensors out of its chunks bit for bit.
* Under 2 ranks (as under torchrun across nodes) each rank reads only the HF bytes of its own
  share of a DeepSeek-V3 conversion: what the kernel counts it reading (``/proc/self/io``
  ``rchar``: read, pread and copy_file_range alike) is within 1% of the tensor bytes it writes.
* The keys, chunks and ``_extra_state`` objects mswift derives from the weight map (for the
  byte-copy writer and reader) are those of megatron-core's ``sharded_state_dict`` for every
  family, and for a model with both dense and MoE layers (not stacked).

Every one-rank case runs in one spawned rank and every two-rank case in one spawn of 2 ranks,
one case after the other (megatron-core's groups are started again per case).
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




def _bytes_read() -> int:
    """Bytes this process has read so far, as the kernel counts them."""
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("rchar:")).split()[1])


def reads_of_a_shared_conversion(hf_dir, out):
    """(bytes this rank read while 2 ranks converted HF -> torch_dist, the tensor bytes of the
    items in its own files, the HF tensor bytes of the whole model)."""
    import math
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemReader

    from mswift.bridge.convert import hf_to_mcore
    from mswift.bridge.hf_io import HFCheckpoint

    before = _bytes_read()  # imports are done: the shared conversion ran before in this rank
    hf_to_mcore(hf_dir, out, "torch_dist", progress=False)
    read = _bytes_read() - before
    dist.barrier()  # rank 0 has renamed OUT.tmp to OUT
    meta = FileSystemReader(str(Path(out) / "iter_0000000")).read_metadata()
    written = 0  # tensor bytes (not the files' framing) of the chunks in this rank's files
    for index, info in meta.storage_data.items():
        tensor = meta.state_dict_metadata[index.fqn]
        if info.relative_path.startswith(f"__{dist.get_rank()}_") and hasattr(tensor, "chunks"):
            chunk = next(c for c in tensor.chunks if tuple(c.offsets) == tuple(index.offset))
            written += math.prod(chunk.sizes) * tensor.properties.dtype.itemsize
    ckpt = HFCheckpoint(hf_dir)
    total = sum(ckpt.read(name).nbytes for name in ckpt.names)
    return read, written, total


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


# -- the spawns and the checks ----------------------------------------------------------------


def one_rank_cases(writer_cases: dict, structure_dirs: dict) -> dict:
    out = {("writer", family): same_as_megatron(*dirs) for family, dirs in writer_cases.items()}
    for case, hf_dir in structure_dirs.items():
        out[("structure", case)] = megatron_and_derived_structure(hf_dir)
    return out


def two_rank_cases(shared_cases: dict, reader_cases: dict, reads_case: tuple) -> dict:
    out = {("shared", family): convert_shared_then_load(hf_dir, ckpt, 2, 2)
           for family, (hf_dir, ckpt) in shared_cases.items()}
    for family, dirs in reader_cases.items():
        out[("reader", family)] = read_megatron_tp2(*dirs)
    out["reads"] = reads_of_a_shared_conversion(*reads_case)
    return out


@pytest.fixture(scope="module")
def one_rank(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("one_rank")
    writer = {f: (str(hf_dirs[f]), str(root / f"stream-{f}"), str(root / f"own-{f}"))
              for f in FAMILIES}
    structures = {case: str(save_tiny_hf_model(case.removesuffix("_mixed"), root / case,
                                               dtype=torch.bfloat16, **STRUCTURES[case]))
                  for case in STRUCTURES}
    return run_ranks(1, one_rank_cases, writer, structures, timeout=600)[0]


@pytest.fixture(scope="module")
def two_ranks(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    shared = {f: (str(hf_dirs[f]), root / f"ckpt-{f}") for f in FAMILIES}
    reader = {f: (str(hf_dirs[f]), str(root / f"tp2-{f}"), str(root / f"back-{f}"))
              for f in FAMILIES}
    # DeepSeek-V3 a few MB large (8 experts of 3 x 256 x 256 in 3 MoE layers), so that the
    # config, index and header reads every rank makes are small beside the tensors
    deepseek = save_tiny_hf_model("deepseek_v3", root / "deepseek_v3", dtype=torch.bfloat16,
                                  hidden_size=256, moe_intermediate_size=256,
                                  intermediate_size=512)
    reads = (str(deepseek), str(root / "deepseek_v3-dist"))
    return run_ranks(2, two_rank_cases, shared, reader, reads, timeout=600), shared


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_writer_matches_megatron_save(one_rank, family):
    stream, own, differ = one_rank[("writer", family)]
    assert stream == own  # keys, global shapes, dtypes, chunk offsets and sizes
    assert differ == []


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_share_the_writing_and_megatron_loads_it_at_tp2(two_ranks, family):
    per_rank, shared = two_ranks
    results = [r[("shared", family)] for r in per_rank]
    for count, differ, _ in results:
        assert count > 10 and differ == []
    files, out = results[0][2], shared[family][1]
    written = {r: sum((out / "iter_0000000" / f).stat().st_size for f in files
                      if f.startswith(f"__{r}_") and f.endswith(".distcp")) for r in (0, 1)}
    assert min(written.values()) > 0.3 * sum(written.values())  # both ranks wrote a share


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_reader_reads_a_tp2_megatron_checkpoint(two_ranks, family):
    count, made, copies, same_names, differ = two_ranks[0][0][("reader", family)]
    assert count > 10 and made == []
    assert copies and same_names and differ == []  # byte copies out of TP2 (+EP2) chunks


@pytest.mark.parametrize("case", sorted(STRUCTURES))
def test_structure_from_the_weight_map_is_megatrons(one_rank, case):
    theirs, ours = one_rank[("structure", case)]
    assert ours[0] == theirs[0]  # per parameter: key, chunk offset and shape, region
    assert ours[1] == theirs[1]  # global shapes
    assert ours[2] == theirs[2]  # _extra_state objects
    assert len(ours[2]) > 0


def test_each_rank_reads_only_its_share_of_a_shared_conversion(two_ranks):
    (read0, written0, total), (read1, written1, _) = [r["reads"] for r in two_ranks[0]]
    assert min(written0, written1) > 0.3 * total  # the ranks share the work
    for read, written in ((read0, written0), (read1, written1)):
        # every tensor byte a rank writes is read once from HF, and next to nothing else
        assert written <= read <= written + 0.01 * total, (read, written, total)
