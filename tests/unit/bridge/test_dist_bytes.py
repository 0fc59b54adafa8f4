"""torch_dist checkpoints by copying bytes (``mswift.bridge.dist_bytes``) against the tensor
path (megatron-core's own save of a meta-device model, PyTorch's reader): the same keys,
chunks, dtypes and item payloads; HF -> torch_dist -> HF bit-exact on both readers, for every
family in bf16 and fp32 and a model with both dense and MoE layers; the .metadata pickle is
read without torch; a damaged checkpoint is refused by name (the command lines without
torch: test_byte_copy.py)."""
import io
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch

from mswift.bridge import byte_copy, dist_bytes
from mswift.bridge.convert import hf_to_mcore, mcore_to_hf
from mswift.bridge.errors import BridgeError
from mswift.bridge.hf_io import HFCheckpoint
from mswift.models.registry import families
from mswift.testing import run_ranks
from mswift.testing.hf_models import save_tiny_hf_model

# deepseek_v3: MLA norms keep their local-spec names, the expert bias is stored in fp32.
CASES = {f.name: {} for f in families()}
CASES["qwen3_moe_mixed"] = {"mlp_only_layers": [0]}  # layers not stacked in the checkpoint


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {(case, dtype): save_tiny_hf_model(case.removesuffix("_mixed"),
                                              root / f"{case}-{dtype}",
                                              dtype=getattr(torch, dtype), **overrides)
            for case, overrides in CASES.items() for dtype in ("bfloat16", "float32")}


CAST_CASES = [("llama", "float32", "bf16"), ("qwen3_moe", "bfloat16", "fp32")]


@pytest.fixture(scope="module")
def tensor_made(hf, tmp_path_factory):
    """Every case's checkpoints by both paths: the byte path here (``copied``), the tensor
    paths (megatron-core's save ``made``, PyTorch's reader of ``copied``: ``back_read``; for
    the dtype changes ``made`` and ``made_back``) in ONE spawned process for all cases, not
    one each: a spawn pays megatron-core's imports (~5 s of CPU). A case whose tensor path
    failed carries its traceback, raised by that case's test alone."""
    root = tmp_path_factory.mktemp("paths")
    jobs, out = [], {}
    for (case, dtype), src in hf.items():
        where = root / f"{case}-{dtype}"
        copied = hf_to_mcore(src, where / "copied", "torch_dist", progress=False)
        out[(case, dtype)] = {"copied": copied, "made": where / "made",
                              "back_read": where / "back_read"}
        jobs.append(((case, dtype), "tensor_paths",
                     (str(src), str(where / "made"), str(copied), str(where / "back_read"))))
    for case, src_dtype, dtype in CAST_CASES:
        where = root / f"cast-{case}-{src_dtype}-{dtype}"
        out[(case, src_dtype, dtype)] = {"made": where / "made", "made_back": where / "made_back"}
        jobs.append(((case, src_dtype, dtype), "cast_tensor_paths",
                     (str(hf[(case, src_dtype)]), str(where / "made"), dtype,
                      str(where / "made_back"))))
    (failures,) = run_ranks(1, run_tensor_paths, jobs, timeout=900)
    for key, error in failures.items():
        out[key]["error"] = error
    return out


def run_tensor_paths(jobs) -> dict:
    """Rank body: each job's tensor paths in turn; {job key: traceback} of those that failed."""
    import traceback

    failures = {}
    for key, body, args in jobs:
        try:
            globals()[body](*args)
        except Exception:  # noqa: BLE001 - reported by the test of that case
            failures[key] = traceback.format_exc()
    return failures


def paths_of(tensor_made, key) -> dict:
    made = tensor_made[key]
    if "error" in made:
        pytest.fail(f"the tensor paths of {key} failed:\n{made['error']}")
    return made


def items(root: Path) -> tuple[dict, dict, dict]:
    """(structure, payload per item, common.pt) of a torch_dist checkpoint, read with torch."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = root / "iter_0000000"
    meta = FileSystemReader(str(ckpt)).read_metadata()
    structure = {key: (tuple(md.size), md.properties,
                       sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks))
                 if hasattr(md, "chunks") else "object"
                 for key, md in meta.state_dict_metadata.items()}
    payloads = {}
    for index, info in meta.storage_data.items():
        with open(ckpt / info.relative_path, "rb") as file:
            file.seek(info.offset)
            raw = file.read(info.length)
        assert len(raw) == info.length
        where = (index.fqn, None if index.offset is None else tuple(index.offset))
        payloads[where] = torch.load(io.BytesIO(raw), weights_only=True)
    assert {where[0] for where in payloads} == set(structure)
    return structure, payloads, torch.load(ckpt / "common.pt")


def assert_same_hf(a: Path, b: Path) -> None:
    x, y = HFCheckpoint(a), HFCheckpoint(b)
    assert sorted(x.names) == sorted(y.names)
    for name in x.names:
        u, v = x.read(name), y.read(name)
        assert u.dtype == v.dtype and torch.equal(u.view(torch.uint8), v.view(torch.uint8)), name


def tensor_paths(src: str, made: str, copied: str, back: str) -> None:
    """The tensor paths (megatron-core's save of a meta-device model; PyTorch's reader), in
    a process of their own: they start process groups."""
    from unittest import mock

    with mock.patch.object(byte_copy, "hf_copy_applies", lambda *args: False), \
            mock.patch.object(dist_bytes.DistBytes, "applies", lambda self, kinds: False):
        hf_to_mcore(src, made, "torch_dist", progress=False)
        mcore_to_hf(copied, back, progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_copied_torch_dist_equals_megatrons_and_converts_back(hf, tensor_made, tmp_path, case,
                                                              dtype):
    src = hf[(case, dtype)]
    paths = paths_of(tensor_made, (case, dtype))
    copied, made = paths["copied"], paths["made"]  # bytes; megatron-core's save (fixture)
    back = mcore_to_hf(copied, tmp_path / "back", progress=False)  # bytes both ways
    assert_same_hf(back, src)
    assert_same_hf(paths["back_read"], src)  # our checkpoint, read by PyTorch's reader
    ours, theirs = items(copied), items(made)
    assert ours[0] == theirs[0]  # keys, global shapes, dtype properties, chunks
    assert ours[1].keys() == theirs[1].keys()
    for where, value in theirs[1].items():
        if isinstance(value, torch.Tensor):
            got = ours[1][where]
            assert got.dtype == value.dtype and got.shape == value.shape, where
            assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), where
        else:
            assert ours[1][where] == value == [None], where
    assert ours[2] == theirs[2]
    # megatron-core's checkpoint read by the byte path gives the same HF files.
    assert_same_hf(mcore_to_hf(made, tmp_path / "back_made", progress=False), src)
    assert not torch.distributed.is_initialized()  # nothing here needed a process group


def cast_tensor_paths(src: str, made: str, dtype: str, back: str) -> None:
    """The tensor paths with a dtype change: megatron-core's save, PyTorch's reader."""
    from unittest import mock

    with mock.patch.object(byte_copy, "hf_copy_applies", lambda *args: False), \
            mock.patch.object(dist_bytes.DistBytes, "applies", lambda self, kinds: False):
        hf_to_mcore(src, made, "torch_dist", dtype=dtype, progress=False)
        mcore_to_hf(made, back, progress=False)


@pytest.mark.parametrize("case,src_dtype,dtype", CAST_CASES)
def test_a_changed_dtype_is_cast_as_megatron_saves_it(hf, tensor_made, tmp_path, case,
                                                      src_dtype, dtype):
    """--dtype other than the weights': the copied checkpoint's items equal megatron-core's
    save of the tensors cast by torch; back to HF (cast to the original dtype) both give the
    same tensors."""
    src = hf[(case, src_dtype)]
    copied = hf_to_mcore(src, tmp_path / "copied", "torch_dist", dtype=dtype, progress=False)
    back = mcore_to_hf(copied, tmp_path / "back", progress=False)
    paths = paths_of(tensor_made, (case, src_dtype, dtype))
    ours, theirs = items(copied), items(paths["made"])
    assert ours[0] == theirs[0]
    assert ours[1].keys() == theirs[1].keys()
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    for where, value in theirs[1].items():
        if isinstance(value, torch.Tensor):
            got = ours[1][where]
            assert got.dtype == value.dtype == want and got.shape == value.shape, where
            assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), where
    assert_same_hf(back, paths["made_back"])
    assert HFCheckpoint(back).read(HFCheckpoint(src).names[0]).dtype == getattr(torch, src_dtype)


def test_copied_chunks_line_up_with_their_hf_source(hf, tmp_path):
    """Each chunk copied from one HF tensor starts as far into a page of its .distcp file as
    that tensor does in its safetensors file (``copy_file_range`` then moves whole pages);
    the tiny model's tensors are at many different offsets in a page."""
    from torch.distributed.checkpoint import FileSystemReader

    from mswift.bridge.layout import HFModel
    from mswift.bridge.torch_file import load_index
    from mswift.bridge.torch_zip import PAGE

    src = hf[("llama", "bfloat16")]
    ckpt = hf_to_mcore(src, tmp_path / "td", "torch_dist", progress=False) / "iter_0000000"
    meta = FileSystemReader(str(ckpt)).read_metadata()
    where = {(index.fqn, tuple(index.offset)): info for index, info in meta.storage_data.items()
             if index.offset is not None}
    model, hf_ckpt = HFModel.open(src), HFCheckpoint(src)
    wmap = model.weight_map(model.padded_vocab(1))
    phases = []
    for name in wmap.mcore_names(to_hf_only=True):
        _, hf_names = wmap.lookup(name)
        if len(hf_names) != 1:
            continue
        hf_phase = hf_ckpt.location(hf_names[0])[1] % PAGE
        for piece in dist_bytes.stored_pieces(wmap, name):
            info = where[(piece.key, piece.offset)]
            stored = load_index(ckpt / info.relative_path, info.offset, info.length)
            assert stored.offset % PAGE == hf_phase, (name, piece.key)
            phases.append(hf_phase)
    assert len(phases) > 10 and len(set(phases)) > 1


def test_metadata_read_without_torch(hf, tmp_path):
    """The .metadata pickle read without torch gives what PyTorch's reader gives."""
    from torch.distributed.checkpoint import FileSystemReader

    root = hf_to_mcore(hf[("qwen3_moe", "bfloat16")], tmp_path / "ckpt", "torch_dist", tp=2,
                       progress=False)
    ckpt = root / "iter_0000000"
    keys = dist_bytes.stored_tensors(ckpt)
    meta = FileSystemReader(str(ckpt)).read_metadata()
    tensors = {k: v for k, v in meta.state_dict_metadata.items() if hasattr(v, "chunks")}
    assert set(keys) == set(tensors)
    for key, info in keys.items():
        md = tensors[key]
        assert info.shape == tuple(md.size) and info.kind.name == str(md.properties.dtype)[6:]
        stored = {(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks}
        assert {(c.offsets, c.sizes) for c in info.chunks} == stored
        for c in info.chunks:
            place = meta.storage_data[next(i for i in meta.storage_data if i.fqn == key
                                           and tuple(i.offset) == c.offsets)]
            assert (Path(c.path).name, c.start, c.length) == (
                place.relative_path, place.offset, place.length)
    padded, kind = dist_bytes.stored_embedding(root)
    assert padded % 2 == 0 and kind.name == "bfloat16"


def damaged(root: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(root), str(bad)], check=True)
    ckpt = bad / "iter_0000000"
    if how == "metadata":
        (ckpt / ".metadata").write_bytes(b"not a pickle")
    elif how == "chunk":  # a chunk of one tensor dropped from the metadata
        with open(ckpt / ".metadata", "rb") as file:
            meta = pickle.load(file)
        meta.state_dict_metadata["decoder.layers.mlp.linear_fc1.weight"].chunks.pop()
        with open(ckpt / ".metadata", "wb") as file:
            pickle.dump(meta, file)
    elif how == "path":  # an item said to be outside the checkpoint folder
        with open(ckpt / ".metadata", "rb") as file:
            meta = pickle.load(file)
        next(iter(meta.storage_data.values())).relative_path = "../__0_0.distcp"
        with open(ckpt / ".metadata", "wb") as file:
            pickle.dump(meta, file)
    else:  # a .distcp file cut short
        data = (ckpt / "__0_0.distcp").read_bytes()
        (ckpt / "__0_0.distcp").write_bytes(data[:len(data) // 2])
    return bad


@pytest.mark.parametrize("how,named", [
    ("metadata", ".metadata: cannot be read as a torch_dist checkpoint"),
    ("chunk", "decoder.layers.mlp.linear_fc1.weight: the stored chunks do not cover"),
    ("truncated", "__0_0.distcp"),
    ("path", "stored in '../__0_0.distcp', outside the checkpoint folder"),
])
def test_damaged_checkpoint_is_refused_by_name(hf, tmp_path, how, named):
    root = hf_to_mcore(hf[("llama", "bfloat16")], tmp_path / "ckpt", "torch_dist",
                       progress=False)
    bad = damaged(root, tmp_path, how)
    with pytest.raises(BridgeError, match=re.escape(named)):
        mcore_to_hf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
