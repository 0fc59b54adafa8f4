"""Safetensors reading without mmap and streamed shard writing, checked against safetensors'
own reader; corrupt files are refused by name."""
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from mswift.bridge.errors import BridgeError
from mswift.bridge.hf_io import INDEX, HFCheckpoint, HFShardWriter, write_index
from mswift.bridge.safetensors_file import SafetensorsFile


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(6, 5, generator=g).to(torch.bfloat16),
        "fp32": torch.randn(4, 7, 3, generator=g),
        "fp16": torch.randn(3, generator=g).to(torch.float16),
        "int64": torch.arange(-5, 7).reshape(3, 4),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False, True]),
    }


def plan_of(tensors):
    return [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def write(directory, tensors, **kwargs) -> dict:
    writer = HFShardWriter(directory, plan_of(tensors), **kwargs)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    return writer.close()


def checkpoint_dir(tmp_path, tensors, **kwargs):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path, write(tmp_path, tensors, **kwargs)


def test_round_trip_read_by_us_and_by_safetensors(tmp_path):
    tensors = sample_tensors()
    # a non-contiguous view is written as its own values
    tensors["view"] = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, 1:4].t()
    directory, index = checkpoint_dir(tmp_path, tensors)
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    path = directory / "model-00001-of-00001.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor), name
    ckpt = HFCheckpoint(directory)
    assert ckpt.names == list(tensors)
    for name, tensor in tensors.items():
        got = ckpt.read(name)
        assert got.dtype == tensor.dtype and ckpt.shape(name) == tuple(tensor.shape)
        assert torch.equal(got, tensor), name
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0  # padded header
    assert not list(directory.glob("*.partial"))


def test_slices_equal_safetensors_get_slice(tmp_path):
    tensors = {"w": torch.randn(8, 12).to(torch.bfloat16), "b": torch.randn(10),
               "x": torch.randn(4, 6, 3)}
    directory, _ = checkpoint_dir(tmp_path, tensors)
    ckpt = HFCheckpoint(directory)
    with safe_open(str(directory / "model-00001-of-00001.safetensors"), "pt") as f:
        for start, stop in [(0, 8), (2, 5), (3, 3), (7, 8)]:
            assert torch.equal(ckpt.read("w", 0, start, stop), f.get_slice("w")[start:stop])
        for start, stop in [(0, 12), (4, 8), (5, 5), (11, 12), (0, 1)]:
            assert torch.equal(ckpt.read("w", 1, start, stop), f.get_slice("w")[:, start:stop])
        assert torch.equal(ckpt.read("b", 0, 3, 9), f.get_slice("b")[3:9])
        assert torch.equal(ckpt.read("x", 1, 2, 5), f.get_slice("x")[:, 2:5])
    with pytest.raises(ValueError, match="w: slice 5:13"):
        ckpt.read("w", 1, 5, 13)
    ckpt.close()


def test_shards_split_by_size_and_index_points_at_each_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    tensors["big"] = torch.ones(30)  # 120 bytes: a shard of its own
    tensors["last"] = torch.zeros(2)
    shards = HFShardWriter.plan_shards(plan_of(tensors), max_shard_bytes=100)
    assert [[name for name, _, _ in s] for s in shards] == [
        ["t0", "t1"], ["t2", "t3"], ["t4"], ["big"], ["last"]]
    directory, index = checkpoint_dir(tmp_path, tensors, max_shard_bytes=100)
    assert index == json.loads((directory / INDEX).read_text())
    assert index["metadata"]["total_size"] == 4 * (5 * 10 + 30 + 2)
    assert sorted(set(index["weight_map"].values())) == [
        f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    for name, tensor in tensors.items():
        with safe_open(str(directory / index["weight_map"][name]), "pt") as f:
            assert torch.equal(f.get_tensor(name), tensor)
    ckpt = HFCheckpoint(directory)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())


def test_shards_written_by_separate_writers(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}
    plan = plan_of(tensors)
    shards = HFShardWriter.plan_shards(plan, 100)
    for part in ([0, 2], [1]):
        writer = HFShardWriter(tmp_path, plan, 100, shards=part)
        for name in writer.names:
            writer.add(name, tensors[name])
        assert writer.close() is None
    assert not (tmp_path / INDEX).exists()
    write_index(tmp_path, shards)
    (tmp_path / "config.json").write_text("{}")
    ckpt = HFCheckpoint(tmp_path)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())


def test_add_out_of_plan_fails(tmp_path):
    tensors = sample_tensors()
    writer = HFShardWriter(tmp_path, plan_of(tensors))
    with pytest.raises(ValueError, match="fp32 .* added where the plan expects bf16"):
        writer.add("fp32", tensors["fp32"])
    with pytest.raises(ValueError, match="expects bf16 torch.bfloat16"):
        writer.add("bf16", tensors["bf16"].float())
    with pytest.raises(ValueError, match=r"\[5, 6\] added where"):
        writer.add("bf16", tensors["bf16"].t())


def test_close_with_missing_tensors_fails_and_leaves_no_shard(tmp_path):
    tensors = sample_tensors()
    writer = HFShardWriter(tmp_path, plan_of(tensors), max_shard_bytes=64)
    writer.add("bf16", tensors["bf16"])
    writer.add("fp32", tensors["fp32"])
    with pytest.raises(ValueError, match="never added .first: fp16"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def good_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write(tmp_path, {"a": torch.ones(2, 3), "b": torch.zeros(4)})
    (tmp_path / "model-00001-of-00001.safetensors").rename(path)
    (tmp_path / INDEX).unlink()
    return path


def with_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize("case, reason", [
    ("short", "shorter than the 8-byte header length"),
    ("header_length", "header of 1000000 bytes"),
    ("truncated", "the file ends early"),
    ("not_json", "header is not JSON"),
    ("not_object", "header is not a JSON object"),
    ("dtype", "a: unknown dtype 'F48'"),
    ("offsets", "a: data_offsets [0, 20] hold 20 bytes, shape [2, 3] of F32 needs 24"),
    ("overlap", "overlaps the tensor before it"),
    ("gap", "leaves a gap"),
])
def test_corrupt_file_is_refused_by_name(tmp_path, case, reason):
    path = good_file(tmp_path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if case == "short":
        path.write_bytes(data[:5])
    elif case == "header_length":
        path.write_bytes(struct.pack("<Q", 1_000_000) + data[8:])
    elif case == "truncated":
        path.write_bytes(data[:-3])
    elif case == "not_json":
        path.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    elif case == "not_object":
        path.write_bytes(data[:8] + b"[1]".ljust(n) + data[8 + n:])
    elif case == "dtype":
        with_header(path, lambda h: h["a"].update(dtype="F48"))
    elif case == "offsets":
        with_header(path, lambda h: h["a"].update(data_offsets=[0, 20]))
    elif case == "overlap":
        with_header(path, lambda h: h["b"].update(data_offsets=[8, 24]))
    else:
        with_header(path, lambda h: h["b"].update(data_offsets=[28, 44]))
    with pytest.raises(BridgeError) as err:
        SafetensorsFile(path)
    assert f"{path}: not a readable safetensors file" in str(err.value)
    assert reason in str(err.value) and "truncated or corrupt?" in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BridgeError, match="model.safetensors: not a readable safetensors file"):
        HFCheckpoint(tmp_path)


def test_partial_reads_are_resumed(tmp_path, monkeypatch):
    import mswift.bridge.safetensors_file as module

    tensors = {"w": torch.randn(9, 10), "b": torch.arange(13, dtype=torch.int16)}
    directory, _ = checkpoint_dir(tmp_path, tensors)
    real = module.os.preadv

    def preadv_7_bytes(fd, buffers, offset):  # as a read interrupted early would
        out = bytearray(min(7, sum(buf.nbytes for buf in buffers)))
        done = real(fd, [out], offset)
        data, i = memoryview(out)[:done], 0
        for buf in buffers:
            take = min(buf.nbytes, done - i)
            buf[:take] = data[i:i + take]
            i += take
        return done

    monkeypatch.setattr(module.os, "preadv", preadv_7_bytes)
    ckpt = HFCheckpoint(directory)
    assert torch.equal(ckpt.read("w"), tensors["w"])
    assert torch.equal(ckpt.read("w", 1, 3, 7), tensors["w"][:, 3:7])
    assert torch.equal(ckpt.read("b", 0, 2, 11), tensors["b"][2:11])


def test_rows_read_into_a_buffer_and_fused_transforms_use_it(tmp_path):
    from mswift.models.weight_map import FUSED_GATE_UP, FUSED_QKV, Dims

    g = torch.Generator().manual_seed(0)
    d = Dims(num_layers=1, hidden=8, heads=4, groups=2, head_dim=2, ffn=6, vocab=10,
             padded_vocab=10, tied=False)
    tensors = {"q": torch.randn(8, 8, generator=g), "k": torch.randn(4, 8, generator=g),
               "v": torch.randn(4, 8, generator=g), "gate": torch.randn(6, 8, generator=g),
               "up": torch.randn(6, 8, generator=g), "qb": torch.randn(8, generator=g),
               "kb": torch.randn(4, generator=g), "vb": torch.randn(4, generator=g)}
    ckpt = HFCheckpoint(checkpoint_dir(tmp_path, tensors)[0])
    out = torch.empty(3, 8)
    ckpt.read_rows_into("gate", 2, out)
    assert torch.equal(out, tensors["gate"][2:5])
    with pytest.raises(ValueError, match="do not fit"):
        ckpt.read_rows_into("gate", 5, out)  # past the end
    with pytest.raises(ValueError, match="do not fit"):
        ckpt.read_rows_into("gate", 0, torch.empty(3, 8, dtype=torch.float16))

    class CopyingReader:  # no read_rows_into: the read + torch.cat path
        def __init__(self, inner):
            self.read, self.shape, self.dtype = inner.read, inner.shape, inner.dtype

    slow = CopyingReader(ckpt)
    for tp in (1, 2):
        for rank in range(tp):
            for transform, names in ((FUSED_QKV, ["q", "k", "v"]), (FUSED_QKV, ["qb", "kb", "vb"]),
                                     (FUSED_GATE_UP, ["gate", "up"])):
                fast = transform.local(ckpt, names, rank, tp, d)
                assert torch.equal(fast, transform.local(slow, names, rank, tp, d))


def test_shards_written_with_their_data_on_a_page(tmp_path):
    """HF shards pad the JSON header with spaces so that the data starts on a page (byte
    copies line pages up); safetensors reads them as usual."""
    import struct

    from safetensors import safe_open

    from mswift.bridge.hf_io import HFShardWriter

    tensors = {"a": torch.randn(4, 6), "b": torch.arange(5, dtype=torch.int64)}
    plan = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = HFShardWriter(tmp_path, plan)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    [shard] = list(tmp_path.glob("*.safetensors"))
    with open(shard, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
    assert (8 + length) % 4096 == 0
    with safe_open(str(shard), "pt") as f:
        assert all(torch.equal(f.get_tensor(name), t) for name, t in tensors.items())


def test_copied_shards_start_their_data_where_sources_line_up(tmp_path):
    """Tensors added by copying (``add_copied``) with the page phases of their sources: each
    shard's data starts where most of its copied bytes line up with their source's pages;
    shards are filled on threads of their own; safetensors reads the files. A fill that fails
    on one thread leaves no shard behind."""
    from mswift.bridge import dtypes

    tensors = {"a": torch.randn(4, 6), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(1000), "d": torch.randn(3)}
    plan = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]

    def fill_with(t, fail=False):
        def fill(fd, offset):
            if fail:
                raise OSError(28, "No space left on device")
            os.pwrite(fd, t.numpy().tobytes(), offset)
        return fill

    def write(directory, max_shard_bytes, fail=""):
        writer = HFShardWriter(directory, plan, max_shard_bytes or 2**30, copy_threads=2)
        writer.want_phases({"a": 200, "c": 1000, "d": 16})
        for name, t in tensors.items():
            writer.add_copied(name, dtypes.of_torch(t.dtype), tuple(t.shape),
                              fill_with(t, fail=name == fail))
        writer.close()

    def data_starts(directory):
        starts = []
        for shard in sorted(directory.glob("*.safetensors")):
            with open(shard, "rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
            starts.append((8 + length) % 4096)
            with safe_open(str(shard), "pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    assert torch.equal(f.get_tensor(name), tensors[name]), name
        return starts

    # One shard: c (4000 bytes at data offset 136) outweighs a (96 at 0) and d (12 at 4136).
    write(tmp_path / "one", None)
    assert data_starts(tmp_path / "one") == [1000 - 136]
    # Shards [a, b], [c], [d]: each starts where its own copied tensor lines up.
    write(tmp_path / "three", 200)
    assert data_starts(tmp_path / "three") == [200, 1000, 16]
    with pytest.raises(OSError, match="No space"):
        write(tmp_path / "failed", 200, fail="c")
    assert list((tmp_path / "failed").iterdir()) == []
